"""Dense block types of the file (ggml's Q8_0 and Q4_0, through gguf-py's quantizers, which are ggml's reference
rules: the bytes are what llama.cpp writes; pbs2p's own Q3 block) and the runtime's int8 activation quantizer."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import quants as ggq
from gguf.constants import GGMLQuantizationType

from .spec import Q3_BYTES, Q4_0_BYTES, Q8_0_BLOCK, Q8_0_BYTES, QType, n_blocks


def _rows(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % Q8_0_BLOCK:
        raise ValueError(f"{what} needs rows whose length is a multiple of {Q8_0_BLOCK}, got shape {x.shape}")
    return x


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml Q8_0 of float32 (R, K), K % 32 == 0 -> uint8 (R, K/32·34): per block d = amax/127 (stored f16),
    q = roundf(x · (1/d)) with the f32 d (ggml's quantize_row_q8_0_ref)."""
    return ggq.quantize(_rows(x, "Q8_0"), GGMLQuantizationType.Q8_0)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """ggml Q4_0 of float32 (R, K), K % 32 == 0 -> uint8 (R, K/32·18): per block the value m of largest magnitude,
    d = m / −8 (stored f16), nibble = min(15, trunc(x·(1/d) + 8.5)); byte j holds element j (low nibble) and
    j + 16 (high nibble)."""
    return ggq.quantize(_rows(x, "Q4_0"), GGMLQuantizationType.Q4_0)


def _dequantize(data: np.ndarray, k: int, qtype: GGMLQuantizationType) -> np.ndarray:
    row_bytes = k // Q8_0_BLOCK * ggq.GGML_QUANT_SIZES[qtype][1]
    data = np.asarray(data, dtype=np.uint8).reshape(-1, row_bytes)
    return ggq.dequantize(data, qtype).astype(np.float32, copy=False)


def dequantize_q8_0(data: np.ndarray, k: int) -> np.ndarray:
    """Q8_0 bytes of rows of length k -> float32 (R, k): value = d·q."""
    return _dequantize(data, k, GGMLQuantizationType.Q8_0)


def dequantize_q4_0(data: np.ndarray, k: int) -> np.ndarray:
    """Q4_0 bytes of rows of length k -> float32 (R, k): value = d·(nibble − 8)."""
    return _dequantize(data, k, GGMLQuantizationType.Q4_0)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (numpy's round is half-to-even)."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def quantize_act(x: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The runtime's per-token, per-column-block int8 activation quantizer (docs/format.md), float32 math.
    x (..., K) -> q int8 (..., K), s float32 (..., nb) with s_b = amax_b / 127."""
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-1]
    nb = n_blocks(k, block_size)
    pad = nb * block_size - k
    xp = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), np.float32)], axis=-1) if pad else x
    xb = xp.reshape(x.shape[:-1] + (nb, block_size))
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    ok = np.isfinite(amax) & (amax > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(ok, np.float32(127) / np.where(ok, amax, np.float32(1)), np.float32(0)).astype(np.float32)
        q = np.clip(round_half_away((xb * inv).astype(np.float32)), -127, 127)
    q = np.where(ok, q, 0).astype(np.int8).reshape(xp.shape)[..., :k]
    s = np.where(ok, amax / np.float32(127), np.float32(0)).astype(np.float32)[..., 0]
    return q, s




# --- dense block-quantized linears (the budget planner's Q8_0 / Q4_0 / Q3 codes) --------------------------

QTYPE_BYTES = {QType.Q8_0: Q8_0_BYTES, QType.Q4_0: Q4_0_BYTES, QType.Q3: Q3_BYTES}
# the stored integer q: Q8_0 value d·q; Q4_0 nibble, value d·(q − 8); Q3 value d·(q − 4)
QTYPE_RANGE = {QType.Q8_0: (-127, 127), QType.Q4_0: (0, 15), QType.Q3: (0, 7)}
QTYPE_OFFSET = {QType.Q8_0: 0, QType.Q4_0: 8, QType.Q3: 4}


def q_integers(data: np.ndarray, k: int, gtype: QType) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 / Q4_0 / Q3 bytes of rows of length k -> (d float16 (R, k/32), the stored integers q (R, k) int16: Q8_0
    q (value d·q), Q4_0 the nibble (value d·(q − 8)), Q3 q (value d·(q − 4)); QTYPE_OFFSET gives the offset)."""
    gtype = QType(gtype)
    if k % Q8_0_BLOCK:
        raise ValueError(f"K = {k} is not a multiple of {Q8_0_BLOCK}")
    nb = k // Q8_0_BLOCK
    b = np.asarray(data, dtype=np.uint8).reshape(-1, nb, QTYPE_BYTES[gtype])
    d = b[..., :2].copy().view(np.float16)[..., 0]
    if gtype == QType.Q3:
        return d, q3_integers(data, k)[1].astype(np.int16)
    if gtype == QType.Q8_0:
        q = b[..., 2:].view(np.int8)
    else:
        body = b[..., 2:]
        q = np.concatenate([body & 15, body >> 4], axis=-1)  # byte j: element j low, element j + 16 high
    return d, q.reshape(b.shape[0], k).astype(np.int16)


def q3_integers(data: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Q3 bytes of rows of length k -> (d float32 (R, k/32), q uint8 (R, k) in 0..7). Block: f16 d, qs[8], qh[4];
    element j: q = ((qs[j % 8] >> 2·(j // 8)) & 3) | ((qh[j // 8] >> (j % 8)) & 1) << 2."""
    nb = k // Q8_0_BLOCK
    b = np.asarray(data, dtype=np.uint8).reshape(-1, nb, Q3_BYTES)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    j = np.arange(Q8_0_BLOCK)
    lo = (b[..., 2 + j % 8] >> (2 * (j // 8)).astype(np.uint8)) & 3
    hi = (b[..., 10 + j // 8] >> (j % 8).astype(np.uint8)) & 1
    return d, (lo | (hi << 2)).reshape(b.shape[0], k)


def dequantize_q3(data: np.ndarray, k: int) -> np.ndarray:
    """Q3 bytes of rows of length k -> float32 (R, k): value d·(q − 4)."""
    d, q = q3_integers(data, k)
    r = q.shape[0]
    v = d[:, :, None] * (q.reshape(r, -1, Q8_0_BLOCK).astype(np.float32) - np.float32(4))
    return v.reshape(r, k).astype(np.float32, copy=False)


@dataclass
class QLinear:
    """A linear stored in Q8_0, Q4_0 (ggml's blocks) or Q3 blocks (pbs2p's) with scales and integers chosen by the
    exporter (a GPTQ solve, not ggml's round-to-nearest rule): data uint8 (R, K/32 · block bytes), exactly the
    file's bytes (Q8_0 / Q4_0: the tensor L.weight of that ggml type; Q3: the I8 tensor L.q3)."""

    gtype: QType
    n_out: int
    n_in: int
    data: np.ndarray

    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def storage_bpw(self) -> float:
        return 8.0 * self.nbytes() / (self.n_out * self.n_in)

    def validate(self) -> None:
        if self.gtype not in QTYPE_BYTES:
            raise ValueError(f"QLinear type {self.gtype!r}: Q8_0, Q4_0 or Q3")
        if self.n_in % Q8_0_BLOCK:
            raise ValueError(f"QLinear K = {self.n_in} is not a multiple of {Q8_0_BLOCK}")
        want = (self.n_out, self.n_in // Q8_0_BLOCK * QTYPE_BYTES[self.gtype])
        if self.data.shape != want or self.data.dtype != np.uint8:
            raise ValueError(f"QLinear data {self.data.shape} {self.data.dtype}, expected {want} uint8")

    def dequantize(self) -> np.ndarray:
        """float32 (R, K): Q8_0 / Q4_0 through gguf-py's dequantizer (value d·q, d·(nibble − 8)); Q3 d·(q − 4)."""
        if self.gtype == QType.Q3:
            return dequantize_q3(self.data, self.n_in)
        return _dequantize(self.data, self.n_in, GGMLQuantizationType(int(self.gtype)))


def pack_q(gtype: QType, d: np.ndarray, q: np.ndarray) -> QLinear:
    """Blocks from per-block scales d (R, K/32, stored as float16) and integers q (R, K) in QTYPE_RANGE:
    Q8_0 block = d then 32 int8; Q4_0 block = d then 16 bytes, byte j = q[j] | q[j + 16] << 4; Q3 block = d, then
    qs[8] with bits 2i, 2i+1 of byte j the low 2 bits of q[8i + j], then qh[4] with bit i of byte j the high bit of
    q[8j + i]."""
    gtype = QType(gtype)
    q = np.asarray(q)
    r, k = q.shape
    if k % Q8_0_BLOCK:
        raise ValueError(f"K = {k} is not a multiple of {Q8_0_BLOCK}")
    nb = k // Q8_0_BLOCK
    lo, hi = QTYPE_RANGE[gtype]
    if q.size and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"{gtype.name} integers must lie in [{lo}, {hi}]")
    d16 = np.asarray(d, dtype=np.float16).reshape(r, nb, 1).view(np.uint8)  # (R, nb, 2) little-endian f16
    qb = q.reshape(r, nb, Q8_0_BLOCK)
    if gtype == QType.Q8_0:
        body = qb.astype(np.int8).view(np.uint8)
    elif gtype == QType.Q3:
        u = qb.astype(np.uint8).reshape(r, nb, 4, 8)  # [.., i, j] = element 8i + j
        qs = np.zeros((r, nb, 8), np.uint8)
        qh = np.zeros((r, nb, 4), np.uint8)
        for i in range(4):
            qs |= (u[:, :, i] & 3) << (2 * i)
            qh[:, :, i] = np.packbits((u[:, :, i] >> 2) & 1, axis=-1, bitorder="little")[..., 0]
        body = np.concatenate([qs, qh], axis=-1)
    else:
        u = qb.astype(np.uint8)
        body = u[..., :16] | (u[..., 16:] << 4)
    ql = QLinear(gtype, r, k, np.ascontiguousarray(np.concatenate([d16, body], axis=-1).reshape(r, -1)))
    ql.validate()
    return ql

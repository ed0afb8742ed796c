"""The pbs2p file format (docs/format.md), Python side: constants mirrored from the C header, packing of the
sparse-binary encoding, Q8_0, the runtime's activation quantizer, and a crash-safe GGUF writer.

Every numeric rule here is also implemented in C (runtime/src/kernels-ref.c, runtime/src/model.c); the tests in
tests/test_format*.py hold the two together.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

FORMAT_VERSION = 1
ALIGNMENT = 64
DEFAULT_BLOCK_SIZE = 128
MAX_TERMS = 4  # the runtime accepts 1..4 binary terms per linear
Q8_0_BLOCK = 32
Q8_0_BYTES = 34
Q4_0_BYTES = 18


class GGMLType(IntEnum):
    """ggml tensor type ids used by pbs2p files (the C loader knows the other ggml types' sizes too)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q8_0 = 8
    I8 = 24


class Status(IntEnum):
    """Mirror of `pbs2p_status` in runtime/include/pbs2p.h."""

    OK = 0
    ERR_IO = 1
    ERR_FORMAT = 2
    ERR_VERSION = 3
    ERR_UNSUPPORTED = 4
    ERR_NOMEM = 5
    ERR_INVALID_ARG = 6
    ERR_CONTEXT_FULL = 7
    ERR_ABORTED = 8
    ERR_BUFFER_TOO_SMALL = 9
    ERR_BUSY = 10


class TokenType(IntEnum):
    """tokenizer.ggml.token_type values (llama.cpp's)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


KEY_FORMAT_VERSION = "pbs2p.format_version"
KEY_METHOD = "pbs2p.method"
KEY_NM_M = "pbs2p.nm.m"
KEY_NM_N = "pbs2p.nm.n"
KEY_BLOCK_SIZE = "pbs2p.block_size"
KEY_CALIBRATION = "pbs2p.calibration"
KEY_POS_OFFSET = "pbs2p.pos_offset"

SUFFIX_PLANES = ".planes"
SUFFIX_ALPHA = ".alpha"
SUFFIX_MU = ".mu"
SUFFIX_WEIGHT = ".weight"
SUFFIX_BIAS = ".bias"


def n_words(k: int) -> int:
    """64-bit words per row-plane: ceil(K / 64)."""
    return (k + 63) // 64


def n_blocks(k: int, block_size: int) -> int:
    """Column blocks of scales: ceil(K / bs); the last may be partial."""
    return (k + block_size - 1) // block_size


@dataclass
class SbLinear:
    """One sparse-binary linear layer as stored in the file.

    planes: uint8 (R, T·2·W·8) — per row, per term: pos plane bytes then neg plane bytes, little-endian bits.
    alpha:  float16 (R, T, nb);  mu: float16 (R, nb).
    """

    n_out: int
    n_in: int
    block_size: int
    planes: np.ndarray
    alpha: np.ndarray
    mu: np.ndarray

    @property
    def n_terms(self) -> int:
        return int(self.alpha.shape[1])

    def nbytes(self) -> int:
        return int(self.planes.nbytes + self.alpha.nbytes + self.mu.nbytes)

    def storage_bpw(self) -> float:
        """Every byte the file spends on this layer (planes + scales), ×8, ÷ its weight count."""
        return 8.0 * self.nbytes() / (self.n_out * self.n_in)

    def validate(self) -> None:
        r, k, bs = self.n_out, self.n_in, self.block_size
        if bs <= 0 or bs % 64:
            raise ValueError(f"block_size {bs} must be a positive multiple of 64")
        t = self.alpha.shape[1] if self.alpha.ndim == 3 else -1
        if not 1 <= t <= MAX_TERMS:
            raise ValueError(f"alpha shape {self.alpha.shape}: need (R, T, nb) with 1 <= T <= {MAX_TERMS}")
        nb, w = n_blocks(k, bs), n_words(k)
        if self.alpha.shape != (r, t, nb) or self.alpha.dtype != np.float16:
            raise ValueError(f"alpha {self.alpha.shape} {self.alpha.dtype}, expected ({r}, {t}, {nb}) float16")
        if self.mu.shape != (r, nb) or self.mu.dtype != np.float16:
            raise ValueError(f"mu {self.mu.shape} {self.mu.dtype}, expected ({r}, {nb}) float16")
        if self.planes.shape != (r, t * 2 * w * 8) or self.planes.dtype != np.uint8:
            raise ValueError(f"planes {self.planes.shape} {self.planes.dtype}, expected ({r}, {t * 2 * w * 8}) uint8")


def pack_sb(terms: np.ndarray, alpha: np.ndarray, mu: np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE) -> SbLinear:
    """Pack binary terms into planes.

    terms: int8 (T, R, K) with values in {-1, 0, +1}; term 0's nonzeros are the kept mask, and terms t >= 1
    must be zero outside it. alpha (R, T, nb), mu (R, nb): rounded to float16 here.
    """
    terms = np.asarray(terms)
    if terms.ndim == 2:
        terms = terms[None]
    t, r, k = terms.shape
    kept = terms[0] != 0
    if np.any((terms[1:] != 0) & ~kept[None]):
        raise ValueError("residual terms must be zero where term 0 is pruned")
    w = n_words(k)
    bits = np.zeros((r, t, 2, w * 64), dtype=bool)
    tr = np.moveaxis(terms, 0, 1)  # (R, T, K)
    bits[:, :, 0, :k] = tr > 0
    bits[:, :, 1, :k] = tr < 0
    planes = np.packbits(bits, axis=-1, bitorder="little").reshape(r, t * 2 * w * 8)
    sb = SbLinear(r, k, block_size, planes, np.asarray(alpha, dtype=np.float16).reshape(r, t, -1),
                  np.asarray(mu, dtype=np.float16).reshape(r, -1))
    sb.validate()
    return sb


def unpack_sb(sb: SbLinear) -> np.ndarray:
    """Inverse of pack_sb: int8 (T, R, K) in {-1, 0, +1}."""
    r, k, t, w = sb.n_out, sb.n_in, sb.n_terms, n_words(sb.n_in)
    bits = np.unpackbits(sb.planes.reshape(r, t, 2, w * 8), axis=-1, bitorder="little")[..., :k]
    terms = bits[:, :, 0].astype(np.int8) - bits[:, :, 1].astype(np.int8)
    return np.ascontiguousarray(np.moveaxis(terms, 1, 0))


def sb_value(terms: np.ndarray, alpha: np.ndarray, mu: np.ndarray, block_size: int) -> np.ndarray:
    """The weights a sparse-binary layer stands for, float32 (R, K):
    Ŵ = Σ_t α_t·B_t + μ·kept, with α, μ taken as the float16 values the file holds.

    This is THE definition: the solver's fake-quant weights are computed with it, so dequantize(file) equals
    the solver's output bit for bit.
    """
    terms = np.asarray(terms)
    if terms.ndim == 2:
        terms = terms[None]
    t, r, k = terms.shape
    cols = np.arange(k) // block_size
    a = np.asarray(alpha, dtype=np.float16).astype(np.float32).reshape(r, t, -1)[:, :, cols]  # (R, T, K)
    m = np.asarray(mu, dtype=np.float16).astype(np.float32).reshape(r, -1)[:, cols]  # (R, K)
    out = np.zeros((r, k), dtype=np.float32)
    for i in range(t):
        out += a[:, i] * terms[i].astype(np.float32)
    out += m * (terms[0] != 0).astype(np.float32)
    return out


def dequantize_sb(sb: SbLinear) -> np.ndarray:
    return sb_value(unpack_sb(sb), sb.alpha, sb.mu, sb.block_size)


def kept_fraction(sb: SbLinear) -> float:
    """Fraction of weights kept (term 0's mask), from the bits."""
    r, w = sb.n_out, n_words(sb.n_in)
    p = sb.planes.reshape(r, sb.n_terms, 2, w * 8)[:, 0]
    return float(np.unpackbits(p, bitorder="little").sum()) / (sb.n_out * sb.n_in)


def param_bits(sb: SbLinear) -> float:
    """The paper's "W-bits": one bit per kept weight per binary term, over all weights."""
    r, t, w = sb.n_out, sb.n_terms, n_words(sb.n_in)
    p = sb.planes.reshape(r, t, 2, w * 8)
    return float(np.unpackbits(p, bitorder="little").sum()) / (sb.n_out * sb.n_in)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (numpy's round is half-to-even)."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml Q8_0 of float32 (R, K), K % 32 == 0 -> uint8 (R, K/32·34): per block f16 d = amax/127, then
    q = roundf(x / d) with the f16-rounded d, clamped to ±127 (d = 0 -> q = 0)."""
    x = np.asarray(x, dtype=np.float32)
    r, k = x.shape
    if k % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs a row length multiple of 32, got {k}")
    xb = x.reshape(r, k // 32, 32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    d16 = (amax / np.float32(127)).astype(np.float16)
    d = d16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d > 0, round_half_away(xb / np.where(d > 0, d, np.float32(1))), 0)
    q = np.clip(q, -127, 127).astype(np.int8)
    out = np.empty((r, k // 32, Q8_0_BYTES), dtype=np.uint8)
    out[:, :, :2] = d16.view(np.uint8).reshape(r, k // 32, 2)
    out[:, :, 2:] = q.view(np.uint8)
    return out.reshape(r, k // 32 * Q8_0_BYTES)


def _split_blocks(data: np.ndarray, k: int, nbytes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows of ggml 32-element blocks of `nbytes` bytes (an f16 scale, then the payload) -> d float32
    (R, K/32, 1), payload uint8 (R, K/32, nbytes - 2), R."""
    data = np.asarray(data, dtype=np.uint8)
    r = data.size // (k // 32 * nbytes)
    b = data.reshape(r, k // 32, nbytes)
    return b[:, :, :2].copy().view(np.float16).astype(np.float32), b[:, :, 2:], r


def dequantize_q8_0(data: np.ndarray, k: int) -> np.ndarray:
    d, qs, r = _split_blocks(data, k, Q8_0_BYTES)
    return (qs.copy().view(np.int8).astype(np.float32) * d).reshape(r, k)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """ggml Q4_0 of float32 (R, K), K % 32 == 0 -> uint8 (R, K/32·18), ggml's reference rule: per block the
    value of largest magnitude m (first on ties), d = m / -8 stored as f16, q = min(15, trunc(x·(1/d) + 8.5))
    with the float32 d (d = 0 -> q = 8); byte j holds element j in its low nibble and j + 16 in its high one."""
    x = np.asarray(x, dtype=np.float32)
    r, k = x.shape
    if k % Q8_0_BLOCK:
        raise ValueError(f"Q4_0 needs a row length multiple of 32, got {k}")
    xb = x.reshape(r, k // 32, 32)
    m = np.take_along_axis(xb, np.abs(xb).argmax(axis=-1)[..., None], axis=-1)
    d = (m / np.float32(-8)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.minimum(np.trunc(xb * inv + np.float32(8.5)), 15).astype(np.uint8)
    out = np.empty((r, k // 32, Q4_0_BYTES), dtype=np.uint8)
    out[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(r, k // 32, 2)
    out[:, :, 2:] = q[:, :, :16] | (q[:, :, 16:] << 4)
    return out.reshape(r, k // 32 * Q4_0_BYTES)


def dequantize_q4_0(data: np.ndarray, k: int) -> np.ndarray:
    d, qs, r = _split_blocks(data, k, Q4_0_BYTES)
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float32) - np.float32(8)
    return (q * d).reshape(r, k)


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


class ModelWriter:
    """Writes a pbs2p model file through gguf.GGUFWriter, crash-safe: everything goes to a temporary file in
    the destination folder, which is renamed over `path` only after the last byte is written and fsynced. On
    any exception (KeyboardInterrupt included) the temporary file is removed and `path` is untouched.

    Use as a context manager: add metadata and tensors, then leave the block to commit.
    """

    def __init__(self, path: str | os.PathLike[str], arch: str, *, overwrite: bool = False) -> None:
        import gguf

        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists (use --force to overwrite)")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise FileNotFoundError(f"output folder {parent} does not exist")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self.arch = arch
        self._w = gguf.GGUFWriter(str(self._tmp), arch)
        self._w.data_alignment = ALIGNMENT
        self._w.add_uint32("general.alignment", ALIGNMENT)
        self._w.add_uint32(KEY_FORMAT_VERSION, FORMAT_VERSION)
        self._done = False

    # metadata -------------------------------------------------------------------------------------------
    def add_kv(self, key: str, value: Any, vtype: str | None = None) -> None:
        """Add one key. vtype: 'u32', 'i32', 'f32', 'bool', 'str', 'arr_u32', 'arr_i32', 'arr_f32', 'arr_str';
        inferred from the Python type when None (int -> u32, float -> f32)."""
        w = self._w
        if vtype is None:
            if isinstance(value, bool):
                vtype = "bool"
            elif isinstance(value, int):
                vtype = "u32"
            elif isinstance(value, float):
                vtype = "f32"
            elif isinstance(value, str):
                vtype = "str"
            else:
                raise TypeError(f"cannot infer the GGUF type of {key}={value!r}")
        import gguf

        scalar = {"u32": w.add_uint32, "i32": w.add_int32, "f32": w.add_float32, "bool": w.add_bool,
                  "str": w.add_string}
        if vtype in scalar:
            scalar[vtype](key, value)
            return
        sub = {"arr_u32": gguf.GGUFValueType.UINT32, "arr_i32": gguf.GGUFValueType.INT32,
               "arr_f32": gguf.GGUFValueType.FLOAT32, "arr_str": gguf.GGUFValueType.STRING}[vtype]
        w.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=sub)

    # tensors --------------------------------------------------------------------------------------------
    def add_sb(self, prefix: str, sb: SbLinear) -> None:
        sb.validate()
        self._w.add_tensor(prefix + SUFFIX_PLANES, sb.planes.view(np.int8))
        self._w.add_tensor(prefix + SUFFIX_ALPHA, sb.alpha)
        self._w.add_tensor(prefix + SUFFIX_MU, sb.mu)

    def add_dense(self, name: str, x: np.ndarray, gtype: GGMLType = GGMLType.F32) -> None:
        """A float tensor as F32, F16, Q8_0 or Q4_0 (rows of the last axis)."""
        import gguf

        x = np.asarray(x, dtype=np.float32)
        if gtype == GGMLType.F32:
            self._w.add_tensor(name, np.ascontiguousarray(x))
        elif gtype == GGMLType.F16:
            self._w.add_tensor(name, x.astype(np.float16))
        elif gtype == GGMLType.Q8_0:
            q = quantize_q8_0(x.reshape(-1, x.shape[-1]))
            self._w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif gtype == GGMLType.Q4_0:
            q = quantize_q4_0(x.reshape(-1, x.shape[-1]))
            self._w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            raise ValueError(f"unsupported dense type {gtype!r}")

    # commit ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        w = self._w
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self.path)
        self._done = True

    def abort(self) -> None:
        try:
            self._w.close()
        except Exception:  # noqa: BLE001 - best effort: the temp file is removed below either way
            pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ModelWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def read_sb(reader: Any, prefix: str, n_in: int, block_size: int) -> SbLinear:
    """Read one sparse-binary linear (input size n_in, from the model's hparams) from a gguf.GGUFReader."""
    t = {x.name: x for x in reader.tensors if x.name.startswith(prefix + ".")}
    planes = np.asarray(t[prefix + SUFFIX_PLANES].data).view(np.uint8)
    alpha = np.asarray(t[prefix + SUFFIX_ALPHA].data)
    mu = np.asarray(t[prefix + SUFFIX_MU].data)
    sb = SbLinear(int(mu.shape[0]), n_in, block_size, planes, alpha, mu)
    sb.validate()
    return sb

"""The sparse-binary encoding of one linear layer (docs/format.md, "The sparse-binary encoding"): packing of
binary terms into bit planes, unpacking, and the value Ŵ the layer stands for."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spec import (DEFAULT_BLOCK_SIZE, MAX_TERMS, FormatError, check_block_size, check_nm_code, n_blocks, n_words,
                   nm_pattern_bits, nm_patterns, nm_row_bytes)

@dataclass
class SbLinear:
    """One sparse-binary linear layer as stored in the file.

    planes: uint8 (R, T·2·W·8) — per row, per term: pos plane bytes then neg plane bytes, little-endian bits.
    alpha:  float16 (R, T, nb);  mu: float16 (R, nb).
    nm:     (N, M) when the file stores the layer in the N:M code (L.nm<N>of<M>, encode_nm) instead of its planes;
            the planes here are the same bits either way (decode_nm), only nbytes() and the writer differ.
    """

    n_out: int
    n_in: int
    block_size: int
    planes: np.ndarray
    alpha: np.ndarray
    mu: np.ndarray
    nm: tuple[int, int] | None = None

    @property
    def n_terms(self) -> int:
        return int(self.alpha.shape[1])

    def nbytes(self) -> int:
        """Bytes the file spends on the layer: its planes or N:M code, and its scales."""
        bits = self.n_out * nm_row_bytes(self.n_in, *self.nm) if self.nm else self.planes.nbytes
        return int(bits + self.alpha.nbytes + self.mu.nbytes)

    def dequantize(self) -> np.ndarray:
        """Ŵ, float32 (R, K): dequantize_sb(self) (QLinear.dequantize is its dense counterpart)."""
        return dequantize_sb(self)

    def storage_bpw(self) -> float:
        """Every byte the file spends on this layer (planes + scales), ×8, ÷ its weight count."""
        return 8.0 * self.nbytes() / (self.n_out * self.n_in)

    def validate(self) -> None:
        r, k, bs = self.n_out, self.n_in, self.block_size
        check_block_size(bs)
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
        if self.nm is not None:
            nm_groups(self, *self.nm)


def nm_groups(sb: SbLinear, n: int, m: int) -> np.ndarray:
    """The layer's kept mask as (R, K/M, M) bools, checked to be one the N:M code holds: one term, K % 64 == 0,
    exactly N kept weights in every group of M columns (ValueError otherwise)."""
    try:
        check_nm_code(n, m, sb.n_in)
    except FormatError as e:
        raise ValueError(str(e)) from None
    if sb.n_terms != 1:
        raise ValueError(f"the N:M code holds one binary term, the layer has {sb.n_terms}")
    r, k = sb.n_out, sb.n_in
    bits = np.unpackbits(sb.planes.reshape(r, 2, k // 8), axis=-1, bitorder="little").astype(bool)
    kept = (bits[:, 0] | bits[:, 1]).reshape(r, k // m, m)
    counts = kept.sum(axis=-1)
    if np.any(counts != n):
        i = np.argwhere(counts != n)[0]
        raise ValueError(f"row {i[0]}, group {i[1]}: {counts[tuple(i)]} kept weights, the {n}:{m} code needs {n}")
    return kept


def _bits_le(values: np.ndarray, nbits: int) -> np.ndarray:
    """(..., G) integers < 2**nbits -> (..., G·nbits) bits, value g's bit b at position g·nbits + b."""
    return ((values[..., None].astype(np.int64) >> np.arange(nbits)) & 1).astype(np.uint8).reshape(
        *values.shape[:-1], values.shape[-1] * nbits)


def encode_nm(sb: SbLinear, n: int, m: int) -> np.ndarray:
    """The N:M code of a layer (docs/format.md, "The N:M code"): uint8 (R, nm_row_bytes). Per row, the K/M
    pattern indices (index i = the i-th M-bit mask of popcount N, ascending) as a little-endian bit string of
    nm_pattern_bits bits each, then one sign bit per kept weight in column order (1: +α, 0: −α)."""
    kept = nm_groups(sb, n, m)
    r, k = sb.n_out, sb.n_in
    pb = nm_pattern_bits(n, m)
    lookup = np.full(1 << m, -1, dtype=np.int64)
    lookup[list(nm_patterns(n, m))] = np.arange(len(nm_patterns(n, m)))
    masks = (kept.astype(np.int64) << np.arange(m)).sum(axis=-1)  # (R, K/M)
    idx = lookup[masks]
    pos = np.unpackbits(sb.planes.reshape(r, 2, k // 8)[:, 0], axis=-1, bitorder="little")
    signs = pos.reshape(r, k // m, m)[kept].reshape(r, k * n // m)  # kept positions in column order
    fields = [np.packbits(_bits_le(idx, pb), axis=-1, bitorder="little")] if pb else []
    code = np.concatenate(fields + [np.packbits(signs, axis=-1, bitorder="little")], axis=-1)
    assert code.shape == (r, nm_row_bytes(k, n, m))
    return np.ascontiguousarray(code)


def decode_nm(code: np.ndarray, k: int, n: int, m: int) -> np.ndarray:
    """Inverse of encode_nm: the planes (R, 2·W·8) uint8 of a one-term layer. FormatError on a pattern index
    >= C(M, N) or a wrong row length."""
    check_nm_code(n, m, k)
    code = np.asarray(code).view(np.uint8)
    rb = nm_row_bytes(k, n, m)
    if code.ndim != 2 or code.shape[1] != rb:
        raise FormatError(f"N:M code {n}:{m} with K = {k}: rows of {rb} bytes expected, got shape {code.shape}")
    r, g, pb = code.shape[0], k // m, nm_pattern_bits(n, m)
    pats = np.array(nm_patterns(n, m), dtype=np.int64)
    pbytes = g * pb // 8
    if pb:
        bits = np.unpackbits(code[:, :pbytes], axis=-1, bitorder="little").reshape(r, g, pb).astype(np.int64)
        idx = (bits << np.arange(pb)).sum(axis=-1)
        bad = np.argwhere(idx >= len(pats))
        if len(bad):
            raise FormatError(f"N:M code {n}:{m}: row {bad[0][0]}, group {bad[0][1]} has pattern index "
                              f"{idx[tuple(bad[0])]} >= C({m},{n}) = {len(pats)}")
    else:
        idx = np.zeros((r, g), dtype=np.int64)
    kept = ((pats[idx][..., None] >> np.arange(m)) & 1).astype(bool)  # (R, G, M)
    signs = np.unpackbits(code[:, pbytes:], axis=-1, bitorder="little").astype(bool)  # (R, K·N/M)
    pos = np.zeros((r, g, m), dtype=bool)
    pos[kept] = signs.reshape(-1)
    neg = kept & ~pos
    planes = np.stack([pos.reshape(r, k), neg.reshape(r, k)], axis=1)
    return np.packbits(planes, axis=-1, bitorder="little").reshape(r, 2 * n_words(k) * 8)


def pack_sb(terms: np.ndarray, alpha: np.ndarray, mu: np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE,
            nm: tuple[int, int] | None = None) -> SbLinear:
    """Pack binary terms into planes.

    terms: int8 (T, R, K) with values in {-1, 0, +1}; term 0's nonzeros are the kept mask, and terms t >= 1
    must be zero outside it. alpha (R, T, nb), mu (R, nb): rounded to float16 here. nm: store it in that N:M code
    (ValueError when the layer is not one it holds, nm_groups).
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
                  np.asarray(mu, dtype=np.float16).reshape(r, -1), nm)
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



"""The sparse-binary encoding of one linear layer (docs/format.md, "The sparse-binary encoding"): packing of
binary terms into bit planes, unpacking, and the value Ŵ the layer stands for."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spec import DEFAULT_BLOCK_SIZE, MAX_TERMS, check_block_size, n_blocks, n_words

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



"""CFS coarse stage: a kept count N_l per transformer block from how much each block changes its input.

See docs/algorithm.md ("CFS coarse stage") for the rule and its constants; `allocate` is the whole of it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

COS_EPS = 1e-3  # c_l is clamped to at least this before 1/c_l: a block that turns its input around is "most important"


def token_cosine_sum(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, int]:
    """Σ over tokens of cos(h_in, h_out) (float64) and the token count; h: (..., n_embd)."""
    a = h_in.reshape(-1, h_in.shape[-1]).double()
    b = h_out.reshape(-1, h_out.shape[-1]).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    return float(cos.sum()), int(cos.numel())


def importance(cosines: Sequence[float], eps: float = COS_EPS) -> list[float]:
    """I_l = 1 / max(c_l, eps), normalised to mean 1."""
    inv = [1.0 / max(float(c), eps) for c in cosines]
    mean = sum(inv) / len(inv)
    return [v / mean for v in inv]


def allocate(cosines: Sequence[float], n_target: int, m: int, weights: Sequence[int] | None = None,
             eps: float = COS_EPS) -> list[int]:
    """Per-block kept N.

    1. I_l = 1/max(c_l, eps), normalised to mean 1.
    2. N_l = clip(floor(N_target·I_l + 1/2), N_low, N_high), N_low = max(1, N_target − 1),
       N_high = min(M, N_target + 1).
    3. Repair (largest remainder, never overshooting): let D = Σ_l w_l·N_l − N_target·Σ_l w_l, w_l = the block's
       linear weight count. While D > 0, lower by one the block with N_l > N_low and the smallest residual
       r_l = N_target·I_l − N_l (the block rounded up the most), among those with w_l ≤ D; while D < 0, raise the
       block with N_l < N_high and the largest residual, among those with w_l ≤ −D. Ties go to the lower block
       index. Stop when D = 0 or no block qualifies. When all blocks have the same weight count (every model
       here) the total is exact: Σ w_l·N_l = N_target·Σ w_l, i.e. exactly N_target/M of the weights are kept.
    """
    nl = len(cosines)
    if nl == 0:
        return []
    if not 1 <= n_target <= m:
        raise ValueError(f"N {n_target} must be in [1, M={m}]")
    w = list(weights) if weights is not None else [1] * nl
    if len(w) != nl:
        raise ValueError(f"{len(w)} weight counts for {nl} blocks")
    imp = importance(cosines, eps)
    lo, hi = max(1, n_target - 1), min(m, n_target + 1)
    n = [min(hi, max(lo, math.floor(n_target * i + 0.5))) for i in imp]
    d = sum(wi * ni for wi, ni in zip(w, n)) - n_target * sum(w)
    while d != 0:
        if d > 0:
            cand = [l for l in range(nl) if n[l] > lo and w[l] <= d]
            if not cand:
                break
            best = min(cand, key=lambda l: (n_target * imp[l] - n[l], l))
            n[best] -= 1
            d -= w[best]
        else:
            cand = [l for l in range(nl) if n[l] < hi and w[l] <= -d]
            if not cand:
                break
            best = min(cand, key=lambda l: (-(n_target * imp[l] - n[l]), l))
            n[best] += 1
            d += w[best]
    return n

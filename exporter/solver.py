"""Layer-wise PBS²P solver and its baselines, in the GPTQ frame (docs/algorithm.md; the method: the PBS²P paper, arXiv 2502.01705).

One linear layer at a time: W (R, K) and its input Hessian H = 2/n Σ x xᵀ (K, K) go in, the binary terms, the
f16 scales and the fake-quant weights Ŵ come out. Symbols follow the papers: W, H, Hinv (upper Cholesky factor
of H⁻¹), Err, α, μ, B. Per output row and column block (bs columns), over the kept entries:

    Ŵ = α_0·B_0 + α_1·B_1 + μ   (kept),   Ŵ = 0   (pruned)

which is exactly what `pbs2p.format.sb_value` computes from the packed file. α and μ are rounded to f16 as soon
as a block is fitted, and the GPTQ error propagation uses that rounded Ŵ, so the compensation absorbs the f16
rounding and `w_hat` equals the dequantized file bit for bit.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pbs2p.format import QTYPE_OFFSET, n_blocks, sb_value, spec

log = logging.getLogger(__name__)

METHODS = tuple(m for m in spec.METHODS if m != "fp16")  # the binarizers; fp16 exports skip the solver
SCORES = ("obs", "magnitude")
# Salient-column search (salient=True, billm): candidate column counts per block, capped at bs/8 columns
# (≤ 1/8 extra sign bits, BiLLM's ≈1.1 bits).
SALIENT_CANDIDATES = (0, 2, 4, 8, 16, 32)
SALIENT_MAX_FRAC = 8
MAX_DAMP_RETRIES = 6


@dataclass(frozen=True)
class SolverConfig:
    method: str = "pbs2p"        # "pbs2p" | "sign" | "billm" | "arb" | "stbllm"
    n: int = 6                   # kept per group; n == m means dense (no pruning)
    m: int = 8                   # 4 or 8
    block_size: int = 128        # column block (scales + error compensation), multiple of 64
    percdamp: float = 0.01
    arb_iters: int = 15
    steps: int | None = None     # SPBO τ; None -> m - n; 0 -> prune by the static score, then binarize
    score: str = "obs"           # "obs" (w²/[Hinv]_jj²) | "magnitude"
    salient: bool = False        # second binary term on salient columns (BiLLM/ARB style)
    residual: bool = False       # second binary term on every kept weight, both terms refit jointly (_refine2)
    compensate: bool = True      # GPTQ block error compensation
    symmetric: bool = False      # μ = 0 in every fit (W ≈ Σ α_t·B_t): the code stock ternary types and 2-bit ONNX hold
    nm_code: bool = False        # store one-term layers with K % 64 == 0 in the N:M code (docs/format.md), not planes

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {METHODS}")
        spec.check_nm(self.n, self.m)
        if self.n == 0:
            raise ValueError("n = 0: a solved layer keeps at least one weight per group")
        spec.check_block_size(self.block_size)
        if self.score not in SCORES:
            raise ValueError(f"score {self.score!r} is not one of {SCORES}")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"steps = {self.steps} must be >= 0 or None")
        if self.arb_iters < 0:
            raise ValueError(f"arb_iters = {self.arb_iters} must be >= 0")
        if not self.percdamp > 0:
            raise ValueError(f"percdamp = {self.percdamp} must be > 0")
        if self.salient and self.residual:
            raise ValueError("salient and residual both set a second term: choose one")

    @property
    def tau(self) -> int:
        """SPBO steps actually taken: τ ≤ m − n (a step must prune at least one weight per group)."""
        p = self.m - self.n
        return p if self.steps is None else min(self.steps, p)

    @property
    def n_terms(self) -> int:
        return 2 if (self.salient or self.residual or self.method == "billm") else 1

    def file_code(self, n_in: int) -> tuple[int, int] | None:
        """(N, M) of the N:M code a layer of input size n_in is stored in, or None: planes."""
        return (self.n, self.m) if self.nm_code and self.n_terms == 1 and n_in % spec.WORD_BITS == 0 else None


@dataclass
class LayerResult:
    terms: np.ndarray   # int8 (T, R, K) in {-1,0,1}; term 0 nonzeros = kept mask
    alpha: np.ndarray   # float16 (R, T, nb)
    mu: np.ndarray      # float16 (R, nb)
    w_hat: torch.Tensor  # float32 (R, K) == torch.from_numpy(sb_value(terms, alpha, mu, block_size))
    stats: dict = field(default_factory=dict)


def output_error(W: torch.Tensor, E: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H Eᵀ) / tr(W H Wᵀ): the relative squared output error ‖EX‖²/‖WX‖² of a weight error E = W − Ŵ on the
    inputs H was accumulated from. Products in float32 (half the time of float64 for K = 8960), sums in float64."""
    Hf = H.to(W.device, torch.float32)
    num, den = ((E @ Hf) * E).double().sum(), ((W @ Hf) * W).double().sum()
    return float(num / den.clamp_min(1e-300))


class HessianAccumulator:
    """H = 2/n Σ x xᵀ over every input row seen (tokens), kept as a running mean like GPTQ's add_batch.

    Only the upper triangle is accumulated, one strip of TILE rows at a time with an in-place addmm (2.3× faster
    than the full x.T @ x for ffn_down's K = 8960, measured; docs/algorithm.md), and `H` mirrors it on access."""

    TILE = 512

    def __init__(self, n_in: int, device=None):
        self.n_in = n_in
        self._H = torch.zeros(n_in, n_in, dtype=torch.float32, device=device)
        self._mirrored = True
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.n_in:
            raise ValueError(f"input last dim {x.shape[-1]} != n_in {self.n_in}")
        x = x.detach().reshape(-1, self.n_in).to(self._H.device, torch.float32)
        t = x.shape[0]
        if t == 0:
            return
        self._H *= self.nsamples / (self.nsamples + t)
        self.nsamples += t
        x = (2.0 / self.nsamples) ** 0.5 * x
        for i1 in range(0, self.n_in, self.TILE):
            i2 = min(i1 + self.TILE, self.n_in)
            self._H[i1:i2, i1:].addmm_(x[:, i1:i2].T, x[:, i1:])
        self._mirrored = False

    @property
    def H(self) -> torch.Tensor:
        """The full symmetric H (the lower triangle below the diagonal strips copied from the upper)."""
        if not self._mirrored:
            for i1 in range(0, self.n_in, self.TILE):
                i2 = min(i1 + self.TILE, self.n_in)
                self._H[i2:, i1:i2] = self._H[i1:i2, i2:].T
            self._mirrored = True
        return self._H


# --- binarizer pieces (all on one column block: W (R, c), mask (R, c) bool, per-row α, μ (R,)) -------------

def _sgn(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, so every kept weight gets a ±1 bit."""
    return (x >= 0).to(x.dtype).mul_(2).sub_(1)


def _closed_form(W: torch.Tensor, B: torch.Tensor, n: torch.Tensor, q: torch.Tensor, symmetric: bool = False):
    """Least-squares α, μ of W ≈ αB + μ over the kept entries, per row, with B already 0 on pruned entries:
    n kept count, s = ΣB, p = ΣW·B, q = ΣW (kept);  α = (n·p − s·q)/(n² − s²),  μ = (n·q − s·p)/(n² − s²).
    When n² = s² (all kept B equal, or nothing kept) only αB + μ is determined: take μ = 0, α = p/n.
    symmetric: μ = 0 and α = p/n (least squares of W ≈ αB, B = ±1 on the kept entries)."""
    s, p = B.sum(1), (W * B).sum(1)
    if symmetric:
        return p / n.clamp_min(1), torch.zeros_like(p)
    den = n * n - s * s
    ok = den > 0
    den = torch.where(ok, den, torch.ones_like(den))
    alpha = torch.where(ok, (n * p - s * q) / den, p / n.clamp_min(1))
    mu = torch.where(ok, (n * q - s * p) / den, torch.zeros_like(den))
    return alpha, mu


def _refine(W: torch.Tensor, mf: torch.Tensor, iters: int, B: torch.Tensor | None = None, symmetric: bool = False):
    """ARB alternation on the kept entries (mf = float mask): (α, μ) ← closed form for B;
    B ← sign((W − μ)·α). Each half-step is optimal given the other, so the error never increases; stops early
    when B is a fixed point. Without a starting B, start from BiLLM's one-shot binarizer μ = mean W,
    B = sign(W − μ), α = mean |W − μ| (returned as is if iters == 0). Returns α, μ (R,) and B (R, c) with
    B = 0 on pruned entries; when iters > 0 the returned α, μ are the closed form of the returned B. symmetric: μ = 0
    throughout (then B = sign(W) is the fixed point and α = mean |W| over the kept entries)."""
    n = mf.sum(1)
    q = (W * mf).sum(1)
    if B is None:
        mu = torch.zeros_like(q) if symmetric else q / n.clamp_min(1)
        Wc = W - mu[:, None]
        B = _sgn(Wc) * mf
        alpha = (Wc * B).sum(1) / n.clamp_min(1)
        if iters == 0:
            return alpha, mu, B
    else:
        B = B * mf
    for _ in range(max(iters, 1)):
        alpha, mu = _closed_form(W, B, n, q, symmetric)
        if iters == 0:
            break
        B_new = _sgn((W - mu[:, None]) * alpha[:, None]) * mf
        if torch.equal(B_new, B):
            break
        B = B_new
    else:
        alpha, mu = _closed_form(W, B, n, q, symmetric)
    return alpha, mu, B


def _refine2(W: torch.Tensor, mf: torch.Tensor, B0: torch.Tensor, B1: torch.Tensor, x: torch.Tensor,
             iters: int, symmetric: bool = False):
    """Two binary terms on the kept entries, W ≈ μ + α_0·B_0 + α_1·B_1 (four levels per row), by alternation:
    (μ, α_0, α_1) ← least squares for the signs (3×3 normal equations per row);
    B_0 ← sign(α_0·(W − μ − α_1B_1)); B_1 ← sign(α_1·(W − μ − α_0B_0)). Each step is optimal given the rest,
    so the error never increases; a row whose system is singular keeps its previous fit. x (R, 3) = (μ, α_0, α_1)
    of the starting fit. symmetric: μ fixed at 0 (its equation replaced by μ = 0).
    Returns α_0, α_1, μ (R,), B_0, B_1."""
    n = mf.sum(1)
    q = (W * mf).sum(1)

    def solve(B0, B1):
        s0, s1, s01 = B0.sum(1), B1.sum(1), (B0 * B1).sum(1)
        A = torch.stack([torch.stack([n, s0, s1], -1), torch.stack([s0, n, s01], -1),
                         torch.stack([s1, s01, n], -1)], -2).double()
        y = torch.stack([q, (W * B0).sum(1), (W * B1).sum(1)], -1).double()
        if symmetric:
            A[:, 0, :], A[:, :, 0], A[:, 0, 0], y[:, 0] = 0.0, 0.0, 1.0, 0.0
        x, info = torch.linalg.solve_ex(A, y)
        return x.float(), (info == 0) & torch.isfinite(x).all(-1)

    def err(x, B0, B1):
        return (((W - x[:, :1] - x[:, 1:2] * B0 - x[:, 2:] * B1) * mf) ** 2).sum(1)

    rounds = max(iters, 1)  # sign updates; the scales are refit after each, and once before the first
    for k in range(rounds + 1):
        xn, ok = solve(B0, B1)
        x = torch.where((ok & (err(xn, B0, B1) <= err(x, B0, B1)))[:, None], xn, x)
        if k == rounds:
            break
        nb0 = _sgn(x[:, 1:2] * (W - x[:, :1] - x[:, 2:] * B1)) * mf
        nb1 = _sgn(x[:, 2:] * (W - x[:, :1] - x[:, 1:2] * nb0)) * mf
        if torch.equal(nb0, B0) and torch.equal(nb1, B1):
            break
        B0, B1 = nb0, nb1
    return x[:, 1], x[:, 2], x[:, 0], B0, B1


def _nm_prune(score: torch.Tensor, mask: torch.Tensor, count: int, m: int) -> torch.Tensor:
    """Prune `count` more entries from every group of m consecutive columns of a row: the lowest-scoring ones
    among those still kept. score, mask (R, c), c % m == 0."""
    R, c = score.shape
    s = score.masked_fill(~mask, float("inf")).view(R, c // m, m)
    idx = torch.topk(s, count, dim=-1, largest=False).indices
    out = mask.clone().view(R, c // m, m)
    out.scatter_(-1, idx, False)
    return out.view(R, c)


def _q_value(terms: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Ŵ of one block from f16-representable α (R, T), μ (R,) and terms (T, R, c): the same float32 operations
    in the same order as format.sb_value, so the result is bit-identical to the dequantized file."""
    out = torch.zeros_like(terms[0])
    for t in range(terms.shape[0]):
        out = out + alpha[:, t:t + 1] * terms[t]
    return out + mu[:, None] * (terms[0] != 0).to(out.dtype)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _static_score(W: torch.Tensor, wt: torch.Tensor, kind: str) -> torch.Tensor:
    """Importance before binarization: "obs" w²/[Hinv]_jj² (wt = 1/[Hinv]_jj²), "magnitude" |w|,
    "act" |w|·‖x_j‖ (STBLLM/Wanda; wt = ‖x_j‖)."""
    if kind == "obs":
        return W * W * wt
    if kind == "act":
        return W.abs() * wt
    return W.abs()


def _spbo(W: torch.Tensor, wt: torch.Tensor, cfg: SolverConfig):
    """SPBO on one block. Binarize the unpruned block, then prune m − n weights per group in τ steps; each step
    prunes, in every group, the kept weights whose binarized value saves the least error,
        gain_j = (w_j² − (w_j − μ − αB_j)²)·wt_j      (cost if pruned − cost if kept, wt = 1/[Hinv]_jj² or 1)
    judged against the CURRENT fit, then refits α, μ, B (ARB alternation started from the current B) on the
    survivors. τ = 0: mask from the static score first, then binarize (plain prune-then-binarize)."""
    R, c = W.shape
    p, tau = cfg.m - cfg.n, cfg.tau
    mask = torch.ones_like(W, dtype=torch.bool)
    if p and tau == 0:
        mask = _nm_prune(_static_score(W, wt, cfg.score), mask, p, cfg.m)
    alpha, mu, B = _refine(W, mask.to(W.dtype), cfg.arb_iters, symmetric=cfg.symmetric)
    if tau == 0:
        return mask, alpha, mu, B
    for k in range(1, tau + 1):
        cnt = p * k // tau - p * (k - 1) // tau
        resid = W - mu[:, None] - alpha[:, None] * B
        gain = (W * W - resid * resid) * wt
        mask = _nm_prune(gain, mask, cnt, cfg.m)
        alpha, mu, B = _refine(W, mask.to(W.dtype), cfg.arb_iters, B, cfg.symmetric)
    return mask, alpha, mu, B


def _salient_term(W: torch.Tensor, wt: torch.Tensor, base: torch.Tensor, mf: torch.Tensor):
    """Second binary term on the k most salient columns of the block (column score Σ_rows w²·wt): the residual
    r = W − base on kept salient entries gets B_1 = sign(r), α_1 = mean |r| per row (f16). k is searched over
    SALIENT_CANDIDATES (≤ c/8) minimising err_k + λ·k, λ = err_0/c: a column must pay for its bits by saving
    more than an average column's share of the one-term error. Returns term (R, c), α_1 (R,), k."""
    R, c = W.shape
    err0 = ((W - base) ** 2 * wt).sum()
    lam = err0 / c
    order = torch.argsort((W * W * wt).sum(0), descending=True)
    r = W - base
    B1 = _sgn(r)
    best = (err0, torch.zeros_like(W), torch.zeros(R, dtype=W.dtype, device=W.device), 0)
    for k in SALIENT_CANDIDATES:
        if k == 0 or k > c // SALIENT_MAX_FRAC:
            continue
        sal = torch.zeros(c, dtype=W.dtype, device=W.device)
        sal[order[:k]] = 1.0
        sm = mf * sal
        term = B1 * sm
        a1 = _f16((r.abs() * sm).sum(1) / sm.sum(1).clamp_min(1))
        err = ((r - a1[:, None] * term) ** 2 * wt).sum()
        if err + lam * k < best[0] + lam * best[3]:
            best = (err, term, a1, k)
    return best[1], best[2], best[3]


def _fit_block(W: torch.Tensor, d: torch.Tensor, xnorm: torch.Tensor, cfg: SolverConfig):
    """Fit one column block W (R, c). d = diag of Hinv on the block, xnorm = ‖x_j‖ = sqrt(H_jj).
    Returns terms (T, R, c) float in {-1, 0, 1}, α (R, T) and μ (R,), both f16-representable, and the
    number of salient columns."""
    R, c = W.shape
    p = cfg.m - cfg.n
    full = torch.ones_like(W, dtype=torch.bool)
    wt = (1.0 / (d * d))[None, :] if cfg.score == "obs" else torch.ones_like(d)[None, :]
    if cfg.method == "sign":
        # plain round-to-nearest binarization α·sign(W), μ = 0, N:M by magnitude
        mask = _nm_prune(W.abs(), full, p, cfg.m) if p else full
        mf = mask.to(W.dtype)
        B = _sgn(W)
        alpha = (W.abs() * mf).sum(1) / mf.sum(1).clamp_min(1)
        mu = torch.zeros_like(alpha)
    elif cfg.method == "pbs2p":
        mask, alpha, mu, B = _spbo(W, wt, cfg)
    else:
        # prune first (stbllm: |w|·‖x‖; arb, billm: cfg.score), then binarize the kept weights
        if p:
            score = _static_score(W, xnorm[None, :], "act") if cfg.method == "stbllm" else \
                _static_score(W, wt, cfg.score)
            mask = _nm_prune(score, full, p, cfg.m)
        else:
            mask = full
        alpha, mu, B = _refine(W, mask.to(W.dtype), 0 if cfg.method == "billm" else cfg.arb_iters,
                               symmetric=cfg.symmetric)
    mf = mask.to(W.dtype)
    a0, mu = _f16(alpha), _f16(mu)
    term0 = B * mf
    if cfg.n_terms == 1:
        return term0[None], a0[:, None], mu, 0
    base = _q_value(term0[None], a0[:, None], mu)
    if cfg.residual:
        # greedy start (term 1 = sign of what term 0 leaves, α_1 = its mean magnitude), then both terms refit
        # jointly on the block's kept weights (the mask stays SPBO's)
        r = W - base
        term1 = _sgn(r) * mf
        a1 = (r.abs() * mf).sum(1) / mf.sum(1).clamp_min(1)
        a0, a1, mu, term0, term1 = _refine2(W, mf, term0, term1, torch.stack([mu, a0, a1], 1), cfg.arb_iters,
                                            cfg.symmetric)
        return torch.stack([term0, term1]), torch.stack([_f16(a0), _f16(a1)], 1), _f16(mu), c
    term1, a1, k = _salient_term(W, wt, base, mf)
    return torch.stack([term0, term1]), torch.stack([a0, a1], 1), mu, k


@dataclass(frozen=True)
class Hinv:
    """GPTQ's preparation of one Hessian, shared by every solve against it (the budget planner tries several codes
    on one H; the factorisation is most of a wide layer's solve: K = 4864 takes seconds)."""
    factor: torch.Tensor  # float32 (K, K): upper Cholesky factor of (H + damp·I)⁻¹, dead inputs' H_jj set to 1
    dead: torch.Tensor    # bool (K,): inputs with H_jj = 0 (their weight columns are zeroed before the solve)
    percdamp: float


def prepare_hinv(H: torch.Tensor, percdamp: float, device=None) -> Hinv:
    """Dead inputs (H_jj = 0) get H_jj = 1; damp by percdamp·mean(diag H) (×10 per retry if still not positive
    definite); the upper Cholesky factor of H⁻¹ (float64 factorisation, returned float32)."""
    H = H.to(device if device is not None else H.device, torch.float64, copy=True)
    diag = torch.diagonal(H)  # a view: the damping is added in place (no K×K temporaries; K = 8960 is 640 MB)
    dead = diag == 0
    diag[dead] = 1.0
    diag0 = diag.clone()
    damp = percdamp * diag0.mean()
    for attempt in range(MAX_DAMP_RETRIES):
        diag.copy_(diag0 + damp)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            break
        log.warning("H + %.3g·I is not positive definite (minor %d); damping ×10", float(damp), int(info))
        damp = damp * 10
    else:
        raise ValueError(f"H is not positive definite even with damping {float(damp):.3g}")
    factor = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    return Hinv(factor.to(torch.float32), dead, percdamp)


def _prepare_hinv(H: torch.Tensor, W: torch.Tensor, percdamp: float, prep: Hinv | None = None):
    """(Hinv factor, dead count) for a solve of W against H: `prep` when given (it must be H's, at percdamp), else
    prepared here; W's dead columns are zeroed in place (GPTQ)."""
    if prep is None:
        prep = prepare_hinv(H, percdamp, W.device)
    elif prep.percdamp != percdamp or tuple(prep.factor.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(f"prepared Hinv is {tuple(prep.factor.shape)} at percdamp {prep.percdamp}, the solve needs "
                         f"({W.shape[1]}, {W.shape[1]}) at {percdamp}")
    W[:, prep.dead.to(W.device)] = 0.0
    return prep.factor.to(W.device), int(prep.dead.sum())


def compress_layer(W: torch.Tensor, H: torch.Tensor | None, cfg: SolverConfig, hinv: Hinv | None = None
                   ) -> LayerResult:
    """Compress one linear layer W (R, K) with Hessian H (K, K) (None only for method "sign"); `hinv`:
    prepare_hinv(H, cfg.percdamp) when the caller already has it (the same result, without refactorising)."""
    t_start = time.perf_counter()
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (R, K), got shape {tuple(W.shape)}")
    R, K = W.shape
    if K % cfg.m:
        raise ValueError(f"K = {K} is not a multiple of m = {cfg.m}")
    if H is None and cfg.method != "sign":
        raise ValueError(f"method {cfg.method!r} needs the Hessian H (only 'sign' accepts H=None)")
    if H is not None and tuple(H.shape) != (K, K):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({K}, {K})")
    if H is not None and not torch.isfinite(H).all():
        raise ValueError("H has non-finite entries")
    if not torch.isfinite(W).all():
        raise ValueError("W has non-finite entries")

    dev = W.device
    W0 = W.detach().to(torch.float32)
    Wc = W0.clone()
    bs, T, nb = cfg.block_size, cfg.n_terms, n_blocks(K, cfg.block_size)
    n_dead = 0
    if cfg.method == "sign":
        Hinv = None
        d = torch.ones(K, device=dev)
        xnorm = torch.ones(K, device=dev)
    else:
        Hinv, n_dead = _prepare_hinv(H, Wc, cfg.percdamp, hinv)
        d = torch.diagonal(Hinv).clone()
        xnorm = torch.diagonal(H).to(dev, torch.float32).clamp_min(0).sqrt()

    terms = torch.zeros(T, R, K, device=dev)
    alpha = torch.zeros(R, T, nb, device=dev)
    mu = torch.zeros(R, nb, device=dev)
    Q = torch.zeros(R, K, device=dev)
    n_salient = 0
    for b, i1 in enumerate(range(0, K, bs)):
        i2 = min(i1 + bs, K)
        W1 = Wc[:, i1:i2]
        t1, a1, m1, k = _fit_block(W1, d[i1:i2], xnorm[i1:i2], cfg)
        Q1 = _q_value(t1, a1, m1)
        terms[:, :, i1:i2], alpha[:, :, b], mu[:, b], Q[:, i1:i2] = t1, a1, m1, Q1
        n_salient += k
        if cfg.compensate and Hinv is not None and i2 < K:
            # Err1 such that W1 − Q1 = Err1·Hinv1 (GPTQ's column-by-column in-block update, as one triangular
            # solve), then push it onto the columns not yet compressed
            Hinv1 = Hinv[i1:i2, i1:i2]
            Err1 = torch.linalg.solve_triangular(Hinv1, W1 - Q1, upper=True, left=False)
            Wc[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if not (torch.isfinite(alpha).all() and torch.isfinite(mu).all()):
        raise ValueError(f"a scale overflows float16 (max |W| = {float(W0.abs().max()):.4g}); rescale the layer")
    terms_np = terms.to(torch.int8).cpu().numpy()
    alpha_np = alpha.to(torch.float16).cpu().numpy()
    mu_np = mu.to(torch.float16).cpu().numpy()
    w_hat = torch.from_numpy(sb_value(terms_np, alpha_np, mu_np, bs)).to(dev)
    if not torch.equal(w_hat, Q):
        raise RuntimeError("internal: compensated Q differs from sb_value of the packed terms")

    E = W0 - w_hat
    stats = {
        "method": cfg.method, "n": cfg.n, "m": cfg.m, "n_terms": T,
        "err_w": float((E.double() ** 2).sum() / (W0.double() ** 2).sum().clamp_min(1e-300)),
        "kept_frac": float((terms[0] != 0).float().mean()),
        "param_bits": float((terms != 0).float().sum() / (R * K)),
        "salient_cols": n_salient, "dead_cols": n_dead,
    }
    if H is not None:
        stats["err_out"] = output_error(W0, E, H)
    stats["time_s"] = time.perf_counter() - t_start
    log.debug("compress_layer %dx%d %s %d:%d -> %s", R, K, cfg.method, cfg.n, cfg.m, stats)
    return LayerResult(terms_np, alpha_np, mu_np, w_hat, stats)


# --- Q8_0 / Q4_0 / Q3 linears (the budget planner's wider codes): GPTQ in the 32-value block layouts -------

Q_CODES = {"q8_0": spec.QType.Q8_0, "q4_0": spec.QType.Q4_0, "q3": spec.QType.Q3}
Q_GPTQ_BLOCK = 128  # lazy-update block of columns (GPTQ's), a multiple of the 32-column scale group


@dataclass
class QResult:
    gtype: spec.QType
    d: np.ndarray        # float16 (R, K/32): the blocks' scales
    q: np.ndarray        # int (R, K): Q8_0 values in [-127, 127], Q4_0 nibbles in [0, 15], Q3 in [0, 7]
    w_hat: torch.Tensor  # float32 (R, K) == format.pack_q(gtype, d, q).dequantize()
    stats: dict = field(default_factory=dict)


def _q_scale(Wg: torch.Tensor, gtype: spec.QType) -> torch.Tensor:
    """ggml's scale rule on one 32-column group (R, 32), rounded to f16: Q8_0 d = amax/127; Q4_0 d = m/−8 with
    m the signed value of largest magnitude (so m itself is exactly representable); Q3 the same rule, d = m/−4."""
    if gtype == spec.QType.Q8_0:
        return _f16(Wg.abs().amax(1) / 127.0)
    idx = Wg.abs().argmax(1, keepdim=True)
    return _f16(Wg.gather(1, idx)[:, 0] / -float(QTYPE_OFFSET[gtype]))


def _q_column(w: torch.Tensor, d: torch.Tensor, gtype: spec.QType) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer, value) of one column under scales d: ggml's rounding (Q8_0 roundf; Q4_0 trunc(x/d + 8.5), clamped
    to 15; Q3 likewise trunc(x/d + 4.5) clamped to 7)."""
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    if gtype == spec.QType.Q8_0:
        q = torch.clamp(torch.sign(w * inv) * torch.floor((w * inv).abs() + 0.5), -127, 127)
        return q, d * q
    off = QTYPE_OFFSET[gtype]
    q = torch.clamp(torch.floor(w * inv + (off + 0.5)), 0, 2 * off - 1)
    return q, d * (q - off)


def compress_q(W: torch.Tensor, H: torch.Tensor | None, code: str, percdamp: float = 0.01,
               hinv: Hinv | None = None) -> QResult:
    """One linear W (R, K), K % 32 == 0, as Q8_0 / Q4_0 / Q3 blocks solved by GPTQ (Frantar et al. 2022): columns in
    order, each group's scale set by ggml's rule from the error-updated weights when the group starts (GPTQ's
    groupwise mode), every column's rounding error pushed onto the columns not yet quantized through the upper
    Cholesky factor of H⁻¹. H None: round to nearest (ggml's quantizer up to the scale's f16 rounding)."""
    t_start = time.perf_counter()
    gtype = Q_CODES[code]
    R, K = W.shape
    G = spec.Q8_0_BLOCK
    if K % G:
        raise ValueError(f"K = {K} is not a multiple of {G} ({code})")
    W0 = W.detach().to(torch.float32)
    Wc = W0.clone()
    Hinv, n_dead = _prepare_hinv(H, Wc, percdamp, hinv) if H is not None else (None, 0)
    Q = torch.zeros_like(Wc)
    qi = torch.zeros_like(Wc)
    d = torch.zeros(R, K // G, device=Wc.device)
    for i1 in range(0, K, Q_GPTQ_BLOCK):
        i2 = min(i1 + Q_GPTQ_BLOCK, K)
        W1 = Wc[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % G == 0:
                d[:, col // G] = _q_scale(W1[:, i:i + G], gtype)
            q, v = _q_column(W1[:, i], d[:, col // G], gtype)
            qi[:, col], Q[:, col] = q, v
            if Hinv is not None:
                err = (W1[:, i] - v) / Hinv[col, col]
                W1[:, i:] -= err[:, None] * Hinv[col, col:i2][None, :]
                Err1[:, i] = err
        if Hinv is not None and i2 < K:
            Wc[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    d16 = d.to(torch.float16).cpu().numpy()
    q_np = qi.to(torch.int16).cpu().numpy()
    E = W0 - Q
    stats = {"method": code, "n_terms": 0, "dead_cols": n_dead,
             "err_w": float((E.double() ** 2).sum() / (W0.double() ** 2).sum().clamp_min(1e-300)),
             "param_bits": {spec.QType.Q8_0: 8.0, spec.QType.Q4_0: 4.0, spec.QType.Q3: 3.0}[gtype]}
    if H is not None:
        stats["err_out"] = output_error(W0, E, H)
    stats["time_s"] = time.perf_counter() - t_start
    return QResult(gtype, d16, q_np, Q, stats)

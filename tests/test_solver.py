"""Layer solver (exporter/solver.py): N:M structure, exact f16 fake quant == packed file, closed-form scales,
partial blocks, argument checks, and the error orderings the method relies on. Seeded random layers."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from pbs2p.exporter.solver import (HessianAccumulator, SolverConfig, _refine, _refine2, compress_layer)
from pbs2p.format import dequantize_sb, pack_sb, sb_value

METHODS = ("pbs2p", "sign", "billm", "arb", "stbllm")


def make_layer(seed: int, R: int = 48, K: int = 256, N: int = 2048):
    """W with uneven column scales, H = 2/N XᵀX from correlated activations with uneven column scales.
    Returns fresh copies (the cache holds the originals)."""
    W, H = _make_layer(seed, R, K, N)
    return W.clone(), H.clone()


@functools.lru_cache(maxsize=None)
def _make_layer(seed: int, R: int, K: int, N: int):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(K) + 0.3 * torch.randn(K, K, generator=g) / K ** 0.5
    X = torch.randn(N, K, generator=g) @ A * torch.exp(0.5 * torch.randn(K, generator=g))
    acc = HessianAccumulator(K)
    acc.add_batch(X[: N // 3])
    acc.add_batch(X[N // 3:].reshape(2, -1, K))
    W = 0.02 * torch.randn(R, K, generator=g) * torch.exp(0.3 * torch.randn(K, generator=g))
    return W, acc.H


def out_err(W, w_hat, H):
    E = (W - w_hat).double()
    return float(((E @ H.double()) * E).sum() / ((W.double() @ H.double()) * W.double()).sum())


@pytest.mark.parametrize("K", [32, 2 * HessianAccumulator.TILE + 37])
def test_hessian_accumulator_is_running_mean(K):
    # K above 2 tiles: three strips of the upper triangle, the last one partial, mirrored into the lower one
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, K, generator=g)
    acc = HessianAccumulator(K)
    for chunk in (X[:7], X[7:100].reshape(3, 31, K)):
        acc.add_batch(chunk)
    torch.testing.assert_close(acc.H, 2.0 / 100 * X[:100].T @ X[:100], rtol=1e-5, atol=1e-6)
    acc.add_batch(X[100:])  # more rows after H was read (and mirrored) once
    assert acc.nsamples == 300
    H = acc.H
    assert torch.equal(H, H.T)
    torch.testing.assert_close(H, 2.0 / 300 * X.T @ X, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,m", [(6, 8), (4, 8), (2, 4)])
def test_nm_structure_and_exact_zeros(method, n, m):
    W, H = make_layer(0)
    res = compress_layer(W, H, SolverConfig(method=method, n=n, m=m, salient=(method == "pbs2p")))
    R, K = W.shape
    kept = res.terms[0] != 0
    np.testing.assert_array_equal(kept.reshape(R, K // m, m).sum(-1), n)
    assert torch.all(res.w_hat[torch.from_numpy(~kept)] == 0)
    assert np.all(res.terms[1:][:, ~kept] == 0)
    assert res.stats["kept_frac"] == pytest.approx(n / m)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("K,extra", [(256, None), (576, "salient"), (576, "residual"), (576, None)])
def test_w_hat_is_the_packed_file(method, K, extra):
    W, H = make_layer(2, R=40, K=K)
    cfg = SolverConfig(method=method, n=6, m=8, salient=extra == "salient", residual=extra == "residual")
    res = compress_layer(W, H, cfg)
    nb = -(-K // cfg.block_size)
    T = 2 if (extra or method == "billm") else 1
    assert res.terms.dtype == np.int8 and res.terms.shape == (T, 40, K)
    assert res.alpha.dtype == np.float16 and res.alpha.shape == (40, T, nb)
    assert res.mu.dtype == np.float16 and res.mu.shape == (40, nb)
    assert res.w_hat.dtype == torch.float32
    assert torch.equal(res.w_hat, torch.from_numpy(sb_value(res.terms, res.alpha, res.mu, cfg.block_size)))
    sb = pack_sb(res.terms, res.alpha, res.mu, cfg.block_size)
    assert torch.equal(res.w_hat, torch.from_numpy(dequantize_sb(sb)))
    assert np.isfinite(res.stats["err_out"]) and res.stats["err_out"] < 1.0


@pytest.mark.parametrize("method,steps", [("arb", None), ("stbllm", None), ("pbs2p", None), ("pbs2p", 0)])
def test_alpha_mu_are_closed_form_of_final_mask_and_signs(method, steps):
    W, H = make_layer(3, R=64, K=128)
    res = compress_layer(W, H, SolverConfig(method=method, n=6, m=8, steps=steps, compensate=False))
    Wd = W.double().numpy()
    B = res.terms[0].astype(np.float64)
    n = np.abs(B).sum(1)
    s, p, q = B.sum(1), (Wd * B).sum(1), (Wd * (B != 0)).sum(1)
    alpha = (n * p - s * q) / (n * n - s * s)
    mu = (n * q - s * p) / (n * n - s * s)
    for got, want in ((res.alpha[:, 0, 0], alpha), (res.mu[:, 0], mu)):
        ulp = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)
        assert np.all(np.abs(got.astype(np.float64) - want) <= ulp), np.abs(got - want).max()
    # B is the sign of the residual to μ on every kept weight (a fixed point of the ARB alternation,
    # up to the ±α·ulp slack of the f16 μ)
    mu32 = res.mu[:, :1].astype(np.float64)
    agree = (np.sign(Wd - mu32) == B)[B != 0]
    assert agree.mean() > 0.99


def test_refine_error_never_increases():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(32, 128, generator=g) ** 3
    mf = (torch.rand(32, 128, generator=g) > 0.3).float()
    errs = []
    for iters in (0, 1, 2, 4, 15):
        a, mu, B = _refine(W, mf, iters)
        errs.append(float((((W - mu[:, None] - a[:, None] * B) * mf) ** 2).sum()))
    assert all(e1 <= e0 * (1 + 1e-6) for e0, e1 in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.9 * errs[0]


def test_partial_last_block():
    W, H = make_layer(5, R=24, K=576)
    res = compress_layer(W, H, SolverConfig(method="pbs2p", n=6, m=8, block_size=128))
    assert res.alpha.shape == (24, 1, 5) and res.mu.shape == (24, 5)
    assert np.all(res.alpha[:, 0, 4] != 0)
    assert torch.all(res.w_hat[:, 512:][torch.from_numpy(res.terms[0][:, 512:] != 0)] != 0)


def test_argument_checks():
    W, H = make_layer(6, R=8, K=64)
    with pytest.raises(ValueError, match="multiple of m"):
        compress_layer(W[:, :60], H[:60, :60], SolverConfig())
    for method in ("pbs2p", "arb", "billm", "stbllm"):
        with pytest.raises(ValueError, match="needs the Hessian"):
            compress_layer(W, None, SolverConfig(method=method))
    res = compress_layer(W, None, SolverConfig(method="sign"))
    assert "err_out" not in res.stats and np.all(res.mu == 0)
    with pytest.raises(ValueError, match="shape"):
        compress_layer(W, H[:32, :32], SolverConfig())
    with pytest.raises(ValueError, match="overflows float16"):
        compress_layer(W * 1e8, H, SolverConfig())
    for bad in (dict(method="gptq"), dict(m=5), dict(n=9), dict(n=0), dict(block_size=96), dict(score="x"),
                dict(steps=-1)):
        with pytest.raises(ValueError):
            SolverConfig(**bad)


@pytest.mark.parametrize("method", METHODS)
def test_dense_every_method(method):
    W, H = make_layer(7, R=32, K=192)
    res = compress_layer(W, H, SolverConfig(method=method, n=8, m=8))
    assert np.all(res.terms[0] != 0)
    assert 0 < res.stats["err_out"] < 1.0


def test_dead_input_column():
    W, H = make_layer(8, R=16, K=128)
    H[5, :] = 0
    H[:, 5] = 0
    res = compress_layer(W, H, SolverConfig(method="pbs2p"))
    assert res.stats["dead_cols"] == 1 and np.isfinite(res.stats["err_out"])
    assert torch.equal(res.w_hat, torch.from_numpy(sb_value(res.terms, res.alpha, res.mu, 128)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [6, 4])
def test_spbo_beats_prune_then_binarize(seed, n):
    """SPBO (masks chosen against the current binary fit, τ = m − n steps) must end with a lower output error
    than pruning by the same OBS score first and binarizing after (τ = 0), and than STBLLM-style pruning."""
    W, H = make_layer(10 + seed, R=64, K=384)
    spbo = compress_layer(W, H, SolverConfig(method="pbs2p", n=n, m=8)).stats["err_out"]
    one_shot = compress_layer(W, H, SolverConfig(method="pbs2p", n=n, m=8, steps=0)).stats["err_out"]
    stbllm = compress_layer(W, H, SolverConfig(method="stbllm", n=n, m=8)).stats["err_out"]
    assert spbo < one_shot and spbo < stbllm, (spbo, one_shot, stbllm)


def test_sparse_binarization_beats_dense_sign():
    """The paper's core claim at weight level: 6:8 + fitted binarization has lower ‖W − Ŵ‖² than dense sign."""
    W, H = make_layer(20, R=64, K=256)
    dense = compress_layer(W, None, SolverConfig(method="sign", n=8, m=8)).stats["err_w"]
    nm = compress_layer(W, H, SolverConfig(method="pbs2p", n=6, m=8, compensate=False, score="magnitude"))
    assert nm.stats["err_w"] < dense


def test_compensation_lowers_output_error():
    W, H = make_layer(21, R=64, K=384)
    on = compress_layer(W, H, SolverConfig(method="arb", n=8, m=8)).stats["err_out"]
    off = compress_layer(W, H, SolverConfig(method="arb", n=8, m=8, compensate=False)).stats["err_out"]
    assert on < off


def test_salient_term_lowers_weight_error():
    W, H = make_layer(22, R=64, K=256)
    W[:, [3, 77, 150]] *= 8  # outlier input columns: the salient search must pick them up
    cfg = dict(method="pbs2p", n=6, m=8, compensate=False, score="magnitude")
    base = compress_layer(W, H, SolverConfig(**cfg))
    sal = compress_layer(W, H, SolverConfig(**cfg, salient=True))
    assert sal.terms.shape[0] == 2 and sal.stats["salient_cols"] > 0
    assert sal.stats["err_w"] < base.stats["err_w"]
    assert sal.stats["param_bits"] > base.stats["param_bits"]


def test_residual_term_covers_kept_weights_and_is_least_squares():
    """residual: term 1 on every kept weight and only there, SPBO's mask unchanged; per row and block, (μ, α_0, α_1)
    are the least-squares fit for the signs the file holds (up to f16 rounding); the error is below the salient
    search's (same file bytes) and the one-term fit's."""
    W, H = make_layer(24, R=64, K=320)  # 320: a partial last block of 64 columns
    cfg = dict(method="pbs2p", n=6, m=8, compensate=False)
    one = compress_layer(W, H, SolverConfig(**cfg))
    res = compress_layer(W, H, SolverConfig(**cfg, residual=True))
    sal = compress_layer(W, H, SolverConfig(**cfg, salient=True))
    kept = res.terms[0] != 0
    np.testing.assert_array_equal(kept, one.terms[0] != 0)
    np.testing.assert_array_equal(res.terms[1] != 0, kept)
    Wn = W.double().numpy()
    for b, i1 in enumerate(range(0, 320, 128)):
        sl = slice(i1, min(i1 + 128, 320))
        for row in range(0, 64, 9):
            k = kept[row, sl]
            A = np.stack([np.ones(k.sum()), res.terms[0][row, sl][k], res.terms[1][row, sl][k]], 1)
            x = np.linalg.lstsq(A, Wn[row, sl][k], rcond=None)[0]
            got = [res.mu[row, b], res.alpha[row, 0, b], res.alpha[row, 1, b]]
            np.testing.assert_allclose(np.array(got, np.float64), x, rtol=2e-3, atol=1e-5)
    assert res.stats["err_out"] < sal.stats["err_out"] < one.stats["err_out"]
    assert res.stats["param_bits"] == pytest.approx(2 * 6 / 8)
    with pytest.raises(ValueError, match="choose one"):
        SolverConfig(salient=True, residual=True)


def test_refine2_error_never_increases():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(32, 128, generator=g) ** 3
    mf = (torch.rand(32, 128, generator=g) > 0.3).float()
    a0, mu, B0 = _refine(W, mf, 15)
    r = W - mu[:, None] - a0[:, None] * B0
    B1 = torch.where(r >= 0, 1.0, -1.0) * mf
    a1 = (r.abs() * mf).sum(1) / mf.sum(1)

    def err(a0, a1, mu, B0, B1):
        return float((((W - mu[:, None] - a0[:, None] * B0 - a1[:, None] * B1) * mf) ** 2).sum())

    start = err(a0, a1, mu, B0, B1)
    errs = [err(*_refine2(W, mf, B0, B1, torch.stack([mu, a0, a1], 1), it)) for it in (1, 2, 4, 15)]
    assert all(e <= start * (1 + 1e-6) for e in errs) and errs[-1] < 0.95 * start, (start, errs)
    assert all(e1 <= e0 * (1 + 1e-6) for e0, e1 in zip(errs, errs[1:])), errs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_packed_file():
    W, H = make_layer(23, R=64, K=576)
    res = compress_layer(W.cuda(), H.cuda(), SolverConfig(method="pbs2p", salient=True))
    assert res.w_hat.is_cuda
    assert torch.equal(res.w_hat.cpu(), torch.from_numpy(sb_value(res.terms, res.alpha, res.mu, 128)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("extra", [None, "residual", "salient"])
def test_symmetric_fits_have_no_mu(method, extra):
    """symmetric=True: μ = 0 in every block and term (the value is Σ α_t·B_t), the N:M structure kept; one term's
    α is the least-squares scale of W ≈ α·B, Σ w·b / n per row block."""
    W, H = make_layer(3)
    kw = {} if extra is None else {extra: True}
    sym = compress_layer(W.clone(), H, SolverConfig(method=method, symmetric=True, **kw))
    assert not np.any(sym.mu)
    kept = sym.terms[0] != 0
    R, K = W.shape
    np.testing.assert_array_equal(kept.reshape(R, K // 8, 8).sum(-1), 6)
    if extra is None and method in ("arb", "stbllm"):  # no compensation within the block: α is W's own fit
        cfg = SolverConfig(method=method, symmetric=True, compensate=False)
        res = compress_layer(W.clone(), H, cfg)
        t = torch.from_numpy(res.terms[0].astype(np.float32))
        a = (W[:, :128] * t[:, :128]).sum(1) / t[:, :128].abs().sum(1)
        torch.testing.assert_close(torch.from_numpy(res.alpha[:, 0, 0].astype(np.float32)), a.half().float())


@pytest.mark.parametrize("method", ["pbs2p", "arb", "stbllm"])
def test_prepared_hinv_gives_the_same_layer(method):
    """A factorisation shared across solves (the planner's codes, q/k/v on one input) changes no bit of the
    result, dead inputs included; one prepared for another damping or size is refused."""
    from pbs2p.exporter.solver import prepare_hinv
    W, H = make_layer(9, R=16, K=256)
    H[7, :] = 0
    H[:, 7] = 0
    cfg = SolverConfig(method=method, n=6, m=8)
    ref = compress_layer(W.clone(), H, cfg)
    prep = prepare_hinv(H, cfg.percdamp)
    for _ in range(2):  # the prepared factor is not consumed or changed by a solve
        res = compress_layer(W.clone(), H, cfg, prep)
        assert torch.equal(res.w_hat, ref.w_hat) and res.stats["dead_cols"] == 1
        assert np.array_equal(res.terms, ref.terms) and np.array_equal(res.alpha, ref.alpha)
    with pytest.raises(ValueError, match="percdamp"):
        compress_layer(W.clone(), H, cfg, prepare_hinv(H, 0.1))
    with pytest.raises(ValueError, match="prepared Hinv"):
        compress_layer(W[:, :128].clone(), H[:128, :128], cfg, prep)

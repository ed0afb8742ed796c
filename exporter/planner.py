"""The bits-per-weight budget planner (method "plan", `--bpw B`): a code per linear layer so that the linears'
storage bits per weight meet B (within 1%, below it) at the least estimated damage (docs/algorithm.md, "Budget
planner").

Codes (every one a layout the file and the C runtime hold; bytes counted as the file stores them):

    q8_0, q4_0          ggml Q8_0 / Q4_0 blocks, solved by GPTQ (solver.compress_q); K % 32 == 0
    q3                  pbs2p's 3-bit blocks of 32 (3.5 bpw, docs/format.md "Q3 blocks"), solved the same way
    pbs2p-6:8 ... 4:8   PBS²P sparse-binary at N:8
    binary              PBS²P dense binary (8:8, one term)
    residual            PBS²P dense two-term residual binary (8:8, both terms refit)

Two passes over the calibration windows. Pass 1 (measure) runs the full-precision model block by block: each
linear's input Hessian H is accumulated on FP inputs and every candidate code is solved on it, giving the code's
error E = W − Ŵ; its damage is the second-order estimate of the mean NLL increase,

    D = ¼ Σ_r F_r (E H Eᵀ)_rr,   F_r = mean over calibration tokens of (∂ΣNLL/∂y_r)²

(F: the empirical Fisher of the layer's output channels, one backward pass per window; "output" sets F = 1,
"relative" uses tr(EHEᵀ)/tr(WHWᵀ), the ablations). allocate() then solves the multiple-choice knapsack (least
ΣD under the byte budget) exactly by dynamic programming over the bytes spent.
Pass 2 is the ordinary sequential export (exporter/driver.py) with each linear compressed by its planned code.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

from pbs2p import format as fmt
from pbs2p.format import spec
from pbs2p.format.plan import Plan, PlanEntry  # noqa: F401 - the planner's result types

from . import solver

CODES = ("q8_0", "q4_0", "q3", "pbs2p-6:8", "pbs2p-5:8", "pbs2p-4:8", "binary", "residual")
DEFAULT_CODES = ("q8_0", "q4_0", "q3", "pbs2p-6:8", "binary")
SENSITIVITIES = ("fisher", "output", "relative")
TOLERANCE = 0.01  # the plan's bpw lies in [B·(1 − TOLERANCE), B]


def code_solver(code: str, base: solver.SolverConfig) -> solver.SolverConfig | None:
    """The solver settings of a sparse-binary code (base's other knobs kept), None for q8_0 / q4_0 / q3."""
    if code in solver.Q_CODES:
        return None
    if code == "binary":
        return dataclasses.replace(base, method="pbs2p", n=8, m=8, residual=False)
    if code == "residual":
        return dataclasses.replace(base, method="pbs2p", n=8, m=8, residual=True, salient=False)
    if code.startswith("pbs2p-"):
        n, m = (int(x) for x in code[len("pbs2p-"):].split(":"))
        return dataclasses.replace(base, method="pbs2p", n=n, m=m, residual=False)
    raise ValueError(f"unknown code {code!r}")


def code_bytes(code: str, n_out: int, n_in: int, base: solver.SolverConfig) -> int | None:
    """Bytes the file spends on a (n_out, n_in) linear in `code`, or None when the code cannot hold it."""
    if code in solver.Q_CODES:
        if n_in % spec.Q8_0_BLOCK:
            return None
        return n_out * (n_in // spec.Q8_0_BLOCK) * fmt.QTYPE_BYTES[solver.Q_CODES[code]]
    sc = code_solver(code, base)
    if n_in % sc.m:
        return None
    t, w, nb = sc.n_terms, spec.n_words(n_in), spec.n_blocks(n_in, sc.block_size)
    nm = sc.file_code(n_in)
    bits = spec.nm_row_bytes(n_in, *nm) if nm else t * 2 * w * 8
    return n_out * (bits + t * nb * 2 + nb * 2)


def reachable(shapes: dict[str, tuple[int, int]], codes: tuple[str, ...], base: solver.SolverConfig
              ) -> tuple[float, float]:
    """(lowest, highest) storage bpw over the linears of `shapes` the codes can reach."""
    lo = hi = n = 0
    for pre, (r, k) in shapes.items():
        b = [x for c in codes if (x := code_bytes(c, r, k, base)) is not None]
        if not b:
            raise ValueError(f"{pre} ({r}x{k}): none of the codes {', '.join(codes)} can hold it")
        lo, hi, n = lo + min(b), hi + max(b), n + r * k
    return 8.0 * lo / n, 8.0 * hi / n


# --- allocation --------------------------------------------------------------------------------------------

ALLOC_RESOLUTION = 20000  # the allocation counts bytes in units of budget / ALLOC_RESOLUTION (rounded up)


def allocate(options: dict[str, list[tuple[str, int, float]]], budget: int) -> dict[str, str]:
    """Least total damage with Σ bytes <= budget: options maps a layer to its (code, bytes, damage) choices.
    The multiple-choice knapsack solved exactly by dynamic programming over the bytes spent, counted in units of
    budget / ALLOC_RESOLUTION with every choice's bytes rounded up (so the plan never exceeds the budget, and is
    optimal up to that rounding: at most one unit per layer). Raises ValueError when the cheapest plan exceeds it."""
    import math

    import numpy as np

    cheapest = sum(min(b for _, b, _ in opts) for opts in options.values())
    if cheapest > budget:
        raise ValueError(f"the cheapest plan needs {cheapest} bytes > budget {budget}")
    unit = max(1, math.ceil(budget / ALLOC_RESOLUTION))
    cap = budget // unit
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    back = []
    names = list(options)
    for pre in names:
        new = np.full(cap + 1, np.inf)
        pick = np.full(cap + 1, -1, dtype=np.int16)
        for j, (_, b, d) in enumerate(options[pre]):
            c = math.ceil(b / unit)
            if c > cap:
                continue
            cand = dp[:cap + 1 - c] + d
            better = cand < new[c:]
            new[c:][better] = cand[better]
            pick[c:][better] = j
        dp = new
        back.append(pick)
    s = int(np.argmin(dp))
    if not np.isfinite(dp[s]):  # rounding up to units made the cheapest plan not fit
        raise ValueError(f"the cheapest plan needs {cheapest} bytes, too close to the budget {budget}")
    out = {}
    for pre, pick in zip(reversed(names), reversed(back)):
        j = int(pick[s])
        out[pre] = options[pre][j][0]
        s -= math.ceil(options[pre][j][1] / unit)
    return {pre: out[pre] for pre in names}


# --- measurement (pass 1) ----------------------------------------------------------------------------------

def solve(code: str, W: torch.Tensor, H: torch.Tensor, base: solver.SolverConfig, hinv: solver.Hinv | None = None
          ) -> tuple[Any, torch.Tensor, dict]:
    """Compress one linear in `code` ("" = base's own sparse-binary settings): (fmt.SbLinear or fmt.QLinear, its
    exact w_hat, stats). `hinv`: solver.prepare_hinv(H, base.percdamp), shared by several codes' solves."""
    if code in solver.Q_CODES:
        r = solver.compress_q(W, H, code, base.percdamp, hinv)
        return fmt.pack_q(r.gtype, r.d, r.q), r.w_hat, r.stats
    sc = code_solver(code, base) if code else base
    r = solver.compress_layer(W, H, sc, hinv)
    return fmt.pack_sb(r.terms, r.alpha, r.mu, sc.block_size, sc.file_code(W.shape[1])), r.w_hat, r.stats


def damage(kind: str, W: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor, F: torch.Tensor | None) -> float:
    E = (W.float() - w_hat.to(W.device, torch.float32))
    per_row = ((E @ H.to(E.device, torch.float32)) * E).double().sum(1)  # (E H Eᵀ)_rr
    if kind == "fisher":
        return float(0.25 * (F.to(per_row.device, torch.float64) * per_row).sum())
    if kind == "output":
        return float(0.25 * per_row.sum())
    return solver.output_error(W.float(), E, H)


def fisher(model: Any, fam: Any, windows: torch.Tensor, dev: torch.device, progress: bool = True
           ) -> dict[str, torch.Tensor]:
    """F per linear output channel: mean over the scored tokens of the squared gradient of the windows' summed
    next-token NLL with respect to the linear's output (one forward + backward per window, weights frozen)."""
    from tqdm.auto import tqdm

    from . import arch

    acc: dict[str, torch.Tensor] = {}
    hooks = []
    for li, layer in enumerate(arch.blocks(model, fam)):
        for _, g, lin in arch.block_linears(layer, fam):
            pre = f"blk.{li}.{g}"
            acc[pre] = torch.zeros(lin.weight.shape[0], dtype=torch.float64, device=dev)

            def grad_hook(gr: torch.Tensor, pre: str = pre) -> None:
                acc[pre] += gr.detach().double().pow(2).reshape(-1, gr.shape[-1]).sum(0)

            def fwd(mod: Any, inp: Any, out: torch.Tensor, grad_hook=grad_hook) -> None:
                if out.requires_grad:
                    out.register_hook(grad_hook)

            hooks.append(lin.register_forward_hook(fwd))
    emb = arch.get_module(model, fam.embed)
    hooks.append(emb.register_forward_hook(lambda mod, inp, out: out.detach().requires_grad_(True)))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    n_tok = 0
    try:
        with torch.enable_grad():
            for i in tqdm(range(windows.shape[0]), desc="plan: fisher", disable=not progress, file=sys.stderr):
                x = windows[i:i + 1].to(dev)
                logits = model(x, use_cache=False).logits[0, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
                loss.backward()
                n_tok += x.shape[1] - 1
    finally:
        for h in hooks:
            h.remove()
        for p, f in flags:
            p.requires_grad_(f)
    return {pre: (a / max(n_tok, 1)).float() for pre, a in acc.items()}


@torch.no_grad()
def measure(model: Any, fam: Any, windows: torch.Tensor, base: solver.SolverConfig, codes: tuple[str, ...],
            sensitivity: str, dev: torch.device, progress: bool = True) -> dict[str, list[tuple[str, int, float]]]:
    """Pass 1 on the full-precision model (left unchanged): {linear: [(code, bytes, damage)]}."""
    from tqdm.auto import tqdm

    from . import arch, driver

    F = fisher(model, fam, windows, dev, progress) if sensitivity == "fisher" else {}
    inps, kwargs = driver.capture_block0_inputs(model, fam, windows, dev)
    layers = arch.blocks(model, fam)
    options: dict[str, list[tuple[str, int, float]]] = {}
    bar = tqdm(total=len(layers) * len(fam.linears), desc="plan: measure", unit="layer", disable=not progress,
               file=sys.stderr)
    for li, layer in enumerate(layers):
        lins = arch.block_linears(layer, fam)
        out, accs, owner = driver._run_block_hessians(layer, lins, inps, kwargs, dev)
        hinvs: dict[Any, solver.Hinv] = {}
        for _, g, lin in lins:
            pre = f"blk.{li}.{g}"
            W = lin.weight.data.float().clone()
            H = accs[owner[g]].H
            if owner[g] not in hinvs:  # one factorisation per input (q/k/v share one) for every code's solve
                hinvs[owner[g]] = solver.prepare_hinv(H, base.percdamp, W.device)
            hinv = hinvs[owner[g]]
            opts = []
            for code in codes:
                nb = code_bytes(code, W.shape[0], W.shape[1], base)
                if nb is None:
                    continue
                _, w_hat, _ = solve(code, W.clone(), H, base, hinv)
                opts.append((code, nb, damage(sensitivity, W, w_hat, H, F.get(pre))))
            options[pre] = opts
            bar.update(1)
        del accs, hinvs
        inps = out
    bar.close()
    return options


# --- pass 1's table, kept for a sweep of budgets (--measurements FILE) --------------------------------------
# Pass 1 does not depend on the budget: {linear: [(code, bytes, damage)]} is a function of the model, the
# calibration windows and the solver / code / sensitivity settings only. A JSON file keyed by the sha256 of those
# (checkpoint.fingerprint without bpw) lets exports at other budgets skip it. The file code of the sparse-binary
# layers (--sb-code) changes their bytes but not their values, so it is left out of the key too: make_plan
# recounts every code's bytes for the export at hand, and one table serves planes and N:M-code exports alike.

MEASUREMENTS_VERSION = 1
_BUDGET_FIELDS = frozenset({"bpw", "max_bytes", "measurements", "embed_type"})  # what pass 1 does not read


def measurements_key(cfg: Any, model: Any, windows: torch.Tensor) -> str:
    from . import checkpoint
    cfg = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, nm_code=False))  # bytes, not values
    return checkpoint.fingerprint(cfg, model, windows, neutral=_BUDGET_FIELDS)


def load_measurements(path: str, key: str) -> dict[str, list[tuple[str, int, float]]] | None:
    """The table stored at path for this key; None when path does not exist; ExportError when it holds another
    export's table or is not one (the file is left as it is)."""
    import json
    from pathlib import Path

    from .config import ExportError

    p = Path(path)
    if not p.exists():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        if doc.get("version") != MEASUREMENTS_VERSION:
            raise ValueError(f"version {doc.get('version')!r}, this exporter reads {MEASUREMENTS_VERSION}")
        options = {str(pre): [(str(c), int(b), float(d)) for c, b, d in opts] for pre, opts in doc["options"].items()}
        stored = str(doc["key"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"--measurements {path}: not a planner measurement file ({e}); remove it or name "
                          f"another file") from None
    if stored != key:
        raise ExportError(f"--measurements {path}: measured for another model, calibration or solver/codes/"
                          f"sensitivity settings (key {stored[:12]}…, this export {key[:12]}…); remove it to "
                          f"measure again, or name another file")
    return options


def save_measurements(path: str, key: str, options: dict[str, list[tuple[str, int, float]]]) -> None:
    import json
    from pathlib import Path

    from . import checkpoint
    doc = {"version": MEASUREMENTS_VERSION, "key": key,
           "options": {pre: [[c, b, d] for c, b, d in opts] for pre, opts in options.items()}}
    checkpoint.atomic_write(Path(path), lambda f: f.write(json.dumps(doc, indent=0).encode()))


def make_plan(model: Any, fam: Any, windows: torch.Tensor, cfg: Any, dev: torch.device) -> Plan:
    """Pass 1 and the allocation for a QuantConfig with method "plan" (its bpw, codes, sensitivity, solver)."""
    from . import arch
    from .config import ExportError

    options = None
    if cfg.measurements:
        key = measurements_key(cfg, model, windows)
        options = load_measurements(cfg.measurements, key)
    if options is None:
        options = measure(model, fam, windows, cfg.solver, cfg.codes, cfg.sensitivity, dev, cfg.progress)
        if cfg.measurements:
            save_measurements(cfg.measurements, key, options)
    shapes = {}
    for li, layer in enumerate(arch.blocks(model, fam)):
        for _, g, lin in arch.block_linears(layer, fam):
            shapes[f"blk.{li}.{g}"] = tuple(lin.weight.shape)
    weights = {pre: r * k for pre, (r, k) in shapes.items()}
    if set(options) != set(weights) or not all(options.values()):
        raise ExportError(f"--measurements {cfg.measurements}: its table does not name this model's "
                          f"{len(weights)} linears with at least one code each; remove it to measure again")
    # the bytes as this export's file stores them (a table read back may have been measured with another --sb-code)
    options = {pre: [(c, code_bytes(c, *shapes[pre], cfg.solver), d) for c, _, d in opts]
               for pre, opts in options.items()}
    total = sum(weights.values())
    budget = int(cfg.bpw * total / 8.0)
    picked = allocate(options, budget)
    by = {pre: {c: (b, d) for c, b, d in opts} for pre, opts in options.items()}
    plan = Plan(cfg.bpw, cfg.sensitivity, tuple(cfg.codes),
                [PlanEntry(pre, c, by[pre][c][0], by[pre][c][1], weights[pre]) for pre, c in picked.items()])
    if plan.bpw < cfg.bpw * (1 - TOLERANCE):
        raise ExportError(f"--bpw {cfg.bpw}: these layers' sizes allow {plan.bpw:.3f} bpw at most under the budget "
                          f"(more than {100 * TOLERANCE:.0f}% below it); choose another budget")
    return plan

"""Layer-wise streaming compression (GPTQ frame) and the writer of the pbs2p file.

compress(): embeddings -> block-0 inputs of every calibration window; then per block: hooks on its linears
accumulate the Hessians, each linear is compressed by solver.compress_layer and its weight replaced by w_hat,
and the block is re-run with the compressed weights to give the next block's inputs. Only one block's
activations (inputs + outputs of all windows) are held at a time.

write(): everything is compressed first and written last through format.ModelWriter, so an interrupted export
leaves no file.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pbs2p import format as fmt

from . import arch as A
from . import coarse as C

METHODS = ("pbs2p", "sign", "billm", "arb", "stbllm", "fp16")
EMBED_TYPES = {"q8_0": fmt.GGMLType.Q8_0, "q4_0": fmt.GGMLType.Q4_0, "f16": fmt.GGMLType.F16,
               "f32": fmt.GGMLType.F32}


class ExportError(ValueError):
    """A bad export request (the CLI prints it as one line)."""


def parse_nm(s: str) -> tuple[int, int] | None:
    """'dense' -> None; 'N:M' -> (N, M) with M in {4, 8} and 1 <= N <= M (N == M means dense)."""
    if s.strip().lower() == "dense":
        return None
    try:
        n_s, m_s = s.split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise ExportError(f"--nm {s!r}: expected N:M (e.g. 6:8) or dense") from None
    if m not in (4, 8):
        raise ExportError(f"--nm {s}: M must be 4 or 8, got {m}")
    if n <= 0:
        raise ExportError(f"--nm {s}: N must be >= 1, got {n}")
    if n > m:
        raise ExportError(f"--nm {s}: N {n} exceeds M {m}")
    return None if n == m else (n, m)


@dataclass
class ExportConfig:
    method: str = "pbs2p"
    nm: tuple[int, int] | None = (6, 8)  # None: dense
    coarse: bool = False  # CFS coarse stage (per-block N); off by default: docs/algorithm.md, "CFS coarse stage"
    score: str = "obs"
    steps: int | None = None  # None: auto (M - N steps)
    salient: bool = False
    residual: bool = False
    compensate: bool = True
    block_size: int = fmt.DEFAULT_BLOCK_SIZE
    percdamp: float = 0.01
    arb_iters: int = 15
    embed_type: str = "q8_0"
    calib: str = "self"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    checkpoint: str | None = None  # folder for per-block checkpoints (exporter/checkpoint.py); None: none

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ExportError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.method == "fp16":
            self.nm = None  # no quantization, no pruning: --nm does not apply
        if self.embed_type not in EMBED_TYPES:
            raise ExportError(f"--embed-type {self.embed_type!r}: choose one of {', '.join(EMBED_TYPES)}")
        if self.block_size <= 0 or self.block_size % 64:
            raise ExportError(f"--block-size {self.block_size}: must be a positive multiple of 64")
        if self.score not in ("obs", "magnitude"):
            raise ExportError(f"--score {self.score!r}: choose obs or magnitude")
        if self.steps is not None and self.steps < 0:
            raise ExportError(f"--steps {self.steps}: must be >= 0 (0: static mask, 1: one-shot) or auto")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ExportError(f"--device {self.device!r}: use cpu or cuda")
        if self.salient and self.residual:
            raise ExportError("--salient and --residual both add the second term: choose one")
        if self.nsamples <= 0 or self.seqlen <= 1:
            raise ExportError(f"--nsamples {self.nsamples} / --seqlen {self.seqlen}: need >= 1 and >= 2")

    def use_coarse(self) -> bool:
        return self.coarse and self.nm is not None and self.method != "fp16"


@dataclass
class LayerRecord:
    block: int
    name: str  # GGUF name, e.g. attn_q
    shape: tuple[int, int]
    n: int
    m: int
    werr: float  # ||W - Ŵ||² / ||W||²
    oerr: float  # tr(ΔHΔᵀ) / tr(WHWᵀ): relative output error on the calibration inputs
    seconds: float
    nbytes: int  # bytes the file spends on the weight (planes + scales, or the dense tensor)
    param_bits: float
    stats: dict = field(default_factory=dict)


@dataclass
class Compressed:
    """Everything the file needs, in memory; `model` holds the fake-quant linears (w_hat)."""

    model: Any
    family: A.Family
    cfg: ExportConfig
    kv: list[tuple[str, Any, str]]
    linears: dict[str, Any]  # GGUF prefix -> SbLinear or float32 ndarray (fp16 method)
    nm_n: list[int]
    records: list[LayerRecord]
    block_err: list[float]  # relative block-output error (compressed vs FP block on the same inputs)
    calibration: str
    seconds: float


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pick_device(req: str) -> torch.device:
    if req.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.device(req)
        warnings.warn(f"--device {req} requested but CUDA is not available; running on the CPU", stacklevel=2)
        log(f"warning: --device {req} requested but CUDA is not available; running on the CPU")
        return torch.device("cpu")
    if req != "cpu":
        raise ExportError(f"--device {req!r}: use cpu or cuda")
    return torch.device("cpu")


def set_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    torch.use_deterministic_algorithms(True, warn_only=True)


class _Stop(Exception):
    pass


class _Catcher(torch.nn.Module):
    """Stands in for block 0: records its hidden-state input (and the other call arguments once), then stops."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.inputs: list[torch.Tensor] = []
        self.kwargs: dict[str, Any] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs.pop("hidden_states")
        if args:
            args = args[1:]
        if args:
            raise RuntimeError("decoder layer called with extra positional arguments; unsupported transformers API")
        self.inputs.append(h.detach())
        if self.kwargs is None:
            self.kwargs = kwargs
        raise _Stop


@torch.no_grad()
def capture_block0_inputs(model: Any, fam: A.Family, windows: torch.Tensor, dev: torch.device
                          ) -> tuple[torch.Tensor, dict[str, Any]]:
    layers = A.blocks(model, fam)
    cat = _Catcher(layers[0])
    layers[0] = cat
    try:
        for i in range(windows.shape[0]):
            try:
                model(windows[i:i + 1].to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        layers[0] = cat.inner
    return torch.cat(cat.inputs), dict(cat.kwargs or {})


def run_block(block: torch.nn.Module, inps: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    outs = torch.empty_like(inps)
    for i in range(inps.shape[0]):
        o = block(inps[i:i + 1], **kwargs)
        outs[i:i + 1] = o[0] if isinstance(o, (tuple, list)) else o
    return outs


def _run_block_hessians(block: torch.nn.Module, lins: list, inps: torch.Tensor, kwargs: dict[str, Any], dev):
    """run_block (the block's output) while each linear's input Hessian accumulates. Linears fed the same input
    tensor (q/k/v, gate/up) share one accumulator, found by identity of the tensor in the forward pass:
    returns (output, {owner: HessianAccumulator}, {linear: its owner})."""
    solver = _solver()
    accs: dict[str, Any] = {}
    owner: dict[str, str] = {}
    prev: list = [None, None]  # (input tensor, linear) of the last hook call

    def hook(g: str, x: torch.Tensor) -> None:
        o = owner[prev[1]] if prev[0] is x else g
        if owner.setdefault(g, o) != o:
            raise RuntimeError(f"internal: {g}'s input is shared with {owner[g]} in one window and not in another")
        if o == g:
            if g not in accs:
                accs[g] = solver.HessianAccumulator(x.shape[-1], device=dev)
            accs[g].add_batch(x)
        prev[:] = [x, g]

    hooks = [lin.register_forward_hook(lambda mod, inp, out, g=g: hook(g, inp[0])) for _, g, lin in lins]
    try:
        out = run_block(block, inps, kwargs)
    finally:
        for hk in hooks:
            hk.remove()
        prev.clear()
    missing = [g for _, g, _ in lins if g not in owner]
    if missing:
        raise RuntimeError(f"internal: the block's forward pass never called {', '.join(missing)}")
    return out, accs, owner


def _rel(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


def block_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖² / ‖ref‖²: a compressed block's relative (squared) output error against the FP block's."""
    return _rel(float(((out - ref) ** 2).sum()), float((ref ** 2).sum()))


def _solver():
    from . import solver

    return solver


@torch.no_grad()
def compress(loaded: Any, cfg: ExportConfig, windows: torch.Tensor | None, calibration: str,
             ckpt: Any = None, resume: bool = False) -> Compressed:
    """Compress every linear of loaded.model in place (fake-quant weights) and collect the file's contents.

    ckpt: a checkpoint.Checkpoint; with resume=False it is started fresh and each finished block is saved to it,
    with resume=True (already opened and checked) its finished blocks are taken as they are and the rest run."""
    cfg.validate()
    t0 = time.time()
    set_determinism(cfg.seed)
    model = loaded.model
    fam = A.family_of(model.config)
    dev = pick_device(cfg.device)
    model.to(dev)
    layers = A.blocks(model, fam)
    nl = len(layers)
    m = cfg.nm[1] if cfg.nm else 0
    n_target = cfg.nm[0] if cfg.nm else 0
    for li, layer in enumerate(layers):
        for path, gname, lin in A.block_linears(layer, fam):
            k = lin.weight.shape[1]
            if cfg.nm and k % m:
                raise ExportError(f"blk.{li}.{gname}: input size {k} is not a multiple of M={m}")

    records: list[LayerRecord] = []
    linears: dict[str, Any] = {}
    block_err: list[float] = []
    nm_n = [n_target] * nl if cfg.nm else [0] * nl
    from tqdm.auto import tqdm

    if cfg.method == "fp16":
        for li, layer in enumerate(layers):
            for path, gname, lin in A.block_linears(layer, fam):
                w = lin.weight.data.float()
                w16 = w.half().float()
                lin.weight.data.copy_(w16)
                wn = w16.cpu().numpy()
                linears[f"blk.{li}.{gname}"] = wn
                d = float(((w - w16) ** 2).sum())
                records.append(LayerRecord(li, gname, tuple(w.shape), 0, 0, _rel(d, float((w ** 2).sum())), float("nan"),
                                           0.0, wn.size * 2, 16.0))
        return Compressed(model, fam, cfg, [], linears, nm_n, records, block_err, "none (fp16)", time.time() - t0)

    if windows is None:
        raise ExportError("a quantizing method needs calibration windows")
    solver = _solver()
    inps, kwargs = capture_block0_inputs(model, fam, windows, dev)
    done = 0
    if ckpt is not None and resume:
        nm_n = list(ckpt.meta["nm_n"])
        done = int(ckpt.meta["done"])
        for li in range(done):
            sbs = ckpt.load_block(li)
            for path, gname, lin in A.block_linears(layers[li], fam):
                sb = sbs.get(gname)
                if sb is None or (sb.n_out, sb.n_in) != tuple(lin.weight.shape) or sb.block_size != cfg.block_size:
                    raise ExportError(f"--resume: checkpoint block {li} lacks a matching {gname}")
                lin.weight.data.copy_(torch.from_numpy(fmt.dequantize_sb(sb)).to(lin.weight.device))
                linears[f"blk.{li}.{gname}"] = sb
        records = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in ckpt.meta["records"]]
        block_err = list(ckpt.meta["block_err"])
        if done:
            inps = ckpt.inputs().to(dev)
        log(f"resuming: {done} of {nl} blocks from {ckpt.folder}")
    elif cfg.use_coarse():
        cos_sum = []
        h = inps
        for layer in tqdm(layers, desc="coarse (FP pass)", disable=not cfg.progress, file=sys.stderr):
            o = run_block(layer, h, kwargs)
            s, cnt = C.token_cosine_sum(h, o)
            cos_sum.append(s / cnt)
            h = o
        del h
        wcount = [sum(lin.weight.numel() for _, _, lin in A.block_linears(layer, fam)) for layer in layers]
        nm_n = C.allocate(cos_sum, n_target, m, wcount)
        log("coarse stage: block cos " + " ".join(f"{c:.3f}" for c in cos_sum))
        log("coarse stage: N per block " + " ".join(map(str, nm_n)))
    if ckpt is not None and not resume:
        ckpt.start(windows, calibration, nm_n, nl)

    n_lin = len(fam.linears)
    bar = tqdm(total=nl * n_lin, initial=done * n_lin, desc="compress", unit="layer", disable=not cfg.progress,
               file=sys.stderr)
    for li, layer in enumerate(layers):
        if li < done:
            continue
        lins = A.block_linears(layer, fam)
        fp_out, accs, owner = _run_block_hessians(layer, lins, inps, kwargs, dev)
        n_l = nm_n[li] if cfg.nm else 8
        m_l = m if cfg.nm else 8
        scfg = solver.SolverConfig(method=cfg.method, n=n_l, m=m_l, block_size=cfg.block_size,
                                   percdamp=cfg.percdamp, arb_iters=cfg.arb_iters, steps=cfg.steps,
                                   score=cfg.score, salient=cfg.salient, residual=cfg.residual,
                                   compensate=cfg.compensate)
        for path, gname, lin in lins:
            bar.set_postfix_str(f"blk {li} {gname}")
            t1 = time.time()
            W = lin.weight.data.float().clone()
            res = solver.compress_layer(W, accs[owner[gname]].H, scfg)
            w_hat = res.w_hat.to(device=W.device, dtype=torch.float32)
            sb = fmt.pack_sb(res.terms, res.alpha, res.mu, cfg.block_size)
            if not np.array_equal(fmt.sb_value(res.terms, res.alpha, res.mu, cfg.block_size), w_hat.cpu().numpy()):
                raise RuntimeError(f"blk.{li}.{gname}: solver w_hat differs from sb_value of its own terms")
            lin.weight.data.copy_(w_hat)
            linears[f"blk.{li}.{gname}"] = sb
            records.append(LayerRecord(li, gname, tuple(W.shape), n_l, m_l, res.stats["err_w"],
                                       res.stats["err_out"], time.time() - t1, sb.nbytes(), fmt.param_bits(sb),
                                       dict(res.stats)))
            bar.update(1)
        del accs
        q_out = run_block(layer, inps, kwargs)
        block_err.append(block_error(q_out, fp_out))
        if ckpt is not None:
            ckpt.save_block(li, {g: linears[f"blk.{li}.{g}"] for _, g, _ in lins},
                            [dataclasses.asdict(r) for r in records[-len(lins):]], block_err[-1], q_out)
        inps = q_out
        del fp_out
    bar.close()
    if not cfg.nm:
        nm_n = [0] * nl
    return Compressed(model, fam, cfg, [], linears, nm_n, records, block_err, calibration, time.time() - t0)


def _embed_gtype(cfg: ExportConfig, n_embd: int) -> fmt.GGMLType:
    g = EMBED_TYPES[cfg.embed_type]
    if g in (fmt.GGMLType.Q8_0, fmt.GGMLType.Q4_0) and n_embd % fmt.Q8_0_BLOCK:
        return fmt.GGMLType.F16  # docs/format.md: the writer falls back to F16 when n_embd % 32 != 0
    return g


def embedding_tensors(model: Any, fam: A.Family, cfg: ExportConfig) -> list[tuple[str, torch.nn.Parameter]]:
    out = [("token_embd.weight", A.get_module(model, fam.embed).weight)]
    if fam.pos_embed:
        out.append(("position_embd.weight", A.get_module(model, fam.pos_embed).weight))
    if not A.is_tied(model, fam):
        out.append(("output.weight", A.get_module(model, fam.head).weight))
    return out


def quantize_embeddings_inplace(model: Any, fam: A.Family, cfg: ExportConfig) -> None:
    """Replace embeddings/head by the values the file holds (Q8_0/F16 round trip), so the fake-quant model
    matches the file exactly."""
    for name, p in embedding_tensors(model, fam, cfg):
        x = p.data.float().cpu().numpy()
        g = _embed_gtype(cfg, x.shape[-1])
        if g == fmt.GGMLType.Q8_0:
            y = fmt.dequantize_q8_0(fmt.quantize_q8_0(x), x.shape[-1])
        elif g == fmt.GGMLType.Q4_0:
            y = fmt.dequantize_q4_0(fmt.quantize_q4_0(x), x.shape[-1])
        elif g == fmt.GGMLType.F16:
            y = x.astype(np.float16).astype(np.float32)
        else:
            y = x
        p.data.copy_(torch.from_numpy(y).to(p.device))


def build_metadata(comp: Compressed, loaded: Any) -> list[tuple[str, Any, str]]:
    from . import tokmeta

    model, fam, cfg = comp.model, comp.family, comp.cfg
    n_vocab = A.get_module(model, fam.embed).weight.shape[0]
    nm = f"{cfg.nm[0]}:{cfg.nm[1]}" if cfg.nm else "dense"
    kv: list[tuple[str, Any, str]] = [("general.name", f"{loaded.name} {cfg.method} {nm}", "str")]
    kv += A.metadata(model.config, fam, n_vocab)
    kv += [(fmt.KEY_METHOD, cfg.method, "str"),
           (fmt.KEY_NM_M, cfg.nm[1] if cfg.nm else 0, "u32"),
           (fmt.KEY_NM_N, list(comp.nm_n), "arr_u32"),
           (fmt.KEY_BLOCK_SIZE, cfg.block_size, "u32"),
           (fmt.KEY_CALIBRATION, comp.calibration, "str")]
    kv += tokmeta.tokenizer_metadata(loaded.tokenizer, fam.arch, n_vocab, loaded.gguf_path, loaded.name)
    return kv


def write(comp: Compressed, loaded: Any, out: str | Path, force: bool = False) -> None:
    """Write the file (temp file + rename). Embeddings of comp.model are set to their stored values first."""
    model, fam, cfg = comp.model, comp.family, comp.cfg
    kv = build_metadata(comp, loaded)
    quantize_embeddings_inplace(model, fam, cfg)
    with fmt.ModelWriter(out, fam.arch, overwrite=force) as w:
        for k, v, t in kv:
            w.add_kv(k, v, t)
        for name, p in embedding_tensors(model, fam, cfg):
            x = p.data.float().cpu().numpy()
            w.add_dense(name, x, _embed_gtype(cfg, x.shape[-1]))
        fn = A.get_module(model, fam.final_norm)
        w.add_dense("output_norm.weight", fn.weight.data.float().cpu().numpy())
        if getattr(fn, "bias", None) is not None:
            w.add_dense("output_norm.bias", fn.bias.data.float().cpu().numpy())
        for li, layer in enumerate(A.blocks(model, fam)):
            for path, gname in fam.norms:
                nm_ = A.get_module(layer, path)
                w.add_dense(f"blk.{li}.{gname}.weight", nm_.weight.data.float().cpu().numpy())
                if getattr(nm_, "bias", None) is not None:
                    w.add_dense(f"blk.{li}.{gname}.bias", nm_.bias.data.float().cpu().numpy())
            for path, gname, lin in A.block_linears(layer, fam):
                pre = f"blk.{li}.{gname}"
                obj = comp.linears[pre]
                if isinstance(obj, fmt.SbLinear):
                    w.add_sb(pre, obj)
                else:
                    w.add_dense(pre + fmt.SUFFIX_WEIGHT, obj, fmt.GGMLType.F16)
                if lin.bias is not None:
                    w.add_dense(pre + fmt.SUFFIX_BIAS, lin.bias.data.float().cpu().numpy())


def file_stats(path: str | Path) -> dict[str, float]:
    """Sizes counted from the written file: linear bytes (planes+scales or dense weights, no biases) over the
    linear weight count, and the whole file's bytes over the same count."""
    import gguf

    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
    a = kv["general.architecture"]
    n_embd = int(kv[f"{a}.embedding_length"])
    lin_bytes = 0
    lin_weights = 0
    bits_kept = 0
    for t in r.tensors:
        if not t.name.startswith("blk."):
            continue
        if t.name.endswith((fmt.SUFFIX_PLANES, fmt.SUFFIX_ALPHA, fmt.SUFFIX_MU)):
            lin_bytes += int(t.n_bytes)
        if t.name.endswith(fmt.SUFFIX_PLANES):
            planes = np.asarray(t.data).view(np.uint8)
            # K is not stored with a linear: n_in is n_embd except for ffn_down and attn_output
            lin_weights += planes.shape[0] * _n_in(t.name, kv, a, n_embd)
            bits_kept += int(np.unpackbits(planes, bitorder="little").sum())
        elif t.name.endswith(fmt.SUFFIX_WEIGHT) and "norm" not in t.name:
            lin_bytes += int(t.n_bytes)
            lin_weights += int(np.prod([int(x) for x in t.shape]))
    size = Path(path).stat().st_size
    return {"file_bytes": size, "linear_bytes": lin_bytes, "linear_weights": lin_weights,
            "storage_bpw": 8.0 * lin_bytes / max(lin_weights, 1), "file_bpw": 8.0 * size / max(lin_weights, 1),
            "param_bits": bits_kept / max(lin_weights, 1) if bits_kept else float("nan")}


def _n_in(name: str, kv: dict[str, Any], a: str, n_embd: int) -> int:
    if ".ffn_down." in name:
        return int(kv[f"{a}.feed_forward_length"])
    if ".attn_output." in name:
        hd = int(kv.get(f"{a}.attention.key_length", n_embd // int(kv[f"{a}.attention.head_count"])))
        return hd * int(kv[f"{a}.attention.head_count"])
    return n_embd


def summary(comp: Compressed, stats: dict[str, float] | None) -> str:
    lines = [f"{'block':>5} {'layer':<12} {'shape':>12} {'N:M':>5} {'w-err':>9} {'out-err':>9} {'bpw':>6} {'time s':>7}"]
    for r in comp.records:
        nm = f"{r.n}:{r.m}" if r.m else "-"
        lines.append(f"{r.block:>5} {r.name:<12} {r.shape[0]:>5}x{r.shape[1]:<6} {nm:>5} {r.werr:>9.4f} "
                     f"{r.oerr:>9.4f} {8.0 * r.nbytes / (r.shape[0] * r.shape[1]):>6.3f} {r.seconds:>7.2f}")
    if comp.block_err:
        lines.append("block output rel. error: " + " ".join(f"{e:.3f}" for e in comp.block_err))
    lines.append(f"method {comp.cfg.method}, N per block {comp.nm_n}, calibration: {comp.calibration}")
    lines.append(f"compression time {comp.seconds:.1f} s")
    if stats:
        lines.append(f"file {stats['file_bytes']:,} bytes; linears {stats['linear_bytes']:,} bytes for "
                     f"{stats['linear_weights']:,} weights = storage {stats['storage_bpw']:.3f} bits/weight "
                     f"(whole file {stats['file_bpw']:.3f}); parameter bits {stats['param_bits']:.3f}")
    return "\n".join(lines)


def export(model_arg: str | None, out: str | Path, cfg: ExportConfig, force: bool = False,
           loaded: Any = None, resume: bool = False) -> tuple[Compressed, dict[str, float]]:
    """Load, calibrate, compress, write. Returns the compressed state (its model is the fake-quant model
    matching the file) and the file statistics.

    With cfg.checkpoint set, every finished block is checkpointed there (removed once the file is written);
    resume=True continues from that checkpoint and gives the same bytes as an uninterrupted export."""
    from . import calib, models
    from . import checkpoint as CK

    cfg.validate()
    check_out(out, force)
    ck, fresh_ck = None, False
    if resume:
        if not cfg.checkpoint:
            raise ExportError("--resume needs a checkpoint folder (it cannot be combined with --no-checkpoint)")
        ck = CK.Checkpoint.open(cfg.checkpoint)
    elif cfg.checkpoint and cfg.method != "fp16":
        if (Path(cfg.checkpoint) / "meta.json").exists() and not force:
            raise ExportError(f"{cfg.checkpoint}: an interrupted export left a checkpoint there; pass --resume "
                              "to continue it, or --force to start over")
        fresh_ck = True  # made once the fingerprint (which needs the weights and windows) is known
    if loaded is None:
        A.family_of(models.load_config(model_arg))  # refuse unsupported architectures before loading weights
        loaded = models.load(model_arg)
    fam = A.family_of(loaded.model.config)
    set_determinism(cfg.seed)
    windows, desc = None, "none"
    if ck is not None and resume:
        windows, desc = ck.windows(), ck.meta["calibration"]
        ck.check(CK.fingerprint(cfg, loaded.model, windows), len(A.blocks(loaded.model, fam)))
    elif cfg.method != "fp16":
        t = time.time()
        windows, desc = calib.get_windows(cfg.calib, loaded.model, loaded.tokenizer, cfg.nsamples, cfg.seqlen,
                                          cfg.seed, cfg.progress)
        log(f"calibration: {desc} ({time.time() - t:.1f} s)")
    if fresh_ck:
        ck = CK.Checkpoint(cfg.checkpoint, CK.fingerprint(cfg, loaded.model, windows))
    comp = compress(loaded, cfg, windows, desc, ck, resume)
    write(comp, loaded, out, force)
    if ck is not None:
        ck.remove()
    stats = file_stats(out)
    return comp, stats


def check_out(out: str | Path, force: bool) -> None:
    """Fail early (before any work) on an --out that cannot be written."""
    p = Path(out)
    if p.is_dir():
        raise ExportError(f"--out {p}: is a folder")
    if p.exists() and not force:
        raise ExportError(f"--out {p}: exists (use --force to overwrite)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"--out {p}: folder {parent} does not exist")
    import os

    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--out {p}: folder {parent} is not writable")

"""The export driver: layer-wise streaming compression in the GPTQ frame, and the orchestration of one export.

compress(): embeddings -> block-0 inputs of every calibration window; then per block: hooks on its linears
accumulate the Hessians, each linear is compressed by solver.compress_layer and its weight replaced by w_hat,
and the block is re-run with the compressed weights to give the next block's inputs. Only one block's
activations (inputs + outputs of all windows) are held at a time.

export(): load, calibrate, compress, then write (exporter/writer.py) — everything is compressed first and
written last, so an interrupted export leaves no file.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pbs2p import format as fmt

from . import arch, coarse, planner, solver, writer
from .config import ExportError, QuantConfig


@dataclass
class LayerRecord:
    block: int
    name: str  # GGUF name, e.g. attn_q
    shape: tuple[int, int]
    n: int
    m: int
    err_w: float    # ‖W − Ŵ‖² / ‖W‖²
    err_out: float  # tr(E H Eᵀ) / tr(W H Wᵀ), E = W − Ŵ: relative output error on the calibration inputs
    seconds: float
    nbytes: int  # bytes the file spends on the weight (planes + scales, or the dense tensor)
    param_bits: float
    stats: dict = field(default_factory=dict)
    code: str = ""  # method plan: the planned code (planner.CODES)


@dataclass
class Result:
    """A compressed model, in memory: `model` holds the fake-quant weights (Ŵ, equal to what the file will hold),
    `records` one LayerRecord per linear, `linears` what the file stores for each (SbLinear, QLinear of a planned
    export, or the F16 weight of an fp16 export). `save(path)` writes the file."""

    loaded: Any  # models.Loaded: the model, its tokenizer, where it came from
    family: arch.Family
    cfg: QuantConfig
    linears: dict[str, Any]  # GGUF prefix -> SbLinear or float32 ndarray (fp16 method)
    nm_n: list[int]
    records: list[LayerRecord]
    block_err: list[float]  # relative block-output error (compressed vs FP block on the same inputs)
    calibration: str
    seconds: float
    checkpoint: Any = None  # the export's checkpoint.Checkpoint, removed once the file is saved
    plan: Any = None  # method plan: the planner.Plan the linears were compressed by

    @property
    def model(self) -> Any:
        return self.loaded.model

    def save(self, path: str | os.PathLike[str], force: bool = False, format: str = "pbs2p",
             **options: Any) -> dict[str, Any]:
        """Write the result (temporary name + rename; an existing path needs force) and return its counts.

        format "pbs2p": the pbs2p file; returns ModelFile.storage (bytes and bits per weight counted from the file).
        format "hf": a transformers folder holding the weights that file would hold (exporter/hf_export.py); the
        pbs2p file is written to a temporary folder first and read back; returns the folder's provenance record
        (the file's storage counts included).
        format "gguf-llama": a GGUF stock llama.cpp runs, built the same way from the pbs2p file
        (exporter/gguf_llama.py); returns its record (codes, re-encoding loss) with the pbs2p file's counts.
        format "onnx": an onnxruntime graph built the same way (exporter/onnx_export.py); returns its record
        with the pbs2p file's counts. options: the format's own (FORMAT_OPTIONS: gguf-llama ternary="tq2_0" |
        "tq1_0", onnx accuracy_level=0 | 4)."""
        check_format(format, options)
        if format in ("hf", "gguf-llama", "onnx"):  # built from the pbs2p file, written to a temporary folder first
            import tempfile

            from . import gguf_llama, hf_export, onnx_export

            if format == "onnx":
                onnx_export.check_onnx(runtime=False)

            check_out(path, force, folder=format == "hf")
            with tempfile.TemporaryDirectory() as d:
                f = Path(d) / "model.pbs2p"
                writer.write(self, f, False)
                if format == "hf":
                    record = hf_export.save_hf(f, path, tokenizer=self.loaded.tokenizer, force=force)
                elif format == "onnx":
                    record = {**fmt.ModelFile(f).storage(),
                              "onnx": onnx_export.save_onnx(f, path, force=force, tokenizer=self.loaded.tokenizer,
                                                            **options)}
                else:
                    record = {**fmt.ModelFile(f).storage(),
                              "gguf_llama": gguf_llama.save_gguf_llama(f, path, force=force, **options)}
        else:
            writer.write(self, path, force)
            record = fmt.ModelFile(path).storage()
        if self.checkpoint is not None:
            self.checkpoint.remove()
            self.checkpoint = None
        return record


# what Result.save writes: the pbs2p file, a transformers folder of its weights, a stock llama.cpp GGUF, an ONNX graph
OUT_FORMATS = ("pbs2p", "hf", "gguf-llama", "onnx")
FORMAT_OPTIONS = {"pbs2p": (), "hf": (), "gguf-llama": ("ternary",), "onnx": ("accuracy_level",)}


def check_format(format: str, options: dict[str, Any]) -> None:
    """An unknown format, or an option the format does not take: ExportError (before any work)."""
    if format not in OUT_FORMATS:
        raise ExportError(f"--format {format!r}: choose one of {', '.join(OUT_FORMATS)}")
    bad = sorted(set(options) - set(FORMAT_OPTIONS[format]))
    if bad:
        raise ExportError(f"--format {format} takes no option {', '.join(bad)} "
                          f"(its options: {', '.join(FORMAT_OPTIONS[format]) or 'none'})")


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
def capture_block0_inputs(model: Any, fam: arch.Family, windows: torch.Tensor, dev: torch.device
                          ) -> tuple[torch.Tensor, dict[str, Any]]:
    layers = arch.blocks(model, fam)
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


@torch.no_grad()
def compress(loaded: Any, cfg: QuantConfig, windows: torch.Tensor | None, calibration: str,
             ckpt: Any = None, resume: bool = False) -> Result:
    """Compress every linear of loaded.model in place (fake-quant weights) and collect the file's contents.

    ckpt: a checkpoint.Checkpoint; with resume=False it is started fresh and each finished block is saved to it,
    with resume=True (already opened and checked) its finished blocks are taken as they are and the rest run."""
    t0 = time.time()
    set_determinism(cfg.seed)
    model = loaded.model
    fam = arch.family_of(model.config)
    dev = pick_device(cfg.device)
    model.to(dev)
    layers = arch.blocks(model, fam)
    nl = len(layers)
    m = cfg.nm[1] if cfg.nm else 0
    n_target = cfg.nm[0] if cfg.nm else 0
    for li, layer in enumerate(layers):
        for path, gname, lin in arch.block_linears(layer, fam):
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
            for path, gname, lin in arch.block_linears(layer, fam):
                w = lin.weight.data.float()
                w16 = w.half().float()
                lin.weight.data.copy_(w16)
                wn = w16.cpu().numpy()
                linears[f"blk.{li}.{gname}"] = wn
                d = float(((w - w16) ** 2).sum())
                records.append(LayerRecord(li, gname, tuple(w.shape), 0, 0, _rel(d, float((w ** 2).sum())), float("nan"),
                                           0.0, wn.size * 2, 16.0))
        return Result(loaded, fam, cfg, linears, nm_n, records, block_err, "none (fp16)", time.time() - t0)

    if windows is None:
        raise ExportError("a quantizing method needs calibration windows")
    plan = None
    if cfg.method == "plan":
        if ckpt is not None and resume and ckpt.meta.get("plan"):
            plan = planner.Plan.from_json(ckpt.meta["plan"])
        else:
            t1 = time.time()
            plan = planner.make_plan(model, fam, windows, cfg, dev)
            log(plan.table(per_layer=False))
            log(f"plan: measured in {time.time() - t1:.1f} s")
    inps, kwargs = capture_block0_inputs(model, fam, windows, dev)
    done = 0
    if ckpt is not None and resume:
        nm_n = list(ckpt.meta["nm_n"])
        done = int(ckpt.meta["done"])
        for li in range(done):
            sbs = ckpt.load_block(li)
            for path, gname, lin in arch.block_linears(layers[li], fam):
                sb = sbs.get(gname)
                if sb is None or (sb.n_out, sb.n_in) != tuple(lin.weight.shape) or \
                        (isinstance(sb, fmt.SbLinear) and sb.block_size != cfg.block_size):
                    raise ExportError(f"--resume: checkpoint block {li} lacks a matching {gname}")
                w_hat = sb.dequantize()
                lin.weight.data.copy_(torch.from_numpy(w_hat).to(lin.weight.device))
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
            s, cnt = coarse.token_cosine_sum(h, o)
            cos_sum.append(s / cnt)
            h = o
        del h
        wcount = [sum(lin.weight.numel() for _, _, lin in arch.block_linears(layer, fam)) for layer in layers]
        nm_n = coarse.allocate(cos_sum, n_target, m, wcount)
        log("coarse stage: block cos " + " ".join(f"{c:.3f}" for c in cos_sum))
        log("coarse stage: N per block " + " ".join(map(str, nm_n)))
    if ckpt is not None and not resume:
        ckpt.start(windows, calibration, nm_n, nl, plan.to_json() if plan else None)

    n_lin = len(fam.linears)
    bar = tqdm(total=nl * n_lin, initial=done * n_lin, desc="compress", unit="layer", disable=not cfg.progress,
               file=sys.stderr)
    for li, layer in enumerate(layers):
        if li < done:
            continue
        lins = arch.block_linears(layer, fam)
        fp_out, accs, owner = _run_block_hessians(layer, lins, inps, kwargs, dev)
        scfg = cfg.layer_solver(nm_n[li])
        hinvs: dict[Any, solver.Hinv] = {}  # one factorisation per input: q/k/v (and gate/up) share their H
        for path, gname, lin in lins:
            bar.set_postfix_str(f"blk {li} {gname}")
            t1 = time.time()
            W = lin.weight.data.float().clone()
            pre = f"blk.{li}.{gname}"
            code = plan.code(pre) if plan else ""
            H = accs[owner[gname]].H
            if scfg.method != "sign" and owner[gname] not in hinvs:
                hinvs[owner[gname]] = solver.prepare_hinv(H, scfg.percdamp, W.device)
            obj, w_hat, stats = planner.solve(code, W, H, scfg, hinvs.get(owner[gname]))
            w_hat = w_hat.to(device=W.device, dtype=torch.float32)
            back = obj.dequantize()
            if not np.array_equal(back, w_hat.cpu().numpy()):  # the packed bytes hold exactly Ŵ
                raise RuntimeError(f"{pre}: the packed layer does not dequantize to the solver's w_hat")
            lin.weight.data.copy_(w_hat)
            linears[pre] = obj
            sc = planner.code_solver(code, scfg) if code else scfg
            n, m = (sc.n, sc.m) if sc else (0, 0)
            pbits = fmt.param_bits(obj) if isinstance(obj, fmt.SbLinear) else stats["param_bits"]
            records.append(LayerRecord(li, gname, tuple(W.shape), n, m, stats["err_w"], stats["err_out"],
                                       time.time() - t1, obj.nbytes(), pbits, dict(stats), code))
            bar.update(1)
        del accs, hinvs
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
    return Result(loaded, fam, cfg, linears, nm_n, records, block_err, calibration, time.time() - t0, ckpt, plan)


def _open_checkpoint(cfg: QuantConfig, resume: bool, force: bool) -> tuple[Any, bool]:
    """(the checkpoint to resume, or None; whether to start a fresh one once its fingerprint is known)."""
    from . import checkpoint

    if resume:
        if not cfg.checkpoint:
            raise ExportError("--resume needs a checkpoint folder (it cannot be combined with --no-checkpoint)")
        return checkpoint.Checkpoint.open(cfg.checkpoint), False
    if cfg.checkpoint and cfg.method != "fp16":
        if (Path(cfg.checkpoint) / "meta.json").exists() and not force:
            raise ExportError(f"{cfg.checkpoint}: an interrupted export left a checkpoint there; pass --resume "
                              "to continue it, or --force to start over")
        return None, True
    return None, False


def load_model(model: Any, tokenizer: Any = None) -> Any:
    """models.Loaded from a path / hub id / None (the default model), a Loaded, or a transformers model object
    (then `tokenizer` is required: the file carries the tokenizer)."""
    from . import models

    if isinstance(model, models.Loaded):
        return model
    if model is None or isinstance(model, (str, os.PathLike)):
        model = None if model is None else os.fspath(model)
        arch.family_of(models.load_config(model))  # refuse unsupported architectures before loading weights
        return models.load(model)
    if tokenizer is None:
        raise ExportError("quantize(model object): pass tokenizer= as well (the file carries the tokenizer)")
    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    return models.Loaded(model.float().eval(), tokenizer, name, None, Path(name).name)


def resolve_max_bytes(cfg: QuantConfig, loaded: Any, fam: arch.Family, calibration: str,
                      shapes: dict[str, tuple[int, int]], quiet: bool = False) -> QuantConfig:
    """--max-bytes N: the same config with the linears' budget in bits per weight, what N leaves beside an upper
    bound of the rest of the file (writer.rest_bytes), so the file holds at most N bytes; other configs as they are."""
    if cfg.max_bytes is None:
        return cfg
    rest = writer.rest_bytes(loaded, fam, cfg, calibration)
    weights = sum(r * k for r, k in shapes.values())
    if cfg.max_bytes <= rest:
        raise ExportError(f"--max-bytes {cfg.max_bytes:,}: the file's embeddings, norms, tokenizer and metadata take "
                          f"up to {rest:,} bytes, which leaves the linears nothing")
    bpw = math.floor(8e6 * (cfg.max_bytes - rest) / weights) / 1e6
    if not quiet:
        log(f"--max-bytes {cfg.max_bytes:,}: the rest of the file takes at most {rest:,} bytes; the linears get "
            f"{bpw:.6f} bits per weight")
    out = dataclasses.replace(cfg, bpw=bpw, max_bytes=None)
    out.plan_shapes_check(shapes)
    return out


def quantize(model: Any = None, config: QuantConfig | None = None, calib: str | torch.Tensor | None = None, *,
             tokenizer: Any = None, resume: bool = False, force: bool = False, out_format: str = "pbs2p") -> Result:
    """Compress a causal LM (PBS²P or a baseline, `config.method`) and return the Result; `.save(path)` writes it.

    model: an HF folder, a .gguf file, a hub id, None (the default SmolLM2-135M-Instruct), or a transformers
    model object with `tokenizer=`. calib: a calibration spec (self | FILE.txt | FILE.jsonl | hf:NAME; default
    config.calib) or a LongTensor (nsamples, seqlen) of token windows. With config.checkpoint set, each finished
    block is checkpointed there; resume=True continues from it (same bytes as an uninterrupted export), and
    force=True starts over where an interrupted export left one. The model is compressed in place. out_format: the
    format the result will be saved in, to refuse a family it cannot hold before any work."""
    from . import calib as calibration
    from . import checkpoint

    cfg = config if config is not None else QuantConfig()
    ck, fresh_ck = _open_checkpoint(cfg, resume, force)
    loaded = load_model(model, tokenizer)
    fam = arch.family_of(loaded.model.config)
    if cfg.tie_head:
        try:
            rel = arch.tie_head(loaded.model, fam)
        except ValueError as e:
            raise ExportError(f"--tie-head: {e}") from None
        log("--tie-head: the model's head and token table are one tensor already" if rel is None else
            f"--tie-head: one matrix for the head and the token table, the head's values (they differed by "
            f"{100 * rel:.2f}%)")
    if out_format == "gguf-llama":
        from .gguf_llama import check_family

        check_family(fam.name)
    elif out_format == "onnx":
        from .onnx_export import check_onnx

        check_onnx(runtime=False)
    shapes = {f"blk.{li}.{g}": tuple(lin.weight.shape) for li, layer in enumerate(arch.blocks(loaded.model, fam))
              for _, g, lin in arch.block_linears(layer, fam)}
    if cfg.max_bytes is None:
        cfg.plan_shapes_check(shapes)
    else:  # checked with an empty calibration description before any work, set once the description is known
        resolve_max_bytes(cfg, loaded, fam, "", shapes, quiet=True)
    budget = cfg
    set_determinism(cfg.seed)
    windows, desc = None, "none"
    if ck is not None:
        windows, desc = ck.windows(), ck.meta["calibration"]
        cfg = resolve_max_bytes(budget, loaded, fam, desc, shapes)
        ck.check(checkpoint.fingerprint(cfg, loaded.model, windows), len(arch.blocks(loaded.model, fam)))
    elif cfg.method != "fp16":
        t = time.time()
        if isinstance(calib, torch.Tensor):
            windows = calib.to(torch.int64)
            if windows.ndim != 2 or windows.shape[1] < 2:
                raise ExportError(f"calib windows: need a (nsamples, seqlen >= 2) tensor, got {tuple(windows.shape)}")
            desc = f"given windows: {windows.shape[0]} x {windows.shape[1]} tokens"
        else:
            windows, desc = calibration.get_windows(calib or cfg.calib, loaded.model, loaded.tokenizer,
                                                    cfg.nsamples, cfg.seqlen, cfg.seed, cfg.progress)
        log(f"calibration: {desc} ({time.time() - t:.1f} s)")
        cfg = resolve_max_bytes(budget, loaded, fam, desc, shapes)
    if fresh_ck:
        ck = checkpoint.Checkpoint(cfg.checkpoint, checkpoint.fingerprint(cfg, loaded.model, windows))
    return compress(loaded, cfg, windows, desc, ck, resume)


def export(model: Any, out: str | Path, cfg: QuantConfig, force: bool = False, resume: bool = False,
           format: str = "pbs2p", **options: Any) -> tuple[Result, dict[str, Any]]:
    """quantize() then save(out, format=, **options): what pbs2p-export runs. Checks `out` before any work."""
    check_format(format, options)
    check_out(out, force, folder=format == "hf")
    result = quantize(model, cfg, resume=resume, force=force, out_format=format)
    return result, result.save(out, force, format=format, **options)


def check_out(out: str | Path, force: bool, folder: bool = False) -> None:
    """Fail early (before any work) on an --out that cannot be written: a file, or a folder (--format hf)."""
    p = Path(out)
    if folder and p.exists() and not p.is_dir():
        raise ExportError(f"--out {p}: exists and is not a folder (--format hf writes a folder)")
    if not folder and p.is_dir():
        raise ExportError(f"--out {p}: is a folder")
    if p.exists() and not force:
        raise ExportError(f"--out {p}: exists (use --force to overwrite)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"--out {p}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--out {p}: folder {parent} is not writable")

"""Writing an export: the file's metadata, embeddings at their stored type, every tensor through
pbs2p.format.ModelWriter (temporary file + rename), and the summary printed after an export."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from pbs2p import format as fmt

from . import arch, tokmeta
from .config import EMBED_TYPES, QuantConfig


def _embed_gtype(cfg: QuantConfig, n_embd: int) -> fmt.GGMLType:
    g = EMBED_TYPES[cfg.embed_type]
    if g in (fmt.GGMLType.Q8_0, fmt.GGMLType.Q4_0) and n_embd % fmt.Q8_0_BLOCK:
        return fmt.GGMLType.F16  # docs/format.md: the writer falls back to F16 when n_embd % 32 != 0
    return g


def embedding_tensors(model: Any, fam: arch.Family, cfg: QuantConfig) -> list[tuple[str, torch.nn.Parameter]]:
    out = [("token_embd.weight", arch.get_module(model, fam.embed).weight)]
    if fam.pos_embed:
        out.append(("position_embd.weight", arch.get_module(model, fam.pos_embed).weight))
    if not arch.is_tied(model, fam):
        out.append(("output.weight", arch.get_module(model, fam.head).weight))
    return out


def quantize_embeddings_inplace(model: Any, fam: arch.Family, cfg: QuantConfig) -> None:
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


def build_metadata(comp: Any) -> list[tuple[str, Any, str]]:
    """The file's keys (docs/format.md, \"Metadata\") for a driver.Result."""
    loaded, model, fam, cfg = comp.loaded, comp.model, comp.family, comp.cfg
    n_vocab = arch.get_module(model, fam.embed).weight.shape[0]
    nm = f"{cfg.nm[0]}:{cfg.nm[1]}" if cfg.nm else f"{cfg.bpw:g} bpw" if cfg.method == "plan" else "dense"
    kv: list[tuple[str, Any, str]] = [("general.name", f"{loaded.name} {cfg.method} {nm}", "str")]
    kv += arch.metadata(model.config, fam, n_vocab)
    kv += [(fmt.KEY_METHOD, cfg.method, "str"),
           (fmt.KEY_NM_M, cfg.nm[1] if cfg.nm else 0, "u32"),
           (fmt.KEY_NM_N, list(comp.nm_n), "arr_u32"),
           (fmt.KEY_BLOCK_SIZE, cfg.block_size, "u32"),
           (fmt.KEY_CALIBRATION, comp.calibration, "str")]
    if getattr(comp, "plan", None) is not None:
        kv.append((fmt.KEY_PLAN, comp.plan.to_json(), "str"))
    kv += tokmeta.tokenizer_metadata(loaded.tokenizer, fam.name, n_vocab, loaded.gguf_path, loaded.name)
    return kv


def file_tensors(model: Any, fam: arch.Family, cfg: QuantConfig) -> Iterator[tuple[str, str, Any, Any]]:
    """The file's tensors in file order: ("dense", name, parameter, ggml type) for embeddings, norms and biases,
    ("linear", prefix, the nn.Linear, None) where a linear's tensors go."""
    for name, p in embedding_tensors(model, fam, cfg):
        yield "dense", name, p, _embed_gtype(cfg, p.shape[-1])
    fn = arch.get_module(model, fam.final_norm)
    yield "dense", "output_norm.weight", fn.weight, fmt.GGMLType.F32
    if getattr(fn, "bias", None) is not None:
        yield "dense", "output_norm.bias", fn.bias, fmt.GGMLType.F32
    for li, layer in enumerate(arch.blocks(model, fam)):
        for path, gname in fam.norms:
            nm_ = arch.get_module(layer, path)
            yield "dense", f"blk.{li}.{gname}.weight", nm_.weight, fmt.GGMLType.F32
            if getattr(nm_, "bias", None) is not None:
                yield "dense", f"blk.{li}.{gname}.bias", nm_.bias, fmt.GGMLType.F32
        for path, gname, lin in arch.block_linears(layer, fam):
            pre = f"blk.{li}.{gname}"
            yield "linear", pre, lin, None
            if lin.bias is not None:
                yield "dense", pre + fmt.SUFFIX_BIAS, lin.bias, fmt.GGMLType.F32


def write(comp: Any, out: str | Path, force: bool = False) -> None:
    """Write a driver.Result's file (temp file + rename). Embeddings of comp.model are set to their stored values
    first, so the fake-quant model equals the file."""
    model, fam, cfg = comp.model, comp.family, comp.cfg
    kv = build_metadata(comp)
    quantize_embeddings_inplace(model, fam, cfg)
    with fmt.ModelWriter(out, fam.name, overwrite=force) as w:
        for k, v, t in kv:
            w.add_kv(k, v, t)
        for kind, name, p, gtype in file_tensors(model, fam, cfg):
            if kind == "dense":
                w.add_dense(name, p.data.float().cpu().numpy(), gtype)
                continue
            obj = comp.linears[name]
            if isinstance(obj, fmt.SbLinear):
                w.add_sb(name, obj)
            elif isinstance(obj, fmt.QLinear):
                w.add_q(name, obj)
            else:
                w.add_dense(name + fmt.SUFFIX_WEIGHT, obj, fmt.GGMLType.F16)


# --max-bytes: what the plan key can hold at most per linear (the longest code, 16-digit byte and weight counts,
# the longest float repr) and what a linear's tensors add beside their data (up to three tensors of up to three
# dimensions under the longest suffix, each padded to the alignment)
_LONGEST_SUFFIX = max((fmt.SUFFIX_PLANES, fmt.SUFFIX_Q3, fmt.SUFFIX_WEIGHT, fmt.nm_suffix(8, 8)), key=len)
_WIDE_INT, _WIDE_FLOAT, _WIDE_POS = 10 ** 15, -1.2345678901234567e-300, 1.2345678901234567e+300


def rest_bytes(loaded: Any, fam: arch.Family, cfg: QuantConfig, calibration: str) -> int:
    """An upper bound of the bytes a planned export's file spends on everything but its linears' tensor data
    (header, keys with the plan and tokenizer, embeddings, norms, biases, tensor infos, padding): a file whose
    linears hold B bytes of data is at most rest_bytes + B. Counted by fmt.layout_bytes, with the plan and the
    general.name at their longest."""
    model = loaded.model
    tensors, linears = [], []
    for kind, name, p, gtype in file_tensors(model, fam, cfg):
        if kind == "linear":
            linears.append(name)
            tensors += [(name + suf, 3, 0) for suf in (_LONGEST_SUFFIX, fmt.SUFFIX_ALPHA, fmt.SUFFIX_MU)]
            continue
        shape = tuple(p.shape)
        n = int(np.prod(shape))
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(gtype))]
        tensors.append((name, len(shape), n // block * size))
    longest = max(cfg.codes, key=len)
    plan = fmt.Plan(_WIDE_POS, cfg.sensitivity, tuple(cfg.codes),
                    [fmt.PlanEntry(pre, longest, _WIDE_INT, _WIDE_FLOAT, _WIDE_INT) for pre in linears])
    comp = SimpleNamespace(loaded=loaded, model=model, family=fam,
                           cfg=dataclasses.replace(cfg, bpw=_WIDE_POS, max_bytes=None),
                           nm_n=[0] * len(arch.blocks(model, fam)), calibration=calibration, plan=plan)
    kv = build_metadata(comp)
    return fmt.layout_bytes(fam.name, kv, tensors) + 3 * (fmt.ALIGNMENT - 1) * len(linears)


def summary(comp: Any, stats: dict[str, float] | None) -> str:
    lines = [f"{'block':>5} {'layer':<12} {'shape':>12} {'code':>9} {'w-err':>9} {'out-err':>9} {'bpw':>6} {'time s':>7}"]
    for r in comp.records:
        code = r.code or (f"{r.n}:{r.m}" if r.m else "-")
        lines.append(f"{r.block:>5} {r.name:<12} {r.shape[0]:>5}x{r.shape[1]:<6} {code:>9} {r.err_w:>9.4f} "
                     f"{r.err_out:>9.4f} {8.0 * r.nbytes / (r.shape[0] * r.shape[1]):>6.3f} {r.seconds:>7.2f}")
    if comp.block_err:
        lines.append("block output rel. error: " + " ".join(f"{e:.3f}" for e in comp.block_err))
    if getattr(comp, "plan", None) is not None:
        lines.append(comp.plan.table(per_layer=False))
        lines.append(f"method plan, calibration: {comp.calibration}")
    else:
        lines.append(f"method {comp.cfg.method}, N per block {comp.nm_n}, calibration: {comp.calibration}")
    lines.append(f"compression time {comp.seconds:.1f} s")
    if stats:
        lines.append(f"file {stats['file_bytes']:,} bytes; linears {stats['linear_bytes']:,} bytes for "
                     f"{stats['linear_weights']:,} weights = storage {stats['storage_bpw']:.3f} bits/weight "
                     f"(whole file {stats['file_bpw']:.3f}); parameter bits {stats['param_bits']:.3f}")
    return "\n".join(lines)



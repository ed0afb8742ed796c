"""The PyTorch fake-quant reference of a pbs2p file: the HF model with every weight replaced by exactly the value
the file stands for (sparse-binary linears via format.sb_value, Q8_0/F16 embeddings dequantized), optionally with
the runtime's int8 activation quantization on the input of every sparse-binary linear (`act_quant=True`).

This is what the C runtime is compared against.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pbs2p import format as fmt

from . import arch as A


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (torch.round is half-to-even)."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def quantize_act(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """format.quantize_act in torch, returned dequantized (q·s): per token (last axis), per column block of
    block_size, float32: amax_b, q = roundf(x·(127/amax_b)) clamped to ±127, s_b = amax_b/127; a block whose
    amax is 0 (or not finite) quantizes to 0."""
    x = x.float()
    k = x.shape[-1]
    nb = fmt.n_blocks(k, block_size)
    pad = nb * block_size - k
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    xb = xp.reshape(*x.shape[:-1], nb, block_size)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    ok = torch.isfinite(amax) & (amax > 0)
    inv = torch.where(ok, torch.tensor(127.0, dtype=torch.float32, device=x.device) / torch.where(ok, amax, 1.0),
                      torch.zeros((), dtype=torch.float32, device=x.device))
    q = torch.clamp(round_half_away(xb * inv), -127, 127)
    q = torch.where(ok, q, torch.zeros((), dtype=torch.float32, device=x.device))
    s = torch.where(ok, amax / 127.0, torch.zeros((), dtype=torch.float32, device=x.device))
    return (q * s).reshape(xp.shape)[..., :k]


class ActQuantLinear(torch.nn.Module):
    """A linear whose input is quantized like the runtime's sparse-binary kernels quantize it."""

    def __init__(self, inner: torch.nn.Linear, block_size: int) -> None:
        super().__init__()
        self.inner = inner
        self.block_size = block_size

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.inner.weight

    @property
    def bias(self) -> torch.nn.Parameter | None:
        return self.inner.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(quantize_act(x, self.block_size))


def _set_child(root: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = A.get_module(root, parent_path) if parent_path else root
    setattr(parent, leaf, new)


def enable_act_quant(model: Any, block_size: int, only: set[str] | None = None) -> Any:
    """Wrap the linears of every block (or only the GGUF prefixes in `only`, e.g. the sparse-binary ones)."""
    fam = A.family_of(model.config)
    for li, layer in enumerate(A.blocks(model, fam)):
        for path, gname, lin in A.block_linears(layer, fam):
            if isinstance(lin, ActQuantLinear):
                continue
            if only is None or f"blk.{li}.{gname}" in only:
                _set_child(layer, path, ActQuantLinear(lin, block_size))
    return model


def from_export(comp: Any, act_quant: bool = False) -> Any:
    """The fake-quant model an export produced (pipeline.Compressed after pipeline.write): its weights already
    equal the file's values."""
    model = comp.model
    if act_quant:
        sb = {k for k, v in comp.linears.items() if isinstance(v, fmt.SbLinear)}
        enable_act_quant(model, comp.cfg.block_size, sb)
    return model


def _dense(t: Any) -> np.ndarray:
    """A dense GGUF tensor (F32, F16, Q8_0, Q4_0) as float32, numpy shape (outer..., ne0)."""
    import gguf

    data = np.asarray(t.data)
    shape = [int(x) for x in reversed(t.shape)]  # GGUF ne order -> numpy order
    if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
        return fmt.dequantize_q8_0(data.view(np.uint8).reshape(-1), shape[-1]).reshape(shape)
    if t.tensor_type == gguf.GGMLQuantizationType.Q4_0:
        return fmt.dequantize_q4_0(data.view(np.uint8).reshape(-1), shape[-1]).reshape(shape)
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return data.astype(np.float32).reshape(shape)
    raise ValueError(f"tensor {t.name}: type {t.tensor_type!r} is not a pbs2p dense type")


def read_file_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """-> (metadata without tokenizer arrays, dense tensors as float32, sparse-binary linears by prefix)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items()
          if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                       "tokenizer.ggml.token_type")}
    a = kv["general.architecture"]
    bs = int(kv.get(fmt.KEY_BLOCK_SIZE, fmt.DEFAULT_BLOCK_SIZE))
    n_embd = int(kv[f"{a}.embedding_length"])
    from .pipeline import _n_in

    dense: dict[str, np.ndarray] = {}
    sbs: dict[str, Any] = {}
    for t in r.tensors:
        if t.name.endswith(fmt.SUFFIX_PLANES):
            pre = t.name[: -len(fmt.SUFFIX_PLANES)]
            sbs[pre] = fmt.read_sb(r, pre, _n_in(t.name, kv, a, n_embd), bs)
        elif t.name.endswith((fmt.SUFFIX_ALPHA, fmt.SUFFIX_MU)):
            continue
        else:
            dense[t.name] = _dense(t)
    return kv, dense, sbs


def load_fakequant(path: str | Path, act_quant: bool = False, device: str = "cpu") -> Any:
    """Rebuild the HF model a pbs2p file describes, with the file's exact weights (float32)."""
    import transformers

    kv, dense, sbs = read_file_weights(path)
    a = kv["general.architecture"]
    if a not in A.FAMILY_BY_ARCH:
        raise A.UnsupportedModelError(f"{path}: architecture {a!r}; supported: llama, qwen2, opt")
    fam = A.FAMILY_BY_ARCH[a]
    tied = "output.weight" not in dense
    if fam is A.OPT:
        kv = dict(kv)
        kv[f"{a}.context_length"] = dense["position_embd.weight"].shape[0] - fam.pos_offset
    cfg = A.config_from_metadata(kv, tied)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()

    def put(p: torch.Tensor, x: np.ndarray, name: str) -> None:
        if tuple(p.shape) != tuple(x.shape):
            raise ValueError(f"{path}: {name} has shape {x.shape}, the model expects {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(torch.from_numpy(np.ascontiguousarray(x)))

    put(A.get_module(model, fam.embed).weight, dense["token_embd.weight"], "token_embd.weight")
    if fam.pos_embed:
        put(A.get_module(model, fam.pos_embed).weight, dense["position_embd.weight"], "position_embd.weight")
    if not tied:
        put(A.get_module(model, fam.head).weight, dense["output.weight"], "output.weight")
    fn = A.get_module(model, fam.final_norm)
    put(fn.weight, dense["output_norm.weight"], "output_norm.weight")
    if getattr(fn, "bias", None) is not None:
        put(fn.bias, dense["output_norm.bias"], "output_norm.bias")
    for li, layer in enumerate(A.blocks(model, fam)):
        for p_, g in fam.norms:
            nm = A.get_module(layer, p_)
            put(nm.weight, dense[f"blk.{li}.{g}.weight"], f"blk.{li}.{g}.weight")
            if getattr(nm, "bias", None) is not None:
                put(nm.bias, dense[f"blk.{li}.{g}.bias"], f"blk.{li}.{g}.bias")
        for p_, g, lin in A.block_linears(layer, fam):
            pre = f"blk.{li}.{g}"
            if pre in sbs:
                put(lin.weight, fmt.dequantize_sb(sbs[pre]), pre)
            else:
                put(lin.weight, dense[pre + fmt.SUFFIX_WEIGHT], pre + fmt.SUFFIX_WEIGHT)
            if lin.bias is not None:
                b = dense.get(pre + fmt.SUFFIX_BIAS)
                if b is None:
                    with torch.no_grad():
                        lin.bias.zero_()
                else:
                    put(lin.bias, b, pre + fmt.SUFFIX_BIAS)
    if tied:
        model.tie_weights()
    if act_quant:
        enable_act_quant(model, int(kv.get(fmt.KEY_BLOCK_SIZE, fmt.DEFAULT_BLOCK_SIZE)), set(sbs))
        if _tensor_type(path, "token_embd.weight" if tied else "output.weight") in (fmt.GGMLType.Q8_0,
                                                                                     fmt.GGMLType.Q4_0):
            enable_head_act_quant(model)
    return model.to(device)


def _tensor_type(path: str | Path, name: str) -> int:
    import gguf

    return int(next(t.tensor_type for t in gguf.GGUFReader(str(path)).tensors if t.name == name))


def enable_head_act_quant(model: Any) -> Any:
    """The runtime's Q8_0 / Q4_0 output head quantizes the final hidden state to int8 blocks of 32 (scale kept in f32,
    docs/format.md "Embedding format"): the same rule as quantize_act with a block of 32."""
    fam = A.family_of(model.config)
    head = A.get_module(model, fam.head)
    head.register_forward_pre_hook(lambda mod, args: (quantize_act(args[0], 32),) + tuple(args[1:]))
    return model

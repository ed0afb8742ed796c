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

from . import arch


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (torch.round is half-to-even)."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def quantize_act(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """format.quantize_act in torch, returned dequantized (q·s): per token (last axis), per column block of
    block_size, float32: amax_b, q = roundf(x·(127/amax_b)) clamped to ±127, s_b = amax_b/127; a block whose
    amax is 0 (or not finite) quantizes to 0. A float64 x is quantized in float64 (a reference whose rounding
    decisions float32 ordering cannot flip: tests use it to find inputs that sit on int8 rounding ties)."""
    x = x if x.dtype == torch.float64 else x.float()
    dt, dev = x.dtype, x.device
    k = x.shape[-1]
    nb = fmt.n_blocks(k, block_size)
    pad = nb * block_size - k
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    xb = xp.reshape(*x.shape[:-1], nb, block_size)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    ok = torch.isfinite(amax) & (amax > 0)
    inv = torch.where(ok, torch.tensor(127.0, dtype=dt, device=dev) / torch.where(ok, amax, 1.0),
                      torch.zeros((), dtype=dt, device=dev))
    q = torch.clamp(round_half_away(xb * inv), -127, 127)
    q = torch.where(ok, q, torch.zeros((), dtype=dt, device=dev))
    s = torch.where(ok, amax / 127.0, torch.zeros((), dtype=dt, device=dev))
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
    parent = arch.get_module(root, parent_path) if parent_path else root
    setattr(parent, leaf, new)


def enable_act_quant(model: Any, block_size: int, only: set[str] | None = None,
                     q_blocks: set[str] = frozenset()) -> Any:
    """Wrap the linears of every block (or only the GGUF prefixes in `only`, e.g. the sparse-binary ones) with
    the sparse-binary input quantizer (blocks of block_size); the prefixes in q_blocks (Q8_0 / Q4_0 / Q3 linears) with
    the runtime's Q8_0 input quantizer (blocks of 32, the same rule)."""
    fam = arch.family_of(model.config)
    for li, layer in enumerate(arch.blocks(model, fam)):
        for path, gname, lin in arch.block_linears(layer, fam):
            if isinstance(lin, ActQuantLinear):
                continue
            pre = f"blk.{li}.{gname}"
            if pre in q_blocks:
                _set_child(layer, path, ActQuantLinear(lin, fmt.Q8_0_BLOCK))
            elif only is None or pre in only:
                _set_child(layer, path, ActQuantLinear(lin, block_size))
    return model


def from_export(comp: Any, act_quant: bool = False) -> Any:
    """The fake-quant model an export produced (a driver.Result after .save()): its weights already equal the
    file's values."""
    model = comp.model
    if act_quant:
        sb = {k for k, v in comp.linears.items() if isinstance(v, fmt.SbLinear)}
        q = {k for k, v in comp.linears.items() if isinstance(v, fmt.QLinear)}
        enable_act_quant(model, comp.cfg.block_size, sb, q)
    return model


def read_file_weights(f: fmt.ModelFile) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """-> (metadata without tokenizer arrays, dense tensors as float32, sparse-binary linears (SbLinear) and Q3
    linears (QLinear) by prefix)."""
    sbs: dict[str, Any] = {pre: f.sb(pre) for pre in f.linear_prefixes() if f.is_sb(pre)}
    coded = {pre + sfx for pre in sbs for sfx in (fmt.SUFFIX_PLANES, fmt.SUFFIX_ALPHA, fmt.SUFFIX_MU)}
    for pre in f.linear_prefixes():
        if f.is_q3(pre):
            sbs[pre] = f.q3(pre)
            coded.add(pre + fmt.SUFFIX_Q3)
    dense = {name: f.dense(name) for name in f.tensors if name not in coded}
    return f.kv, dense, sbs


def load_fakequant(path: str | Path, act_quant: bool = False, device: str = "cpu") -> Any:
    """Rebuild the HF model a pbs2p file describes, with the file's exact weights (float32)."""
    import transformers

    mf = fmt.ModelFile(path)
    kv, dense, sbs = read_file_weights(mf)
    fam = arch.FAMILY_BY_NAME[mf.family]
    tied = "output.weight" not in dense
    n_ctx = dense["position_embd.weight"].shape[0] - fam.pos_offset if fam is arch.OPT else None
    cfg = arch.config_from_file(mf, tied, n_ctx)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()

    def put(p: torch.Tensor, x: np.ndarray, name: str) -> None:
        if tuple(p.shape) != tuple(x.shape):
            raise ValueError(f"{path}: {name} has shape {x.shape}, the model expects {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(torch.from_numpy(np.ascontiguousarray(x)))

    put(arch.get_module(model, fam.embed).weight, dense["token_embd.weight"], "token_embd.weight")
    if fam.pos_embed:
        put(arch.get_module(model, fam.pos_embed).weight, dense["position_embd.weight"], "position_embd.weight")
    if not tied:
        put(arch.get_module(model, fam.head).weight, dense["output.weight"], "output.weight")
    fn = arch.get_module(model, fam.final_norm)
    put(fn.weight, dense["output_norm.weight"], "output_norm.weight")
    if getattr(fn, "bias", None) is not None:
        put(fn.bias, dense["output_norm.bias"], "output_norm.bias")
    for li, layer in enumerate(arch.blocks(model, fam)):
        for p_, g in fam.norms:
            nm = arch.get_module(layer, p_)
            put(nm.weight, dense[f"blk.{li}.{g}.weight"], f"blk.{li}.{g}.weight")
            if getattr(nm, "bias", None) is not None:
                put(nm.bias, dense[f"blk.{li}.{g}.bias"], f"blk.{li}.{g}.bias")
        for p_, g, lin in arch.block_linears(layer, fam):
            pre = f"blk.{li}.{g}"
            if pre in sbs:
                put(lin.weight, sbs[pre].dequantize(), pre)
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
        sb = {pre for pre, v in sbs.items() if isinstance(v, fmt.SbLinear)}
        q = {pre for pre in mf.linear_prefixes() if pre not in sb and
             (pre in sbs or mf.tensor_type(pre + fmt.SUFFIX_WEIGHT) in (fmt.GGMLType.Q8_0, fmt.GGMLType.Q4_0))}
        enable_act_quant(model, int(kv.get(fmt.KEY_BLOCK_SIZE, fmt.DEFAULT_BLOCK_SIZE)), sb, q)
        if mf.tensor_type("token_embd.weight" if tied else "output.weight") in (fmt.GGMLType.Q8_0,
                                                                                 fmt.GGMLType.Q4_0):
            enable_head_act_quant(model)
    return model.to(device)


def enable_head_act_quant(model: Any) -> Any:
    """The runtime's Q8_0 / Q4_0 output head quantizes the final hidden state to int8 blocks of 32 (scale kept in f32,
    docs/format.md "Embedding format"): the same rule as quantize_act with a block of 32."""
    fam = arch.family_of(model.config)
    head = arch.get_module(model, fam.head)
    head.register_forward_pre_hook(lambda mod, args: (quantize_act(args[0], 32),) + tuple(args[1:]))
    return model

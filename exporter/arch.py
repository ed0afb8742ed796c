"""Supported model families: one table per family saying where HF keeps each piece of a decoder-only model and
what it is called in a pbs2p file (docs/format.md), plus the file's architecture metadata.

A family is looked up from the HF config's `architectures` / `model_type`; anything else is refused with an
error naming what is supported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pbs2p.format import arch_name


class UnsupportedModelError(ValueError):
    """The model's architecture (or one of its options) has no pbs2p mapping."""


@dataclass(frozen=True)
class Family:
    name: str  # the family (spec.FAMILIES); the file's general.architecture is pbs2p.format.arch_name(name)
    hf_archs: tuple[str, ...]  # HF class names
    model_types: tuple[str, ...]  # HF config.model_type values
    blocks: str  # dotted path from the CausalLM module to the ModuleList of blocks
    linears: tuple[tuple[str, str], ...]  # (path inside a block, GGUF name), in compression order
    norms: tuple[tuple[str, str], ...]  # (path inside a block, GGUF name)
    final_norm: str
    embed: str
    pos_embed: str | None = None
    pos_offset: int = 0
    head: str = "lm_head"


LLAMA = Family(
    name="llama",
    hf_archs=("LlamaForCausalLM", "MistralForCausalLM"),
    model_types=("llama", "mistral"),
    blocks="model.layers",
    linears=(("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
             ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
             ("mlp.down_proj", "ffn_down")),
    norms=(("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")),
    final_norm="model.norm",
    embed="model.embed_tokens",
)

QWEN2 = Family(
    name="qwen2",
    hf_archs=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    blocks=LLAMA.blocks,
    linears=LLAMA.linears,
    norms=LLAMA.norms,
    final_norm=LLAMA.final_norm,
    embed=LLAMA.embed,
)

OPT = Family(
    name="opt",
    hf_archs=("OPTForCausalLM",),
    model_types=("opt",),
    blocks="model.decoder.layers",
    linears=(("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
             ("self_attn.out_proj", "attn_output"), ("fc1", "ffn_up"), ("fc2", "ffn_down")),
    norms=(("self_attn_layer_norm", "attn_norm"), ("final_layer_norm", "ffn_norm")),
    final_norm="model.decoder.final_layer_norm",
    embed="model.decoder.embed_tokens",
    pos_embed="model.decoder.embed_positions",
    pos_offset=2,  # HF OPTLearnedPositionalEmbedding looks up position + 2
)

FAMILIES = (LLAMA, QWEN2, OPT)
SUPPORTED = ", ".join(a for f in FAMILIES for a in f.hf_archs)


def family_of(config: Any) -> Family:
    """The family of an HF config; raises UnsupportedModelError naming the supported architectures."""
    archs = tuple(getattr(config, "architectures", None) or ())
    mt = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if any(a in fam.hf_archs for a in archs) or (not archs and mt in fam.model_types):
            check_supported(fam, config)
            return fam
    for fam in FAMILIES:  # e.g. a *Model or *ForSequenceClassification checkpoint of a known model_type
        if mt in fam.model_types:
            check_supported(fam, config)
            return fam
    name = ", ".join(archs) or str(mt)
    raise UnsupportedModelError(f"unsupported architecture {name}; supported: {SUPPORTED}")


def check_supported(fam: Family, config: Any) -> None:
    if fam is OPT:
        if not getattr(config, "do_layer_norm_before", True):
            raise UnsupportedModelError("OPT with do_layer_norm_before=False (OPT-350m style post-norm) is not "
                                        "supported: the runtime implements pre-norm blocks only")
        wp = getattr(config, "word_embed_proj_dim", config.hidden_size)
        if wp != config.hidden_size:
            raise UnsupportedModelError(f"OPT with word_embed_proj_dim {wp} != hidden_size {config.hidden_size} "
                                        "(project_in/project_out) is not supported")
        act = getattr(config, "activation_function", "relu")
        if act != "relu":
            raise UnsupportedModelError(f"OPT with activation_function {act!r} is not supported (relu only)")
    else:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{fam.name} with hidden_act {act!r} is not supported (silu only)")
        if fam is LLAMA and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
            raise UnsupportedModelError("llama with attention_bias/mlp_bias is not supported")
        rs = rope_scaling(config)
        if rs is not None and rs.get("rope_type", rs.get("type")) not in ("default", "linear", "llama3", None):
            raise UnsupportedModelError(f"rope scaling {rs.get('rope_type', rs.get('type'))!r} is not supported "
                                        "(none, linear, llama3)")


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    m = root
    for part in path.split("."):
        m = getattr(m, part)
    return m


def blocks(model: torch.nn.Module, fam: Family) -> torch.nn.ModuleList:
    return get_module(model, fam.blocks)


def block_linears(block: torch.nn.Module, fam: Family) -> list[tuple[str, str, torch.nn.Linear]]:
    """[(hf path, GGUF name, module)] in compression order."""
    return [(p, g, get_module(block, p)) for p, g in fam.linears]


def is_tied(model: torch.nn.Module, fam: Family) -> bool:
    head = get_module(model, fam.head)
    emb = get_module(model, fam.embed)
    return head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()


TIE_MAX_REL = 0.25  # --tie-head: the most ||head - table|| / ||head|| of one matrix stored twice (two quantizations)


def tie_head(model: torch.nn.Module, fam: Family) -> float | None:
    """--tie-head: one matrix for the token table and the output head, the head's values (a GGUF of a model trained
    with tied embeddings may store the matrix twice, e.g. Q4_K table and Q6_K head; the head's is then the finer
    copy). Returns ||head - table|| / ||head|| before tying, None when they were tied already; a ValueError when the
    two are different matrices (relative difference above TIE_MAX_REL) or shapes."""
    head, emb = get_module(model, fam.head), get_module(model, fam.embed)
    if is_tied(model, fam):
        return None
    if head.weight.shape != emb.weight.shape:
        raise ValueError(f"the output head {tuple(head.weight.shape)} and the token table {tuple(emb.weight.shape)} "
                         "have different shapes: they cannot be one matrix")
    with torch.no_grad():
        h = head.weight.detach().float()
        rel = float((h - emb.weight.detach().float()).norm() / h.norm().clamp_min(1e-30))
        if not rel <= TIE_MAX_REL:
            raise ValueError(f"the output head and the token table differ by {100 * rel:.1f}% (relative norm; at "
                             f"most {100 * TIE_MAX_REL:.0f}% for two copies of one matrix): this model's head is "
                             "not tied")
        emb.weight.data.copy_(head.weight.data)
    head.weight = emb.weight
    model.config.tie_word_embeddings = True
    return rel


def rope_scaling(config: Any) -> dict | None:
    """HF's rope scaling dict (transformers 5 folds it into rope_parameters), or None when there is none."""
    rs = getattr(config, "rope_scaling", None)
    if not rs:
        rp = getattr(config, "rope_parameters", None)
        if isinstance(rp, dict) and rp.get("rope_type", "default") != "default":
            rs = rp
    if not rs:
        return None
    rt = rs.get("rope_type", rs.get("type"))
    return None if rt in (None, "default") else dict(rs)


def rope_theta(config: Any) -> float:
    th = getattr(config, "rope_theta", None)
    if th is None:
        rp = getattr(config, "rope_parameters", None) or {}
        th = rp.get("rope_theta", 10000.0)
    return float(th)


def head_dim(config: Any) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def metadata(config: Any, fam: Family, vocab_size: int) -> list[tuple[str, Any, str]]:
    """The architecture keys of docs/format.md as (key, value, vtype) for ModelWriter.add_kv."""
    a = arch_name(fam.name)
    c = config
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    kv: list[tuple[str, Any, str]] = [
        (f"{a}.context_length", int(c.max_position_embeddings), "u32"),
        (f"{a}.embedding_length", int(c.hidden_size), "u32"),
        (f"{a}.block_count", int(c.num_hidden_layers), "u32"),
        (f"{a}.feed_forward_length", int(c.ffn_dim if fam is OPT else c.intermediate_size), "u32"),
        (f"{a}.attention.head_count", int(c.num_attention_heads), "u32"),
        (f"{a}.attention.head_count_kv", int(n_kv), "u32"),
        (f"{a}.attention.key_length", head_dim(c), "u32"),
        (f"{a}.vocab_size", int(vocab_size), "u32"),
    ]
    if fam is OPT:
        kv.append((f"{a}.attention.layer_norm_epsilon", 1e-5, "f32"))  # HF OPT's nn.LayerNorm default
        kv.append(("pbs2p.pos_offset", fam.pos_offset, "u32"))
        return kv
    kv += [
        (f"{a}.attention.layer_norm_rms_epsilon", float(c.rms_norm_eps), "f32"),
        (f"{a}.rope.freq_base", rope_theta(c), "f32"),
        (f"{a}.rope.dimension_count", head_dim(c), "u32"),
    ]
    rs = rope_scaling(c)
    if rs is None:
        return kv
    rt = rs.get("rope_type", rs.get("type"))
    kv += [(f"{a}.rope.scaling.type", rt, "str"), (f"{a}.rope.scaling.factor", float(rs["factor"]), "f32")]
    if rt == "llama3":
        kv += [(f"{a}.rope.scaling.original_context_length", int(rs["original_max_position_embeddings"]), "u32"),
               (f"{a}.rope.scaling.low_freq_factor", float(rs["low_freq_factor"]), "f32"),
               (f"{a}.rope.scaling.high_freq_factor", float(rs["high_freq_factor"]), "f32")]
    return kv


def config_from_file(mf: Any, tied: bool, context_length: int | None = None) -> Any:
    """An HF config rebuilding the model a pbs2p file (a pbs2p.format.ModelFile) describes, for the fake-quant
    reference; context_length overrides the file's (opt: the position table's rows decide)."""
    import transformers

    g = mf.hparam
    family = mf.family
    common = dict(vocab_size=int(g("vocab_size")), hidden_size=int(g("embedding_length")),
                  num_hidden_layers=int(g("block_count")), num_attention_heads=int(g("attention.head_count")),
                  max_position_embeddings=int(context_length or g("context_length")), tie_word_embeddings=tied)
    if family == "opt":
        return transformers.OPTConfig(ffn_dim=int(g("feed_forward_length")), do_layer_norm_before=True,
                                      word_embed_proj_dim=common["hidden_size"], enable_bias=True,
                                      activation_function="relu", architectures=["OPTForCausalLM"], **common)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(g("rope.freq_base", 10000.0))}
    st = g("rope.scaling.type")
    if st == "linear":
        rope.update(rope_type="linear", factor=float(g("rope.scaling.factor")))
    elif st == "llama3":
        rope.update(rope_type="llama3", factor=float(g("rope.scaling.factor")),
                    original_max_position_embeddings=int(g("rope.scaling.original_context_length")),
                    low_freq_factor=float(g("rope.scaling.low_freq_factor")),
                    high_freq_factor=float(g("rope.scaling.high_freq_factor")))
    common.update(intermediate_size=int(g("feed_forward_length")),
                  num_key_value_heads=int(g("attention.head_count_kv")),
                  head_dim=int(g("attention.key_length", common["hidden_size"] // common["num_attention_heads"])),
                  rms_norm_eps=float(g("attention.layer_norm_rms_epsilon")), hidden_act="silu")
    if family == "qwen2":
        return transformers.Qwen2Config(rope_parameters=rope, architectures=["Qwen2ForCausalLM"], **common)
    if family == "llama":
        return transformers.LlamaConfig(rope_parameters=rope, architectures=["LlamaForCausalLM"], **common)
    raise UnsupportedModelError(f"{mf.path}: unsupported architecture {mf.arch!r}; supported: "
                                f"{', '.join(f.name for f in FAMILIES)}")


FAMILY_BY_NAME = {f.name: f for f in FAMILIES}

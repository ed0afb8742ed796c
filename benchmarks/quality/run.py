"""Quality benchmark: WikiText-2 perplexity of every 1-bit method x sparsity on one real model.

    python benchmarks/quality/run.py MODEL.gguf --configs fp,pbs2p@6:8,stbllm@6:8,arb@dense \
        --nsamples 16 --seqlen 512 --eval-windows 4 --threads 1 --out benchmarks/results/quality.jsonl

A config is `fp` (the original model) or `METHOD@NM[+FLAG...]`, METHOD one of pbs2p sign billm arb stbllm, NM
`dense` or `N:M`, FLAG one of `coarse` (the paper's CFS coarse stage: per-block N; off by default —
rows made before were relabelled, see benchmarks/results/*.md), `magnitude` (fine-stage score), `steps1` (one-shot
SPBO), `steps0` (static mask, then binarize), `salient` (a second binary plane on salient columns, as `pbs2p-export
--salient`), `residual` (a second term on every kept weight, `--residual`). Per config, in one process: the original
weights are restored, the export runs exactly as `pbs2p-export` does (same calibration windows for every config),
the file is written and its storage bits per weight counted from its bytes, then the PyTorch model holding the
file's weights (fake-quant; weights only, as the papers report) is scored on the first --eval-windows
non-overlapping windows of --eval-seqlen tokens of WikiText-2 test. With --runtime, the written file is also scored
by the C runtime (int8 activations: what the product serves).

One JSON line per config goes to --out (appended; a config already there is skipped, so an interrupted run
continues). benchmarks/quality/report.py turns the lines into RESULTS.md tables and a PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
WIKI = DATA / "wikitext-2-raw" / "wiki.test.raw"
C4 = DATA / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
# config flag -> the ExportConfig field it sets and the value (one table: parse_config checks against it,
# export_config applies it)
FLAGS = {"coarse": ("coarse", True), "magnitude": ("score", "magnitude"),
         "steps1": ("steps", 1), "steps0": ("steps", 0), "salient": ("salient", True),
         "residual": ("residual", True)}


def parse_config(s: str) -> dict:
    if s == "fp":
        return {"name": "fp", "method": "fp"}
    if "@" not in s:
        raise SystemExit(f"config {s!r}: expected fp or METHOD@NM[+FLAG...]")
    method, rest = s.split("@", 1)
    nm, *flags = rest.split("+")
    bad = set(flags) - FLAGS.keys()
    if bad:
        raise SystemExit(f"config {s!r}: unknown flags {sorted(bad)} (known: {sorted(FLAGS)})")
    return {"name": s, "method": method, "nm": nm, "flags": flags}


def export_config(c: dict, a: argparse.Namespace):
    from pbs2p.exporter import config

    cfg = config.QuantConfig(method=c["method"], nm=config.parse_nm(c["nm"]), calib=str(a.calib), nsamples=a.nsamples,
                         seqlen=a.seqlen, seed=a.seed, progress=not a.quiet, device=a.device)
    for f in c["flags"]:
        setattr(cfg, *FLAGS[f])
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a .gguf file or HF folder")
    ap.add_argument("--configs", required=True, help="comma-separated configs (see the module docstring)")
    ap.add_argument("--out", required=True, help="JSON-lines results file (appended)")
    ap.add_argument("--calib", default=str(C4))
    ap.add_argument("--wiki", default=str(WIKI), help="the WikiText-2 test file scored")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="torch (and runtime) threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the export and the PyTorch scoring run")
    ap.add_argument("--runtime", action="store_true", help="also score the written file with the C runtime")
    ap.add_argument("--keep", default=None, help="folder to keep the written files in (default: deleted)")
    ap.add_argument("--scratch", default=None,
                    help="folder for the original-weights copy and the files not kept (default: --keep, else --out's)")
    ap.add_argument("--original", choices=("disk", "device"), default="disk",
                    help="where the original weights wait between configs: a file in --scratch (mmap) or a copy on --device")
    ap.add_argument("--reuse", action="store_true", help="score a config's file already in --keep instead of exporting")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    wiki = Path(a.wiki)
    for p in (wiki, Path(a.calib)):
        if not p.is_file():
            print(f"skipped: {p} is missing (the benchmark needs ../shared/data beside the repository)")
            return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    configs = [parse_config(s) for s in a.configs.split(",") if s]
    out = Path(a.out)
    done = set()
    if out.is_file():
        done = {json.loads(line)["config"] for line in out.read_text().splitlines() if line.strip()}
    todo = [c for c in configs if c["name"] not in done]
    if not todo:
        print("nothing to do: every config is in", out)
        return 0

    from pbs2p.exporter import calib, models
    from pbs2p import format as fmt
    from pbs2p.exporter import driver
    from pbs2p.exporter import eval as evaluation

    a.device = str(driver.pick_device(a.device))  # cuda asked for but absent: a warning, then the CPU
    t = time.time()
    loaded = models.load(a.model)
    load_s = time.time() - t
    model = loaded.model
    # the original weights, restored before each config: a file (mmap) rather than a second copy in RAM, or, with
    # --original device, a copy in GPU memory (several shards then share one GPU without writing 7 GB files each)
    keep = Path(a.keep) if a.keep else Path(a.scratch) if a.scratch else out.parent
    keep.mkdir(parents=True, exist_ok=True)
    scratch = Path(a.scratch) if a.scratch else keep
    scratch.mkdir(parents=True, exist_ok=True)
    orig_path = scratch / f".{Path(a.model).stem}.original.pt"
    if a.original == "device":
        orig = {k: v.detach().to(a.device, copy=True) for k, v in model.state_dict().items()}
    else:
        torch.save(model.state_dict(), orig_path)
    ids = torch.tensor(loaded.tokenizer(wiki.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    torch.manual_seed(a.seed)
    windows, desc = calib.get_windows(str(a.calib), model, loaded.tokenizer, a.nsamples, a.seqlen, a.seed, False)
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if a.device.startswith("cuda") and torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    print(f"loaded {a.model} in {load_s:.0f} s; calibration: {desc}; {len(todo)} configs to run", flush=True)

    for c in todo:
        model.load_state_dict(orig if a.original == "device" else torch.load(orig_path, mmap=True, weights_only=True))
        rec = {"config": c["name"], "model": Path(a.model).name, "calibration": desc,
               "eval": f"WikiText-2 test, first {a.eval_windows} windows x {a.eval_seqlen}", "machine": machine}
        t0 = time.time()
        fpath, reused = None, False
        if c["method"] == "fp":
            model.to(a.device)
            rec.update(method="fp", nm="-", flags=[])
        else:
            cfg = export_config(c, a)
            fpath = keep / f"{Path(a.model).stem}.{c['name'].replace('@', '-').replace(':', '_').replace('+', '-')}.bin"
            reused = a.reuse and fpath.is_file()
            if reused:  # a file a killed run wrote: score it (export time and layer errors unknown)
                from pbs2p.exporter import fakequant

                model = fakequant.load_fakequant(fpath, device=a.device)
                stats = fmt.ModelFile(fpath).storage()
                rec.update(export_s=None, reused_file=True, mean_layer_out_err=None, nm_n=None, last_block_err=None,
                           block_err=None, layer_out_err=None)
            else:
                comp, stats = driver.export(loaded, fpath, cfg, force=True)
                err_out = [r.err_out for r in comp.records]
                rec.update(export_s=round(time.time() - t0, 1), mean_layer_out_err=round(sum(err_out) / len(err_out), 5),
                           nm_n=comp.nm_n, last_block_err=round(comp.block_err[-1], 4) if comp.block_err else None,
                           # per block / per linear, to see where two methods part (the mean hides it)
                           block_err=[round(e, 4) for e in comp.block_err],
                           layer_out_err={f"blk.{r.block}.{r.name}": round(r.err_out, 5) for r in comp.records})
            rec.update(method=c["method"], nm=c["nm"], flags=c["flags"], file_bytes=stats["file_bytes"],
                       storage_bpw=round(stats["storage_bpw"], 4), file_bpw=round(stats["file_bpw"], 4),
                       param_bits=round(stats["param_bits"], 4))
        t1 = time.time()
        ppl, n, _ = evaluation.perplexity(model, ids, a.eval_seqlen, a.eval_windows, not a.quiet, a.device, c["name"])
        rec.update(ppl=ppl, tokens_scored=n, eval_s=round(time.time() - t1, 1))
        if a.runtime and fpath is not None:
            from pbs2p.runtime import Runtime

            t2 = time.time()
            with Runtime(str(fpath), threads=a.threads, context_length=a.eval_seqlen) as rt:
                rec["runtime_ppl"] = rt.perplexity(wiki, a.eval_seqlen, max_windows=a.eval_windows, progress=False)
            rec["runtime_eval_s"] = round(time.time() - t2, 1)
        if fpath is not None and not a.keep and not reused:
            fpath.unlink()
        model = loaded.model
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k != "layer_out_err"}), flush=True)  # the file has it all
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One model's quality-per-byte comparison, run and collected: pbs2p's planned files against llama.cpp's files of
the same GGUF, every file scored by `pbs2p-eval` on the same windows; writes the JSON `report.py` reads.

    python benchmarks/pareto/run.py qwen2.5-coder-1.5b.gguf --work W --name "Qwen2.5-Coder-1.5B-Instruct" \
        --calib c4-train.00000-of-01024.first1000.jsonl --text wiki.test.raw --windows 4 \
        --bpw 1.62 2.03 --sb-code nm --llama-bin llama.cpp/build/bin --llama IQ1_S-h4 IQ2_XXS-h4 Q2_K-h4 \
        --out benchmarks/results/pareto-qwen2.5-coder-1.5b.json

Steps, in this order, each writing into W and skipped when its output is already there (an interrupted run
continues; a finished one only collects): the FP model's perplexity; the calibration windows as text (the
exporter's own windows, decoded, one per line) and llama.cpp's importance matrix on them; each llama.cpp type
(`T-h4`: with `--output-tensor-type q4_0 --token-embedding-type q4_0`, pbs2p's `--embed-type q4_0`) quantized and
scored; each pbs2p budget (`--bpw B`, or `--max-bytes-of T`: no more bytes than llama.cpp's file of type T)
exported with one pass-1 table for all (`--measurements`) and scored through the C runtime. `--dry-run` prints
the commands. Needs the package installed (`pbs2p-export`, `pbs2p-eval`) and llama.cpp's tools built.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

CODE_NAMES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q3": "Q3", "binary": "binary", "residual": "residual"}
H4 = ["--output-tensor-type", "q4_0", "--token-embedding-type", "q4_0"]


def code_name(code: str) -> str:
    return CODE_NAMES.get(code) or code.replace("pbs2p-", "PBS²P ")


def plan_detail(log: str) -> str:
    """"96 Q3, 31 Q4_0, 41 Q8_0" from the plan table an export prints (exporter writer.summary; the export also
    prints it once when it plans: the last one is read)."""
    rows = re.findall(r"^  (\S+)\s+(\d+) linears\s", log[log.rfind("plan: target"):], re.M)
    return ", ".join(f"{n} {code_name(c)}" for c, n in rows)


def read_ppl(path: Path) -> float:
    m = re.findall(r"PPL ([0-9.]+)", path.read_text())
    if not m:
        raise SystemExit(f"{path}: no perplexity in it (a failed evaluation: remove it and run again)")
    return float(m[-1])


class Runner:
    def __init__(self, work: Path, dry: bool) -> None:
        self.work, self.dry = work, dry
        self.commands: list[str] = []

    def step(self, out: Path, argv: list[str], log: Path | None = None) -> None:
        """Run argv (stdout + stderr to log) unless out exists; every command is recorded as it was run."""
        cmd = shlex.join(argv) + (f" > {log.name} 2>&1" if log else "")
        self.commands.append(cmd)
        if out.exists():
            return
        print(f"+ {cmd}", file=sys.stderr, flush=True)
        if self.dry:
            return
        with open(log if log else "/dev/null", "w") as f:
            rc = subprocess.run(argv, cwd=self.work, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0 or not out.exists():
            if log is not None and log == out:
                out.unlink(missing_ok=True)
            raise SystemExit(f"{cmd}: exit {rc} (see {log or out})")


def calib_text(model: Path, spec: str, n: int, seqlen: int, seed: int, out: Path) -> None:
    """The exporter's calibration windows decoded to text, one per line (what llama-imatrix reads); a file spec
    needs the tokenizer only (the GGUF's, as the exporter loads it)."""
    import transformers

    from pbs2p.exporter import calib

    tok = transformers.AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name)
    windows, _ = calib.get_windows(spec, None, tok, n, seqlen, seed, False)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(tok.decode(w) for w in windows.tolist()))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="the source GGUF (both engines start from it; pbs2p alone: any MODEL "
                                             "pbs2p-export reads)")
    ap.add_argument("--work", type=Path, required=True, help="folder for every file the run makes")
    ap.add_argument("--name", required=True, help="the model as the report names it")
    ap.add_argument("--calib", required=True, help="calibration text (.jsonl / .txt) for both engines")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", required=True, help="evaluation text (WikiText-2 test)")
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows")
    ap.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per evaluation window")
    ap.add_argument("--bpw", type=float, nargs="*", default=[], help="pbs2p budgets (bits per linear weight)")
    ap.add_argument("--max-bytes-of", nargs="*", default=[], metavar="T",
                    help="pbs2p files no bigger than llama.cpp's file of type T (one of --llama)")
    ap.add_argument("--sb-code", default="nm", choices=("nm", "planes"))
    ap.add_argument("--embed-type", default="q4_0")
    ap.add_argument("--tie-head", action="store_true", help="pbs2p-export --tie-head (files named ...-tied)")
    ap.add_argument("--llama", nargs="*", default=[], metavar="T", help="llama.cpp types, T or T-h4")
    ap.add_argument("--llama-bin", type=Path, help="folder of llama-imatrix and llama-quantize")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="the JSON to write (default: print it)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands of the missing steps, run nothing")
    a = ap.parse_args(argv)
    if (a.llama or a.max_bytes_of) and a.llama_bin is None:
        ap.error("--llama / --max-bytes-of need --llama-bin")
    if not Path(a.calib).is_file():
        ap.error(f"--calib {a.calib}: a .jsonl / .txt file (both engines read the same text)")
    if set(a.max_bytes_of) - set(a.llama):
        ap.error("--max-bytes-of: each type must be one of --llama")
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.model.resolve()
    r = Runner(a.work, a.dry_run)
    ev = ["pbs2p-eval", str(Path(a.text).resolve()), "--max-windows", str(a.windows), "--seqlen", str(a.eval_seqlen),
          "-q"]
    points = []

    fp = a.work / f"{model.name}.eval"
    r.step(fp, [*ev, "--model", str(model)], fp)

    if a.llama:
        text = a.work / f"calib{a.nsamples}x{a.seqlen}.txt"
        r.commands.append(f"# {text.name}: the exporter's {a.nsamples} x {a.seqlen} windows of {Path(a.calib).name} "
                          f"(seed {a.seed}), decoded, one per line")
        if not text.exists() and not a.dry_run:
            calib_text(model, str(Path(a.calib).resolve()), a.nsamples, a.seqlen, a.seed, text)
        imat = a.work / "imatrix.gguf"
        r.step(imat, [str(a.llama_bin / "llama-imatrix"), "-m", str(model), "-f", text.name, "-o", imat.name,
                      "-c", str(a.seqlen), "-t", str(a.threads), "--chunks", str(a.nsamples)],
               a.work / "imatrix.log")
        for t in a.llama:
            base, h4 = (t[:-3], True) if t.endswith("-h4") else (t, False)
            f = a.work / f"l-{t}.gguf"
            r.step(f, [str(a.llama_bin / "llama-quantize"), "--allow-requantize", "--imatrix", imat.name,
                       *(H4 if h4 else []), str(model), f.name, base, str(a.threads)], a.work / f"q-{t}.log")
            e = a.work / f"{f.name}.eval"
            r.step(e, [*ev, "--model", f.name], e)
            if not a.dry_run:
                points.append({"engine": "llama.cpp", "name": t, "bytes": f.stat().st_size,
                               "ppl": round(read_ppl(e), 2), "detail": "output and token table Q4_0" if h4 else ""})

    stem, tied = "nm" if a.sb_code == "nm" else "q", "-tied" if a.tie_head else ""
    budgets = [(f"{stem}{b:g}{tied}", ["--bpw", f"{b:g}"], f"--bpw {b:g}") for b in a.bpw]
    for t in a.max_bytes_of:
        size = (a.work / f"l-{t}.gguf").stat().st_size if not a.dry_run else 0
        budgets.append((f"{stem}-le-{t}{tied}", ["--max-bytes", str(size)], f"--max-bytes {size} (≤ {t})"))
    for stem_b, flag, label in budgets:
        f = a.work / f"{stem_b}.bin"
        log = a.work / f"{stem_b}.log"
        r.step(f, ["pbs2p-export", str(model), *flag, *(["--sb-code", "nm"] if a.sb_code == "nm" else []),
                   "--embed-type", a.embed_type, *(["--tie-head"] if a.tie_head else []),
                   "--calib", str(Path(a.calib).resolve()), "--nsamples", str(a.nsamples),
                   "--seqlen", str(a.seqlen), "--seed", str(a.seed), "--measurements",
                   f"pass1{tied}.json", "--out", f.name, "--no-checkpoint", "-q"], log)
        e = a.work / f"{stem_b}.eval"
        r.step(e, [*ev, "--runtime", f.name], e)
        if not a.dry_run:
            points.append({"engine": "pbs2p", "name": label + (" --sb-code nm" if a.sb_code == "nm" else " (planes)")
                           + (" --tie-head" if a.tie_head else ""),
                           "bytes": f.stat().st_size, "ppl": round(read_ppl(e), 2),
                           "detail": plan_detail(log.read_text())})
    if a.dry_run:
        return 0
    doc = {"model": a.name, "fp_ppl": round(read_ppl(fp), 2),
           "evaluation": f"{Path(a.text).name}, first {a.windows} windows x {a.eval_seqlen}, no BOS; pbs2p files "
                         "through the C runtime (int8 activations), llama.cpp files through transformers' GGUF "
                         "dequantization",
           "commands": [c.replace(f"{a.llama_bin}/", "").replace(str(model), model.name).replace(str(Path(a.text).resolve()), Path(a.text).name)
                        .replace(str(Path(a.calib).resolve()), Path(a.calib).name) for c in r.commands],
           "points": points}
    s = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    if a.out:
        a.out.write_text(s)
    else:
        sys.stdout.write(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tables (markdown, stdout) and a plot from the JSON lines of benchmarks/quality/run.py.

    python benchmarks/quality/report.py benchmarks/results/quality-qwen2.5-coder-0.5b.jsonl \
        --png benchmarks/results/quality-qwen2.5-coder-0.5b.png

(matplotlib for --png; it is not a project dependency.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

METHODS = ["sign", "billm", "arb", "stbllm", "pbs2p"]
# rows of the perplexity table and bars of the plot: each method as run by default, plus PBS²P with the paper's
# CFS coarse stage (off by default since it raised perplexity; docs/algorithm.md) and with the residual term
# (a second sign on every kept weight: BiLLM's file bytes, 2·N/M param bits)
SERIES = [(m, "") for m in METHODS] + [("pbs2p", "+coarse"), ("pbs2p", "+residual")]
SPARSITY = ["dense", "6:8", "5:8", "4:8"]


def fmt_ppl(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.4g}" if x < 1e5 else f"{x:.2e}"


def num(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl")
    ap.add_argument("--png", default=None)
    a = ap.parse_args()
    rows = [json.loads(s) for s in Path(a.jsonl).read_text().splitlines() if s.strip()]
    # a config run more than once (a re-export with newer code, a repeat) is read from its latest run; every run is
    # listed, and the repeats get a table of their own: their spread is the noise floor the other rows are read with
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["config"], []).append(r)
    by = {c: rs[-1] for c, rs in runs.items()}
    fp = by.get("fp")
    first = rows[0]
    machines = sorted({r["machine"] for r in rows})
    where = machines[0] if len(machines) == 1 else "machines: " + "; ".join(
        f"({chr(97 + i)}) {m}" for i, m in enumerate(machines))
    print(f"Model `{first['model']}`; calibration: {next((r['calibration'] for r in rows), '')}; "
          f"evaluation: {first['eval']}; {where}.\n")
    tag = {m: chr(97 + i) for i, m in enumerate(machines)} if len(machines) > 1 else {}
    if fp:
        print(f"FP (the GGUF's weights, dequantized): PPL **{fp['ppl']:.2f}** ({fp['tokens_scored']} tokens).\n")

    print("### Perplexity (PyTorch, the file's weights; int8 activations through the C runtime in brackets)\n")
    print("| method | " + " | ".join(SPARSITY) + " |")
    print("|---|" + "---|" * len(SPARSITY))
    for m, flag in SERIES:
        cells = []
        for s in SPARSITY:
            r = by.get(f"{m}@{s}{flag}")
            if r is None:
                cells.append("—")
                continue
            c = fmt_ppl(r["ppl"])
            if "runtime_ppl" in r:
                c += f" [{fmt_ppl(r['runtime_ppl'])}]"
            cells.append(c)
        if flag and not any(c != "—" for c in cells):
            continue
        print(f"| {m}{flag} | " + " | ".join(cells) + " |")
    print()
    print("PBS²P vs the best baseline at each sparsity, over all baselines and over those whose file spends the "
          "same storage bits per weight (lower is better; ratio = baseline / PBS²P; bpw from the file's bytes):\n")
    print("| sparsity | PBS²P (bpw) | best baseline (bpw) | ratio | best same-bpw baseline | ratio |")
    print("|---|---|---|---|---|---|")
    for s in SPARSITY:
        base = [(r["ppl"], m, r["storage_bpw"]) for m in METHODS[:-1] if (r := by.get(f"{m}@{s}"))]
        if not base:
            continue
        b, bm, bb = min(base)
        # PBS²P with a second plane (`+salient`, `+residual`) gets its own row: its file has BiLLM's bytes, so
        # BiLLM is its same-byte rival; so does PBS²P with the paper's coarse stage (`+coarse`, off by default)
        for label in ("", "+coarse", "+salient", "+salient+coarse", "+residual"):
            p = by.get(f"pbs2p@{s}{label}")
            if not p:
                continue
            same = [x for x in base if abs(x[2] - p["storage_bpw"]) < 1e-9]
            cs = "— | —"
            if same:
                sb, sm, _ = min(same)
                cs = f"{sm} {fmt_ppl(sb)} | {sb / p['ppl']:.2f}×"
            print(f"| {f'{s} {label}'.rstrip()} | {fmt_ppl(p['ppl'])} ({p['storage_bpw']:.3g}) | {bm} {fmt_ppl(b)} "
                  f"({bb:.3g}) | {b / p['ppl']:.2f}× | {cs} |")
    print()

    print("### Every run: size, time, layer error\n")
    mcol = " machine |" if tag else ""
    print("| config | PPL | runtime PPL | storage bpw (file bytes) | param bits | file MB | mean layer out-err | "
          "last block err | export s | eval s |" + mcol)
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if tag else ""))
    for r in rows:
        if r["config"] == "fp":
            continue
        rs = runs[r["config"]]
        nth = f" (run {next(i for i, x in enumerate(rs) if x is r) + 1}/{len(rs)})" if len(rs) > 1 else ""
        print(f"| `{r['config']}`{nth} | {fmt_ppl(r['ppl'])} | {fmt_ppl(r.get('runtime_ppl'))} | "
              f"{r['storage_bpw']:.3f} | {r['param_bits']:.3f} | {r['file_bytes'] / 1e6:.1f} | "
              f"{num(r['mean_layer_out_err'], '.4f')} | "
              f"{num(r['last_block_err'], '.4f')} | {num(r['export_s'], '.0f')} | {r['eval_s']:.0f} |"
              + (f" ({tag[r['machine']]}) |" if tag else ""))
    print()

    rep = {c: rs for c, rs in runs.items() if len(rs) > 1}
    if rep:
        print("### Repeated configurations (the other tables use the latest run)\n")
        print("| config | PPL, run by run | mean layer out-err, run by run | PPL spread (max/min − 1) | notes |")
        print("|---|---|---|---|---|")
        for c, rs in rep.items():
            ppl = [x["ppl"] for x in rs]
            notes = "; ".join(f"run {i + 1}: {x['note']}" for i, x in enumerate(rs) if x.get("note"))
            print(f"| `{c}` | {' → '.join(fmt_ppl(v) for v in ppl)} | "
                  f"{' → '.join(num(x['mean_layer_out_err'], '.4f') for x in rs)} | "
                  f"{100 * (max(ppl) / min(ppl) - 1):.1f} % | {notes or '—'} |")
        print()

    abl = [r for r in by.values() if r.get("method") == "pbs2p" and r.get("flags")]
    if abl:
        print("### Ablations (PBS²P, same calibration and evaluation)\n")
        what = {"coarse": "the paper's CFS coarse stage (per-block N)", "magnitude": "magnitude score instead of OBS",
                "steps1": "τ = 1 (SPBO in one step: prune M−N per group against the binary fit, refit)",
                "steps0": "static mask (prune by OBS score first, then binarize: no SPBO)",
                "salient": "a second binary plane on salient columns (twice the plane bytes)",
                "residual": "a second binary term on every kept weight, both refit (twice the plane bytes)"}
        # each row against its nearest measured reference: the same config less one flag (an ablation flag first,
        # so `+residual+magnitude` is read against `+residual`), else the default at its N:M with every flag listed
        print("| config | against | what changes | PPL (reference) | mean layer out-err (reference) |")
        print("|---|---|---|---|---|")
        for r in sorted(abl, key=lambda r: (r["nm"], len(r["flags"]), r["config"])):
            flags, ref, changed = r["flags"], None, r["flags"]
            for f in sorted(flags, key=lambda f: f in ("salient", "residual")):
                name = f"pbs2p@{r['nm']}" + "".join(f"+{g}" for g in flags if g != f)
                if name in by:
                    ref, changed = by[name], [f]
                    break
            if ref is None:
                ref = by.get(f"pbs2p@{r['nm']}")
            against, rppl, rerr = (f"`{ref['config']}`", fmt_ppl(ref["ppl"]), num(ref["mean_layer_out_err"], ".4f")) \
                if ref else ("—", "—", "—")
            print(f"| `{r['config']}` | {against} | {', '.join(what.get(f, f) for f in changed)} | "
                  f"{fmt_ppl(r['ppl'])} ({rppl}) | {num(r['mean_layer_out_err'], '.4f')} ({rerr}) |")
        print()

    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / len(SERIES)
        for i, (m, flag) in enumerate(SERIES):
            xs, ys = [], []
            for j, s in enumerate(SPARSITY):
                r = by.get(f"{m}@{s}{flag}")
                if r:
                    xs.append(j + (i - (len(SERIES) - 1) / 2) * width)
                    ys.append(r["ppl"])
            if xs:  # fixed colour per series, so a series with no rows does not shift the others
                ax.bar(xs, ys, width, label=m + flag, color=f"C{i}")
        if fp:
            ax.axhline(fp["ppl"], color="k", ls="--", lw=1, label=f"FP {fp['ppl']:.1f}")
        ax.set_yscale("log")
        ax.set_xticks(range(len(SPARSITY)), SPARSITY)
        ax.set_ylabel("WikiText-2 perplexity (log)")
        ax.set_title(f"{first['model']}: 1-bit methods; PBS²P +residual has 2 sign planes", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.png, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

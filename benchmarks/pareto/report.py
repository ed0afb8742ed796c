"""Quality per byte: pbs2p's planned files against llama.cpp's files of the same model (issue: the budget
planner's target, "at every budget pbs2p's planned file has lower perplexity than llama.cpp's best file of no
more bytes").

    python benchmarks/pareto/report.py benchmarks/results/pareto-qwen2.5-coder-0.5b.json \
        --png benchmarks/results/pareto-qwen2.5-coder-0.5b.png

The JSON (written by run.py, which runs both engines and records its commands; the older results' by hand
from the runs their "commands" list) holds {"model", "fp_ppl", "evaluation",
"commands": [...], "points": [{"engine": "pbs2p" | "llama.cpp", "name", "bytes", "ppl", "detail"}]}, bytes
being whole files. Prints a markdown table, each pbs2p file with the best llama.cpp file of no more bytes and
the verdict, each llama.cpp file with pbs2p's best file of no more bytes, and the Pareto front of both.
matplotlib for --png (not a project dependency).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def best_within(points: list[dict], limit: int) -> dict | None:
    """The lowest-perplexity point of no more than `limit` bytes, or None."""
    fit = [p for p in points if p["bytes"] <= limit]
    return min(fit, key=lambda p: p["ppl"]) if fit else None


def front(points: list[dict]) -> list[dict]:
    """The points no other point beats in both bytes and perplexity, by bytes."""
    out, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p["bytes"], p["ppl"])):
        if p["ppl"] < best:
            out.append(p)
            best = p["ppl"]
    return out


def against(mine: list[dict], others: list[dict]) -> list[tuple[dict, dict | None]]:
    """Each of mine, by bytes, with the best of others of no more bytes (None: none that small)."""
    return [(p, best_within(others, p["bytes"])) for p in sorted(mine, key=lambda p: p["bytes"])]


def engines(doc: dict) -> tuple[list[dict], list[dict]]:
    """(pbs2p's points, llama.cpp's points)."""
    return ([p for p in doc["points"] if p["engine"] == "pbs2p"],
            [p for p in doc["points"] if p["engine"] != "pbs2p"])


def verdicts(doc: dict) -> list[tuple[dict, dict | None, str]]:
    ours, theirs = engines(doc)
    out = []
    for p, b in against(ours, theirs):
        if b is None:
            v = "no llama.cpp file this small"
        elif p["ppl"] < b["ppl"]:
            v = "**met**"
        else:
            v = "not met"
        out.append((p, b, v))
    return out


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--png", default=None)
    a = ap.parse_args()
    doc = json.loads(Path(a.json).read_text())
    fp = doc["fp_ppl"]
    print(f"{doc['model']}; {doc['evaluation']}; FP {fp}.\n")
    print("| engine | file | bytes | PPL | × FP | detail |")
    print("|---|---|---|---|---|---|")
    for p in sorted(doc["points"], key=lambda p: p["bytes"]):
        print(f"| {p['engine']} | {p['name']} | {p['bytes']:,} | {p['ppl']:.2f} | {p['ppl'] / fp:.2f} | "
              f"{p.get('detail', '')} |")
    def row(p: dict, b: dict | None, last: str) -> str:
        return (f"| {p['name']} | {mb(p['bytes'])} | {p['ppl']:.2f} | "
                f"{'—' if b is None else b['name'] + ' (' + mb(b['bytes']) + ')'} | "
                f"{'—' if b is None else format(b['ppl'], '.2f')} | {last} |")

    print("\n| pbs2p file | bytes | PPL | llama.cpp's best file of no more bytes | its PPL | target |")
    print("|---|---|---|---|---|---|")
    for p, b, v in verdicts(doc):
        print(row(p, b, v))
    ours, theirs = engines(doc)
    print("\n| llama.cpp file | bytes | PPL | pbs2p's best file of no more bytes | its PPL | pbs2p lower |")
    print("|---|---|---|---|---|---|")
    for q, b in against(theirs, ours):
        print(row(q, b, "—" if b is None else ("yes" if b["ppl"] < q["ppl"] else "no")))
    print("\nPareto front (both engines): " + ", ".join(f"{p['engine']} {p['name']} ({mb(p['bytes'])}, "
                                                       f"{p['ppl']:.2f})" for p in front(doc["points"])))
    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, (eng, pts) in enumerate(zip(("pbs2p", "llama.cpp"), (ours, theirs))):
            pts = sorted(pts, key=lambda p: p["bytes"])
            ax.plot([p["bytes"] / 1e6 for p in pts], [p["ppl"] for p in pts], "o-" if eng == "pbs2p" else "s",
                    color=f"C{i}", label=eng)
            for p in pts:
                ax.annotate(p["name"], (p["bytes"] / 1e6, p["ppl"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.axhline(fp, color="k", ls="--", lw=1, label=f"FP {fp}")
        ax.set_yscale("log")
        ax.set_xlabel("file bytes (MB)")
        ax.set_ylabel("WikiText-2 perplexity (log)")
        ax.set_title(f"{doc['model']}: quality per byte", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.png, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Plot bench-kernels' CSV: GB/s of weights read per kernel and shape (GEMV, streamed from DRAM), with the
measured 1-thread read bandwidth as a line; a second panel shows 8-token GEMM throughput in G weight·tokens/s.

Usage: python3 plot.py results.csv out.png   (needs matplotlib; not a project dependency)
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    rows = list(csv.DictReader(open(src)))
    bw = {r["kernel"]: float(r["gb_per_s"]) for r in rows if r["shape"] == "read-bw"}
    sb = [r for r in rows if r["shape"] != "read-bw" and not r["shape"].startswith("q8_0")]
    kernels = list(dict.fromkeys(r["kernel"] for r in sb))
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    for ax, n_tok, field, label in (
        (axes[0], "1", "gb_per_s", "GEMV (1 token): GB/s of weights, best CPU time of 5"),
        (axes[1], "8", "gweights_per_s", "GEMM (8 tokens): G weight·tokens/s, best CPU time of 5"),
    ):
        sel = [r for r in sb if r["n_tok"] == n_tok and not r["shape"].endswith("hot")]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        width = 0.8 / max(1, len(kernels))
        for i, k in enumerate(kernels):
            vals = [next((float(r[field]) for r in sel if r["shape"] == s and r["kernel"] == k), 0.0)
                    for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=k)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=30, ha="right")
        ax.set_title(label)
        if n_tok == "1" and "1thread" in bw:
            ax.axhline(bw["1thread"], color="k", linestyle="--", label="read BW, 1 thread")
        ax.legend(fontsize=8)
    fig.suptitle("pbs2p sparse-binary kernels, bs=128, T=1 unless noted, single thread")
    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

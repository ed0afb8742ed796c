"""End-to-end speed: pbs2p (bench-e2e, the runtime's pbs2p_eval) vs llama.cpp (llama_speed.py, llama-cpp-python)
on the same models. Every (engine, model file, threads) configuration runs once per repetition, in the same
order each repetition, each in a fresh process (interleaved runs); the table shows medians. The machine's
streaming read bandwidth (bw.c) is measured before and after, in the same run. Writes results.json, a
markdown table (results.md) and a plot (results.png, when matplotlib is importable) into --out.

usage: python run.py --models DIR [--set smollm2|rand1b ...] [--threads 1,2] [--reps 5]
                     [--n-prompt 512] [--n-gen 128] [--pbs2p-kernel auto] [--llama-lib DIR] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LLAMA_TYPES = ["Q4_0", "Q8_0", "Q2_K", "TQ2_0"]


def sh(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 1800) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return r.stdout


def build(build_dir: Path, out: Path) -> tuple[Path, Path]:
    """bench-e2e against the CMake build's static library, and the bandwidth probe."""
    lib = build_dir / "libpbs2p_static.a"
    if not lib.exists():
        raise SystemExit(f"{lib} missing: cmake -S {ROOT} -B {build_dir} -DCMAKE_BUILD_TYPE=Release && "
                         f"cmake --build {build_dir}")
    e2e, bw = out / "bench-e2e", out / "bw"
    sh(["gcc", "-std=c11", "-D_GNU_SOURCE", "-O2", f"-I{ROOT}/runtime/include", str(HERE / "bench-e2e.c"), str(lib),
        "-lpthread", "-lm", "-o", str(e2e)])
    sh(["gcc", "-O2", str(HERE / "bw.c"), "-lpthread", "-o", str(bw)])
    return e2e, bw


def bytes_per_token(path: Path) -> dict[str, float]:
    """Weight bytes read for one decoded token: every tensor except the token embedding, of which one row is
    read, plus the whole embedding again when it is the (tied) output head. File size alongside."""
    import gguf

    r = gguf.GGUFReader(str(path))
    total, emb, emb_rows, has_output = 0, 0, 1, False
    for t in r.tensors:
        n = int(t.n_bytes)
        if t.name == "token_embd.weight":
            emb, emb_rows = n, int(t.shape[-1])
        else:
            total += n
        has_output |= t.name == "output.weight"
    per_tok = total + emb / emb_rows + (0 if has_output else emb)
    return {"file_bytes": path.stat().st_size, "bytes_per_token": per_tok}


def configs(models: Path, sets: list[str], threads: list[int], pbs2p_files: dict[str, str]) -> list[dict]:
    out = []
    for s in sets:
        files = [("pbs2p", "6:8 sign", Path(pbs2p_files.get(s, models / f"{s}-sign68.pbs2p")))]
        q4 = models / f"{s}-sign68-q4head.pbs2p"  # the same layers, Q4_0 embedding/head (make_models.py)
        if q4.exists() and s not in pbs2p_files:
            files.append(("pbs2p", "6:8 sign, Q4_0 head", q4))
        files += [("llama.cpp", t, models / f"{s}-{t}.gguf") for t in LLAMA_TYPES]
        for engine, typ, f in files:
            if not f.exists():
                print(f"skip (missing): {f}", file=sys.stderr)
                continue
            for th in threads:
                out.append({"set": s, "engine": engine, "type": typ, "file": str(f), "threads": th})
    return out


def run_one(c: dict, a: argparse.Namespace, e2e: Path, n_prompt: int, n_gen: int) -> dict:
    if c["engine"] == "pbs2p":
        cmd = [str(e2e), c["file"], str(c["threads"]), str(n_prompt), str(n_gen), str(a.pbs2p_batch), a.pbs2p_kernel]
        env = None
    else:
        cmd = [sys.executable, str(HERE / "llama_speed.py"), c["file"], str(c["threads"]), str(n_prompt), str(n_gen)]
        env = dict(os.environ)
        if a.llama_lib:
            env["LLAMA_CPP_LIB_PATH"] = a.llama_lib
    line = [ln for ln in sh(cmd, env).splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def bandwidth(bw: Path, threads: list[int]) -> dict[int, dict]:
    return {th: json.loads(sh([str(bw), str(th), "1024"])) for th in threads}


def load_avg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True)
    ap.add_argument("--set", nargs="+", default=["smollm2", "rand1b"])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--pbs2p-kernel", default="auto")
    ap.add_argument("--pbs2p-file", action="append", default=[], metavar="SET=PATH",
                    help="pbs2p file of a set (default MODELS/SET-sign68.pbs2p)")
    ap.add_argument("--pbs2p-batch", type=int, default=512, help="pbs2p n_batch (prompt tokens per pass)")
    ap.add_argument("--llama-lib", default="", help="LLAMA_CPP_LIB_PATH for llama_speed.py (e.g. an AVX2 build)")
    ap.add_argument("--build", default="/tmp/build-speed", help="CMake build dir with libpbs2p_static.a")
    ap.add_argument("--out", default="/tmp/pbs2p-speed/out")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = [int(t) for t in a.threads.split(",")]
    e2e, bw = build(Path(a.build), out)
    cfgs = configs(Path(a.models), a.set, threads, dict(kv.split("=", 1) for kv in a.pbs2p_file))
    for c in cfgs:
        c.update(bytes_per_token(Path(c["file"])))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_before": load_avg(),
            "cpu": sh(["sh", "-c", "lscpu | grep -E 'Model name|^CPU\\(s\\)|L2|L3'"]).strip(),
            "args": vars(a), "bw_before": bandwidth(bw, threads)}
    runs: list[dict] = []
    for rep in range(a.reps):
        for c in cfgs:
            n_prompt, n_gen = a.n_prompt, a.n_gen
            r = run_one(c, a, e2e, n_prompt, n_gen)
            r.update({k: c[k] for k in ("set", "engine", "type", "file", "threads")}, rep=rep)
            runs.append(r)
            print(f"rep {rep} {c['set']:8s} {c['engine']:9s} {c['type']:8s} t{c['threads']}: "
                  f"prefill {r['prefill_tok_s']:8.1f} decode {r['decode_tok_s']:8.1f} tok/s", flush=True)
    meta["bw_after"] = bandwidth(bw, threads)
    meta["load_after"] = load_avg()
    rows = summarize(cfgs, runs, meta, threads)
    (out / "results.json").write_text(json.dumps({"meta": meta, "configs": cfgs, "runs": runs, "rows": rows},
                                                 indent=1))
    md = table(rows, meta)
    (out / "results.md").write_text(md)
    print(md)
    try:
        plot(rows, out / "results.png")
    except ImportError:
        print("matplotlib not importable: no plot", file=sys.stderr)


def summarize(cfgs: list[dict], runs: list[dict], meta: dict, threads: list[int]) -> list[dict]:
    rows = []
    for c in cfgs:
        rs = [r for r in runs if r["file"] == c["file"] and r["threads"] == c["threads"]]
        bw_gbs = max(meta["bw_before"][c["threads"]]["best_gbs"], meta["bw_after"][c["threads"]]["best_gbs"])
        dec = statistics.median(r["decode_tok_s"] for r in rs)
        bound = bw_gbs * 1e9 / c["bytes_per_token"]
        # CPU-time normalized rates: tokens / (process CPU seconds / threads) — what `threads` dedicated cores
        # would give if the run's CPU time were its wall time (this VM's vCPUs are shared; spinning counts)
        cdec = statistics.median(r["n_gen"] / (r["decode_cpu_s"] / r["threads"]) for r in rs)
        cpre = statistics.median(r["n_prompt"] / (r["prefill_cpu_s"] / r["threads"]) for r in rs)
        rows.append({**c, "n": len(rs), "decode_tok_s": dec, "decode_cpu_norm": cdec, "prefill_cpu_norm": cpre,
                     "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in rs),
                     "decode_min": min(r["decode_tok_s"] for r in rs), "decode_max": max(r["decode_tok_s"] for r in rs),
                     "bw_gbs": bw_gbs, "bw_bound_tok_s": bound, "of_bound": dec / bound})
    for row in rows:  # ratio to llama.cpp's fastest type on the same set and threads
        peers = [r for r in rows if r["set"] == row["set"] and r["threads"] == row["threads"] and r["engine"] == "llama.cpp"]
        if peers:
            best_dec = max(peers, key=lambda r: r["decode_tok_s"])
            q40 = [r for r in peers if r["type"] == "Q4_0"]
            row["decode_vs_best_llama"] = row["decode_tok_s"] / best_dec["decode_tok_s"]
            row["best_llama_type"] = best_dec["type"]
            best_c = max(peers, key=lambda r: r["decode_cpu_norm"])
            row["decode_cpu_vs_best_llama"] = row["decode_cpu_norm"] / best_c["decode_cpu_norm"]
            row["best_llama_type_cpu"] = best_c["type"]
            if q40:
                row["prefill_vs_q4_0"] = row["prefill_tok_s"] / q40[0]["prefill_tok_s"]
                row["prefill_cpu_vs_q4_0"] = row["prefill_cpu_norm"] / q40[0]["prefill_cpu_norm"]
    return rows


def table(rows: list[dict], meta: dict) -> str:
    bw = ", ".join(f"{t} thr {meta['bw_before'][t]['best_gbs']:.1f}/{meta['bw_after'][t]['best_gbs']:.1f} GB/s"
                   for t in meta["bw_before"])
    lines = [f"Date {meta['date']}; load average before {meta['load_before']}, after {meta['load_after']}; "
             f"read bandwidth (best, before/after) {bw}.", "",
             "| model | engine | type | thr | file MB | MB read/token | prefill tok/s | decode tok/s (min–max) | "
             "decode / best llama.cpp | prefill / llama Q4_0 | bandwidth bound tok/s | of bound | "
             "CPU-norm. prefill | CPU-norm. decode | CPU-norm. decode / best llama | CPU-norm. prefill / Q4_0 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['decode_vs_best_llama']:.2f}x ({r['best_llama_type']})" if "decode_vs_best_llama" in r else ""
        pq = f"{r['prefill_vs_q4_0']:.2f}x" if "prefill_vs_q4_0" in r else ""
        lines.append(f"| {r['set']} | {r['engine']} | {r['type']} | {r['threads']} | {r['file_bytes'] / 1e6:.1f} | "
                     f"{r['bytes_per_token'] / 1e6:.1f} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} "
                     f"({r['decode_min']:.1f}–{r['decode_max']:.1f}) | {vs} | {pq} | {r['bw_bound_tok_s']:.1f} | "
                     f"{100 * r['of_bound']:.0f} % | {r['prefill_cpu_norm']:.1f} | {r['decode_cpu_norm']:.1f} | "
                     + (f"{r['decode_cpu_vs_best_llama']:.2f}x ({r['best_llama_type_cpu']})" if "decode_cpu_vs_best_llama" in r else "")
                     + " | " + (f"{r['prefill_cpu_vs_q4_0']:.2f}x" if "prefill_cpu_vs_q4_0" in r else "") + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["set"] for r in rows})
    fig, axes = plt.subplots(len(sets), 2, figsize=(12, 3.6 * len(sets)), squeeze=False)
    for i, s in enumerate(sets):
        for j, (key, title) in enumerate([("decode_tok_s", "decode tok/s"), ("prefill_tok_s", "prefill tok/s")]):
            ax = axes[i][j]
            rs = [r for r in rows if r["set"] == s]
            labels = sorted({f"{r['engine']} {r['type']}" for r in rs}, key=lambda x: (not x.startswith("pbs2p"), x))
            ths = sorted({r["threads"] for r in rs})
            w = 0.8 / len(ths)
            for k, th in enumerate(ths):
                vals = [next((r[key] for r in rs if f"{r['engine']} {r['type']}" == lab and r["threads"] == th), 0)
                        for lab in labels]
                ax.bar([x + k * w for x in range(len(labels))], vals, w, label=f"{th} thread(s)")
            if key == "decode_tok_s":
                for k, th in enumerate(ths):
                    b = [r for r in rs if r["engine"] == "pbs2p" and r["threads"] == th]
                    if b:
                        ax.axhline(b[0]["bw_bound_tok_s"], ls="--", lw=0.8, color=f"C{k}",
                                   label=f"pbs2p bandwidth bound, {th} thr")
            ax.set_xticks([x + w * (len(ths) - 1) / 2 for x in range(len(labels))])
            ax.set_xticklabels(labels, rotation=20, fontsize=8)
            ax.set_title(f"{s}: {title} (median)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

"""benchmarks/pareto/report.py: each pbs2p file is judged against llama.cpp's best file of no more bytes (a bigger
llama.cpp file, however good, is not the comparison; a smaller, worse one does not hide a better one)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "pareto" / "report.py"
RUN = REPORT.with_name("run.py")


def _verdicts(tmp_path: Path, points: list[tuple[str, str, int, float]]) -> dict[str, list[str]]:
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"model": "m", "fp_ppl": 10.0, "evaluation": "e", "commands": [],
                             "points": [{"engine": e, "name": n, "bytes": b, "ppl": p} for e, n, b, p in points]}))
    out = subprocess.run([sys.executable, str(REPORT), str(f)], capture_output=True, text=True, check=True).stdout
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "MB" in ln and ln.count("|") == 7]
    return {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in rows}


def test_best_llama_file_of_no_more_bytes(tmp_path):
    v = _verdicts(tmp_path, [("pbs2p", "a", 100_000_000, 50.0), ("pbs2p", "b", 200_000_000, 20.0),
                             ("pbs2p", "c", 300_000_000, 30.0),
                             ("llama.cpp", "X", 150_000_000, 40.0), ("llama.cpp", "Y", 160_000_000, 25.0),
                             ("llama.cpp", "Z", 250_000_000, 10.0), ("llama.cpp", "big", 400_000_000, 1.0)])
    assert v["a"][-1] == "no llama.cpp file this small" and v["a"][2] == "—"
    assert v["b"][2].startswith("Y (160.0 MB)") and v["b"][-1] == "**met**"       # Y beats X within the bytes
    assert v["c"][2].startswith("Z (250.0 MB)") and v["c"][-1] == "not met"       # "big" is over c's bytes


def test_equal_bytes_count_as_no_more(tmp_path):
    v = _verdicts(tmp_path, [("pbs2p", "a", 100, 5.0), ("llama.cpp", "X", 100, 5.0)])
    assert v["a"][2].startswith("X") and v["a"][-1] == "not met"                  # a tie is not "lower"


def test_each_llama_file_against_pbs2p_of_no_more_bytes(tmp_path):
    v = _verdicts(tmp_path, [("pbs2p", "a", 100_000_000, 50.0), ("pbs2p", "b", 200_000_000, 20.0),
                             ("llama.cpp", "X", 90_000_000, 40.0), ("llama.cpp", "Y", 150_000_000, 45.0),
                             ("llama.cpp", "Z", 250_000_000, 10.0)])
    assert v["X"][2] == "—" and v["X"][-1] == "—"                                  # no pbs2p file this small
    assert v["Y"][2].startswith("a (100.0 MB)") and v["Y"][-1] == "no"             # b is over Y's bytes
    assert v["Z"][2].startswith("b (200.0 MB)") and v["Z"][-1] == "no"


def _run_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pareto_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_reads_the_plan_table_the_exporter_prints():
    from pbs2p import format as fmt

    plan = fmt.Plan(3.0, "fisher", ("q8_0", "q4_0", "q3", "pbs2p-6:8"),
                    [fmt.PlanEntry("blk.0.attn_q", "q3", 14, 0.1, 32), fmt.PlanEntry("blk.0.attn_k", "q3", 14, 0.1, 32),
                     fmt.PlanEntry("blk.0.ffn_up", "pbs2p-6:8", 13, 0.2, 64),
                     fmt.PlanEntry("blk.0.ffn_down", "q8_0", 34, 0.0, 32)])
    log = "calibration: x\n" + plan.table(per_layer=False) + "\nmethod plan, calibration: x\n"
    assert _run_module().plan_detail(log) == "1 Q8_0, 2 Q3, 1 PBS²P 6:8"  # by bytes, as printed


def test_run_makes_and_then_only_collects(tmp_path, tiny_model_factory):
    """pbs2p-only run on a tiny model: the FP and planned files scored, the JSON written; run again, every step's
    output is there, nothing runs (the files keep their times) and the JSON is the same."""
    src = tiny_model_factory("llama")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 97} of the {i % 13} things" for i in range(600)))
    work, out = tmp_path / "w", tmp_path / "p.json"
    argv = [sys.executable, str(RUN), str(src), "--work", str(work), "--name", "tiny", "--calib", str(text),
            "--nsamples", "3", "--seqlen", "24", "--text", str(text), "--windows", "2", "--eval-seqlen", "64",
            "--bpw", "4", "--out", str(out)]
    subprocess.run(argv, check=True, capture_output=True, text=True)
    doc = json.loads(out.read_text())
    (pt,) = doc["points"]
    assert pt["engine"] == "pbs2p" and pt["name"] == "--bpw 4 --sb-code nm"
    assert pt["bytes"] == (work / "nm4.bin").stat().st_size and pt["ppl"] > 1 and doc["fp_ppl"] > 1
    assert pt["detail"] and all(part.split(" ", 1)[0].isdigit() for part in pt["detail"].split(", "))
    assert any(c.startswith("pbs2p-export ") and "--bpw 4" in c for c in doc["commands"])
    times = {f.name: f.stat().st_mtime_ns for f in work.iterdir()}
    r = subprocess.run(argv, check=True, capture_output=True, text=True)
    assert "+ " not in r.stderr, r.stderr
    assert {f.name: f.stat().st_mtime_ns for f in work.iterdir()} == times
    assert json.loads(out.read_text()) == doc

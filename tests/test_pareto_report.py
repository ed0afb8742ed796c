"""benchmarks/pareto/report.py: each pbs2p file is judged against llama.cpp's best file of no more bytes (a bigger
llama.cpp file, however good, is not the comparison; a smaller, worse one does not hide a better one)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "pareto" / "report.py"


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

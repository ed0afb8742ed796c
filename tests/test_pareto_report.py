"""benchmarks/pareto: report.py judges each pbs2p file against llama.cpp's best file of no more bytes (a bigger
llama.cpp file, however good, is not the comparison; a smaller, worse one does not hide a better one); run.py
runs and collects a comparison; tie_gguf.py stores a tied source's matrix once."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert _run_module().plan_detail(plan.table(per_layer=False) + "\n" + log) == "1 Q8_0, 2 Q3, 1 PBS²P 6:8"


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


def test_tie_gguf_drops_the_second_copy(tmp_path, tiny_model_factory):
    """benchmarks/pareto/tie_gguf.py on a stock GGUF of an untied model whose head is a copy of its table: every key
    and tensor kept byte for byte except output.weight, whose bytes and type token_embd.weight takes; the model
    transformers reads from it has its head tied to those values. Two different matrices are refused."""
    import importlib.util

    import gguf
    import torch
    import transformers

    from pbs2p.exporter import config, driver, models

    m = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))
    with torch.no_grad():
        e = m.get_input_embeddings().weight
        m.lm_head.weight.copy_(e * 1.02)
    d = tmp_path / "twice"
    m.save_pretrained(d)
    transformers.AutoTokenizer.from_pretrained(tiny_model_factory("llama")).save_pretrained(d)
    src, out = tmp_path / "src.gguf", tmp_path / "tied.gguf"
    driver.export(str(d), src, config.QuantConfig(method="fp16", progress=False), format="gguf-llama")
    spec = importlib.util.spec_from_file_location("tie_gguf", RUN.with_name("tie_gguf.py"))
    tg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tg)
    assert 0.015 < tg.tie(src, out) < 0.025
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(out)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(tb) == set(ta) - {"output.weight"}
    for name, t in tb.items():
        s = ta["output.weight"] if name == "token_embd.weight" else ta[name]
        assert t.tensor_type == s.tensor_type and bytes(t.data) == bytes(s.data), name
    keys = lambda r: {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}  # noqa: E731
    assert keys(a) == keys(b)
    tied = models.load_gguf_model(out)
    assert tied.lm_head.weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    assert torch.allclose(tied.lm_head.weight, models.load_gguf_model(src).lm_head.weight)

    driver.export(str(tiny_model_factory("llama")), tmp_path / "two.gguf", config.QuantConfig(method="fp16",
                                                                                          progress=False),
                  format="gguf-llama")
    with pytest.raises(SystemExit, match="not one matrix"):
        tg.tie(tmp_path / "two.gguf", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()

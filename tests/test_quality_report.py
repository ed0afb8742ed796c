"""benchmarks/quality/report.py: the PBS²P-vs-baseline table names the best baseline over all files and over
those with PBS²P's storage bits per weight (a baseline with a bigger file must not pass as the same-byte one)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "report.py"


def _row(config: str, ppl: float, bpw: float) -> dict:
    method, nm = config.split("@")
    return {"config": config, "model": "m.gguf", "calibration": "c", "eval": "e", "machine": "x", "method": method,
            "nm": nm, "flags": [], "export_s": 1.0, "mean_layer_out_err": 0.1, "last_block_err": 0.1,
            "file_bytes": 1000, "storage_bpw": bpw, "file_bpw": bpw, "param_bits": 0.75, "ppl": ppl,
            "tokens_scored": 10, "eval_s": 1.0}


def _table(text: str, starts: tuple[str, ...]) -> dict[str, list[str]]:
    """The markdown rows of text that start with one of starts, by first cell."""
    return {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in text.splitlines() if ln.startswith(starts)}


def _report(tmp_path: Path, rows: list[dict]) -> str:
    """report.py's markdown for these JSON lines."""
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return subprocess.run([sys.executable, str(REPORT), str(f)], capture_output=True, text=True, check=True).stdout


def test_comparison_separates_same_bpw_baselines(tmp_path: Path) -> None:
    rows = [_row("pbs2p@6:8", 2000.0, 2.25), _row("stbllm@6:8", 5000.0, 2.25), _row("billm@6:8", 600.0, 4.375),
            _row("pbs2p@4:8", 1000.0, 2.25), _row("billm@4:8", 3000.0, 4.375),
            dict(_row("pbs2p@6:8", 900.0, 4.375), config="pbs2p@6:8+salient", flags=["salient"]),
            dict(_row("pbs2p@4:8", 1500.0, 2.25), config="pbs2p@4:8+coarse", flags=["coarse"])]
    out = _report(tmp_path, rows)
    table = _table(out, ("| 6:8 ", "| 4:8 "))
    assert list(table) == ["6:8", "6:8 +salient", "4:8", "4:8 +coarse"]
    assert table["6:8"] == ["2000 (2.25)", "billm 600 (4.38)", "0.30×", "stbllm 5000", "2.50×"]
    # no baseline at PBS²P's bpw: the same-byte columns stay empty rather than borrowing BiLLM's
    assert table["4:8"] == ["1000 (2.25)", "billm 3000 (4.38)", "3.00×", "—", "—"]
    # PBS²P with its salient plane has BiLLM's bytes: its own row, BiLLM as the same-byte rival
    assert table["6:8 +salient"] == ["900 (4.38)", "billm 600 (4.38)", "0.67×", "billm 600", "0.67×"]
    # PBS²P with the paper's coarse stage (not the default) gets its own row too
    assert table["4:8 +coarse"] == ["1500 (2.25)", "billm 3000 (4.38)", "2.00×", "—", "—"]


def test_ablation_rows_name_their_nearest_reference(tmp_path: Path) -> None:
    def flagged(config: str, ppl: float) -> dict:
        base, *flags = config.split("+")
        return dict(_row(base, ppl, 4.375), config=config, flags=flags)

    rows = [_row("pbs2p@6:8", 2000.0, 2.25), flagged("pbs2p@6:8+residual", 50.0),
            flagged("pbs2p@6:8+residual+magnitude", 55.0), flagged("pbs2p@6:8+salient+coarse", 1800.0),
            flagged("pbs2p@5:8+residual", 60.0)]
    out = _report(tmp_path, rows)
    table = _table(out[out.index("### Ablations"):], ("| `",))
    # one flag less: the ablation flag is the change, the two-plane variant the reference
    assert table["`pbs2p@6:8+residual+magnitude`"][:2] == ["`pbs2p@6:8+residual`", "magnitude score instead of OBS"]
    assert table["`pbs2p@6:8+residual+magnitude`"][2] == "55 (50)"
    assert table["`pbs2p@6:8+residual`"][0] == "`pbs2p@6:8`"
    # `+salient` alone was not measured: read against the default, every flag named as a change
    assert table["`pbs2p@6:8+salient+coarse`"][0] == "`pbs2p@6:8`"
    assert "salient columns" in table["`pbs2p@6:8+salient+coarse`"][1]
    assert "coarse stage" in table["`pbs2p@6:8+salient+coarse`"][1]
    # no default at 5:8: no reference rather than a wrong one
    assert table["`pbs2p@5:8+residual`"][0] == "—"


def test_repeated_config_is_read_from_its_latest_run(tmp_path: Path) -> None:
    rows = [_row("pbs2p@6:8", 2000.0, 2.25), dict(_row("pbs2p@6:8", 49.0, 4.375), config="pbs2p@6:8+residual",
                                                   flags=["residual"], note="old code"),
            _row("stbllm@6:8", 5000.0, 2.25),
            dict(_row("pbs2p@6:8", 45.6, 4.375), config="pbs2p@6:8+residual", flags=["residual"])]
    out = _report(tmp_path, rows)
    # the comparison and ablation tables take the latest run, once
    assert _table(out, ("| 6:8 ",))["6:8 +residual"][0] == "45.6 (4.38)"
    abl = _table(out[out.index("### Ablations"):], ("| `",))
    assert abl["`pbs2p@6:8+residual`"][2] == "45.6 (2000)"
    assert out[out.index("### Ablations"):].count("`pbs2p@6:8+residual`") == 1
    # every run is listed, numbered; the repeats table gives both and their spread
    every = _table(out[out.index("### Every run"):out.index("### Repeated")], ("| `",))
    assert every["`pbs2p@6:8+residual` (run 1/2)"][0] == "49"
    assert every["`pbs2p@6:8+residual` (run 2/2)"][0] == "45.6"
    assert "`pbs2p@6:8` (run" not in out
    rep = _table(out[out.index("### Repeated"):out.index("### Ablations")], ("| `",))
    assert rep == {"`pbs2p@6:8+residual`": ["49 → 45.6", "0.1000 → 0.1000", "7.5 %", "run 1: old code"]}

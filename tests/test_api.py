"""The public export API: pbs2p.quantize(model, QuantConfig(...), calib=...) -> Result, .save(path), .records;
the CLI is a thin wrapper over it (same bytes for the same request)."""
from __future__ import annotations

import hashlib
from pathlib import Path
import subprocess
import sys

import pytest
import torch
import transformers

import pbs2p
from pbs2p import format as fmt
from pbs2p.exporter import ExportError, QuantConfig, SolverConfig, fakequant

from conftest import TINY_TEXT


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(TINY_TEXT)
    return p


def test_quantize_save_records(tiny_model_factory, calib_file, tmp_path):
    folder = tiny_model_factory("qwen2")
    cfg = pbs2p.QuantConfig(method="pbs2p", nm="6:8", nsamples=4, seqlen=32, progress=False)
    result = pbs2p.quantize(str(folder), cfg, calib=str(calib_file))
    n_linears = 2 * 7
    assert len(result.records) == n_linears
    assert {(r.n, r.m) for r in result.records} == {(6, 8)}
    assert all(0 <= r.err_out < 1 and 0 < r.err_w < 1 for r in result.records)
    stats = result.save(tmp_path / "m.bin")
    assert stats["file_bytes"] == (tmp_path / "m.bin").stat().st_size
    assert stats["linear_bytes"] == sum(r.nbytes for r in result.records)
    assert stats["param_bits"] == pytest.approx(0.75)
    # the in-memory fake-quant model is what the file holds
    ids = torch.arange(1, 17)[None]
    file_model = fakequant.load_fakequant(tmp_path / "m.bin")
    assert torch.equal(result.model(ids).logits, file_model(ids).logits)
    with pytest.raises(FileExistsError):
        result.save(tmp_path / "m.bin")

    # the CLI asks the same of the same code: the same bytes
    out = tmp_path / "cli.bin"
    subprocess.run([sys.executable, "-m", "pbs2p.exporter.cli", str(folder), "--out", str(out), "-q",
                    "--no-checkpoint", "--nm", "6:8", "--nsamples", "4", "--seqlen", "32", "--calib",
                    str(calib_file)], check=True, capture_output=True)
    assert sha(out) == sha(tmp_path / "m.bin")


def test_model_object_and_token_windows(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    windows = torch.randint(0, len(tok), (3, 24), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(method="arb", nm="2:4", solver=SolverConfig(salient=True), progress=False)
    with pytest.raises(ExportError, match="tokenizer"):
        pbs2p.quantize(model, cfg, calib=windows)
    result = pbs2p.quantize(model, cfg, calib=windows, tokenizer=tok)
    assert result.calibration == "given windows: 3 x 24 tokens"
    assert result.model is model
    result.save(tmp_path / "o.bin")
    mf = fmt.ModelFile(tmp_path / "o.bin")
    assert mf.kv[fmt.KEY_METHOD] == "arb" and mf.kv[fmt.KEY_NM_M] == 4
    assert mf.sb("blk.0.attn_q").n_terms == 2  # the salient term


def test_config_errors():
    assert QuantConfig(nm="dense").nm is None and QuantConfig(nm=(4, 8)).solver.n == 4
    assert QuantConfig(method="fp16", nm="2:4").nm is None
    for bad, msg in ((dict(method="gptq"), "--method"), (dict(nm="6:7"), "M must be one of 4, 8"),
                     (dict(nm="9:8"), "N must be in"), (dict(embed_type="q2_k"), "--embed-type"),
                     (dict(solver=SolverConfig(method="arb")), "not on its nested SolverConfig")):
        with pytest.raises(ExportError, match=msg):
            QuantConfig(**bad)


def test_example_script(tiny_model_factory, calib_file, tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ex.bin"
    r = subprocess.run([sys.executable, str(root / "examples" / "quantize.py"), str(tiny_model_factory("opt")),
                        str(out), "--nm", "5:8", "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "16"],
                       capture_output=True, text=True, check=True)
    lines = r.stdout.splitlines()
    assert len(lines) == 2 * 6 + 1 and all(" 5:8 " in ln for ln in lines[:-1]), r.stdout
    assert lines[-1].startswith(f"{out}: {out.stat().st_size:,} bytes")

"""`pbs2p-export --format hf`: a transformers folder holding exactly the weights of the pbs2p file the same export
writes. Checked on a tiny seeded model of each family: every parameter of the reloaded folder equals the file's
dequantized tensor bit for bit (so its logits equal the fake-quant reference's exactly), the tokenizer is the
source's, the provenance record is the file's storage counts, and a refused or failed export leaves nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FAMILIES, TINY_TEXT
from pbs2p import format as fmt
from pbs2p.exporter import cli, config, driver, fakequant, hf_export


def _cfg():
    return config.QuantConfig(nm=(6, 8), nsamples=4, seqlen=32, progress=False, calib="self")


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_holds_the_file_weights(tiny_model_factory, tmp_path, family):
    import transformers

    src = tiny_model_factory(family)
    # the same export twice: the pbs2p file, and the folder (deterministic: the same bytes go into both)
    _, stats = driver.export(str(src), tmp_path / "m.bin", _cfg())
    _, record = driver.export(str(src), tmp_path / "hf", _cfg(), format="hf")
    assert record["file_bytes"] == stats["file_bytes"] and record["storage_bpw"] == stats["storage_bpw"]
    saved = json.loads((tmp_path / "hf" / hf_export.PROVENANCE).read_text())
    assert saved["family"] == family and saved["nm_n"] == [6, 6] and saved["format_version"] == fmt.BASE_FORMAT_VERSION

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ref = fakequant.load_fakequant(tmp_path / "m.bin", act_quant=False)
    got, want = hf.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the sparse-binary linears really are N:M binary: at most 3 distinct values per row block, 2 of 8 exactly zero
    w = got[next(k for k in got if k.endswith("q_proj.weight"))]
    assert (w.reshape(w.shape[0], -1, 8) == 0).sum(-1).eq(2).all()
    assert all(len(torch.unique(row)) <= 3 for row in w[:, :128])  # 0 and α·(±1) + μ of the first column block

    tok_src = transformers.AutoTokenizer.from_pretrained(src)
    tok_hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok_src(TINY_TEXT[:200])["input_ids"]
    assert tok_hf(TINY_TEXT[:200])["input_ids"] == ids
    with torch.no_grad():
        x = torch.tensor([ids])
        assert torch.equal(hf(x).logits, ref(x).logits)


def test_hf_cli_and_refusals(tiny_model_factory, tmp_path, capsys):
    src = str(tiny_model_factory("llama"))
    out = tmp_path / "hf"
    assert cli.main([src, "--out", str(out), "--format", "hf", "--nsamples", "4", "--seqlen", "32", "-q"]) == 0
    assert "transformers folder" in capsys.readouterr().out and (out / "config.json").is_file()
    before = sorted(p.name for p in tmp_path.iterdir())
    # an existing folder without --force, a file where the folder should go, a missing parent: refused before work
    for target in (out, tmp_path / "m.bin", tmp_path / "no" / "hf"):
        if target.name == "m.bin":
            target.write_bytes(b"x")
        assert cli.main([src, "--out", str(target), "--format", "hf", "-q"]) == 1
        assert "pbs2p-export: error: --out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["m.bin"])  # no temporary folder left
    assert cli.main([src, "--out", str(out), "--format", "hf", "--force", "--nsamples", "4", "--seqlen", "32",
                     "-q"]) == 0
    with pytest.raises(SystemExit) as e:  # not a choice: argparse's usage error
        cli.main([src, "--out", str(tmp_path / "x"), "--format", "tflite", "-q"])
    assert e.value.code == 2


def test_hf_save_failure_leaves_nothing(tiny_model_factory, tmp_path, monkeypatch):
    result = driver.quantize(str(tiny_model_factory("qwen2")), _cfg())

    def broken(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(result.loaded.tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        result.save(tmp_path / "hf", format="hf")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(config.ExportError, match="--format"):
        result.save(tmp_path / "x", format="gguf")


def test_hf_from_file_builds_its_tokenizer(tiny_model_factory, tmp_path):
    """save_hf on a file alone: the tokenizer comes from the file's tokenizer.* keys (llama, qwen2)."""
    import transformers

    src = tiny_model_factory("llama")
    driver.export(str(src), tmp_path / "m.bin", _cfg())
    hf_export.save_hf(tmp_path / "m.bin", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = transformers.AutoTokenizer.from_pretrained(src)(TINY_TEXT[:200])["input_ids"]
    assert tok(TINY_TEXT[:200])["input_ids"] == ids
    assert np.isfinite(json.loads((tmp_path / "hf" / hf_export.PROVENANCE).read_text())["storage_bpw"])

"""--tie-head: one matrix for the token table and the output head where the source holds two copies of one matrix
(a GGUF of a model trained with tied embeddings stores e.g. a Q4_K table and a Q6_K head); refused where they are
two matrices."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pbs2p import format as fmt
from pbs2p.exporter import config, driver
from conftest import run_export_cli  # noqa: E402

FAST = ["--bpw", "4", "--nsamples", "3", "--seqlen", "24", "-q", "--no-checkpoint"]


@pytest.fixture
def twice_stored(tmp_path, tiny_model_factory, tiny_tokenizer):
    """A tiny untied Llama whose head is its token table plus 3 % noise: one matrix stored twice."""
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        e = m.get_input_embeddings().weight
        m.lm_head.weight.copy_(e + 0.03 * e.std() * torch.randn(e.shape, generator=g))
    d = tmp_path / "twice"
    m.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def test_tie_head_stores_one_matrix_the_chain_exact(capsys, tmp_path, twice_stored):
    from pbs2p import Runtime
    from pbs2p.exporter import fakequant

    plain, tied = tmp_path / "plain.bin", tmp_path / "tied.bin"
    assert run_export_cli(capsys, [str(twice_stored), "--out", str(plain), *FAST])[0] == 0
    rc, err = run_export_cli(capsys, [str(twice_stored), "--out", str(tied), "--tie-head", *FAST])
    assert rc == 0, err
    assert "--tie-head: one matrix for the head and the token table" in err and "differed by 3." in err
    a, b = fmt.ModelFile(plain), fmt.ModelFile(tied)
    assert "output.weight" in a.tensors and "output.weight" not in b.tensors
    head = int(a.tensors["output.weight"].n_bytes)
    assert plain.stat().st_size - tied.stat().st_size >= head
    # the tied file's table holds the head's values (Q8_0 of the source head)
    cfg = config.QuantConfig(method="plan", bpw=4.0, nsamples=3, seqlen=24, progress=False, tie_head=True)
    res = driver.quantize(str(twice_stored), cfg)
    res.save(tmp_path / "api.bin")
    assert (tmp_path / "api.bin").read_bytes() == tied.read_bytes()
    ref = fakequant.load_fakequant(tied)
    mine = dict(res.model.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.equal(p, mine[name].detach()), name
    assert ref.lm_head.weight.data_ptr() == ref.get_input_embeddings().weight.data_ptr()
    seq = list(range(3, 40))
    with torch.no_grad():
        want = fakequant.load_fakequant(tied, act_quant=True)(torch.tensor([seq])).logits[0].numpy()
    with Runtime(str(tied), threads=1) as rt:
        got = rt.logits(seq)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_tie_head_on_a_tied_model_changes_nothing(capsys, tmp_path, tiny_model_factory):
    src = str(tiny_model_factory("qwen2"))
    plain, tied = tmp_path / "plain.bin", tmp_path / "tied.bin"
    assert run_export_cli(capsys, [src, "--out", str(plain), *FAST])[0] == 0
    rc, err = run_export_cli(capsys, [src, "--out", str(tied), "--tie-head", *FAST])
    assert rc == 0 and "one tensor already" in err, err
    assert plain.read_bytes() == tied.read_bytes()


def test_tie_head_refuses_two_matrices_before_any_work(capsys, tmp_path, tiny_model_factory, monkeypatch):
    from pbs2p.exporter import calib

    def boom(*a, **k):
        raise AssertionError("calibration started")

    monkeypatch.setattr(calib, "get_windows", boom)
    out = tmp_path / "m.bin"
    rc, err = run_export_cli(capsys, [str(tiny_model_factory("llama")), "--out", str(out), "--tie-head", *FAST])
    assert rc != 0 and "--tie-head: the output head and the token table differ by" in err and "not tied" in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []

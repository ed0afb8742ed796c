"""`--format onnx` (exporter/onnx_export.py): the compressed model as an onnxruntime graph with a KV cache. On tiny
seeded models of each family, covering every code (Q8_0, Q4_0, Q3, sparse-binary with and without μ, two binary
terms, Q4_0 / Q8_0 embeddings, tied and untied heads, biases, learned positions): onnxruntime's logits equal the
PyTorch fake-quant model's (the file's exact weights, float activations) within 1e-4 of their range, greedy decoding
through the cache gives the same 32 tokens as transformers' generate, and every linear is stored packed (uint8
MatMulNBits blocks, float16 scales), never as float. SmolLM2 (slow): the same on the real model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import need

from pbs2p import format as fmt



@pytest.fixture(scope="module", autouse=True)
def _onnxruntime():
    import importlib.util

    need(importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"),
         "onnx / onnxruntime not installed (pip install 'pbs2p[export]')")

PROMPT = [5, 77, 140, 9, 201, 33, 260, 18, 95, 301, 47, 12]
FIXTURES = {  # name: (family, QuantConfig keywords)
    "plan": ("llama", dict(method="plan", bpw=4.2, codes=("q8_0", "q4_0", "q3"), embed_type="q4_0")),
    "sb": ("qwen2", dict(nm=(6, 8))),
    "residual": ("opt", dict(nm=(5, 8), residual=True)),
    "symmetric": ("llama", dict(nm=(6, 8), symmetric=True, embed_type="q8_0")),
}


@pytest.fixture(scope="module")
def files(tiny_model_factory, tiny_tokenizer, tmp_path_factory):
    """name -> (pbs2p file, onnx file, record)."""
    from pbs2p.exporter import config, driver, onnx_export

    out = tmp_path_factory.mktemp("onnx")
    made = {}
    for name, (family, kw) in FIXTURES.items():
        solver = {k: kw.pop(k) for k in ("residual", "symmetric") if k in kw}
        cfg = config.QuantConfig(**kw, solver=config.solver_config(**solver), nsamples=4, seqlen=32, progress=False,
                                 calib="self")
        kw.update(solver)
        src = out / f"{name}.pbs2p"
        driver.export(str(tiny_model_factory(family)), src, cfg)
        dst = out / f"{name}.onnx"
        made[name] = (src, dst, onnx_export.save_onnx(src, dst, tokenizer=tiny_tokenizer))
    return made


def _reference(src):
    from pbs2p.exporter import fakequant

    return fakequant.load_fakequant(src, act_quant=False)


@pytest.mark.parametrize("name", list(FIXTURES))
def test_logits_and_greedy_tokens_equal_fakequant(files, name):
    from pbs2p.exporter.onnx_export import OnnxModel

    src, dst, _ = files[name]
    ref = _reference(src)
    om = OnnxModel(dst, threads=1)
    got, cache = om.forward(np.asarray([PROMPT]), om.empty_cache(), 0)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits.numpy()
    span = float(want.max() - want.min())
    assert np.abs(got - want).max() <= 1e-4 * span, (name, np.abs(got - want).max() / span)
    # the cache: one token decoded after the prompt equals the prompt + token prefilled at once
    step, _ = om.forward(np.asarray([[7]]), cache, len(PROMPT))
    full, _ = om.forward(np.asarray([PROMPT + [7]]), om.empty_cache(), 0)
    assert np.abs(step[0, -1] - full[0, -1]).max() <= 1e-4 * span
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([PROMPT]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert om.generate(PROMPT, 32) == theirs[0, len(PROMPT):].tolist()


def test_padded_batch_equals_single_sequences(files):
    """attention_mask: a left-padded row of a batch gives the logits that row gives alone."""
    from pbs2p.exporter.onnx_export import OnnxModel

    _, dst, _ = files["sb"]
    om = OnnxModel(dst, threads=1)
    a, b = PROMPT, PROMPT[3:]
    pad = len(a) - len(b)
    ids = np.asarray([a, [0] * pad + b])
    mask = np.asarray([[1] * len(a), [0] * pad + [1] * len(b)])
    pos = np.asarray([list(range(len(a))), [0] * pad + list(range(len(b)))])
    outs = om.session.run(["logits"], {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                       **om.empty_cache(2)})[0]
    alone_a = om.forward(np.asarray([a]), om.empty_cache(), 0)[0][0]
    alone_b = om.forward(np.asarray([b]), om.empty_cache(), 0)[0][0]
    span = float(alone_a.max() - alone_a.min())
    assert np.abs(outs[0] - alone_a).max() <= 1e-4 * span
    assert np.abs(outs[1, pad:] - alone_b).max() <= 1e-4 * span


def test_weights_stay_packed_and_bytes_are_counted(files):
    import onnx

    for name, (src, dst, rec) in files.items():
        m = onnx.load(str(dst))
        mf = fmt.ModelFile(src)
        linears = set(mf.linear_prefixes())
        lin_bytes = 0
        for t in m.graph.initializer:
            pre = ".".join(t.name.split(".")[:3])
            if pre not in linears or t.name.endswith(".bias"):
                continue
            assert t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT16), (name, t.name)
            lin_bytes += onnx.numpy_helper.to_array(t).nbytes
        # MatMulNBits pads K to whole blocks: the bytes counted are the bytes stored
        assert lin_bytes == rec["linear_bytes"], name
        assert rec["linear_weights"] == mf.storage()["linear_weights"]
        big_float = [t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1]
        assert not big_float, (name, big_float)  # no weight matrix widened to float32
        assert rec["file_bytes"] == dst.stat().st_size
    sym, sb = files["symmetric"][2], files["sb"][2]
    assert list(sym["linears"]) == ["sparse-binary (2-bit terms, mu = 0)"]
    assert list(sb["linears"]) == ["sparse-binary (2-bit terms + 2-bit mask for mu)"]
    assert not np.any(fmt.ModelFile(files["symmetric"][0]).sb("blk.0.attn_q").mu)  # --symmetric: mu = 0
    # the mask product costs 2 bits per weight more than the terms alone
    assert sb["storage_bpw"] > sym["storage_bpw"] + 1.9


def test_metadata_carries_the_tokenizer(files, tiny_tokenizer):
    from pbs2p.exporter.onnx_export import OnnxModel

    om = OnnxModel(files["plan"][1])
    text = "The quick brown fox"
    assert om.tokenizer.encode(text, add_special_tokens=False).ids == tiny_tokenizer(text)["input_ids"]
    assert om.meta["family"] == "llama" and om.meta["method"] == "plan"
    assert int(om.meta["eos_token_id"]) == tiny_tokenizer.eos_token_id


def test_accuracy_level_4_runs_close(files, tiny_tokenizer, tmp_path):
    """int8 activations inside onnxruntime: not the fake-quant logits, but near them."""
    from pbs2p.exporter.onnx_export import OnnxModel, save_onnx

    src = files["plan"][0]
    rec = save_onnx(src, tmp_path / "a4.onnx", accuracy_level=4, tokenizer=tiny_tokenizer)
    assert rec["accuracy_level"] == 4
    got = OnnxModel(tmp_path / "a4.onnx").forward(np.asarray([PROMPT]), OnnxModel(tmp_path / "a4.onnx")
                                                  .empty_cache(), 0)[0]
    with torch.no_grad():
        want = _reference(src)(torch.tensor([PROMPT])).logits.numpy()
    span = float(want.max() - want.min())
    assert np.abs(got - want).max() <= 0.05 * span


def test_cli_and_refusals(capsys, tiny_model_factory, files, tmp_path, monkeypatch):
    from pbs2p.exporter import cli, config, driver, onnx_export

    src = str(tiny_model_factory("qwen2"))
    out = tmp_path / "m.onnx"
    argv = [src, "--out", str(out), "--format", "onnx", "--nsamples", "4", "--seqlen", "32", "-q"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "onnx file" in text and "MatMulNBits accuracy_level 0" in text and out.is_file()
    before = out.read_bytes()
    assert cli.main(argv) == 1  # exists, no --force
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--force", "--onnx-accuracy-level", "2"])
    assert e.value.code == 2
    with pytest.raises(config.ExportError, match="takes no option accuracy_level"):
        driver.export(src, tmp_path / "x.bin", config.QuantConfig(progress=False), accuracy_level=4)
    with pytest.raises(config.ExportError, match="MatMulNBits takes 0..4"):
        onnx_export.save_onnx(files["sb"][0], tmp_path / "bad.onnx", accuracy_level=7)
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.22.0")
    with pytest.raises(onnx_export.OnnxExportError, match=r"onnxruntime 1.22.0 is too old.*>=1.24"):
        onnx_export.OnnxModel(files["sb"][1])
    assert not list(tmp_path.glob(".*.tmp"))


def test_failed_write_leaves_nothing(files, tmp_path, monkeypatch):
    import os

    from pbs2p.exporter import onnx_export

    def broken(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        onnx_export.save_onnx(files["sb"][0], tmp_path / "m.onnx", tokenizer=None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_onnx_matches_fakequant(smollm2_path, tmp_path):
    """The real model (hidden 576: partial column blocks, 9 query / 3 kv heads, tied Q8_0 head, 30 blocks),
    PBS²P 6:8: logits within 1e-4 of the range and 32 greedy tokens equal to transformers' on the fake-quant
    model."""
    from pbs2p.exporter import config, driver
    from pbs2p.exporter.onnx_export import OnnxModel

    src = tmp_path / "s.pbs2p"
    dst = tmp_path / "s.onnx"
    cfg = config.QuantConfig(nm=(6, 8), solver=config.solver_config(arb_iters=2), nsamples=4, seqlen=64,
                             progress=False)  # few ARB rounds: the graph is under test, not the fit
    result = driver.quantize(None, cfg)
    result.save(src)
    result.save(dst, format="onnx")
    need(dst.is_file(), "export failed")
    ref = _reference(src)
    om = OnnxModel(dst)
    ids = om.tokenizer.encode("The capital of France is", add_special_tokens=False).ids
    got = om.forward(np.asarray([ids]), om.empty_cache(), 0)[0]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits.numpy()
    span = float(want.max() - want.min())
    assert np.abs(got - want).max() <= 1e-4 * span
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert om.generate(ids, 32) == theirs[0, len(ids):].tolist()

"""pbs2p-export / pbs2p-eval command lines: bad inputs give one line on stderr, a non-zero exit status and no
file; a good run through a subprocess writes a readable file."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import gguf

from pbs2p.exporter import cli  # noqa: E402
from pbs2p.exporter import eval as evaluation  # noqa: E402
from conftest import run_export_cli  # noqa: E402

FAST = ["--nsamples", "2", "--seqlen", "16", "-q"]


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "error" in ln.lower()]


@pytest.mark.parametrize("nm, msg", [("9:8", "N must be in [1, M = 8]"), ("3:7", "M must be one of 4, 8"), ("0:8", "N must be in [1, M = 8]"),
                                     ("-2:8", "N must be in [1, M = 8]"), ("x", "expected N:M")])
def test_bad_nm(capsys, tmp_path, tiny_model_factory, nm, msg):
    out = tmp_path / "m.bin"
    rc, err = run_export_cli(capsys, [str(tiny_model_factory("llama")), "--out", str(out), f"--nm={nm}", *FAST])
    assert rc != 0
    lines = error_lines(err)
    assert len(lines) == 1 and msg in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_model(capsys, tmp_path):
    out = tmp_path / "m.bin"
    rc, err = run_export_cli(capsys, [str(tmp_path / "nope"), "--out", str(out), *FAST])
    assert rc != 0 and "no such file" in err and not out.exists()
    (tmp_path / "empty").mkdir()
    rc, err = run_export_cli(capsys, [str(tmp_path / "empty"), "--out", str(out), *FAST])
    assert rc != 0 and "config.json" in err and not out.exists()


def test_unsupported_architecture(capsys, tmp_path, tiny_tokenizer):
    import transformers

    d = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer),
                                                          n_positions=64)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    out = tmp_path / "m.bin"
    rc, err = run_export_cli(capsys, [str(d), "--out", str(out), *FAST])
    assert rc != 0
    lines = error_lines(err)
    assert len(lines) == 1 and "GPT2LMHeadModel" in lines[0] and "LlamaForCausalLM" in lines[0]
    assert not out.exists()


def test_out_problems(capsys, tmp_path, tiny_model_factory):
    d = str(tiny_model_factory("llama"))
    rc, err = run_export_cli(capsys, [d, "--out", str(tmp_path / "no" / "dir" / "m.bin"), *FAST])
    assert rc != 0 and "does not exist" in err
    existing = tmp_path / "e.bin"
    existing.write_bytes(b"keep")
    rc, err = run_export_cli(capsys, [d, "--out", str(existing), *FAST])
    assert rc != 0 and "--force" in err and existing.read_bytes() == b"keep"
    rc, err = run_export_cli(capsys, [d, "--out", str(tmp_path), *FAST])
    assert rc != 0 and "folder" in err
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        rc, err = run_export_cli(capsys, [d, "--out", str(ro / "m.bin"), *FAST])
        ro.chmod(0o700)
        assert rc != 0 and "not writable" in err
    rc, err = run_export_cli(capsys, [d, "--out", str(existing), "--force", "--method", "fp16", "-q"])
    assert rc == 0 and existing.read_bytes()[:4] == b"GGUF"


def test_other_bad_options(capsys, tmp_path, tiny_model_factory):
    d = str(tiny_model_factory("llama"))
    out = tmp_path / "m.bin"
    for extra, msg in ((["--steps", "x"], "--steps"), (["--block-size", "100"], "multiple of 64"),
                       (["--calib", str(tmp_path / "none.txt")], "no such file"), (["--nsamples", "0"], "nsamples"),
                       (["--device", "tpu"], "--device"), (["--salient", "--residual"], "choose one")):
        rc, err = run_export_cli(capsys, [d, "--out", str(out), *FAST, *extra])
        assert rc != 0 and msg in err, (extra, err)
        assert not out.exists()


def test_cli_subprocess_roundtrip(tmp_path, tiny_model_factory):
    d = tiny_model_factory("qwen2")
    out = tmp_path / "m.bin"
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-m", "pbs2p.exporter.cli", str(d), "--out", str(out), "--nm", "5:8", *FAST],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "storage" in p.stdout and "bits/weight" in p.stdout
    r = gguf.GGUFReader(str(out))
    assert list(r.fields["pbs2p.nm.n"].contents()) == [5, 5]
    p = subprocess.run([sys.executable, "-m", "pbs2p.exporter.cli", str(d), "--out", str(out), "--nm", "9:8", *FAST],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1


def test_eval_cli(capsys, tmp_path, tiny_model_factory):
    d = tiny_model_factory("llama")
    out = tmp_path / "m.bin"
    assert cli.main([str(d), "--out", str(out), "--method", "fp16", "-q"]) == 0
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    capsys.readouterr()
    rc = evaluation.main([str(text), "--model", str(d), "--file", str(out), "--seqlen", "32", "--max-windows", "2", "-q"])
    o = capsys.readouterr().out
    assert rc == 0 and o.count("PPL") == 2 and "62 tokens scored" in o
    ppl = [float(ln.split("PPL ")[1].split()[0]) for ln in o.splitlines()]
    assert ppl[0] == pytest.approx(ppl[1], rel=0.05)  # fp16 weights + Q8_0 embeddings: close to the original
    # --file alone tokenizes with the file's own tokenizer.* keys (tokmeta.hf_tokenizer): the same windows
    assert evaluation.main([str(text), "--file", str(out), "--seqlen", "32", "--max-windows", "2", "-q"]) == 0
    o = capsys.readouterr().out
    assert "62 tokens scored" in o and float(o.split("PPL ")[1].split()[0]) == ppl[1]
    assert evaluation.main([str(text), "--file", str(tmp_path / "none.bin"), "-q"]) == 1
    assert evaluation.main([str(text), "-q"]) == 1
    assert evaluation.main([str(tmp_path / "none.txt"), "--file", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("pbs2p-eval: error") == 3


def test_eval_default_text_is_beside_the_current_folder(tmp_path, monkeypatch):
    """With no TEXT, pbs2p-eval reads ../shared/data/wikitext-2-raw/wiki.test.raw seen from the current folder
    (the repository root), wherever the package is installed."""
    wiki = tmp_path / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    wiki.parent.mkdir(parents=True)
    wiki.write_text("x")
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert evaluation.default_text().resolve() == wiki.resolve()

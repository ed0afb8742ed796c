"""pbs2p-export --resume: an export interrupted anywhere continues from its per-block checkpoint and writes the
same bytes as an uninterrupted run; a checkpoint from another export, a damaged one or a missing one is refused
with one clear line."""
from __future__ import annotations

import json

import pytest


from pbs2p import format as fmt  # noqa: E402
from pbs2p.exporter import cli  # noqa: E402
from pbs2p.exporter import solver  # noqa: E402
from conftest import run_export_cli  # noqa: E402

FAST = ["--nsamples", "3", "--seqlen", "24", "-q", "--coarse"]  # coarse: its N per block must survive a resume
N_LIN = 7  # linears per llama block
N_BLOCKS = 4


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("llama", num_hidden_layers=N_BLOCKS)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """An uninterrupted export (pbs2p 6:8 with the coarse stage) and its bytes."""
    d = tmp_path_factory.mktemp("ref")
    out = d / "ref.bin"
    assert cli.main([str(model_dir), "--out", str(out), *FAST]) == 0
    assert not (d / "ref.bin.ckpt").exists(), "the checkpoint must be removed once the file is written"
    return out.read_bytes()


def interrupt_after(monkeypatch, n_calls):
    """Make the (n_calls+1)-th solver call raise KeyboardInterrupt; returns the call counter."""
    real = solver.compress_layer
    calls = {"n": 0}

    def wrapped(*a, **k):
        if calls["n"] == n_calls:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(solver, "compress_layer", wrapped)
    return calls


@pytest.mark.parametrize("stop_at", [0, N_LIN + 3, 3 * N_LIN])  # inside block 0, inside block 1, first of block 3
def test_resume_gives_identical_bytes(capsys, tmp_path, model_dir, reference, monkeypatch, stop_at):
    out = tmp_path / "m.bin"
    ckpt = tmp_path / "m.bin.ckpt"
    interrupt_after(monkeypatch, stop_at)
    rc, err = run_export_cli(capsys, [str(model_dir), "--out", str(out), *FAST])
    assert rc == 130 and not out.exists()
    assert "--resume" in err
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["done"] == stop_at // N_LIN and len(meta["records"]) == meta["done"] * N_LIN
    assert not list(ckpt.glob("*.tmp"))
    monkeypatch.undo()

    calls = interrupt_after(monkeypatch, 10**9)  # counts only
    rc, err = run_export_cli(capsys, [str(model_dir), "--out", str(out), "--resume", *FAST])
    assert rc == 0, err
    assert calls["n"] == (N_BLOCKS - meta["done"]) * N_LIN, "finished blocks must not be recomputed"
    assert out.read_bytes() == reference
    assert not ckpt.exists()


def test_resume_after_interrupt_while_writing(capsys, tmp_path, model_dir, reference, monkeypatch):
    out = tmp_path / "m.bin"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fmt.ModelWriter, "add_sb", boom)
    rc, _ = run_export_cli(capsys, [str(model_dir), "--out", str(out), *FAST])
    assert rc == 130 and not out.exists()
    assert json.loads((tmp_path / "m.bin.ckpt" / "meta.json").read_text())["done"] == N_BLOCKS
    monkeypatch.undo()
    calls = interrupt_after(monkeypatch, 10**9)
    assert run_export_cli(capsys, [str(model_dir), "--out", str(out), "--resume", *FAST])[0] == 0
    assert calls["n"] == 0 and out.read_bytes() == reference


def test_refusals(capsys, tmp_path, model_dir, reference, monkeypatch):
    out = tmp_path / "m.bin"
    rc, err = run_export_cli(capsys, [str(model_dir), "--out", str(out), "--resume", *FAST])
    assert rc == 1 and "no checkpoint" in err and not out.exists()
    rc, err = run_export_cli(capsys, [str(model_dir), "--out", str(out), "--resume", "--no-checkpoint", *FAST])
    assert rc == 1 and "contradict" in err

    interrupt_after(monkeypatch, N_LIN + 1)
    assert run_export_cli(capsys, [str(model_dir), "--out", str(out), *FAST])[0] == 130
    monkeypatch.undo()
    ckpt = tmp_path / "m.bin.ckpt"
    # a fresh export does not silently throw the checkpoint away ...
    rc, err = run_export_cli(capsys, [str(model_dir), "--out", str(out), *FAST])
    assert rc == 1 and "--resume" in err and "--force" in err and ckpt.exists() and not out.exists()
    # ... nor does a resume with other settings use it
    rc, err = run_export_cli(capsys, [str(model_dir), "--out", str(out), "--resume", "--seed", "1", *FAST])
    assert rc == 1 and "different export" in err and not out.exists()
    rc, err = run_export_cli(capsys, [str(model_dir), "--out", str(out), "--resume", "--nm", "4:8", *FAST])
    assert rc == 1 and "different export" in err

    # damaged pieces: one clear line each, nothing written
    blk = ckpt / "blk-0000.npz"
    good = blk.read_bytes()
    blk.write_bytes(good[:100])
    rc, err = run_export_cli(capsys, [str(model_dir), "--out", str(out), "--resume", *FAST])
    assert rc == 1 and "blk-0000.npz" in err and not out.exists()
    blk.write_bytes(good)
    meta = ckpt / "meta.json"
    good_meta = meta.read_text()
    meta.write_text("{not json")
    rc, err = run_export_cli(capsys, [str(model_dir), "--out", str(out), "--resume", *FAST])
    assert rc == 1 and "unreadable" in err
    meta.write_text(good_meta)
    (ckpt / "inputs.pt").write_bytes(b"garbage")
    rc, err = run_export_cli(capsys, [str(model_dir), "--out", str(out), "--resume", *FAST])
    assert rc == 1 and "inputs.pt" in err and not out.exists()

    # --force starts over and gives the reference bytes
    rc, err = run_export_cli(capsys, [str(model_dir), "--out", str(out), "--force", *FAST])
    assert rc == 0, err
    assert out.read_bytes() == reference and not ckpt.exists()


def test_no_checkpoint_flag_writes_none(capsys, tmp_path, model_dir, reference, monkeypatch):
    out = tmp_path / "m.bin"
    interrupt_after(monkeypatch, N_LIN + 1)
    assert run_export_cli(capsys, [str(model_dir), "--out", str(out), "--no-checkpoint", *FAST])[0] == 130
    assert list(tmp_path.iterdir()) == []

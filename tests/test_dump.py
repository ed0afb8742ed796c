"""pbs2p-dump on a tiny model file: metadata abbreviated, tensors with encodings, per-layer N:M measured from the
bits and storage bpw by the docs/format.md formula, totals; malformed files give one line and a nonzero exit."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pbs2p import dump
from pbs2p import format as fmt
from tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("dump") / "tiny.bin", seed=2)


@pytest.fixture(scope="module")
def output(tiny):
    import io

    buf = io.StringIO()
    dump.dump(str(tiny.path), out=buf)
    return buf.getvalue()


def _layer_rows(output: str) -> dict[str, list[str]]:
    sect = output.split("linear layers:")[1].split("totals:")[0]
    return {ln.split()[0]: ln.split() for ln in sect.strip().splitlines()[1:]}


def _expected_sb_bytes(r: int, k: int, t: int, bs: int) -> int:
    w, nb = fmt.n_words(k), fmt.n_blocks(k, bs)
    return r * t * 2 * w * 8 + r * t * nb * 2 + r * nb * 2


def test_metadata_is_abbreviated(output, tiny):
    lines = {ln.split(" = ")[0].strip(): ln for ln in output.splitlines() if " = " in ln}
    tokens = lines["tokenizer.ggml.tokens"]
    assert "[49152]" in tokens and "..." in tokens and len(tokens) < 200
    assert "(368 chars)" in lines["tokenizer.chat_template"] or len(lines["tokenizer.chat_template"]) < 120
    assert lines["pbs2p.nm.n"].endswith("[2] [2, 4]")
    assert lines["pbs2p.block_size"].endswith("= 64")
    assert all(len(ln) < 200 for ln in output.splitlines())


def test_tensors_and_encodings(output):
    rows = {ln.split()[0]: ln.split() for ln in output.split("tensors:")[1].split("linear layers:")[0].splitlines()
            if ln.strip() and not ln.strip().startswith("name")}
    assert rows["token_embd.weight"][1] == "Q8_0" and rows["token_embd.weight"][-1] == "Q8_0"
    assert "(49152, 96)" in " ".join(rows["token_embd.weight"])
    assert rows["blk.0.attn_q.planes"][1] == "I8" and rows["blk.0.attn_q.planes"][-1] == "sparse-binary"
    assert rows["blk.1.attn_q.alpha"][-1] == "sparse-binary" and "(96, 2, 2)" in " ".join(rows["blk.1.attn_q.alpha"])
    assert rows["blk.1.attn_v.weight"][1] == "F16" and rows["blk.1.attn_v.weight"][-1] == "dense"
    assert rows["output_norm.weight"][1] == "F32"


def test_layers_nm_and_bpw(output, tiny):
    rows = _layer_rows(output)
    assert len(rows) == 7 * tiny.config["n_layer"]
    c, bs = tiny.config, tiny.block_size
    shapes = {"attn_q": (c["n_embd"], c["n_embd"]), "attn_k": (48, c["n_embd"]), "ffn_down": (c["n_embd"], c["n_ff"])}
    for lin, (r, k) in shapes.items():
        for i, (n, t) in enumerate(((2, 1), (4, 2))):
            row = rows[f"blk.{i}.{lin}"]
            assert row[1] == "sparse-binary" and row[2] == f"{r}x{k}" and row[3] == str(t)
            assert row[4] == f"{n}:4"
            assert float(row[5]) == pytest.approx(8 * _expected_sb_bytes(r, k, t, bs) / (r * k), abs=1e-3)
    # K = 96, T = 1, bs = 64: (2·2·8 + 2·2 + 2·2)·8 / 96 bytes per weight
    assert rows["blk.0.attn_q"][5] == "3.333" and rows["blk.0.attn_q"][6] == "0.500"
    assert rows["blk.1.attn_v"][1:3] == ["dense", "F16"] and rows["blk.1.attn_v"][-1] == "16.000"


def test_totals(output, tiny):
    tot = dict(re.findall(r"^  (file size|linear weights|linear bytes|storage bpw|parameter bits)\s+(\S+)",
                          output, flags=re.M))
    assert int(tot["file size"]) == os.path.getsize(tiny.path)
    c, bs = tiny.config, tiny.block_size
    shapes = [(c["n_embd"], c["n_embd"]), (48, c["n_embd"]), (48, c["n_embd"]), (c["n_embd"], c["n_embd"]),
              (c["n_ff"], c["n_embd"]), (c["n_ff"], c["n_embd"]), (c["n_embd"], c["n_ff"])]
    n_w = 2 * sum(r * k for r, k in shapes)
    n_b = sum(_expected_sb_bytes(r, k, 1, bs) for r, k in shapes)
    n_b += sum(_expected_sb_bytes(r, k, 2, bs) for j, (r, k) in enumerate(shapes) if j != 2) + 48 * 96 * 2
    assert int(tot["linear weights"]) == n_w and int(tot["linear bytes"]) == n_b
    assert float(tot["storage bpw"]) == pytest.approx(8 * n_b / n_w, abs=1e-4)
    # layer 0 is 2:4 with one term (0.5 bits per weight exactly); layer 1 keeps all weights in term 0 and a
    # random half in term 1 (~1.5), except the dense F16 attn_v (16)
    w0 = sum(r * k for r, k in shapes)
    want = (0.5 * w0 + 1.5 * (w0 - 48 * 96) + 16 * 48 * 96) / n_w
    assert float(tot["parameter bits"]) == pytest.approx(want, abs=0.01)


def test_mixed_nm_is_reported():
    terms = np.zeros((1, 2, 16), dtype=np.int8)
    terms[0, 0, [0, 1, 4, 5, 8, 9, 12, 13]] = 1      # row 0: 2 of every 4
    terms[0, 1, [0, 1, 2, 4, 5, 6, 8, 9, 10, 12]] = -1  # row 1: 3, 3, 3, 1
    sb = fmt.pack_sb(terms, np.ones((2, 1, 1)), np.zeros((2, 1)), 64)
    assert dump._measure_nm(sb.planes, 2, 16, 1, 4).startswith("mixed 1-3:4")
    assert dump._measure_nm(sb.planes[:1], 1, 16, 1, 4) == "2:4"


def test_cli_ok_and_bad_files(tiny, tmp_path):
    run = lambda p: subprocess.run([sys.executable, "-m", "pbs2p.dump", str(p)], capture_output=True, text=True,  # noqa: E731
                                   timeout=120)
    r = run(tiny.path)
    assert r.returncode == 0 and "totals:" in r.stdout
    bad = tmp_path / "bad.bin"
    for content in (b"", b"not a gguf file at all", tiny.path.read_bytes()[:5000]):
        bad.write_bytes(content)
        r = run(bad)
        assert r.returncode != 0
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("pbs2p-dump: error:"), r.stderr
    r = run(tmp_path / "missing.bin")
    assert r.returncode != 0 and "missing.bin" in r.stderr and len(r.stderr.strip().splitlines()) == 1

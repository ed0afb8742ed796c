"""The bits-per-weight budget planner (method plan, --bpw): its Q8_0 / Q4_0 GPTQ code, the allocation, the byte
counts it plans with against the bytes the file holds, the plan in the file, and the refusals before any work.
The C runtime on planned files (mixed Q8_0 / Q4_0 / sparse-binary linears) is checked in test_c_model.py."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from pbs2p import format as fmt
from pbs2p.exporter import config, driver, planner, solver
from conftest import run_export_cli  # noqa: E402

FAST = ["--nsamples", "3", "--seqlen", "24", "-q", "--no-checkpoint"]


def _layer(r=48, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, k, generator=g) @ torch.randn(k, k, generator=g) * 0.2
    return torch.randn(r, k, generator=g), 2 * x.T @ x / x.shape[0]


def test_pack_q_writes_ggml_bytes():
    """pack_q with ggml's own scales and integers reproduces gguf-py's Q8_0 / Q4_0 bytes exactly."""
    x = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32)
    for gtype, quant, body in ((fmt.GGMLType.Q4_0, fmt.quantize_q4_0, 16), (fmt.GGMLType.Q8_0, fmt.quantize_q8_0, 32)):
        raw = quant(x).reshape(5, 3, 2 + body)
        d = raw[..., :2].copy().view(np.float16)[..., 0]
        if gtype == fmt.GGMLType.Q4_0:
            q = np.concatenate([raw[..., 2:] & 15, raw[..., 2:] >> 4], -1).reshape(5, 96)
        else:
            q = raw[..., 2:].view(np.int8).reshape(5, 96)
        assert np.array_equal(fmt.pack_q(gtype, d, q).data, quant(x))


def test_q3_layout():
    """pbs2p's Q3 block (docs/format.md "Q3 blocks"), byte by byte: f16 d, qs[8] with bits 2i, 2i+1 of byte j the
    low bits of element 8i + j, qh[4] with bit i of byte j the high bit of element 8j + i; value d·(q − 4). The C
    kernels pin the same layout (runtime/tests/test-kernels.c, test_q3_layout)."""
    for j in range(32):
        for q in range(8):
            qi = np.full((1, 32), 4)
            qi[0, j] = q
            ql = fmt.pack_q(fmt.QType.Q3, np.ones((1, 1), np.float16), qi)
            want = bytearray(14)
            want[0:2] = np.float16(1).tobytes()
            for e in range(32):
                v = int(qi[0, e])
                want[2 + e % 8] |= (v & 3) << (2 * (e // 8))
                want[10 + e // 8] |= (v >> 2) << (e % 8)
            assert ql.data.tobytes() == bytes(want), (j, q)
            expect = np.zeros((1, 32), np.float32)
            expect[0, j] = q - 4
            assert np.array_equal(ql.dequantize(), expect)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        fmt.pack_q(fmt.QType.Q3, np.ones((1, 1), np.float16), np.full((1, 32), 8))


@pytest.mark.parametrize("code", ["q4_0", "q8_0", "q3"])
def test_compress_q_is_exact_and_beats_round_to_nearest(code):
    W, H = _layer()
    rtn = solver.compress_q(W, None, code)
    res = solver.compress_q(W, H, code)
    for r in (rtn, res):
        ql = fmt.pack_q(r.gtype, r.d, r.q)
        assert np.array_equal(ql.dequantize(), r.w_hat.numpy())  # the bytes hold exactly w_hat
    err_rtn = solver.output_error(W, W - rtn.w_hat, H)
    err = solver.output_error(W, W - res.w_hat, H)
    assert err < 0.8 * err_rtn, (err, err_rtn)  # GPTQ's compensation lowers the output error
    assert res.stats["err_out"] == pytest.approx(err)


def test_compress_q_refuses_partial_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        solver.compress_q(torch.randn(4, 40), None, "q4_0")


@pytest.mark.parametrize("code", planner.CODES)
def test_code_bytes_is_what_the_file_stores(code):
    """The byte count the planner budgets with equals the packed layer's (which the writer stores as is)."""
    W, H = _layer(r=40, k=192)
    base = solver.SolverConfig()
    obj, w_hat, _ = planner.solve(code, W, H, base)
    assert obj.nbytes() == planner.code_bytes(code, 40, 192, base)
    back = obj.dequantize()
    assert np.array_equal(back, w_hat.numpy())
    assert planner.code_bytes("q4_0", 40, 200, base) is None  # K % 32 != 0: no Q blocks


def _total(options, picked):
    by = {pre: {c: (b, d) for c, b, d in o} for pre, o in options.items()}
    return sum(by[p][c][0] for p, c in picked.items()), sum(by[p][c][1] for p, c in picked.items())


def test_allocate_meets_the_budget_and_is_optimal():
    rng = np.random.default_rng(1)
    for trial in range(30):
        options = {}
        for i in range(5):
            size = int(rng.integers(50, 400))
            d4, d8 = rng.uniform(0.5, 2), rng.uniform(0.01, 0.2)
            options[f"l{i}"] = [("binary", size * 2, d4 * rng.uniform(5, 50)), ("q4_0", size * 4, d4),
                                ("q8_0", size * 8, d8), ("residual", size * 4, d4 * rng.uniform(0.5, 3))]
        lo = sum(min(b for _, b, _ in o) for o in options.values())
        hi = sum(max(b for _, b, _ in o) for o in options.values())
        budget = int(rng.integers(lo, hi + 1))
        picked = planner.allocate(options, budget)
        spent, dmg = _total(options, picked)
        assert spent <= budget
        best = min(sum(x[2] for x in combo) for combo in itertools.product(*options.values())
                   if sum(x[1] for x in combo) <= budget)
        assert dmg == pytest.approx(best, rel=1e-12), (trial, dmg, best)  # budget < 20000 bytes: unit 1, exact


def test_allocate_extremes():
    options = {"a": [("binary", 10, 5.0), ("q4_0", 20, 1.0), ("q8_0", 40, 0.1)],
               "b": [("binary", 30, 9.0), ("q4_0", 60, 2.0), ("q8_0", 120, 0.2)]}
    assert planner.allocate(options, 160) == {"a": "q8_0", "b": "q8_0"}
    assert planner.allocate(options, 40) == {"a": "binary", "b": "binary"}
    assert planner.allocate(options, 70) == {"a": "binary", "b": "q4_0"}  # (a greedy by ratio takes a: q8_0)
    with pytest.raises(ValueError, match="cheapest plan"):
        planner.allocate(options, 39)


def test_dominated_codes_are_never_picked():
    options = {"a": [("q4_0", 20, 1.0), ("residual", 20, 3.0), ("q8_0", 40, 2.0)]}
    assert planner.allocate(options, 40) == {"a": "q4_0"}


def test_plan_export_meets_budget_and_records_the_plan(capsys, tmp_path, tiny_model_factory):
    src = tiny_model_factory("llama")
    out = tmp_path / "m.bin"
    rc, err = run_export_cli(capsys, [str(src), "--out", str(out), "--bpw", "3.5", *FAST])
    assert rc == 0, err
    mf = fmt.ModelFile(out)
    st = mf.storage()
    assert 3.5 * (1 - planner.TOLERANCE) <= st["storage_bpw"] <= 3.5
    assert mf.kv[fmt.KEY_METHOD] == "plan"
    plan = planner.Plan.from_json(mf.kv[fmt.KEY_PLAN])
    assert plan.target_bpw == 3.5 and plan.codes == planner.DEFAULT_CODES
    assert plan.bpw == pytest.approx(st["storage_bpw"])
    types = {fmt.GGMLType.Q8_0: "q8_0", fmt.GGMLType.Q4_0: "q4_0"}
    for e in plan.layers:  # each linear is stored in its planned code, in the planned bytes
        if mf.is_sb(e.prefix):
            sb = mf.sb(e.prefix)
            assert e.code.startswith("pbs2p-") or e.code == "binary"
            assert sb.nbytes() == e.nbytes
        elif mf.is_q3(e.prefix):
            assert e.code == "q3" and mf.q3(e.prefix).nbytes() == e.nbytes
        else:
            t = mf.tensors[e.prefix + fmt.SUFFIX_WEIGHT]
            assert types[int(t.tensor_type)] == e.code and int(t.n_bytes) == e.nbytes
    assert len({e.code for e in plan.layers}) >= 2, "3.5 bpw lies between the codes: the plan must mix them"
    assert "plan: target 3.500 bpw" in err
    from pbs2p import dump

    import io
    buf = io.StringIO()
    dump.dump(str(out), buf)
    text = buf.getvalue()
    assert "plan (pbs2p.plan):" in text and "target 3.500 bpw" in text and "file holds" not in text
    assert f"{plan.layers[0].prefix:<22} {plan.layers[0].code:<10}" in text


def test_plan_fake_quant_equals_the_file(tmp_path, tiny_model_factory):
    """The exporter's fake-quant model holds exactly the file's weights (Q blocks dequantized by gguf-py)."""
    from pbs2p.exporter import fakequant

    cfg = config.QuantConfig(method="plan", bpw=4.0, nsamples=3, seqlen=24, progress=False)
    res = driver.quantize(str(tiny_model_factory("qwen2")), cfg)
    res.save(tmp_path / "m.bin")
    ref = fakequant.load_fakequant(tmp_path / "m.bin")
    a = dict(res.model.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.equal(p, a[name].detach()), name


@pytest.mark.parametrize("argv,msg", [
    (["--bpw", "3", "--method", "pbs2p"], "--bpw is the budget planner's"),
    (["--method", "plan"], "needs a budget"),
    (["--bpw", "3", "--codes", "q4_0,q3_k"], "choose from"),
    (["--bpw", "3", "--coarse"], "--coarse"),
    (["--bpw", "-1"], "positive"),
    (["--bpw", "1.0"], "out of reach"),
    (["--bpw", "9"], "out of reach"),
    (["--max-bytes", "1000000", "--bpw", "3"], "two budgets"),
    (["--max-bytes", "1000000", "--method", "pbs2p"], "--max-bytes is the budget planner's"),
    (["--max-bytes", "20k"], "leaves the linears nothing"),
    (["--max-bytes", "1G"], "out of reach"),
    (["--max-bytes", "12x"], "bytes as N or N with k/M/G"),
    (["--max-bytes", "0"], "at least one byte"),
])
def test_refusals_before_any_work(capsys, tmp_path, tiny_model_factory, monkeypatch, argv, msg):
    def boom(*a, **k):
        raise AssertionError("calibration started")

    from pbs2p.exporter import calib

    monkeypatch.setattr(calib, "get_windows", boom)
    out = tmp_path / "m.bin"
    rc, err = run_export_cli(capsys, [str(tiny_model_factory("llama")), "--out", str(out), *argv, *FAST])
    assert rc != 0 and msg in err, err
    assert "error" in err.lower()
    assert not out.exists() and list(tmp_path.iterdir()) == []
    if "out of reach" in msg:  # the message names the reachable range (top: every linear Q8_0)
        assert "to 8.500 bits per weight" in err


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_layout_bytes_and_the_rest_bound_against_the_written_file(tmp_path, tiny_model_factory, family):
    """fmt.layout_bytes of a file's keys and tensors is its size, to the byte; writer.rest_bytes bounds everything
    but the linears' data from above (every family's extra tensors: Qwen2's biases, OPT's position table and
    norm biases), and not by much: at most the worst-case plan key and three padded tensor infos per linear."""
    from pbs2p.exporter import arch, writer

    cfg = config.QuantConfig(method="plan", bpw=4.0, nsamples=3, seqlen=24, progress=False)
    res = driver.quantize(str(tiny_model_factory(family)), cfg)
    out = tmp_path / "m.bin"
    res.save(out)
    size = out.stat().st_size
    mf = fmt.ModelFile(out)
    kv = writer.build_metadata(res)
    tensors = [(name, len(t.shape), int(t.n_bytes)) for name, t in mf.tensors.items()]
    assert fmt.layout_bytes(res.family.name, kv, tensors) == size
    rest = writer.rest_bytes(res.loaded, res.family, cfg, res.calibration)
    linear_data = mf.storage()["linear_bytes"]
    n_lin = sum(len(arch.block_linears(b, res.family)) for b in arch.blocks(res.model, res.family))
    assert size <= rest + linear_data
    assert rest + linear_data - size <= n_lin * (60 + 3 * (48 + 40 + 63)) + 200, (rest, linear_data, size)


def test_max_bytes_export_stays_within_the_file_budget(capsys, tmp_path, tiny_model_factory):
    """--max-bytes N: the file holds at most N bytes and its linears take within the planner's tolerance of what
    the rest of the file leaves them; the log says the budget it derived."""
    from pbs2p.exporter import writer

    src = str(tiny_model_factory("qwen2"))
    ref = tmp_path / "ref.bin"
    assert run_export_cli(capsys, [src, "--out", str(ref), "--bpw", "3.5", *FAST])[0] == 0
    limit = ref.stat().st_size + 3000
    out = tmp_path / "m.bin"
    rc, err = run_export_cli(capsys, [src, "--out", str(out), "--max-bytes", str(limit), "--nsamples", "3",
                                      "--seqlen", "24", "--no-checkpoint"])
    assert rc == 0, err
    size = out.stat().st_size
    assert size <= limit
    mf = fmt.ModelFile(out)
    st = mf.storage()
    plan = planner.Plan.from_json(mf.kv[fmt.KEY_PLAN])
    assert f"--max-bytes {limit:,}: the rest of the file takes at most" in err
    assert plan.target_bpw == pytest.approx(float(err.split("the linears get ")[1].split()[0]))
    assert plan.target_bpw * (1 - planner.TOLERANCE) <= st["storage_bpw"] <= plan.target_bpw
    cfg = config.QuantConfig(method="plan", max_bytes=limit)
    res = driver.quantize(src, config.QuantConfig(method="fp16"))
    rest = writer.rest_bytes(res.loaded, res.family, cfg, mf.kv[fmt.KEY_CALIBRATION])
    assert st["linear_bytes"] >= (limit - rest) * (1 - planner.TOLERANCE) - 8
    assert mf.kv["general.name"].endswith(f"plan {plan.target_bpw:g} bpw")


def test_parse_bytes():
    from pbs2p.exporter import cli

    assert [cli.parse_bytes(s) for s in ("330057536", "330M", "1.5G", "70k")] == [330057536, 330 * 10 ** 6,
                                                                                  1_500_000_000, 70_000]


def test_plan_resume_gives_identical_bytes(capsys, tmp_path, tiny_model_factory, monkeypatch):
    """An interrupted planned export continues from its checkpoint (plan and Q8_0 / Q4_0 blocks included) and
    writes the bytes of an uninterrupted one."""
    src = str(tiny_model_factory("llama", num_hidden_layers=3))
    args = ["--bpw", "4", "--nsamples", "3", "--seqlen", "24", "-q"]
    ref = tmp_path / "ref.bin"
    assert run_export_cli(capsys, [src, "--out", str(ref), *args])[0] == 0
    real = solver.compress_q
    calls = {"n": 0, "stop": None}

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["stop"] is not None and calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(solver, "compress_q", wrapped)
    assert run_export_cli(capsys, [src, "--out", str(tmp_path / "count.bin"), *args])[0] == 0
    n_measure_and_export = calls["n"]
    n_q_in_plan = sum(1 for e in planner.Plan.from_json(fmt.ModelFile(ref).kv[fmt.KEY_PLAN]).layers
                      if e.code.startswith("q"))
    calls.update(n=0, stop=n_measure_and_export - n_q_in_plan // 2)  # inside pass 2, past block 0
    out = tmp_path / "m.bin"
    rc, err = run_export_cli(capsys, [src, "--out", str(out), *args])
    assert rc != 0 and not out.exists()
    meta = json.loads((tmp_path / "m.bin.ckpt" / "meta.json").read_text())
    assert meta["plan"] and meta["done"] >= 1
    calls["stop"] = None
    rc, err = run_export_cli(capsys, [src, "--out", str(out), *args, "--resume"])
    assert rc == 0, err
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("code", ["q4_0", "q8_0", "q3"])
def test_compress_q_with_prepared_hinv_is_identical(code):
    W, H = _layer()
    prep = solver.prepare_hinv(H, 0.01)
    ref = solver.compress_q(W.clone(), H, code)
    res = solver.compress_q(W.clone(), H, code, 0.01, prep)
    assert torch.equal(res.w_hat, ref.w_hat) and np.array_equal(res.q, ref.q) and np.array_equal(res.d, ref.d)


def test_measurements_file_serves_a_sweep_of_budgets(capsys, tmp_path, tiny_model_factory, monkeypatch):
    """--measurements FILE: the first export measures and writes pass 1's table, an export at another budget
    reads it instead of measuring and writes the bytes an export without it writes; a table of another
    calibration is refused before any file is written, and left as it was."""
    src = str(tiny_model_factory("llama", num_hidden_layers=2))
    args = ["--nsamples", "3", "--seqlen", "24", "-q", "--no-checkpoint"]
    table = tmp_path / "pass1.json"
    assert run_export_cli(capsys, [src, "--out", str(tmp_path / "a.bin"), "--bpw", "4", "--measurements",
                                   str(table), *args])[0] == 0
    doc = json.loads(table.read_text())
    assert doc["version"] == planner.MEASUREMENTS_VERSION and len(doc["options"]) == 2 * 7
    ref = tmp_path / "ref.bin"
    assert run_export_cli(capsys, [src, "--out", str(ref), "--bpw", "3", *args])[0] == 0

    def boom(*a, **k):
        raise AssertionError("pass 1 ran")

    monkeypatch.setattr(planner, "measure", boom)
    out = tmp_path / "b.bin"
    rc, err = run_export_cli(capsys, [src, "--out", str(out), "--bpw", "3", "--measurements", str(table), *args])
    assert rc == 0, err
    assert out.read_bytes() == ref.read_bytes()
    before = table.read_bytes()
    bad = tmp_path / "c.bin"
    rc, err = run_export_cli(capsys, [src, "--out", str(bad), "--bpw", "3", "--measurements", str(table),
                                      "--seed", "1", *args])
    assert rc != 0 and "measured for another model, calibration" in err, err
    assert not bad.exists() and table.read_bytes() == before
    doc = json.loads(before)
    doc["options"].pop(next(iter(doc["options"])))
    table.write_text(json.dumps(doc))
    rc, err = run_export_cli(capsys, [src, "--out", str(bad), "--bpw", "3", "--measurements", str(table), *args])
    assert rc != 0 and "does not name this model's 14 linears" in err, err
    table.write_text("{not json")
    rc, err = run_export_cli(capsys, [src, "--out", str(bad), "--bpw", "3", "--measurements", str(table), *args])
    assert rc != 0 and "not a planner measurement file" in err, err
    rc, err = run_export_cli(capsys, [src, "--out", str(bad), "--measurements", str(table), *args])
    assert rc != 0 and "needs --bpw" in err, err


def test_measurements_table_serves_the_nm_code_too(capsys, tmp_path, tiny_model_factory, monkeypatch):
    """--sb-code changes a sparse-binary layer's bytes, not its values: a table measured for a planes export
    serves an N:M-code export, whose plan counts the N:M code's bytes — the file equals the one an N:M-code export
    that measures for itself writes."""
    src = str(tiny_model_factory("llama", num_hidden_layers=2, hidden_size=128, intermediate_size=256))
    args = ["--nsamples", "3", "--seqlen", "24", "-q", "--no-checkpoint"]
    table = tmp_path / "pass1.json"
    assert run_export_cli(capsys, [src, "--out", str(tmp_path / "a.bin"), "--bpw", "4", "--measurements",
                                   str(table), *args])[0] == 0
    ref = tmp_path / "ref.bin"
    rc, err = run_export_cli(capsys, [src, "--out", str(ref), "--bpw", "2.5", "--sb-code", "nm", *args])
    assert rc == 0, err
    monkeypatch.setattr(planner, "measure", lambda *a, **k: pytest.fail("pass 1 ran"))
    out = tmp_path / "b.bin"
    rc, err = run_export_cli(capsys, [src, "--out", str(out), "--bpw", "2.5", "--sb-code", "nm", "--measurements",
                                      str(table), *args])
    assert rc == 0, err
    assert out.read_bytes() == ref.read_bytes()
    from gguf import GGUFReader
    plan = json.loads(GGUFReader(str(out)).get_field("pbs2p.plan").contents())
    shape = {"ffn_down": (128, 256), "ffn_gate": (256, 128), "ffn_up": (256, 128), "attn_k": (64, 128),
             "attn_v": (64, 128)}
    sb = [(pre, c, b) for pre, c, b, _, _ in plan["layers"] if c.startswith("pbs2p-")]
    assert sb, plan  # the budget put some layers in the N:M code, each counted at the N:M code's bytes
    nm = solver.SolverConfig(nm_code=True)
    for pre, c, b in sb:
        r, k = shape.get(pre.split(".")[-1], (128, 128))
        assert b == planner.code_bytes(c, r, k, nm) < planner.code_bytes(c, r, k, solver.SolverConfig()), pre

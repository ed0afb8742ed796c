"""The N:M code (docs/format.md, "The N:M code"): the encoder against the planes for every N:M, an export with
--sb-code nm against the same export in planes (same values, fewer bytes, the C runtime's logits bit-identical),
the version rule, and hostile codes refused by both readers with a clear message."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pbs2p import format as fmt
from pbs2p.exporter import config, driver, models, solver
from pbs2p.exporter import planner
from tiny_model import native_library

NMS = [(n, 8) for n in range(1, 9)] + [(n, 4) for n in range(1, 5)]


def _random_layer(rng, r, k, n, m, nb):
    kept = np.zeros((r, k // m, m), dtype=bool)
    for i, g in itertools.product(range(r), range(k // m)):
        kept[i, g, rng.choice(m, n, replace=False)] = True
    terms = np.where(kept.reshape(r, k), rng.choice([-1, 1], size=(r, k)), 0).astype(np.int8)
    return fmt.pack_sb(terms, rng.random((r, 1, nb)) + 0.1, rng.standard_normal((r, nb)) * 0.01, 64, nm=(n, m))


@pytest.mark.parametrize("n,m", NMS, ids=lambda v: str(v))
def test_encode_decode_every_nm(n, m):
    rng = np.random.default_rng(n * 10 + m)
    r, k = 3, 192
    sb = _random_layer(rng, r, k, n, m, 3)
    code = fmt.encode_nm(sb, n, m)
    pb = fmt.nm_pattern_bits(n, m)
    assert pb == (math.ceil(math.log2(math.comb(m, n))) if n < m else 0)
    assert code.shape == (r, fmt.nm_row_bytes(k, n, m)) == (r, k // m * pb // 8 + k * n // m // 8)
    assert np.array_equal(fmt.decode_nm(code, k, n, m), sb.planes)
    # the first group's index and signs, read by hand from the bit strings
    pats = fmt.nm_patterns(n, m)
    bits = np.unpackbits(code[0], bitorder="little")
    idx = int(sum(int(b) << i for i, b in enumerate(bits[:pb])))
    w0 = fmt.unpack_sb(sb)[0, 0, :m]
    assert pats[idx] == sum(1 << c for c in range(m) if w0[c])
    sign_bits = bits[k // m * pb:][:n]
    assert [1 if v > 0 else 0 for v in w0 if v] == sign_bits.tolist()
    assert sb.nbytes() == code.nbytes + sb.alpha.nbytes + sb.mu.nbytes


def test_ineligible_layers_refused():
    rng = np.random.default_rng(0)
    sb = _random_layer(rng, 2, 128, 6, 8, 2)
    with pytest.raises(ValueError, match="row 0, group 0: 6 kept weights, the 5:8 code needs 5"):
        fmt.encode_nm(sb, 5, 8)
    terms = fmt.unpack_sb(sb)
    terms[0, 1, :8] = 1  # a group with 8 kept
    with pytest.raises(ValueError, match="row 1, group 0: 8 kept"):
        fmt.pack_sb(terms, sb.alpha, sb.mu, 64, nm=(6, 8))
    with pytest.raises(ValueError, match="one binary term"):
        fmt.pack_sb(np.stack([terms[0] * 0 + fmt.unpack_sb(sb)[0]] * 2), np.ones((2, 2, 2)), sb.mu, 64, nm=(6, 8))
    with pytest.raises(ValueError, match="multiple of 64"):
        fmt.pack_sb(fmt.unpack_sb(sb)[:, :, :96], np.ones((2, 1, 2)), np.zeros((2, 2)), 64, nm=(6, 8))


def test_planner_bytes_follow_the_code():
    base = solver.SolverConfig(nm_code=True)
    assert planner.code_bytes("pbs2p-6:8", 10, 576, base) == 10 * (576 // 8 * 11 // 8 + 5 * 2 + 5 * 2)
    assert planner.code_bytes("binary", 10, 576, base) == 10 * (576 // 8 + 10 + 10)
    assert planner.code_bytes("residual", 10, 576, base) == 10 * (2 * 2 * 9 * 8 + 2 * 5 * 2 + 5 * 2)  # planes
    assert planner.code_bytes("pbs2p-6:8", 10, 96, base) == 10 * (2 * 2 * 8 + 2 + 2)  # K % 64 != 0: planes
    assert planner.code_bytes("pbs2p-6:8", 10, 576, solver.SolverConfig()) == 10 * (2 * 9 * 8 + 20)


_cache: dict = {}


def _export(tiny_model_factory, tmp_path_factory, fam, code, **kw):
    key = (fam, code, tuple(sorted(kw.items())))
    if key not in _cache:
        over = dict(hidden_size=128, intermediate_size=192) if fam == "llama" else {}
        folder = tiny_model_factory(fam, **over)
        out = tmp_path_factory.mktemp("nm") / f"{fam}-{code}.bin"
        sc = solver.SolverConfig(nm_code=code == "nm", block_size=64, **kw.pop("solver", {}))
        cfg = config.QuantConfig(nsamples=3, seqlen=32, progress=False, seed=0, solver=sc, **kw)
        comp, _ = driver.export(models.load(str(folder)), out, cfg)
        _cache[key] = (out, comp)
    return _cache[key]


@pytest.mark.parametrize("fam,nm", [("llama", "6:8"), ("qwen2", "4:8"), ("opt", "2:4"), ("qwen2", "dense")])
def test_export_nm_equals_planes(tiny_model_factory, tmp_path_factory, fam, nm):
    from pbs2p import Runtime

    native_library()
    planes, comp_p = _export(tiny_model_factory, tmp_path_factory, fam, "planes", nm=config.parse_nm(nm))
    coded, comp_n = _export(tiny_model_factory, tmp_path_factory, fam, "nm", nm=config.parse_nm(nm))
    mp, mn = fmt.ModelFile(planes), fmt.ModelFile(coded)
    assert mp.version == fmt.BASE_FORMAT_VERSION and mn.version == fmt.NM_CODE_VERSION
    n, m = config.parse_nm(nm) or (8, 8)
    prefixes = mn.linear_prefixes()
    assert prefixes == mp.linear_prefixes()
    for pre in prefixes:
        a, b = mp.sb(pre), mn.sb(pre)
        assert b.nm == (n, m) and pre + fmt.nm_suffix(n, m) in mn.tensors and pre + fmt.SUFFIX_PLANES not in mn.tensors
        assert np.array_equal(a.planes, b.planes) and np.array_equal(a.alpha, b.alpha) and np.array_equal(a.mu, b.mu)
        assert b.nbytes() == a.nbytes() - a.planes.nbytes + a.n_out * fmt.nm_row_bytes(a.n_in, n, m)
        assert np.array_equal(comp_p.linears[pre].dequantize(), comp_n.linears[pre].dequantize())
    sp, sn = mp.storage(), mn.storage()
    assert sn["linear_bytes"] < sp["linear_bytes"] and sn["param_bits"] == sp["param_bits"]
    rng = np.random.default_rng(1)
    with Runtime(planes, threads=2) as rp, Runtime(coded, threads=2) as rn:
        assert rn.info.format_version == fmt.NM_CODE_VERSION
        assert rn.info.n_linear_bytes == sn["linear_bytes"] and rp.info.n_linear_bytes == sp["linear_bytes"]
        assert rn.info.param_bits == pytest.approx(rp.info.param_bits)
        for n_tok in (1, 5, 12):  # decode, few-token chunks, prefill (the whole-range decode)
            ids = rng.integers(0, rp.info.n_vocab, n_tok).tolist()
            assert np.array_equal(rp.logits(ids), rn.logits(ids))


def test_plan_with_nm_code_bytes_match_file(tiny_model_factory, tmp_path_factory):
    out, comp = _export(tiny_model_factory, tmp_path_factory, "qwen2", "nm", method="plan", bpw=4.0,
                        codes=("q8_0", "q4_0", "pbs2p-6:8", "binary"))
    mf = fmt.ModelFile(out)
    plan = comp.plan
    for e in plan.layers:
        assert mf.linear_weights(e.prefix)[1] == e.nbytes, e.prefix
    assert any(mf.nm_tensor(e.prefix) for e in plan.layers)


# ---- hostile codes ------------------------------------------------------------------------------------------

def _patched(path, tmp_path, name, edit):
    """A copy of path with the bytes of tensor `name` changed by edit(ndarray uint8 view)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == name)
    data = bytearray(path.read_bytes())
    view = np.frombuffer(data, dtype=np.uint8)[int(t.data_offset):int(t.data_offset) + int(t.n_bytes)].copy()
    edit(view.reshape(int(t.shape[1]), int(t.shape[0])))
    data[int(t.data_offset):int(t.data_offset) + int(t.n_bytes)] = view.tobytes()
    out = tmp_path / "hostile.bin"
    out.write_bytes(bytes(data))
    return out


def test_bad_pattern_index_refused(tiny_model_factory, tmp_path_factory, tmp_path):
    from pbs2p import FormatError, Runtime

    native_library()
    coded, _ = _export(tiny_model_factory, tmp_path_factory, "qwen2", "nm", nm=(6, 8))
    mf = fmt.ModelFile(coded)
    name = next(n for n in mf.tensors if n.endswith(".nm6of8"))

    def edit(a):
        a[1, 0] |= 0x1F  # row 1, group 0: index 31 >= C(8,6) = 28

    bad = _patched(coded, tmp_path, name, edit)
    with pytest.raises(FormatError, match=r"row 1, group 0 has a pattern index"):
        Runtime(bad)
    with pytest.raises(fmt.FormatError, match=r"row 1, group 0 has pattern index 31 >= C\(8,6\) = 28"):
        fmt.ModelFile(bad).sb(name.rsplit(".", 1)[0])


def test_nm_code_in_version_2_file_refused(tiny_model_factory, tmp_path_factory, tmp_path):
    from pbs2p import FormatError, Runtime

    native_library()
    coded, _ = _export(tiny_model_factory, tmp_path_factory, "qwen2", "nm", nm=(6, 8))
    data = bytearray(coded.read_bytes())
    key = fmt.KEY_FORMAT_VERSION.encode()
    at = data.find(key) + len(key)
    assert data[at + 4] == fmt.NM_CODE_VERSION
    data[at + 4] = fmt.BASE_FORMAT_VERSION
    old = tmp_path / "v2.bin"
    old.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="the N:M code needs pbs2p.format_version >= 3, the file has 2"):
        Runtime(old)
    mf = fmt.ModelFile(old)
    with pytest.raises(fmt.FormatError, match="needs pbs2p.format_version >= 3"):
        mf.sb(mf.linear_prefixes()[0])


def test_repack_round_trip(tiny_model_factory, tmp_path_factory, tmp_path):
    from pbs2p import Runtime
    from pbs2p.format import repack

    native_library()
    planes, _ = _export(tiny_model_factory, tmp_path_factory, "opt", "planes", nm=(5, 8))
    coded = tmp_path / "coded.bin"
    r = repack.repack(planes, coded)
    assert r["coded"] == len(fmt.ModelFile(planes).linear_prefixes()) and r["planes"] == 0
    assert r["bytes_after"] == fmt.ModelFile(coded).storage()["linear_bytes"] < r["bytes_before"]
    ids = list(range(3, 40))
    with Runtime(planes) as a, Runtime(coded) as b:
        assert np.array_equal(a.logits(ids), b.logits(ids))
    back = tmp_path / "back.bin"
    assert repack.main([str(coded), str(back), "--planes"]) == 0
    assert back.read_bytes() == planes.read_bytes()  # the same file, byte for byte
    assert repack.main([str(coded), str(back), "--planes"]) == 1  # exists, no --force


def test_repack_plan_keeps_plan_bytes_true(tiny_model_factory, tmp_path_factory, tmp_path):
    src, _ = _export(tiny_model_factory, tmp_path_factory, "qwen2", "planes", method="plan", bpw=4.0,
                     codes=("q8_0", "q4_0", "q3", "pbs2p-6:8", "binary"))
    from pbs2p.format import repack

    dst = tmp_path / "plan-nm.bin"
    repack.repack(src, dst)
    mf = fmt.ModelFile(dst)
    plan = fmt.Plan.from_json(mf.kv[fmt.KEY_PLAN])
    assert all(mf.linear_weights(e.prefix)[1] == e.nbytes for e in plan.layers)
    assert any(mf.nm_tensor(e.prefix) for e in plan.layers)
    a, b = fmt.ModelFile(src), mf
    for pre in a.linear_prefixes():
        if a.is_sb(pre):
            assert np.array_equal(a.sb(pre).planes, b.sb(pre).planes)
        elif a.is_q3(pre):
            assert np.array_equal(a.q3(pre).data, b.q3(pre).data)

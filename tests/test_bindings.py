"""The Python bindings (pbs2p.Runtime) on tiny seeded model files: numerics against the PyTorch reference,
generation semantics (streaming, seeds, stop strings, UTF-8), errors, interruption, threads."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from pbs2p import format as fmt
from tiny_model import ROOT, native_library, write_tiny_model
from conftest import need  # noqa: E402
from pbs2p import Status  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog. Binary weights keep only a sign"
# Runtime vs the PyTorch fake-quant reference (activation quantization emulated with format.quantize_act). Both
# compute the same function in a different f32 summation order, so logits agree to ~4e-7 of their range
# (measured: max |diff| 2.7e-5 at max |logit| 75, seeds 0, 3, 5). But where an activation lands within an ulp
# of a rounding boundary of the int8 quantizer, the two round it differently; that step (amax/127 · α) then
# propagates through attention to every later position: measured up to 0.6 absolute (8e-3 relative) for
# seeds 1, 2, 4 at a few positions (68-93 of 96). Hence: most positions tight, all positions loose.
LOGIT_RTOL = 1e-5
LOGIT_RTOL_FLIPPED = 2e-2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    native_library()
    return write_tiny_model(tmp_path_factory.mktemp("bind") / "tiny.bin", seed=0)


@pytest.fixture(scope="module")
def rt(tiny):
    from pbs2p import Runtime

    with Runtime(tiny.path, threads=2) as r:
        yield r


# ---- numerics ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_factory(tmp_path_factory, tiny):
    cache = {0: tiny}

    def make(seed: int):
        if seed not in cache:
            cache[seed] = write_tiny_model(tmp_path_factory.mktemp("bind") / f"tiny{seed}.bin", seed=seed)
        return cache[seed]

    return make


@pytest.mark.parametrize("seed", [0, 1])  # seed 1 has tie flips (see LOGIT_RTOL_FLIPPED)
def test_logits_match_pytorch(tiny_factory, seed):
    from pbs2p import Runtime

    tiny = tiny_factory(seed)
    with Runtime(tiny.path, threads=2) as rt:
        ids = rt.tokenize(PROMPT * 6)
        assert 80 < len(ids) < rt.n_ctx
        got = rt.logits(ids)
    assert got.shape == (len(ids), rt.n_vocab) and got.dtype == np.float32
    ref = tiny.torch_logits(ids)
    scale = np.abs(ref).max()
    err = np.abs(got - ref).max(axis=-1) / scale  # per position
    # a flip at position p spreads to every later position, so the close fraction depends on where it lands
    assert np.mean(err < LOGIT_RTOL) >= 0.5, err
    assert err[:16].max() < LOGIT_RTOL, err  # too early for a tie flip to have happened and spread
    assert err.max() < LOGIT_RTOL_FLIPPED, err
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.95
    # without the activation-quantization emulation the difference is orders of magnitude larger: the
    # runtime really quantizes activations (the check above is not trivially met by any close model)
    plain = tiny.torch_logits(ids, act_quant=False)
    assert np.abs(got - plain).max() / scale > 100 * LOGIT_RTOL


def test_logits_are_from_a_fresh_context(rt):
    ids = rt.tokenize(PROMPT)
    a = rt.logits(ids)
    rt.generate("something else entirely", max_tokens=5, temperature=0)
    b = rt.logits(ids)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(rt.logits(ids[:5]), a[:5])


def test_greedy_tokens_match_pytorch(rt, tiny):
    import torch

    ids = rt.tokenize(PROMPT)
    model = tiny.torch_model()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(12):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if rt.is_eog(nxt):
                break
            seq.append(nxt)
    assert rt.generate(PROMPT, max_tokens=12, temperature=0) == rt.detokenize(seq[len(ids):])


# ---- generation ------------------------------------------------------------------------------------------------

def test_stream_equals_non_stream(rt):
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=5)):
        full = rt.generate(PROMPT, max_tokens=40, **kw)
        pieces = list(rt.generate(PROMPT, max_tokens=40, stream=True, **kw))
        assert "".join(pieces) == full and all(pieces)


def test_same_seed_same_text(rt, tiny):
    from pbs2p import Runtime

    a = [rt.generate(PROMPT, max_tokens=30, temperature=1.2, seed=s) for s in range(5)]
    b = [rt.generate(PROMPT, max_tokens=30, temperature=1.2, seed=s) for s in range(5)]
    assert a == b
    assert len(set(a)) > 1  # the seed matters
    # a Runtime seed fixes the sequence of per-call seeds
    outs = []
    for _ in range(2):
        with Runtime(tiny.path, threads=1, seed=123) as r:
            outs.append([r.generate(PROMPT, max_tokens=20, temperature=1.0) for _ in range(3)])
    assert outs[0] == outs[1]


def test_stop_strings(rt):
    full = rt.generate(PROMPT, max_tokens=40, temperature=0)
    assert len(full) > 12
    stop = full[6:9]
    want = full[:full.find(stop)]
    assert rt.generate(PROMPT, max_tokens=40, temperature=0, stop=stop) == want
    assert "".join(rt.generate(PROMPT, max_tokens=40, temperature=0, stop=[stop, "\x00never"], stream=True)) == want
    assert rt.generate(PROMPT, max_tokens=40, temperature=0, stop="\x00never") == full


def test_max_tokens_and_context(rt):
    assert rt.generate(PROMPT, max_tokens=0) == ""
    one = rt.tokenize(rt.generate(PROMPT, max_tokens=1, temperature=0), add_bos=False)
    assert 0 <= len(one) <= 1
    # generation stops (no exception) when the context is full
    long_prompt = rt.detokenize(rt.tokenize(PROMPT * 40, add_bos=False)[: rt.n_ctx - 5])
    text = rt.generate(long_prompt, max_tokens=50, temperature=0)
    assert len(rt.tokenize(text, add_bos=False)) <= 6


def test_text_stream_utf8_and_stops():
    from pbs2p.runtime import TextStream

    emoji = "é😀".encode()
    ts = TextStream()
    out = [ts.push(emoji[i:i + 1]) for i in range(len(emoji))]
    assert out == ["", "é", "", "", "", "😀"]
    assert ts.flush() == ""
    ts = TextStream(["STOP"])
    assert ts.push(b"abc ST") == "abc "  # "ST" held back: it may start the stop string
    assert ts.push(b"OX") == "STOX"
    assert ts.push(b" xS") == " x"
    assert ts.push(b"TOP tail") == "" and ts.stopped
    assert ts.push(b"more") == "" and ts.flush() == ""
    ts = TextStream(["STOP"])
    assert ts.push(b"\xf0\x9f") == "" and ts.flush() == "\ufffd"


def test_tokenize_detokenize(rt):
    text = "Hello wörld 😀 — 1234\n\tend"
    ids = rt.tokenize(text, add_bos=False)
    assert all(isinstance(i, int) for i in ids) and rt.detokenize(ids) == text
    assert rt.tokenize(text.encode(), add_bos=False) == ids
    # SmolLM2 metadata: add_bos_token = false
    assert rt.tokenize(text, add_bos=True) == ids
    special = rt.tokenize("<|im_start|>user", add_bos=False, parse_special=True)
    assert special[0] == 1 and rt.tokenize("<|im_start|>user", add_bos=False)[0] != 1
    assert rt.detokenize(special) == "user" and rt.detokenize(special, render_special=True) == "<|im_start|>user"


def test_chat(rt):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = rt.apply_chat_template(msgs)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert rt.chat(msgs, max_tokens=10, temperature=0) == rt.generate(prompt, max_tokens=10, temperature=0)
    with pytest.raises(ValueError):
        rt.chat([{"role": "user"}])
    with pytest.raises(ValueError):
        rt.chat([])


# ---- perplexity ------------------------------------------------------------------------------------------------

def _reference_perplexity(rt, text: str, seqlen: int) -> float:
    ids = rt.tokenize(text, add_bos=False)
    nll, n = 0.0, 0
    for w in range(len(ids) // seqlen):
        win = ids[w * seqlen:(w + 1) * seqlen]
        lg = rt.logits(win).astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
        nll += float((lse[:-1] - lg[np.arange(seqlen - 1), win[1:]]).sum())
        n += seqlen - 1
    return float(np.exp(nll / n))


def test_perplexity(rt, tmp_path):
    text = (PROMPT + ". ") * 30
    n_tok = len(rt.tokenize(text, add_bos=False))
    assert n_tok > 3 * 64
    ppl = rt.perplexity(text, seqlen=64, progress=False, chunk=24)
    assert ppl == pytest.approx(_reference_perplexity(rt, text, 64), rel=1e-9)
    p = tmp_path / "text.txt"
    p.write_text(text, encoding="utf-8")
    assert rt.perplexity(p, seqlen=64, progress=False) == pytest.approx(ppl, rel=1e-9)
    assert rt.perplexity(str(p), seqlen=64, progress=False) == pytest.approx(ppl, rel=1e-9)
    with pytest.raises(ValueError):
        rt.perplexity(text, seqlen=rt.n_ctx + 1)
    with pytest.raises(ValueError):
        rt.perplexity("short", seqlen=64)


def _cli() -> Path | None:
    for d in (os.environ.get("PBS2P_BUILD_DIR"), ROOT / "build" / "native"):
        if d and (Path(d) / "pbs2p-run").is_file():
            return Path(d) / "pbs2p-run"
    found = shutil.which("pbs2p-run")
    return Path(found) if found else None


def test_perplexity_equals_cli(rt, tiny, tmp_path):
    cli = _cli()
    need(cli is not None, "pbs2p-run not built: set PBS2P_BUILD_DIR (tools/test.sh builds build/native)")
    import re

    text = (PROMPT + ". ") * 30
    p = tmp_path / "text.txt"
    p.write_text(text, encoding="utf-8")
    r = subprocess.run([str(cli), "-m", str(tiny.path), "--perplexity", str(p), "--seqlen", "64", "-t", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.findall(r"PPL = ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m[-1]) == pytest.approx(rt.perplexity(p, seqlen=64, progress=False), rel=1e-4)


# ---- info ------------------------------------------------------------------------------------------------------

def test_info_and_repr(rt, tiny):
    i = rt.info
    c = tiny.config
    assert (i.arch, i.n_vocab, i.n_embd, i.n_layer, i.n_head, i.n_head_kv, i.head_dim, i.n_ff) == \
        ("llama", c["n_vocab"], c["n_embd"], c["n_layer"], c["n_head"], c["n_head_kv"], c["head_dim"], c["n_ff"])
    assert i.nm_m == 4 and i.nm_n == (2, 4) and i.nm == "mixed 2:4/4:4"
    assert i.block_size == 64 and i.format_version == fmt.BASE_FORMAT_VERSION and i.method == "random"
    assert i.file_size == os.path.getsize(tiny.path)
    from pbs2p.dump import linear_stats

    stats = linear_stats(fmt.ModelFile(tiny.path))
    assert i.n_linear_weights == sum(s.n_out * s.n_in for s in stats)
    assert i.n_linear_bytes == sum(s.n_bytes for s in stats)
    assert i.storage_bpw == pytest.approx(8 * i.n_linear_bytes / i.n_linear_weights)
    assert i.param_bits == pytest.approx(sum(s.param_bits for s in stats) / i.n_linear_weights)
    assert rt.metadata["pbs2p.nm.n"] == [2, 4]
    r = repr(rt)
    assert "llama" in r and "mixed 2:4/4:4" in r and rt.kernel in r


# ---- errors ----------------------------------------------------------------------------------------------------

def test_errors(rt, tiny, tmp_path, caplog):
    from pbs2p import FormatError, Pbs2pError, Runtime, VersionError

    with pytest.raises(FileNotFoundError):
        Runtime(tmp_path / "nope.bin")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)
    with caplog.at_level(logging.ERROR, logger="pbs2p"):
        with pytest.raises(FormatError) as e:
            Runtime(bad)
    assert e.value.status == Status.ERR_FORMAT and e.value.message and isinstance(e.value, Pbs2pError)
    assert any(e.value.message in r.getMessage() for r in caplog.records)  # C log lines reach `logging`

    newer = tmp_path / "newer.bin"  # the tiny model with pbs2p.format_version patched to one past the current
    data = bytearray(tiny.path.read_bytes())
    key = fmt.KEY_FORMAT_VERSION.encode()
    at = data.find(key) + len(key)
    assert data[at:at + 8] == b"\x04\x00\x00\x00" + fmt.BASE_FORMAT_VERSION.to_bytes(4, "little")  # type u32
    data[at + 4] = fmt.FORMAT_VERSION + 1
    newer.write_bytes(bytes(data))
    with pytest.raises(VersionError) as e:
        Runtime(newer)
    assert str(fmt.FORMAT_VERSION + 1) in e.value.message

    for kw in (dict(threads=0), dict(context_length=-1), dict(seed=-1), dict(kernel=3)):
        with pytest.raises(ValueError):
            Runtime(tiny.path, **kw)
    with pytest.raises(Pbs2pError):
        Runtime(tiny.path, kernel="no-such-kernel")
    for kw in (dict(top_p=0), dict(temperature=-1), dict(max_tokens=-1), dict(stop=[""]), dict(min_p=2)):
        with pytest.raises(ValueError):
            rt.generate(PROMPT, **kw)
    with pytest.raises(ValueError):
        rt.logits([rt.n_vocab])
    with pytest.raises(ValueError):
        rt.logits([])
    with pytest.raises(ValueError):
        rt.logits([1] * (rt.n_ctx + 1))
    with pytest.raises(ValueError):
        rt.detokenize([-1])
    assert rt.generate(PROMPT, max_tokens=3, temperature=0)  # still usable


def test_close_and_context_manager(tiny):
    from pbs2p import Runtime

    with Runtime(tiny.path, threads=1) as r:
        assert r.generate("Hi", max_tokens=2, temperature=0) is not None
    assert "closed" in repr(r)
    with pytest.raises(ValueError):
        r.logits([1, 2])
    r.close()  # idempotent
    r2 = Runtime(tiny.path, threads=1)
    del r2  # __del__ frees the C handles (ASan builds report a leak otherwise)


# ---- interruption ----------------------------------------------------------------------------------------------

def _kv_consistent(rt) -> bool:
    from pbs2p.runtime import lib

    return lib().pbs2p_ctx_n_past(rt._ctx) == len(rt._tokens)


def test_interrupt_between_tokens_keeps_runtime_usable(rt, monkeypatch):
    expected = rt.generate(PROMPT, max_tokens=20, temperature=0)
    # KeyboardInterrupt thrown at a yield (the consumer's Ctrl-C while a piece is handled)
    g = rt.generate(PROMPT, max_tokens=20, temperature=0, stream=True)
    next(g)
    with pytest.raises(KeyboardInterrupt):
        g.throw(KeyboardInterrupt)
    assert _kv_consistent(rt)
    assert rt.generate(PROMPT, max_tokens=20, temperature=0) == expected

    # KeyboardInterrupt right after an evaluation returned (the signal arrives while C runs)
    real = rt._eval
    calls = {"n": 0}

    def interrupted(ids, *a, **k):
        real(ids, *a, **k)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(rt, "_eval", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rt.generate(PROMPT, max_tokens=20, temperature=0)
    monkeypatch.undo()
    assert _kv_consistent(rt) and len(rt._tokens) > 0
    assert rt.generate(PROMPT, max_tokens=20, temperature=0) == expected


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_real_sigint_during_generate(rt):
    expected = rt.generate(PROMPT, max_tokens=30, temperature=0)
    # A process started in the background by a non-interactive shell inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler (seen when CI was launched with `&`): install Python's default here.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            for i, _ in enumerate(rt.generate(PROMPT, max_tokens=200, temperature=0, stream=True)):
                if i == 2:
                    os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, old)
    assert _kv_consistent(rt)
    assert rt.generate(PROMPT, max_tokens=30, temperature=0) == expected


# ---- threads ---------------------------------------------------------------------------------------------------

def test_one_runtime_two_threads_is_refused(rt):
    g = rt.generate(PROMPT, max_tokens=50, temperature=0, stream=True)
    next(g)  # the generator now holds the runtime
    errors = []
    t = threading.Thread(target=lambda: errors.append(_catch(lambda: rt.logits([1, 2]))))
    t.start()
    t.join()
    assert isinstance(errors[0], RuntimeError) and "another thread" in str(errors[0])
    with pytest.raises(RuntimeError, match="unfinished"):
        rt.logits([1, 2])
    g.close()
    assert rt.logits([1, 2]).shape == (2, rt.n_vocab)


def _catch(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - returned to the test thread
        return e
    return None


def test_two_runtimes_in_parallel(tiny, tiny_factory):
    from pbs2p import Runtime

    other = tiny_factory(1)
    paths = [tiny.path, other.path]
    with Runtime(paths[0], threads=1) as a, Runtime(paths[1], threads=1) as b:
        serial = [(r.generate(PROMPT, max_tokens=40, temperature=0), r.logits(r.tokenize(PROMPT)))
                  for r in (a, b)]
        results: list = [None, None]
        barrier = threading.Barrier(2)

        def work(i, r):
            barrier.wait()
            out = []
            for _ in range(3):
                out.append((r.generate(PROMPT, max_tokens=40, temperature=0), r.logits(r.tokenize(PROMPT))))
            results[i] = out

        threads = [threading.Thread(target=work, args=(i, r)) for i, r in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in range(2):
        assert results[i] is not None
        for text, lg in results[i]:
            assert text == serial[i][0]
            np.testing.assert_array_equal(lg, serial[i][1])
    assert serial[0][0] != serial[1][0] or not np.array_equal(serial[0][1], serial[1][1])


# ---- the example -----------------------------------------------------------------------------------------------

def test_example_generate(tiny):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env["PBS2P_LIB"] = str(native_library())
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "generate.py"), str(tiny.path), "Once upon a time",
                        "--max-tokens", "16", "--temperature", "0"], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    from pbs2p import Runtime

    with Runtime(tiny.path, threads=1) as rt1:
        want = rt1.generate("Once upon a time", max_tokens=16, temperature=0)
    assert r.stdout == want + "\n"
    assert "pbs2p.Runtime" in r.stderr


# ---- files from the exporter -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_exported_model_matches_fakequant(tiny_model_factory, tmp_path, family):
    """pbs2p.exporter → file → Runtime, against the exporter's fake-quant reference (exporter.fakequant with
    act_quant). Embeddings and head are f32 here so that the comparison isolates the sparse-binary linears: with the
    default Q8_0 the tiny OPT's 21st token puts one layer-0 activation on an int8 rounding boundary, and the flip
    reaches every later position through attention (median 1.2e-5; with f32: 1.4e-7, none above 1e-5). The Q8_0 and
    Q4_0 head kernels are compared in tests/test_c_model.py. Measured on 2:4 exports of conftest's tiny models
    (151 tokens): median per-position error ~1e-7 of the logit range, argmax ≥ 95 %."""
    import torch

    from pbs2p import Runtime
    from pbs2p.exporter import config, driver, fakequant
    from conftest import TINY_TEXT

    native_library()
    out = tmp_path / f"{family}.bin"
    cfg = config.QuantConfig(nm=(2, 4), nsamples=4, seqlen=32, progress=False, calib="self", embed_type="f32")
    driver.export(str(tiny_model_factory(family)), out, cfg)
    with Runtime(out, threads=2) as r:
        assert r.info.arch == family and r.info.nm == "2:4"
        ids = r.tokenize(TINY_TEXT[:300])
        got = r.logits(ids)
        full = r.generate("The quick", max_tokens=16, temperature=0)
        assert "".join(r.generate("The quick", max_tokens=16, temperature=0, stream=True)) == full
    ref_model = fakequant.load_fakequant(out, act_quant=True)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(got - ref).max(axis=-1) / np.abs(ref).max()
    assert np.median(err) < LOGIT_RTOL and err.max() < LOGIT_RTOL_FLIPPED, err
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.95

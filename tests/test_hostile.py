"""Truncated and hostile model files and prompts through every door: the pbs2p-run CLI, the Python Runtime and
pbs2p-dump. Every bad input must give a clear error (a message naming the problem, exit code 1 / the right
exception), never a crash (a signal), a hang (timeouts) or a huge allocation (the CLI runs under a 1 GiB
address-space limit, so an allocation sized from an unvalidated count fails as "out of memory" — also an error).
The cases come from tools/make_fuzz_corpus.py, the fuzzer's seed corpus; docs/reliability.md has the table.
"""
from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_model  # noqa: E402
from conftest import need  # noqa: E402

_spec = importlib.util.spec_from_file_location("make_fuzz_corpus", ROOT / "tools" / "make_fuzz_corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

# Well-formed files the runtime accepts on purpose (documented in docs/reliability.md).
VALID = ("valid", "valid300", "valid-q3")
ACCEPTED = {"semantic merges of 0", "semantic eos id 2^32-1 (none)"}
TIMEOUT = 20


def _cli() -> Path:
    for d in (os.environ.get("PBS2P_BUILD_DIR"), ROOT / "build" / "native"):
        if d and (Path(d) / "pbs2p-run").is_file():
            return Path(d) / "pbs2p-run"
    found = shutil.which("pbs2p-run")
    if found:
        return Path(found)
    need(False, "pbs2p-run not built: set PBS2P_BUILD_DIR (tools/test.sh builds build/native)")


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def run_cli(*args: str, input_file: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(_cli()), *args], capture_output=True, timeout=TIMEOUT, preexec_fn=_limit_memory)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """name -> file: a valid small model (write_tiny_model, ~50-token vocabulary), a ~300-token one, and every
    hostile variant: cut at each section boundary, corrupted fields, semantically wrong metadata."""
    d = tmp_path_factory.mktemp("hostile")
    valid = corpus.write_small_model(d / "valid.gguf", corpus.small_byte_level_kv())
    out = {"valid": valid, "valid300": corpus.write_small_model(d / "valid300.gguf"),
           "valid-q3": corpus.write_small_model(d / "valid-q3.gguf", corpus.small_byte_level_kv(), dense=corpus.Q3_DENSE)}
    data = valid.read_bytes()
    cases = {f"cut {k}": data[:off] for k, off in corpus.cut_points(data).items()}
    cases.update({f"corrupt {k}": v for k, v in corpus.corrupt_variants(data).items()})
    cases.update({f"semantic {k}": v for k, v in corpus.semantic_variants(d).items()})
    for i, (name, b) in enumerate(cases.items()):
        p = d / f"case{i:03d}.gguf"
        p.write_bytes(b)
        out[name] = p
    return out


def hostile(files: dict[str, Path]) -> dict[str, Path]:
    return {k: v for k, v in files.items() if k not in VALID and k not in ACCEPTED}


def test_cases_cover_the_issue(files):
    names = " | ".join(files)
    for what in ("cut header end", "cut data start", "cut tensor data token_embd.weight", "cut kv general.name start",
                 "cut tensor info", "n_kv 2^63", "n_tensors 2^63", "key length 2^63", "array tokenizer.ggml.tokens length 2^63",
                 "string general.name length 2^63", "tensor offset wraps onto the header", "tensor 1 overlaps tensor 0",
                 "vocabulary of 0", "merge names an unknown token"):
        assert what in names, what
    assert len(hostile(files)) > 150


def test_cli_refuses_every_hostile_file(files):
    bad = []
    for name, path in hostile(files).items():
        r = run_cli("-m", str(path), "-p", "hi", "-n", "2", "-t", "1")
        err = r.stderr.decode("utf-8", "replace")
        if r.returncode != 1 or "error: cannot load" not in err or "out of memory" in err:
            bad.append(f"{name}: rc {r.returncode}: {err.strip()[-300:]}")
    assert not bad, "\n".join(bad)


def _generated(stderr: str) -> int:
    """Tokens generated, from pbs2p-run's timing line ("generated N tokens"); -1 when there is none."""
    import re

    m = re.search(r"generated (\d+) tokens", stderr)
    return int(m.group(1)) if m else -1


def test_cli_runs_the_valid_and_accepted_files(files):
    for name in (*VALID, *sorted(ACCEPTED)):
        r = run_cli("-m", str(files[name]), "-p", "the", "-n", "3", "-t", "1")
        err = r.stderr.decode(errors="replace")
        assert r.returncode == 0, (name, err)
        assert _generated(err) in range(4) and "error" not in err, (name, err)  # ran: a timing line, no error


def test_runtime_refuses_every_hostile_file(files):
    tiny_model.native_library()
    from pbs2p.runtime import FormatError, Pbs2pError, Runtime, UnsupportedError, VersionError

    bad = []
    for name, path in hostile(files).items():
        try:
            Runtime(path, threads=1, context_length=16).close()
            bad.append(f"{name}: loaded")
        except (FormatError, VersionError, UnsupportedError) as e:
            if not e.message:
                bad.append(f"{name}: {type(e).__name__} without a message")
        except Pbs2pError as e:
            bad.append(f"{name}: {type(e).__name__} (expected a format error): {e}")
    assert not bad, "\n".join(bad)


def test_dump_refuses_structurally_bad_files(files):
    """pbs2p-dump describes metadata; it checks the container (cuts and corrupt fields) and leaves the content
    (tokenizer ids, hyper-parameters) to the loader."""
    import io

    from pbs2p import dump

    bad = []
    for name, path in hostile(files).items():
        if name.startswith("semantic"):
            continue
        try:
            dump.dump(str(path), out=io.StringIO())
            bad.append(f"{name}: accepted")
        except ValueError as e:
            if not str(e):
                bad.append(f"{name}: empty message")
    assert not bad, "\n".join(bad)
    dump.dump(str(files["valid"]), out=io.StringIO())


def test_dump_cli_one_line_error(files):
    for name in ("cut header end", "corrupt n_kv 2^63", "corrupt tensor offset wraps onto the header"):
        r = subprocess.run([sys.executable, "-m", "pbs2p.dump", str(files[name])], capture_output=True, timeout=60)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.startswith("pbs2p-dump: error:") and err.count("\n") == 1, (name, err)


# ---- prompts ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rt(files):
    tiny_model.native_library()
    from pbs2p.runtime import Runtime

    with Runtime(files["valid300"], threads=1, context_length=64, seed=0) as r:
        yield r


def test_invalid_utf8_and_nul_prompts(rt):
    for text in (b"\xff\xfe\xc0\xaf abc \xed\xa0\x80 \xf4\x90\x80\x80 \xe2\x82", b"a\x00b\x00\x00c", b"\x00" * 100):
        ids = rt.tokenize(text, add_bos=False)
        assert ids and all(0 <= t < rt.n_vocab for t in ids)
        # the length travels with the bytes: NULs are tokens, not terminators; a byte-level vocabulary round-trips
        assert b"".join(rt.token_bytes(t) for t in ids) == text
    out = rt.generate("a\x00b \udcff".encode("utf-8", "surrogateescape").decode("utf-8", "replace") + "\x00",
                      max_tokens=3, temperature=0)
    assert isinstance(out, str)
    assert isinstance(rt.generate("x\x00y", max_tokens=2), str)


def test_one_megabyte_prompt(rt):
    text = ("The quick brown fox 1234 \u00e9\u65e5 <|im_start|> " * 30000)[: 1 << 20]
    ids = rt.tokenize(text, add_bos=False, parse_special=True)
    assert len(ids) > 64 and all(0 <= t < rt.n_vocab for t in ids)
    with pytest.raises(ValueError, match="does not fit the context of 64"):
        rt.generate(text, max_tokens=1)
    with pytest.raises(ValueError, match="does not fit"):
        rt.generate("word " * 100, max_tokens=1)
    assert isinstance(rt.generate("still usable", max_tokens=2), str)
    with pytest.raises(ValueError, match="65 tokens do not fit the context of 64"):
        rt.logits(list(range(65)))


def test_cli_prompt_longer_than_context(files, tmp_path):
    r = run_cli("-m", str(files["valid300"]), "-c", "16", "-p", "word " * 40, "-n", "2", "-t", "1")
    assert r.returncode == 1 and b"the context holds 16 (raise --ctx)" in r.stderr, r.stderr
    big = tmp_path / "big.txt"
    big.write_bytes(b"The quick brown fox \xff\x00 " * 50000)  # ~1.1 MB, invalid UTF-8 and NUL bytes
    r = run_cli("-m", str(files["valid300"]), "-f", str(big), "-n", "2", "-t", "1")
    assert r.returncode == 1 and b"the context holds" in r.stderr, r.stderr


def test_cli_invalid_utf8_and_nul_prompt_file(files, tmp_path):
    p = tmp_path / "odd.txt"
    p.write_bytes(b"hi \xff\xfe\x00 there \xc0\xaf\x00")
    for extra in ((), ("--chat",)):  # --chat: the message is a C string, so it ends at the first NUL (documented)
        r = run_cli("-m", str(files["valid300"]), "-f", str(p), "-n", "3", "-t", "1", *extra)
        err = r.stderr.decode(errors="replace")
        assert r.returncode == 0 and _generated(err) in range(4), err


def test_no_leaks_in_a_generation_run(files):
    """One pbs2p-run generation under valgrind's leak checker (the ASan ctest build covers the C tests)."""
    need(shutil.which("valgrind"), "valgrind not installed (apt-get install valgrind)")
    r = subprocess.run(["valgrind", "--leak-check=full", "--show-leak-kinds=definite,indirect,possible",
                        "--errors-for-leak-kinds=definite,indirect,possible", "--error-exitcode=99",
                        str(_cli()), "-m", str(files["valid300"]), "-p", "hello there", "-n", "4", "-t", "2"],
                       capture_output=True, timeout=300)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0, err[-3000:]
    assert "ERROR SUMMARY: 0 errors" in err and "definitely lost" not in err.replace("definitely lost: 0", ""), err[-2000:]

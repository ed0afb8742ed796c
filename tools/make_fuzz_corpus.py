#!/usr/bin/env python3
"""Seed corpus for the libFuzzer targets (runtime/fuzz/) and the hostile-file cases of tests/test_hostile.py.

    python3 tools/make_fuzz_corpus.py OUT_DIR

writes (nothing is committed: the files are regenerated from this script, deterministically):

    OUT_DIR/valid/         small valid model files (~300-token vocabularies, n_embd 32, one layer, ~25 KB):
                           byte-level BPE (gpt2, smollm and qwen2 pre-tokenizers) and SentencePiece (llama);
                           small-*: ~50-token vocabularies (~5 KB), the loader seeds
    OUT_DIR/loader/        seeds for fuzz-loader: the small valid files, and corrupted variants (cut at every
                           section boundary, counts of 2^63, string / array lengths of 2^63, tensors overlapping
                           each other or wrapping onto the header, bad types / dims / alignment, a vocabulary of
                           0, merges naming unknown tokens, special ids out of range, ...)
    OUT_DIR/tokenizer/     seeds for fuzz-tokenizer: texts (ASCII, UTF-8, invalid UTF-8, NUL, special markers)
    OUT_DIR/tokenizer.gguf the fixed model fuzz-tokenizer loads (PBS2P_FUZZ_MODEL)

The byte-level vocabulary is learned here with a few lines of BPE (no `tokenizers` training), so the script
needs only numpy, gguf, the installed pbs2p package (pip install .) and tests/tiny_model.py.
"""
from __future__ import annotations

import contextlib
import os
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

import tiny_model  # noqa: E402  (tests/tiny_model.py: write_tiny_model)
from pbs2p import format as fmt  # noqa: E402

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Binary weights keep only a sign; sparse weights keep only "
    "some of them. The runtime counts bits with popcount and adds them up: one two three 1234 5678. "
    "Ünïcödé text, 日本語, emoji 🙂 and tabs\tand\nnew lines. It's what they've said, we'll see. "
) * 4

# ---- a small byte-level BPE vocabulary ------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level alphabet of every gpt2-model vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on space-split words in the byte-level alphabet (enough for a valid, exercising vocabulary)."""
    b2u = bytes_to_unicode()
    words = Counter()
    for i, w in enumerate(text.split(" ")):
        words[tuple(b2u[b] for b in ((" " if i else "") + w).encode())] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        new = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    return merges


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_level_kv(pre: str = "smollm", n_merges: int = 40, alphabet: bytes | None = None) -> list[tuple[str, Any, str]]:
    """tokenizer.* keys of a ~300-token byte-level BPE: 3 specials, 256 bytes, n_merges merged pieces.
    alphabet: only these bytes (a ~40-token vocabulary for fast loader seeds; other bytes are dropped)."""
    b2u = bytes_to_unicode()
    text = SAMPLE_TEXT if alphabet is None else bytes(b for b in SAMPLE_TEXT.encode() if b in alphabet).decode()
    merges = train_bpe(text, n_merges)
    tokens = SPECIALS + [b2u[b] for b in range(256) if alphabet is None or b in alphabet]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return [("tokenizer.ggml.model", "gpt2", "str"), ("tokenizer.ggml.pre", pre, "str"),
            ("tokenizer.ggml.tokens", tokens, "arr_str"), ("tokenizer.ggml.token_type", types, "arr_i32"),
            ("tokenizer.ggml.merges", [f"{a} {b}" for a, b in merges], "arr_str"),
            ("tokenizer.ggml.bos_token_id", 1, "u32"), ("tokenizer.ggml.eos_token_id", 2, "u32"),
            ("tokenizer.ggml.padding_token_id", 0, "u32"), ("tokenizer.ggml.add_bos_token", False, "bool"),
            ("tokenizer.chat_template", CHATML, "str")]


def spm_kv(n_merges: int = 40, byte_tokens: range = range(256)) -> list[tuple[str, Any, str]]:
    """tokenizer.* keys of a ~300-token SentencePiece BPE with byte fallback (<unk> <s> </s>, <0xAB>, pieces
    scored by merge rank: the highest score merges first). byte_tokens: fewer <0xAB> for a smaller file."""
    text = SAMPLE_TEXT if len(byte_tokens) == 256 else "".join(c for c in SAMPLE_TEXT if c.isascii())
    merges = train_bpe(text.replace(" ", "\u2581"), n_merges)
    b2u = bytes_to_unicode()
    u2b = {v: k for k, v in b2u.items()}
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in byte_tokens]
    scores = [0.0] * len(tokens)
    for ch in sorted(set(text.replace(" ", "\u2581"))):
        tokens.append(ch)
        scores.append(-1000.0)
    for r, (a, b) in enumerate(merges):
        piece = bytes(u2b[c] for c in a + b).decode("utf-8", "replace")
        if piece not in tokens and "\ufffd" not in piece:
            tokens.append(piece)
            scores.append(-float(r))
    types = [2, 3, 3] + [6] * len(byte_tokens) + [1] * (len(tokens) - 3 - len(byte_tokens))
    return [("tokenizer.ggml.model", "llama", "str"), ("tokenizer.ggml.tokens", tokens, "arr_str"),
            ("tokenizer.ggml.scores", scores, "arr_f32"), ("tokenizer.ggml.token_type", types, "arr_i32"),
            ("tokenizer.ggml.unknown_token_id", 0, "u32"), ("tokenizer.ggml.bos_token_id", 1, "u32"),
            ("tokenizer.ggml.eos_token_id", 2, "u32"), ("tokenizer.ggml.add_bos_token", True, "bool")]


@contextlib.contextmanager
def _tokenizer(kv: list[tuple[str, Any, str]]) -> Iterator[None]:
    """write_tiny_model copies its tokenizer.* keys from smollm2_tokenizer_kv(); swap in a small vocabulary."""
    saved = tiny_model.smollm2_tokenizer_kv
    tiny_model.smollm2_tokenizer_kv = lambda: tuple(kv)
    try:
        yield
    finally:
        tiny_model.smollm2_tokenizer_kv = saved


def write_small_model(path: str | os.PathLike[str], tok_kv: list[tuple[str, Any, str]] | None = None,
                      seed: int = 0, **over: Any) -> Path:
    """A valid ~20 KB model: write_tiny_model with n_embd 32, one 2:4 layer (one dense F16 linear), n_ctx 64,
    and a ~300-token tokenizer."""
    kw: dict[str, Any] = dict(n_embd=32, n_ff=64, n_layer=1, n_head=2, n_head_kv=1, n_ctx=64, block_size=64,
                              nm_n=(2,), n_terms=(1,), dense={"blk.0.attn_v": fmt.GGMLType.F16})
    kw.update(over)
    with _tokenizer(tok_kv if tok_kv is not None else byte_level_kv()):
        tiny_model.write_tiny_model(path, seed=seed, **kw)
    return Path(path)


# ---- the GGUF layout of a file, for cutting and patching ----------------------------------------------

_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_layout(data: bytes) -> dict[str, Any]:
    """Offsets of every section of a (valid) GGUF file:
    counts: offsets of the n_tensors / n_kv fields; kv: [(key, start, value_offset, end, type)];
    tensor_info: [(name, start, ne_offset, type_offset, offset_field, end)], data_start, tensors: [(name, abs)]."""
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def rd_str(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", data, p)
        return data[p + 8:p + 8 + n].decode(), p + 8 + n

    kvs, align = [], 32
    for _ in range(n_kv):
        start = pos
        key, pos = rd_str(pos)
        (t,) = struct.unpack_from("<I", data, pos)
        vpos = pos = pos + 4
        if t == 8:
            _, pos = rd_str(pos)
        elif t == 9:
            et, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if et == 8:
                for _ in range(n):
                    _, pos = rd_str(pos)
            else:
                pos += n * _SCALAR_SIZE[et]
        else:
            if key == "general.alignment":
                (align,) = struct.unpack_from("<I", data, pos)
            pos += _SCALAR_SIZE[t]
        kvs.append((key, start, vpos, pos, t))
    infos = []
    for _ in range(n_tensors):
        start = pos
        name, pos = rd_str(pos)
        (nd,) = struct.unpack_from("<I", data, pos)
        ne_off = pos + 4
        type_off = ne_off + 8 * nd
        infos.append((name, start, ne_off, type_off, type_off + 4, type_off + 12))
        pos = type_off + 12
    data_start = (pos + align - 1) // align * align
    tensors = [(name, data_start + struct.unpack_from("<Q", data, off)[0]) for name, _, _, _, off, _ in infos]
    return {"n_tensors_field": 8, "n_kv_field": 16, "header_end": pos, "kv": kvs, "tensor_info": infos,
            "data_start": data_start, "tensors": tensors, "alignment": align}


def cut_points(data: bytes) -> dict[str, int]:
    """Where to truncate: every section boundary (and a few mid points), by a descriptive name."""
    lay = gguf_layout(data)
    cuts = {"empty": 0, "magic": 4, "version": 8, "counts": 24}
    for key, start, vpos, end, _ in lay["kv"]:
        cuts[f"kv {key} start"] = start
        cuts[f"kv {key} value"] = vpos
        if end - vpos > 16:
            cuts[f"kv {key} mid"] = (vpos + end) // 2
    for name, start, ne_off, type_off, _, end in lay["tensor_info"]:
        cuts[f"tensor info {name}"] = start
        cuts[f"tensor info {name} dims"] = ne_off + 4
    cuts["header end"] = lay["header_end"]
    cuts["data start"] = lay["data_start"]
    for name, off in lay["tensors"]:
        cuts[f"tensor data {name}"] = off
    cuts["last byte missing"] = len(data) - 1
    cuts["mid file"] = len(data) // 2
    return {k: v for k, v in cuts.items() if v < len(data)}


def _patch(data: bytes, off: int, fmt_: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt_, b, off, value)
    return bytes(b)


def corrupt_variants(data: bytes) -> dict[str, bytes]:
    """Structural corruptions of a valid file, by name (each must be refused cleanly)."""
    lay = gguf_layout(data)
    out: dict[str, bytes] = {}
    for name, v in (("2^63", 1 << 63), ("2^64-1", (1 << 64) - 1), ("2^32", 1 << 32)):
        out[f"n_tensors {name}"] = _patch(data, 8, "<Q", v)
        out[f"n_kv {name}"] = _patch(data, 16, "<Q", v)
        out[f"key length {name}"] = _patch(data, lay["kv"][0][1], "<Q", v)
        ti = lay["tensor_info"][0]
        out[f"tensor name length {name}"] = _patch(data, ti[1], "<Q", v)
        out[f"tensor ne[0] {name}"] = _patch(data, ti[2], "<Q", v)
        out[f"tensor offset {name}"] = _patch(data, ti[4], "<Q", v)
    for key, start, vpos, end, t in lay["kv"]:
        if t == 9:
            for name, v in (("2^63", 1 << 63), ("2^64-1", (1 << 64) - 1)):
                out[f"array {key} length {name}"] = _patch(data, vpos + 4, "<Q", v)
            (et,) = struct.unpack_from("<I", data, vpos)
            if et == 8:
                out[f"array {key} first string length 2^63"] = _patch(data, vpos + 12, "<Q", 1 << 63)
            out[f"array {key} nested"] = _patch(data, vpos, "<I", 9)
            out[f"array {key} element type 99"] = _patch(data, vpos, "<I", 99)
        elif t == 8:
            out[f"string {key} length 2^63"] = _patch(data, vpos, "<Q", 1 << 63)
        out[f"kv {key} type 99"] = _patch(data, vpos - 4, "<I", 99)
    infos = lay["tensor_info"]
    first, second = infos[0], infos[1]
    out["tensor 1 overlaps tensor 0"] = _patch(data, second[4], "<Q", struct.unpack_from("<Q", data, first[4])[0])
    # a relative offset that wraps the absolute offset round to 0: the tensor would cover the header
    out["tensor offset wraps onto the header"] = _patch(data, first[4], "<Q", (1 << 64) - lay["data_start"])
    out["tensor offset misaligned"] = _patch(data, first[4], "<Q", struct.unpack_from("<Q", data, first[4])[0] + 1)
    out["tensor offset past the end"] = _patch(data, first[4], "<Q", len(data))
    out["tensor n_dims 0"] = _patch(data, first[2] - 4, "<I", 0)
    out["tensor n_dims 5"] = _patch(data, first[2] - 4, "<I", 5)
    out["tensor ne[0] 0"] = _patch(data, first[2], "<Q", 0)
    out["tensor type 99"] = _patch(data, first[3], "<I", 99)
    out["tensor type Q4_K (block 256)"] = _patch(data, first[3], "<I", 12)
    out["bad magic"] = b"GGUX" + data[4:]
    out["version 1"] = _patch(data, 4, "<I", 1)
    out["version 4"] = _patch(data, 4, "<I", 4)
    out["big endian"] = _patch(data, 4, ">I", 3)
    for key, start, vpos, end, t in lay["kv"]:
        if key == "general.alignment":
            out["alignment 0"] = _patch(data, vpos, "<I", 0)
            out["alignment 48"] = _patch(data, vpos, "<I", 48)
            out["alignment 2^31"] = _patch(data, vpos, "<I", 1 << 31)
    return out


def patch_kv(data: bytes, key: str, fmt_: str, value: Any) -> bytes:
    """`data` with the scalar value of `key` overwritten in place."""
    vpos = next(vpos for k, _, vpos, _, _ in gguf_layout(data)["kv"] if k == key)
    return _patch(data, vpos, fmt_, value)


def empty_array(data: bytes, key: str) -> bytes:
    """`data` with the array `key` emptied (GGUFWriter refuses to write empty arrays). The bytes removed are
    added to general.name's string, so the data section and every tensor offset stay where they were."""
    lay = gguf_layout(data)
    kv = {k: (vpos, end) for k, _, vpos, end, _ in lay["kv"]}
    vpos, end = kv[key]
    delta = end - (vpos + 12)
    nvpos, nend = kv["general.name"]
    (nlen,) = struct.unpack_from("<Q", data, nvpos)
    edits = sorted([(vpos, end, data[vpos:vpos + 4] + struct.pack("<Q", 0)),
                    (nvpos, nend, struct.pack("<Q", nlen + delta) + data[nvpos + 8:nend] + b" " * delta)],
                   reverse=True)
    for a, b, new in edits:
        data = data[:a] + new + data[b:]
    return data


SMALL_ALPHABET = b" \n.,'etaoinshrdlucmTB0123"


def small_byte_level_kv(pre: str = "smollm") -> list[tuple[str, Any, str]]:
    """A ~50-token byte-level vocabulary: loader seeds of ~5 KB keep the fuzzer fast."""
    return byte_level_kv(pre, n_merges=20, alphabet=SMALL_ALPHABET)


Q3_DENSE = {"blk.0.attn_v": fmt.QType.Q3}  # a small model whose attn_v is a Q3 linear


def _patch_tensor_ne0(data: bytes, name: str, value: int) -> bytes:
    ti = next(t for t in gguf_layout(data)["tensor_info"] if t[0] == name)
    return _patch(data, ti[2], "<Q", value)


def _patch_tensor_data(data: bytes, name: str, at: int, value: int) -> bytes:
    """`data` with byte `at` of tensor `name`'s data OR-ed with value."""
    off = dict(gguf_layout(data)["tensors"])[name] + at
    return data[:off] + bytes([data[off] | value]) + data[off + 1:]


# a small model whose 2:4 linears are in the N:M code (K = 64 and 128: whole words)
NM_SMALL = dict(n_embd=64, n_ff=128, nm_code=True)


def semantic_variants(tmp: Path) -> dict[str, bytes]:
    """Well-formed GGUF files whose content is wrong (written through the normal writer), by name."""
    base = small_byte_level_kv()

    def with_kv(**repl: Any) -> list[tuple[str, Any, str]]:
        out = []
        for k, v, t in base:
            short = k.split(".")[-1]
            if short in repl:
                if repl[short] is None:
                    continue
                v = repl[short]
            out.append((k, v, t))
        return out

    tokens = next(v for k, v, _ in base if k == "tokenizer.ggml.tokens")
    merges = next(v for k, v, _ in base if k == "tokenizer.ggml.merges")
    cases: dict[str, Callable[[Path], Any]] = {
        "vocabulary of 0": lambda p: p.write_bytes(empty_array(write_small_model(p, with_kv(
            tokens=["a"], token_type=None, merges=None, bos_token_id=None, eos_token_id=None,
            padding_token_id=None)).read_bytes(), "tokenizer.ggml.tokens")),
        "merges of 0": lambda p: p.write_bytes(empty_array(write_small_model(p, with_kv(
            merges=[merges[0]])).read_bytes(), "tokenizer.ggml.merges")),
        "merge names an unknown token": lambda p: write_small_model(p, with_kv(merges=merges + ["zq xw"])),
        "merge result not in the vocabulary": lambda p: write_small_model(p, with_kv(merges=merges + ["0 1"])),
        "merge without a space": lambda p: write_small_model(p, with_kv(merges=["ab"] + merges)),
        "bos id out of range": lambda p: write_small_model(p, with_kv(bos_token_id=len(tokens))),
        "eos id 2^32-1 (none)": lambda p: write_small_model(p, with_kv(eos_token_id=(1 << 32) - 1)),
        "token_type 99": lambda p: write_small_model(p, with_kv(token_type=[99] * len(tokens))),
        "token_type too short": lambda p: write_small_model(p, with_kv(token_type=[1] * (len(tokens) - 1))),
        "unknown tokenizer model": lambda p: write_small_model(p, with_kv(model="wordpiece")),
        "unknown pre-tokenizer": lambda p: write_small_model(p, with_kv(pre="no-such-pre")),
        "duplicate tokens": lambda p: write_small_model(p, with_kv(tokens=tokens[:-1] + [tokens[5]])),
        "missing tokens": lambda p: p.write_bytes(write_small_model(p, base).read_bytes().replace(
            b"tokenizer.ggml.tokens", b"tokenizer.ggml.tokenz")),
        "vocab_size differs from the vocabulary": lambda p: p.write_bytes(patch_kv(
            write_small_model(p, base).read_bytes(), "pbs2p-llama.vocab_size", "<I", len(tokens) + 1)),
        "n_layer 2^31-1": lambda p: p.write_bytes(patch_kv(
            write_small_model(p, base).read_bytes(), "pbs2p-llama.block_count", "<I", (1 << 31) - 1)),
        "n_embd 2^32-1": lambda p: p.write_bytes(patch_kv(
            write_small_model(p, base).read_bytes(), "pbs2p-llama.embedding_length", "<I", (1 << 32) - 1)),
        "head_count 0": lambda p: p.write_bytes(patch_kv(
            write_small_model(p, base).read_bytes(), "pbs2p-llama.attention.head_count", "<I", 0)),
        "context_length 2^31": lambda p: p.write_bytes(patch_kv(
            write_small_model(p, base).read_bytes(), "pbs2p-llama.context_length", "<I", 1 << 31)),
        f"format_version {fmt.FORMAT_VERSION + 1}": lambda p: p.write_bytes(patch_kv(
            write_small_model(p, base).read_bytes(), "pbs2p.format_version", "<I", fmt.FORMAT_VERSION + 1)),
        "N:M code: pattern index 7 >= C(4,2)": lambda p: p.write_bytes(_patch_tensor_data(
            write_small_model(p, base, **NM_SMALL).read_bytes(), "blk.0.attn_q.nm2of4", 0, 7)),
        "N:M code in a format_version 2 file": lambda p: p.write_bytes(patch_kv(
            write_small_model(p, base, **NM_SMALL).read_bytes(), "pbs2p.format_version", "<I", 2)),
        "N:M code: row one byte short": lambda p: p.write_bytes(_patch_tensor_ne0(
            write_small_model(p, base, **NM_SMALL).read_bytes(), "blk.0.attn_q.nm2of4", 9)),
        "N:M code and planes for one linear": lambda p: p.write_bytes(
            write_small_model(p, base, **NM_SMALL).read_bytes().replace(b"blk.0.ffn_up.nm2of4", b"blk.0.attn_q.planes")),
        "two N:M codes for one linear": lambda p: p.write_bytes(
            write_small_model(p, base, **NM_SMALL).read_bytes().replace(b"blk.0.attn_k.nm2of4", b"blk.0.attn_q.nm1of4")),
        "format_version 1 with a pbs2p- name": lambda p: p.write_bytes(patch_kv(
            write_small_model(p, base).read_bytes(), "pbs2p.format_version", "<I", 1)),
        "nm.m 5 (not an allowed M)": lambda p: p.write_bytes(patch_kv(
            write_small_model(p, base).read_bytes(), "pbs2p.nm.m", "<I", 5)),
        "Q3 linear: row of 13 bytes (K/32 · 14 = 14)": lambda p: p.write_bytes(_patch_tensor_ne0(
            write_small_model(p, base, dense=Q3_DENSE).read_bytes(), "blk.0.attn_v.q3", 13)),
        "Q3 linear also stored sparse-binary": lambda p: p.write_bytes(
            write_small_model(p, base, dense=Q3_DENSE).read_bytes().replace(b"blk.0.attn_k.mu", b"blk.0.attn_k.q3")),
        "spm: scores missing": lambda p: write_small_model(p, [kv for kv in spm_kv() if kv[0] != "tokenizer.ggml.scores"]),
    }
    out = {}
    for name, make in cases.items():
        p = tmp / "semantic.gguf"
        make(p)
        out[name] = p.read_bytes()
    p.unlink(missing_ok=True)
    return out


TOKENIZER_SEEDS = {
    "ascii": b"Hello world! The quick brown fox jumps over the lazy dog.",
    "utf8": "Ünïcödé text, 日本語, emoji 🙂 ſ ß İ".encode(),
    "digits": b"1234567890 3.14159 -42 1e10",
    "contractions": b"It's they've we'll I'M YOU'RE don't",
    "whitespace": b" \t\n\r\n  \x0b\x0c  a  \n\n\n b",
    "specials": b"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<|endoftext|><s></s><unk>",
    "partial special": b"<|im_sta <|im_end <|",
    "invalid utf8": b"\xff\xfe\xc0\xaf\xed\xa0\x80\xf4\x90\x80\x80\xe2\x82 abc \x80\x80",
    "nul": b"a\x00b\x00\x00c",
    "long word": b"a" * 2000,
    "long digits": b"7" * 2000,
    "empty": b"",
}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1])
    for d in ("valid", "loader", "tokenizer"):
        (out / d).mkdir(parents=True, exist_ok=True)
    valid = {
        "gpt2-smollm": write_small_model(out / "valid" / "gpt2-smollm.gguf"),
        "gpt2-qwen2": write_small_model(out / "valid" / "gpt2-qwen2.gguf", byte_level_kv("qwen2"), seed=1),
        "gpt2-gpt2-untied": write_small_model(out / "valid" / "gpt2-gpt2-untied.gguf", byte_level_kv("gpt2"),
                                              seed=2, tied=False, emb_type=fmt.GGMLType.F16),
        "spm": write_small_model(out / "valid" / "spm.gguf", spm_kv(), seed=3),
    }
    (out / "tokenizer.gguf").write_bytes((out / "valid" / "gpt2-smollm.gguf").read_bytes())
    small = {
        "small-gpt2-smollm": write_small_model(out / "valid" / "small-gpt2-smollm.gguf", small_byte_level_kv()),
        "small-gpt2-qwen2": write_small_model(out / "valid" / "small-gpt2-qwen2.gguf", small_byte_level_kv("qwen2"),
                                              seed=1, n_layer=2, nm_n=(2, 4), n_terms=(1, 2)),
        "small-gpt2-untied-f16": write_small_model(out / "valid" / "small-gpt2-untied-f16.gguf",
                                                   small_byte_level_kv("gpt2"), seed=2, tied=False,
                                                   emb_type=fmt.GGMLType.F16),
        "small-spm": write_small_model(out / "valid" / "small-spm.gguf", spm_kv(20, range(0x20, 0x40)), seed=3),
        "small-q3": write_small_model(out / "valid" / "small-q3.gguf", small_byte_level_kv(), seed=4, dense=Q3_DENSE),
        "small-nm": write_small_model(out / "valid" / "small-nm.gguf", small_byte_level_kv(), seed=5, **NM_SMALL),
        "small-gpt2-untied-q4": write_small_model(out / "valid" / "small-gpt2-untied-q4.gguf",
                                                  small_byte_level_kv("gpt2"), seed=4, tied=False,
                                                  emb_type=fmt.GGMLType.Q4_0),
    }
    n = 0

    def put(name: str, data: bytes) -> None:
        nonlocal n
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:120]
        (out / "loader" / f"{n:04d}-{safe}").write_bytes(data)
        n += 1

    for vname, path in small.items():
        data = path.read_bytes()
        put(f"valid-{vname}", data)
        if vname != "small-gpt2-smollm":
            continue
        for cname, off in cut_points(data).items():
            put(f"cut-{cname}", data[:off])
        for cname, bad in corrupt_variants(data).items():
            put(f"corrupt-{cname}", bad)
    for sname, bad in semantic_variants(out).items():
        put(f"semantic-{sname}", bad)
    for i, (name, text) in enumerate(TOKENIZER_SEEDS.items()):
        (out / "tokenizer" / f"{i:02d}-{name.replace(' ', '_')}").write_bytes(text)
    if os.environ.get("PBS2P_FUZZ_LARGE_SEEDS"):  # the ~300-token models too (slower fuzzing)
        for vname, path in valid.items():
            put(f"valid-{vname}", path.read_bytes())
    print(f"{out}: {len(valid) + len(small)} valid models, {n} loader seeds, {len(TOKENIZER_SEEDS)} tokenizer seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

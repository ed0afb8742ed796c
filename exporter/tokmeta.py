"""The tokenizer.* metadata of a pbs2p file (docs/format.md).

From a GGUF source the keys are copied verbatim (exact: the runtime then tokenizes like llama.cpp does for that
file). From an HF tokenizer they are built: byte-level BPE -> `gpt2` (tokens in id order, merges in rank order,
control type for special/added tokens), SentencePiece-style BPE with byte fallback -> `llama` (scores, byte
tokens of type 6).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pbs2p.format import ModelFile, TokenType

KV = list[tuple[str, Any, str]]

def from_gguf(path: str | Path, n_vocab: int) -> KV:
    """Every tokenizer.* key of a GGUF file as (key, value, vtype); token arrays padded to n_vocab."""
    return _pad(ModelFile(path, strict=False).entries("tokenizer."), n_vocab)


def _pad(kv: KV, n_vocab: int) -> KV:
    """Extend tokens / token_type / scores to n_vocab rows (models often pad the embedding past the vocab)."""
    d = {k: i for i, (k, _, _) in enumerate(kv)}
    if "tokenizer.ggml.tokens" not in d:
        return kv
    n = len(kv[d["tokenizer.ggml.tokens"]][1])
    if n > n_vocab:
        raise ValueError(f"tokenizer has {n} tokens but the model's embedding has only {n_vocab} rows")
    extra = n_vocab - n
    if extra == 0:
        return kv
    fill = {"tokenizer.ggml.tokens": [f"[PAD{n + i}]" for i in range(extra)],
            "tokenizer.ggml.token_type": [int(TokenType.UNUSED)] * extra,
            "tokenizer.ggml.scores": [-1e9] * extra}
    out = list(kv)
    for key, add in fill.items():
        if key in d:
            k, v, t = out[d[key]]
            out[d[key]] = (k, list(v) + add, t)
    return out


def detect_pre(arch: str, tok: Any, name: str) -> str:
    """tokenizer.ggml.pre for a byte-level BPE tokenizer."""
    if arch == "qwen2":
        return "qwen2"
    if arch == "opt":
        return "gpt2"
    low = (name or "").lower() + " " + str(getattr(tok, "name_or_path", "")).lower()
    if "smollm" in low:
        return "smollm"
    vocab = tok.get_vocab()
    if "<|begin_of_text|>" in vocab:  # Llama 3's tokenizer
        return "llama-bpe"
    return "gpt2"


def from_hf(tok: Any, arch: str, n_vocab: int, name: str = "") -> KV:
    """Build the tokenizer metadata from an HF fast tokenizer."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model {model.get('type')!r} is not supported (BPE only)")
    n = len(tok)
    id_to_tok = [""] * n
    for t, i in tok.get_vocab().items():
        if i < n:
            id_to_tok[i] = t
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    special_ids = set(tok.all_special_ids)
    types = []
    byte_fallback = bool(model.get("byte_fallback"))
    for i, t in enumerate(id_to_tok):
        if i in added:
            types.append(int(TokenType.CONTROL if (added[i].get("special") or i in special_ids)
                             else TokenType.USER_DEFINED))
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(int(TokenType.BYTE))
        elif byte_fallback and t == (tok.unk_token or "<unk>") and i == tok.unk_token_id:
            types.append(int(TokenType.UNKNOWN))
        else:
            types.append(int(TokenType.NORMAL))
    kv: KV = []
    if byte_fallback:
        kv.append(("tokenizer.ggml.model", "llama", "str"))
        kv.append(("tokenizer.ggml.pre", "default", "str"))
        kv.append(("tokenizer.ggml.tokens", id_to_tok, "arr_str"))
        # The merge priority of a SentencePiece BPE vocabulary follows the piece order: score = -id.
        kv.append(("tokenizer.ggml.scores", [0.0 if i in added else -float(i) for i in range(n)], "arr_f32"))
        kv.append(("tokenizer.ggml.token_type", types, "arr_i32"))
    else:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        kv.append(("tokenizer.ggml.model", "gpt2", "str"))
        kv.append(("tokenizer.ggml.pre", detect_pre(arch, tok, name), "str"))
        kv.append(("tokenizer.ggml.tokens", id_to_tok, "arr_str"))
        kv.append(("tokenizer.ggml.token_type", types, "arr_i32"))
        kv.append(("tokenizer.ggml.merges", merges, "arr_str"))
    for attr, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("unk_token_id", "unknown_token_id"), ("pad_token_id", "padding_token_id")):
        v = getattr(tok, attr, None)
        if v is not None:
            kv.append((f"tokenizer.ggml.{key}", int(v), "u32"))
    kv.append(("tokenizer.ggml.add_bos_token", bool(_adds(tok, "bos")), "bool"))
    kv.append(("tokenizer.ggml.add_eos_token", bool(_adds(tok, "eos")), "bool"))
    tmpl = getattr(tok, "chat_template", None)
    if isinstance(tmpl, str) and tmpl:
        kv.append(("tokenizer.chat_template", tmpl, "str"))
    return _pad(kv, n_vocab)


def _adds(tok: Any, which: str) -> bool:
    """Whether encoding with special tokens adds BOS / EOS (checked by encoding, which is what counts)."""
    tid = getattr(tok, f"{which}_token_id", None)
    if tid is None:
        return False
    try:
        ids = tok("a", add_special_tokens=True)["input_ids"]
        plain = tok("a", add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode "a" adds nothing we can detect
        return False
    if len(ids) == len(plain):
        return False
    return (ids[0] == tid and plain[:1] != [tid]) if which == "bos" else (ids[-1] == tid and plain[-1:] != [tid])


def tokenizer_metadata(tok: Any, arch: str, n_vocab: int, gguf_path: Path | None, name: str = "") -> KV:
    """Prefer the source GGUF's keys (exact); fall back to building them from the HF tokenizer."""
    if gguf_path is not None:
        kv = from_gguf(gguf_path, n_vocab)
        if any(k == "tokenizer.ggml.tokens" for k, _, _ in kv):
            return kv
    return from_hf(tok, arch, n_vocab, name)


def hf_tokenizer(path: str | Path) -> Any:
    """A transformers tokenizer built from a pbs2p file's tokenizer.* keys. transformers refuses the file itself
    (its architecture is pbs2p-<family>, on purpose), so the keys are copied into a metadata-only GGUF that names
    the bare family, which transformers' GGUF tokenizer converter reads (llama, qwen2; not opt)."""
    import tempfile

    import gguf
    import transformers

    mf = ModelFile(path, strict=False)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "tokenizer.gguf"
        w = gguf.GGUFWriter(str(out), mf.family)
        for key, value, vt in mf.entries("tokenizer."):
            if vt.startswith("arr_"):
                sub = {"arr_u32": gguf.GGUFValueType.UINT32, "arr_i32": gguf.GGUFValueType.INT32,
                       "arr_f32": gguf.GGUFValueType.FLOAT32, "arr_str": gguf.GGUFValueType.STRING}[vt]
                w.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=sub)
            else:
                {"u32": w.add_uint32, "i32": w.add_int32, "f32": w.add_float32, "bool": w.add_bool,
                 "str": w.add_string}[vt](key, value)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return transformers.AutoTokenizer.from_pretrained(d, gguf_file=out.name)

"""Tokenizer-only GGUF fixtures for the C tokenizer tests.

`train_byte_level(pre, text)` and `train_spm(text)` train small HF `tokenizers` BPE models with the
pre-tokenizer of each vocabulary family (no real tokenizer of those families is available offline);
`write_tokenizer_gguf(hf_tokenizer, path, model, pre)` writes the `tokenizer.*` metadata of docs/format.md
for one of them (or any HF fast tokenizer of the same shape). The exporter has its own production writer.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS_BYTE_LEVEL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPECIALS_SPM = ["<unk>", "<s>", "</s>"]

# The split regexes of HF / llama.cpp for each tokenizer.ggml.pre (transformers' GGUF loader uses the same).
SPLIT_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# token_type values (docs/format.md)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer HF uses for a byte-level vocabulary with tokenizer.ggml.pre = `pre`."""
    if pre in ("gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM2's tokenizer.json
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    split = {"qwen2": SPLIT_QWEN2, "llama-bpe": SPLIT_LLAMA3}[pre]
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def train_byte_level(pre: str, text: str, vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS_BYTE_LEVEL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def train_spm(text: str, vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    """A Llama-2-shaped vocabulary: <unk> <s> </s>, the 256 <0xAB> byte tokens, then the learned pieces;
    BPE with byte fallback behind a Metaspace (prepend "first", no split) pre-tokenizer. limit_alphabet keeps
    rare characters out of the vocabulary so that byte fallback is exercised."""
    meta = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    base = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    base.pre_tokenizer = meta
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS_SPM, limit_alphabet=150,
                                  show_progress=False)
    base.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    learned = json.loads(base.to_str())["model"]
    pieces = [p for p, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if p not in SPECIALS_SPM]
    vocab = {p: i for i, p in enumerate(SPECIALS_SPM + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIALS_SPM])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _merges(backend: Tokenizer) -> list[str]:
    ms = json.loads(backend.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in ms]


def write_tokenizer_gguf(hf_tokenizer: PreTrainedTokenizerFast, path: str | Path, model: str, pre: str) -> None:
    """Write the tokenizer.* metadata (no tensors) of `hf_tokenizer` to `path`.

    model "gpt2": byte-level BPE, merges in rank order. model "llama": SentencePiece-style BPE; GGUF has no
    merges for it, so each piece's score is minus the rank of the first merge that produces it (0 for pieces
    no merge produces): merging by highest score then follows the merge order."""
    backend = hf_tokenizer.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)
    n_vocab = max(vocab.values()) + 1
    tokens = [""] * n_vocab
    for piece, i in vocab.items():
        tokens[i] = piece
    added = backend.get_added_tokens_decoder()
    types = [NORMAL] * n_vocab
    for i, at in added.items():
        types[i] = CONTROL if at.special else USER_DEFINED
    merges = _merges(backend)

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    if model == "llama":
        unk = hf_tokenizer.unk_token_id
        for i, piece in enumerate(tokens):
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                types[i] = BYTE
        if unk is not None:
            types[unk] = UNKNOWN
            w.add_unk_token_id(unk)
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        w.add_token_scores([-float(rank[p]) if p in rank else 0.0 for p in tokens])
        w.add_add_space_prefix(True)
    else:
        w.add_token_merges(merges)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if hf_tokenizer.bos_token_id is not None:
        w.add_bos_token_id(hf_tokenizer.bos_token_id)
    if hf_tokenizer.eos_token_id is not None:
        w.add_eos_token_id(hf_tokenizer.eos_token_id)
    w.add_add_bos_token(model == "llama")
    w.add_add_eos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

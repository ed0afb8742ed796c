"""Calibration windows: `self` (text the model samples itself, offline), a local .txt / .jsonl file, or
`hf:NAME` (the `datasets` package, online). Every source yields `nsamples` windows of exactly `seqlen` token ids,
chosen by a seeded generator, so the same inputs and seed give the same windows.

CPU defaults are 32 windows x 512 tokens; the lineage's protocol (`--paper`) is 128 x 2048 of C4 train.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import torch

DEFAULT_NSAMPLES = 32
DEFAULT_SEQLEN = 512
PAPER_NSAMPLES = 128
PAPER_SEQLEN = 2048


class CalibrationError(ValueError):
    pass


def read_text(path: Path) -> str:
    """A .txt file as is; a .jsonl file's "text" fields joined with blank lines."""
    if not path.is_file():
        raise CalibrationError(f"{path}: no such calibration file")
    if path.suffix.lower() == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{path}:{n}: not JSON: {e.msg}") from e
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise CalibrationError(f"{path}:{n}: no string \"text\" field")
                docs.append(obj["text"])
        return "\n\n".join(docs)
    return path.read_text(encoding="utf-8")


def windows_from_ids(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    """nsamples random windows (seeded) of seqlen tokens from a 1-D id tensor."""
    n = int(ids.numel())
    if n < seqlen + 1:
        raise CalibrationError(f"{what} has {n} tokens, fewer than one window of --seqlen {seqlen} (+1)")
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def tokenize_all(tok: Any, text: str) -> torch.Tensor:
    ids = tok(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def self_generated(model: Any, tok: Any, nsamples: int, seqlen: int, seed: int, batch: int = 32,
                   temperature: float = 1.0, progress: bool = True) -> torch.Tensor:
    """Sample nsamples sequences of seqlen tokens from the model itself, starting at BOS (fully offline).

    Plain multinomial sampling at temperature 1 (no top-k/top-p) through transformers' generate() with its KV
    cache, seeded with torch.manual_seed(seed) per batch; EOS is suppressed so every sequence runs to full
    length. (A hand-written decode loop passing the cache back measured ~3 s per step at batch 32 on this CPU
    with transformers 5, generate() 0.4 s.)
    """
    import transformers
    from tqdm.auto import tqdm

    dev = next(model.parameters()).device
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        start = 0
    eos = tok.eos_token_id
    transformers.logging.set_verbosity_error()  # generate() warns about pad ids and generation flags
    out = []
    bar = tqdm(total=nsamples, desc="calibration: sampling", disable=not progress, file=sys.stderr, leave=False)
    for b0 in range(0, nsamples, batch):
        nb = min(batch, nsamples - b0)
        torch.manual_seed(seed + b0)
        seq = torch.full((nb, 1), start, dtype=torch.long, device=dev)
        res = model.generate(seq, attention_mask=torch.ones_like(seq), do_sample=True, temperature=temperature,
                             top_k=0, top_p=1.0, max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1,
                             suppress_tokens=[eos] if eos is not None else None,
                             pad_token_id=eos if eos is not None else 0)
        out.append(res[:, :seqlen].cpu())
        bar.update(nb)
    bar.close()
    return torch.cat(out)


def get_windows(spec: str, model: Any, tok: Any, nsamples: int, seqlen: int, seed: int,
                progress: bool = True) -> tuple[torch.Tensor, str]:
    """-> (LongTensor (nsamples, seqlen), a one-line description for pbs2p.calibration)."""
    if nsamples <= 0 or seqlen <= 1:
        raise CalibrationError(f"need --nsamples >= 1 and --seqlen >= 2, got {nsamples} and {seqlen}")
    if spec == "self":
        ids = self_generated(model, tok, nsamples, seqlen, seed, progress=progress)
        return ids, f"self-generated text (sampling from BOS, T=1), {nsamples} x {seqlen} tokens, seed {seed}"
    if spec.startswith("hf:"):
        name = spec[3:]
        try:
            import datasets  # noqa: F401
        except ImportError as e:
            raise CalibrationError(f"--calib {spec} needs the `datasets` package and network access "
                                   "(pip install datasets); or pass a local .txt/.jsonl file") from e
        try:
            ds = datasets.load_dataset(name, split="train", streaming=True)
            texts = []
            for i, row in enumerate(ds):
                texts.append(row["text"])
                if sum(len(t) for t in texts) > nsamples * seqlen * 8 or i > 100000:
                    break
        except Exception as e:  # noqa: BLE001 - any network / dataset error becomes one clear message
            raise CalibrationError(f"--calib {spec}: cannot load the dataset (offline?): {e}") from e
        ids = tokenize_all(tok, "\n\n".join(texts))
        return windows_from_ids(ids, nsamples, seqlen, seed, spec), \
            f"{spec} train, {nsamples} random windows x {seqlen} tokens, seed {seed}"
    path = Path(spec)
    ids = tokenize_all(tok, read_text(path))
    return windows_from_ids(ids, nsamples, seqlen, seed, str(path)), \
        f"{path.name}, {nsamples} random windows x {seqlen} tokens, seed {seed}"

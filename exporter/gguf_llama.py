"""`--format gguf-llama`: the compressed model as a GGUF that stock llama.cpp (and Ollama, LM Studio,
llama-cpp-python) loads and runs.

    save_gguf_llama(pbs2p_file, out, force=False) -> dict

Built from the pbs2p file, linear by linear, in the stock type that holds it best:

- Q8_0 and Q4_0 linears, embeddings, the output head, norms and biases: their bytes as they are (exact).
- Q3 linears (pbs2p's own 3-bit block, no ggml type): Q4_0 with the same f16 scale and nibble q + 4, so
  d·(nibble − 8) = d·(q − 4) — exact, at 4.5 instead of 3.5 bits per weight.
- Sparse-binary linears (±α + μ per row and column block, N:M zeros): llama.cpp's ternary TQ2_0 (or TQ1_0,
  `ternary=`) holds one where it is ternary with one scale per 256 columns: μ = 0 (`pbs2p-export --symmetric`),
  one term, K a multiple of 256 and α equal across each 256 columns (`--block-size 256`). Those are written in it
  (gguf-py's quantizer: d = the block's largest |value| = α, q = value/α + 1, exact; checked by dequantizing).
  The rest are re-encoded in Q8_0 (F16 where K is not a multiple of 32), and the relative error ‖Ŵ − W‖/‖W‖ of
  each is returned and printed.

llama family: the rows of attn_q and attn_k (and their biases) are reordered as llama.cpp's converter reorders
them (its llama graph rotates interleaved pairs, HF's rotate_half pairs i and i + hd/2; pbs2p files keep HF's
order): a permutation of whole rows, so every row's bytes stay as they are. qwen2 needs none (llama.cpp's NEOX
rope is HF's pairing).
Architecture keys are renamed from pbs2p-<family>.* to llama.cpp's <arch>.*; pbs2p.* keys are dropped; the
tokenizer keys are copied. Families: llama (llama.cpp "llama") and qwen2 ("qwen2"); llama.cpp has no OPT graph.
The file is written under a temporary name and renamed (format.ModelWriter): a failed export leaves none.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as ggq

from pbs2p import format as fmt

from .config import ExportError

STOCK_ARCH = {"llama": "llama", "qwen2": "qwen2"}  # pbs2p family -> llama.cpp general.architecture
TERNARY = {"tq2_0": GGMLQuantizationType.TQ2_0, "tq1_0": GGMLQuantizationType.TQ1_0}  # 2.06 / 1.69 bits per weight
TERNARY_BLOCK = 256
PRE_NAMES = {"gpt2": "gpt-2"}  # pre-tokenizer names pbs2p spells otherwise than llama.cpp (the same GPT-2 regex)


class GgufLlamaError(ExportError):
    pass


def check_family(family: str | None) -> str:
    """llama.cpp's architecture name for a pbs2p family, or GgufLlamaError naming the families it runs."""
    if family not in STOCK_ARCH:
        raise GgufLlamaError(f"--format gguf-llama: llama.cpp has no {family} architecture "
                             f"(families it runs: {', '.join(STOCK_ARCH)})")
    return STOCK_ARCH[family]


def rope_rows(family: str, prefix: str, n_rows: int, n_head: int, n_head_kv: int) -> np.ndarray | None:
    """The row order llama.cpp's llama graph needs for attn_q / attn_k: within each head of hd rows, row
    2·j + s of the output is row s·hd/2 + j of HF's; None for every other tensor and for qwen2."""
    if family != "llama" or not prefix.endswith((".attn_q", ".attn_k")):
        return None
    heads = n_head if prefix.endswith(".attn_q") else n_head_kv
    return np.arange(n_rows).reshape(heads, 2, n_rows // heads // 2).swapaxes(1, 2).reshape(-1)


def _linear_of(name: str, linears: set[str]) -> str | None:
    pre = name.rsplit(".", 1)[0]
    return pre if pre in linears and not name.endswith(fmt.SUFFIX_BIAS) else None


def _ternary(x: np.ndarray, gtype: Any) -> np.ndarray | None:
    """x (R, K) in llama.cpp's ternary type gtype when that holds it exactly, else None."""
    if x.shape[1] % TERNARY_BLOCK:
        return None
    data = ggq.quantize(x, gtype)
    return data if np.array_equal(ggq.dequantize(data, gtype), x) else None


def save_gguf_llama(path: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False,
                    ternary: str = "tq2_0") -> dict[str, Any]:
    """Write the stock-llama.cpp GGUF of the pbs2p file `path` to `out`; ternary: the type (tq2_0, tq1_0) of
    sparse-binary linears that map exactly. Returns {"file_bytes", "linear_bytes",
    "linear_weights", "storage_bpw" (of this file, counted as ModelFile.storage counts), "linears": {code: count},
    "reencoded": [(linear, stock type, relative error), ...], "max_rel_err"}."""
    if ternary not in TERNARY:
        raise GgufLlamaError(f"ternary type {ternary!r}: choose one of {', '.join(TERNARY)}")
    mf = fmt.ModelFile(path)
    arch = check_family(mf.family)
    src = mf.arch + "."
    linears = set(mf.linear_prefixes())
    counts: dict[str, int] = {}
    reencoded: list[tuple[str, str, float]] = []
    lin_bytes = lin_weights = 0
    with fmt.ModelWriter(out, mf.family, overwrite=force, stock_arch=arch) as w:
        for key, value, vtype in mf.entries(""):
            if key in (fmt.KEY_ARCHITECTURE, fmt.KEY_ALIGNMENT) or key.startswith("pbs2p."):
                continue
            if key == "tokenizer.ggml.pre":
                value = PRE_NAMES.get(value, value)
            w.add_kv(arch + "." + key[len(src):] if key.startswith(src) else key, value, vtype)
        n_head = int(mf.hparam("attention.head_count"))
        n_head_kv = int(mf.hparam("attention.head_count_kv", n_head))

        def rows(pre: str, data: np.ndarray) -> np.ndarray:
            idx = rope_rows(mf.family, pre, data.shape[0], n_head, n_head_kv)
            return data if idx is None else np.ascontiguousarray(data[idx])

        done: set[str] = set()
        for name, t in mf.tensors.items():
            pre = _linear_of(name, linears)
            if pre is None:
                bias_of = name[:-len(fmt.SUFFIX_BIAS)] if name.endswith(fmt.SUFFIX_BIAS) else None
                data = np.asarray(t.data)
                w.add_raw(name, rows(bias_of, data) if bias_of in linears else data, int(t.tensor_type))
                continue
            if pre in done:
                continue
            done.add(pre)
            wname = pre + fmt.SUFFIX_WEIGHT
            if mf.is_sb(pre):
                sb = mf.sb(pre)
                x = rows(pre, fmt.dequantize_sb(sb).astype(np.float32))
                data = _ternary(x, TERNARY[ternary]) if sb.n_terms == 1 and not np.any(sb.mu) else None
                if data is not None:
                    gtype = TERNARY[ternary]
                    code = f"sparse-binary -> {gtype.name} (exact)"
                else:
                    if sb.n_in % fmt.Q8_0_BLOCK == 0:
                        gtype, data = fmt.GGMLType.Q8_0, fmt.quantize_q8_0(x)
                        y = fmt.dequantize_q8_0(data, sb.n_in)
                    else:
                        gtype, data = fmt.GGMLType.F16, x.astype(np.float16)
                        y = data.astype(np.float32)
                    err = float(np.linalg.norm(y - x) / max(float(np.linalg.norm(x)), 1e-30))
                    reencoded.append((pre, gtype.name, err))
                    code = "sparse-binary -> " + gtype.name
                w.add_raw(wname, data, gtype)
                nbytes, n = data.nbytes, x.size
            elif mf.is_q3(pre):
                q3 = mf.q3(pre)
                d, q = fmt.q3_integers(q3.data, q3.n_in)
                ql = fmt.pack_q(fmt.QType.Q4_0, rows(pre, d), rows(pre, q.astype(np.int16) + 4))
                w.add_q(pre, ql)
                nbytes, n = ql.nbytes(), q.size
                code = "Q3 -> Q4_0"
            else:
                t = mf.tensors[wname]
                w.add_raw(wname, rows(pre, np.asarray(t.data)), int(t.tensor_type))
                nbytes, n = int(t.n_bytes), int(np.prod([int(x) for x in t.shape]))
                code = fmt.GGMLType(int(t.tensor_type)).name
            counts[code] = counts.get(code, 0) + 1
            lin_bytes += nbytes
            lin_weights += n
    return {"file_bytes": Path(out).stat().st_size, "linear_bytes": lin_bytes, "linear_weights": lin_weights,
            "storage_bpw": 8.0 * lin_bytes / max(lin_weights, 1), "linears": counts, "reencoded": reencoded,
            "max_rel_err": max((e for _, _, e in reencoded), default=0.0)}


def summary(record: dict[str, Any]) -> str:
    """The lines pbs2p-export prints after a gguf-llama export."""
    lines = [f"gguf-llama file {record['file_bytes']:,} bytes; linears {record['linear_bytes']:,} bytes = storage "
             f"{record['storage_bpw']:.3f} bits/weight: " + ", ".join(f"{n} {c}" for c, n in record["linears"].items())]
    if record["reencoded"]:
        errs = [e for _, _, e in record["reencoded"]]
        lines.append(f"loss: {len(errs)} sparse-binary linears re-encoded (no stock type holds them exactly; "
                     "--symmetric --block-size 256 makes them TQ2_0 where K is a multiple of 256), "
                     f"relative weight error mean {np.mean(errs):.2e}, max {max(errs):.2e}")
    else:
        lines.append("loss: none (every linear maps exactly)")
    return "\n".join(lines)

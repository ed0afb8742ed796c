"""`--format gguf-llama`: the compressed model as a GGUF that stock llama.cpp (and Ollama, LM Studio,
llama-cpp-python) loads and runs.

    save_gguf_llama(pbs2p_file, out, force=False) -> dict

Built from the pbs2p file, linear by linear, in the stock type that holds it best:

- Q8_0 and Q4_0 linears, embeddings, the output head, norms and biases: their bytes as they are (exact).
- Q3 linears (pbs2p's own 3-bit block, no ggml type): Q4_0 with the same f16 scale and nibble q + 4, so
  d·(nibble − 8) = d·(q − 4) — exact, at 4.5 instead of 3.5 bits per weight.
- Sparse-binary linears (±α + μ per row and column block, N:M zeros): no stock type holds them exactly (the ternary
  TQ1_0 / TQ2_0 have one scale per 256 weights and no μ), so their exact values are re-encoded in Q8_0 (F16 where
  K is not a multiple of 32); the relative error ‖Ŵ − W‖/‖W‖ of each is returned and printed.

Architecture keys are renamed from pbs2p-<family>.* to llama.cpp's <arch>.*; pbs2p.* keys are dropped; the
tokenizer keys are copied. Families: llama (llama.cpp "llama") and qwen2 ("qwen2"); llama.cpp has no OPT graph.
The file is written under a temporary name and renamed (format.ModelWriter): a failed export leaves none.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pbs2p import format as fmt

from .config import ExportError

STOCK_ARCH = {"llama": "llama", "qwen2": "qwen2"}  # pbs2p family -> llama.cpp general.architecture
PRE_NAMES = {"gpt2": "gpt-2"}  # pre-tokenizer names pbs2p spells otherwise than llama.cpp (the same GPT-2 regex)


class GgufLlamaError(ExportError):
    pass


def check_family(family: str | None) -> str:
    """llama.cpp's architecture name for a pbs2p family, or GgufLlamaError naming the families it runs."""
    if family not in STOCK_ARCH:
        raise GgufLlamaError(f"--format gguf-llama: llama.cpp has no {family} architecture "
                             f"(families it runs: {', '.join(STOCK_ARCH)})")
    return STOCK_ARCH[family]


def _linear_of(name: str, linears: set[str]) -> str | None:
    pre = name.rsplit(".", 1)[0]
    return pre if pre in linears and not name.endswith(fmt.SUFFIX_BIAS) else None


def save_gguf_llama(path: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False) -> dict[str, Any]:
    """Write the stock-llama.cpp GGUF of the pbs2p file `path` to `out`. Returns {"file_bytes", "linear_bytes",
    "linear_weights", "storage_bpw" (of this file, counted as ModelFile.storage counts), "linears": {code: count},
    "reencoded": [(linear, stock type, relative error), ...], "max_rel_err"}."""
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
        done: set[str] = set()
        for name, t in mf.tensors.items():
            pre = _linear_of(name, linears)
            if pre is None:
                w.add_raw(name, np.asarray(t.data), int(t.tensor_type))
                continue
            if pre in done:
                continue
            done.add(pre)
            wname = pre + fmt.SUFFIX_WEIGHT
            if mf.is_sb(pre):
                sb = mf.sb(pre)
                x = fmt.dequantize_sb(sb).astype(np.float32)
                if sb.n_in % fmt.Q8_0_BLOCK == 0:
                    gtype, data = fmt.GGMLType.Q8_0, fmt.quantize_q8_0(x)
                    y = fmt.dequantize_q8_0(data, sb.n_in)
                else:
                    gtype, data = fmt.GGMLType.F16, x.astype(np.float16)
                    y = data.astype(np.float32)
                w.add_raw(wname, data, gtype)
                nbytes, n = data.nbytes, x.size
                err = float(np.linalg.norm(y - x) / max(float(np.linalg.norm(x)), 1e-30))
                reencoded.append((pre, gtype.name, err))
                code = "sparse-binary -> " + gtype.name
            elif mf.is_q3(pre):
                q3 = mf.q3(pre)
                d, q = fmt.q3_integers(q3.data, q3.n_in)
                ql = fmt.pack_q(fmt.QType.Q4_0, d, q.astype(np.int16) + 4)
                w.add_q(pre, ql)
                nbytes, n = ql.nbytes(), q.size
                code = "Q3 -> Q4_0"
            else:
                t = mf.tensors[wname]
                w.add_raw(wname, np.asarray(t.data), int(t.tensor_type))
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
        lines.append(f"loss: {len(errs)} sparse-binary linears re-encoded (no stock type holds ±α+μ exactly), "
                     f"relative weight error mean {np.mean(errs):.2e}, max {max(errs):.2e}")
    else:
        lines.append("loss: none (every linear maps exactly)")
    return "\n".join(lines)

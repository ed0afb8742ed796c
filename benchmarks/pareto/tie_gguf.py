"""A GGUF of a tied model with its matrix stored once, for llama.cpp: what `pbs2p-export --tie-head` does to
pbs2p's file, done to the source GGUF so llama.cpp's files compare at the same bytes.

    python benchmarks/pareto/tie_gguf.py qwen2.5-coder-0.5b.gguf qwen2.5-coder-0.5b-tied.gguf

Every key and tensor is copied as it is, except that `output.weight` is dropped and `token_embd.weight` takes its
bytes and type (the head's copy of the matrix; llama.cpp and transformers use the token table as the head of a
file without `output.weight`). `llama-quantize` then makes tied files from it. Refuses a source whose two copies
differ by more than pbs2p's --tie-head limit (relative norm over the first 4096 rows), or that has no
`output.weight`. The output is written under a temporary name and renamed.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

TIE_MAX_REL = 0.25  # exporter/arch.py TIE_MAX_REL (this script runs without the exporter's torch import)


def tie(src: Path, out: Path) -> float:
    """Write the tied copy of src to out; returns the relative difference of the two copies (first 4096 rows)."""
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(src)
    tensors = {t.name: t for t in r.tensors}
    if "output.weight" not in tensors or "token_embd.weight" not in tensors:
        raise SystemExit(f"{src}: no separate output.weight (already tied?)")
    head, table = tensors["output.weight"], tensors["token_embd.weight"]
    h = dequantize(head.data[:4096], head.tensor_type).astype(np.float64)
    e = dequantize(table.data[:4096], table.tensor_type).astype(np.float64)
    rel = float(np.linalg.norm(h - e) / max(np.linalg.norm(h), 1e-30))
    if not rel <= TIE_MAX_REL:
        raise SystemExit(f"{src}: output.weight and token_embd.weight differ by {100 * rel:.1f}%: not one matrix")
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    if gguf.Keys.General.ALIGNMENT in r.fields:
        w.data_alignment = int(r.fields[gguf.Keys.General.ALIGNMENT].contents())
    try:
        for f in r.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            vtype = f.types[0]
            w.add_key_value(f.name, f.contents(), vtype,
                            sub_type=f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
        for t in r.tensors:
            if t.name == "output.weight":
                continue
            s = head if t.name == "token_embd.weight" else t
            w.add_tensor(t.name, s.data, raw_shape=s.data.shape, raw_dtype=s.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    a = ap.parse_args(argv)
    if a.out.exists():
        raise SystemExit(f"{a.out} exists")
    rel = tie(a.src, a.out)
    print(f"{a.out}: token_embd.weight = {a.src.name}'s output.weight (the copies differed by {100 * rel:.2f}%), "
          f"{a.out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""pbs2p-dump: describe a pbs2p model file (pure Python, through gguf.GGUFReader; no native library).

Prints the metadata (long arrays and strings abbreviated), every tensor (name, type, shape, encoding), every
linear layer (encoding, terms, N:M measured from the bits, storage bits per weight, parameter bits) and the
totals with the conventions of docs/format.md (the C runtime's pbs2p_model_info reports the same numbers).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from .format import KEY_NM_M, KEY_PLAN, SUFFIX_Q3, SUFFIX_WEIGHT, GGMLType, ModelFile, Plan, field_value, n_words
# parameter bits per weight of a dense linear, as the runtime counts them (model.c)
_DENSE_BITS = {GGMLType.F32: 32.0, GGMLType.F16: 16.0, GGMLType.Q8_0: 8.0, GGMLType.Q4_0: 4.0}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All key/values of a GGUF file (GGUF.* header pseudo-keys left out)."""
    reader = ModelFile(path, strict=False).reader
    return {k: field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _type_name(t: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(t).name
    except ValueError:
        return f"type{t}"


def _fmt_value(v: Any, width: int = 80) -> str:
    if isinstance(v, list):
        head = ", ".join(_fmt_value(x, 24) for x in v[:6])
        return f"[{len(v)}] [{head}{', ...' if len(v) > 6 else ''}]"
    if isinstance(v, str):
        s = repr(v)
        return s if len(s) <= width else s[:width - 5] + f"...' ({len(v)} chars)"
    if isinstance(v, float):
        return f"{v:.8g}"
    return str(v)


@dataclass
class LinearStats:
    name: str
    encoding: str          # "sparse-binary", "N:M code", "dense F16", ...
    n_out: int
    n_in: int
    n_terms: int           # 0 for dense
    nm: str                # "2:4", "dense", "mixed 1-3:4", or "-" when the file has no M
    n_bytes: int
    param_bits: float      # total bits by the paper's convention

    @property
    def storage_bpw(self) -> float:
        return 8.0 * self.n_bytes / (self.n_out * self.n_in)


def _measure_nm(planes: np.ndarray, n_out: int, n_in: int, n_terms: int, m: int) -> str:
    """Kept weights per group of M input columns, from term 0's pos|neg bits."""
    if m <= 0:
        return "-"
    w = n_words(n_in)
    p = planes.reshape(n_out, n_terms, 2, w * 8)[:, 0]
    kept = np.unpackbits(p[:, 0] | p[:, 1], axis=-1, bitorder="little")[:, :n_in]
    g = n_in // m
    if g == 0:
        return "-"
    counts = kept[:, :g * m].reshape(n_out, g, m).sum(axis=-1)
    lo, hi = int(counts.min()), int(counts.max())
    return f"{lo}:{m}" if lo == hi else f"mixed {lo}-{hi}:{m} (mean {counts.mean():.2f})"


def linear_stats(mf: ModelFile) -> list[LinearStats]:
    m = int(mf.kv.get(KEY_NM_M, 0) or 0) or (8 if KEY_PLAN in mf.kv else 0)  # planned N:M codes are all N:8
    out = []
    for pre in mf.linear_prefixes():
        if mf.is_q3(pre):
            ql = mf.q3(pre)
            out.append(LinearStats(pre, "Q3 (pbs2p)", ql.n_out, ql.n_in, 0, "dense", ql.nbytes(),
                                   3.0 * ql.n_out * ql.n_in))
            continue
        if not mf.is_sb(pre):
            t = mf.tensors[pre + SUFFIX_WEIGHT]
            k, r = int(t.shape[0]), int(np.prod(t.shape[1:]))
            bits = _DENSE_BITS.get(int(t.tensor_type), 8.0 * int(t.n_bytes) / (r * k))
            out.append(LinearStats(pre, f"dense {_type_name(int(t.tensor_type))}", r, k, 0, "dense",
                                   int(t.n_bytes), bits * r * k))
            continue
        sb = mf.sb(pre)
        bits = float(np.unpackbits(sb.planes, bitorder="little").sum())
        kind = "N:M code" if sb.nm else "sparse-binary"  # N:M code: docs/format.md, planes decoded from it
        out.append(LinearStats(pre, kind, sb.n_out, sb.n_in, sb.n_terms,
                               _measure_nm(sb.planes, sb.n_out, sb.n_in, sb.n_terms, m), sb.nbytes(), bits))
    return out


def plan_lines(text: Any, file_bytes: dict[str, int]) -> list[str]:
    """The budget planner's plan (pbs2p.plan, JSON) as dump lines: target and planned bpw, bytes per code, and
    per linear its code, bytes and estimated damage; a plan entry whose bytes differ from the file's is flagged."""
    out = ["\nplan (" + KEY_PLAN + "):"]
    try:
        plan = Plan.from_json(text)
    except (TypeError, ValueError, KeyError) as e:
        return out + [f"  unreadable plan ({type(e).__name__}: {e})"]
    out.append(f"  target {plan.target_bpw:.3f} bpw, planned {plan.bpw:.3f} bpw, sensitivity {plan.sensitivity}")
    for c, (n, b, w) in plan.by_code().items():
        out.append(f"  {c:<10} {n:>4} linears {b:>12} bytes {8.0 * b / max(w, 1):>7.3f} bpw")
    out.append(f"  {'layer':<22} {'code':<10} {'bytes':>10} {'damage':>11}")
    for e in plan.layers:
        flag = "" if file_bytes.get(e.prefix) == e.nbytes else f"  (file holds {file_bytes.get(e.prefix)} bytes)"
        out.append(f"  {e.prefix:<22} {e.code:<10} {e.nbytes:>10} {e.damage:>11.4g}{flag}")
    return out


def dump(path: str, out: TextIO = sys.stdout, all_values: bool = False) -> None:
    size = os.path.getsize(path)
    mf = ModelFile(path, strict=False)
    reader = mf.reader
    meta = {k: field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    p = lambda *a: print(*a, file=out)  # noqa: E731
    version = field_value(reader.fields["GGUF.version"]) if "GGUF.version" in reader.fields else "?"
    p(f"{path}: GGUF v{version}, {size} bytes, {len(meta)} keys, {len(reader.tensors)} tensors")
    p("\nmetadata:")
    for k, v in meta.items():
        p(f"  {k} = {v!r}" if all_values else f"  {k} = {_fmt_value(v)}")

    stats = linear_stats(mf)
    sb_prefix = {s.name: s.encoding for s in stats if s.encoding in ("sparse-binary", "N:M code")}
    p("\ntensors:")
    p(f"  {'name':<34} {'type':<6} {'shape':<18} {'bytes':>10}  encoding")
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # numpy order, outermost first
        pre = t.name.rsplit(".", 1)[0]
        if pre in sb_prefix:
            enc = sb_prefix[pre]
        elif t.name.endswith(SUFFIX_Q3):
            enc = "Q3 (pbs2p)"
        elif int(t.tensor_type) in (GGMLType.Q8_0, GGMLType.Q4_0):
            enc = _type_name(int(t.tensor_type))
        else:
            enc = "dense"
        p(f"  {t.name:<34} {_type_name(int(t.tensor_type)):<6} {str(shape):<18} {int(t.n_bytes):>10}  {enc}")

    if stats:
        p("\nlinear layers:")
        p(f"  {'layer':<22} {'encoding':<14} {'R x K':<12} {'T':>2} {'N:M':<10} {'storage bpw':>11} {'param bits':>10}")
        for s in stats:
            p(f"  {s.name:<22} {s.encoding:<14} {f'{s.n_out}x{s.n_in}':<12} {s.n_terms:>2} {s.nm:<10} "
              f"{s.storage_bpw:>11.3f} {s.param_bits / (s.n_out * s.n_in):>10.3f}")
    if KEY_PLAN in mf.kv:
        for line in plan_lines(mf.kv[KEY_PLAN], {s.name: s.n_bytes for s in stats}):
            p(line)
    n_w = sum(s.n_out * s.n_in for s in stats)
    n_b = sum(s.n_bytes for s in stats)
    p("\ntotals:")
    p(f"  file size          {size} bytes ({size / 2**20:.2f} MiB)")
    p(f"  linear weights     {n_w}")
    p(f"  linear bytes       {n_b}")
    if n_w:
        p(f"  storage bpw        {8.0 * n_b / n_w:.4f}")
        p(f"  parameter bits     {sum(s.param_bits for s in stats) / n_w:.4f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pbs2p-dump", description="Describe a pbs2p model file.")
    ap.add_argument("model", help="a .bin / .gguf model file")
    ap.add_argument("--full", action="store_true", help="print metadata values in full")
    args = ap.parse_args(argv)
    try:
        dump(args.model, all_values=args.full)
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - any malformed file: one line, nonzero exit
        print(f"pbs2p-dump: error: {args.model}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

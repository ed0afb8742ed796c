"""pbs2p-dump: describe a pbs2p model file (pure Python, through gguf.GGUFReader; no native library).

Prints the metadata (long arrays and strings abbreviated), every tensor (name, type, shape, encoding), every
linear layer (encoding, terms, N:M measured from the bits, storage bits per weight, parameter bits) and the
totals with the conventions of docs/format.md (the C runtime's pbs2p_model_info reports the same numbers).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from .format import GGMLType, n_blocks, n_words

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_LINEAR_RE = re.compile(r"^(blk\.\d+\.(?:%s))\.(weight|planes|alpha|mu)$" % "|".join(LINEARS))
# parameter bits per weight of a dense linear, as the runtime counts them (model.c)
_DENSE_BITS = {GGMLType.F32: 32.0, GGMLType.F16: 16.0, GGMLType.Q8_0: 8.0}


def _value(field: Any) -> Any:
    """A GGUFReader field as a Python value (str, number, bool, or list of those)."""
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    v = field.parts[field.data[0]][0].item()
    return bool(v) if types[0] == gguf.GGUFValueType.BOOL else v


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All key/values of a GGUF file (GGUF.* header pseudo-keys left out)."""
    import gguf

    r = gguf.GGUFReader(os.fspath(path))
    return {k: _value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}


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
    encoding: str          # "sparse-binary", "dense F16", ...
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


def linear_stats(reader: Any, meta: dict[str, Any]) -> list[LinearStats]:
    tensors = {t.name: t for t in reader.tensors}
    prefixes: list[str] = []
    for name in tensors:
        mt = _LINEAR_RE.match(name)
        if mt and mt.group(1) not in prefixes:
            prefixes.append(mt.group(1))
    m = int(meta.get("pbs2p.nm.m", 0) or 0)
    bs = int(meta.get("pbs2p.block_size", 128) or 128)
    out = []
    for pre in prefixes:
        if pre + ".weight" in tensors:
            t = tensors[pre + ".weight"]
            k, r = int(t.shape[0]), int(np.prod(t.shape[1:]))
            bits = _DENSE_BITS.get(int(t.tensor_type), 8.0 * int(t.n_bytes) / (r * k))
            out.append(LinearStats(pre, f"dense {_type_name(int(t.tensor_type))}", r, k, 0, "dense",
                                   int(t.n_bytes), bits * r * k))
            continue
        tp, ta, tm = (tensors.get(pre + s) for s in (".planes", ".alpha", ".mu"))
        if tp is None or ta is None or tm is None:
            raise ValueError(f"sparse-binary linear {pre} lacks one of .planes/.alpha/.mu")
        alpha = np.asarray(ta.data)
        if alpha.ndim != 3:
            raise ValueError(f"{pre}.alpha has shape {alpha.shape}, expected (R, T, nb)")
        r, t, nb = alpha.shape
        planes = np.asarray(tp.data).view(np.uint8)
        row = planes.shape[-1] if planes.ndim == 2 else -1
        # K is not stored for a sparse-binary linear; take the largest K that fits W words and nb blocks.
        w = row // (t * 16) if row > 0 else 0
        if planes.shape != (r, t * 16 * w) or w == 0:
            raise ValueError(f"{pre}.planes has shape {planes.shape}, inconsistent with alpha {alpha.shape}")
        k = _infer_k(pre, meta, w, nb, bs)
        bits = float(np.unpackbits(planes, bitorder="little").sum())
        n_bytes = int(tp.n_bytes) + int(ta.n_bytes) + int(tm.n_bytes)
        out.append(LinearStats(pre, "sparse-binary", r, k, t, _measure_nm(planes, r, k, t, m), n_bytes, bits))
    return out


def _infer_k(prefix: str, meta: dict[str, Any], w: int, nb: int, bs: int) -> int:
    """n_in of a linear from the hyper-parameters (as the runtime does), checked against W and nb."""
    arch = meta.get("general.architecture", "")
    n_embd = meta.get(f"{arch}.embedding_length")
    n_ff = meta.get(f"{arch}.feed_forward_length")
    n_head = meta.get(f"{arch}.attention.head_count")
    hd = meta.get(f"{arch}.attention.key_length") or (n_embd // n_head if n_embd and n_head else None)
    kind = prefix.rsplit(".", 1)[-1]
    k = {"ffn_down": n_ff, "attn_output": (n_head * hd) if n_head and hd else None}.get(kind, n_embd)
    if k is None:
        k = w * 64
    if n_words(int(k)) != w or n_blocks(int(k), bs) != nb:
        raise ValueError(f"{prefix}: planes hold {w} words/row and alpha {nb} blocks, inconsistent with K = {k}")
    return int(k)


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def check_layout(path: str) -> None:
    """Walk the GGUF header with bounds checks before gguf.GGUFReader sees the file: GGUFReader reports a
    truncated or corrupt file as an IndexError or a numpy reshape error deep inside it, or accepts overlapping
    tensors. Raises ValueError naming the offending field and offset (the C loader's checks, in short)."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    size, pos = len(data), 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n > size - pos:
            raise ValueError(f"truncated: {what} at offset {pos} needs {n} bytes, {size - pos} left "
                             f"(file of {size} bytes)")
        pos += n
        return data[pos - n:pos]

    def u32(what: str) -> int:
        return struct.unpack("<I", take(4, what))[0]

    def u64(what: str) -> int:
        return struct.unpack("<Q", take(8, what))[0]

    def string(what: str) -> bytes:
        return take(u64(what + " length"), what)

    if take(4, "magic") != b"GGUF":
        raise ValueError("bad magic (not a GGUF file)")
    version = u32("version")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = u64("tensor count"), u64("kv count")
    if n_kv > (size - pos) // 14 or n_tensors > (size - pos) // 33:
        raise ValueError(f"counts (n_kv {n_kv}, n_tensors {n_tensors}) cannot fit in a file of {size} bytes")
    align = 32
    for i in range(n_kv):
        key = string(f"key of kv {i}").decode("utf-8", "replace")
        t = u32(f"type of '{key}'")
        n, et = 1, t
        if t == 9:
            et, n = u32(f"array type of '{key}'"), u64(f"array length of '{key}'")
        if et == 8:
            if n > (size - pos) // 8:
                raise ValueError(f"'{key}': {n} strings cannot fit in the {size - pos} bytes left at offset {pos}")
            for j in range(n):
                string(f"string {j} of '{key}'")
        elif et in _SCALAR_BYTES:
            raw = take(n * _SCALAR_BYTES[et], f"value of '{key}'")
            if key == "general.alignment" and t == 4:
                align = struct.unpack("<I", raw)[0]
        else:
            raise ValueError(f"'{key}': unknown value type {et}")
    if align == 0 or align & (align - 1):
        raise ValueError(f"general.alignment {align} is not a power of two")
    infos = []
    for i in range(n_tensors):
        name = string(f"name of tensor {i}").decode("utf-8", "replace")
        nd = u32(f"n_dims of '{name}'")
        if not 1 <= nd <= 4:
            raise ValueError(f"tensor '{name}': n_dims {nd} not in [1, 4]")
        ne = [u64(f"ne of '{name}'") for _ in range(nd)]
        ttype, off = u32(f"type of '{name}'"), u64(f"offset of '{name}'")
        if any(x < 1 for x in ne):
            raise ValueError(f"tensor '{name}': dimension {ne} < 1")
        sizes = _block_sizes(ttype)
        if sizes is None:
            raise ValueError(f"tensor '{name}': unknown ggml type {ttype}")
        bs, ts = sizes
        if ne[0] % bs:
            raise ValueError(f"tensor '{name}': ne[0] = {ne[0]} is not a multiple of the block size {bs}")
        nbytes = int(np.prod(ne, dtype=object)) // bs * ts
        if off % align:
            raise ValueError(f"tensor '{name}': data offset {off} is not a multiple of the alignment {align}")
        infos.append((off, nbytes, name))
    start = (pos + align - 1) // align * align
    end_prev, prev = 0, None
    for off, nbytes, name in sorted(infos):
        if start + off + nbytes > size:
            raise ValueError(f"tensor '{name}': data [{start + off}, {start + off + nbytes}) exceeds the file size "
                             f"{size}")
        if off < end_prev:
            raise ValueError(f"tensors '{prev}' and '{name}' overlap")
        end_prev, prev = off + nbytes, name


def _block_sizes(ttype: int) -> tuple[int, int] | None:
    """(values, bytes) per block of a ggml type id; None when unknown."""
    import gguf

    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
        return None


def dump(path: str, out: TextIO = sys.stdout, all_values: bool = False) -> None:
    import gguf

    size = os.path.getsize(path)
    check_layout(path)
    reader = gguf.GGUFReader(path)
    meta = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    p = lambda *a: print(*a, file=out)  # noqa: E731
    version = _value(reader.fields["GGUF.version"]) if "GGUF.version" in reader.fields else "?"
    p(f"{path}: GGUF v{version}, {size} bytes, {len(meta)} keys, {len(reader.tensors)} tensors")
    p("\nmetadata:")
    for k, v in meta.items():
        p(f"  {k} = {v!r}" if all_values else f"  {k} = {_fmt_value(v)}")

    stats = linear_stats(reader, meta)
    sb_prefix = {s.name for s in stats if s.encoding == "sparse-binary"}
    p("\ntensors:")
    p(f"  {'name':<34} {'type':<6} {'shape':<18} {'bytes':>10}  encoding")
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # numpy order, outermost first
        pre = t.name.rsplit(".", 1)[0]
        if pre in sb_prefix:
            enc = "sparse-binary"
        elif int(t.tensor_type) == GGMLType.Q8_0:
            enc = "Q8_0"
        else:
            enc = "dense"
        p(f"  {t.name:<34} {_type_name(int(t.tensor_type)):<6} {str(shape):<18} {int(t.n_bytes):>10}  {enc}")

    if stats:
        p("\nlinear layers:")
        p(f"  {'layer':<22} {'encoding':<14} {'R x K':<12} {'T':>2} {'N:M':<10} {'storage bpw':>11} {'param bits':>10}")
        for s in stats:
            p(f"  {s.name:<22} {s.encoding:<14} {f'{s.n_out}x{s.n_in}':<12} {s.n_terms:>2} {s.nm:<10} "
              f"{s.storage_bpw:>11.3f} {s.param_bits / (s.n_out * s.n_in):>10.3f}")
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

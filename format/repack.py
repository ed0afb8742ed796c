"""Re-encode the sparse-binary linears of a pbs2p file, planes <-> N:M code, without solving anything again: the
values (and so every output of the C runtime) stay bit for bit, only the bytes change.

    python -m pbs2p.format.repack model.bin model-nm.bin            # planes -> N:M code where it holds a layer
    python -m pbs2p.format.repack model-nm.bin model.bin --planes   # and back
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .encoding import nm_groups
from .plan import Plan
from .reader import ModelFile
from .spec import KEY_ALIGNMENT, KEY_ARCHITECTURE, KEY_FORMAT_VERSION, KEY_NM_M, KEY_PLAN, WORD_BITS, FormatError
from .writer import ModelWriter


def _nm_of(sb, m_file: int) -> tuple[int, int] | None:
    """(N, M) of the N:M code that holds this layer exactly, or None (two terms, K % 64, uneven groups)."""
    if sb.n_terms != 1 or sb.n_in % WORD_BITS:
        return None
    bits = np.unpackbits(sb.planes[0].reshape(2, -1), axis=-1, bitorder="little")
    kept = bits[0] | bits[1]
    for m in ([m_file] if m_file else []) + [8, 4]:
        n = int(kept[:m].sum())  # the first group's count; nm_groups checks every group has it
        try:
            nm_groups(sb, n, m)
            return n, m
        except ValueError:
            continue
    return None


def repack(src: str | os.PathLike[str], dst: str | os.PathLike[str], nm_code: bool = True,
           force: bool = False) -> dict[str, int]:
    """Write src's model to dst with every sparse-binary linear the N:M code can hold in that code (nm_code) or
    every one in planes. A budget plan's per-layer bytes are updated to the new file's. Returns
    {"coded": layers in the N:M code, "planes": layers in planes, "bytes_before", "bytes_after"} (linears)."""
    mf = ModelFile(src)
    m_file = int(mf.kv.get(KEY_NM_M, 0) or 0)
    sbs = {pre: mf.sb(pre) for pre in mf.linear_prefixes() if mf.is_sb(pre)}
    before = after = 0
    for pre in mf.linear_prefixes():
        if pre in sbs:  # the layer read once: its bytes as stored, then as re-encoded
            sb = sbs[pre]
            before += sb.nbytes()
            sb.nm = _nm_of(sb, m_file) if nm_code else None
            after += sb.nbytes()
        else:
            b = mf.linear_weights(pre)[1]
            before, after = before + b, after + b
    with ModelWriter(dst, mf.family, overwrite=force) as w:
        for key, value, vtype in mf.entries(""):
            if key in (KEY_ARCHITECTURE, KEY_ALIGNMENT, KEY_FORMAT_VERSION):
                continue  # the writer's own
            if key == KEY_PLAN:
                plan = Plan.from_json(value)
                for e in plan.layers:
                    if e.prefix in sbs:
                        e.nbytes = sbs[e.prefix].nbytes()
                value = plan.to_json()
            w.add_kv(key, value, vtype)
        done: set[str] = set()
        for name, t in mf.tensors.items():
            pre = name.rsplit(".", 1)[0]
            if pre in sbs and not name.endswith(".bias"):
                if pre not in done:
                    w.add_sb(pre, sbs[pre])
                    done.add(pre)
                continue
            w.add_raw(name, np.asarray(t.data), int(t.tensor_type))
    coded = sum(1 for sb in sbs.values() if sb.nm)
    return {"coded": coded, "planes": len(sbs) - coded, "bytes_before": before, "bytes_after": after}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pbs2p.format.repack", description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--planes", action="store_true", help="write every sparse-binary linear as planes")
    ap.add_argument("--force", action="store_true", help="overwrite dst")
    a = ap.parse_args(argv)
    try:
        r = repack(a.src, a.dst, nm_code=not a.planes, force=a.force)
    except (FormatError, FileExistsError, FileNotFoundError) as e:
        print(f"repack: {e}", file=sys.stderr)
        return 1
    print(f"{a.dst}: {r['coded']} linears in the N:M code, {r['planes']} in planes; linear bytes "
          f"{r['bytes_before']:,} -> {r['bytes_after']:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

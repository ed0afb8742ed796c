"""`--format hf`: the compressed model as a transformers folder (`save_pretrained`), holding exactly the weights a
pbs2p file describes, so that lm-eval-harness or any transformers code scores what the file holds.

    save_hf(pbs2p_file, out_dir, tokenizer=None, force=False) -> dict

The folder is built from the file, not from the exporter's in-memory model: every weight is the file's
dequantized value (sparse-binary linears through `pbs2p.format.dequantize_sb`, Q8_0/Q4_0 embeddings through
gguf-py), stored in float32 (α·B + μ with f16 α, μ is exact in float32, not always in float16). It is a
reference for quality, not a compact artifact: a 1-bit linear takes 32 bits per weight here. Activations stay in
floating point; the C runtime quantizes them to int8 per block (`fakequant.load_fakequant(..., act_quant=True)`
emulates that, transformers without our hooks does not).

`pbs2p_export.json` in the folder records the source file's method, N per block, format version and storage
counts (`ModelFile.storage`: bytes and bits per weight of the pbs2p file). The folder is written under a temporary name and renamed: a failed export leaves none.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pbs2p import format as fmt

PROVENANCE = "pbs2p_export.json"


def save_hf(path: str | os.PathLike[str], out: str | os.PathLike[str], tokenizer: Any = None,
            force: bool = False) -> dict[str, Any]:
    """Write the transformers folder of the pbs2p file `path` to `out`; tokenizer: the source model's (default: one
    built from the file's tokenizer.* keys). Returns the provenance record written to pbs2p_export.json."""
    from . import fakequant, tokmeta
    from .driver import check_out

    check_out(out, force, folder=True)
    out = Path(out)
    mf = fmt.ModelFile(path)
    model = fakequant.load_fakequant(path, act_quant=False)
    if tokenizer is None:
        tokenizer = tokmeta.hf_tokenizer(path)
    storage = mf.storage()
    record = {"source_file": Path(path).name, "format_version": int(mf.version), "family": mf.family,
              "method": mf.kv.get(fmt.KEY_METHOD), "nm_m": mf.kv.get(fmt.KEY_NM_M),
              "nm_n": mf.value(fmt.KEY_NM_N), "block_size": mf.block_size,
              "weights_dtype": "float32", "activations": "float (the C runtime quantizes them to int8 per block)",
              **storage}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else "."))
    fmt.chmod_umask(tmp, 0o777)  # mkdtemp makes it 0700; the renamed folder gets the usual permissions
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}  # JSON: no NaN
        (tmp / PROVENANCE).write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
        if out.is_dir():
            shutil.rmtree(out)  # force: checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record

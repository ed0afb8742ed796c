"""pbs2p.format — the file format (docs/format.md), shared by the exporter, the bindings and the tools.

    spec      the constants and rules (keys, tensor suffixes, linear names, allowed M, block sizes, version, the
              input-size rule); runtime/src/format-spec.h is generated from it
    encoding  the sparse-binary encoding: SbLinear, pack_sb / unpack_sb, sb_value (THE definition of Ŵ), the N:M
              code (encode_nm / decode_nm)
    quants    Q8_0 / Q4_0 through gguf-py (ggml's reference bytes), pbs2p's Q3 block, QLinear / pack_q (solved
              Q8_0 / Q4_0 / Q3 linears),
              the runtime's activation quantizer
    plan      Plan / PlanEntry: the budget planner's plan (pbs2p.plan JSON)
    writer    ModelWriter: crash-safe writing through gguf.GGUFWriter; layout_bytes: a file's size before writing it
    reader    ModelFile: reading through gguf.GGUFReader

Every public name of those modules is re-exported here: `from pbs2p import format as fmt; fmt.pack_sb(...)`.
"""
from .encoding import (SbLinear, decode_nm, dequantize_sb, encode_nm, kept_fraction, nm_groups, pack_sb, param_bits,
                       sb_value, unpack_sb)
from .plan import Plan, PlanEntry
from .quants import (QTYPE_BYTES, QTYPE_OFFSET, QTYPE_RANGE, QLinear, dequantize_q3, dequantize_q4_0, dequantize_q8_0,
                     pack_q, q3_integers, q_integers, quantize_act, quantize_q4_0, quantize_q8_0, round_half_away)
from .reader import ModelFile, field_value
from .spec import *  # noqa: F401,F403 - the spec's constants are the package's
from .spec import __all__ as _spec_all
from .writer import ModelWriter, chmod_umask, layout_bytes

__all__ = list(_spec_all) + [
    "SbLinear", "decode_nm", "dequantize_sb", "encode_nm", "kept_fraction", "nm_groups", "pack_sb", "param_bits",
    "sb_value", "unpack_sb",
    "QTYPE_BYTES", "QTYPE_OFFSET", "QTYPE_RANGE", "QLinear", "pack_q", "dequantize_q3", "q3_integers", "q_integers",
    "dequantize_q4_0", "dequantize_q8_0", "quantize_act",
    "quantize_q4_0", "quantize_q8_0", "round_half_away",
    "Plan", "PlanEntry", "ModelFile", "field_value", "ModelWriter", "chmod_umask", "layout_bytes",
]

"""pbs2p.exporter — PBS²P post-training compression (needs the `export` extra: torch, transformers, tqdm).

    from pbs2p.exporter import QuantConfig, SolverConfig, quantize
    result = quantize("model.gguf", QuantConfig(method="pbs2p", nm="6:8"), calib="c4.jsonl")
    result.save("model.bin")         # -> storage counts of the written file
    result.records                   # one LayerRecord per linear: N:M, errors, bytes, seconds

Modules: config (QuantConfig, parse_nm), driver (quantize, export, the block-by-block loop), solver (the per-layer
math), writer (metadata, embeddings, the file), arch (model families), calib, coarse, checkpoint, fakequant, eval,
models, tokmeta, cli.
"""
from .config import ExportError, QuantConfig, parse_nm
from .driver import LayerRecord, Result, export, quantize
from .solver import SolverConfig

__all__ = ["ExportError", "LayerRecord", "QuantConfig", "Result", "SolverConfig", "export", "parse_nm", "quantize"]

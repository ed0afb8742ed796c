"""pbs2p: run 1-bit N:M-sparse binary (PBS²P) language models on CPUs, and make them.

    from pbs2p import Runtime
    with Runtime("model.bin") as rt:
        print(rt.generate("Once upon a time", max_tokens=32, temperature=0))

    import pbs2p                                   # with the `export` extra (torch, transformers)
    result = pbs2p.quantize("model.gguf", pbs2p.QuantConfig(method="pbs2p", nm="6:8"))
    result.save("model.bin")

The native library (libpbs2p.so, next to this file or at $PBS2P_LIB) is loaded on first use, and the exporter
(quantize, QuantConfig, SolverConfig) is imported on first use, so `import pbs2p` needs neither torch nor the
library.
"""
from .format import FORMAT_VERSION
from .runtime import (Aborted, BufferTooSmall, Busy, ContextFull, FormatError, InvalidArgument, IOFailure,
                      ModelInfo, OutOfMemory, Pbs2pError, Runtime, Status, UnsupportedError, VersionError)

__version__ = "0.1.0"

_EXPORTER = ("quantize", "QuantConfig", "SolverConfig")

__all__ = [
    "Runtime", "ModelInfo", "Pbs2pError", "IOFailure", "FormatError", "VersionError", "UnsupportedError",
    "OutOfMemory", "InvalidArgument", "ContextFull", "Aborted", "BufferTooSmall", "Busy", "Status",
    "FORMAT_VERSION", "__version__", *_EXPORTER,
]


def __getattr__(name: str):
    if name in _EXPORTER:
        from . import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module 'pbs2p' has no attribute {name!r}")

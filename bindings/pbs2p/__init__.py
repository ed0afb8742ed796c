"""pbs2p: run 1-bit N:M-sparse binary (PBS²P) language models on CPUs.

    from pbs2p import Runtime
    with Runtime("model.bin") as rt:
        print(rt.generate("Once upon a time", max_tokens=32, temperature=0))

The native library (libpbs2p.so, next to this file or at $PBS2P_LIB) is loaded on first use, so the pure-Python
parts (pbs2p.format, pbs2p.dump, pbs2p.exporter) import without it.
"""
from .format import FORMAT_VERSION, Status
from .runtime import (Aborted, BufferTooSmall, Busy, ContextFull, FormatError, InvalidArgument, IOFailure,
                      ModelInfo, OutOfMemory, Pbs2pError, Runtime, UnsupportedError, VersionError)

__version__ = "0.1.0"

__all__ = [
    "Runtime", "ModelInfo", "Pbs2pError", "IOFailure", "FormatError", "VersionError", "UnsupportedError",
    "OutOfMemory", "InvalidArgument", "ContextFull", "Aborted", "BufferTooSmall", "Busy", "Status",
    "FORMAT_VERSION", "__version__",
]

"""Reading pbs2p files through gguf-py's GGUFReader (a memmap view): metadata, the architecture's hyper-parameters,
each linear's input size (the spec's input-size rule), sparse-binary linears and dense tensors, and the storage
counts of docs/format.md. pbs2p-dump, the fake-quant reference, the exporter's summary and the benchmarks read
files through this module only."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .encoding import SbLinear, decode_nm
from .quants import QLinear, dequantize_q4_0, dequantize_q8_0
from .spec import (DEFAULT_BLOCK_SIZE, KEY_ARCHITECTURE, KEY_BLOCK_SIZE, KEY_FORMAT_VERSION, LINEAR_NAMES,
                   NM_CODE_VERSION, Q8_0_BLOCK, SUFFIX_ALPHA, SUFFIX_MU, SUFFIX_PLANES, SUFFIX_Q3, SUFFIX_WEIGHT,
                   FormatError, GGMLType, QType, family_of_arch, linear_n_in)

# the tensors of one linear: blk.<i>.<linear>.<weight|q3|planes|nm<N>of<M>|alpha|mu>
LINEAR_TENSOR_RE = re.compile(r"^(blk\.\d+\.(?:%s))\.(weight|q3|planes|nm\d+of\d+|alpha|mu)$" % "|".join(LINEAR_NAMES))
NM_SUFFIX_RE = re.compile(r"^\.nm(\d+)of(\d+)$")
# the big tokenizer arrays, left out of ModelFile.kv (read them with ModelFile.value)
TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                    "tokenizer.ggml.token_type")


def field_value(field: Any) -> Any:
    """A GGUFReader field as a Python value (str, number, bool, or list of those); invalid UTF-8 is replaced, so a
    hostile file's strings print instead of raising."""
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


# GGUF value types -> ModelWriter.add_kv's vtype names (the types pbs2p files use)
_VTYPE_SCALAR = {"UINT32": "u32", "INT32": "i32", "FLOAT32": "f32", "BOOL": "bool", "STRING": "str"}
_VTYPE_ARRAY = {"UINT32": "arr_u32", "INT32": "arr_i32", "FLOAT32": "arr_f32", "STRING": "arr_str"}


def _reader_class() -> type:
    """gguf.GGUFReader, refusing before it loops what a hostile file would make it loop on: an array whose
    elements are arrays (no GGUF file writes one; gguf-py recurses into it) or an array longer than the bytes left
    in the file (gguf-py walks every element first)."""
    import gguf

    class Reader(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
            if raw_type == gguf.GGUFValueType.ARRAY:
                itype = int(self._get(orig_offs, np.uint32)[0])
                alen = int(self._get(orig_offs + 4, np.uint64)[0])
                if itype == gguf.GGUFValueType.ARRAY:
                    raise ValueError(f"array at byte {orig_offs} holds arrays (nested arrays are not supported)")
                scalar = self.gguf_scalar_to_np.get(gguf.GGUFValueType(itype)) if itype in \
                    set(int(t) for t in gguf.GGUFValueType) else None
                least = 8 if itype == gguf.GGUFValueType.STRING else (np.dtype(scalar).itemsize if scalar else 1)
                left = len(self.data) - orig_offs - 12
                if alen > left // least:
                    raise ValueError(f"array at byte {orig_offs}: {alen} elements do not fit in the {left} bytes "
                                     "left in the file")
            return super()._get_field_parts(orig_offs, raw_type)

    return Reader


class ModelFile:
    """One GGUF file opened for reading. `kv` holds every key but the big tokenizer arrays; `family` is the pbs2p
    family (llama, qwen2, opt) or None for a GGUF file that is not a pbs2p file (strict=False only)."""

    def __init__(self, path: str | os.PathLike[str], strict: bool = True) -> None:
        self.path = Path(path)
        try:
            with warnings.catch_warnings(), np.errstate(over="ignore"):  # _check_layout names wrapped offsets
                warnings.simplefilter("ignore", RuntimeWarning)
                self.reader = _reader_class()(os.fspath(path))
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - GGUFReader reports a cut or corrupt file as whatever numpy raises
            raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        self._check_layout()
        self.kv = {k: field_value(f) for k, f in self.reader.fields.items()
                   if not k.startswith("GGUF.") and k not in TOKENIZER_ARRAYS}
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = str(self.kv.get(KEY_ARCHITECTURE, ""))
        self.version = self.kv.get(KEY_FORMAT_VERSION)
        self.family: str | None = None
        if self.version is None:
            if strict:
                raise FormatError(f"{path}: no {KEY_FORMAT_VERSION} key: not a pbs2p model file")
        else:
            try:
                self.family = family_of_arch(self.arch, int(self.version))
            except FormatError:
                if strict:
                    raise
        self.block_size = int(self.kv.get(KEY_BLOCK_SIZE, DEFAULT_BLOCK_SIZE))

    def _check_layout(self) -> None:
        """What GGUFReader does not check: every tensor's data lies inside the file, starts at a multiple of the
        alignment, and overlaps no other tensor."""
        import gguf

        size = self.path.stat().st_size
        align = self.reader.alignment
        if align <= 0 or align & (align - 1):
            raise FormatError(f"{self.path}: general.alignment {align} is not a power of two")
        spans = []
        base = int(self.reader.data_offset)
        for t in self.reader.tensors:
            start, n = int(t.data_offset), int(t.n_bytes)
            if any(int(d) <= 0 for d in t.shape):
                raise FormatError(f"tensor '{t.name}': dimensions {[int(d) for d in t.shape]} must be positive")
            if start < base:  # gguf-py adds the offset in uint64: a huge offset wraps onto the header
                raise FormatError(f"tensor '{t.name}': data offset wraps to byte {start}, before the data section "
                                  f"at {base}")
            if (start - base) % align:
                raise FormatError(f"tensor '{t.name}': data offset {start} is not a multiple of the alignment {align}")
            blck, _ = gguf.GGML_QUANT_SIZES.get(t.tensor_type, (1, 1))
            if int(t.shape[0]) % blck:
                raise FormatError(f"tensor '{t.name}': ne[0] = {int(t.shape[0])} is not a multiple of the block "
                                  f"size {blck}")
            if start + n > size or np.asarray(t.data).nbytes != n:
                raise FormatError(f"tensor '{t.name}': data [{start}, {start + n}) exceeds the file size {size}")
            spans.append((start, start + n, t.name))
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise FormatError(f"tensors '{a}' and '{b}' overlap")

    def value(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else field_value(f)

    def entries(self, prefix: str) -> list[tuple[str, Any, str]]:
        """Every key starting with prefix as (key, value, vtype), ready for ModelWriter.add_kv (to copy keys, e.g.
        the tokenizer.* keys of a llama.cpp GGUF, into a pbs2p file)."""
        out = []
        for key, f in self.reader.fields.items():
            if not key.startswith(prefix) or key.startswith("GGUF."):  # GGUF.*: the header, not keys
                continue
            names = [t.name for t in f.types]
            vt = (_VTYPE_ARRAY.get(names[1]) if len(names) > 1 else None) if names[0] == "ARRAY" else \
                _VTYPE_SCALAR.get(names[0])
            if vt is None:
                raise FormatError(f"{self.path}: key {key} has GGUF type {names}, which pbs2p files do not use")
            out.append((key, field_value(f), vt))
        return out

    def hparam(self, key: str, default: Any = None) -> Any:
        """The architecture's own key, "{general.architecture}.{key}"."""
        return self.kv.get(f"{self.arch}.{key}", default)

    def n_in(self, prefix: str) -> int:
        """Input size of the linear blk.<i>.<linear> (the file does not store it with the linear)."""
        try:
            n_embd, n_head = int(self.hparam("embedding_length")), int(self.hparam("attention.head_count"))
            n_ff = int(self.hparam("feed_forward_length"))
        except (TypeError, ValueError) as e:
            raise FormatError(f"{self.arch}.embedding_length, .attention.head_count and "
                              f".feed_forward_length must be integers ({e})") from e
        if n_embd <= 0 or n_head <= 0 or n_ff <= 0:
            raise FormatError(f"sizes must be positive (embedding_length {n_embd}, head_count {n_head}, "
                              f"feed_forward_length {n_ff})")
        head_dim = int(self.hparam("attention.key_length", n_embd // n_head))
        return linear_n_in(prefix.rsplit(".", 1)[-1], n_embd, n_ff, n_head * head_dim)

    def linear_prefixes(self) -> list[str]:
        """blk.<i>.<linear> of every linear, in file order."""
        out: list[str] = []
        for name in self.tensors:
            m = LINEAR_TENSOR_RE.match(name)
            if m and m.group(1) not in out:
                out.append(m.group(1))
        return out

    def nm_tensor(self, prefix: str) -> tuple[str, int, int] | None:
        """(name, N, M) of the linear's N:M-code tensor, or None; FormatError when it has more than one."""
        found = [(name, int(mm.group(1)), int(mm.group(2))) for name in self.tensors
                 if name.startswith(prefix + ".") and (mm := NM_SUFFIX_RE.match(name[len(prefix):]))]
        if len(found) > 1:
            raise FormatError(f"linear {prefix} has {len(found)} N:M-code tensors ({', '.join(f[0] for f in found)})")
        return found[0] if found else None

    def is_sb(self, prefix: str) -> bool:
        return prefix + SUFFIX_PLANES in self.tensors or self.nm_tensor(prefix) is not None

    def is_q3(self, prefix: str) -> bool:
        return prefix + SUFFIX_Q3 in self.tensors

    def q3(self, prefix: str) -> QLinear:
        """One Q3 linear (the I8 tensor prefix.q3), validated: (R, K/32 · Q3_BYTES) bytes, K % 32 == 0."""
        t = self.tensors[prefix + SUFFIX_Q3]
        if int(t.tensor_type) != GGMLType.I8:
            raise FormatError(f"tensor {prefix + SUFFIX_Q3}: type {t.tensor_type!r}, expected I8 (Q3 block bytes)")
        k = self.n_in(prefix)
        if k % Q8_0_BLOCK:
            raise FormatError(f"Q3 linear {prefix}: K = {k} is not a multiple of {Q8_0_BLOCK}")
        data = np.asarray(t.data).view(np.uint8)
        ql = QLinear(QType.Q3, int(data.shape[0]) if data.ndim == 2 else -1, k, data)
        try:
            ql.validate()
        except ValueError as e:
            raise FormatError(f"Q3 linear {prefix}: {e}") from None
        return ql

    def sb(self, prefix: str) -> SbLinear:
        """One sparse-binary linear, validated against docs/format.md."""
        nmt = self.nm_tensor(prefix)
        if nmt and prefix + SUFFIX_PLANES in self.tensors:
            raise FormatError(f"sparse-binary linear {prefix} has both {SUFFIX_PLANES} and {nmt[0]}")
        bits = SUFFIX_PLANES if nmt is None else nmt[0][len(prefix):]
        missing = [s for s in (bits, SUFFIX_ALPHA, SUFFIX_MU) if prefix + s not in self.tensors]
        if missing:
            raise FormatError(f"sparse-binary linear {prefix} lacks its {', '.join(missing)} tensor")
        alpha = np.asarray(self.tensors[prefix + SUFFIX_ALPHA].data)
        mu = np.asarray(self.tensors[prefix + SUFFIX_MU].data)
        k, nm = self.n_in(prefix), None
        if nmt is None:
            planes = np.asarray(self.tensors[prefix + SUFFIX_PLANES].data).view(np.uint8)
        else:
            name, n, m = nmt
            if self.version is not None and int(self.version) < NM_CODE_VERSION:
                raise FormatError(f"tensor {name}: the N:M code needs {KEY_FORMAT_VERSION} >= {NM_CODE_VERSION}, "
                                  f"the file has {self.version}")
            t = self.tensors[name]
            if int(t.tensor_type) != GGMLType.I8:
                raise FormatError(f"tensor {name}: type {t.tensor_type!r}, expected I8 (N:M code bytes)")
            planes, nm = decode_nm(np.asarray(t.data), k, n, m), (n, m)
        sb = SbLinear(int(mu.shape[0]), k, self.block_size, planes, alpha, mu, nm)
        try:
            sb.validate()
        except ValueError as e:
            raise FormatError(f"sparse-binary linear {prefix}: {e}") from None
        return sb

    def dense(self, name: str) -> np.ndarray:
        """A dense tensor (F32, F16, Q8_0, Q4_0) as float32, numpy shape (outer..., ne0)."""
        t = self.tensors[name]
        data = np.asarray(t.data)
        shape = [int(x) for x in reversed(t.shape)]  # GGUF ne order -> numpy order
        tt = int(t.tensor_type)
        if tt == GGMLType.Q8_0:
            return dequantize_q8_0(data.view(np.uint8).reshape(-1), shape[-1]).reshape(shape)
        if tt == GGMLType.Q4_0:
            return dequantize_q4_0(data.view(np.uint8).reshape(-1), shape[-1]).reshape(shape)
        if tt in (GGMLType.F32, GGMLType.F16):
            return data.astype(np.float32).reshape(shape)
        raise FormatError(f"tensor {name}: type {t.tensor_type!r} is not a pbs2p dense type")

    def tensor_type(self, name: str) -> int:
        return int(self.tensors[name].tensor_type)

    def linear_weights(self, prefix: str) -> tuple[int, int, int]:
        """(weights, bytes, parameter bits) of one linear as the file stores it (biases not counted). Parameter
        bits by the paper's convention, as the runtime counts them: one per set bit of a sparse-binary linear's
        planes, the code's width per weight of a dense one (F32 32, F16 16, Q8_0 8, Q4_0 4, Q3 3)."""
        if self.is_sb(prefix):
            sb = self.sb(prefix)
            return sb.n_out * sb.n_in, sb.nbytes(), int(np.unpackbits(sb.planes, bitorder="little").sum())
        if self.is_q3(prefix):
            ql = self.q3(prefix)
            return ql.n_out * ql.n_in, ql.nbytes(), 3 * ql.n_out * ql.n_in
        t = self.tensors[prefix + SUFFIX_WEIGHT]
        n = int(np.prod([int(x) for x in t.shape]))
        width = {GGMLType.F32: 32, GGMLType.F16: 16, GGMLType.Q8_0: 8, GGMLType.Q4_0: 4}.get(int(t.tensor_type))
        if width is None:
            raise FormatError(f"tensor {prefix + SUFFIX_WEIGHT}: type {t.tensor_type!r} is not a dense linear type")
        return n, int(t.n_bytes), width * n

    def storage(self) -> dict[str, float]:
        """Sizes counted from the file's bytes (docs/format.md, "Storage bits per weight"): the linears' bytes
        (planes + scales, or the dense / Q3 weight; biases not counted) over their weight count, the whole file's
        bytes over the same count, and the paper's parameter bits over all linears (linear_weights)."""
        lin_weights = lin_bytes = bits = 0
        for pre in self.linear_prefixes():
            n, b, p = self.linear_weights(pre)
            lin_weights, lin_bytes, bits = lin_weights + n, lin_bytes + b, bits + p
        size = self.path.stat().st_size
        return {"file_bytes": size, "linear_bytes": lin_bytes, "linear_weights": lin_weights,
                "storage_bpw": 8.0 * lin_bytes / max(lin_weights, 1), "file_bpw": 8.0 * size / max(lin_weights, 1),
                "param_bits": bits / lin_weights if lin_weights else float("nan")}

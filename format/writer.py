"""The crash-safe writer of pbs2p files (a state machine over gguf.GGUFWriter: keys, then tensors, then commit)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .encoding import SbLinear, encode_nm
from .quants import QLinear, quantize_q4_0, quantize_q8_0
from .spec import (ALIGNMENT, BASE_FORMAT_VERSION, KEY_ALIGNMENT, KEY_FORMAT_VERSION, NM_CODE_VERSION, SUFFIX_ALPHA,
                   SUFFIX_MU, SUFFIX_PLANES, SUFFIX_Q3, SUFFIX_WEIGHT, GGMLType, QType, arch_name, nm_suffix)


def chmod_umask(path: str | os.PathLike[str], mode: int) -> None:
    """Give a file (mode 0o666) or folder (0o777) made by mkstemp / mkdtemp the permissions open() / mkdir() would:
    mode less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _gguf_writer(path: str, arch: str, stock: bool) -> Any:
    """A gguf.GGUFWriter holding the keys every file starts with."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.data_alignment = ALIGNMENT
    w.add_uint32(KEY_ALIGNMENT, ALIGNMENT)
    if not stock:
        w.add_uint32(KEY_FORMAT_VERSION, BASE_FORMAT_VERSION)  # raised by add_sb when a layer needs more
    return w


def _add_kv(w: Any, key: str, value: Any, vtype: str | None) -> None:
    import gguf

    if vtype is None:
        if isinstance(value, bool):
            vtype = "bool"
        elif isinstance(value, int):
            vtype = "u32"
        elif isinstance(value, float):
            vtype = "f32"
        elif isinstance(value, str):
            vtype = "str"
        else:
            raise TypeError(f"cannot infer the GGUF type of {key}={value!r}")
    scalar = {"u32": w.add_uint32, "i32": w.add_int32, "f32": w.add_float32, "bool": w.add_bool,
              "str": w.add_string}
    if vtype in scalar:
        scalar[vtype](key, value)
        return
    sub = {"arr_u32": gguf.GGUFValueType.UINT32, "arr_i32": gguf.GGUFValueType.INT32,
           "arr_f32": gguf.GGUFValueType.FLOAT32, "arr_str": gguf.GGUFValueType.STRING}[vtype]
    w.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=sub)


def layout_bytes(family: str, kv: list[tuple[str, Any, str]], tensors: list[tuple[str, int, int]]) -> int:
    """The bytes of the file ModelWriter writes with these keys (add_kv's arguments) and tensors (name, number of
    dimensions, data bytes), counted by gguf.GGUFWriter's own header, key and tensor-info encoders (written to a
    temporary file: a few MB of tokenizer at most) plus the aligned data; no tensor data is made."""
    import gguf

    w = _gguf_writer("", arch_name(family), False)
    for k, v, t in kv:
        _add_kv(w, k, v, t)
    for name, n_dims, nbytes in tensors:
        w.add_tensor_info(name, (1,) * n_dims, np.dtype(np.float32), int(nbytes))
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "layout.gguf")
        w.write_header_to_file(f)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        head = os.path.getsize(f)
    return gguf.GGUFWriter.ggml_pad(head, ALIGNMENT) + sum(gguf.GGUFWriter.ggml_pad(int(b), ALIGNMENT)
                                                         for _, _, b in tensors)


class ModelWriter:
    """Writes a pbs2p model file through gguf.GGUFWriter, crash-safe: everything goes to a temporary file in
    the destination folder, which is renamed over `path` only after the last byte is written and fsynced. On
    any exception (KeyboardInterrupt included) the temporary file is removed and `path` is untouched.

    Use as a context manager: add metadata and tensors, then leave the block to commit.
    """

    def __init__(self, path: str | os.PathLike[str], family: str, *, overwrite: bool = False,
                 stock_arch: str | None = None) -> None:
        """stock_arch: write a plain GGUF of that llama.cpp architecture instead (no pbs2p.format_version key;
        exporter/gguf_llama.py)."""
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists (use --force to overwrite)")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise FileNotFoundError(f"output folder {parent} does not exist")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        chmod_umask(tmp, 0o666)  # mkstemp makes it 0600; the renamed file gets the usual permissions
        self._tmp = Path(tmp)
        self.arch = stock_arch or arch_name(family)
        self._stock = stock_arch is not None
        self._w = _gguf_writer(str(self._tmp), self.arch, self._stock)
        self._done = False

    # metadata -------------------------------------------------------------------------------------------
    def add_kv(self, key: str, value: Any, vtype: str | None = None) -> None:
        """Add one key. vtype: 'u32', 'i32', 'f32', 'bool', 'str', 'arr_u32', 'arr_i32', 'arr_f32', 'arr_str';
        inferred from the Python type when None (int -> u32, float -> f32)."""
        _add_kv(self._w, key, value, vtype)

    # tensors --------------------------------------------------------------------------------------------
    def add_sb(self, prefix: str, sb: SbLinear) -> None:
        """A sparse-binary linear: its planes, or its N:M code when sb.nm is set (the file then needs format
        version NM_CODE_VERSION, set here in place of the key's value, so the key keeps its place)."""
        import gguf

        sb.validate()
        if sb.nm is not None:
            if self._stock:
                raise ValueError(f"{prefix}: a stock GGUF cannot hold pbs2p's N:M code")
            self._w.kv_data[0][KEY_FORMAT_VERSION] = gguf.GGUFValue(value=NM_CODE_VERSION,
                                                                    type=gguf.GGUFValueType.UINT32)
            self._w.add_tensor(prefix + nm_suffix(*sb.nm), encode_nm(sb, *sb.nm).view(np.int8))
        else:
            self._w.add_tensor(prefix + SUFFIX_PLANES, sb.planes.view(np.int8))
        self._w.add_tensor(prefix + SUFFIX_ALPHA, sb.alpha)
        self._w.add_tensor(prefix + SUFFIX_MU, sb.mu)

    def add_q(self, prefix: str, ql: QLinear) -> None:
        """A solved Q8_0 / Q4_0 / Q3 linear, its bytes as they are: prefix.weight of that ggml type, or for Q3 (no
        ggml type) the I8 tensor prefix.q3."""
        import gguf

        ql.validate()
        if ql.gtype == QType.Q3:
            self._w.add_tensor(prefix + SUFFIX_Q3, ql.data.view(np.int8))
            return
        self._w.add_tensor(prefix + SUFFIX_WEIGHT, ql.data, raw_shape=ql.data.shape,
                           raw_dtype=gguf.GGMLQuantizationType(int(ql.gtype)))

    def add_raw(self, name: str, data: np.ndarray, gtype: int) -> None:
        """A tensor's bytes as they are (a GGUFReader tensor's data and type): F32 / F16 arrays in numpy order,
        block types as (rows, row bytes) uint8."""
        import gguf

        if int(gtype) in (GGMLType.F32, GGMLType.F16):
            self._w.add_tensor(name, np.ascontiguousarray(data))
        else:
            self._w.add_tensor(name, np.ascontiguousarray(data), raw_shape=data.shape,
                               raw_dtype=gguf.GGMLQuantizationType(int(gtype)))

    def add_dense(self, name: str, x: np.ndarray, gtype: GGMLType = GGMLType.F32) -> None:
        """A float tensor as F32, F16, Q8_0 or Q4_0 (rows of the last axis)."""
        import gguf

        x = np.asarray(x, dtype=np.float32)
        if gtype == GGMLType.F32:
            self._w.add_tensor(name, np.ascontiguousarray(x))
        elif gtype == GGMLType.F16:
            self._w.add_tensor(name, x.astype(np.float16))
        elif gtype == GGMLType.Q8_0:
            q = quantize_q8_0(x.reshape(-1, x.shape[-1]))
            self._w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif gtype == GGMLType.Q4_0:
            q = quantize_q4_0(x.reshape(-1, x.shape[-1]))
            self._w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            raise ValueError(f"unsupported dense type {gtype!r}")

    # commit ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        w = self._w
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self.path)
        self._done = True

    def abort(self) -> None:
        try:
            self._w.close()
        except Exception:  # noqa: BLE001 - best effort: the temp file is removed below either way
            pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ModelWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()



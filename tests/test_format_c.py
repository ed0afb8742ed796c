"""The Python side of the format and the C side agree: the cffi declarations against pbs2p.h (compiled with gcc),
the constants of pbs2p.format against the C ones, a file written by format.ModelWriter read back identically
by gguf.GGUFReader and by the C loader, and malformed files rejected with the right status."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pbs2p import _ffi
from pbs2p import format as fmt
from tiny_model import ROOT, native_library
from conftest import need  # noqa: E402
from pbs2p import Status  # noqa: E402

HEADER = ROOT / "runtime" / "include" / "pbs2p.h"
ffi = _ffi.ffi


@pytest.fixture(scope="module")
def lib():
    native_library()
    from pbs2p.runtime import lib as get

    return get()


def _strip_c(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _header_functions() -> set[str]:
    body = _strip_c(HEADER.read_text())
    return set(re.findall(r"\bPBS2P_API\b[^;{]*?\b(pbs2p_\w+)\s*\(", body))


def _header_struct_fields(name: str) -> list[str]:
    body = _strip_c(HEADER.read_text())
    m = re.search(r"typedef\s+struct\s+%s\s*\{(.*?)\}\s*%s\s*;" % (name, name), body, flags=re.S)
    assert m, f"struct {name} not found in pbs2p.h"
    fields = []
    for decl in m.group(1).split(";"):
        decl = decl.strip()
        if not decl:
            continue
        parts = decl.split(",")
        first = re.sub(r"\[[^\]]*\]", "", parts[0]).replace("*", " ").split()[-1]
        fields.append(first)
        fields += [re.sub(r"\[[^\]]*\]", "", p).replace("*", " ").strip() for p in parts[1:]]
    return fields


def _check_program() -> str:
    """C source that includes the real header, redeclares every function with the cdef's prototype (a conflicting
    prototype is a hard error in C), defines the cdef's structs under a cdef_ prefix and static-asserts that
    every field has the header's type, offset and size (and cffi's offset), and every enum value and macro."""
    consts = ffi.dlopen(None)  # cdef constants are readable from any library handle, no libpbs2p needed
    lines = ['#include <stddef.h>', '#include "pbs2p.h"', '#include "gguf.h"', _ffi.CDEF_FUNCS]
    sa = lines.append
    sa(f"_Static_assert(PBS2P_FORMAT_VERSION == {consts.PBS2P_FORMAT_VERSION}, \"format version\");")
    for name, value in ffi.typeof("pbs2p_status").relements.items():
        sa(f"_Static_assert({name} == {value}, \"{name}\");")
    for name in ("PBS2P_LOG_ERROR", "PBS2P_LOG_WARN", "PBS2P_LOG_INFO", "PBS2P_LOG_DEBUG"):
        sa(f"_Static_assert({name} == {getattr(consts, name)}, \"{name}\");")
    for s in _ffi.STRUCTS:
        m = re.search(r"typedef\s+struct\s+%s\s*\{.*?\}\s*%s\s*;" % (s, s), _ffi.CDEF_TYPES, flags=re.S)
        assert m, f"struct {s} not in the cdef"
        sa(m.group(0).replace(s, "cdef_" + s))
        sa(f"_Static_assert(sizeof({s}) == sizeof(cdef_{s}) && sizeof({s}) == {ffi.sizeof(s)}, \"sizeof {s}\");")
        for fname, f in ffi.typeof(s).fields:
            sa(f"_Static_assert(offsetof({s}, {fname}) == offsetof(cdef_{s}, {fname}) && "
               f"offsetof({s}, {fname}) == {f.offset}, \"offset {s}.{fname}\");")
            sa(f"_Static_assert(_Generic(&((({s} *)0)->{fname}), __typeof__(&((cdef_{s} *)0)->{fname}): 1, "
               f"default: 0), \"type {s}.{fname}\");")
    for t in fmt.GGMLType:
        sa(f"_Static_assert(GGML_TYPE_{t.name} == {int(t)}, \"ggml type {t.name}\");")
    return "\n".join(lines) + "\n"


def test_cdef_compiles_against_header(tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    need(cc is not None, "no C compiler")
    src = tmp_path / "check.c"
    src.write_text(_check_program())
    r = subprocess.run([cc, "-std=c11", "-fsyntax-only", "-Werror", "-Wall", f"-I{ROOT / 'runtime' / 'include'}",
                        f"-I{ROOT / 'runtime' / 'src'}", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, f"cffi declarations disagree with pbs2p.h:\n{r.stderr[-4000:]}"


@pytest.mark.parametrize("old,new,what", [
    ("int32_t n, float *logits", "int64_t n, float *logits", "pbs2p_eval"),          # a function argument
    ("    const char *name;", "    char *name;", "type pbs2p_tensor_info.name"),        # a field's type
    ("    int32_t top_k;", "    int64_t top_k;", "pbs2p_sampler_params"),             # a field's size
])
def test_check_program_catches_changes(tmp_path, old, new, what):
    """The check above can fail: each of these edits of the declarations is reported."""
    cc = shutil.which("gcc") or shutil.which("cc")
    need(cc is not None, "no C compiler")
    good = _check_program()
    bad = good.replace(old, new, 1)
    assert bad != good
    src = tmp_path / "bad.c"
    src.write_text(bad)
    r = subprocess.run([cc, "-std=c11", "-fsyntax-only", f"-I{ROOT / 'runtime' / 'include'}",
                        f"-I{ROOT / 'runtime' / 'src'}", str(src)], capture_output=True, text=True)
    assert r.returncode != 0 and what in r.stderr, r.stderr[-2000:]


def test_function_and_field_sets_match_header():
    cdef_funcs = set(re.findall(r"\b(pbs2p_\w+)\s*\(", _ffi.CDEF_FUNCS))
    assert cdef_funcs == _header_functions()
    for s in _ffi.STRUCTS:
        assert [n for n, _ in ffi.typeof(s).fields] == _header_struct_fields(s), s


def test_library_exports_exactly_the_header(lib):
    """libpbs2p.so's exported pbs2p_* symbols are the public header's functions: none missing, none extra (the
    internal ones stay hidden)."""
    nm = shutil.which("nm")
    need(nm is not None, "nm (binutils) not installed")
    out = subprocess.run([nm, "-D", "--defined-only", str(native_library())], capture_output=True, text=True,
                         check=True).stdout
    exported = {ln.split()[-1] for ln in out.splitlines() if ln.split() and ln.split()[-1].startswith("pbs2p_")}
    assert exported == _header_functions()


def test_constants_match_c(lib):
    assert fmt.FORMAT_VERSION == lib.PBS2P_FORMAT_VERSION
    c_status = ffi.typeof("pbs2p_status").relements
    assert {f"PBS2P_{s.name}": int(s) for s in Status} == c_status
    strs = [ffi.string(lib.pbs2p_status_str(int(s))).decode() for s in Status]
    assert all(strs) and len(set(strs)) == len(strs)
    assert ffi.string(lib.pbs2p_status_str(12345))  # never NULL, even for an unknown value


# ---- a Python-written file read by gguf.GGUFReader and by the C loader ------------------------------------------

METADATA = {
    "test.u32": (7, "u32"), "test.i32": (-3, "i32"), "test.f32": (1.5, "f32"), "test.bool": (True, "bool"),
    "test.str": ("héllo", "str"), "test.arr_u32": ([1, 2, 3], "arr_u32"), "test.arr_i32": ([-1, 0, 1], "arr_i32"),
    "test.arr_f32": ([0.5, -2.0], "arr_f32"), "test.arr_str": (["a", "", "ünï"], "arr_str"),
}
GGUF_TYPE = {"u32": 4, "i32": 5, "f32": 6, "bool": 7, "str": 8}


def _write_mixed(path: Path) -> dict[str, tuple[int, bytes, tuple[int, ...]]]:
    """A file with every tensor kind; returns name -> (ggml type, data bytes, numpy shape)."""
    rng = np.random.default_rng(1)
    expect = {}
    with fmt.ModelWriter(path, "llama") as w:
        for k, (v, t) in METADATA.items():
            w.add_kv(k, v, t)
        terms = rng.choice(np.array([-1, 0, 1], np.int8), size=(2, 5, 100))
        terms[1] = np.where(terms[0] != 0, terms[1], 0)
        sb = fmt.pack_sb(terms, rng.random((5, 2, 2)), rng.random((5, 2)), 64)
        w.add_sb("blk.0.attn_q", sb)
        expect["blk.0.attn_q.planes"] = (24, sb.planes.tobytes(), sb.planes.shape)
        expect["blk.0.attn_q.alpha"] = (1, sb.alpha.tobytes(), sb.alpha.shape)
        expect["blk.0.attn_q.mu"] = (1, sb.mu.tobytes(), sb.mu.shape)
        x = rng.standard_normal((3, 64)).astype(np.float32)
        w.add_dense("q8", x, fmt.GGMLType.Q8_0)
        expect["q8"] = (8, fmt.quantize_q8_0(x).tobytes(), (3, 64))
        w.add_dense("f16", x[:, :10], fmt.GGMLType.F16)
        expect["f16"] = (1, x[:, :10].astype(np.float16).tobytes(), (3, 10))
        w.add_dense("f32", x[0, :7], fmt.GGMLType.F32)
        expect["f32"] = (0, x[0, :7].tobytes(), (7,))
    return expect


def test_python_file_reads_identically_in_c(lib, tmp_path):
    import gguf

    path = tmp_path / "mixed.bin"
    expect = _write_mixed(path)
    reader = gguf.GGUFReader(str(path))
    pf = ffi.new("pbs2p_file **")
    assert lib.pbs2p_file_open(str(path).encode(), pf) == 0, ffi.string(lib.pbs2p_last_error())
    f = pf[0]
    try:
        # keys and their types
        py_kv = {k: int(fl.types[0]) for k, fl in reader.fields.items() if not k.startswith("GGUF.")}
        c_kv = {}
        key, typ = ffi.new("const char **"), ffi.new("int32_t *")
        for i in range(lib.pbs2p_file_n_kv(f)):
            assert lib.pbs2p_file_kv(f, i, key, typ) == 0
            c_kv[ffi.string(key[0]).decode()] = typ[0]
        assert c_kv == py_kv
        for k, (v, t) in METADATA.items():
            assert c_kv[k] == GGUF_TYPE.get(t, 9)
        assert lib.pbs2p_file_kv(f, lib.pbs2p_file_n_kv(f), key, typ) == Status.ERR_INVALID_ARG

        # tensors: names, types, shapes, offsets, bytes
        assert lib.pbs2p_file_n_tensors(f) == len(reader.tensors) == len(expect)
        info = ffi.new("pbs2p_tensor_info *")
        for i, t in enumerate(reader.tensors):
            assert lib.pbs2p_file_tensor(f, i, info) == 0
            name = ffi.string(info.name).decode()
            assert name == t.name
            gtype, data, shape = expect[name]
            assert info.type == int(t.tensor_type) == gtype
            ne = [int(x) for x in t.shape]
            assert info.n_dims == len(ne)
            assert list(info.ne)[:info.n_dims] == ne and all(x == 1 for x in list(info.ne)[info.n_dims:])
            assert tuple(reversed(ne)) == (shape if gtype != 8 else shape)
            assert info.offset == t.data_offset and info.offset % fmt.ALIGNMENT == 0
            assert info.n_bytes == t.n_bytes == len(data)
            assert ffi.buffer(info.data, info.n_bytes)[:] == data == np.asarray(t.data).tobytes()
        assert lib.pbs2p_file_tensor(f, -1, info) == Status.ERR_INVALID_ARG
    finally:
        lib.pbs2p_file_close(f)


# ---- malformed files ------------------------------------------------------------------------------------------

def _open_status(lib, path: Path) -> tuple[int, str]:
    pf = ffi.new("pbs2p_file **")
    st = lib.pbs2p_file_open(str(path).encode(), pf)
    msg = ffi.string(lib.pbs2p_last_error()).decode()
    if st == 0:
        lib.pbs2p_file_close(pf[0])
    else:
        assert pf[0] == ffi.NULL
    return st, msg


def _gguf_header(version: int = 3, n_tensors: int = 0, n_kv: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


@pytest.mark.parametrize("case,status", [
    ("missing", Status.ERR_IO),
    ("directory", Status.ERR_IO),
    ("empty", Status.ERR_FORMAT),
    ("bad_magic", Status.ERR_FORMAT),
    ("gguf_v4", Status.ERR_VERSION),
    ("huge_counts", Status.ERR_FORMAT),
    ("truncated", Status.ERR_FORMAT),
    ("key_len_past_end", Status.ERR_FORMAT),
])
def test_bad_files(lib, tmp_path, case, status):
    p = tmp_path / "bad.bin"
    if case == "directory":
        p.mkdir()
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "bad_magic":
        p.write_bytes(b"GGUX" + _gguf_header()[4:])
    elif case == "gguf_v4":
        p.write_bytes(_gguf_header(version=4))
    elif case == "huge_counts":
        p.write_bytes(_gguf_header(n_tensors=2**62, n_kv=2**62))
    elif case == "truncated":
        good = tmp_path / "good.bin"
        _write_mixed(good)
        data = good.read_bytes()
        p.write_bytes(data[: len(data) - 100])
    elif case == "key_len_past_end":
        p.write_bytes(_gguf_header(n_kv=1) + struct.pack("<Q", 1 << 40) + b"abc")
    st, msg = _open_status(lib, p)
    assert st == status, (st, msg)
    assert msg  # the failure is described

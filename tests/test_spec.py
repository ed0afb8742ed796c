"""One spec: format/spec.py is the file format's constants; runtime/src/format-spec.h is generated from it and the
C loader obeys it. Checked here: the committed header is what the generator writes, the header compiles and its
values are the module's, and the loader's rules (allowed M, readable versions and architecture names) are the
spec's, through the bindings on real files."""
from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, need
from pbs2p import format as fmt
from pbs2p.format import spec

HEADER = ROOT / "runtime" / "src" / "format-spec.h"


def test_header_is_generated_from_spec():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_format_header.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_header_compiles_and_matches_spec(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    need(cc, "no C compiler (cc/gcc) on PATH")
    ints = ["FORMAT_VERSION", "MIN_FORMAT_VERSION", "ALIGNMENT", "DEFAULT_BLOCK_SIZE", "BLOCK_SIZE_MULTIPLE",
            "MAX_BLOCK_SIZE", "WORD_BITS", "MAX_TERMS", "Q8_0_BLOCK", "N_LINEAR_NAMES", "N_FAMILIES"]
    strs = ["KEY_ARCHITECTURE", "KEY_BLOCK_SIZE", "KEY_FORMAT_VERSION", "KEY_METHOD", "KEY_NM_M", "KEY_NM_N",
            "KEY_POS_OFFSET", "SUFFIX_ALPHA", "SUFFIX_MU", "SUFFIX_PLANES", "SUFFIX_WEIGHT", "ARCH_PREFIX"]
    src = tmp_path / "spec.c"
    src.write_text("\n".join([
        '#include <stdio.h>', f'#include "{HEADER}"', 'int main(void) {',
        *[f'  printf("{n} %d\\n", (int)PBS2P_SPEC_{n});' for n in ints],
        *[f'  printf("{n} %s\\n", PBS2P_SPEC_{n});' for n in strs],
        '  for (int m = 0; m <= 64; m++) if (PBS2P_SPEC_M_ALLOWED(m)) printf("M %d\\n", m);',
        '  const char *lin[] = PBS2P_SPEC_LINEAR_NAMES, *fam[] = PBS2P_SPEC_FAMILIES;',
        '  for (int i = 0; i < PBS2P_SPEC_N_LINEAR_NAMES; i++) printf("LINEAR %s\\n", lin[i]);',
        '  for (int i = 0; i < PBS2P_SPEC_N_FAMILIES; i++) printf("FAMILY %s\\n", fam[i]);',
        '  printf("Q8_0_BYTES %d\\nQ4_0_BYTES %d\\n", PBS2P_SPEC_Q8_0_BYTES, PBS2P_SPEC_Q4_0_BYTES);',
        '  return 0;', '}']))
    exe = tmp_path / "spec"
    r = subprocess.run([cc, "-std=c11", "-Wall", "-Werror", "-o", str(exe), str(src)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    got: dict[str, list[str]] = {}
    for ln in lines:
        k, v = ln.split(" ", 1)
        got.setdefault(k, []).append(v)
    for n in ints[:-2]:
        assert got[n] == [str(getattr(spec, n))], n
    for n in strs:
        assert got[n] == [getattr(spec, n)], n
    assert got["M"] == [str(m) for m in spec.ALLOWED_M]
    assert tuple(got["LINEAR"]) == tuple(spec.LINEAR_NAMES) and tuple(got["FAMILY"]) == tuple(spec.FAMILIES)
    import gguf

    for t, n in ((gguf.GGMLQuantizationType.Q8_0, "Q8_0_BYTES"), (gguf.GGMLQuantizationType.Q4_0, "Q4_0_BYTES")):
        assert got[n] == [str(gguf.GGML_QUANT_SIZES[t][1])] and gguf.GGML_QUANT_SIZES[t][0] == spec.Q8_0_BLOCK


# ---- the loader's rules, on real files ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import tiny_model

    tiny_model.native_library()
    return tiny_model.write_tiny_model(tmp_path_factory.mktemp("spec") / "tiny.bin")  # nm.m 4, N per layer (2, 4)


def _kv_value_pos(data: bytes, key: str) -> int:
    """Byte offset of a u32 key's value (after its type word)."""
    k = key.encode()
    at = data.find(struct.pack("<Q", len(k)) + k)
    assert at > 0 and struct.unpack_from("<I", data, at + 8 + len(k))[0] == 4, key  # GGUF type u32
    return at + 8 + len(k) + 4


def _patched(data: bytes, key: str, value: int) -> bytes:
    at = _kv_value_pos(data, key)
    return data[:at] + struct.pack("<I", value) + data[at + 4:]


@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 9, 16, 64])
def test_loader_refuses_m_outside_spec(tiny, tmp_path, m):
    from pbs2p import FormatError, Runtime

    p = tmp_path / "m.bin"
    p.write_bytes(_patched(tiny.path.read_bytes(), fmt.KEY_NM_M, m))
    with pytest.raises(FormatError) as e:
        Runtime(p, threads=1)
    assert fmt.KEY_NM_M in e.value.message
    if m not in (1, 2, 3):  # N 2 and 4 fit in M: only the allowed-M rule refuses it
        assert ", ".join(map(str, spec.ALLOWED_M)) in e.value.message


def test_loader_accepts_every_allowed_m(tiny, tmp_path):
    from pbs2p import Runtime

    for m in spec.ALLOWED_M:  # the tiny file's N (2, 4) fit both; N:M grouping is the exporter's property
        p = tmp_path / f"m{m}.bin"
        p.write_bytes(_patched(tiny.path.read_bytes(), fmt.KEY_NM_M, m))
        with Runtime(p, threads=1) as rt:
            assert rt.info.nm_m == m


def _as_version_1(path: Path, family: str) -> bytes:
    """A version-2 file rewritten as version 1 wrote it: general.architecture and the key prefix are the bare
    family. The header changes length; the data section is re-aligned, its bytes and relative offsets unchanged."""
    import gguf

    data = path.read_bytes()
    r = gguf.GGUFReader(str(path))
    last = r.tensors[-1].field
    header_end = last.offset + sum(int(p.nbytes) for p in last.parts)
    header, body = data[:header_end], data[r.data_offset:]
    new_arch = fmt.arch_name(family)
    for key in [k for k in r.fields if k.startswith(new_arch + ".")]:
        old_k, new_k = key.encode(), (family + key[len(new_arch):]).encode()
        header = header.replace(struct.pack("<Q", len(old_k)) + old_k, struct.pack("<Q", len(new_k)) + new_k)
    a = new_arch.encode()
    header = header.replace(struct.pack("<Q", len(a)) + a, struct.pack("<Q", len(family)) + family.encode())
    header = _patched(header, fmt.KEY_FORMAT_VERSION, 1)
    pad = (-len(header)) % int(r.alignment)
    return header + b"\0" * pad + body


def test_version_1_files_load(tiny, tmp_path):
    from pbs2p import FormatError, Runtime

    v1 = tmp_path / "v1.bin"
    v1.write_bytes(_as_version_1(tiny.path, "llama"))
    mf = fmt.ModelFile(v1)
    assert (mf.version, mf.arch, mf.family) == (1, "llama", "llama")
    ids = [1, 17, 42, 99, 7]
    with Runtime(tiny.path, threads=1) as r2, Runtime(v1, threads=1) as r1:
        assert r1.info.arch == r2.info.arch == "llama" and r1.info.format_version == 1
        assert (r1.logits(ids) == r2.logits(ids)).all()
    # each version's own architecture name only
    wrong = tmp_path / "v2-bare.bin"
    wrong.write_bytes(_patched(v1.read_bytes(), fmt.KEY_FORMAT_VERSION, 2))
    with pytest.raises(FormatError) as e:
        Runtime(wrong, threads=1)
    assert fmt.KEY_ARCHITECTURE in e.value.message and spec.ARCH_PREFIX + "<family>" in e.value.message
    with pytest.raises(fmt.FormatError):
        fmt.ModelFile(wrong)
    wrong.write_bytes(_patched(tiny.path.read_bytes(), fmt.KEY_FORMAT_VERSION, 1))
    with pytest.raises(FormatError):
        Runtime(wrong, threads=1)
    with pytest.raises(fmt.FormatError):
        fmt.ModelFile(wrong)

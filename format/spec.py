"""The pbs2p file format's constants and rules — the one Python statement of docs/format.md.

The exporter's writer, every reader (pbs2p-dump, the fake-quant reference, checkpoints, benchmarks) and the C
runtime take their constants from here: runtime/src/format-spec.h is generated from this module by
tools/gen_format_header.py, and tests/test_spec.py fails when the committed header differs from what the
generator writes. No numpy, no torch: this module states facts, it computes nothing heavy.
"""
from __future__ import annotations

from enum import IntEnum

# --- container --------------------------------------------------------------------------------------------
FORMAT_VERSION = 3            # the newest version; the runtime reads MIN_FORMAT_VERSION..FORMAT_VERSION
MIN_FORMAT_VERSION = 1
NM_CODE_VERSION = 3           # the first version with N:M-coded linears (L.nm<N>of<M>)
BASE_FORMAT_VERSION = 2       # written for a file without N:M-coded linears, so older readers keep reading it
ALIGNMENT = 64                # general.alignment: every tensor's data starts at a multiple of 64 bytes

# --- sparse-binary encoding -------------------------------------------------------------------------------
DEFAULT_BLOCK_SIZE = 128      # pbs2p.block_size: column block of scales and of activation quantization
BLOCK_SIZE_MULTIPLE = 64      # a block is a whole number of 64-bit plane words
MAX_BLOCK_SIZE = 65536        # = the runtime's largest sparse-binary K
WORD_BITS = 64                # plane word
MAX_TERMS = 4                 # binary terms per linear the runtime accepts (1..4)
ALLOWED_M = (4, 8)            # pbs2p.nm.m of a pruned file; 0 means no layer is pruned

# --- the N:M code: a compact sparse-binary linear (docs/format.md, "The N:M code") ----------------------------
SUFFIX_NM = ".nm"             # + "<N>of<M>": the tensor L.nm6of8 holds a 6:8 linear's pattern indices and signs


def nm_patterns(n: int, m: int) -> tuple[int, ...]:
    """The M-bit masks with N bits set, ascending: pattern index i stands for nm_patterns(n, m)[i] (bit c: column
    c of the group kept)."""
    return tuple(x for x in range(1 << m) if bin(x).count("1") == n)


def nm_pattern_bits(n: int, m: int) -> int:
    """Bits of one group's pattern index: ceil(log2 C(M, N)) (0 for N = M: every weight kept)."""
    return (len(nm_patterns(n, m)) - 1).bit_length()


def nm_row_bytes(k: int, n: int, m: int) -> int:
    """Bytes of one row: K/M pattern indices of nm_pattern_bits bits, then K·N/M sign bits (K % 64 == 0)."""
    return (k // m) * nm_pattern_bits(n, m) // 8 + (k // m) * n // 8


def nm_suffix(n: int, m: int) -> str:
    return f"{SUFFIX_NM}{n}of{m}"


def check_nm_code(n: int, m: int, k: int) -> None:
    """A linear the N:M code can hold: M in ALLOWED_M, 1 <= N <= M, K a multiple of 64 (whole words)."""
    if m not in ALLOWED_M or not 1 <= n <= m:
        raise FormatError(f"N:M code {n}:{m}: need M in {', '.join(map(str, ALLOWED_M))} and 1 <= N <= M")
    if k % WORD_BITS:
        raise FormatError(f"N:M code: K = {k} is not a multiple of {WORD_BITS}")


# --- ggml block types used for embeddings / dense linears -------------------------------------------------
Q8_0_BLOCK = 32               # values per Q8_0 / Q4_0 block
Q8_0_BYTES = 34               # f16 d + 32 int8: 8.5 bpw
Q4_0_BYTES = 18               # f16 d + 16 nibble bytes: 4.5 bpw
# pbs2p's own 3-bit block of 32 (ggml has no 32-value 3-bit type): f16 d, 8 bytes of low 2-bit parts, 4 bytes of
# high bits; value d·(q − 4), q in 0..7 (docs/format.md, "Q3 blocks"); stored as the I8 tensor L.q3
Q3_BYTES = 14                 # 3.5 bpw


class GGMLType(IntEnum):
    """ggml tensor type ids used by pbs2p files (the C loader knows the other ggml types' sizes too)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q8_0 = 8
    I8 = 24


class QType(IntEnum):
    """Block types of solved dense linears (format.QLinear): ggml's type id where ggml has the type; Q3 is pbs2p's
    own, its id outside ggml's range (the file stores it as an I8 tensor named L.q3, not as a ggml type)."""

    Q4_0 = 2
    Q8_0 = 8
    Q3 = 1003


class TokenType(IntEnum):
    """tokenizer.ggml.token_type values (llama.cpp's)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# --- metadata keys (the architecture's own keys are "{general.architecture}.<llama.cpp key>") ----------------
KEY_ARCHITECTURE = "general.architecture"
KEY_ALIGNMENT = "general.alignment"
KEY_FORMAT_VERSION = "pbs2p.format_version"
KEY_METHOD = "pbs2p.method"
KEY_NM_M = "pbs2p.nm.m"
KEY_NM_N = "pbs2p.nm.n"
KEY_BLOCK_SIZE = "pbs2p.block_size"
KEY_CALIBRATION = "pbs2p.calibration"
KEY_POS_OFFSET = "pbs2p.pos_offset"
KEY_PLAN = "pbs2p.plan"       # method "plan": the budget planner's plan as a JSON string (docs/format.md, "Plan")

# --- tensor names -----------------------------------------------------------------------------------------
SUFFIX_PLANES = ".planes"
SUFFIX_ALPHA = ".alpha"
SUFFIX_MU = ".mu"
SUFFIX_WEIGHT = ".weight"
SUFFIX_Q3 = ".q3"             # a linear in Q3 blocks (I8, shape (R, K/32 · Q3_BYTES))
SUFFIX_BIAS = ".bias"
# every linear a block may hold, in file order (opt has no ffn_gate)
LINEAR_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

# --- architectures ----------------------------------------------------------------------------------------
FAMILIES = ("llama", "qwen2", "opt")
# Since version 2 general.architecture is "pbs2p-<family>", a name no other GGUF reader knows, so llama.cpp and
# transformers refuse a pbs2p file instead of misreading it (sparse-binary tensors, unpermuted Q/K). Version 1
# files used the bare family name; readers accept that for version 1 only.
ARCH_PREFIX = "pbs2p-"

# values of pbs2p.method: the exporter's methods ("fp16": dense F16 linears, no quantization; "plan": a code per
# linear chosen by the bits-per-weight budget planner, the plan in pbs2p.plan)
METHODS = ("pbs2p", "sign", "billm", "arb", "stbllm", "fp16", "plan")
# ggml types a dense linear may have (Q8_0 / Q4_0 need K % Q8_0_BLOCK == 0)
DENSE_LINEAR_TYPES = ("F32", "F16", "Q8_0", "Q4_0")


class FormatError(ValueError):
    """A file breaks a rule of docs/format.md (the message names the key or tensor and the value)."""


def arch_name(family: str) -> str:
    """general.architecture written for a family (format version FORMAT_VERSION)."""
    if family not in FAMILIES:
        raise FormatError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    return ARCH_PREFIX + family


def family_of_arch(arch: str, version: int) -> str:
    """The family a file's general.architecture names, under the rules of its format version."""
    if not MIN_FORMAT_VERSION <= version <= FORMAT_VERSION:
        raise FormatError(f"{KEY_FORMAT_VERSION} = {version}: this reader reads versions "
                          f"{MIN_FORMAT_VERSION}..{FORMAT_VERSION}")
    fam = arch[len(ARCH_PREFIX):] if version >= 2 and arch.startswith(ARCH_PREFIX) else arch if version == 1 else ""
    if fam not in FAMILIES:
        want = ", ".join(arch_name(f) if version >= 2 else f for f in FAMILIES)
        raise FormatError(f"{KEY_ARCHITECTURE} = {arch!r} is not a pbs2p architecture of format version "
                          f"{version} ({want})")
    return fam


def n_words(k: int) -> int:
    """64-bit words per row-plane: ceil(K / 64)."""
    return (k + WORD_BITS - 1) // WORD_BITS


def n_blocks(k: int, block_size: int) -> int:
    """Column blocks of scales: ceil(K / bs); the last may be partial."""
    return (k + block_size - 1) // block_size


def check_block_size(block_size: int) -> None:
    if not (0 < block_size <= MAX_BLOCK_SIZE and block_size % BLOCK_SIZE_MULTIPLE == 0):
        raise FormatError(f"block size {block_size}: must be a positive multiple of {BLOCK_SIZE_MULTIPLE} "
                          f"up to {MAX_BLOCK_SIZE}")


def check_nm(n: int, m: int) -> None:
    """An N:M pair a file may declare: M in ALLOWED_M and 1 <= N <= M (N == M: dense), or (0, 0): dense (no layer pruned)."""
    if (n, m) == (0, 0):
        return
    if m not in ALLOWED_M:
        raise FormatError(f"N:M {n}:{m}: M must be one of {', '.join(map(str, ALLOWED_M))}")
    if not 1 <= n <= m:
        raise FormatError(f"N:M {n}:{m}: N must be in [1, M = {m}]")


def linear_n_in(linear: str, n_embd: int, n_ff: int, q_dim: int) -> int:
    """The input size K of a linear, which the file does not store with it (the input-size rule): ffn_down reads
    the FFN width, attn_output the concatenated heads (n_head · head_dim), every other linear the embedding."""
    if linear not in LINEAR_NAMES:
        raise FormatError(f"{linear!r} is not a linear name ({', '.join(LINEAR_NAMES)})")
    return {"ffn_down": n_ff, "attn_output": q_dim}.get(linear, n_embd)


__all__ = [n for n in dir() if n.isupper() or n in (
    "GGMLType", "QType", "TokenType", "FormatError", "arch_name", "family_of_arch", "n_words", "n_blocks",
    "check_block_size", "check_nm", "linear_n_in", "nm_patterns", "nm_pattern_bits", "nm_row_bytes", "nm_suffix",
    "check_nm_code")]

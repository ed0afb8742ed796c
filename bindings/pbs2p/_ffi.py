"""cffi declarations of the public C API (runtime/include/pbs2p.h) and the loading of libpbs2p.so.

Why cffi's ABI mode (``ffi.dlopen``) rather than API mode (a compiled extension module):

* no C compiler is needed at install or import time beyond the CMake build that already produces the
  library, and there is exactly one native artifact — ``libpbs2p.so``, the same object the C tests and the
  ``pbs2p-run`` CLI are built from — instead of a second, separately compiled extension that could drift;
* the price of ABI mode is that nothing checks these declarations against the header when importing, so
  ``tests/test_format_c.py`` compiles them against ``pbs2p.h`` with gcc (a conflicting prototype or a moved
  struct field is a compile error) and compares the set of exported functions with the header's.

The library is looked up next to this file (where ``pip install .`` puts it); the environment variable
``PBS2P_LIB`` overrides the path (e.g. a build folder during development).
"""
from __future__ import annotations

import os
from pathlib import Path

import cffi

# Types, constants and enums: kept textually identical to the header so the gcc check can reuse it.
CDEF_TYPES = """
#define PBS2P_FORMAT_VERSION 3

typedef enum pbs2p_status {
    PBS2P_OK = 0,
    PBS2P_ERR_IO = 1,
    PBS2P_ERR_FORMAT = 2,
    PBS2P_ERR_VERSION = 3,
    PBS2P_ERR_UNSUPPORTED = 4,
    PBS2P_ERR_NOMEM = 5,
    PBS2P_ERR_INVALID_ARG = 6,
    PBS2P_ERR_CONTEXT_FULL = 7,
    PBS2P_ERR_ABORTED = 8,
    PBS2P_ERR_BUFFER_TOO_SMALL = 9,
    PBS2P_ERR_BUSY = 10,
} pbs2p_status;

enum { PBS2P_LOG_ERROR = 0, PBS2P_LOG_WARN = 1, PBS2P_LOG_INFO = 2, PBS2P_LOG_DEBUG = 3 };
typedef void (*pbs2p_log_fn)(int32_t level, const char *msg, void *user);

typedef struct pbs2p_file pbs2p_file;

typedef struct pbs2p_tensor_info {
    const char *name;
    int32_t type;
    int32_t n_dims;
    int64_t ne[4];
    uint64_t offset;
    uint64_t n_bytes;
    const void *data;
} pbs2p_tensor_info;

typedef struct pbs2p_model pbs2p_model;

typedef struct pbs2p_model_info {
    char arch[16];
    char method[32];
    int32_t n_vocab, n_ctx_train, n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff;
    int32_t nm_m;
    int32_t block_size;
    int32_t format_version;
    int64_t file_size;
    int64_t n_linear_weights;
    int64_t n_linear_bytes;
    double storage_bpw;
    double param_bits;
} pbs2p_model_info;

typedef struct pbs2p_chat_msg {
    const char *role;
    const char *content;
} pbs2p_chat_msg;

typedef struct pbs2p_ctx pbs2p_ctx;

typedef struct pbs2p_ctx_params {
    int32_t n_ctx;
    int32_t n_threads;
    int32_t n_batch;
    int32_t kv_f16;
} pbs2p_ctx_params;

typedef struct pbs2p_sampler pbs2p_sampler;

typedef struct pbs2p_sampler_params {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
    float repeat_penalty;
    int32_t repeat_last_n;
    uint64_t seed;
} pbs2p_sampler_params;
"""

# Function prototypes: valid C that redeclares the header's functions (a mismatch does not compile).
CDEF_FUNCS = """
const char *pbs2p_status_str(pbs2p_status status);
const char *pbs2p_last_error(void);
void pbs2p_set_log(pbs2p_log_fn fn, void *user);

pbs2p_status pbs2p_file_open(const char *path, pbs2p_file **out);
void pbs2p_file_close(pbs2p_file *file);
int64_t pbs2p_file_n_tensors(const pbs2p_file *file);
int64_t pbs2p_file_n_kv(const pbs2p_file *file);
pbs2p_status pbs2p_file_kv(const pbs2p_file *file, int64_t i, const char **key, int32_t *type);
pbs2p_status pbs2p_file_tensor(const pbs2p_file *file, int64_t i, pbs2p_tensor_info *info);

pbs2p_status pbs2p_model_load(const char *path, pbs2p_model **out);
void pbs2p_model_free(pbs2p_model *model);
pbs2p_status pbs2p_model_get_info(const pbs2p_model *model, pbs2p_model_info *info);
const pbs2p_file *pbs2p_model_file(const pbs2p_model *model);
int32_t pbs2p_model_layer_n(const pbs2p_model *model, int32_t layer);

int32_t pbs2p_token_bos(const pbs2p_model *model);
int32_t pbs2p_token_eos(const pbs2p_model *model);
int32_t pbs2p_token_is_eog(const pbs2p_model *model, int32_t token);
pbs2p_status pbs2p_tokenize(const pbs2p_model *model, const char *text, size_t len,
                            int32_t add_special, int32_t parse_special,
                            int32_t *out, int32_t cap, int32_t *n_out);
pbs2p_status pbs2p_token_to_piece(const pbs2p_model *model, int32_t token, int32_t render_special,
                                  char *buf, int32_t cap, int32_t *n_out);
pbs2p_status pbs2p_chat_apply(const pbs2p_model *model, const pbs2p_chat_msg *msgs, int32_t n_msgs,
                              int32_t add_assistant, char *buf, int32_t cap, int32_t *n_out);

pbs2p_ctx_params pbs2p_ctx_default_params(void);
pbs2p_status pbs2p_ctx_init(const pbs2p_model *model, const pbs2p_ctx_params *params, pbs2p_ctx **out);
void pbs2p_ctx_free(pbs2p_ctx *ctx);
int32_t pbs2p_ctx_n_ctx(const pbs2p_ctx *ctx);
int32_t pbs2p_ctx_n_past(const pbs2p_ctx *ctx);
pbs2p_status pbs2p_ctx_truncate(pbs2p_ctx *ctx, int32_t n_keep);
pbs2p_status pbs2p_eval(pbs2p_ctx *ctx, const int32_t *tokens, int32_t n, float *logits,
                        int32_t all_logits);
void pbs2p_ctx_abort(pbs2p_ctx *ctx);

pbs2p_sampler_params pbs2p_sampler_default_params(void);
pbs2p_status pbs2p_sampler_init(const pbs2p_sampler_params *params, pbs2p_sampler **out);
void pbs2p_sampler_free(pbs2p_sampler *sampler);
int32_t pbs2p_sample(pbs2p_sampler *sampler, float *logits, int32_t n_vocab,
                     const int32_t *history, int32_t n_history);

const char *pbs2p_kernel_name(void);
pbs2p_status pbs2p_set_kernel(const char *name);
"""

# Struct and enum names the consistency test checks field by field.
STRUCTS = ("pbs2p_tensor_info", "pbs2p_model_info", "pbs2p_chat_msg", "pbs2p_ctx_params", "pbs2p_sampler_params")

ffi = cffi.FFI()
ffi.cdef(CDEF_TYPES)
ffi.cdef(CDEF_FUNCS)

LIB_NAME = "libpbs2p.so"


def library_path() -> Path:
    env = os.environ.get("PBS2P_LIB")
    return Path(env) if env else Path(os.path.abspath(__file__)).parent / LIB_NAME


_lib = None


def load() -> object:
    """dlopen the library once (on first use, so `import pbs2p` works without it, e.g. for pbs2p-dump)."""
    global _lib
    if _lib is None:
        path = library_path()
        if not path.is_file():
            raise OSError(f"pbs2p native library not found at {path} "
                          f"(build it with CMake, or set PBS2P_LIB to libpbs2p.so)")
        _lib = ffi.dlopen(str(path))
    return _lib

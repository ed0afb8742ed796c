/* pbs2p — run 1-bit N:M-sparse (PBS²P) language models on CPUs.
 *
 * Public C API. Every function that can fail returns a pbs2p_status; on failure a message describing the
 * offending value is available from pbs2p_last_error() (thread-local) and is sent to the log callback.
 * The library never calls exit() or abort(), and never trusts the model file: every field is validated.
 * Handles are opaque. A model is immutable after load and may be shared by contexts in several threads;
 * a context (KV cache, buffers, thread pool) must be used by one thread at a time.
 * The file format is specified in docs/format.md. */
#ifndef PBS2P_H
#define PBS2P_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define PBS2P_API __declspec(dllexport)
#else
#define PBS2P_API __attribute__((visibility("default")))
#endif

#define PBS2P_FORMAT_VERSION 3 /* newest file format this runtime reads (it reads 1 and 2 too) */

typedef enum pbs2p_status {
    PBS2P_OK = 0,
    PBS2P_ERR_IO = 1,           /* cannot open / stat / mmap the file */
    PBS2P_ERR_FORMAT = 2,       /* malformed file: bad magic, truncated, out-of-range value, ... */
    PBS2P_ERR_VERSION = 3,      /* GGUF or pbs2p format version newer than this runtime */
    PBS2P_ERR_UNSUPPORTED = 4,  /* valid file, but architecture / tensor type / feature not supported */
    PBS2P_ERR_NOMEM = 5,        /* allocation failed */
    PBS2P_ERR_INVALID_ARG = 6,  /* bad argument from the caller (NULL, out-of-range token id, ...) */
    PBS2P_ERR_CONTEXT_FULL = 7, /* the tokens do not fit in the context */
    PBS2P_ERR_ABORTED = 8,      /* pbs2p_ctx_abort() was called during the operation */
    PBS2P_ERR_BUFFER_TOO_SMALL = 9, /* output buffer too small; *n_out holds the size needed */
    PBS2P_ERR_BUSY = 10,        /* the context is in use by another call */
} pbs2p_status;

/* A static, never-NULL description of a status. */
PBS2P_API const char *pbs2p_status_str(pbs2p_status status);
/* The message of the last failure in this thread ("" if none). Valid until the next pbs2p call in it. */
PBS2P_API const char *pbs2p_last_error(void);

enum { PBS2P_LOG_ERROR = 0, PBS2P_LOG_WARN = 1, PBS2P_LOG_INFO = 2, PBS2P_LOG_DEBUG = 3 };
typedef void (*pbs2p_log_fn)(int32_t level, const char *msg, void *user);
/* Route log lines to fn (NULL: the default, which writes WARN and ERROR to stderr). Not thread-safe. */
PBS2P_API void pbs2p_set_log(pbs2p_log_fn fn, void *user);

/* ---- validated file access (any GGUF v2/v3 file, not only pbs2p models) ---- */

typedef struct pbs2p_file pbs2p_file;

PBS2P_API pbs2p_status pbs2p_file_open(const char *path, pbs2p_file **out);
PBS2P_API void pbs2p_file_close(pbs2p_file *file);
PBS2P_API int64_t pbs2p_file_n_tensors(const pbs2p_file *file);
PBS2P_API int64_t pbs2p_file_n_kv(const pbs2p_file *file);
/* The i-th key (NUL-terminated, valid while the file is open) and its GGUF value type (array: 9). */
PBS2P_API pbs2p_status pbs2p_file_kv(const pbs2p_file *file, int64_t i, const char **key, int32_t *type);

typedef struct pbs2p_tensor_info {
    const char *name;    /* NUL-terminated, valid while the file is open */
    int32_t type;        /* ggml type id (0 F32, 1 F16, 8 Q8_0, 24 I8, ...) */
    int32_t n_dims;      /* 1..4 */
    int64_t ne[4];       /* GGUF order: ne[0] innermost; unused dims are 1 */
    uint64_t offset;     /* absolute file offset of the data */
    uint64_t n_bytes;    /* size of the data */
    const void *data;    /* pointer into the mapping */
} pbs2p_tensor_info;

PBS2P_API pbs2p_status pbs2p_file_tensor(const pbs2p_file *file, int64_t i, pbs2p_tensor_info *info);

/* ---- model ---- */

typedef struct pbs2p_model pbs2p_model;

typedef struct pbs2p_model_info {
    char arch[16];        /* "llama", "qwen2", "opt" */
    char method[32];      /* pbs2p.method */
    int32_t n_vocab, n_ctx_train, n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff;
    int32_t nm_m;         /* 0 if no layer is pruned */
    int32_t block_size;
    int32_t format_version;
    int64_t file_size;            /* bytes */
    int64_t n_linear_weights;     /* weights in linear layers (R·K summed) */
    int64_t n_linear_bytes;       /* file bytes of linear layers (planes, scales, dense weights, biases excluded) */
    double storage_bpw;           /* 8 · n_linear_bytes / n_linear_weights */
    double param_bits;            /* the paper's convention: Σ kept weights (+ residual terms) / weights */
} pbs2p_model_info;

/* Map and validate a model file. On failure *out is NULL and nothing is leaked. */
PBS2P_API pbs2p_status pbs2p_model_load(const char *path, pbs2p_model **out);
PBS2P_API void pbs2p_model_free(pbs2p_model *model);
PBS2P_API pbs2p_status pbs2p_model_get_info(const pbs2p_model *model, pbs2p_model_info *info);
/* The model's file (for metadata and tensor access); owned by the model. */
PBS2P_API const pbs2p_file *pbs2p_model_file(const pbs2p_model *model);
/* Kept N of transformer block `layer` (M if dense); -1 on a bad index. */
PBS2P_API int32_t pbs2p_model_layer_n(const pbs2p_model *model, int32_t layer);

/* ---- tokenizer ---- */

PBS2P_API int32_t pbs2p_token_bos(const pbs2p_model *model); /* -1 if none */
PBS2P_API int32_t pbs2p_token_eos(const pbs2p_model *model); /* -1 if none */
/* Nonzero if `token` ends generation (EOS, EOT, <|im_end|>, ...). */
PBS2P_API int32_t pbs2p_token_is_eog(const pbs2p_model *model, int32_t token);

/* Tokenize `len` bytes of `text` (any bytes: invalid UTF-8 is encoded byte-wise where the vocabulary can).
 * add_special: add BOS/EOS as the metadata says. parse_special: match control tokens ("<|im_start|>") in text.
 * Writes up to `cap` ids to `out`; *n_out = number of ids (also when BUFFER_TOO_SMALL). */
PBS2P_API pbs2p_status pbs2p_tokenize(const pbs2p_model *model, const char *text, size_t len,
                                      int32_t add_special, int32_t parse_special,
                                      int32_t *out, int32_t cap, int32_t *n_out);
/* The raw bytes of one token (not NUL-terminated; may be a partial UTF-8 sequence).
 * *n_out = bytes needed. Control tokens give their text only when render_special != 0. */
PBS2P_API pbs2p_status pbs2p_token_to_piece(const pbs2p_model *model, int32_t token, int32_t render_special,
                                            char *buf, int32_t cap, int32_t *n_out);

typedef struct pbs2p_chat_msg {
    const char *role;    /* "system", "user", "assistant" */
    const char *content;
} pbs2p_chat_msg;

/* Render messages with the model's chat template (ChatML, Llama-2 or Llama-3, recognised from
 * tokenizer.chat_template). add_assistant: end with the assistant header. NUL-terminates when cap > *n_out. */
PBS2P_API pbs2p_status pbs2p_chat_apply(const pbs2p_model *model, const pbs2p_chat_msg *msgs, int32_t n_msgs,
                                        int32_t add_assistant, char *buf, int32_t cap, int32_t *n_out);

/* ---- context: KV cache, buffers, thread pool ---- */

typedef struct pbs2p_ctx pbs2p_ctx;

typedef struct pbs2p_ctx_params {
    int32_t n_ctx;      /* context length; 0: the model's training context, capped at 4096 */
    int32_t n_threads;  /* worker threads incl. the caller; 0: number of online CPUs */
    int32_t n_batch;    /* tokens per prefill pass; default 64 */
    int32_t kv_f16;     /* 1: f16 KV cache, 0: f32 (default) */
} pbs2p_ctx_params;

PBS2P_API pbs2p_ctx_params pbs2p_ctx_default_params(void);
PBS2P_API pbs2p_status pbs2p_ctx_init(const pbs2p_model *model, const pbs2p_ctx_params *params, pbs2p_ctx **out);
PBS2P_API void pbs2p_ctx_free(pbs2p_ctx *ctx);
PBS2P_API int32_t pbs2p_ctx_n_ctx(const pbs2p_ctx *ctx);
PBS2P_API int32_t pbs2p_ctx_n_past(const pbs2p_ctx *ctx);
/* Forget the KV cache from position n_keep on (0: all). */
PBS2P_API pbs2p_status pbs2p_ctx_truncate(pbs2p_ctx *ctx, int32_t n_keep);

/* Run n tokens at positions n_past.. (prefill in batches of n_batch), append them to the KV cache.
 * logits: NULL, or n_vocab floats for the last token (all_logits = 0), or n·n_vocab (all_logits = 1). */
PBS2P_API pbs2p_status pbs2p_eval(pbs2p_ctx *ctx, const int32_t *tokens, int32_t n, float *logits,
                                  int32_t all_logits);
/* Ask a running pbs2p_eval on ctx to stop at the next layer boundary with PBS2P_ERR_ABORTED
 * (async-signal-safe; the flag is cleared when the next pbs2p_eval starts). The KV cache stays consistent. */
PBS2P_API void pbs2p_ctx_abort(pbs2p_ctx *ctx);

/* ---- sampler ---- */

typedef struct pbs2p_sampler pbs2p_sampler;

typedef struct pbs2p_sampler_params {
    float temperature;     /* <= 0: greedy (argmax, lowest id on ties) */
    int32_t top_k;         /* <= 0: off */
    float top_p;           /* >= 1: off */
    float min_p;           /* <= 0: off */
    float repeat_penalty;  /* 1: off; llama.cpp's rule: logit > 0 ? logit / p : logit * p */
    int32_t repeat_last_n; /* window of past tokens the penalty looks at */
    uint64_t seed;         /* same seed, same logits → same tokens */
} pbs2p_sampler_params;

PBS2P_API pbs2p_sampler_params pbs2p_sampler_default_params(void);
PBS2P_API pbs2p_status pbs2p_sampler_init(const pbs2p_sampler_params *params, pbs2p_sampler **out);
PBS2P_API void pbs2p_sampler_free(pbs2p_sampler *sampler);
/* Pick a token from n_vocab logits (modified in place); history: the tokens so far (for the penalty). */
PBS2P_API int32_t pbs2p_sample(pbs2p_sampler *sampler, float *logits, int32_t n_vocab,
                               const int32_t *history, int32_t n_history);

/* ---- kernels ---- */

/* Name of the sparse-binary kernel in use: "scalar", "avx2", "avx512", "neon" (popcount) or "avx2-expand",
 * "avx512-expand", "neon-expand" (byte-mask expansion; see benchmarks/kernels/RESULTS.md for which is default). */
PBS2P_API const char *pbs2p_kernel_name(void);
/* Force a kernel ("scalar", "avx2", ...; NULL or "auto": best available). The environment variable
 * PBS2P_KERNEL does the same at first use. Fails with UNSUPPORTED if this CPU or build lacks it. */
PBS2P_API pbs2p_status pbs2p_set_kernel(const char *name);

#ifdef __cplusplus
}
#endif
#endif /* PBS2P_H */

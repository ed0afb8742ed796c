/* Internal: the model (hyper-parameters + weights bound into the mapped file) and the context (run state),
 * in the spirit of llama2.c's Config / TransformerWeights / RunState. docs/format.md is the contract. */
#ifndef PBS2P_MODEL_H
#define PBS2P_MODEL_H

#include <stdatomic.h>
#include <stdint.h>

#include "gguf.h"
#include "kernels.h"
#include "pbs2p.h"
#include "threadpool.h"
#include "tokenizer.h"

typedef enum pbs2p_arch { PBS2P_ARCH_LLAMA = 0, PBS2P_ARCH_QWEN2 = 1, PBS2P_ARCH_OPT = 2 } pbs2p_arch;
typedef enum pbs2p_rope_scaling { PBS2P_ROPE_NONE = 0, PBS2P_ROPE_LINEAR = 1, PBS2P_ROPE_LLAMA3 = 2 } pbs2p_rope_scaling;

/* Hyper-parameters, all validated at load. */
typedef struct pbs2p_config {
    pbs2p_arch arch;
    int32_t n_vocab, n_ctx_train, n_embd, n_layer, n_ff;
    int32_t n_head, n_head_kv, head_dim;
    int32_t q_dim, kv_dim;       /* n_head·hd, n_head_kv·hd */
    float norm_eps;              /* RMSNorm (llama, qwen2) or LayerNorm (opt) epsilon */
    float rope_base;
    pbs2p_rope_scaling rope_scaling;
    float rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int32_t rope_orig_ctx;
    int32_t pos_offset;          /* opt: learned-position index offset */
    int32_t nm_m, block_size, format_version;
} pbs2p_config;

/* A weight matrix (R, K) used as y = W·x (+ b): sparse-binary, or dense F32 / F16 / Q8_0. */
typedef struct pbs2p_linear {
    int32_t n_out, n_in;
    int32_t is_sb;
    int32_t type;                /* ggml type of a dense weight, or PBS2P_SPEC_QTYPE_Q3 (a .q3 linear) */
    const void *w;               /* dense: (R, K) rows in the mapping */
    pbs2p_sb_weight sb;          /* sparse-binary: pointers into the mapping */
    float *bias;                 /* (R,) f32 copy, or NULL */
} pbs2p_linear;

/* An embedding-format matrix (rows, n_cols): Q8_0, F16 or F32, in the mapping. */
typedef struct pbs2p_emb {
    int32_t type, n_rows, n_cols;
    const uint8_t *data;
    uint64_t row_bytes;
} pbs2p_emb;

typedef struct pbs2p_layer_w {
    float *attn_norm, *attn_norm_b;   /* (n_embd,) f32 copies; _b: opt only */
    float *ffn_norm, *ffn_norm_b;
    pbs2p_linear wq, wk, wv, wo;      /* (q_dim, n_embd), (kv_dim, n_embd) ×2, (n_embd, q_dim) */
    pbs2p_linear w_gate, w_up, w_down;/* (n_ff, n_embd) ×2, (n_embd, n_ff); no gate for opt */
    int32_t nm_n;                     /* kept N of this block (M if dense, 0 if nm.m == 0) */
} pbs2p_layer_w;

struct pbs2p_model {
    pbs2p_file *file;
    pbs2p_tokenizer *tok;
    pbs2p_config cfg;
    pbs2p_emb tok_embd;          /* (n_vocab, n_embd) */
    pbs2p_emb pos_embd;          /* opt: (n_ctx_train + pos_offset, n_embd) */
    pbs2p_emb output;            /* (n_vocab, n_embd); == tok_embd when tied */
    float *out_norm, *out_norm_b;
    pbs2p_layer_w *layers;       /* n_layer */
    float *rope_inv_freq;        /* (head_dim/2,) as HF computes it, scaling applied */
    char *chat_template;         /* NUL-terminated copy, or NULL */
    pbs2p_model_info info;
};

/* The rendering families chat.c knows (detected from the template's markers). */
typedef enum pbs2p_chat_kind {
    PBS2P_CHAT_NONE = 0, PBS2P_CHAT_CHATML = 1, PBS2P_CHAT_LLAMA3 = 2, PBS2P_CHAT_LLAMA2 = 3
} pbs2p_chat_kind;
pbs2p_chat_kind pbs2p_chat_detect(const char *tmpl);

#endif

/* Model loading (bind + validate every tensor of docs/format.md) and the forward pass (batched prefill and
 * 1-token decode share one code path: every linear is one GEMM over the batch, rows split over threads). */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "format-spec.h"
#include "model.h"

#define MAX_EMBD 65536
#define MAX_FF (1 << 18)
#define MAX_LAYER 1024
#define MAX_HEAD 1024
#define MAX_HEAD_DIM 1024
#define MAX_VOCAB (1 << 22)
#define MAX_CTX (1 << 22)
#define MAX_TERMS PBS2P_SPEC_MAX_TERMS
#define MAX_SB_K PBS2P_SPEC_MAX_BLOCK_SIZE /* T·nb <= 4096 sums on the kernels' stack (kernels-ref.c) */
_Static_assert(PBS2P_FORMAT_VERSION == PBS2P_SPEC_FORMAT_VERSION, "pbs2p.h and format/spec.py disagree on the version");
_Static_assert(MAX_TERMS * (MAX_SB_K / PBS2P_SPEC_BLOCK_SIZE_MULTIPLE) <= 4096, "kernels' stack sums");
_Static_assert(GGML_TYPE_F32 == PBS2P_SPEC_TYPE_F32 && GGML_TYPE_F16 == PBS2P_SPEC_TYPE_F16 &&
                   GGML_TYPE_Q4_0 == PBS2P_SPEC_TYPE_Q4_0 && GGML_TYPE_Q8_0 == PBS2P_SPEC_TYPE_Q8_0 &&
                   GGML_TYPE_I8 == PBS2P_SPEC_TYPE_I8,
               "ggml type ids");

/* ---------------------------------------------------------------------------------------------------------
 * Loading */

/* pbs2p's Q3 block (docs/format.md "Q3 blocks") has no ggml type id: a linear stored as L.q3 (I8 bytes) gets this
 * internal type, outside ggml's range. */
#define TYPE_Q3 PBS2P_SPEC_QTYPE_Q3
/* Dense types whose input is quantized to Q8_0 blocks (their kernels share pbs2p_q8_act). */
static int q8_input(int32_t type) { return type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q4_0 || type == TYPE_Q3; }

static const char *type_name(int32_t t) {
    switch (t) {
    case GGML_TYPE_F32: return "F32";
    case GGML_TYPE_F16: return "F16";
    case GGML_TYPE_Q4_0: return "Q4_0";
    case GGML_TYPE_Q4_1: return "Q4_1";
    case GGML_TYPE_Q5_0: return "Q5_0";
    case GGML_TYPE_Q5_1: return "Q5_1";
    case GGML_TYPE_Q8_0: return "Q8_0";
    case GGML_TYPE_Q8_1: return "Q8_1";
    case GGML_TYPE_Q2_K: return "Q2_K";
    case GGML_TYPE_Q3_K: return "Q3_K";
    case GGML_TYPE_Q4_K: return "Q4_K";
    case GGML_TYPE_Q5_K: return "Q5_K";
    case GGML_TYPE_Q6_K: return "Q6_K";
    case GGML_TYPE_Q8_K: return "Q8_K";
    case GGML_TYPE_I8: return "I8";
    case GGML_TYPE_I16: return "I16";
    case GGML_TYPE_I32: return "I32";
    case GGML_TYPE_I64: return "I64";
    case GGML_TYPE_F64: return "F64";
    case GGML_TYPE_BF16: return "BF16";
    case GGML_TYPE_TQ1_0: return "TQ1_0";
    case GGML_TYPE_TQ2_0: return "TQ2_0";
    case TYPE_Q3: return "Q3 (pbs2p)";
    default: return "unknown";
    }
}

static int is_aligned(const void *p, uintptr_t a) { return ((uintptr_t)p & (a - 1)) == 0; }

/* Check a tensor's shape, numpy order (outermost first) as in docs/format.md. */
static pbs2p_status check_shape(const gguf_tensor *t, int n_dims, int64_t d0, int64_t d1, int64_t d2) {
    const int64_t want[3] = {d0, d1, d2};
    int ok = t->n_dims == n_dims;
    for (int i = 0; ok && i < n_dims; i++) ok = t->ne[n_dims - 1 - i] == want[i];
    if (ok) return PBS2P_OK;
    char got[96], exp[96];
    int n = 0, m = 0;
    for (int i = t->n_dims - 1; i >= 0; i--) n += snprintf(got + n, sizeof got - n, "%s%lld", i == t->n_dims - 1 ? "" : ", ", (long long)t->ne[i]);
    for (int i = 0; i < n_dims; i++) m += snprintf(exp + m, sizeof exp - m, "%s%lld", i ? ", " : "", (long long)want[i]);
    return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tensor %s has shape (%s), expected (%s)", t->name, got, exp);
}

static const gguf_tensor *find_tensor(const pbs2p_model *m, const char *name) {
    return pbs2p_gguf_find_tensor(m->file, name);
}

/* Copy a 1-D F32/F16 vector of n values (norm weights, biases). */
static pbs2p_status load_vec(const pbs2p_model *m, const char *name, int32_t n, int required, float **out) {
    *out = NULL;
    const gguf_tensor *t = find_tensor(m, name);
    if (!t) return required ? PBS2P_FAIL(PBS2P_ERR_FORMAT, "missing tensor %s", name) : PBS2P_OK;
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16)
        return PBS2P_FAIL(PBS2P_ERR_UNSUPPORTED, "tensor %s has type %s, expected F32", name, type_name(t->type));
    pbs2p_status st = check_shape(t, 1, n, 0, 0);
    if (st) return st;
    float *v = malloc((size_t)n * sizeof(float));
    if (!v) return PBS2P_FAIL(PBS2P_ERR_NOMEM, "cannot allocate %d floats for %s", n, name);
    for (int32_t i = 0; i < n; i++) {
        if (t->type == GGML_TYPE_F32) {
            memcpy(&v[i], t->data + (size_t)i * 4, 4);
        } else {
            uint16_t h;
            memcpy(&h, t->data + (size_t)i * 2, 2);
            v[i] = pbs2p_fp16_to_fp32(h);
        }
    }
    *out = v;
    return PBS2P_OK;
}

static pbs2p_status bind_emb(const pbs2p_model *m, const char *name, int64_t rows, int64_t cols, int required,
                             pbs2p_emb *e) {
    memset(e, 0, sizeof *e);
    const gguf_tensor *t = find_tensor(m, name);
    if (!t) return required ? PBS2P_FAIL(PBS2P_ERR_FORMAT, "missing tensor %s", name) : PBS2P_OK;
    if (t->type != GGML_TYPE_Q8_0 && t->type != GGML_TYPE_Q4_0 && t->type != GGML_TYPE_F16 &&
        t->type != GGML_TYPE_F32)
        return PBS2P_FAIL(PBS2P_ERR_UNSUPPORTED, "tensor %s has type %s (embeddings: Q8_0, Q4_0, F16 or F32)", name,
                          type_name(t->type));
    pbs2p_status st = check_shape(t, 2, rows, cols, 0);
    if (st) return st;
    e->type = t->type;
    e->n_rows = (int32_t)rows;
    e->n_cols = (int32_t)cols;
    e->data = t->data;
    const int quant = t->type == GGML_TYPE_Q8_0 || t->type == GGML_TYPE_Q4_0;
    if (quant && cols % 32 != 0)
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tensor %s: %s needs a row length multiple of 32, got %lld", name,
                          type_name(t->type), (long long)cols);
    e->row_bytes = quant ? (uint64_t)cols / 32 * (t->type == GGML_TYPE_Q8_0 ? 34 : 18)
                         : (uint64_t)cols * (t->type == GGML_TYPE_F16 ? 2 : 4);
    return PBS2P_OK;
}

/* The linear's N:M-code tensor prefix.nm<N>of<M> (docs/format.md "The N:M code"), or NULL; *n, *m its N and M.
 * More than one is refused. */
static pbs2p_status find_nm(const pbs2p_model *m, const char *prefix, const gguf_tensor **out, int32_t *n, int32_t *mm) {
    char name[96];
    *out = NULL;
    for (int32_t M = 4; M <= 8; M += 4)
        for (int32_t N = 1; N <= M; N++) {
            snprintf(name, sizeof name, "%s" PBS2P_SPEC_SUFFIX_NM "%dof%d", prefix, N, M);
            const gguf_tensor *t = find_tensor(m, name);
            if (!t) continue;
            if (*out)
                return PBS2P_FAIL(PBS2P_ERR_FORMAT, "linear %s has two N:M-code tensors (%s, %s)", prefix, (*out)->name,
                                  t->name);
            *out = t, *n = N, *mm = M;
        }
    return PBS2P_OK;
}

/* Bind linear `prefix` of shape (R, K): exactly one of prefix.weight (dense), prefix.q3 (Q3 blocks) or
 * .planes (or .nm<N>of<M>) with .alpha/.mu. */
static pbs2p_status bind_linear(pbs2p_model *m, const char *prefix, int32_t R, int32_t K, int need_bias,
                                pbs2p_linear *L) {
    char name[96];
    memset(L, 0, sizeof *L);
    L->n_out = R;
    L->n_in = K;
    snprintf(name, sizeof name, "%s.weight", prefix);
    const gguf_tensor *tw = find_tensor(m, name);
    snprintf(name, sizeof name, "%s" PBS2P_SPEC_SUFFIX_PLANES, prefix);
    const gguf_tensor *tp = find_tensor(m, name);
    snprintf(name, sizeof name, "%s" PBS2P_SPEC_SUFFIX_ALPHA, prefix);
    const gguf_tensor *ta = find_tensor(m, name);
    snprintf(name, sizeof name, "%s" PBS2P_SPEC_SUFFIX_MU, prefix);
    const gguf_tensor *tm = find_tensor(m, name);
    snprintf(name, sizeof name, "%s" PBS2P_SPEC_SUFFIX_Q3, prefix);
    const gguf_tensor *t3 = find_tensor(m, name);
    const gguf_tensor *tn;
    int32_t nm_n = 0, nm_m = 0;
    pbs2p_status st;
    if ((st = find_nm(m, prefix, &tn, &nm_n, &nm_m))) return st;
    if ((tw != NULL) + (t3 != NULL) + (tp || ta || tm || tn) > 1 || (tp && tn))
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, "linear %s is stored in more than one way (.weight, %s, .planes, %s<N>of<M>)",
                          prefix, PBS2P_SPEC_SUFFIX_Q3, PBS2P_SPEC_SUFFIX_NM);
    if (t3) {
        if (t3->type != GGML_TYPE_I8)
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tensor %s has type %s, expected I8 (Q3 block bytes)", t3->name,
                              type_name(t3->type));
        if (K % 32 != 0)
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "Q3 linear %s needs K %% 32 == 0, got K = %d", prefix, K);
        if ((st = check_shape(t3, 2, R, (int64_t)(K / 32) * PBS2P_SPEC_Q3_BYTES, 0))) return st;
        L->type = TYPE_Q3;
        L->w = t3->data;
        m->info.n_linear_bytes += (int64_t)t3->n_bytes;
        m->info.param_bits += (double)R * K * 3;
    } else if (tw) {
        if (tw->type != GGML_TYPE_F32 && tw->type != GGML_TYPE_F16 && tw->type != GGML_TYPE_Q8_0 &&
            tw->type != GGML_TYPE_Q4_0)
            return PBS2P_FAIL(PBS2P_ERR_UNSUPPORTED,
                              "tensor %s has type %s (dense linears: F32, F16, Q8_0 or Q4_0; Q3: .q3; sparse-binary: .planes)",
                              tw->name, type_name(tw->type));
        if ((st = check_shape(tw, 2, R, K, 0))) return st;
        if (tw->type == GGML_TYPE_F32 && !is_aligned(tw->data, 4))
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tensor %s: F32 data not 4-byte aligned", tw->name);
        if (tw->type == GGML_TYPE_F16 && !is_aligned(tw->data, 2))
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tensor %s: F16 data not 2-byte aligned", tw->name);
        L->type = tw->type;
        L->w = tw->data;
        m->info.n_linear_bytes += (int64_t)tw->n_bytes;
        m->info.param_bits += (double)R * K * (tw->type == GGML_TYPE_F32 ? 32 : tw->type == GGML_TYPE_F16 ? 16
                                               : tw->type == GGML_TYPE_Q8_0 ? 8 : 4);
    } else if (tp || ta || tm || tn) {
        if ((!tp && !tn) || !ta || !tm)
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "sparse-binary linear %s lacks its %s tensor", prefix,
                              !tp && !tn ? ".planes" : !ta ? ".alpha" : ".mu");
        if (K > MAX_SB_K)
            return PBS2P_FAIL(PBS2P_ERR_UNSUPPORTED, "sparse-binary linear %s has K = %d > %d", prefix, K, MAX_SB_K);
        const int32_t bs = m->cfg.block_size, W = (K + 63) / 64, nb = (K + bs - 1) / bs;
        const gguf_tensor *tb = tp ? tp : tn;
        if (tb->type != GGML_TYPE_I8)
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tensor %s has type %s, expected I8", tb->name, type_name(tb->type));
        if (ta->type != GGML_TYPE_F16)
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tensor %s has type %s, expected F16", ta->name, type_name(ta->type));
        if (tm->type != GGML_TYPE_F16)
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tensor %s has type %s, expected F16", tm->name, type_name(tm->type));
        if (ta->n_dims != 3)
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tensor %s has %d dims, expected 3 (R, T, nb)", ta->name, ta->n_dims);
        const int64_t T = ta->ne[1];
        if (T < 1 || T > MAX_TERMS)
            return PBS2P_FAIL(PBS2P_ERR_UNSUPPORTED, "tensor %s has T = %lld terms (supported: 1..%d)", ta->name,
                              (long long)T, MAX_TERMS);
        if ((st = check_shape(ta, 3, R, T, nb))) return st;
        if ((st = check_shape(tm, 2, R, nb, 0))) return st;
        if (tp) {
            if ((st = check_shape(tp, 2, R, T * 2 * W * 8, 0))) return st;
            if (!is_aligned(tp->data, 64))
                return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tensor %s: plane data not 64-byte aligned (offset %llu)", tp->name,
                                  (unsigned long long)tp->offset);
        } else {
            if (m->cfg.format_version < PBS2P_SPEC_NM_CODE_VERSION)
                return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tensor %s: the N:M code needs " PBS2P_SPEC_KEY_FORMAT_VERSION
                                  " >= %d, the file has %d", tn->name, PBS2P_SPEC_NM_CODE_VERSION, m->cfg.format_version);
            if (T != 1)
                return PBS2P_FAIL(PBS2P_ERR_FORMAT, "N:M-coded linear %s has T = %lld terms (the code holds one)", prefix,
                                  (long long)T);
            if (K % 64 != 0)
                return PBS2P_FAIL(PBS2P_ERR_FORMAT, "N:M-coded linear %s needs K %% 64 == 0, got K = %d", prefix, K);
            if ((st = check_shape(tn, 2, R, pbs2p_nm_row_bytes(K, nm_n, nm_m), 0))) return st;
        }
        if (!is_aligned(ta->data, 2) || !is_aligned(tm->data, 2))
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "linear %s: scale data not 2-byte aligned", prefix);
        L->is_sb = 1;
        L->sb = (pbs2p_sb_weight){.n_out = R, .n_in = K, .n_terms = (int32_t)T, .n_words = W, .n_blocks = nb,
                                  .block_words = bs / 64, .planes = tp ? (const uint64_t *)tp->data : NULL,
                                  .alpha = (const uint16_t *)ta->data, .mu = (const uint16_t *)tm->data};
        m->info.n_linear_bytes += (int64_t)(tb->n_bytes + ta->n_bytes + tm->n_bytes);
        if (tn) {
            L->sb.nm = tn->data;
            L->sb.nm_n = nm_n;
            L->sb.nm_m = nm_m;
            L->sb.nm_row_bytes = pbs2p_nm_row_bytes(K, nm_n, nm_m);
            const int64_t bad = pbs2p_nm_first_bad(&L->sb);
            if (bad >= 0)
                return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tensor %s: row %lld, group %lld has a pattern index >= C(%d,%d) = %d",
                                  tn->name, (long long)(bad / (K / nm_m)), (long long)(bad % (K / nm_m)), nm_m, nm_n,
                                  pbs2p_nm_patterns(nm_n, nm_m));
            m->info.param_bits += (double)R * (K / nm_m) * nm_n; /* one sign bit per kept weight */
        } else {
            /* parameter bits: one sign bit per kept weight of term 0 plus per set weight of residual terms */
            uint64_t bits = 0;
            for (int64_t i = 0; i < (int64_t)R * T * 2 * W; i++) bits += (uint64_t)__builtin_popcountll(L->sb.planes[i]);
            m->info.param_bits += (double)bits;
        }
    } else {
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, "missing linear %s (none of %s.weight, %s%s, %s.planes, %s%s<N>of<M>)", prefix,
                          prefix, prefix, PBS2P_SPEC_SUFFIX_Q3, prefix, prefix, PBS2P_SPEC_SUFFIX_NM);
    }
    m->info.n_linear_weights += (int64_t)R * K;
    snprintf(name, sizeof name, "%s.bias", prefix);
    if ((st = load_vec(m, name, R, need_bias, &L->bias))) return st;
    return PBS2P_OK;
}

static pbs2p_status get_u32_in(const pbs2p_file *f, const char *key, int required, uint32_t lo, uint32_t hi,
                               int32_t *out) {
    if (!required && !pbs2p_gguf_find_kv(f, key)) return PBS2P_OK;
    uint32_t v = 0;
    pbs2p_status st = pbs2p_gguf_get_u32(f, key, required, &v);
    if (st) return st;
    if (v < lo || v > hi) return PBS2P_FAIL(PBS2P_ERR_FORMAT, "%s = %u is out of range [%u, %u]", key, v, lo, hi);
    *out = (int32_t)v;
    return PBS2P_OK;
}

static pbs2p_status load_config(pbs2p_model *m) {
    const pbs2p_file *f = m->file;
    pbs2p_config *c = &m->cfg;
    pbs2p_status st;
    char key[128];
    gguf_str s;

    uint32_t version = 0;
    if (!pbs2p_gguf_find_kv(f, PBS2P_SPEC_KEY_FORMAT_VERSION))
        return PBS2P_FAIL(PBS2P_ERR_FORMAT,
                          "no " PBS2P_SPEC_KEY_FORMAT_VERSION " key: not a pbs2p model file (this runtime reads "
                          "versions %d..%d; a llama.cpp GGUF is not one)", PBS2P_SPEC_MIN_FORMAT_VERSION,
                          PBS2P_FORMAT_VERSION);
    if ((st = pbs2p_gguf_get_u32(f, PBS2P_SPEC_KEY_FORMAT_VERSION, 1, &version))) return st;
    if (version > PBS2P_FORMAT_VERSION)
        return PBS2P_FAIL(PBS2P_ERR_VERSION, "file has " PBS2P_SPEC_KEY_FORMAT_VERSION " %u, this runtime reads up to %d",
                          version, PBS2P_FORMAT_VERSION);
    if (version < PBS2P_SPEC_MIN_FORMAT_VERSION)
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, PBS2P_SPEC_KEY_FORMAT_VERSION " %u is invalid", version);
    c->format_version = (int32_t)version;

    /* docs/format.md: since version 2 general.architecture is "pbs2p-<family>" (so that other GGUF readers refuse
     * the file); version 1 used the bare family name. The architecture's keys are "<general.architecture>.<key>". */
    if ((st = pbs2p_gguf_get_str(f, PBS2P_SPEC_KEY_ARCHITECTURE, 1, &s))) return st;
    const size_t np = sizeof PBS2P_SPEC_ARCH_PREFIX - 1;
    const int prefixed = s.n > np && !memcmp(s.s, PBS2P_SPEC_ARCH_PREFIX, np);
    const gguf_str fam = prefixed ? (gguf_str){.s = s.s + np, .n = s.n - np} : s;
    if (prefixed != (version >= 2))
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, PBS2P_SPEC_KEY_ARCHITECTURE " '%.*s' in a file of format version %u (version "
                          "%s names the architecture %s)", (int)(s.n > 64 ? 64 : s.n), s.s, version,
                          version >= 2 ? ">= 2" : "1", version >= 2 ? PBS2P_SPEC_ARCH_PREFIX "<family>" : "<family>");
    const char *family;
    if (fam.n == 5 && !memcmp(fam.s, "llama", 5)) c->arch = PBS2P_ARCH_LLAMA, family = "llama";
    else if (fam.n == 5 && !memcmp(fam.s, "qwen2", 5)) c->arch = PBS2P_ARCH_QWEN2, family = "qwen2";
    else if (fam.n == 3 && !memcmp(fam.s, "opt", 3)) c->arch = PBS2P_ARCH_OPT, family = "opt";
    else
        return PBS2P_FAIL(PBS2P_ERR_UNSUPPORTED, "architecture '%.*s' is not supported (%sllama, %sqwen2, %sopt)",
                          (int)(s.n > 64 ? 64 : s.n), s.s, prefixed ? PBS2P_SPEC_ARCH_PREFIX : "",
                          prefixed ? PBS2P_SPEC_ARCH_PREFIX : "", prefixed ? PBS2P_SPEC_ARCH_PREFIX : "");
    char arch[32];
    snprintf(arch, sizeof arch, "%s%s", prefixed ? PBS2P_SPEC_ARCH_PREFIX : "", family);
    snprintf(m->info.arch, sizeof m->info.arch, "%s", family);

#define U32(suffix, req, lo, hi, dst)                                           \
    do {                                                                        \
        snprintf(key, sizeof key, "%s.%s", arch, suffix);                       \
        if ((st = get_u32_in(f, key, req, lo, hi, dst))) return st;             \
    } while (0)
    U32("context_length", 1, 1, MAX_CTX, &c->n_ctx_train);
    U32("embedding_length", 1, 1, MAX_EMBD, &c->n_embd);
    U32("block_count", 1, 1, MAX_LAYER, &c->n_layer);
    U32("feed_forward_length", 1, 1, MAX_FF, &c->n_ff);
    U32("attention.head_count", 1, 1, MAX_HEAD, &c->n_head);
    c->n_head_kv = c->n_head;
    U32("attention.head_count_kv", 0, 1, MAX_HEAD, &c->n_head_kv);
    if (c->n_head % c->n_head_kv != 0)
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, "n_head_kv = %d does not divide n_head = %d", c->n_head_kv, c->n_head);
    c->head_dim = 0;
    U32("attention.key_length", 0, 1, MAX_HEAD_DIM, &c->head_dim);
    if (c->head_dim == 0) {
        if (c->n_embd % c->n_head != 0)
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "n_head = %d does not divide n_embd = %d and no key_length is given",
                              c->n_head, c->n_embd);
        c->head_dim = c->n_embd / c->n_head;
        if (c->head_dim > MAX_HEAD_DIM)
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "head dim %d > %d", c->head_dim, MAX_HEAD_DIM);
    }
    c->q_dim = c->n_head * c->head_dim;
    c->kv_dim = c->n_head_kv * c->head_dim;
    if (c->q_dim > MAX_EMBD * 2)
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, "n_head·head_dim = %d is too large", c->q_dim);
    c->n_vocab = 0;
    U32("vocab_size", 0, 1, MAX_VOCAB, &c->n_vocab);

    if (c->arch == PBS2P_ARCH_OPT) {
        c->norm_eps = 1e-5f;
        snprintf(key, sizeof key, "%s.attention.layer_norm_epsilon", arch);
        if ((st = pbs2p_gguf_get_f32(f, key, 0, &c->norm_eps))) return st;
        c->pos_offset = 2;
        if ((st = get_u32_in(f, PBS2P_SPEC_KEY_POS_OFFSET, 0, 0, 1024, &c->pos_offset))) return st;
    } else {
        c->norm_eps = 1e-5f;
        snprintf(key, sizeof key, "%s.attention.layer_norm_rms_epsilon", arch);
        if ((st = pbs2p_gguf_get_f32(f, key, 0, &c->norm_eps))) return st;
        c->rope_base = 10000.0f;
        snprintf(key, sizeof key, "%s.rope.freq_base", arch);
        if ((st = pbs2p_gguf_get_f32(f, key, 0, &c->rope_base))) return st;
        if (!(c->rope_base > 1.0f) || !isfinite(c->rope_base))
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "%s = %g is invalid", key, (double)c->rope_base);
        int32_t rot = c->head_dim;
        U32("rope.dimension_count", 0, 1, MAX_HEAD_DIM, &rot);
        if (rot != c->head_dim)
            return PBS2P_FAIL(PBS2P_ERR_UNSUPPORTED, "partial rotary embedding (%d of %d dims) is not supported", rot,
                              c->head_dim);
        if (c->head_dim % 2 != 0) return PBS2P_FAIL(PBS2P_ERR_FORMAT, "odd head dim %d with RoPE", c->head_dim);
        snprintf(key, sizeof key, "%s.rope.scaling.type", arch);
        c->rope_scaling = PBS2P_ROPE_NONE;
        if (pbs2p_gguf_find_kv(f, key)) {
            if ((st = pbs2p_gguf_get_str(f, key, 1, &s))) return st;
            if (s.n == 4 && !memcmp(s.s, "none", 4)) c->rope_scaling = PBS2P_ROPE_NONE;
            else if (s.n == 6 && !memcmp(s.s, "linear", 6)) c->rope_scaling = PBS2P_ROPE_LINEAR;
            else if (s.n == 6 && !memcmp(s.s, "llama3", 6)) c->rope_scaling = PBS2P_ROPE_LLAMA3;
            else
                return PBS2P_FAIL(PBS2P_ERR_UNSUPPORTED, "%s = '%.*s' is not supported (none, linear, llama3)", key,
                                  (int)(s.n > 32 ? 32 : s.n), s.s);
        }
        if (c->rope_scaling != PBS2P_ROPE_NONE) {
            snprintf(key, sizeof key, "%s.rope.scaling.factor", arch);
            if ((st = pbs2p_gguf_get_f32(f, key, 1, &c->rope_factor))) return st;
            if (!(c->rope_factor > 0.0f) || !isfinite(c->rope_factor))
                return PBS2P_FAIL(PBS2P_ERR_FORMAT, "%s = %g is invalid", key, (double)c->rope_factor);
        }
        if (c->rope_scaling == PBS2P_ROPE_LLAMA3) {
            U32("rope.scaling.original_context_length", 1, 1, MAX_CTX, &c->rope_orig_ctx);
            c->rope_low_freq_factor = 1.0f;
            c->rope_high_freq_factor = 4.0f;
            snprintf(key, sizeof key, "%s.rope.scaling.low_freq_factor", arch);
            if ((st = pbs2p_gguf_get_f32(f, key, 0, &c->rope_low_freq_factor))) return st;
            snprintf(key, sizeof key, "%s.rope.scaling.high_freq_factor", arch);
            if ((st = pbs2p_gguf_get_f32(f, key, 0, &c->rope_high_freq_factor))) return st;
            if (!(c->rope_low_freq_factor > 0.0f) || !(c->rope_high_freq_factor > c->rope_low_freq_factor))
                return PBS2P_FAIL(PBS2P_ERR_FORMAT, "llama3 rope: need 0 < low_freq_factor (%g) < high_freq_factor (%g)",
                                  (double)c->rope_low_freq_factor, (double)c->rope_high_freq_factor);
        }
    }
    if (!(c->norm_eps > 0.0f) || !(c->norm_eps < 1.0f))
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, "norm epsilon %g is out of range (0, 1)", (double)c->norm_eps);
#undef U32

    c->block_size = PBS2P_SPEC_DEFAULT_BLOCK_SIZE;
    if ((st = get_u32_in(f, PBS2P_SPEC_KEY_BLOCK_SIZE, 0, PBS2P_SPEC_BLOCK_SIZE_MULTIPLE, MAX_SB_K, &c->block_size)))
        return st;
    if (c->block_size % PBS2P_SPEC_BLOCK_SIZE_MULTIPLE != 0)
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, PBS2P_SPEC_KEY_BLOCK_SIZE " = %d is not a multiple of %d", c->block_size,
                          PBS2P_SPEC_BLOCK_SIZE_MULTIPLE);
    c->nm_m = 0;
    if ((st = get_u32_in(f, PBS2P_SPEC_KEY_NM_M, 0, 0, 64, &c->nm_m))) return st;
    if (c->nm_m != 0 && !PBS2P_SPEC_M_ALLOWED(c->nm_m))
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, PBS2P_SPEC_KEY_NM_M " = %d: must be 0 (nothing pruned) or one of "
                          PBS2P_SPEC_M_ALLOWED_STR, c->nm_m);
    if ((st = pbs2p_gguf_get_str(f, PBS2P_SPEC_KEY_METHOD, 0, &s))) return st;
    if (pbs2p_gguf_find_kv(f, PBS2P_SPEC_KEY_METHOD))
        snprintf(m->info.method, sizeof m->info.method, "%.*s", (int)(s.n > 31 ? 31 : s.n), s.s);
    return PBS2P_OK;
}

/* inv_freq[i] = base^(-2i/hd), then rope scaling, exactly as HF's _compute_*_parameters (float32 tensors). */
static pbs2p_status init_rope(pbs2p_model *m) {
    const pbs2p_config *c = &m->cfg;
    const int32_t half = c->head_dim / 2;
    m->rope_inv_freq = malloc((size_t)half * sizeof(float));
    if (!m->rope_inv_freq) return PBS2P_FAIL(PBS2P_ERR_NOMEM, "cannot allocate %d rope frequencies", half);
    for (int32_t i = 0; i < half; i++) {
        float e = (float)(2 * i) / (float)c->head_dim;
        float f = 1.0f / powf(c->rope_base, e);
        if (c->rope_scaling == PBS2P_ROPE_LINEAR) {
            f = f / c->rope_factor;
        } else if (c->rope_scaling == PBS2P_ROPE_LLAMA3) {
            const float low_wl = (float)c->rope_orig_ctx / c->rope_low_freq_factor;
            const float high_wl = (float)c->rope_orig_ctx / c->rope_high_freq_factor;
            const float wl = 2.0f * 3.14159265358979323846f / f;
            float g = wl > low_wl ? f / c->rope_factor : f;
            if (!(wl < high_wl) && !(wl > low_wl)) {
                float smooth = ((float)c->rope_orig_ctx / wl - c->rope_low_freq_factor) /
                               (c->rope_high_freq_factor - c->rope_low_freq_factor);
                g = (1.0f - smooth) * g / c->rope_factor + smooth * g;
            }
            f = g;
        }
        m->rope_inv_freq[i] = f;
    }
    return PBS2P_OK;
}

static pbs2p_status load_weights(pbs2p_model *m) {
    pbs2p_config *c = &m->cfg;
    pbs2p_status st;
    const gguf_tensor *te = find_tensor(m, "token_embd.weight");
    if (!te) return PBS2P_FAIL(PBS2P_ERR_FORMAT, "missing tensor token_embd.weight");
    if (te->n_dims != 2) return PBS2P_FAIL(PBS2P_ERR_FORMAT, "token_embd.weight has %d dims, expected 2", te->n_dims);
    if (c->n_vocab == 0) {
        if (te->ne[1] > MAX_VOCAB) return PBS2P_FAIL(PBS2P_ERR_FORMAT, "vocabulary of %lld tokens is too large", (long long)te->ne[1]);
        c->n_vocab = (int32_t)te->ne[1];
    }
    if (te->ne[1] != c->n_vocab)
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, "vocab_size = %d but token_embd.weight has %lld rows", c->n_vocab,
                          (long long)te->ne[1]);
    if ((st = bind_emb(m, "token_embd.weight", c->n_vocab, c->n_embd, 1, &m->tok_embd))) return st;
    if ((st = bind_emb(m, "output.weight", c->n_vocab, c->n_embd, 0, &m->output))) return st;
    if (!m->output.data) m->output = m->tok_embd; /* tied */
    if (c->arch == PBS2P_ARCH_OPT) {
        const gguf_tensor *tp = find_tensor(m, "position_embd.weight");
        if (!tp) return PBS2P_FAIL(PBS2P_ERR_FORMAT, "missing tensor position_embd.weight");
        if ((int64_t)c->n_ctx_train + c->pos_offset > MAX_CTX)
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "context_length %d is too large", c->n_ctx_train);
        if ((st = bind_emb(m, "position_embd.weight", (int64_t)c->n_ctx_train + c->pos_offset, c->n_embd, 1,
                           &m->pos_embd)))
            return st;
    }
    const int opt = c->arch == PBS2P_ARCH_OPT;
    if ((st = load_vec(m, "output_norm.weight", c->n_embd, 1, &m->out_norm))) return st;
    if ((st = load_vec(m, "output_norm.bias", c->n_embd, opt, &m->out_norm_b))) return st;

    const gguf_kv *nm_n = NULL;
    if ((st = pbs2p_gguf_get_arr(m->file, PBS2P_SPEC_KEY_NM_N, c->nm_m > 0, GGUF_TYPE_UINT32, c->n_layer, &nm_n)))
        return st;
    m->layers = calloc((size_t)c->n_layer, sizeof *m->layers);
    if (!m->layers) return PBS2P_FAIL(PBS2P_ERR_NOMEM, "cannot allocate %d layers", c->n_layer);
    for (int32_t i = 0; i < c->n_layer; i++) {
        pbs2p_layer_w *l = &m->layers[i];
        char p[64];
        l->nm_n = c->nm_m;
        if (nm_n) {
            /* docs/format.md: 1 <= N <= M; with M = 0 (no layer pruned) every entry is 0 */
            int64_t n = pbs2p_gguf_arr_i64(nm_n, (uint64_t)i);
            if (c->nm_m == 0 ? n != 0 : (n < 1 || n > c->nm_m))
                return PBS2P_FAIL(PBS2P_ERR_FORMAT, "pbs2p.nm.n[%d] = %lld is out of range [%d, %d]", i, (long long)n,
                                  c->nm_m ? 1 : 0, c->nm_m);
            l->nm_n = (int32_t)n;
        }
#define VEC(field, suffix, req)                                              \
        snprintf(p, sizeof p, "blk.%d.%s", i, suffix);                       \
        if ((st = load_vec(m, p, c->n_embd, req, &l->field))) return st;
#define LIN(field, suffix, R, K, bias)                                       \
        snprintf(p, sizeof p, "blk.%d.%s", i, suffix);                       \
        if ((st = bind_linear(m, p, R, K, bias, &l->field))) return st;
        VEC(attn_norm, "attn_norm.weight", 1);
        VEC(attn_norm_b, "attn_norm.bias", opt);
        VEC(ffn_norm, "ffn_norm.weight", 1);
        VEC(ffn_norm_b, "ffn_norm.bias", opt);
        const int qkv_bias = opt || c->arch == PBS2P_ARCH_QWEN2;
        LIN(wq, "attn_q", c->q_dim, c->n_embd, qkv_bias);
        LIN(wk, "attn_k", c->kv_dim, c->n_embd, qkv_bias);
        LIN(wv, "attn_v", c->kv_dim, c->n_embd, qkv_bias);
        LIN(wo, "attn_output", c->n_embd, c->q_dim, opt);
        if (!opt) {
            LIN(w_gate, "ffn_gate", c->n_ff, c->n_embd, 0);
        }
        LIN(w_up, "ffn_up", c->n_ff, c->n_embd, opt);
        LIN(w_down, "ffn_down", c->n_embd, c->n_ff, opt);
#undef VEC
#undef LIN
    }
    return PBS2P_OK;
}

void pbs2p_model_free(pbs2p_model *m) {
    if (!m) return;
    if (m->layers) {
        for (int32_t i = 0; i < m->cfg.n_layer; i++) {
            pbs2p_layer_w *l = &m->layers[i];
            free(l->attn_norm), free(l->attn_norm_b), free(l->ffn_norm), free(l->ffn_norm_b);
            pbs2p_linear *lins[] = {&l->wq, &l->wk, &l->wv, &l->wo, &l->w_gate, &l->w_up, &l->w_down};
            for (size_t j = 0; j < sizeof lins / sizeof *lins; j++) free(lins[j]->bias);
        }
        free(m->layers);
    }
    free(m->out_norm);
    free(m->out_norm_b);
    free(m->rope_inv_freq);
    free(m->chat_template);
    if (m->tok) pbs2p_tokenizer_free(m->tok);
    if (m->file) pbs2p_file_close(m->file);
    free(m);
}

pbs2p_status pbs2p_model_load(const char *path, pbs2p_model **out) {
    if (!out) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "out is NULL");
    *out = NULL;
    if (!path) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "path is NULL");
    pbs2p_model *m = calloc(1, sizeof *m);
    if (!m) return PBS2P_FAIL(PBS2P_ERR_NOMEM, "cannot allocate the model");
    pbs2p_status st = pbs2p_file_open(path, &m->file);
    if (!st) st = load_config(m);
    if (!st) st = load_weights(m);
    if (!st && m->cfg.arch != PBS2P_ARCH_OPT) st = init_rope(m);
    if (!st) st = pbs2p_tokenizer_load(m->file, &m->tok);
    if (!st && pbs2p_tokenizer_n_vocab(m->tok) != m->cfg.n_vocab)
        st = PBS2P_FAIL(PBS2P_ERR_FORMAT, "tokenizer has %d tokens but the model %d", pbs2p_tokenizer_n_vocab(m->tok),
                        m->cfg.n_vocab);
    if (!st && pbs2p_gguf_find_kv(m->file, "tokenizer.chat_template")) {
        gguf_str s;
        st = pbs2p_gguf_get_str(m->file, "tokenizer.chat_template", 1, &s);
        if (!st && !(m->chat_template = malloc(s.n + 1)))
            st = PBS2P_FAIL(PBS2P_ERR_NOMEM, "cannot copy the chat template (%llu bytes)", (unsigned long long)s.n);
        if (!st) {
            memcpy(m->chat_template, s.s, s.n);
            m->chat_template[s.n] = '\0';
        }
    }
    if (st) {
        pbs2p_model_free(m);
        return st;
    }
    const pbs2p_config *c = &m->cfg;
    pbs2p_model_info *in = &m->info;
    in->n_vocab = c->n_vocab, in->n_ctx_train = c->n_ctx_train, in->n_embd = c->n_embd;
    in->n_layer = c->n_layer, in->n_head = c->n_head, in->n_head_kv = c->n_head_kv;
    in->head_dim = c->head_dim, in->n_ff = c->n_ff, in->nm_m = c->nm_m, in->block_size = c->block_size;
    in->format_version = c->format_version;
    in->file_size = (int64_t)m->file->size;
    if (in->n_linear_weights > 0) {
        in->storage_bpw = 8.0 * (double)in->n_linear_bytes / (double)in->n_linear_weights;
        in->param_bits = in->param_bits / (double)in->n_linear_weights;
    }
    *out = m;
    return PBS2P_OK;
}

pbs2p_status pbs2p_model_get_info(const pbs2p_model *m, pbs2p_model_info *info) {
    if (!m || !info) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "model or info is NULL");
    *info = m->info;
    return PBS2P_OK;
}

const pbs2p_file *pbs2p_model_file(const pbs2p_model *m) { return m ? m->file : NULL; }

int32_t pbs2p_model_layer_n(const pbs2p_model *m, int32_t layer) {
    if (!m || layer < 0 || layer >= m->cfg.n_layer) return -1;
    return m->layers[layer].nm_n;
}

/* ---- tokens: delegate to the tokenizer ---- */

int32_t pbs2p_token_bos(const pbs2p_model *m) { return m ? pbs2p_tokenizer_bos(m->tok) : -1; }
int32_t pbs2p_token_eos(const pbs2p_model *m) { return m ? pbs2p_tokenizer_eos(m->tok) : -1; }
int32_t pbs2p_token_is_eog(const pbs2p_model *m, int32_t token) {
    return m ? pbs2p_tokenizer_is_eog(m->tok, token) : 0;
}

pbs2p_status pbs2p_tokenize(const pbs2p_model *m, const char *text, size_t len, int32_t add_special,
                            int32_t parse_special, int32_t *out, int32_t cap, int32_t *n_out) {
    if (!m || !n_out || (!text && len > 0) || (!out && cap > 0) || cap < 0)
        return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "NULL model/text/out/n_out or negative cap (%d)", cap);
    return pbs2p_tokenizer_encode(m->tok, text, len, add_special, parse_special, out, cap, n_out);
}

pbs2p_status pbs2p_token_to_piece(const pbs2p_model *m, int32_t token, int32_t render_special, char *buf,
                                  int32_t cap, int32_t *n_out) {
    if (!m || !n_out || (!buf && cap > 0) || cap < 0)
        return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "NULL model/buf/n_out or negative cap (%d)", cap);
    return pbs2p_tokenizer_piece(m->tok, token, render_special, buf, cap, n_out);
}

/* ---------------------------------------------------------------------------------------------------------
 * Context: run state */

struct pbs2p_ctx {
    const pbs2p_model *model;
    pbs2p_pool *pool;
    const pbs2p_kernels *kern;
    int32_t n_ctx, n_batch, n_threads, kv_f16;
    int32_t n_past;
    atomic_int abort_flag;
    atomic_int busy;
    /* activations, [n_batch][dim] */
    float *x;       /* residual stream (n_embd) */
    float *xb;      /* normed input (n_embd) */
    float *xb2;     /* a linear's output added to the residual (n_embd) */
    float *q, *k, *v; /* (q_dim), (kv_dim), (kv_dim) */
    float *att_out; /* (q_dim) */
    float *hb, *hb2; /* (n_ff) */
    float *att;     /* [n_threads][n_ctx] attention scores */
    void *act_mem;  /* sparse-binary quantized activations, max over K */
    pbs2p_sb_act act;
    int8_t *q8_q;   /* Q8_0 activations [n_batch][max K] */
    float *q8_d;
    void *kc, *vc;  /* [n_layer][n_ctx][kv_dim], f32 or f16 */
};

pbs2p_ctx_params pbs2p_ctx_default_params(void) {
    return (pbs2p_ctx_params){.n_ctx = 0, .n_threads = 0, .n_batch = 64, .kv_f16 = 0};
}

static void *alloc64(size_t n) {
    n = (n + 63) & ~(size_t)63;
    return aligned_alloc(64, n ? n : 64);
}

void pbs2p_ctx_free(pbs2p_ctx *ctx) {
    if (!ctx) return;
    if (ctx->pool) pbs2p_pool_free(ctx->pool);
    void *bufs[] = {ctx->x, ctx->xb, ctx->xb2, ctx->q, ctx->k, ctx->v, ctx->att_out, ctx->hb, ctx->hb2,
                    ctx->att, ctx->act_mem, ctx->q8_q, ctx->q8_d, ctx->kc, ctx->vc};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
    free(ctx);
}

pbs2p_status pbs2p_ctx_init(const pbs2p_model *model, const pbs2p_ctx_params *params, pbs2p_ctx **out) {
    if (!out) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "out is NULL");
    *out = NULL;
    if (!model) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "model is NULL");
    pbs2p_ctx_params p = params ? *params : pbs2p_ctx_default_params();
    const pbs2p_config *c = &model->cfg;
    if (p.n_ctx < 0 || p.n_ctx > MAX_CTX) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "n_ctx = %d is out of range", p.n_ctx);
    if (p.n_ctx == 0) p.n_ctx = c->n_ctx_train < 4096 ? c->n_ctx_train : 4096;
    if (c->arch == PBS2P_ARCH_OPT && p.n_ctx > c->n_ctx_train)
        return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "n_ctx = %d exceeds OPT's %d learned positions", p.n_ctx,
                          c->n_ctx_train);
    if (p.n_threads < 0 || p.n_threads > 1024)
        return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "n_threads = %d is out of range [0, 1024]", p.n_threads);
    if (p.n_threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        p.n_threads = n > 0 ? (int32_t)(n > 256 ? 256 : n) : 1;
    }
    if (p.n_batch == 0) p.n_batch = 64;
    if (p.n_batch < 0 || p.n_batch > 4096)
        return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "n_batch = %d is out of range [1, 4096]", p.n_batch);
    if (p.n_batch > p.n_ctx) p.n_batch = p.n_ctx;

    pbs2p_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return PBS2P_FAIL(PBS2P_ERR_NOMEM, "cannot allocate the context");
    ctx->model = model;
    ctx->n_ctx = p.n_ctx;
    ctx->n_batch = p.n_batch;
    ctx->n_threads = p.n_threads;
    ctx->kv_f16 = p.kv_f16 != 0;
    ctx->kern = pbs2p_kernels_get();
    atomic_init(&ctx->abort_flag, 0);
    atomic_init(&ctx->busy, 0);
    pbs2p_status st = pbs2p_pool_create(p.n_threads, &ctx->pool);
    if (st) {
        pbs2p_ctx_free(ctx);
        return st;
    }
    const size_t B = (size_t)p.n_batch, E = (size_t)c->n_embd, F = (size_t)c->n_ff, f4 = sizeof(float);
    int32_t kmax = c->n_embd > c->n_ff ? c->n_embd : c->n_ff;
    if (c->q_dim > kmax) kmax = c->q_dim;
    const size_t kv_elems = (size_t)c->n_layer * (size_t)p.n_ctx * (size_t)c->kv_dim;
    const size_t kv_bytes = kv_elems * (ctx->kv_f16 ? 2 : 4);
    if (kv_elems / (size_t)p.n_ctx / (size_t)c->n_layer != (size_t)c->kv_dim) {
        pbs2p_ctx_free(ctx);
        return PBS2P_FAIL(PBS2P_ERR_NOMEM, "KV cache size overflows");
    }
    ctx->x = alloc64(B * E * f4);
    ctx->xb = alloc64(B * E * f4);
    ctx->xb2 = alloc64(B * E * f4);
    ctx->q = alloc64(B * (size_t)c->q_dim * f4);
    ctx->k = alloc64(B * (size_t)c->kv_dim * f4);
    ctx->v = alloc64(B * (size_t)c->kv_dim * f4);
    ctx->att_out = alloc64(B * (size_t)c->q_dim * f4);
    ctx->hb = alloc64(B * F * f4);
    ctx->hb2 = alloc64(B * F * f4);
    ctx->att = alloc64((size_t)p.n_threads * (size_t)p.n_ctx * f4);
    ctx->act_mem = alloc64(pbs2p_sb_act_bytes(p.n_batch, kmax, c->block_size));
    ctx->q8_q = alloc64(B * (size_t)kmax);
    ctx->q8_d = alloc64(B * ((size_t)kmax / 32 + 1) * f4);
    ctx->kc = alloc64(kv_bytes);
    ctx->vc = alloc64(kv_bytes);
    if (!ctx->x || !ctx->xb || !ctx->xb2 || !ctx->q || !ctx->k || !ctx->v || !ctx->att_out || !ctx->hb ||
        !ctx->hb2 || !ctx->att || !ctx->act_mem || !ctx->q8_q || !ctx->q8_d || !ctx->kc || !ctx->vc) {
        pbs2p_ctx_free(ctx);
        return PBS2P_FAIL(PBS2P_ERR_NOMEM, "cannot allocate the run state (KV cache %zu bytes, n_ctx %d)",
                          2 * kv_bytes, p.n_ctx);
    }
    *out = ctx;
    return PBS2P_OK;
}

int32_t pbs2p_ctx_n_ctx(const pbs2p_ctx *ctx) { return ctx ? ctx->n_ctx : 0; }
int32_t pbs2p_ctx_n_past(const pbs2p_ctx *ctx) { return ctx ? ctx->n_past : 0; }

pbs2p_status pbs2p_ctx_truncate(pbs2p_ctx *ctx, int32_t n_keep) {
    if (!ctx) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "ctx is NULL");
    if (n_keep < 0) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "n_keep = %d is negative", n_keep);
    if (atomic_exchange(&ctx->busy, 1)) return PBS2P_FAIL(PBS2P_ERR_BUSY, "context is in use by another call");
    if (n_keep < ctx->n_past) ctx->n_past = n_keep;
    atomic_store(&ctx->busy, 0);
    return PBS2P_OK;
}

void pbs2p_ctx_abort(pbs2p_ctx *ctx) {
    if (ctx) atomic_store(&ctx->abort_flag, 1);
}

/* ---------------------------------------------------------------------------------------------------------
 * Forward pass */

static void range_split(int32_t n, int32_t ith, int32_t nth, int32_t *a, int32_t *b) {
    *a = (int32_t)((int64_t)n * ith / nth);
    *b = (int32_t)((int64_t)n * (ith + 1) / nth);
}

typedef struct quant_task {
    pbs2p_sb_quantize_fn quantize;
    pbs2p_sb_act *act;
    const float *x;
    int32_t K, n_tok;
} quant_task;

static void quant_fn(void *arg, int32_t ith, int32_t nth) {
    quant_task *t = arg;
    int32_t a, b;
    range_split(t->n_tok, ith, nth, &a, &b);
    if (a < b) t->quantize(t->act, t->x, t->K, a, b);
}

/* Quantize x [n_tok][K] for the sparse-binary linears of input size K (once per distinct input). */
static void quantize_input(pbs2p_ctx *ctx, const float *x, int32_t K, int32_t n_tok) {
    pbs2p_sb_act_init(&ctx->act, ctx->act_mem, n_tok, K, ctx->model->cfg.block_size);
    quant_task t = {pbs2p_sb_quantizer(ctx->kern), &ctx->act, x, K, n_tok};
    if (n_tok == 1) quant_fn(&t, 0, 1);
    else pbs2p_pool_run(ctx->pool, quant_fn, &t);
}

typedef struct matmul_task {
    const pbs2p_ctx *ctx;
    const pbs2p_linear *L;
    const float *x;   /* [n_tok][K] f32 input (dense path) */
    float *y;         /* [n_tok][R] */
    int32_t n_tok;
} matmul_task;

static float dot_f32(const float *a, const float *b, int32_t n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

static float dot_f16(const uint16_t *w, const float *x, int32_t n) {
    float s = 0;
    for (int32_t i = 0; i < n; i++) s += pbs2p_fp16_to_fp32(w[i]) * x[i];
    return s;
}

static void matmul_fn(void *arg, int32_t ith, int32_t nth) {
    const matmul_task *t = arg;
    const pbs2p_linear *L = t->L;
    const int32_t R = L->n_out, K = L->n_in;
    int32_t r0, r1;
    range_split(R, ith, nth, &r0, &r1);
    if (r0 >= r1) return;
    if (L->is_sb) {
        pbs2p_sb_gemm_any(t->ctx->kern, &L->sb, &t->ctx->act, t->y, R, r0, r1);
    } else if (q8_input(L->type)) {
        pbs2p_q8_act a = {.n_tok = t->n_tok, .n_blocks = K / 32, .q = t->ctx->q8_q, .d = t->ctx->q8_d};
        const pbs2p_kernels *k = t->ctx->kern;
        (L->type == GGML_TYPE_Q8_0 ? k->q8_gemm : L->type == GGML_TYPE_Q4_0 ? k->q4_gemm : k->q3_gemm)(L->w, K, &a, t->y,
                                                                                                   R, r0, r1);
    } else if (L->type == GGML_TYPE_F16) {
        const uint16_t *w = L->w;
        for (int32_t r = r0; r < r1; r++)
            for (int32_t i = 0; i < t->n_tok; i++) t->y[(size_t)i * R + r] = dot_f16(w + (size_t)r * K, t->x + (size_t)i * K, K);
    } else {
        const float *w = L->w;
        for (int32_t r = r0; r < r1; r++)
            for (int32_t i = 0; i < t->n_tok; i++) t->y[(size_t)i * R + r] = dot_f32(w + (size_t)r * K, t->x + (size_t)i * K, K);
    }
    if (L->bias)
        for (int32_t i = 0; i < t->n_tok; i++)
            for (int32_t r = r0; r < r1; r++) t->y[(size_t)i * R + r] += L->bias[r];
}

/* Q8_0, Q4_0 and Q3 weights (dense linears, output head) take their input quantized to Q8_0 blocks in q8_q / q8_d. */
static void q8_quantize(pbs2p_ctx *ctx, const float *x, int32_t K, int32_t n_tok) {
    pbs2p_q8_act a = {.n_tok = n_tok, .n_blocks = K / 32, .q = ctx->q8_q, .d = ctx->q8_d};
    pbs2p_q8_quantize_ref(&a, x, K, 0, n_tok);
}

/* y [n_tok][R] = L(x). `prepared`: x was already quantized for L's kind (shared q/k/v, gate/up inputs). */
static void linear(pbs2p_ctx *ctx, const pbs2p_linear *L, const float *x, float *y, int32_t n_tok, int prepared) {
    if (!prepared) {
        if (L->is_sb) quantize_input(ctx, x, L->n_in, n_tok);
        else if (q8_input(L->type)) q8_quantize(ctx, x, L->n_in, n_tok);
    }
    matmul_task t = {ctx, L, x, y, n_tok};
    pbs2p_pool_run(ctx->pool, matmul_fn, &t);
}

/* Can `b` reuse the quantized input prepared for `a` (same input vector)? */
static int same_quant(const pbs2p_linear *a, const pbs2p_linear *b) {
    if (a->is_sb != b->is_sb) return 0;
    if (a->is_sb) return 1;
    return q8_input(a->type) && q8_input(b->type);  /* both read the same Q8_0-quantized input */
}

static void rmsnorm(float *o, const float *x, const float *w, int32_t n, float eps) {
    float ss = 0.0f;
    for (int32_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int32_t i = 0; i < n; i++) o[i] = w[i] * (x[i] * r);
}

static void layernorm(float *o, const float *x, const float *w, const float *b, int32_t n, float eps) {
    float mean = 0.0f, var = 0.0f;
    for (int32_t i = 0; i < n; i++) mean += x[i];
    mean /= (float)n;
    for (int32_t i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= (float)n;
    const float r = 1.0f / sqrtf(var + eps);
    for (int32_t i = 0; i < n; i++) o[i] = (x[i] - mean) * r * w[i] + b[i];
}

static void norm(const pbs2p_model *m, float *o, const float *x, const float *w, const float *b) {
    if (m->cfg.arch == PBS2P_ARCH_OPT) layernorm(o, x, w, b, m->cfg.n_embd, m->cfg.norm_eps);
    else rmsnorm(o, x, w, m->cfg.n_embd, m->cfg.norm_eps);
}

/* HF rotate_half on one head: pairs (i, i + hd/2). */
static void rope_head(float *v, int32_t hd, const float *cs, const float *sn) {
    const int32_t half = hd / 2;
    for (int32_t i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
    }
}

static void emb_row(const pbs2p_emb *e, int32_t row, float *out) {
    const uint8_t *p = e->data + (size_t)row * e->row_bytes;
    if (e->type == GGML_TYPE_F32) {
        memcpy(out, p, (size_t)e->n_cols * 4);
    } else if (e->type == GGML_TYPE_F16) {
        for (int32_t i = 0; i < e->n_cols; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            out[i] = pbs2p_fp16_to_fp32(h);
        }
    } else if (e->type == GGML_TYPE_Q4_0) {
        for (int32_t b = 0; b < e->n_cols / 32; b++) {
            uint16_t dh;
            memcpy(&dh, p + 18 * b, 2);
            const float d = pbs2p_fp16_to_fp32(dh);
            const uint8_t *q = p + 18 * b + 2;
            for (int j = 0; j < 16; j++) {
                out[b * 32 + j] = d * (float)((int32_t)(q[j] & 15) - 8);
                out[b * 32 + j + 16] = d * (float)((int32_t)(q[j] >> 4) - 8);
            }
        }
    } else {
        for (int32_t b = 0; b < e->n_cols / 32; b++) {
            uint16_t dh;
            memcpy(&dh, p + 34 * b, 2);
            const float d = pbs2p_fp16_to_fp32(dh);
            const int8_t *q = (const int8_t *)(p + 34 * b + 2);
            for (int j = 0; j < 32; j++) out[b * 32 + j] = d * (float)q[j];
        }
    }
}

static float kv_get(const pbs2p_ctx *ctx, const void *cache, size_t i) {
    return ctx->kv_f16 ? pbs2p_fp16_to_fp32(((const uint16_t *)cache)[i]) : ((const float *)cache)[i];
}

static void kv_put(const pbs2p_ctx *ctx, void *cache, size_t i, const float *src, int32_t n) {
    if (ctx->kv_f16)
        for (int32_t j = 0; j < n; j++) ((uint16_t *)cache)[i + j] = pbs2p_fp32_to_fp16(src[j]);
    else
        memcpy((float *)cache + i, src, (size_t)n * sizeof(float));
}

typedef struct attn_task {
    pbs2p_ctx *ctx;
    int32_t layer, n_tok, pos0;
} attn_task;

/* q·k over one head: 16 independent lanes (then a fixed tree), a shape the compiler vectorizes to the widest
 * registers of each attn_fn clone; the order is fixed in the source, so every clone gives the same result. */
static inline float dot_head(const float *a, const float *b, int32_t n) {
    float acc[16] = {0};
    int32_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    for (; i < n; i++) acc[i & 15] += a[i] * b[i];
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    return acc[0];
}

/* Attention was ~40 % of a 512-token SmolLM2 prefill with the baseline x86-64 (SSE2) code; on x86 Linux with
 * GCC it is compiled for AVX-512 and AVX2 too and picked at load time (ifunc). */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define ATTN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ATTN_CLONES
#endif

/* Causal attention for (token, head) pairs split across threads; token i sits at position pos0 + i. */
ATTN_CLONES static void attn_fn(void *arg, int32_t ith, int32_t nth) {
    const attn_task *t = arg;
    pbs2p_ctx *ctx = t->ctx;
    const pbs2p_config *c = &ctx->model->cfg;
    const int32_t hd = c->head_dim, kv_mul = c->n_head / c->n_head_kv;
    const float scale = 1.0f / sqrtf((float)hd);
    float *att = ctx->att + (size_t)ith * ctx->n_ctx;
    const size_t lbase = (size_t)t->layer * ctx->n_ctx * c->kv_dim;
    /* (token, head) pairs dealt round-robin: causal rows grow with the token, so contiguous ranges would give
     * the last thread ~3x the first one's work in a long prefill */
    for (int32_t th = ith; th < t->n_tok * c->n_head; th += nth) {
        const int32_t i = th / c->n_head, h = th % c->n_head, pos = t->pos0 + i, kvh = h / kv_mul;
        const float *q = ctx->q + (size_t)i * c->q_dim + (size_t)h * hd;
        float mx = -INFINITY;
        for (int32_t p = 0; p <= pos; p++) {
            const size_t off = lbase + (size_t)p * c->kv_dim + (size_t)kvh * hd;
            float s = 0.0f;
            if (ctx->kv_f16) {
                for (int32_t d = 0; d < hd; d++) s += q[d] * kv_get(ctx, ctx->kc, off + d);
            } else {
                s = dot_head(q, (const float *)ctx->kc + off, hd);
            }
            s *= scale;
            att[p] = s;
            if (s > mx) mx = s;
        }
        float sum = 0.0f;
        for (int32_t p = 0; p <= pos; p++) {
            att[p] = expf(att[p] - mx);
            sum += att[p];
        }
        float *o = ctx->att_out + (size_t)i * c->q_dim + (size_t)h * hd;
        memset(o, 0, (size_t)hd * sizeof(float));
        const float inv = 1.0f / sum;
        for (int32_t p = 0; p <= pos; p++) {
            const float w = att[p] * inv;
            const size_t off = lbase + (size_t)p * c->kv_dim + (size_t)kvh * hd;
            if (ctx->kv_f16) {
                for (int32_t d = 0; d < hd; d++) o[d] += w * kv_get(ctx, ctx->vc, off + d);
            } else {
                const float *v = (const float *)ctx->vc + off;
                for (int32_t d = 0; d < hd; d++) o[d] += w * v[d];
            }
        }
    }
}

typedef struct head_task {
    pbs2p_ctx *ctx;
    const float *x;   /* [n_tok][n_embd] normed */
    float *logits;    /* [n_tok][n_vocab] */
    int32_t n_tok;
} head_task;

static void head_fn(void *arg, int32_t ith, int32_t nth) {
    const head_task *t = arg;
    const pbs2p_model *m = t->ctx->model;
    const pbs2p_emb *e = &m->output;
    const int32_t V = e->n_rows, E = e->n_cols;
    int32_t r0, r1;
    range_split(V, ith, nth, &r0, &r1);
    if (r0 >= r1) return;
    if (e->type == GGML_TYPE_Q8_0 || e->type == GGML_TYPE_Q4_0) {
        pbs2p_q8_act a = {.n_tok = t->n_tok, .n_blocks = E / 32, .q = t->ctx->q8_q, .d = t->ctx->q8_d};
        (e->type == GGML_TYPE_Q8_0 ? t->ctx->kern->q8_gemm : t->ctx->kern->q4_gemm)(e->data, E, &a, t->logits, V,
                                                                                    r0, r1);
    } else {
        for (int32_t r = r0; r < r1; r++)
            for (int32_t i = 0; i < t->n_tok; i++) {
                const float *x = t->x + (size_t)i * E;
                t->logits[(size_t)i * V + r] =
                    e->type == GGML_TYPE_F32
                        ? dot_f32((const float *)(const void *)(e->data + (size_t)r * e->row_bytes), x, E)
                        : dot_f16((const uint16_t *)(const void *)(e->data + (size_t)r * e->row_bytes), x, E);
            }
    }
}

/* One batch of n_tok tokens at positions ctx->n_past..; logits: NULL, or [n_out][n_vocab] for the last n_out
 * tokens of the batch. Returns ABORTED (KV of this batch not committed) when the abort flag is seen. */
static pbs2p_status forward_batch(pbs2p_ctx *ctx, const int32_t *tokens, int32_t n_tok, float *logits, int32_t n_out) {
    const pbs2p_model *m = ctx->model;
    const pbs2p_config *c = &m->cfg;
    const int32_t E = c->n_embd, pos0 = ctx->n_past, hd = c->head_dim;
    const int opt = c->arch == PBS2P_ARCH_OPT;
    float cs[MAX_HEAD_DIM / 2], sn[MAX_HEAD_DIM / 2];

    for (int32_t i = 0; i < n_tok; i++) {
        float *x = ctx->x + (size_t)i * E;
        emb_row(&m->tok_embd, tokens[i], x);
        if (opt) {
            emb_row(&m->pos_embd, pos0 + i + c->pos_offset, ctx->xb);
            for (int32_t j = 0; j < E; j++) x[j] += ctx->xb[j];
        }
    }
    for (int32_t l = 0; l < c->n_layer; l++) {
        if (atomic_load(&ctx->abort_flag)) return PBS2P_FAIL(PBS2P_ERR_ABORTED, "aborted before layer %d", l);
        const pbs2p_layer_w *w = &m->layers[l];
        for (int32_t i = 0; i < n_tok; i++)
            norm(m, ctx->xb + (size_t)i * E, ctx->x + (size_t)i * E, w->attn_norm, w->attn_norm_b);
        linear(ctx, &w->wq, ctx->xb, ctx->q, n_tok, 0);
        linear(ctx, &w->wk, ctx->xb, ctx->k, n_tok, same_quant(&w->wq, &w->wk));
        linear(ctx, &w->wv, ctx->xb, ctx->v, n_tok, same_quant(&w->wk, &w->wv));
        for (int32_t i = 0; i < n_tok; i++) {
            float *q = ctx->q + (size_t)i * c->q_dim, *k = ctx->k + (size_t)i * c->kv_dim;
            if (!opt) {
                const float pos = (float)(pos0 + i);
                for (int32_t j = 0; j < hd / 2; j++) {
                    const float ang = pos * m->rope_inv_freq[j];
                    cs[j] = cosf(ang);
                    sn[j] = sinf(ang);
                }
                for (int32_t h = 0; h < c->n_head; h++) rope_head(q + (size_t)h * hd, hd, cs, sn);
                for (int32_t h = 0; h < c->n_head_kv; h++) rope_head(k + (size_t)h * hd, hd, cs, sn);
            }
            const size_t off = ((size_t)l * ctx->n_ctx + (size_t)(pos0 + i)) * c->kv_dim;
            kv_put(ctx, ctx->kc, off, k, c->kv_dim);
            kv_put(ctx, ctx->vc, off, ctx->v + (size_t)i * c->kv_dim, c->kv_dim);
        }
        attn_task at = {ctx, l, n_tok, pos0};
        pbs2p_pool_run(ctx->pool, attn_fn, &at);
        linear(ctx, &w->wo, ctx->att_out, ctx->xb2, n_tok, 0);
        for (size_t i = 0; i < (size_t)n_tok * E; i++) ctx->x[i] += ctx->xb2[i];

        for (int32_t i = 0; i < n_tok; i++)
            norm(m, ctx->xb + (size_t)i * E, ctx->x + (size_t)i * E, w->ffn_norm, w->ffn_norm_b);
        const size_t nf = (size_t)n_tok * c->n_ff;
        if (opt) {
            linear(ctx, &w->w_up, ctx->xb, ctx->hb, n_tok, 0);
            for (size_t i = 0; i < nf; i++) ctx->hb[i] = ctx->hb[i] > 0.0f ? ctx->hb[i] : 0.0f;
        } else {
            linear(ctx, &w->w_gate, ctx->xb, ctx->hb, n_tok, 0);
            linear(ctx, &w->w_up, ctx->xb, ctx->hb2, n_tok, same_quant(&w->w_gate, &w->w_up));
            for (size_t i = 0; i < nf; i++) {
                const float g = ctx->hb[i];
                ctx->hb[i] = g / (1.0f + expf(-g)) * ctx->hb2[i];
            }
        }
        linear(ctx, &w->w_down, ctx->hb, ctx->xb2, n_tok, 0);
        for (size_t i = 0; i < (size_t)n_tok * E; i++) ctx->x[i] += ctx->xb2[i];
    }
    if (logits && n_out > 0) {
        const int32_t first = n_tok - n_out;
        for (int32_t i = 0; i < n_out; i++)
            norm(m, ctx->xb + (size_t)i * E, ctx->x + (size_t)(first + i) * E, m->out_norm, m->out_norm_b);
        if (m->output.type == GGML_TYPE_Q8_0 || m->output.type == GGML_TYPE_Q4_0) q8_quantize(ctx, ctx->xb, E, n_out);
        head_task ht = {ctx, ctx->xb, logits, n_out};
        pbs2p_pool_run(ctx->pool, head_fn, &ht);
    }
    return PBS2P_OK;
}

pbs2p_status pbs2p_eval(pbs2p_ctx *ctx, const int32_t *tokens, int32_t n, float *logits, int32_t all_logits) {
    if (!ctx || !tokens) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "ctx or tokens is NULL");
    if (n < 1) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "n = %d tokens, need >= 1", n);
    const int32_t V = ctx->model->cfg.n_vocab;
    for (int32_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "token %d at index %d is out of range [0, %d)", tokens[i], i, V);
    if (atomic_exchange(&ctx->busy, 1)) return PBS2P_FAIL(PBS2P_ERR_BUSY, "context is in use by another call");
    if ((int64_t)ctx->n_past + n > ctx->n_ctx) {
        atomic_store(&ctx->busy, 0);
        return PBS2P_FAIL(PBS2P_ERR_CONTEXT_FULL, "%d tokens at position %d do not fit in the context of %d", n,
                          ctx->n_past, ctx->n_ctx);
    }
    atomic_store(&ctx->abort_flag, 0);
    pbs2p_status st = PBS2P_OK;
    for (int32_t i0 = 0; i0 < n && !st; i0 += ctx->n_batch) {
        const int32_t nt = n - i0 < ctx->n_batch ? n - i0 : ctx->n_batch;
        float *lg = NULL;
        int32_t n_out = 0;
        if (logits && all_logits) {
            lg = logits + (size_t)i0 * V;
            n_out = nt;
        } else if (logits && i0 + nt == n) {
            lg = logits;
            n_out = 1;
        }
        st = forward_batch(ctx, tokens + i0, nt, lg, n_out);
        if (!st) ctx->n_past += nt;
    }
    atomic_store(&ctx->busy, 0);
    return st;
}

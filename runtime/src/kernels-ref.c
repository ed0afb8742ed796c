/* Scalar reference kernels: the definition every SIMD path is tested against (docs/format.md). */
#include <math.h>
#include <string.h>

#include "common.h"
#include "kernels.h"

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

size_t pbs2p_sb_act_bytes(int32_t n_tok, int32_t K, int32_t block_size) {
    size_t W = (size_t)(K + 63) / 64, nb = (size_t)(K + block_size - 1) / (size_t)block_size;
    return align64((size_t)n_tok * W * 64) + align64((size_t)n_tok * nb * sizeof(float)) +
           align64((size_t)n_tok * W * 8 * sizeof(uint64_t));
}

void pbs2p_sb_act_init(pbs2p_sb_act *act, void *mem, int32_t n_tok, int32_t K, int32_t block_size) {
    int32_t W = (K + 63) / 64, nb = (K + block_size - 1) / block_size;
    uint8_t *p = mem;
    act->n_tok = n_tok;
    act->n_words = W;
    act->n_blocks = nb;
    act->block_words = block_size / 64;
    act->q = (int8_t *)p;
    p += align64((size_t)n_tok * W * 64);
    act->scale = (float *)p;
    p += align64((size_t)n_tok * nb * sizeof(float));
    act->xplanes = (uint64_t *)p;
}

/* amax/127 scale and roundf(x·127/amax): shared by the sparse-binary and Q8 quantizers. */
static void quantize_block(const float *x, int32_t n, int8_t *q, float *scale) {
    float amax = 0.0f;
    for (int32_t j = 0; j < n; j++) {
        float a = fabsf(x[j]);
        if (a > amax) amax = a;
    }
    if (!(amax > 0.0f) || !isfinite(amax)) {
        /* zero block (non-finite input is mapped to zero too: never UB in the float->int cast) */
        memset(q, 0, (size_t)n);
        *scale = 0.0f;
        return;
    }
    float inv = 127.0f / amax;
    for (int32_t j = 0; j < n; j++) {
        float v = roundf(x[j] * inv);
        if (v > 127.0f) v = 127.0f;
        if (v < -127.0f) v = -127.0f;
        if (v != v) v = 0.0f; /* 0·inf when 127/amax overflows (subnormal amax): x = 0 still gives q = 0 */
        q[j] = (int8_t)v;
    }
    *scale = amax / 127.0f;
}

void pbs2p_sb_quantize_ref(pbs2p_sb_act *act, const float *x, int32_t K, int32_t t0, int32_t t1) {
    const int32_t W = act->n_words, nb = act->n_blocks, bs = act->block_words * 64;
    for (int32_t t = t0; t < t1; t++) {
        const float *xt = x + (size_t)t * K;
        int8_t *q = act->q + (size_t)t * W * 64;
        float *s = act->scale + (size_t)t * nb;
        memset(q, 0, (size_t)W * 64);
        for (int32_t b = 0; b < nb; b++) {
            int32_t j0 = b * bs, n = K - j0 < bs ? K - j0 : bs;
            quantize_block(xt + j0, n, q + j0, &s[b]);
        }
        /* bit-plane k of u = q + 128: word w, bit j <- bit k of u[64w + j] (padding q = 0 -> u = 128) */
        uint64_t *xp = act->xplanes + (size_t)t * W * 8;
        for (int32_t w = 0; w < W; w++) {
            uint64_t planes[8] = {0};
            for (int32_t j = 0; j < 64; j++) {
                uint32_t u = (uint32_t)((int32_t)q[w * 64 + j] + 128);
                for (int k = 0; k < 8; k++) planes[k] |= (uint64_t)((u >> k) & 1u) << j;
            }
            memcpy(xp + (size_t)w * 8, planes, sizeof planes);
        }
    }
}

float pbs2p_sb_combine_row(const pbs2p_sb_weight *w, int32_t row, const int32_t *spos, const int32_t *sneg,
                           const float *xs) {
    const int32_t T = w->n_terms, nb = w->n_blocks;
    const uint16_t *alpha = w->alpha + (size_t)row * T * nb, *mu = w->mu + (size_t)row * nb;
    float acc = 0.0f;
    for (int32_t b = 0; b < nb; b++) {
        float s = 0.0f;
        for (int32_t t = 0; t < T; t++) {
            float a = pbs2p_fp16_to_fp32(alpha[t * nb + b]);
            float d = (float)(spos[t * nb + b] - sneg[t * nb + b]);
            float ad = a * d;
            s = s + ad;
        }
        float m = pbs2p_fp16_to_fp32(mu[b]) * (float)(spos[b] + sneg[b]);
        s = s + m;
        float contrib = xs[b] * s;
        acc = acc + contrib;
    }
    return acc;
}

/* Σ_{j∈P} q_j for one 64-bit weight word P: Σ_k 2^k·popcount(X_k & P) − 128·popcount(P). */
static inline int32_t word_sum(const uint64_t *xp, uint64_t P) {
    int32_t s = 0;
    for (int k = 0; k < 8; k++) s += (int32_t)__builtin_popcountll(xp[k] & P) << k;
    return s - 128 * (int32_t)__builtin_popcountll(P);
}

void pbs2p_sb_row_sums_ref(const pbs2p_sb_weight *w, int32_t row, const pbs2p_sb_act *act, int32_t tok,
                           int32_t *spos, int32_t *sneg) {
    const int32_t T = w->n_terms, W = w->n_words, nb = w->n_blocks, bw = w->block_words;
    const uint64_t *xp = act->xplanes + (size_t)tok * W * 8;
    for (int32_t t = 0; t < T; t++) {
        const uint64_t *pos = w->planes + ((size_t)row * T + t) * 2 * W, *neg = pos + W;
        for (int32_t b = 0; b < nb; b++) {
            int32_t sp = 0, sn = 0;
            for (int32_t i = b * bw; i < W && i < (b + 1) * bw; i++) {
                sp += word_sum(xp + (size_t)i * 8, pos[i]);
                sn += word_sum(xp + (size_t)i * 8, neg[i]);
            }
            spos[t * nb + b] = sp;
            sneg[t * nb + b] = sn;
        }
    }
}

/* Largest T·nb the stack buffers below hold: T <= 4 terms, K <= 65536 at bs = 64 (checked at load). */
#define SB_MAX_SUMS 4096

void pbs2p_sb_sums_ref(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t *sums, int32_t r0, int32_t r1) {
    const int32_t TB = w->n_terms * w->n_blocks;
    for (int32_t t = 0; t < act->n_tok; t++)
        for (int32_t r = r0; r < r1; r++) {
            int32_t *s = sums + (((size_t)t * (r1 - r0) + (r - r0)) * 2) * TB;
            pbs2p_sb_row_sums_ref(w, r, act, t, s, s + TB);
        }
}

void pbs2p_sb_gemm_ref(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y, int64_t ldy,
                       int32_t r0, int32_t r1) {
    int32_t spos[SB_MAX_SUMS], sneg[SB_MAX_SUMS];
    for (int32_t t = 0; t < act->n_tok; t++) {
        const float *xs = act->scale + (size_t)t * act->n_blocks;
        for (int32_t r = r0; r < r1; r++) {
            pbs2p_sb_row_sums_ref(w, r, act, t, spos, sneg);
            y[t * ldy + r] = pbs2p_sb_combine_row(w, r, spos, sneg, xs);
        }
    }
}

void pbs2p_q8_quantize_ref(pbs2p_q8_act *act, const float *x, int32_t K, int32_t t0, int32_t t1) {
    const int32_t nb = K / 32;
    for (int32_t t = t0; t < t1; t++)
        for (int32_t b = 0; b < nb; b++)
            quantize_block(x + (size_t)t * K + b * 32, 32, act->q + (size_t)t * K + b * 32,
                           &act->d[(size_t)t * nb + b]);
}

/* Integer dot product of one weight block's payload with 32 int8 activations. */
typedef int32_t (*block_dot_fn)(const uint8_t *payload, const int8_t *x);

/* ggml Q8_0 block: f16 d, then 32 int8 (34 bytes). */
static int32_t q8_block_dot(const uint8_t *payload, const int8_t *x) {
    const int8_t *wq = (const int8_t *)payload;
    int32_t s = 0;
    for (int j = 0; j < 32; j++) s += (int32_t)wq[j] * (int32_t)x[j];
    return s;
}

/* ggml Q4_0 block: f16 d, then 16 bytes: element j < 16 = low nibble of byte j, element j + 16 = high nibble. */
static int32_t q4_block_dot(const uint8_t *qs, const int8_t *x) {
    int32_t s = 0;
    for (int j = 0; j < 16; j++)
        s += ((int32_t)(qs[j] & 15) - 8) * (int32_t)x[j] + ((int32_t)(qs[j] >> 4) - 8) * (int32_t)x[j + 16];
    return s;
}

/* Q3 block (pbs2p's): f16 d, then qs[8] (low 2 bits of element j in bits 2·(j/8).. of byte j % 8), then qh[4]
   (high bit of element j = bit j % 8 of byte j / 8); value d·(q − 4), q in 0..7. */
static int32_t q3_block_dot(const uint8_t *p, const int8_t *x) {
    int32_t s = 0;
    for (int j = 0; j < 32; j++) {
        const int32_t q = ((p[j % 8] >> (2 * (j / 8))) & 3) | (((p[8 + j / 8] >> (j % 8)) & 1) << 2);
        s += (q - 4) * (int32_t)x[j];
    }
    return s;
}

/* y[t, r] = Σ_b f16(d_w[r, b])·d_x[t, b] · dot_b, summed over blocks in order, for rows of `bytes`-byte blocks
   (a 2-byte f16 scale, then the payload). The SIMD kernels reproduce this float order exactly. */
static void q_gemm_ref(const uint8_t *w, int32_t K, const pbs2p_q8_act *act, float *y, int64_t ldy, int32_t r0,
                       int32_t r1, int32_t bytes, block_dot_fn dot) {
    const int32_t nb = K / 32;
    for (int32_t t = 0; t < act->n_tok; t++) {
        const int8_t *xq = act->q + (size_t)t * K;
        const float *xd = act->d + (size_t)t * nb;
        for (int32_t r = r0; r < r1; r++) {
            const uint8_t *row = w + (size_t)r * nb * bytes;
            float acc = 0.0f;
            for (int32_t b = 0; b < nb; b++) {
                uint16_t dh;
                memcpy(&dh, row + b * bytes, 2);
                const int32_t s = dot(row + b * bytes + 2, xq + b * 32);
                float dd = pbs2p_fp16_to_fp32(dh) * xd[b];
                float c = dd * (float)s;
                acc = acc + c;
            }
            y[t * ldy + r] = acc;
        }
    }
}

void pbs2p_q8_gemm_ref(const uint8_t *w, int32_t K, const pbs2p_q8_act *act, float *y, int64_t ldy,
                       int32_t r0, int32_t r1) {
    q_gemm_ref(w, K, act, y, ldy, r0, r1, 34, q8_block_dot);
}

void pbs2p_q4_gemm_ref(const uint8_t *w, int32_t K, const pbs2p_q8_act *act, float *y, int64_t ldy,
                       int32_t r0, int32_t r1) {
    q_gemm_ref(w, K, act, y, ldy, r0, r1, 18, q4_block_dot);
}

void pbs2p_q3_gemm_ref(const uint8_t *w, int32_t K, const pbs2p_q8_act *act, float *y, int64_t ldy,
                       int32_t r0, int32_t r1) {
    q_gemm_ref(w, K, act, y, ldy, r0, r1, 14, q3_block_dot);
}

const pbs2p_kernels pbs2p_kernels_ref = {"scalar", pbs2p_sb_gemm_ref, pbs2p_sb_sums_ref, pbs2p_q8_gemm_ref,
                                         pbs2p_q4_gemm_ref, pbs2p_q3_gemm_ref};

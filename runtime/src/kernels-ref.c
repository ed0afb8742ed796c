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

/* ------------------------------------------------------------------ the N:M code ----------------------------
 * docs/format.md "The N:M code": a row is K/M pattern indices of pb bits (a little-endian bit string; index i is
 * the i-th M-bit mask with N bits set, ascending), then one sign bit per kept weight in column order (1: pos). */

#include <pthread.h>

/* masks[m / 4 - 1][n][i]: the i-th M-bit mask of popcount n; spread[off[m/4-1][n] + i·2^n + s]: the pos bits of
 * pattern i when its kept columns, in ascending order, take the n sign bits of s (bit j: j-th kept column). */
static uint8_t nm_masks[2][9][70];
static int32_t nm_count[2][9];
static uint8_t nm_spread[6560 + 80];
static int32_t nm_off[2][9];
static pthread_once_t nm_once = PTHREAD_ONCE_INIT;

static void nm_init(void) {
    int32_t off = 0;
    for (int32_t mi = 0; mi < 2; mi++) {
        const int32_t m = 4 * (mi + 1);
        for (int32_t n = 1; n <= m; n++) {
            int32_t c = 0;
            for (int32_t x = 0; x < (1 << m); x++)
                if (__builtin_popcount((unsigned)x) == n) nm_masks[mi][n][c++] = (uint8_t)x;
            nm_count[mi][n] = c;
            nm_off[mi][n] = off;
            for (int32_t i = 0; i < c; i++)
                for (int32_t s = 0; s < (1 << n); s++) {
                    uint8_t pos = 0;
                    int32_t j = 0;
                    for (int32_t col = 0; col < m; col++)
                        if ((nm_masks[mi][n][i] >> col) & 1) pos |= (uint8_t)(((s >> j++) & 1) << col);
                    nm_spread[off + i * (1 << n) + s] = pos;
                }
            off += c << n;
        }
    }
}

int32_t pbs2p_nm_patterns(int32_t n, int32_t m) {
    pthread_once(&nm_once, nm_init);
    return (m == 4 || m == 8) && n >= 1 && n <= m ? nm_count[m / 4 - 1][n] : 0;
}

const uint8_t *pbs2p_nm_masks(int32_t n, int32_t m) {
    pthread_once(&nm_once, nm_init);
    return nm_masks[m / 4 - 1][n];
}

int32_t pbs2p_nm_pattern_bits(int32_t n, int32_t m) {
    int32_t c = pbs2p_nm_patterns(n, m), b = 0;
    while ((1 << b) < c) b++;
    return b;
}

int32_t pbs2p_nm_row_bytes(int32_t K, int32_t n, int32_t m) {
    return K / m * pbs2p_nm_pattern_bits(n, m) / 8 + K / m * n / 8;
}

/* nbits (<= 8) bits of the bit string p starting at bit `bit`. */
static uint32_t get_bits(const uint8_t *p, int64_t bit, int32_t nbits) {
    uint32_t v = 0;
    for (int32_t b = 0; b < nbits; b++) v |= (uint32_t)((p[(bit + b) >> 3] >> ((bit + b) & 7)) & 1) << b;
    return v;
}

int64_t pbs2p_nm_first_bad(const pbs2p_sb_weight *w) {
    const int32_t n = w->nm_n, m = w->nm_m, G = w->n_in / m, pb = pbs2p_nm_pattern_bits(n, m);
    const uint32_t c = (uint32_t)pbs2p_nm_patterns(n, m);
    if (pb == 0) return -1;
    for (int32_t r = 0; r < w->n_out; r++) {
        const uint8_t *row = w->nm + (size_t)r * w->nm_row_bytes;
        for (int32_t g = 0; g < G; g++) {
            /* pb <= 7: the index lies in bytes bit/8 and bit/8 + 1 (the latter inside the row: signs follow) */
            const int64_t bit = (int64_t)g * pb;
            const uint32_t v = ((uint32_t)row[bit >> 3] | (uint32_t)row[(bit >> 3) + 1] << 8) >> (bit & 7);
            if ((v & ((1u << pb) - 1)) >= c) return (int64_t)r * G + g;
        }
    }
    return -1;
}

void pbs2p_nm_decode_ref(const pbs2p_sb_weight *w, int32_t r0, int32_t r1, uint64_t *out) {
    pthread_once(&nm_once, nm_init);
    const int32_t n = w->nm_n, m = w->nm_m, K = w->n_in, W = w->n_words, G = K / m;
    const int32_t pb = pbs2p_nm_pattern_bits(n, m), c = pbs2p_nm_patterns(n, m);
    const uint8_t *masks = nm_masks[m / 4 - 1][n];
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = w->nm + (size_t)r * w->nm_row_bytes, *signs = row + (size_t)G * pb / 8;
        uint64_t *pos = out + (size_t)(r - r0) * 2 * W, *neg = pos + W;
        memset(pos, 0, (size_t)2 * W * sizeof *pos);
        int64_t sbit = 0;
        for (int32_t g = 0; g < G; g++) {
            const uint32_t idx = get_bits(row, (int64_t)g * pb, pb);
            const uint32_t mask = idx < (uint32_t)c ? masks[idx] : 0; /* invalid: refused at load, never read OOB */
            for (int32_t col = 0; col < m; col++) {
                if (!((mask >> col) & 1)) continue;
                const int32_t j = g * m + col;
                uint64_t *plane = get_bits(signs, sbit++, 1) ? pos : neg;
                plane[j >> 6] |= (uint64_t)1 << (j & 63);
            }
        }
    }
}

/* n <= 8 bytes at p as a little-endian integer; never reads at or past end. */
static inline uint64_t load_le(const uint8_t *p, int32_t n, const uint8_t *end) {
    uint64_t v = 0;
    if (end - p >= 8) {
        memcpy(&v, p, 8);
        return n == 8 ? v : v & (((uint64_t)1 << (8 * n)) - 1);
    }
    for (int32_t i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

void pbs2p_nm_decode_lut(const pbs2p_sb_weight *w, int32_t r0, int32_t r1, uint64_t *out) {
    pthread_once(&nm_once, nm_init);
    const int32_t n = w->nm_n, m = w->nm_m, W = w->n_words, gw = 64 / m; /* groups per word */
    const int32_t pb = pbs2p_nm_pattern_bits(n, m), c = pbs2p_nm_patterns(n, m);
    const int32_t pbw = gw * pb / 8, sbw = gw * n / 8; /* pattern and sign bytes per word */
    const uint8_t *masks = nm_masks[m / 4 - 1][n], *spread = nm_spread + nm_off[m / 4 - 1][n];
    const uint8_t *end = w->nm + (size_t)w->n_out * w->nm_row_bytes;
    const uint64_t pmask = ((uint64_t)1 << pb) - 1, smask = ((uint64_t)1 << n) - 1;
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = w->nm + (size_t)r * w->nm_row_bytes, *signs = row + (size_t)W * pbw;
        uint64_t *pos = out + (size_t)(r - r0) * 2 * W, *neg = pos + W;
        if (pb == 0) { /* N = M: every weight kept, the signs are the pos plane */
            for (int32_t i = 0; i < W; i++) {
                pos[i] = load_le(signs + (size_t)i * 8, 8, end);
                neg[i] = ~pos[i];
            }
            continue;
        }
        for (int32_t i = 0; i < W; i++) {
            uint64_t pf = load_le(row + (size_t)i * pbw, pbw, end);
            uint64_t sf = load_le(signs + (size_t)i * sbw, sbw, end);
            uint64_t kept = 0, p = 0;
            for (int32_t g = 0; g < gw; g++) {
                uint32_t idx = (uint32_t)(pf & pmask);
                if (idx >= (uint32_t)c) idx = 0; /* refused at load; stay in bounds */
                kept |= (uint64_t)masks[idx] << (g * m);
                p |= (uint64_t)spread[(idx << n) + (uint32_t)(sf & smask)] << (g * m);
                pf >>= pb;
                sf >>= n;
            }
            pos[i] = p;
            neg[i] = kept & ~p;
        }
    }
}

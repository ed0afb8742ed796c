/* Every kernel this CPU runs against the scalar reference: integer sums equal and float outputs
 * bit-identical (memcmp) over awkward shapes, N:M masks, residual terms, block sizes and row ranges; a one-hot
 * test pinning the bit order; the quantizer against hand-computed values. PBS2P_TEST_QUICK (and ARM builds,
 * which CI runs under qemu) use a smaller set of shapes. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"

#include "test-util.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}
static float rng_unit(void) { return (float)(rng() >> 40) / (float)(1u << 24); } /* [0, 1) */

/* A random finite f16 of magnitude ~2^-10 .. 2^5, either sign. */
static uint16_t rand_f16(void) {
    uint16_t sign = (uint16_t)((rng() & 1) << 15), exp = (uint16_t)(5 + rng() % 16), man = (uint16_t)(rng() & 0x3ff);
    return (uint16_t)(sign | exp << 10 | man);
}

static void *xalloc(size_t n) {
    void *p = aligned_alloc(64, (n + 63) & ~(size_t)63);
    if (p == NULL) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    memset(p, 0, n);
    return p;
}

typedef struct sb_case {
    pbs2p_sb_weight w;
    uint64_t *planes;
    uint16_t *alpha, *mu;
} sb_case;

/* Random N:M masks along the input dimension (N random per group), random signs; terms >= 1 are random
 * signed subsets of the kept set. Padding bits (columns >= K) stay 0. */
static void make_weight(sb_case *c, int32_t R, int32_t K, int32_t T, int32_t bs, int32_t M) {
    const int32_t W = (K + 63) / 64, nb = (K + bs - 1) / bs;
    c->planes = xalloc((size_t)R * T * 2 * W * 8);
    c->alpha = xalloc((size_t)R * T * nb * 2);
    c->mu = xalloc((size_t)R * nb * 2);
    for (int32_t r = 0; r < R; r++) {
        uint64_t *row = c->planes + (size_t)r * T * 2 * W;
        for (int32_t g = 0; g < K / M; g++) {
            int32_t n_keep = (int32_t)(rng() % (uint64_t)(M + 1)), kept = 0;
            for (int32_t j = g * M; j < g * M + M; j++) {
                int32_t left = g * M + M - j;
                if ((int32_t)(rng() % (uint64_t)left) >= n_keep - kept) continue;
                kept++;
                for (int32_t t = 0; t < T; t++) {
                    if (t > 0 && (rng() & 1)) continue;
                    int32_t neg = (int32_t)(rng() & 1);
                    row[((size_t)t * 2 + neg) * W + j / 64] |= 1ull << (j % 64);
                }
            }
        }
    }
    for (size_t i = 0; i < (size_t)R * T * nb; i++) c->alpha[i] = rand_f16();
    for (size_t i = 0; i < (size_t)R * nb; i++) c->mu[i] = rand_f16();
    c->w = (pbs2p_sb_weight){R, K, T, W, nb, bs / 64, c->planes, c->alpha, c->mu, NULL, 0, 0, 0};
}

static void free_weight(sb_case *c) {
    free(c->planes);
    free(c->alpha);
    free(c->mu);
}

/* Activations with magnitudes varying per block over 1e-3 .. 1e3, and one all-zero block if nb > 1. */
static float *make_x(int32_t n_tok, int32_t K, int32_t bs) {
    float *x = xalloc((size_t)n_tok * K * sizeof(float));
    for (int32_t t = 0; t < n_tok; t++)
        for (int32_t j0 = 0; j0 < K; j0 += bs) {
            float mag = powf(10.0f, rng_unit() * 6.0f - 3.0f);
            int zero = (K > bs) && (j0 / bs == 1) && (t % 2 == 0);
            for (int32_t j = j0; j < K && j < j0 + bs; j++)
                x[(size_t)t * K + j] = zero ? 0.0f : (rng_unit() * 2.0f - 1.0f) * mag;
        }
    return x;
}

/* Every SIMD table name (popcount and expand families); the ones this CPU lacks are skipped. */
static const char *const *simd_names = pbs2p_kernel_names + 1;
static int n_simd(void) {
    int n = 0;
    while (simd_names[n] != NULL) n++;
    return n;
}
#define N_SIMD n_simd()

static void test_sb(int32_t K, int32_t R, int32_t n_tok, int32_t bs, int32_t M, int32_t T) {
    sb_case c;
    make_weight(&c, R, K, T, bs, M);
    float *x = make_x(n_tok, K, bs);
    pbs2p_sb_act act;
    void *mem = xalloc(pbs2p_sb_act_bytes(n_tok, K, bs));
    pbs2p_sb_act_init(&act, mem, n_tok, K, bs);
    pbs2p_sb_quantize_ref(&act, x, K, 0, n_tok);

    /* a sub-range of rows (the whole range for R = 1), as the thread pool splits them */
    int32_t r0 = R > 2 ? (int32_t)(rng() % (uint64_t)(R / 2)) : 0, r1 = R > 2 ? R - (int32_t)(rng() % 2) : R;
    const int32_t TB = T * c.w.n_blocks;
    const size_t n_sums = (size_t)n_tok * (r1 - r0) * 2 * TB, n_y = (size_t)n_tok * (R + 3);
    int32_t *s_ref = xalloc(n_sums * 4), *s_k = xalloc(n_sums * 4);
    float *y_ref = xalloc(n_y * 4), *y_k = xalloc(n_y * 4);
    pbs2p_sb_sums_ref(&c.w, &act, s_ref, r0, r1);
    memset(y_ref, 0x7f, n_y * 4);
    pbs2p_sb_gemm_ref(&c.w, &act, y_ref, R + 3, r0, r1);
    for (int k = 0; k < N_SIMD; k++) {
        const pbs2p_kernels *kern = pbs2p_kernels_find(simd_names[k]);
        if (kern == NULL) continue;
        memset(s_k, 0xa5, n_sums * 4);
        kern->sb_sums(&c.w, &act, s_k, r0, r1);
        CHECK(memcmp(s_ref, s_k, n_sums * 4) == 0, "%s sb_sums K=%d R=%d [%d,%d) n_tok=%d bs=%d M=%d T=%d",
              kern->name, K, R, r0, r1, n_tok, bs, M, T);
        memset(y_k, 0x7f, n_y * 4);
        kern->sb_gemm(&c.w, &act, y_k, R + 3, r0, r1);
        CHECK(memcmp(y_ref, y_k, n_y * 4) == 0, "%s sb_gemm K=%d R=%d [%d,%d) n_tok=%d bs=%d M=%d T=%d",
              kern->name, K, R, r0, r1, n_tok, bs, M, T);
    }
    free(s_ref);
    free(s_k);
    free(y_ref);
    free(y_k);
    free(mem);
    free(x);
    free_weight(&c);
}

/* Q8_0 (kind 0), Q4_0 (1) or Q3 (2) weights × Q8_0 activations: every SIMD table equals the reference. */
static void test_q8(int32_t K, int32_t R, int32_t n_tok, int kind) {
    static const char *const names[3] = {"q8", "q4", "q3"};
    static const pbs2p_q8_gemm_fn refs[3] = {pbs2p_q8_gemm_ref, pbs2p_q4_gemm_ref, pbs2p_q3_gemm_ref};
    const int32_t nb = K / 32;
    const size_t bytes = kind == 2 ? 14 : kind == 1 ? 18 : 34;
    uint8_t *w = xalloc((size_t)R * nb * bytes);
    for (size_t b = 0; b < (size_t)R * nb; b++) {
        uint16_t d = rand_f16();
        memcpy(w + b * bytes, &d, 2);
        for (size_t j = 2; j < bytes; j++) w[b * bytes + j] = (uint8_t)rng(); /* includes -128 / every nibble */
    }
    float *x = make_x(n_tok, K, 32);
    pbs2p_q8_act act = {n_tok, nb, xalloc((size_t)n_tok * K), xalloc((size_t)n_tok * nb * 4)};
    pbs2p_q8_quantize_ref(&act, x, K, 0, n_tok);
    int32_t r0 = R > 2 ? (int32_t)(rng() % (uint64_t)(R / 2)) : 0, r1 = R > 2 ? R - (int32_t)(rng() % 2) : R;
    const size_t n_y = (size_t)n_tok * (R + 1);
    float *y_ref = xalloc(n_y * 4), *y_k = xalloc(n_y * 4);
    memset(y_ref, 0x7f, n_y * 4);
    refs[kind](w, K, &act, y_ref, R + 1, r0, r1);
    for (int k = 0; k < N_SIMD; k++) {
        const pbs2p_kernels *kern = pbs2p_kernels_find(simd_names[k]);
        if (kern == NULL) continue;
        memset(y_k, 0x7f, n_y * 4);
        (kind == 2 ? kern->q3_gemm : kind == 1 ? kern->q4_gemm : kern->q8_gemm)(w, K, &act, y_k, R + 1, r0, r1);
        CHECK(memcmp(y_ref, y_k, n_y * 4) == 0, "%s %s_gemm K=%d R=%d [%d,%d) n_tok=%d", kern->name,
              names[kind], K, R, r0, r1, n_tok);
    }
    free(y_ref);
    free(y_k);
    free(act.q);
    free(act.d);
    free(x);
    free(w);
}

/* Q3 layout pinned in every table: one block of d = 1 whose element j holds q and every other element 4 (value 0)
 * sums to (q − 4)·x_j, for every j and q (docs/format.md, "Q3 blocks"). */
static void test_q3_layout(void) {
    float x[32];
    for (int j = 0; j < 32; j++) x[j] = (float)(j + 1) * (j % 2 ? -1.0f : 1.0f);
    pbs2p_q8_act act = {1, 1, xalloc(32), xalloc(4)};
    pbs2p_q8_quantize_ref(&act, x, 32, 0, 1);
    for (int k = 0; pbs2p_kernel_names[k] != NULL; k++) {
        const pbs2p_kernels *kern = pbs2p_kernels_find(pbs2p_kernel_names[k]);
        if (kern == NULL) continue;
        int bad = 0;
        for (int j = 0; j < 32 && !bad; j++)
            for (int q = 0; q < 8 && !bad; q++) {
                uint8_t blk[14] = {0x00, 0x3c}; /* d = 1.0 (f16 0x3c00, little-endian) */
                for (int e = 0; e < 32; e++) {
                    const int v = e == j ? q : 4;
                    blk[2 + e % 8] |= (uint8_t)((v & 3) << (2 * (e / 8)));
                    blk[10 + e / 8] |= (uint8_t)(((v >> 2) & 1) << (e % 8));
                }
                float y = 0.0f;
                kern->q3_gemm(blk, 32, &act, &y, 1, 0, 1);
                const float want = act.d[0] * (float)((q - 4) * act.q[j]);
                if (y != want) {
                    bad = 1;
                    CHECK(0, "%s q3 layout: element %d q %d gives %g, want %g", kern->name, j, q, (double)y,
                          (double)want);
                }
            }
        if (!bad) CHECK(1, "%s q3 layout", kern->name);
    }
    free(act.q);
    free(act.d);
}

/* Weight bit j alone (pos or neg plane), activations all nonzero: the block of j sums to exactly q_j,
 * every other sum is 0. Pins "column j = bit j%64 of word j/64" in every kernel. */
static void test_one_hot(void) {
    const int32_t K = 200, bs = 128, W = 4, nb = 2;
    float x[200];
    for (int32_t j = 0; j < K; j++) x[j] = (float)((j * 37) % 251 + 1) * (j % 3 ? 1.0f : -1.0f);
    pbs2p_sb_act act;
    void *mem = xalloc(pbs2p_sb_act_bytes(1, K, bs));
    pbs2p_sb_act_init(&act, mem, 1, K, bs);
    pbs2p_sb_quantize_ref(&act, x, K, 0, 1);
    uint64_t *planes = xalloc(2 * W * 8);
    uint16_t alpha[2] = {0x3c00, 0x3c00}, mu[2] = {0, 0};
    pbs2p_sb_weight w = {1, K, 1, W, nb, bs / 64, planes, alpha, mu, NULL, 0, 0, 0};
    for (int k = 0; pbs2p_kernel_names[k] != NULL; k++) {
        const pbs2p_kernels *kern = pbs2p_kernels_find(pbs2p_kernel_names[k]);
        if (kern == NULL) continue;
        int bad = 0;
        for (int32_t j = 0; j < K && !bad; j++)
            for (int neg = 0; neg < 2; neg++) {
                memset(planes, 0, 2 * W * 8);
                planes[neg * W + j / 64] = 1ull << (j % 64);
                int32_t s[4];
                kern->sb_sums(&w, &act, s, 0, 1);
                for (int32_t i = 0; i < 4; i++) {
                    int32_t expect = (i == neg * nb + j / bs) ? act.q[j] : 0;
                    if (s[i] != expect) {
                        fprintf(stderr, "  %s one-hot j=%d neg=%d: sum[%d] = %d, expected %d\n", kern->name, j, neg,
                                i, s[i], expect);
                        bad = 1;
                    }
                }
            }
        CHECK(!bad, "%s one-hot bit order", kern->name);
    }
    free(planes);
    free(mem);
}

/* Extreme counts: every weight bit of a (possibly huge) block in one plane, activations all +127 or all -127
 * (every bit-plane full, or plane 0 and the sign only). Reaches the largest per-lane counts each kernel
 * accumulates before widening (AVX2 byte chunks of 15 words, AVX-512 int16 chunks of 256 words, ...). */
static void test_extreme(int32_t K, int32_t bs, float value, int neg) {
    const int32_t W = (K + 63) / 64, nb = (K + bs - 1) / bs;
    float *x = xalloc((size_t)K * sizeof(float));
    for (int32_t j = 0; j < K; j++) x[j] = value;
    pbs2p_sb_act act;
    void *mem = xalloc(pbs2p_sb_act_bytes(1, K, bs));
    pbs2p_sb_act_init(&act, mem, 1, K, bs);
    pbs2p_sb_quantize_ref(&act, x, K, 0, 1);
    uint64_t *planes = xalloc((size_t)2 * W * 8);
    uint16_t *alpha = xalloc((size_t)nb * 2), *mu = xalloc((size_t)nb * 2);
    for (int32_t j = 0; j < K; j++) planes[neg * W + j / 64] |= 1ull << (j % 64);
    for (int32_t b = 0; b < nb; b++) alpha[b] = mu[b] = 0x3c00;
    pbs2p_sb_weight w = {1, K, 1, W, nb, bs / 64, planes, alpha, mu, NULL, 0, 0, 0};
    int32_t *s_ref = xalloc((size_t)2 * nb * 4), *s_k = xalloc((size_t)2 * nb * 4);
    pbs2p_sb_sums_ref(&w, &act, s_ref, 0, 1);
    CHECK(s_ref[neg * nb] == (int32_t)(value > 0 ? 127 : -127) * (K < bs ? K : bs), "reference extreme sum %d",
          s_ref[neg * nb]);
    for (int k = 0; k < N_SIMD; k++) {
        const pbs2p_kernels *kern = pbs2p_kernels_find(simd_names[k]);
        if (kern == NULL) continue;
        memset(s_k, 0xa5, (size_t)2 * nb * 4);
        kern->sb_sums(&w, &act, s_k, 0, 1);
        CHECK(memcmp(s_ref, s_k, (size_t)2 * nb * 4) == 0, "%s extreme K=%d bs=%d x=%g neg=%d: %d vs %d",
              kern->name, K, bs, (double)value, neg, s_k[neg * nb], s_ref[neg * nb]);
    }
    free(s_ref);
    free(s_k);
    free(alpha);
    free(mu);
    free(planes);
    free(mem);
    free(x);
}

/* roundf half away from zero on exact halves (127/amax = 1), the zero block, and the clamp/NaN guard when
 * 127/amax overflows to inf (subnormal amax: 0·inf must give 0, ±amax·inf must clamp to ±127). */
static void test_quantizer(void) {
    const int32_t K = 128, bs = 64;
    float x[128] = {0};
    const float vals[] = {0.5f, -0.5f, 1.5f, -1.5f, 2.5f, -2.5f, 0.49999997f, 126.5f, -127.0f, 3.0f};
    const int8_t want[] = {1, -1, 2, -2, 3, -3, 0, 127, -127, 3};
    for (int i = 0; i < 10; i++) x[i] = vals[i];
    x[64] = 1e-45f;  /* block 1: subnormal amax, 127/amax = inf */
    x[65] = -1e-45f;
    pbs2p_sb_act act;
    void *mem = xalloc(pbs2p_sb_act_bytes(1, K, bs));
    pbs2p_sb_act_init(&act, mem, 1, K, bs);
    pbs2p_sb_quantize_ref(&act, x, K, 0, 1);
    CHECK(memcmp(act.q, want, 10) == 0, "quantizer halves: q = %d %d %d %d %d %d %d %d %d %d", act.q[0], act.q[1],
          act.q[2], act.q[3], act.q[4], act.q[5], act.q[6], act.q[7], act.q[8], act.q[9]);
    CHECK(act.scale[0] == 1.0f, "scale of amax 127 = %g, expected 1", (double)act.scale[0]);
    int zeros_ok = 1;
    for (int j = 10; j < 64; j++) zeros_ok &= act.q[j] == 0;
    for (int j = 66; j < 128; j++) zeros_ok &= act.q[j] == 0;
    CHECK(zeros_ok, "zeros in a block quantize to 0 (also when 127/amax is inf)");
    CHECK(act.q[64] == 127 && act.q[65] == -127, "subnormal amax clamps: %d %d", act.q[64], act.q[65]);
    /* an all-zero block: scale 0, q 0; bit-planes of u = 128 (only plane 7 set) */
    float z[64] = {0};
    pbs2p_sb_act act0;
    void *mem0 = xalloc(pbs2p_sb_act_bytes(1, 64, 64));
    pbs2p_sb_act_init(&act0, mem0, 1, 64, 64);
    pbs2p_sb_quantize_ref(&act0, z, 64, 0, 1);
    int planes_ok = act0.scale[0] == 0.0f;
    for (int k = 0; k < 8; k++) planes_ok &= act0.xplanes[k] == (k == 7 ? ~0ull : 0ull);
    CHECK(planes_ok, "zero block: scale 0 and u = 128 bit-planes");
    free(mem0);
    free(mem);
}

/* ------------------------------------------------------------------ the N:M code ------------------------ */

/* Random exact N:M planes (one term), their N:M code written by this test's own encoder (docs/format.md: per row
 * the K/M pattern indices of pb bits, the i-th pattern being the i-th M-bit mask of popcount N ascending, then one
 * sign bit per kept weight in column order); every decoder must give the planes back, and every kernel on the
 * coded weight the reference's results on the planes. */
static void put_bits(uint8_t *p, int64_t bit, uint32_t v, int32_t nbits) {
    for (int32_t b = 0; b < nbits; b++)
        if ((v >> b) & 1) p[(bit + b) >> 3] |= (uint8_t)(1u << ((bit + b) & 7));
}

static void test_nm(int32_t K, int32_t R, int32_t n_tok, int32_t bs, int32_t N, int32_t M) {
    const int32_t W = K / 64, nb = (K + bs - 1) / bs, G = K / M;
    const int32_t pb = pbs2p_nm_pattern_bits(N, M), C = pbs2p_nm_patterns(N, M), rb = pbs2p_nm_row_bytes(K, N, M);
    int32_t rank[256], c = 0;
    for (int32_t x = 0; x < (1 << M); x++) rank[x] = __builtin_popcount((unsigned)x) == N ? c++ : -1;
    CHECK(c == C && rb == G * pb / 8 + G * N / 8, "N:M %d:%d: %d patterns (expected %d), row bytes %d", N, M, C, c, rb);
    uint64_t *planes = xalloc((size_t)R * 2 * W * 8);
    uint8_t *code = malloc((size_t)R * rb); /* exact size: a decoder reading past the tensor shows under ASan */
    uint16_t *alpha = xalloc((size_t)R * nb * 2), *mu = xalloc((size_t)R * nb * 2);
    if (code == NULL) exit(2);
    memset(code, 0, (size_t)R * rb);
    for (int32_t r = 0; r < R; r++) {
        uint64_t *pos = planes + (size_t)r * 2 * W, *neg = pos + W;
        uint8_t *row = code + (size_t)r * rb, *signs = row + G * pb / 8;
        int64_t sbit = 0;
        for (int32_t g = 0; g < G; g++) {
            uint32_t mask;
            do mask = (uint32_t)(rng() & ((1u << M) - 1)); while (rank[mask] < 0);
            put_bits(row, (int64_t)g * pb, (uint32_t)rank[mask], pb);
            for (int32_t col = 0; col < M; col++) {
                if (!((mask >> col) & 1)) continue;
                const int32_t j = g * M + col, s = (int32_t)(rng() & 1);
                (s ? pos : neg)[j / 64] |= 1ull << (j % 64);
                put_bits(signs, sbit++, (uint32_t)s, 1);
            }
        }
    }
    for (size_t i = 0; i < (size_t)R * nb; i++) alpha[i] = rand_f16(), mu[i] = rand_f16();
    const pbs2p_sb_weight wp = {R, K, 1, W, nb, bs / 64, planes, alpha, mu, NULL, 0, 0, 0};
    const pbs2p_sb_weight wn = {R, K, 1, W, nb, bs / 64, NULL, alpha, mu, code, N, M, rb};
    CHECK(pbs2p_nm_first_bad(&wn) == -1, "N:M %d:%d K=%d: valid code reported bad", N, M, K);

    uint64_t *dec = xalloc((size_t)R * 2 * W * 8);
    const pbs2p_nm_decode_fn decs[] = {pbs2p_nm_decode_ref, pbs2p_nm_decode_lut,
                                       pbs2p_nm_decoder(pbs2p_kernels_find("auto"))};
    const char *dnames[] = {"ref", "lut", "auto"};
    for (int d = 0; d < 3; d++) {
        memset(dec, 0xa5, (size_t)R * 2 * W * 8);
        decs[d](&wn, 0, R, dec);
        CHECK(memcmp(dec, planes, (size_t)R * 2 * W * 8) == 0, "decoder %s N:M %d:%d K=%d R=%d", dnames[d], N, M, K, R);
        if (R > 2) { /* a sub-range lands at the buffer's start */
            decs[d](&wn, 1, R - 1, dec);
            CHECK(memcmp(dec, planes + 2 * W, (size_t)(R - 2) * 2 * W * 8) == 0, "decoder %s rows [1,%d) N:M %d:%d K=%d",
                  dnames[d], R - 1, N, M, K);
        }
    }

    float *x = make_x(n_tok, K, bs);
    pbs2p_sb_act act;
    void *mem = xalloc(pbs2p_sb_act_bytes(n_tok, K, bs));
    pbs2p_sb_act_init(&act, mem, n_tok, K, bs);
    pbs2p_sb_quantize_ref(&act, x, K, 0, n_tok);
    const int32_t r0 = R > 2 ? 1 : 0, r1 = R;
    const size_t n_sums = (size_t)n_tok * (r1 - r0) * 2 * nb, n_y = (size_t)n_tok * (R + 3);
    int32_t *s_ref = xalloc(n_sums * 4), *s_k = xalloc(n_sums * 4);
    float *y_ref = xalloc(n_y * 4), *y_k = xalloc(n_y * 4);
    pbs2p_sb_sums_ref(&wp, &act, s_ref, r0, r1);
    memset(y_ref, 0x7f, n_y * 4);
    pbs2p_sb_gemm_ref(&wp, &act, y_ref, R + 3, r0, r1);
    for (int k = -1; k < N_SIMD; k++) {
        const pbs2p_kernels *kern = k < 0 ? &pbs2p_kernels_ref : pbs2p_kernels_find(simd_names[k]);
        if (kern == NULL) continue;
        memset(s_k, 0xa5, n_sums * 4);
        pbs2p_sb_sums_any(kern, &wn, &act, s_k, r0, r1);
        CHECK(memcmp(s_ref, s_k, n_sums * 4) == 0, "%s nm sums K=%d R=%d N:M %d:%d n_tok=%d", kern->name, K, R, N, M,
              n_tok);
        memset(y_k, 0x7f, n_y * 4);
        pbs2p_sb_gemm_any(kern, &wn, &act, y_k, R + 3, r0, r1);
        CHECK(memcmp(y_ref, y_k, n_y * 4) == 0, "%s nm gemm K=%d R=%d N:M %d:%d n_tok=%d", kern->name, K, R, N, M,
              n_tok);
    }
    /* an index >= C(M, N) (where pb bits can hold one) is found at its row and group */
    if ((1 << pb) > C) {
        const int32_t r = R - 1, g = G - 1;
        put_bits(code + (size_t)r * rb, (int64_t)g * pb, (1u << pb) - 1, pb);
        CHECK(pbs2p_nm_first_bad(&wn) == (int64_t)r * G + g, "N:M %d:%d: bad index at row %d group %d not found", N, M,
              r, g);
        decs[2](&wn, 0, R, dec); /* stays in bounds (ASan) */
    }
    free(s_ref), free(s_k), free(y_ref), free(y_k), free(mem), free(x), free(dec);
    free(planes), free(code), free(alpha), free(mu);
}

int main(void) {
#if defined(__arm__) || defined(__aarch64__)
    int quick = 1;
#else
    int quick = getenv("PBS2P_TEST_QUICK") != NULL;
#endif
    const pbs2p_kernels *best = pbs2p_kernels_get();
    printf("kernel in use: %s; tested:", best->name);
    for (int k = 0; k < N_SIMD; k++)
        if (pbs2p_kernels_find(simd_names[k])) printf(" %s", simd_names[k]);
    printf("\n");
    CHECK(pbs2p_set_kernel("no-such-kernel") == PBS2P_ERR_UNSUPPORTED, "unknown kernel name must be UNSUPPORTED");
    CHECK(pbs2p_set_kernel("scalar") == PBS2P_OK && strcmp(pbs2p_kernel_name(), "scalar") == 0, "set scalar");
    CHECK(pbs2p_set_kernel(NULL) == PBS2P_OK && pbs2p_kernels_get() == pbs2p_kernels_find("auto"), "set auto");
    for (int k = 0; k < N_SIMD; k++) {
        const pbs2p_kernels *kern = pbs2p_kernels_find(simd_names[k]);
        if (kern == NULL) {
            CHECK(pbs2p_set_kernel(simd_names[k]) == PBS2P_ERR_UNSUPPORTED, "unavailable %s must be UNSUPPORTED",
                  simd_names[k]);
            continue;
        }
        CHECK(strcmp(kern->name, simd_names[k]) == 0, "table for %s is named %s", simd_names[k], kern->name);
        CHECK(pbs2p_set_kernel(simd_names[k]) == PBS2P_OK && pbs2p_kernels_get() == kern, "set %s", simd_names[k]);
    }
    CHECK(pbs2p_set_kernel(best->name) == PBS2P_OK && pbs2p_kernels_get() == best, "set back to %s", best->name);

    test_quantizer();
    test_one_hot();
    /* 16 words per block (past AVX2's 15-word byte chunks), 520 words (past AVX-512's 256-word int16 chunks: a
     * 520-word count would overflow int16) */
    for (int neg = 0; neg < 2; neg++)
        for (int sgn = 0; sgn < 2; sgn++) {
            test_extreme(2048, 1024, sgn ? -1.0f : 1.0f, neg);
            test_extreme(33280, 33280, sgn ? -1.0f : 1.0f, neg);
            test_extreme(1000, 960, sgn ? -1.0f : 1.0f, neg);
        }

    const int32_t Ks_full[] = {64, 128, 192, 576, 1000, 1536, 4096, 11008}, Ks_quick[] = {64, 576, 1000, 4096};
    const int32_t *Ks = quick ? Ks_quick : Ks_full;
    const int32_t n_K = quick ? 4 : 8;
    const int32_t rows[] = {1, 3, 7, 64, 65}, toks[] = {1, 2, 5, 9}, bss[] = {64, 128, 256};
    const int32_t MT[4][2] = {{4, 1}, {8, 2}, {4, 2}, {8, 1}};
    int idx = 0;
    for (int32_t ki = 0; ki < n_K; ki++)
        for (int bi = 0; bi < 3; bi++)
            for (int mi = 0; mi < 4; mi++, idx++) {
                int32_t K = Ks[ki], R = rows[idx % 5], nt = toks[(idx / 5 + idx) % 4];
                if (quick && R == 65 && K >= 4096) R = 7;
                test_sb(K, R, nt, bss[bi], MT[mi][0], MT[mi][1]);
            }
    /* the largest prefill tile shapes explicitly */
    test_sb(quick ? 576 : 4096, 65, 9, 128, 8, 2);
    test_sb(576, 64, 9, 64, 4, 1);

    const int32_t Kq[] = {32, 576, 1536, 4096};
    idx = 0;
    for (int ki = 0; ki < 4; ki++)
        for (int ri = 0; ri < 5; ri++, idx++) {
            if (quick && ri % 2) continue;
            test_q8(Kq[ki], rows[ri], toks[idx % 4], 0);
            test_q8(Kq[ki], rows[ri], toks[(idx + 1) % 4], 1);
            test_q8(Kq[ki], rows[ri], toks[(idx + 2) % 4], 2);
        }
    test_q8(576, 65, 9, 0);
    test_q8(576, 65, 9, 1);
    test_q8(576, 65, 9, 2);
    test_q3_layout();

    /* the N:M code: every N:M, K with whole 8-word VBMI steps and tails, row ranges, prefill and decode */
    const int32_t Knm_full[] = {64, 576, 1536, 4096}, Knm_quick[] = {64, 576};
    for (int32_t ki = 0; ki < (quick ? 2 : 4); ki++)
        for (int32_t M = 4; M <= 8; M += 4)
            for (int32_t N = 1; N <= M; N++) {
                const int32_t K = quick ? Knm_quick[ki] : Knm_full[ki];
                test_nm(K, 1 + (N * 7 + ki) % 5, 1, 128, N, M);
                test_nm(K, 17, (N % 2) ? 9 : 2, ki % 2 ? 64 : 128, N, M);
            }

    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}

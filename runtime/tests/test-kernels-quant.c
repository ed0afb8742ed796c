/* Part 1: wide token batches (16-lane prefill kernels: full, partial and several lane groups) of every table's
 * sb_gemm / sb_sums against the reference, byte-identical.
 * Part 2: the SIMD activation quantizers (pbs2p_sb_quantizer) against pbs2p_sb_quantize_ref: q, scale and xplanes
 * byte-identical, over block sizes, K (multiples of 32 and not), token ranges, and inputs that hit every branch
 * of the scalar rule: exact .5 ties, zero blocks, NaN (skipped by amax, q = 0), ±inf (zero block), subnormal
 * amax (127/amax = inf), values that round to ±127 and ±128 before the clamp. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#include "test-util.h"

static uint64_t rng_state = 0x243f6a8885a308d3ull;
static uint64_t rng(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static float unit(void) { return (float)(rng() >> 40) / (float)(1 << 24); }

/* One value of the given kind for block position j (kind picked per block). */
static float value(int kind, int32_t j) {
    switch (kind) {
    case 0: return (unit() * 2.0f - 1.0f) * 3.0f;                       /* ordinary */
    case 1: return 0.0f;                                               /* zero block */
    case 2: return j == 0 ? 127.0f : (float)((int)(rng() % 254) - 127) + 0.5f; /* amax 127: x·1 ties at .5 */
    case 3: return j % 7 == 3 ? NAN : unit() - 0.5f;                     /* NaN skipped by amax, q = 0 */
    case 4: return j == 5 ? INFINITY : unit();                           /* non-finite amax: zero block */
    case 5: return j % 3 ? 1e-40f * (float)(rng() % 5) : -1e-45f;        /* subnormal amax: 127/amax = inf */
    case 6: return (unit() - 0.5f) * 1e30f;                              /* large */
    default: return (j & 1 ? -1.0f : 1.0f) * (126.5f + unit());          /* round to 127 / clamp region */
    }
}

static void test_case(int32_t K, int32_t bs, int32_t n_tok) {
    const int32_t nb = (K + bs - 1) / bs;
    float *x = malloc((size_t)n_tok * K * sizeof(float));
    for (int32_t t = 0; t < n_tok; t++)
        for (int32_t b = 0; b < nb; b++) {
            const int kind = (int)(rng() % 8);
            for (int32_t j = b * bs; j < K && j < (b + 1) * bs; j++) x[(size_t)t * K + j] = value(kind, j - b * bs);
        }
    const size_t n = pbs2p_sb_act_bytes(n_tok, K, bs);
    void *m_ref = aligned_alloc(64, (n + 63) & ~(size_t)63), *m_k = aligned_alloc(64, (n + 63) & ~(size_t)63);
    pbs2p_sb_act a_ref, a_k;
    pbs2p_sb_act_init(&a_ref, m_ref, n_tok, K, bs);
    const int32_t t0 = n_tok > 1 ? 1 : 0, t1 = n_tok;
    memset(m_ref, 0x5a, n);
    pbs2p_sb_quantize_ref(&a_ref, x, K, t0, t1);
    for (int k = 0; pbs2p_kernel_names[k] != NULL; k++) {
        const pbs2p_kernels *kern = pbs2p_kernels_find(pbs2p_kernel_names[k]);
        if (kern == NULL) continue;
        memset(m_k, 0x5a, n);
        pbs2p_sb_act_init(&a_k, m_k, n_tok, K, bs);
        pbs2p_sb_quantizer(kern)(&a_k, x, K, t0, t1);
        CHECK(memcmp(m_ref, m_k, n) == 0, "%s quantizer K=%d bs=%d tokens [%d,%d)", kern->name, K, bs, t0, t1);
    }
    free(m_ref);
    free(m_k);
    free(x);
}

static uint16_t rand_f16(void) {
    const uint16_t e = (uint16_t)(8 + rng() % 14), m = (uint16_t)(rng() & 0x3ff);
    return (uint16_t)((rng() & 1) << 15 | e << 10 | m);
}

static void test_batch(int32_t K, int32_t R, int32_t n_tok, int32_t bs, int32_t T) {
    const int32_t W = (K + 63) / 64, nb = (K + bs - 1) / bs;
    uint64_t *planes = aligned_alloc(64, ((size_t)R * T * 2 * W * 8 + 63) & ~(size_t)63);
    uint16_t *alpha = malloc((size_t)R * T * nb * 2), *mu = malloc((size_t)R * nb * 2);
    for (int32_t r = 0; r < R; r++)
        for (int32_t i = 0; i < W; i++) {
            const uint64_t valid = K - 64 * i >= 64 ? ~0ull : (1ull << (K - 64 * i)) - 1;
            const uint64_t kept = rng() & rng() & valid ? (rng() | rng()) & valid : valid, sign = rng();
            for (int32_t t = 0; t < T; t++) {
                const uint64_t sub = t == 0 ? kept : kept & rng();
                planes[((size_t)r * T + t) * 2 * W + i] = sub & sign;
                planes[((size_t)r * T + t) * 2 * W + W + i] = sub & ~sign;
            }
        }
    for (size_t i = 0; i < (size_t)R * T * nb; i++) alpha[i] = rand_f16();
    for (size_t i = 0; i < (size_t)R * nb; i++) mu[i] = rand_f16();
    pbs2p_sb_weight w = {R, K, T, W, nb, bs / 64, planes, alpha, mu, NULL, 0, 0, 0};
    float *x = malloc((size_t)n_tok * K * sizeof(float));
    for (size_t i = 0; i < (size_t)n_tok * K; i++) x[i] = value((int)(rng() % 3) == 0 ? 7 : 0, (int32_t)i);
    const size_t n = pbs2p_sb_act_bytes(n_tok, K, bs);
    void *mem = aligned_alloc(64, (n + 63) & ~(size_t)63);
    pbs2p_sb_act act;
    pbs2p_sb_act_init(&act, mem, n_tok, K, bs);
    pbs2p_sb_quantize_ref(&act, x, K, 0, n_tok);
    const int32_t r0 = R > 4 ? 1 : 0, r1 = R;
    const size_t n_y = (size_t)n_tok * (R + 3), n_s = (size_t)n_tok * (r1 - r0) * 2 * T * nb;
    float *y_ref = malloc(n_y * 4), *y_k = malloc(n_y * 4);
    int32_t *s_ref = malloc(n_s * 4), *s_k = malloc(n_s * 4);
    memset(y_ref, 0x7f, n_y * 4);
    pbs2p_sb_gemm_ref(&w, &act, y_ref, R + 3, r0, r1);
    pbs2p_sb_sums_ref(&w, &act, s_ref, r0, r1);
    for (int k = 1; pbs2p_kernel_names[k] != NULL; k++) {
        const pbs2p_kernels *kern = pbs2p_kernels_find(pbs2p_kernel_names[k]);
        if (kern == NULL) continue;
        memset(y_k, 0x7f, n_y * 4);
        kern->sb_gemm(&w, &act, y_k, R + 3, r0, r1);
        CHECK(memcmp(y_ref, y_k, n_y * 4) == 0, "%s sb_gemm K=%d R=%d n_tok=%d bs=%d T=%d", kern->name, K, R, n_tok,
              bs, T);
        memset(s_k, 0xa5, n_s * 4);
        kern->sb_sums(&w, &act, s_k, r0, r1);
        CHECK(memcmp(s_ref, s_k, n_s * 4) == 0, "%s sb_sums K=%d R=%d n_tok=%d bs=%d T=%d", kern->name, K, R, n_tok,
              bs, T);
    }
    free(planes), free(alpha), free(mu), free(x), free(mem), free(y_ref), free(y_k), free(s_ref), free(s_k);
}

int main(void) {
    const int32_t bt[][5] = {{576, 20, 16, 128, 1}, {576, 7, 17, 64, 2}, {1000, 9, 33, 128, 1}, {2048, 33, 8, 256, 1},
                             {200, 5, 40, 128, 3}, {4096, 17, 12, 128, 1}};
    for (size_t i = 0; i < sizeof bt / sizeof bt[0]; i++) test_batch(bt[i][0], bt[i][1], bt[i][2], bt[i][3], bt[i][4]);

    const int32_t Ks[] = {32, 64, 96, 128, 200, 576, 1536, 2048, 4096 + 32};
    const int32_t bss[] = {64, 128, 256};
    for (int rep = 0; rep < 4; rep++)
        for (size_t i = 0; i < sizeof Ks / sizeof Ks[0]; i++)
            for (size_t j = 0; j < sizeof bss / sizeof bss[0]; j++) test_case(Ks[i], bss[j], 1 + rep);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}

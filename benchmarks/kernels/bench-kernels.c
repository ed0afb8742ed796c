/* Single-thread GEMV (1 token) throughput of every kernel this CPU runs, against the machine's streaming read
 * bandwidth measured in the same run. Weights are cycled over copies totalling > 1 GiB so they come from DRAM,
 * not the (large) L3. Activations are quantized once, outside the timed loop. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"

#define COPY_BYTES ((size_t)1 << 30)

static uint64_t rng_state = 0x2545f4914f6cdd1dull;
static uint64_t rng(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *xalloc(size_t n) {
    void *p = aligned_alloc(64, (n + 63) & ~(size_t)63);
    if (!p) { fprintf(stderr, "out of memory (%zu bytes)\n", n); exit(1); }
    return p;
}

/* ---- streaming read bandwidth ---- */
typedef struct { const uint64_t *p; size_t n; uint64_t sum; } read_arg;
static void *read_fn(void *a) {
    read_arg *r = a;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i < r->n; i += 4) { s0 += r->p[i]; s1 += r->p[i + 1]; s2 += r->p[i + 2]; s3 += r->p[i + 3]; }
    r->sum = s0 + s1 + s2 + s3;
    return NULL;
}
static double read_bw(const uint64_t *buf, size_t n, int n_thr) {
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        pthread_t th[8];
        read_arg a[8];
        double t0 = now();
        for (int i = 0; i < n_thr; i++) {
            a[i] = (read_arg){buf + n / n_thr * i, n / n_thr, 0};
            pthread_create(&th[i], NULL, read_fn, &a[i]);
        }
        for (int i = 0; i < n_thr; i++) pthread_join(th[i], NULL);
        double gbs = (double)n * 8 / (now() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    return best;
}

/* ---- kernels ---- */
static void bench_sb(const char *name, int32_t R, int32_t K, int32_t bs, int32_t T) {
    const int32_t W = (K + 63) / 64, nb = (K + bs - 1) / bs;
    const size_t plane_b = (size_t)R * T * 2 * W * 8, alpha_b = (size_t)R * T * nb * 2, mu_b = (size_t)R * nb * 2;
    const size_t bytes = plane_b + alpha_b + mu_b;
    int n_copy = (int)(COPY_BYTES / bytes) + 1;
    pbs2p_sb_weight *w = xalloc(sizeof *w * n_copy);
    for (int c = 0; c < n_copy; c++) {
        uint64_t *pl = xalloc(plane_b);
        uint16_t *al = xalloc(alpha_b), *mu = xalloc(mu_b);
        for (size_t i = 0; i < plane_b / 16; i++) { uint64_t p = rng(); pl[2 * i] = p; pl[2 * i + 1] = rng() & ~p; }
        for (size_t i = 0; i < alpha_b / 2; i++) al[i] = 0x2e66;
        for (size_t i = 0; i < mu_b / 2; i++) mu[i] = 0x2266;
        w[c] = (pbs2p_sb_weight){R, K, T, W, nb, bs / 64, pl, al, mu};
    }
    float *x = xalloc(sizeof(float) * K), *y = xalloc(sizeof(float) * R);
    for (int32_t j = 0; j < K; j++) x[j] = (float)((int64_t)(rng() % 2001) - 1000) * 1e-3f;
    pbs2p_sb_act act;
    void *mem = xalloc(pbs2p_sb_act_bytes(1, K, bs));
    pbs2p_sb_act_init(&act, mem, 1, K, bs);
    pbs2p_sb_quantize_ref(&act, x, K, 0, 1);
    const char *names[] = {"scalar", "avx2", "avx512", "neon"};
    for (int k = 0; k < 4; k++) {
        const pbs2p_kernels *kern = pbs2p_kernels_find(names[k]);
        if (!kern) continue;
        int iters = 0;
        double t0 = now(), t;
        do { kern->sb_gemm(&w[iters % n_copy], &act, y, R, 0, R); iters++; } while ((t = now() - t0) < 0.5 || iters < 3);
        double per = t / iters;
        printf("| sb %dx%d T=%d bs=%d | %-6s | %9.1f | %7.2f | %6.2f |\n", R, K, T, bs, kern->name, per * 1e6,
               (double)R * K / per / 1e9, (double)bytes / per / 1e9);
    }
    for (int c = 0; c < n_copy; c++) { free((void *)w[c].planes); free((void *)w[c].alpha); free((void *)w[c].mu); }
    free(w); free(x); free(y); free(mem);
}

static void bench_q8(int32_t R, int32_t K) {
    const int32_t nb = K / 32;
    const size_t bytes = (size_t)R * nb * 34;
    int n_copy = (int)(COPY_BYTES / bytes) + 1;
    uint8_t **w = xalloc(sizeof *w * n_copy);
    for (int c = 0; c < n_copy; c++) {
        w[c] = xalloc(bytes);
        for (size_t b = 0; b < (size_t)R * nb; b++) {
            uint16_t d = 0x2266;
            memcpy(w[c] + b * 34, &d, 2);
            for (int j = 0; j < 32; j++) w[c][b * 34 + 2 + j] = (uint8_t)(rng() % 255 + 1);
        }
    }
    float *x = xalloc(sizeof(float) * K), *y = xalloc(sizeof(float) * R);
    for (int32_t j = 0; j < K; j++) x[j] = (float)((int64_t)(rng() % 2001) - 1000) * 1e-3f;
    pbs2p_q8_act act = {1, nb, xalloc(K), xalloc(sizeof(float) * nb)};
    pbs2p_q8_quantize_ref(&act, x, K, 0, 1);
    const char *names[] = {"scalar", "avx2", "avx512", "neon"};
    for (int k = 0; k < 4; k++) {
        const pbs2p_kernels *kern = pbs2p_kernels_find(names[k]);
        if (!kern) continue;
        int iters = 0;
        double t0 = now(), t;
        do { kern->q8_gemm(w[iters % n_copy], K, &act, y, R, 0, R); iters++; } while ((t = now() - t0) < 0.5 || iters < 3);
        double per = t / iters;
        printf("| q8_0 %dx%d | %-6s | %9.1f | %7.2f | %6.2f |\n", R, K, kern->name, per * 1e6,
               (double)R * K / per / 1e9, (double)bytes / per / 1e9);
    }
    for (int c = 0; c < n_copy; c++) free(w[c]);
    free(w); free(x); free(y); free(act.q); free(act.d);
}

int main(void) {
    size_t n = ((size_t)1 << 30) / 8;
    uint64_t *buf = xalloc(n * 8);
    for (size_t i = 0; i < n; i++) buf[i] = i;
    printf("streaming read of 1 GiB: %.2f GB/s (1 thread), %.2f GB/s (2 threads)\n\n", read_bw(buf, n, 1),
           read_bw(buf, n, 2));
    free(buf);
    printf("| matrix (rows x K) | kernel | us/GEMV | Gweights/s | GB/s weights |\n|---|---|---|---|---|\n");
    const int32_t shapes[][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}, {576, 576}, {192, 576}, {1536, 576}, {576, 1536}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) bench_sb("", shapes[i][0], shapes[i][1], 128, 1);
    bench_sb("", 4096, 4096, 128, 2);
    bench_q8(49152, 576);
    return 0;
}

/* Single-thread GEMV (1 token) and GEMM (8 tokens) throughput of every kernel table this CPU runs (popcount
 * and expand families, scalar reference), against the machine's streaming read bandwidth measured in the same
 * run. Weights are cycled over copies totalling > 1 GiB so they come from DRAM, not the (large) L3.
 * Activations are quantized once, outside the timed loop. Every measurement is repeated REPS times; the table
 * shows the best and the median repetition in wall time and, because this may run on a shared machine where
 * other processes take the core away, the best in thread CPU time (CLOCK_THREAD_CPUTIME_ID), from which the
 * throughput columns are computed.
 * The N:M code (docs/format.md): the same GEMV/GEMM on 6:8-coded weights through pbs2p_sb_gemm_any (decode to
 * planes in L1, then the table's kernel) beside the same weights as planes, and the decoders alone.
 * Usage: bench-kernels [results.csv] [nm]   (nm: only the N:M-code rows) */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"

#define COPY_BYTES ((size_t)1 << 30)
enum { REPS = 5, GEMM_TOK = 8 };
static const double REP_SECONDS = 0.2;

static FILE *csv;

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

static double now_cpu(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *xalloc(size_t n) {
    void *p = aligned_alloc(64, (n + 63) & ~(size_t)63);
    if (!p) { fprintf(stderr, "out of memory (%zu bytes)\n", n); exit(1); }
    return p;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* ---- streaming read bandwidth: 2 GiB, written once (page faults happen there), then REPS timed passes ---- */
typedef struct { const uint64_t *p; size_t n; uint64_t sum; double cpu; } read_arg;
static void *read_fn(void *a) {
    read_arg *r = a;
    const double c0 = now_cpu();
    uint64_t s[8] = {0};
    for (size_t i = 0; i < r->n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += r->p[i + k];
    r->sum = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
    r->cpu = now_cpu() - c0;
    return NULL;
}
/* best and median wall-time GB/s; best_cpu: bytes over the slowest thread's CPU time */
static void read_bw(const uint64_t *buf, size_t n, int n_thr, double *best, double *median, double *best_cpu) {
    double gbs[REPS];
    *best_cpu = 0;
    uint64_t sink = 0;
    for (int rep = 0; rep < REPS; rep++) {
        pthread_t th[8];
        read_arg a[8];
        double t0 = now();
        for (int i = 0; i < n_thr; i++) {
            a[i] = (read_arg){buf + n / n_thr * i, n / n_thr, 0, 0};
            pthread_create(&th[i], NULL, read_fn, &a[i]);
        }
        double cpu = 0;
        for (int i = 0; i < n_thr; i++) {
            pthread_join(th[i], NULL);
            sink += a[i].sum;
            if (a[i].cpu > cpu) cpu = a[i].cpu;
        }
        gbs[rep] = (double)n * 8 / (now() - t0) / 1e9;
        if ((double)n * 8 / cpu / 1e9 > *best_cpu) *best_cpu = (double)n * 8 / cpu / 1e9;
    }
    if (sink == 42) printf(" ");
    qsort(gbs, REPS, sizeof gbs[0], cmp_double);
    *best = gbs[REPS - 1];
    *median = gbs[REPS / 2];
}

/* Seconds per call of fn over REPS repetitions of >= REP_SECONDS each: best and median wall, best CPU. */
typedef void (*call_fn)(void *ctx, int iter);
static void time_calls(call_fn fn, void *ctx, double *best, double *median, double *best_cpu) {
    double per[REPS];
    int iter = 0;
    *best_cpu = 1e30;
    for (int rep = 0; rep < REPS; rep++) {
        int n = 0;
        double t0 = now(), c0 = now_cpu(), t;
        do { fn(ctx, iter++); n++; } while ((t = now() - t0) < REP_SECONDS || n < 3);
        per[rep] = t / n;
        if ((now_cpu() - c0) / n < *best_cpu) *best_cpu = (now_cpu() - c0) / n;
    }
    qsort(per, REPS, sizeof per[0], cmp_double);
    *best = per[0];
    *median = per[REPS / 2];
}

typedef struct {
    const pbs2p_kernels *kern;
    pbs2p_sb_weight *w;
    int n_copy;
    pbs2p_sb_act *act;
    float *y;
} sb_ctx;
static void sb_call(void *p, int iter) {
    sb_ctx *c = p;
    const pbs2p_sb_weight *w = &c->w[iter % c->n_copy];
    c->kern->sb_gemm(w, c->act, c->y, w->n_out, 0, w->n_out);
}

static void sb_any_call(void *p, int iter) {
    sb_ctx *c = p;
    const pbs2p_sb_weight *w = &c->w[iter % c->n_copy];
    pbs2p_sb_gemm_any(c->kern, w, c->act, c->y, w->n_out, 0, w->n_out);
}

static void report(const char *shape, const char *kern, int n_tok, double best, double median, double cpu,
                   double weights, double bytes, double bw1) {
    const double gw = weights * n_tok / cpu / 1e9, gb = bytes / cpu / 1e9;
    printf("| %-18s | %-13s | %2d | %9.1f | %9.1f | %9.1f | %7.2f | %6.2f | %5.1f %% |\n", shape, kern, n_tok,
           best * 1e6, median * 1e6, cpu * 1e6, gw, gb, 100.0 * gb / bw1);
    if (csv)
        fprintf(csv, "%s,%s,%d,%.3f,%.3f,%.3f,%.4f,%.4f\n", shape, kern, n_tok, best * 1e6, median * 1e6, cpu * 1e6,
                gw, gb);
    fflush(stdout);
}

static void bench_sb(int32_t R, int32_t K, int32_t bs, int32_t T, double bw1) {
    const int32_t W = (K + 63) / 64, nb = (K + bs - 1) / bs;
    const size_t plane_b = (size_t)R * T * 2 * W * 8, alpha_b = (size_t)R * T * nb * 2, mu_b = (size_t)R * nb * 2;
    const size_t bytes = plane_b + alpha_b + mu_b;
    int n_copy = (int)(COPY_BYTES / bytes) + 1;
    pbs2p_sb_weight *w = xalloc(sizeof *w * n_copy);
    for (int c = 0; c < n_copy; c++) {
        uint64_t *pl = xalloc(plane_b);
        uint16_t *al = xalloc(alpha_b), *mu = xalloc(mu_b);
        /* 2:4-like density: pos and neg disjoint, each about a quarter of the columns */
        for (size_t i = 0; i < plane_b / 16; i++) {
            uint64_t p = rng() & rng();
            pl[2 * i] = p;
            pl[2 * i + 1] = rng() & rng() & ~p;
        }
        for (size_t i = 0; i < alpha_b / 2; i++) al[i] = 0x2e66;
        for (size_t i = 0; i < mu_b / 2; i++) mu[i] = 0x2266;
        w[c] = (pbs2p_sb_weight){R, K, T, W, nb, bs / 64, pl, al, mu, NULL, 0, 0, 0};
    }
    float *x = xalloc(sizeof(float) * K * GEMM_TOK), *y = xalloc(sizeof(float) * R * GEMM_TOK);
    for (int32_t j = 0; j < K * GEMM_TOK; j++) x[j] = (float)((int64_t)(rng() % 2001) - 1000) * 1e-3f;
    char shape[64];
    snprintf(shape, sizeof shape, "%dx%d%s", R, K, T == 1 ? "" : " T=2");
    for (int n_tok = 1; n_tok <= GEMM_TOK; n_tok += GEMM_TOK - 1) {
        pbs2p_sb_act act;
        void *mem = xalloc(pbs2p_sb_act_bytes(n_tok, K, bs));
        pbs2p_sb_act_init(&act, mem, n_tok, K, bs);
        pbs2p_sb_quantize_ref(&act, x, K, 0, n_tok);
        for (int k = 0; pbs2p_kernel_names[k] != NULL; k++) {
            const pbs2p_kernels *kern = pbs2p_kernels_find(pbs2p_kernel_names[k]);
            if (!kern) continue;
            sb_ctx c = {kern, w, n_copy, &act, y};
            double best, median, cpu;
            time_calls(sb_call, &c, &best, &median, &cpu);
            report(shape, kern->name, n_tok, best, median, cpu, (double)R * K, (double)bytes, bw1);
        }
        /* the same GEMV on one cache-resident copy: the compute ceiling of each kernel */
        for (int k = 0; n_tok == 1 && pbs2p_kernel_names[k] != NULL; k++) {
            const pbs2p_kernels *kern = pbs2p_kernels_find(pbs2p_kernel_names[k]);
            if (!kern) continue;
            sb_ctx c = {kern, w, 1, &act, y};
            double best, median, cpu;
            char hot[80];
            snprintf(hot, sizeof hot, "%s hot", shape);
            time_calls(sb_call, &c, &best, &median, &cpu);
            report(hot, kern->name, n_tok, best, median, cpu, (double)R * K, (double)bytes, bw1);
        }
        free(mem);
    }
    for (int c = 0; c < n_copy; c++) { free((void *)w[c].planes); free((void *)w[c].alpha); free((void *)w[c].mu); }
    free(w); free(x); free(y);
}

typedef struct {
    const pbs2p_kernels *kern;
    uint8_t **w;
    int n_copy;
    int32_t R, K;
    pbs2p_q8_act *act;
    float *y;
} q8_ctx;
static void q8_call(void *p, int iter) {
    q8_ctx *c = p;
    c->kern->q8_gemm(c->w[iter % c->n_copy], c->K, c->act, c->y, c->R, 0, c->R);
}

static void bench_q8(int32_t R, int32_t K, double bw1) {
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
    char shape[64];
    snprintf(shape, sizeof shape, "q8_0 %dx%d", R, K);
    for (int k = 0; pbs2p_kernel_names[k] != NULL; k++) {
        const pbs2p_kernels *kern = pbs2p_kernels_find(pbs2p_kernel_names[k]);
        /* the expand and popcount tables share their Q8 kernel: time it once per ISA */
        if (!kern || strstr(kern->name, "-expand")) continue;
        q8_ctx c = {kern, w, n_copy, R, K, &act, y};
        double best, median, cpu;
        time_calls(q8_call, &c, &best, &median, &cpu);
        report(shape, kern->name, 1, best, median, cpu, (double)R * K, (double)bytes, bw1);
    }
    for (int c = 0; c < n_copy; c++) free(w[c]);
    free(w); free(x); free(y); free(act.q); free(act.d);
}

typedef struct {
    pbs2p_nm_decode_fn dec;
    pbs2p_sb_weight *w;
    int n_copy;
    uint64_t *out;
    int32_t rows;
} dec_ctx;
static void dec_call(void *p, int iter) {
    dec_ctx *c = p;
    const pbs2p_sb_weight *w = &c->w[iter % c->n_copy];
    for (int32_t r = 0; r < w->n_out; r += c->rows) c->dec(w, r, r + c->rows < w->n_out ? r + c->rows : w->n_out, c->out);
}

/* R x K weights at N:8 (uniformly random patterns and signs) in the N:M code, and the same as planes. */
static void bench_nm(int32_t R, int32_t K, int32_t N, int32_t bs, double bw1) {
    const int32_t W = K / 64, nb = (K + bs - 1) / bs, rb = pbs2p_nm_row_bytes(K, N, 8);
    const int32_t pb = pbs2p_nm_pattern_bits(N, 8), C = pbs2p_nm_patterns(N, 8);
    const size_t code_b = (size_t)R * rb, scale_b = (size_t)R * nb * 2, plane_b = (size_t)R * 2 * W * 8;
    const size_t bytes = code_b + 2 * scale_b;
    int n_copy = (int)(COPY_BYTES / bytes) + 1;
    pbs2p_sb_weight *w = xalloc(sizeof *w * n_copy);
    for (int c = 0; c < n_copy; c++) {
        uint8_t *code = xalloc(code_b + 64);
        uint16_t *al = xalloc(scale_b), *mu = xalloc(scale_b);
        memset(code, 0, code_b);
        for (int32_t r = 0; r < R; r++) {
            uint8_t *row = code + (size_t)r * rb;
            for (int32_t g = 0; g < K / 8; g++) {
                const uint32_t idx = (uint32_t)(rng() % (uint64_t)C);
                for (int b = 0; b < pb; b++)
                    if ((idx >> b) & 1) row[(g * pb + b) >> 3] |= (uint8_t)(1u << ((g * pb + b) & 7));
            }
            for (int32_t i = K / 8 * pb / 8; i < rb; i++) row[i] = (uint8_t)rng();
        }
        for (size_t i = 0; i < scale_b / 2; i++) al[i] = 0x2e66, mu[i] = 0x2266;
        w[c] = (pbs2p_sb_weight){R, K, 1, W, nb, bs / 64, NULL, al, mu, code, N, 8, rb};
    }
    /* copy 0 decoded to planes: the planes kernels on the same bits (their own > 1 GiB of copies) */
    const int n_pcopy = (int)(COPY_BYTES / (plane_b + 2 * scale_b)) + 1;
    pbs2p_sb_weight *wpl = xalloc(sizeof *wpl * n_pcopy);
    for (int c = 0; c < n_pcopy; c++) {
        uint64_t *pl = xalloc(plane_b);
        pbs2p_nm_decode_ref(&w[0], 0, R, pl);
        wpl[c] = w[0];
        wpl[c].planes = pl;
        wpl[c].nm = NULL;
    }
    float *x = xalloc(sizeof(float) * K * GEMM_TOK), *y = xalloc(sizeof(float) * R * GEMM_TOK);
    for (int32_t j = 0; j < K * GEMM_TOK; j++) x[j] = (float)((int64_t)(rng() % 2001) - 1000) * 1e-3f;
    char shape[64], pshape[64];
    snprintf(shape, sizeof shape, "%dx%d %d:8 code", R, K, N);
    snprintf(pshape, sizeof pshape, "%dx%d %d:8 planes", R, K, N);
    for (int n_tok = 1; n_tok <= GEMM_TOK; n_tok += GEMM_TOK - 1) {
        pbs2p_sb_act act;
        void *mem = xalloc(pbs2p_sb_act_bytes(n_tok, K, bs));
        pbs2p_sb_act_init(&act, mem, n_tok, K, bs);
        pbs2p_sb_quantize_ref(&act, x, K, 0, n_tok);
        for (int k = 1; pbs2p_kernel_names[k] != NULL; k++) { /* the SIMD tables (the scalar one is the reference) */
            const pbs2p_kernels *kern = pbs2p_kernels_find(pbs2p_kernel_names[k]);
            if (!kern) continue;
            double best, median, cpu;
            sb_ctx c = {kern, w, n_copy, &act, y};
            time_calls(sb_any_call, &c, &best, &median, &cpu);
            report(shape, kern->name, n_tok, best, median, cpu, (double)R * K, (double)bytes, bw1);
            sb_ctx cp = {kern, wpl, n_pcopy, &act, y};
            time_calls(sb_call, &cp, &best, &median, &cpu);
            report(pshape, kern->name, n_tok, best, median, cpu, (double)R * K, (double)(plane_b + 2 * scale_b), bw1);
        }
        free(mem);
    }
    /* the decoders alone, 16 rows at a time into an L1 buffer (what pbs2p_sb_gemm_any does for one token) */
    uint64_t *out = xalloc((size_t)16 * 2 * W * 8);
    const struct { const char *name; pbs2p_nm_decode_fn fn; } decs[] = {
        {"decode ref", pbs2p_nm_decode_ref}, {"decode lut", pbs2p_nm_decode_lut},
        {"decode auto", pbs2p_nm_decoder(pbs2p_kernels_find("auto"))}};
    for (int d = 0; d < 3; d++) {
        dec_ctx c = {decs[d].fn, w, n_copy, out, 16};
        double best, median, cpu;
        time_calls(dec_call, &c, &best, &median, &cpu);
        report(shape, decs[d].name, 1, best, median, cpu, (double)R * K, (double)code_b, bw1);
    }
    free(out);
    for (int c = 0; c < n_copy; c++) { free((void *)w[c].nm); free((void *)w[c].alpha); free((void *)w[c].mu); }
    for (int c = 0; c < n_pcopy; c++) free((void *)wpl[c].planes);
    free(w); free(wpl); free(x); free(y);
}

int main(int argc, char **argv) {
    if (argc > 1 && (csv = fopen(argv[1], "w")) == NULL) { perror(argv[1]); return 1; }
    const int nm_only = argc > 2 && strcmp(argv[2], "nm") == 0;
    if (csv) fprintf(csv, "shape,kernel,n_tok,us_best,us_median,us_cpu,gweights_per_s,gb_per_s\n");
    size_t n = ((size_t)2 << 30) / 8;
    uint64_t *buf = xalloc(n * 8);
    for (size_t i = 0; i < n; i++) buf[i] = i;
    double b1, m1, c1, b2, m2, c2;
    read_bw(buf, n, 1, &b1, &m1, &c1);
    read_bw(buf, n, 2, &b2, &m2, &c2);
    printf("streaming read of 2 GiB (after a first-touch pass), %d passes: 1 thread best/median %.2f/%.2f GB/s wall, "
           "%.2f GB/s CPU time; 2 threads %.2f/%.2f GB/s wall, %.2f GB/s CPU time\n\n",
           REPS, b1, m1, c1, b2, m2, c2);
    if (csv) fprintf(csv, "read-bw,1thread,1,0,0,0,0,%.4f\nread-bw,2threads,2,0,0,0,0,%.4f\n", c1, c2);
    free(buf);
    printf("| matrix | kernel | tok | us wall best | us wall median | us CPU best | Gweight·tok/s | GB/s weights "
           "| of 1-thr BW |\n|---|---|---|---|---|---|---|---|---|\n");
    const int32_t shapes[][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}, {576, 576},
                                 {192, 576},   {1536, 576},   {576, 1536}};
    if (!nm_only) {
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) bench_sb(shapes[i][0], shapes[i][1], 128, 1, c1);
        bench_sb(4096, 4096, 128, 2, c1);
        bench_q8(49152, 576, c1);
    }
    bench_nm(4096, 4096, 6, 128, c1);
    bench_nm(1536, 576, 6, 128, c1);
    bench_nm(4096, 4096, 8, 128, c1); /* dense binary: the signs are the pos plane */
    if (csv) fclose(csv);
    return 0;
}

/* Streaming read bandwidth, the method of benchmarks/kernels/bench-kernels.c: a buffer of MiB (default 1024)
 * written once (page faults happen there), then REPS timed passes of n threads each summing its slice.
 * Prints one JSON line with best and median GB/s. usage: bw THREADS [MIB] */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { REPS = 7, MAX_THR = 64 };

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef struct {
    const uint64_t *p;
    size_t n;
    uint64_t sum;
} read_arg;

static void *read_fn(void *a) {
    read_arg *r = a;
    uint64_t s[8] = {0};
    for (size_t i = 0; i < r->n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += r->p[i + k];
    r->sum = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
    return NULL;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    const int n_thr = argc > 1 ? atoi(argv[1]) : 1;
    const size_t mib = argc > 2 ? (size_t)atol(argv[2]) : 1024;
    if (n_thr < 1 || n_thr > MAX_THR || mib < 1) {
        fprintf(stderr, "usage: bw THREADS(1..%d) [MIB]\n", MAX_THR);
        return 2;
    }
    const size_t n = mib << 17; /* u64 words */
    uint64_t *buf = aligned_alloc(64, n * 8);
    if (!buf) {
        fprintf(stderr, "bw: cannot allocate %zu MiB\n", mib);
        return 1;
    }
    for (size_t i = 0; i < n; i++) buf[i] = i;
    double gbs[REPS];
    uint64_t sink = 0;
    for (int rep = 0; rep < REPS; rep++) {
        pthread_t th[MAX_THR];
        read_arg a[MAX_THR];
        const double t0 = now();
        for (int i = 0; i < n_thr; i++) {
            a[i] = (read_arg){buf + n / n_thr * i, n / n_thr, 0};
            pthread_create(&th[i], NULL, read_fn, &a[i]);
        }
        for (int i = 0; i < n_thr; i++) {
            pthread_join(th[i], NULL);
            sink += a[i].sum;
        }
        gbs[rep] = (double)n * 8 / (now() - t0) / 1e9;
    }
    qsort(gbs, REPS, sizeof gbs[0], cmp_double);
    printf("{\"threads\": %d, \"mib\": %zu, \"best_gbs\": %.3f, \"median_gbs\": %.3f, \"sink\": %llu}\n", n_thr, mib,
           gbs[REPS - 1], gbs[REPS / 2], (unsigned long long)(sink & 1));
    free(buf);
    return 0;
}

/* Thread pool: every ith runs exactly once per run, results are visible to the caller after run returns,
 * create/free cycles shut down cleanly, and idle workers sleep instead of spinning. */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

#include "threadpool.h"

#include "test-util.h"

typedef struct sum_task {
    const int64_t *data;
    int64_t n;
    int64_t partial[64];     /* one slot per ith (written without atomics: the run must publish them) */
    atomic_int calls[64];    /* how often each ith ran in this run */
    atomic_int bad_nth;
    int32_t expect_nth;
} sum_task;

static void sum_fn(void *p, int32_t ith, int32_t nth) {
    sum_task *t = p;
    if (nth != t->expect_nth || ith < 0 || ith >= nth) {
        atomic_fetch_add(&t->bad_nth, 1);
        return;
    }
    atomic_fetch_add(&t->calls[ith], 1);
    int64_t chunk = (t->n + nth - 1) / nth, lo = ith * chunk, hi = lo + chunk < t->n ? lo + chunk : t->n, s = 0;
    for (int64_t i = lo; i < hi; i++) s += t->data[i];
    t->partial[ith] = s;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec * 1e-6;
}

static void test_sums(int32_t n_threads, int n_runs) {
    pbs2p_pool *pool = NULL;
    pbs2p_status st = pbs2p_pool_create(n_threads, &pool);
    CHECK(st == PBS2P_OK && pool != NULL, "pool_create(%d) -> %d", n_threads, (int)st);
    if (pool == NULL) return;
    CHECK(pbs2p_pool_size(pool) == n_threads, "pool_size %d != %d", pbs2p_pool_size(pool), n_threads);
    const int64_t n = 10007;
    int64_t *data = malloc(sizeof *data * n);
    sum_task *t = calloc(1, sizeof *t);
    t->data = data;
    t->n = n;
    t->expect_nth = n_threads;
    int bad_runs = 0;
    for (int run = 0; run < n_runs; run++) {
        /* new data each run: a stale partial from the previous run would give a wrong total */
        int64_t expect = 0;
        for (int64_t i = 0; i < n; i++) {
            data[i] = (i * 2654435761u + (uint64_t)run * 40503u) % 1000 - 500;
            expect += data[i];
        }
        for (int i = 0; i < 64; i++) atomic_store(&t->calls[i], 0);
        pbs2p_pool_run(pool, sum_fn, t);
        int64_t got = 0;
        int calls_ok = 1;
        for (int32_t i = 0; i < n_threads; i++) {
            got += t->partial[i];
            if (atomic_load(&t->calls[i]) != 1) calls_ok = 0;
        }
        if (got != expect || !calls_ok) bad_runs++;
    }
    CHECK(bad_runs == 0, "n_threads %d: %d of %d runs with a wrong sum or call count", n_threads, bad_runs, n_runs);
    CHECK(atomic_load(&t->bad_nth) == 0, "n_threads %d: task saw a wrong nth/ith", n_threads);
    free(t);
    free(data);
    pbs2p_pool_free(pool);
}

static void noop_fn(void *p, int32_t ith, int32_t nth) { (void)p; (void)ith; (void)nth; }

/* Idle workers must block: 4 workers idling 300 ms may use only a few ms of CPU. */
static void test_idle(void) {
    pbs2p_pool *pool = NULL;
    if (pbs2p_pool_create(5, &pool) != PBS2P_OK) {
        CHECK(0, "pool_create(5) failed");
        return;
    }
    pbs2p_pool_run(pool, noop_fn, NULL);
    double c0 = cpu_seconds();
    struct timespec ts = {0, 300 * 1000 * 1000};
    nanosleep(&ts, NULL);
    double used = cpu_seconds() - c0;
    CHECK(used < 0.1, "idle pool used %.3f s of CPU in 0.3 s", used);
    pbs2p_pool_free(pool);
}

int main(void) {
    /* ARM builds run under qemu in CI, where every wakeup is expensive: fewer runs there. */
#if defined(__arm__) || defined(__aarch64__)
    const int n_runs = 200, n_cycles = 40;
#else
    const int n_runs = 2000, n_cycles = 200;
#endif
    const int32_t sizes[] = {1, 2, 3, 4, 8};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) test_sums(sizes[i], n_runs);
    /* repeated create / run / free: shutdown must join every worker, including ones never woken */
    int cycles_ok = 1;
    for (int c = 0; c < n_cycles; c++) {
        pbs2p_pool *pool = NULL;
        if (pbs2p_pool_create(1 + c % 6, &pool) != PBS2P_OK) { cycles_ok = 0; break; }
        if (c % 2) pbs2p_pool_run(pool, noop_fn, NULL);
        pbs2p_pool_free(pool);
    }
    CHECK(cycles_ok, "create/free cycle failed");
    pbs2p_pool *pool = (pbs2p_pool *)1;
    CHECK(pbs2p_pool_create(0, &pool) == PBS2P_ERR_INVALID_ARG && pool == NULL, "n_threads 0 must be rejected");
    pbs2p_pool_free(NULL);
    test_idle();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}

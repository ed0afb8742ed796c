/* Fixed pthread pool: workers are created once and run one task per pbs2p_pool_run "generation".
 * Fast path without locks: the caller stores fn/arg, then bumps `gen` (seq_cst); a worker spinning on `gen`
 * reads fn/arg after seeing the new value, and the last worker to finish brings `pending` to 0, which the
 * caller spins on. Decode runs ~8 pool runs per layer (~250 per token on SmolLM2, tasks of 10–100 µs), so a
 * hand-off must cost well under a microsecond: the mutex, condition variables and their futex calls are only
 * touched by a side that is about to sleep (bounded spin, so an idle pool costs no CPU).
 * Sleeping uses the Dekker pattern on seq_cst atomics: a worker announces itself in `n_sleeping` and re-checks
 * `gen` under the mutex; the caller bumps `gen` and then reads `n_sleeping`, so either the worker sees the new
 * generation or the caller sees the sleeper and broadcasts under the mutex. `main_waiting` / `pending` pair
 * the same way for the completion signal. Each side announces itself with a read-modify-write (fetch_add,
 * fetch_sub, exchange) before reading the other's flag: C11 orders a plain seq_cst store before a later seq_cst
 * load too, but with a plain store the caller slept on `done` while the worker slept on `wake` without having
 * signalled (test-model hung in ~7 % of runs under qemu-aarch64 7.2, a pool stress in 1 of 10; never natively).
 * The likely cause: qemu-user's TCG on an x86 host does not keep aarch64's stlr -> ldar in order. With RMWs
 * (full barriers there) 0 of 80 and 0 of 20 hung; they cost nothing on this slow path. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "common.h"
#include "threadpool.h"

/* Polls of `gen` / `pending` before blocking: a few microseconds, bounded, so idle workers sleep. */
#define POOL_SPIN 2048

typedef struct pool_worker {
    struct pbs2p_pool *pool;
    int32_t ith;
} pool_worker;

struct pbs2p_pool {
    int32_t n_threads;
    int32_t n_started;        /* workers successfully created (n_threads - 1 after a good create) */
    pthread_t *threads;       /* [n_threads - 1] */
    pool_worker *workers;     /* [n_threads - 1], ith 1.. */
    pthread_mutex_t mu;
    pthread_cond_t wake;      /* sleeping workers wait here for a new generation or stop */
    pthread_cond_t done;      /* a sleeping caller waits here for pending == 0 */
    _Atomic(pbs2p_task_fn) fn; /* stored before gen is bumped */
    _Atomic(void *) arg;
    atomic_uint_fast64_t gen; /* generation of the current task */
    atomic_int pending;       /* workers still running the current generation */
    atomic_int n_sleeping;    /* workers inside the mutex-protected wait (or about to enter it) */
    atomic_int main_waiting;  /* the caller sleeps on `done` */
    atomic_int stop;
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || (defined(__arm__) && defined(__ARM_ARCH) && __ARM_ARCH >= 7)
    __asm__ __volatile__("yield");
#endif
}

static void *worker_main(void *p) {
    pool_worker *wk = p;
    struct pbs2p_pool *pool = wk->pool;
    uint_fast64_t seen = 0;
    for (;;) {
        uint_fast64_t g = atomic_load(&pool->gen);
        for (int i = 0; i < POOL_SPIN && g == seen && !atomic_load_explicit(&pool->stop, memory_order_relaxed); i++) {
            cpu_relax();
            g = atomic_load(&pool->gen);
        }
        if (g == seen) {
            pthread_mutex_lock(&pool->mu);
            atomic_fetch_add(&pool->n_sleeping, 1);
            while ((g = atomic_load(&pool->gen)) == seen && !atomic_load(&pool->stop))
                pthread_cond_wait(&pool->wake, &pool->mu);
            atomic_fetch_sub(&pool->n_sleeping, 1);
            pthread_mutex_unlock(&pool->mu);
        }
        if (atomic_load(&pool->stop)) return NULL;
        seen = g;
        pbs2p_task_fn fn = atomic_load_explicit(&pool->fn, memory_order_relaxed);
        void *arg = atomic_load_explicit(&pool->arg, memory_order_relaxed);

        fn(arg, wk->ith, pool->n_threads);

        if (atomic_fetch_sub(&pool->pending, 1) == 1 && atomic_load(&pool->main_waiting)) {
            /* Taking the mutex orders this signal after the caller's check-then-wait (no lost wakeup). */
            pthread_mutex_lock(&pool->mu);
            pthread_cond_signal(&pool->done);
            pthread_mutex_unlock(&pool->mu);
        }
    }
}

static void pool_stop_and_join(struct pbs2p_pool *pool) {
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->stop, 1);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    for (int32_t i = 0; i < pool->n_started; i++) pthread_join(pool->threads[i], NULL);
    pool->n_started = 0;
}

static void pool_destroy(struct pbs2p_pool *pool) {
    pthread_cond_destroy(&pool->done);
    pthread_cond_destroy(&pool->wake);
    pthread_mutex_destroy(&pool->mu);
    free(pool->workers);
    free(pool->threads);
    free(pool);
}

pbs2p_status pbs2p_pool_create(int32_t n_threads, pbs2p_pool **out) {
    if (out == NULL) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "out is NULL");
    *out = NULL;
    if (n_threads < 1 || n_threads > 1024)
        return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "n_threads = %d, expected 1..1024", (int)n_threads);
    struct pbs2p_pool *pool = calloc(1, sizeof *pool);
    if (pool == NULL) return PBS2P_FAIL(PBS2P_ERR_NOMEM, "cannot allocate a pool of %d threads", (int)n_threads);
    pool->n_threads = n_threads;
    atomic_init(&pool->gen, 0);
    atomic_init(&pool->pending, 0);
    atomic_init(&pool->n_sleeping, 0);
    atomic_init(&pool->main_waiting, 0);
    atomic_init(&pool->stop, 0);
    atomic_init(&pool->fn, NULL);
    atomic_init(&pool->arg, NULL);
    if (pthread_mutex_init(&pool->mu, NULL) != 0) {
        free(pool);
        return PBS2P_FAIL(PBS2P_ERR_NOMEM, "pthread_mutex_init failed");
    }
    if (pthread_cond_init(&pool->wake, NULL) != 0) {
        pthread_mutex_destroy(&pool->mu);
        free(pool);
        return PBS2P_FAIL(PBS2P_ERR_NOMEM, "pthread_cond_init failed");
    }
    if (pthread_cond_init(&pool->done, NULL) != 0) {
        pthread_cond_destroy(&pool->wake);
        pthread_mutex_destroy(&pool->mu);
        free(pool);
        return PBS2P_FAIL(PBS2P_ERR_NOMEM, "pthread_cond_init failed");
    }
    if (n_threads > 1) {
        pool->threads = calloc((size_t)n_threads - 1, sizeof *pool->threads);
        pool->workers = calloc((size_t)n_threads - 1, sizeof *pool->workers);
        if (pool->threads == NULL || pool->workers == NULL) {
            pool_destroy(pool);
            return PBS2P_FAIL(PBS2P_ERR_NOMEM, "cannot allocate %d worker records", (int)n_threads - 1);
        }
        for (int32_t i = 0; i < n_threads - 1; i++) {
            pool->workers[i].pool = pool;
            pool->workers[i].ith = i + 1;
            int rc = pthread_create(&pool->threads[i], NULL, worker_main, &pool->workers[i]);
            if (rc != 0) {
                pool_stop_and_join(pool);
                pool_destroy(pool);
                return PBS2P_FAIL(PBS2P_ERR_NOMEM, "pthread_create failed for worker %d of %d (error %d)",
                                  (int)i + 1, (int)n_threads, rc);
            }
            pool->n_started = i + 1;
        }
    }
    *out = pool;
    return PBS2P_OK;
}

void pbs2p_pool_free(pbs2p_pool *pool) {
    if (pool == NULL) return;
    pool_stop_and_join(pool);
    pool_destroy(pool);
}

int32_t pbs2p_pool_size(const pbs2p_pool *pool) { return pool ? pool->n_threads : 1; }

void pbs2p_pool_run(pbs2p_pool *pool, pbs2p_task_fn fn, void *arg) {
    if (pool == NULL || pool->n_threads == 1) {
        fn(arg, 0, 1);
        return;
    }
    atomic_store_explicit(&pool->fn, fn, memory_order_relaxed);
    atomic_store_explicit(&pool->arg, arg, memory_order_relaxed);
    atomic_store_explicit(&pool->pending, pool->n_threads - 1, memory_order_relaxed);
    atomic_fetch_add(&pool->gen, 1); /* seq_cst: publishes fn/arg/pending, then n_sleeping is read */
    if (atomic_load(&pool->n_sleeping) > 0) {
        pthread_mutex_lock(&pool->mu);
        pthread_cond_broadcast(&pool->wake);
        pthread_mutex_unlock(&pool->mu);
    }

    fn(arg, 0, pool->n_threads);

    for (int i = 0; i < POOL_SPIN && atomic_load_explicit(&pool->pending, memory_order_acquire) > 0; i++)
        cpu_relax();
    if (atomic_load_explicit(&pool->pending, memory_order_acquire) > 0) {
        pthread_mutex_lock(&pool->mu);
        /* An exchange, not a plain store: see the Dekker note at the top (store -> load order). */
        atomic_exchange(&pool->main_waiting, 1);
        while (atomic_load(&pool->pending) > 0) pthread_cond_wait(&pool->done, &pool->mu);
        atomic_store(&pool->main_waiting, 0);
        pthread_mutex_unlock(&pool->mu);
    }
}

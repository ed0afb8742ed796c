/* Fixed pthread pool: workers are created once and run one task per pbs2p_pool_run "generation".
 * A run bumps `gen` under the mutex and broadcasts; each worker spins briefly on `gen` (a layer's matmuls
 * follow each other within microseconds during decode) and then blocks on `wake`, so an idle pool costs no
 * CPU. Completion is counted down in `pending`; the last worker signals `done`. */
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
    pthread_cond_t wake;      /* workers wait here for a new generation or stop */
    pthread_cond_t done;      /* the caller waits here for pending == 0 */
    pbs2p_task_fn fn;         /* written under mu before gen is bumped */
    void *arg;
    atomic_uint_fast64_t gen; /* generation of the current task; bumped under mu */
    atomic_int pending;       /* workers still running the current generation */
    int stop;                 /* under mu */
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
        for (int i = 0; i < POOL_SPIN && atomic_load_explicit(&pool->gen, memory_order_acquire) == seen; i++)
            cpu_relax();
        pthread_mutex_lock(&pool->mu);
        while (atomic_load_explicit(&pool->gen, memory_order_relaxed) == seen && !pool->stop)
            pthread_cond_wait(&pool->wake, &pool->mu);
        if (pool->stop) {
            pthread_mutex_unlock(&pool->mu);
            return NULL;
        }
        seen = atomic_load_explicit(&pool->gen, memory_order_relaxed);
        pbs2p_task_fn fn = pool->fn;
        void *arg = pool->arg;
        pthread_mutex_unlock(&pool->mu);

        fn(arg, wk->ith, pool->n_threads);

        if (atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_acq_rel) == 1) {
            /* Taking the mutex orders this signal after the caller's check-then-wait (no lost wakeup). */
            pthread_mutex_lock(&pool->mu);
            pthread_cond_signal(&pool->done);
            pthread_mutex_unlock(&pool->mu);
        }
    }
}

static void pool_stop_and_join(struct pbs2p_pool *pool) {
    pthread_mutex_lock(&pool->mu);
    pool->stop = 1;
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
    pthread_mutex_lock(&pool->mu);
    pool->fn = fn;
    pool->arg = arg;
    atomic_store_explicit(&pool->pending, pool->n_threads - 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool->gen, 1, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);

    fn(arg, 0, pool->n_threads);

    for (int i = 0; i < POOL_SPIN && atomic_load_explicit(&pool->pending, memory_order_acquire) > 0; i++)
        cpu_relax();
    if (atomic_load_explicit(&pool->pending, memory_order_acquire) > 0) {
        pthread_mutex_lock(&pool->mu);
        while (atomic_load_explicit(&pool->pending, memory_order_acquire) > 0)
            pthread_cond_wait(&pool->done, &pool->mu);
        pthread_mutex_unlock(&pool->mu);
    }
}

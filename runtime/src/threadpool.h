/* Internal: a fixed pool of worker threads created once per context. The caller is thread 0.
 * Idle workers block on a condition variable (no busy-spinning while idle). */
#ifndef PBS2P_THREADPOOL_H
#define PBS2P_THREADPOOL_H

#include <stdint.h>
#include "pbs2p.h"

typedef struct pbs2p_pool pbs2p_pool;
typedef void (*pbs2p_task_fn)(void *arg, int32_t ith, int32_t nth);

/* n_threads >= 1 (1: no worker threads are created). */
pbs2p_status pbs2p_pool_create(int32_t n_threads, pbs2p_pool **out);
void pbs2p_pool_free(pbs2p_pool *pool);
int32_t pbs2p_pool_size(const pbs2p_pool *pool);
/* Run fn(arg, ith, nth) for ith = 0..nth-1 (ith 0 on the calling thread); return when all have finished. */
void pbs2p_pool_run(pbs2p_pool *pool, pbs2p_task_fn fn, void *arg);

#endif

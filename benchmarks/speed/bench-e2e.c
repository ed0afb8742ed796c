/* End-to-end speed of one pbs2p model file, the llama-bench way: prefill of n_prompt tokens from an empty
 * context (one pbs2p_eval call, last token's logits), then, after clearing the context, n_gen single-token
 * decode steps from position 0 (each computes the full logits row). Token ids are a fixed pseudo-random
 * sequence (the same one llama_speed.py feeds llama.cpp), so no tokenizer or sampler time is counted.
 * Prints one JSON line: {"prefill_tok_s": ..., "decode_tok_s": ..., ...}. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pbs2p.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* CPU seconds of the whole process (all threads): on a shared machine, wall time includes time descheduled. */
static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Token i of the benchmark sequence: a 32-bit LCG, also written out by llama_speed.py. */
static int32_t bench_token(int32_t i, int32_t n_vocab) {
    uint32_t x = 2654435761u * (uint32_t)(i + 1) + 12345u;
    x ^= x >> 15;
    return (int32_t)(x % (uint32_t)n_vocab);
}

static int fail(const char *what) {
    fprintf(stderr, "bench-e2e: %s: %s\n", what, pbs2p_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: bench-e2e MODEL THREADS [N_PROMPT=512] [N_GEN=128] [N_BATCH=512] [KERNEL=auto]\n");
        return 2;
    }
    const char *path = argv[1];
    const int32_t n_threads = atoi(argv[2]);
    const int32_t n_prompt = argc > 3 ? atoi(argv[3]) : 512;
    const int32_t n_gen = argc > 4 ? atoi(argv[4]) : 128;
    const int32_t n_batch = argc > 5 ? atoi(argv[5]) : 512;
    const char *kernel = argc > 6 ? argv[6] : "auto";
    if (n_threads < 1 || n_prompt < 1 || n_gen < 1 || n_batch < 1) {
        fprintf(stderr, "bench-e2e: threads, n_prompt, n_gen and n_batch must be >= 1\n");
        return 2;
    }
    if (pbs2p_set_kernel(kernel) != PBS2P_OK) return fail("kernel");
    const double t_load0 = now_s();
    pbs2p_model *m = NULL;
    if (pbs2p_model_load(path, &m) != PBS2P_OK) return fail("load");
    pbs2p_model_info info;
    pbs2p_model_get_info(m, &info);
    pbs2p_ctx_params cp = pbs2p_ctx_default_params();
    cp.n_threads = n_threads;
    cp.n_batch = n_batch;
    cp.n_ctx = n_prompt > n_gen ? n_prompt : n_gen;
    pbs2p_ctx *ctx = NULL;
    if (pbs2p_ctx_init(m, &cp, &ctx) != PBS2P_OK) return fail("ctx");
    const double load_s = now_s() - t_load0;
    const int32_t V = info.n_vocab, n_tok = n_prompt > n_gen ? n_prompt : n_gen;
    int32_t *toks = malloc((size_t)n_tok * sizeof *toks);
    float *logits = malloc((size_t)V * sizeof *logits);
    if (!toks || !logits) {
        fprintf(stderr, "bench-e2e: out of memory\n");
        return 1;
    }
    for (int32_t i = 0; i < n_tok; i++) toks[i] = bench_token(i, V);

    /* warm-up: touches every weight page once (mmap faults are not timed) and starts the pool */
    if (pbs2p_eval(ctx, toks, 8 < n_tok ? 8 : n_tok, logits, 0) != PBS2P_OK) return fail("warm-up");
    pbs2p_ctx_truncate(ctx, 0);

    double t0 = now_s(), c0 = cpu_s();
    if (pbs2p_eval(ctx, toks, n_prompt, logits, 0) != PBS2P_OK) return fail("prefill");
    const double prefill_s = now_s() - t0, prefill_cpu = cpu_s() - c0;
    pbs2p_ctx_truncate(ctx, 0);

    t0 = now_s(), c0 = cpu_s();
    for (int32_t i = 0; i < n_gen; i++)
        if (pbs2p_eval(ctx, &toks[i], 1, logits, 0) != PBS2P_OK) return fail("decode");
    const double decode_s = now_s() - t0, decode_cpu = cpu_s() - c0;

    printf("{\"engine\": \"pbs2p\", \"kernel\": \"%s\", \"threads\": %d, \"n_prompt\": %d, \"n_gen\": %d, "
           "\"n_batch\": %d, \"load_s\": %.3f, \"prefill_s\": %.6f, \"decode_s\": %.6f, \"prefill_tok_s\": %.3f, "
           "\"decode_tok_s\": %.3f, \"prefill_cpu_s\": %.6f, \"decode_cpu_s\": %.6f, \"logit0\": %.6g}\n",
           pbs2p_kernel_name(), n_threads, n_prompt, n_gen, n_batch, load_s, prefill_s, decode_s,
           n_prompt / prefill_s, n_gen / decode_s, prefill_cpu, decode_cpu, (double)logits[0]);
    free(toks);
    free(logits);
    pbs2p_ctx_free(ctx);
    pbs2p_model_free(m);
    return 0;
}

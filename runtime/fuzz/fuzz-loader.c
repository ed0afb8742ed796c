/* libFuzzer target: arbitrary bytes as a model file, through every loader stage.
 *
 * The bytes go to a memfd (no disk I/O; the loader takes a path, so it opens /proc/self/fd/N), then
 * pbs2p_model_load runs the GGUF reader, the model validation and the tokenizer load. A file that loads is
 * also used: a context of 8 positions on one thread, one pbs2p_eval of 2 tokens, a tokenize call, the pieces
 * of the ids it gave, and the chat template. Any failure must come back as a status with a message; the
 * sanitizers (ASan + UBSan, -fsanitize=fuzzer) catch everything else.
 *
 * Built by CMake with -DPBS2P_FUZZ=ON (clang only) or by tools/fuzz.sh; seeds: tools/make_fuzz_corpus.py. */
#include "pbs2p.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static void quiet_log(int32_t level, const char *msg, void *user) { (void)level, (void)msg, (void)user; }

static int g_fd = -1;
static char g_path[64];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    pbs2p_set_log(quiet_log, NULL);
    g_fd = memfd_create("pbs2p-fuzz-loader", MFD_CLOEXEC);
    if (g_fd < 0) {
        perror("memfd_create");
        abort();
    }
    snprintf(g_path, sizeof g_path, "/proc/self/fd/%d", g_fd);
    return 0;
}

static void use_model(const pbs2p_model *m) {
    pbs2p_model_info info;
    if (pbs2p_model_get_info(m, &info) != PBS2P_OK) abort(); /* cannot fail on a loaded model */

    static const char text[] = "Hello <|im_start|>world 123 \xc3\xa9\xff";
    int32_t ids[64], n = 0;
    if (pbs2p_tokenize(m, text, sizeof text - 1, 1, 1, ids, 64, &n) == PBS2P_OK) {
        char piece[512];
        for (int32_t i = 0; i < n; i++) {
            int32_t np = 0;
            if (ids[i] < 0 || ids[i] >= info.n_vocab) abort(); /* the tokenizer must only give valid ids */
            pbs2p_token_to_piece(m, ids[i], 1, piece, (int32_t)sizeof piece, &np);
        }
    }
    pbs2p_chat_msg msg = {"user", "hi"};
    char chat[256];
    int32_t n_chat = 0;
    pbs2p_chat_apply(m, &msg, 1, 1, chat, (int32_t)sizeof chat, &n_chat);

    /* Huge but valid dimensions would make one eval slow, not wrong: run it on small models only. */
    if ((int64_t)info.n_embd * (info.n_ff > info.n_vocab ? info.n_ff : info.n_vocab) > (1 << 22)) return;
    pbs2p_ctx_params cp = pbs2p_ctx_default_params();
    cp.n_ctx = 8, cp.n_threads = 1, cp.n_batch = 2;
    pbs2p_ctx *ctx = NULL;
    if (pbs2p_ctx_init(m, &cp, &ctx) != PBS2P_OK) return;
    float *logits = malloc((size_t)info.n_vocab * sizeof *logits);
    const int32_t toks[2] = {0, info.n_vocab - 1};
    if (logits) pbs2p_eval(ctx, toks, 2, logits, 0);
    free(logits);
    pbs2p_ctx_free(ctx);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (ftruncate(g_fd, 0) != 0 || pwrite(g_fd, data, size, 0) != (ssize_t)size) abort();
    pbs2p_model *m = NULL;
    pbs2p_status st = pbs2p_model_load(g_path, &m);
    if (st == PBS2P_OK) {
        use_model(m);
        pbs2p_model_free(m);
    } else if (m != NULL || pbs2p_last_error()[0] == '\0') {
        abort(); /* the contract: *out NULL and a message on every failure */
    }
    return 0;
}

/* libFuzzer target: arbitrary bytes through the tokenizer of one fixed small model.
 *
 * The model (a ~300-token vocabulary written by tools/make_fuzz_corpus.py as OUT/tokenizer.gguf) is loaded once,
 * from $PBS2P_FUZZ_MODEL or the path compiled in as PBS2P_FUZZ_MODEL_DEFAULT. Each input is encoded with
 * parse_special off and on (and add_special on), and every resulting id is decoded with pbs2p_token_to_piece
 * (render_special on and off). Checked here beyond the sanitizers: every id is in range, the size query
 * (cap 0) agrees with the real call, and, when every single byte decodes back to itself (a byte-level
 * vocabulary with all 256 bytes, as the generated one), decode(encode(x)) == x without special parsing. */
#include "pbs2p.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef PBS2P_FUZZ_MODEL_DEFAULT
#define PBS2P_FUZZ_MODEL_DEFAULT ""
#endif

static pbs2p_model *g_model;
static int32_t g_n_vocab;
static int g_roundtrip; /* every single byte decodes back to itself: a lossless (byte-level) vocabulary */

static void quiet_log(int32_t level, const char *msg, void *user) { (void)level, (void)msg, (void)user; }

/* Bytes of the pieces of ids (render_special 0) into out (cap bytes); returns the length, -1 if it is longer. */
static int64_t decode_all(const int32_t *ids, int32_t n, char *out, size_t cap) {
    size_t len = 0;
    for (int32_t i = 0; i < n; i++) {
        int32_t np = 0;
        pbs2p_status st = pbs2p_token_to_piece(g_model, ids[i], 0, out + len, (int32_t)(cap - len > 1 << 20 ? 1 << 20 : cap - len), &np);
        if (st == PBS2P_ERR_BUFFER_TOO_SMALL) return -1;
        if (st != PBS2P_OK) abort();
        len += (size_t)np;
    }
    return (int64_t)len;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    pbs2p_set_log(quiet_log, NULL);
    const char *path = getenv("PBS2P_FUZZ_MODEL");
    if (!path || !*path) path = PBS2P_FUZZ_MODEL_DEFAULT;
    if (pbs2p_model_load(path, &g_model) != PBS2P_OK) {
        fprintf(stderr, "fuzz-tokenizer: cannot load '%s' (set PBS2P_FUZZ_MODEL; tools/make_fuzz_corpus.py "
                "writes OUT/tokenizer.gguf): %s\n", path, pbs2p_last_error());
        abort();
    }
    pbs2p_model_info info;
    pbs2p_model_get_info(g_model, &info);
    g_n_vocab = info.n_vocab;
    g_roundtrip = 1;
    for (int b = 0; b < 256 && g_roundtrip; b++) {
        const char c = (char)b;
        int32_t ids[8], n = 0;
        char back[64];
        g_roundtrip = pbs2p_tokenize(g_model, &c, 1, 0, 0, ids, 8, &n) == PBS2P_OK &&
                      decode_all(ids, n, back, sizeof back) == 1 && back[0] == c;
    }
    fprintf(stderr, "fuzz-tokenizer: %s, n_vocab %d, round-trip check %s\n", path, g_n_vocab,
            g_roundtrip ? "on" : "off (some byte does not decode to itself)");
    return 0;
}

static void encode_decode(const uint8_t *data, size_t size, int32_t add_special, int32_t parse_special) {
    int32_t need = 0;
    pbs2p_status st = pbs2p_tokenize(g_model, (const char *)data, size, add_special, parse_special, NULL, 0, &need);
    if (st != PBS2P_OK && st != PBS2P_ERR_BUFFER_TOO_SMALL) abort();
    int32_t *ids = malloc(((size_t)need + 1) * sizeof *ids);
    if (!ids) return;
    int32_t n = -1;
    if (pbs2p_tokenize(g_model, (const char *)data, size, add_special, parse_special, ids, need + 1, &n) != PBS2P_OK ||
        n != need)
        abort();
    char piece[1024];
    for (int32_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= g_n_vocab) abort();
        for (int32_t render = 0; render < 2; render++) {
            int32_t np = 0;
            st = pbs2p_token_to_piece(g_model, ids[i], render, piece, (int32_t)sizeof piece, &np);
            if (st != PBS2P_OK && st != PBS2P_ERR_BUFFER_TOO_SMALL) abort();
            if (np < 0) abort();
        }
    }
    if (g_roundtrip && !add_special && !parse_special) {
        char *back = malloc(size + 1);
        if (back && (decode_all(ids, n, back, size + 1) != (int64_t)size || memcmp(back, data, size) != 0)) {
            fprintf(stderr, "fuzz-tokenizer: decode(encode(x)) != x for %zu bytes\n", size);
            abort();
        }
        free(back);
    }
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    encode_decode(data, size, 0, 0);
    encode_decode(data, size, 1, 1);
    return 0;
}

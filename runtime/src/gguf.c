/* The validated GGUF v2/v3 reader (see gguf.h for the list of checks) and the public pbs2p_file_* API.
 *
 * Layout (little endian): "GGUF" u32 version, u64 n_tensors, u64 n_kv, then n_kv × {str key, u32 type, value},
 * n_tensors × {str name, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset}, padding up to general.alignment,
 * the data section. str = u64 length + bytes (no NUL); an array value = u32 elem type, u64 n, n values. */
#include "gguf.h"
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC "GGUF"
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_ALIGNMENT (1u << 20)
#define GGUF_MAX_NAME 65535 /* key and tensor name length limit (ggml's GGML_MAX_NAME is far smaller) */

/* Smallest possible encodings, to bound counts by the bytes left before allocating for them. */
#define GGUF_MIN_KV_BYTES (8 + 1 + 4 + 1)          /* key length, 1-byte key, type, 1-byte value */
#define GGUF_MIN_TENSOR_BYTES (8 + 1 + 4 + 8 + 4 + 8) /* name length, name, n_dims, ne[0], type, offset */

void pbs2p_ggml_type_size(int32_t type, int64_t *block_values, int64_t *block_bytes) {
    int64_t v = 0, b = 0;
    switch (type) {
    case GGML_TYPE_F32: v = 1; b = 4; break;
    case GGML_TYPE_F16: v = 1; b = 2; break;
    case GGML_TYPE_Q4_0: v = 32; b = 18; break;   /* f16 d, 16 B nibbles */
    case GGML_TYPE_Q4_1: v = 32; b = 20; break;   /* f16 d, m, 16 B */
    case GGML_TYPE_Q5_0: v = 32; b = 22; break;   /* f16 d, 4 B high bits, 16 B */
    case GGML_TYPE_Q5_1: v = 32; b = 24; break;
    case GGML_TYPE_Q8_0: v = 32; b = 34; break;   /* f16 d, 32 int8 */
    case GGML_TYPE_Q8_1: v = 32; b = 36; break;   /* f16 d, s, 32 int8 (gguf-py's 40 predates the f16 switch) */
    case GGML_TYPE_Q2_K: v = 256; b = 84; break;
    case GGML_TYPE_Q3_K: v = 256; b = 110; break;
    case GGML_TYPE_Q4_K: v = 256; b = 144; break;
    case GGML_TYPE_Q5_K: v = 256; b = 176; break;
    case GGML_TYPE_Q6_K: v = 256; b = 210; break;
    case GGML_TYPE_Q8_K: v = 256; b = 292; break; /* f32 d, 256 int8, 16 i16 sums */
    case GGML_TYPE_I8: v = 1; b = 1; break;
    case GGML_TYPE_I16: v = 1; b = 2; break;
    case GGML_TYPE_I32: v = 1; b = 4; break;
    case GGML_TYPE_I64: v = 1; b = 8; break;
    case GGML_TYPE_F64: v = 1; b = 8; break;
    case GGML_TYPE_BF16: v = 1; b = 2; break;
    case GGML_TYPE_TQ1_0: v = 256; b = 54; break;
    case GGML_TYPE_TQ2_0: v = 256; b = 66; break;
    default: break;
    }
    if (block_values) *block_values = v;
    if (block_bytes) *block_bytes = b;
}

/* Bytes of one value of a scalar GGUF type; 0 for STRING / ARRAY / unknown. */
static uint64_t value_size(uint32_t type) {
    switch (type) {
    case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
    case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
    case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
    case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
    default: return 0;
    }
}

/* ---- parsing: a bounds-checked cursor over the mapping, plus the first error message ---- */

typedef struct parser {
    const uint8_t *map;
    uint64_t size, pos;
    char msg[400];
} parser;

static pbs2p_status bad(parser *p, pbs2p_status status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static pbs2p_status bad(parser *p, pbs2p_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->msg, sizeof p->msg, fmt, ap);
    va_end(ap);
    return status;
}

static uint64_t left(const parser *p) { return p->size - p->pos; }

static int read_bytes(parser *p, void *dst, uint64_t n) {
    if (n > left(p)) return 0;
    memcpy(dst, p->map + p->pos, (size_t)n);
    p->pos += n;
    return 1;
}
static int read_u32(parser *p, uint32_t *v) { return read_bytes(p, v, sizeof *v); }
static int read_u64(parser *p, uint64_t *v) { return read_bytes(p, v, sizeof *v); }

static int read_str(parser *p, gguf_str *s) {
    uint64_t n;
    if (!read_u64(p, &n) || n > left(p)) return 0;
    s->s = (const char *)p->map + p->pos;
    s->n = n;
    p->pos += n;
    return 1;
}

static pbs2p_status truncated(parser *p, const char *what, const char *name) {
    return bad(p, PBS2P_ERR_FORMAT, "truncated: %s%s%s at offset %" PRIu64 " runs past the end of the file (%" PRIu64
               " bytes)", what, name ? " of " : "", name ? name : "", p->pos, p->size);
}

/* Strict UTF-8 (no overlongs, surrogates, or code points > U+10FFFF), no NUL. */
static int valid_utf8(const uint8_t *s, uint64_t n) {
    for (uint64_t i = 0; i < n;) {
        uint8_t c = s[i];
        uint32_t cp, len;
        if (c == 0) return 0;
        if (c < 0x80) { i++; continue; }
        if ((c & 0xe0) == 0xc0) { len = 2; cp = c & 0x1f; }
        else if ((c & 0xf0) == 0xe0) { len = 3; cp = c & 0x0f; }
        else if ((c & 0xf8) == 0xf0) { len = 4; cp = c & 0x07; }
        else return 0;
        if (len > n - i) return 0;
        for (uint32_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
        i += len;
    }
    return 1;
}

/* A key or tensor name: 1..GGUF_MAX_NAME bytes of UTF-8 without NUL, returned as a NUL-terminated heap copy. */
static pbs2p_status read_name(parser *p, const char *what, int64_t index, char **out) {
    gguf_str s;
    char where[48];
    snprintf(where, sizeof where, "%s %" PRId64, what, index);
    if (!read_str(p, &s)) return truncated(p, "name", where);
    if (s.n == 0 || s.n > GGUF_MAX_NAME)
        return bad(p, PBS2P_ERR_FORMAT, "%s: name length %" PRIu64 " not in [1, %d]", where, s.n, GGUF_MAX_NAME);
    if (!valid_utf8((const uint8_t *)s.s, s.n))
        return bad(p, PBS2P_ERR_FORMAT, "%s: name at offset %" PRIu64 " is not valid UTF-8 (or contains NUL)",
                   where, p->pos - s.n);
    if (!(*out = malloc((size_t)s.n + 1))) return bad(p, PBS2P_ERR_NOMEM, "%s: out of memory", where);
    memcpy(*out, s.s, (size_t)s.n);
    (*out)[s.n] = '\0';
    return PBS2P_OK;
}

static pbs2p_status parse_kv(parser *p, int64_t index, gguf_kv *kv) {
    pbs2p_status st = read_name(p, "kv", index, &kv->key);
    if (st != PBS2P_OK) return st;
    const char *key = kv->key;
    uint32_t type, elem;
    uint64_t n = 1;
    if (!read_u32(p, &type)) return truncated(p, "value type", key);
    if (type >= GGUF_TYPE_COUNT) return bad(p, PBS2P_ERR_FORMAT, "key '%s': unknown value type %" PRIu32, key, type);
    elem = type;
    if (type == GGUF_TYPE_ARRAY) {
        if (!read_u32(p, &elem)) return truncated(p, "array element type", key);
        if (elem >= GGUF_TYPE_COUNT)
            return bad(p, PBS2P_ERR_FORMAT, "key '%s': unknown array element type %" PRIu32, key, elem);
        if (elem == GGUF_TYPE_ARRAY) return bad(p, PBS2P_ERR_FORMAT, "key '%s': nested arrays are not allowed", key);
        if (!read_u64(p, &n)) return truncated(p, "array length", key);
    }
    kv->type = (int32_t)type;
    kv->arr_type = (int32_t)elem;
    kv->n = n;
    if (elem == GGUF_TYPE_STRING) {
        /* each string takes at least its 8-byte length */
        if (n > left(p) / 8 || n > SIZE_MAX / sizeof(gguf_str))
            return bad(p, PBS2P_ERR_FORMAT, "key '%s': %" PRIu64 " strings cannot fit in the %" PRIu64
                       " bytes left at offset %" PRIu64, key, n, left(p), p->pos);
        if (!(kv->strs = malloc((size_t)(n ? n : 1) * sizeof(gguf_str))))
            return bad(p, PBS2P_ERR_NOMEM, "key '%s': out of memory for %" PRIu64 " strings", key, n);
        for (uint64_t i = 0; i < n; i++) {
            if (!read_str(p, &kv->strs[i]))
                return bad(p, PBS2P_ERR_FORMAT, "key '%s': string %" PRIu64 " of %" PRIu64 " at offset %" PRIu64
                           " runs past the end of the file (%" PRIu64 " bytes)", key, i, n, p->pos, p->size);
        }
        return PBS2P_OK;
    }
    uint64_t bytes;
    if (!pbs2p_mul_u64(n, value_size(elem), &bytes) || bytes > left(p))
        return bad(p, PBS2P_ERR_FORMAT, "key '%s': %" PRIu64 " values of %" PRIu64 " bytes at offset %" PRIu64
                   " run past the end of the file (%" PRIu64 " bytes)", key, n, value_size(elem), p->pos, p->size);
    kv->data = p->map + p->pos;
    p->pos += bytes;
    if (elem == GGUF_TYPE_BOOL) {
        for (uint64_t i = 0; i < n; i++)
            if (kv->data[i] > 1)
                return bad(p, PBS2P_ERR_FORMAT, "key '%s': bool value %u (element %" PRIu64 ") is not 0 or 1", key,
                           kv->data[i], i);
    }
    return PBS2P_OK;
}

static pbs2p_status parse_tensor_info(parser *p, int64_t index, gguf_tensor *t) {
    pbs2p_status st = read_name(p, "tensor", index, &t->name);
    if (st != PBS2P_OK) return st;
    const char *name = t->name;
    uint32_t n_dims, type;
    if (!read_u32(p, &n_dims)) return truncated(p, "n_dims", name);
    if (n_dims < 1 || n_dims > 4)
        return bad(p, PBS2P_ERR_FORMAT, "tensor '%s': n_dims %" PRIu32 " not in [1, 4]", name, n_dims);
    t->n_dims = (int32_t)n_dims;
    int64_t n_values = 1;
    for (int d = 0; d < 4; d++) {
        uint64_t ne = 1;
        if ((uint32_t)d < n_dims && !read_u64(p, &ne)) return truncated(p, "dimensions", name);
        if (ne < 1 || ne > (uint64_t)INT64_MAX)
            return bad(p, PBS2P_ERR_FORMAT, "tensor '%s': ne[%d] = %" PRIu64 " not in [1, 2^63)", name, d, ne);
        if ((int64_t)ne > INT64_MAX / n_values)
            return bad(p, PBS2P_ERR_FORMAT, "tensor '%s': element count overflows int64 at ne[%d] = %" PRIu64, name,
                       d, ne);
        t->ne[d] = (int64_t)ne;
        n_values *= (int64_t)ne;
    }
    if (!read_u32(p, &type)) return truncated(p, "type", name);
    if (!read_u64(p, &t->offset)) return truncated(p, "data offset", name);
    int64_t block_values, block_bytes;
    pbs2p_ggml_type_size((int32_t)type, &block_values, &block_bytes);
    if (type > INT32_MAX || block_values == 0)
        return bad(p, PBS2P_ERR_UNSUPPORTED, "tensor '%s': unknown ggml type %" PRIu32, name, type);
    t->type = (int32_t)type;
    if (t->ne[0] % block_values != 0)
        return bad(p, PBS2P_ERR_FORMAT, "tensor '%s': ne[0] = %" PRId64 " is not a multiple of the type %" PRIu32
                   " block size %" PRId64, name, t->ne[0], type, block_values);
    /* ne[0] is a whole number of blocks, so n_values / block_values is exact */
    if (!pbs2p_mul_u64((uint64_t)(n_values / block_values), (uint64_t)block_bytes, &t->n_bytes))
        return bad(p, PBS2P_ERR_FORMAT, "tensor '%s': byte size overflows (%" PRId64 " values)", name, n_values);
    return PBS2P_OK;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Sorts names in place; returns the first duplicate (NULL if none). */
static const char *find_duplicate(const char **names, int64_t n) {
    qsort(names, (size_t)n, sizeof *names, cmp_names);
    for (int64_t i = 1; i < n; i++)
        if (strcmp(names[i - 1], names[i]) == 0) return names[i];
    return NULL;
}

static int cmp_offsets(const void *a, const void *b) {
    const gguf_tensor *x = *(const gguf_tensor *const *)a, *y = *(const gguf_tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Everything that needs all entries at once: duplicate names, alignment, file bounds, overlaps. */
static pbs2p_status check_layout(parser *p, pbs2p_file *f) {
    int64_t n_max = f->n_kv > f->n_tensors ? f->n_kv : f->n_tensors;
    void *scratch = malloc((size_t)(n_max ? n_max : 1) * sizeof(void *));
    if (!scratch) return bad(p, PBS2P_ERR_NOMEM, "out of memory");
    const char **names = scratch;
    const char *dup;
    pbs2p_status st = PBS2P_OK;

    for (int64_t i = 0; i < f->n_kv; i++) names[i] = f->kv[i].key;
    if ((dup = find_duplicate(names, f->n_kv))) {
        st = bad(p, PBS2P_ERR_FORMAT, "duplicate key '%s'", dup);
        goto done;
    }
    for (int64_t i = 0; i < f->n_tensors; i++) names[i] = f->tensors[i].name;
    if ((dup = find_duplicate(names, f->n_tensors))) {
        st = bad(p, PBS2P_ERR_FORMAT, "duplicate tensor name '%s'", dup);
        goto done;
    }

    const gguf_tensor **order = scratch;
    for (int64_t i = 0; i < f->n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        uint64_t rel = t->offset, end;
        if (rel % f->alignment != 0) {
            st = bad(p, PBS2P_ERR_FORMAT, "tensor '%s': data offset %" PRIu64 " is not a multiple of the alignment %"
                     PRIu32, t->name, rel, f->alignment);
            goto done;
        }
        if (!pbs2p_add_u64(f->data_offset, rel, &t->offset) || !pbs2p_add_u64(t->offset, t->n_bytes, &end)) {
            st = bad(p, PBS2P_ERR_FORMAT, "tensor '%s': data offset %" PRIu64 " + %" PRIu64 " bytes exceeds file size %"
                     PRIu64, t->name, rel, t->n_bytes, f->size);
            goto done;
        }
        if (end > f->size) {
            st = bad(p, PBS2P_ERR_FORMAT, "tensor '%s': data [%" PRIu64 ", %" PRIu64 ") exceeds file size %" PRIu64,
                     t->name, t->offset, end, f->size);
            goto done;
        }
        t->data = f->map + t->offset;
        order[i] = t;
    }
    qsort(order, (size_t)f->n_tensors, sizeof *order, cmp_offsets);
    for (int64_t i = 1; i < f->n_tensors; i++) {
        const gguf_tensor *a = order[i - 1], *b = order[i];
        if (a->offset + a->n_bytes > b->offset) { /* no overflow: a's end was checked against the file size */
            st = bad(p, PBS2P_ERR_FORMAT, "tensors '%s' [%" PRIu64 ", %" PRIu64 ") and '%s' [%" PRIu64 ", %" PRIu64
                     ") overlap", a->name, a->offset, a->offset + a->n_bytes, b->name, b->offset,
                     b->offset + b->n_bytes);
            goto done;
        }
    }
done:
    free(scratch);
    return st;
}

static pbs2p_status parse(parser *p, pbs2p_file *f) {
    char magic[4];
    uint32_t version;
    uint64_t n_tensors, n_kv;
    if (!read_bytes(p, magic, 4)) return truncated(p, "magic", NULL);
    if (memcmp(magic, GGUF_MAGIC, 4) != 0)
        return bad(p, PBS2P_ERR_FORMAT, "bad magic %02x %02x %02x %02x (not a GGUF file)", (uint8_t)magic[0],
                   (uint8_t)magic[1], (uint8_t)magic[2], (uint8_t)magic[3]);
    if (!read_u32(p, &version)) return truncated(p, "version", NULL);
    /* a byte-swapped small version number has its low 16 bits zero: a big-endian file */
    if (version != 0 && (version & 0xffffu) == 0)
        return bad(p, PBS2P_ERR_UNSUPPORTED, "big-endian GGUF files are not supported (version field %08" PRIx32 ")",
                   version);
    if (version > 3)
        return bad(p, PBS2P_ERR_VERSION, "GGUF version %" PRIu32 " is newer than the newest supported (3)", version);
    if (version < 2)
        return bad(p, version == 1 ? PBS2P_ERR_UNSUPPORTED : PBS2P_ERR_FORMAT,
                   "GGUF version %" PRIu32 " is not supported (only 2 and 3)", version);
    f->version = version;
    if (!read_u64(p, &n_tensors)) return truncated(p, "tensor count", NULL);
    if (!read_u64(p, &n_kv)) return truncated(p, "kv count", NULL);
    if (n_kv > left(p) / GGUF_MIN_KV_BYTES)
        return bad(p, PBS2P_ERR_FORMAT, "kv count %" PRIu64 " cannot fit in the %" PRIu64 " bytes left", n_kv, left(p));
    if (n_tensors > (left(p) - n_kv * GGUF_MIN_KV_BYTES) / GGUF_MIN_TENSOR_BYTES)
        return bad(p, PBS2P_ERR_FORMAT, "tensor count %" PRIu64 " cannot fit in the %" PRIu64 " bytes left",
                   n_tensors, left(p));

    /* counts are now bounded by the file size, so these products cannot overflow */
    if (!(f->kv = calloc((size_t)(n_kv ? n_kv : 1), sizeof *f->kv)) ||
        !(f->tensors = calloc((size_t)(n_tensors ? n_tensors : 1), sizeof *f->tensors)))
        return bad(p, PBS2P_ERR_NOMEM, "out of memory for %" PRIu64 " kvs and %" PRIu64 " tensors", n_kv, n_tensors);

    pbs2p_status st;
    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    for (uint64_t i = 0; i < n_kv; i++) {
        f->n_kv = (int64_t)i + 1; /* so cleanup frees the partially filled entry too */
        if ((st = parse_kv(p, (int64_t)i, &f->kv[i])) != PBS2P_OK) return st;
    }
    const gguf_kv *align = pbs2p_gguf_find_kv(f, "general.alignment");
    if (align) {
        uint32_t a;
        if (align->type != GGUF_TYPE_UINT32)
            return bad(p, PBS2P_ERR_FORMAT, "general.alignment has type %" PRId32 ", expected u32 (4)", align->type);
        memcpy(&a, align->data, sizeof a);
        if (a == 0 || (a & (a - 1)) != 0 || a > GGUF_MAX_ALIGNMENT)
            return bad(p, PBS2P_ERR_FORMAT, "general.alignment %" PRIu32 " is not a power of two in [1, %u]", a,
                       GGUF_MAX_ALIGNMENT);
        f->alignment = a;
    }
    for (uint64_t i = 0; i < n_tensors; i++) {
        f->n_tensors = (int64_t)i + 1;
        if ((st = parse_tensor_info(p, (int64_t)i, &f->tensors[i])) != PBS2P_OK) return st;
    }
    /* pos <= size < 2^64 - 2^20, so aligning up cannot wrap */
    f->data_offset = (p->pos + f->alignment - 1) & ~(uint64_t)(f->alignment - 1);
    return check_layout(p, f);
}

void pbs2p_file_close(pbs2p_file *f) {
    if (!f) return;
    for (int64_t i = 0; i < f->n_kv; i++) {
        free(f->kv[i].key);
        free(f->kv[i].strs);
    }
    for (int64_t i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
    free(f->kv);
    free(f->tensors);
    if (f->map) munmap((void *)f->map, (size_t)f->size);
    free(f);
}

pbs2p_status pbs2p_file_open(const char *path, pbs2p_file **out) {
    if (!out) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "out is NULL");
    *out = NULL;
    if (!path) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "path is NULL");
    pbs2p_clear_error();

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return PBS2P_FAIL(PBS2P_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int err = errno;
        close(fd);
        return PBS2P_FAIL(PBS2P_ERR_IO, "cannot stat '%s': %s", path, strerror(err));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return PBS2P_FAIL(PBS2P_ERR_IO, "'%s' is not a regular file", path);
    }
    /* 24 bytes: magic, version and the two counts */
    if (sb.st_size < 24) {
        close(fd);
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, "'%s': %lld bytes is too small for a GGUF header (24)", path,
                          (long long)sb.st_size);
    }
    if ((uint64_t)sb.st_size > SIZE_MAX || (uint64_t)sb.st_size > UINT64_MAX - 2 * GGUF_MAX_ALIGNMENT) {
        close(fd);
        return PBS2P_FAIL(PBS2P_ERR_IO, "'%s': %lld bytes cannot be mapped on this system", path,
                          (long long)sb.st_size);
    }
    pbs2p_file *f = calloc(1, sizeof *f);
    if (!f) {
        close(fd);
        return PBS2P_FAIL(PBS2P_ERR_NOMEM, "out of memory");
    }
    f->size = (uint64_t)sb.st_size;
    void *map = mmap(NULL, (size_t)f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    int err = errno;
    close(fd); /* the mapping keeps the file alive */
    if (map == MAP_FAILED) {
        free(f);
        return PBS2P_FAIL(PBS2P_ERR_IO, "cannot mmap '%s' (%" PRIu64 " bytes): %s", path, (uint64_t)sb.st_size,
                          strerror(err));
    }
    f->map = map;

    parser p = {.map = f->map, .size = f->size, .pos = 0, .msg = ""};
    pbs2p_status st = parse(&p, f);
    if (st != PBS2P_OK) {
        pbs2p_file_close(f);
        return PBS2P_FAIL(st, "'%s': %s", path, p.msg);
    }
    *out = f;
    return PBS2P_OK;
}

/* ---- lookups and typed getters ---- */

const gguf_kv *pbs2p_gguf_find_kv(const pbs2p_file *f, const char *key) {
    for (int64_t i = 0; i < f->n_kv; i++)
        if (strcmp(f->kv[i].key, key) == 0) return &f->kv[i];
    return NULL;
}

const gguf_tensor *pbs2p_gguf_find_tensor(const pbs2p_file *f, const char *name) {
    for (int64_t i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}

/* Element i of an integer-typed value as int64: 1 on success, 0 if the type is not an integer, -1 if a u64
 * value exceeds INT64_MAX. */
static int elem_int(int32_t type, const uint8_t *data, uint64_t i, int64_t *out) {
    switch (type) {
    case GGUF_TYPE_UINT8: { uint8_t v; memcpy(&v, data + i, 1); *out = v; return 1; }
    case GGUF_TYPE_INT8: { int8_t v; memcpy(&v, data + i, 1); *out = v; return 1; }
    case GGUF_TYPE_UINT16: { uint16_t v; memcpy(&v, data + 2 * i, 2); *out = v; return 1; }
    case GGUF_TYPE_INT16: { int16_t v; memcpy(&v, data + 2 * i, 2); *out = v; return 1; }
    case GGUF_TYPE_UINT32: { uint32_t v; memcpy(&v, data + 4 * i, 4); *out = v; return 1; }
    case GGUF_TYPE_INT32: { int32_t v; memcpy(&v, data + 4 * i, 4); *out = v; return 1; }
    case GGUF_TYPE_INT64: { int64_t v; memcpy(&v, data + 8 * i, 8); *out = v; return 1; }
    case GGUF_TYPE_UINT64: {
        uint64_t v;
        memcpy(&v, data + 8 * i, 8);
        if (v > (uint64_t)INT64_MAX) { *out = INT64_MAX; return -1; }
        *out = (int64_t)v;
        return 1;
    }
    default: return 0;
    }
}

/* The scalar kv for key: OK with *kv NULL when absent and optional. */
static pbs2p_status find_scalar(const pbs2p_file *f, const char *key, int required, const gguf_kv **kv,
                                const char *func) {
    *kv = pbs2p_gguf_find_kv(f, key);
    if (!*kv) return required ? pbs2p_fail(PBS2P_ERR_FORMAT, func, "missing required key '%s'", key) : PBS2P_OK;
    if ((*kv)->type == GGUF_TYPE_ARRAY)
        return pbs2p_fail(PBS2P_ERR_FORMAT, func, "key '%s' is an array, expected a scalar", key);
    return PBS2P_OK;
}

static pbs2p_status get_int(const pbs2p_file *f, const char *key, int required, int64_t lo, int64_t hi,
                            int64_t *out, int *found, const char *func) {
    const gguf_kv *kv;
    pbs2p_status st = find_scalar(f, key, required, &kv, func);
    *found = kv != NULL;
    if (st != PBS2P_OK || !kv) return st;
    int64_t v;
    int r = elem_int(kv->type, kv->data, 0, &v);
    if (r == 0) return pbs2p_fail(PBS2P_ERR_FORMAT, func, "key '%s' has type %" PRId32 ", expected an integer", key,
                                  kv->type);
    if (r < 0 || v < lo || v > hi) { /* r < 0: a u64 above INT64_MAX, reported as such */
        char val[24];
        uint64_t u;
        if (r < 0) {
            memcpy(&u, kv->data, sizeof u);
            snprintf(val, sizeof val, "%" PRIu64, u);
        } else {
            snprintf(val, sizeof val, "%" PRId64, v);
        }
        return pbs2p_fail(PBS2P_ERR_FORMAT, func, "key '%s' = %s is out of range [%" PRId64 ", %" PRId64 "]", key,
                          val, lo, hi);
    }
    *out = v;
    return PBS2P_OK;
}

pbs2p_status pbs2p_gguf_get_u32(const pbs2p_file *f, const char *key, int required, uint32_t *out) {
    int64_t v;
    int found;
    pbs2p_status st = get_int(f, key, required, 0, UINT32_MAX, &v, &found, __func__);
    if (st == PBS2P_OK && found) *out = (uint32_t)v;
    return st;
}

pbs2p_status pbs2p_gguf_get_i64(const pbs2p_file *f, const char *key, int required, int64_t *out) {
    int64_t v;
    int found;
    pbs2p_status st = get_int(f, key, required, INT64_MIN, INT64_MAX, &v, &found, __func__);
    if (st == PBS2P_OK && found) *out = v;
    return st;
}

pbs2p_status pbs2p_gguf_get_f32(const pbs2p_file *f, const char *key, int required, float *out) {
    const gguf_kv *kv;
    pbs2p_status st = find_scalar(f, key, required, &kv, __func__);
    if (st != PBS2P_OK || !kv) return st;
    if (kv->type == GGUF_TYPE_FLOAT32) {
        memcpy(out, kv->data, sizeof *out);
        return PBS2P_OK;
    }
    if (kv->type != GGUF_TYPE_FLOAT64)
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, "key '%s' has type %" PRId32 ", expected f32 or f64", key, kv->type);
    double d;
    memcpy(&d, kv->data, sizeof d);
    if (isfinite(d) && (d > FLT_MAX || d < -FLT_MAX)) /* inf and nan convert to themselves */
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, "key '%s' = %g is out of f32 range", key, d);
    *out = (float)d;
    return PBS2P_OK;
}

pbs2p_status pbs2p_gguf_get_bool(const pbs2p_file *f, const char *key, int required, int *out) {
    const gguf_kv *kv;
    pbs2p_status st = find_scalar(f, key, required, &kv, __func__);
    if (st != PBS2P_OK || !kv) return st;
    if (kv->type != GGUF_TYPE_BOOL)
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, "key '%s' has type %" PRId32 ", expected bool", key, kv->type);
    *out = kv->data[0];
    return PBS2P_OK;
}

pbs2p_status pbs2p_gguf_get_str(const pbs2p_file *f, const char *key, int required, gguf_str *out) {
    const gguf_kv *kv;
    pbs2p_status st = find_scalar(f, key, required, &kv, __func__);
    if (st != PBS2P_OK || !kv) return st;
    if (kv->type != GGUF_TYPE_STRING)
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, "key '%s' has type %" PRId32 ", expected string", key, kv->type);
    *out = kv->strs[0];
    return PBS2P_OK;
}

pbs2p_status pbs2p_gguf_get_arr(const pbs2p_file *f, const char *key, int required, int32_t elem_type,
                                int64_t expect_n, const gguf_kv **out) {
    const gguf_kv *kv = pbs2p_gguf_find_kv(f, key);
    if (!kv) return required ? PBS2P_FAIL(PBS2P_ERR_FORMAT, "missing required key '%s'", key) : PBS2P_OK;
    if (kv->type != GGUF_TYPE_ARRAY || kv->arr_type != elem_type)
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, "key '%s' has type %" PRId32 "/%" PRId32 ", expected an array of type %"
                          PRId32, key, kv->type, kv->arr_type, elem_type);
    if (expect_n >= 0 && kv->n != (uint64_t)expect_n)
        return PBS2P_FAIL(PBS2P_ERR_FORMAT, "key '%s' has %" PRIu64 " elements, expected %" PRId64, key, kv->n,
                          expect_n);
    *out = kv;
    return PBS2P_OK;
}

int64_t pbs2p_gguf_arr_i64(const gguf_kv *kv, uint64_t i) {
    int64_t v = 0;
    if (kv->arr_type == GGUF_TYPE_BOOL) return kv->data[i];
    elem_int(kv->arr_type, kv->data, i, &v);
    return v;
}

double pbs2p_gguf_arr_f64(const gguf_kv *kv, uint64_t i) {
    if (kv->arr_type == GGUF_TYPE_FLOAT32) {
        float v;
        memcpy(&v, kv->data + 4 * i, sizeof v);
        return v;
    }
    if (kv->arr_type == GGUF_TYPE_FLOAT64) {
        double v;
        memcpy(&v, kv->data + 8 * i, sizeof v);
        return v;
    }
    return (double)pbs2p_gguf_arr_i64(kv, i);
}

/* ---- public file API ---- */

int64_t pbs2p_file_n_tensors(const pbs2p_file *f) { return f ? f->n_tensors : -1; }

int64_t pbs2p_file_n_kv(const pbs2p_file *f) { return f ? f->n_kv : -1; }

pbs2p_status pbs2p_file_kv(const pbs2p_file *f, int64_t i, const char **key, int32_t *type) {
    if (!f) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "file is NULL");
    if (i < 0 || i >= f->n_kv)
        return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "kv index %" PRId64 " not in [0, %" PRId64 ")", i, f->n_kv);
    if (key) *key = f->kv[i].key;
    if (type) *type = f->kv[i].type;
    return PBS2P_OK;
}

pbs2p_status pbs2p_file_tensor(const pbs2p_file *f, int64_t i, pbs2p_tensor_info *info) {
    if (!f || !info) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "file or info is NULL");
    if (i < 0 || i >= f->n_tensors)
        return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "tensor index %" PRId64 " not in [0, %" PRId64 ")", i,
                          f->n_tensors);
    const gguf_tensor *t = &f->tensors[i];
    info->name = t->name;
    info->type = t->type;
    info->n_dims = t->n_dims;
    memcpy(info->ne, t->ne, sizeof info->ne);
    info->offset = t->offset;
    info->n_bytes = t->n_bytes;
    info->data = t->data;
    return PBS2P_OK;
}

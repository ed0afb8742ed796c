/* Internal: the validated GGUF reader behind pbs2p_file (public handle in pbs2p.h).
 *
 * pbs2p_file_open() mmaps the file read-only and validates everything before anything is used: magic,
 * version (2 or 3), counts against the bytes left, string lengths, value types, array element types and
 * lengths (with overflow-checked products), tensor dims (1..4, each >= 1, product overflow), tensor types
 * (known ggml types only, with their block sizes), ne[0] a multiple of the type's block size, data offsets
 * aligned to general.alignment (a power of two, default 32), each tensor inside the file, tensors not
 * overlapping each other, duplicate keys / tensor names. It never reads out of bounds on any input and
 * allocates nothing before the count it sizes has been checked against the file size. */
#ifndef PBS2P_GGUF_H
#define PBS2P_GGUF_H

#include <stdint.h>
#include "pbs2p.h"

enum gguf_value_type {
    GGUF_TYPE_UINT8 = 0, GGUF_TYPE_INT8 = 1, GGUF_TYPE_UINT16 = 2, GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4, GGUF_TYPE_INT32 = 5, GGUF_TYPE_FLOAT32 = 6, GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8, GGUF_TYPE_ARRAY = 9, GGUF_TYPE_UINT64 = 10, GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12, GGUF_TYPE_COUNT = 13,
};

/* ggml tensor types the loader knows the size of (id values are ggml's). */
enum ggml_type_id {
    GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1, GGML_TYPE_Q4_0 = 2, GGML_TYPE_Q4_1 = 3, GGML_TYPE_Q5_0 = 6,
    GGML_TYPE_Q5_1 = 7, GGML_TYPE_Q8_0 = 8, GGML_TYPE_Q8_1 = 9, GGML_TYPE_Q2_K = 10, GGML_TYPE_Q3_K = 11,
    GGML_TYPE_Q4_K = 12, GGML_TYPE_Q5_K = 13, GGML_TYPE_Q6_K = 14, GGML_TYPE_Q8_K = 15,
    GGML_TYPE_I8 = 24, GGML_TYPE_I16 = 25, GGML_TYPE_I32 = 26, GGML_TYPE_I64 = 27, GGML_TYPE_F64 = 28,
    GGML_TYPE_BF16 = 30, GGML_TYPE_TQ1_0 = 34, GGML_TYPE_TQ2_0 = 35,
};

/* Block size (values) and bytes per block of a ggml type; 0 on both if unknown. */
void pbs2p_ggml_type_size(int32_t type, int64_t *block_values, int64_t *block_bytes);

typedef struct gguf_str {
    const char *s; /* into the mapping, NOT NUL-terminated */
    uint64_t n;
} gguf_str;

typedef struct gguf_kv {
    char *key;            /* NUL-terminated heap copy */
    int32_t type;         /* enum gguf_value_type */
    int32_t arr_type;     /* element type when type == ARRAY, else == type */
    uint64_t n;           /* number of values: array length, or 1 for a scalar */
    const uint8_t *data;  /* numeric/bool values: raw little-endian bytes in the mapping (maybe unaligned) */
    gguf_str *strs;       /* STRING (n = 1) or ARRAY of STRING: n heap-allocated descriptors; else NULL */
} gguf_kv;

typedef struct gguf_tensor {
    char *name;           /* NUL-terminated heap copy */
    int32_t type;
    int32_t n_dims;
    int64_t ne[4];        /* unused dims 1 */
    uint64_t offset;      /* absolute file offset */
    uint64_t n_bytes;
    const uint8_t *data;  /* map + offset */
} gguf_tensor;

struct pbs2p_file {
    const uint8_t *map;
    uint64_t size;
    uint32_t version;
    uint32_t alignment;
    uint64_t data_offset;  /* absolute offset of the data section */
    int64_t n_kv;
    gguf_kv *kv;
    int64_t n_tensors;
    gguf_tensor *tensors;
};

/* Lookups (NULL / -1 when absent). */
const gguf_kv *pbs2p_gguf_find_kv(const pbs2p_file *f, const char *key);
const gguf_tensor *pbs2p_gguf_find_tensor(const pbs2p_file *f, const char *name);

/* Typed getters. Return PBS2P_OK, or PBS2P_ERR_FORMAT (with a message naming the key) when the key is absent
 * and `required`, has the wrong type, or its value is out of range for the output type. When the key is
 * absent and not required, *out is left untouched and PBS2P_OK is returned.
 * Integer getters accept any GGUF integer type whose value fits. */
pbs2p_status pbs2p_gguf_get_u32(const pbs2p_file *f, const char *key, int required, uint32_t *out);
pbs2p_status pbs2p_gguf_get_i64(const pbs2p_file *f, const char *key, int required, int64_t *out);
pbs2p_status pbs2p_gguf_get_f32(const pbs2p_file *f, const char *key, int required, float *out); /* F32 or F64 */
pbs2p_status pbs2p_gguf_get_bool(const pbs2p_file *f, const char *key, int required, int *out);
pbs2p_status pbs2p_gguf_get_str(const pbs2p_file *f, const char *key, int required, gguf_str *out);
/* Array getters: checks the element type and (if expect_n >= 0) the length. *out points at the kv. */
pbs2p_status pbs2p_gguf_get_arr(const pbs2p_file *f, const char *key, int required, int32_t elem_type,
                                int64_t expect_n, const gguf_kv **out);
/* Element i of a numeric array as int64 / double (caller checked i < n and the element type). */
int64_t pbs2p_gguf_arr_i64(const gguf_kv *kv, uint64_t i);
double pbs2p_gguf_arr_f64(const gguf_kv *kv, uint64_t i);

#endif

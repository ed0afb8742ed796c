/* Internal helpers shared by every runtime source file: errors, logging, fp16, checked arithmetic. */
#ifndef PBS2P_COMMON_H
#define PBS2P_COMMON_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include "pbs2p.h"

/* Record a failure: formats the message into the thread-local last-error buffer, prefixes __func__,
 * sends it to the log callback at ERROR level, and returns `status` (so: `return PBS2P_FAIL(...)`). */
pbs2p_status pbs2p_fail(pbs2p_status status, const char *func, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
#define PBS2P_FAIL(status, ...) pbs2p_fail((status), __func__, __VA_ARGS__)

void pbs2p_log(int32_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void pbs2p_clear_error(void);

/* Exact IEEE half -> float (handles subnormals, inf, nan). */
static inline float pbs2p_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while ((man & 0x400u) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* float -> half, round to nearest even (for the f16 KV cache). */
uint16_t pbs2p_fp32_to_fp16(float f);

/* Overflow-checked size arithmetic: return 0 on overflow, 1 on success. */
static inline int pbs2p_mul_u64(uint64_t a, uint64_t b, uint64_t *out) {
    if (a != 0 && b > UINT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}
static inline int pbs2p_add_u64(uint64_t a, uint64_t b, uint64_t *out) {
    if (b > UINT64_MAX - a) return 0;
    *out = a + b;
    return 1;
}

#endif

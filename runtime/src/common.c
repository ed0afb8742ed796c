/* Errors, logging and fp16 rounding shared by the whole runtime (declared in common.h and pbs2p.h). */
#include "common.h"

#include <stdarg.h>
#include <stdio.h>

/* The runtime reads file data in place (u32/u64/f16 fields, packed u64 bit-planes) and treats the mapping's
 * bytes as host integers, so a big-endian host would silently misread every file. */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "pbs2p requires a little-endian host (GGUF data is read in place)"
#endif

enum { PBS2P_ERROR_CAP = 512 };

static _Thread_local char last_error[PBS2P_ERROR_CAP];

static void log_default(int32_t level, const char *msg, void *user) {
    (void)user;
    if (level <= PBS2P_LOG_WARN) fprintf(stderr, "pbs2p: %s\n", msg);
}

static pbs2p_log_fn log_fn = log_default;
static void *log_user = NULL;

const char *pbs2p_status_str(pbs2p_status status) {
    switch (status) {
    case PBS2P_OK: return "ok";
    case PBS2P_ERR_IO: return "I/O error";
    case PBS2P_ERR_FORMAT: return "malformed file";
    case PBS2P_ERR_VERSION: return "unsupported (newer) version";
    case PBS2P_ERR_UNSUPPORTED: return "unsupported feature";
    case PBS2P_ERR_NOMEM: return "out of memory";
    case PBS2P_ERR_INVALID_ARG: return "invalid argument";
    case PBS2P_ERR_CONTEXT_FULL: return "context full";
    case PBS2P_ERR_ABORTED: return "aborted";
    case PBS2P_ERR_BUFFER_TOO_SMALL: return "buffer too small";
    case PBS2P_ERR_BUSY: return "context busy";
    }
    return "unknown status";
}

const char *pbs2p_last_error(void) { return last_error; }

void pbs2p_clear_error(void) { last_error[0] = '\0'; }

void pbs2p_set_log(pbs2p_log_fn fn, void *user) {
    log_fn = fn ? fn : log_default;
    log_user = fn ? user : NULL;
}

void pbs2p_log(int32_t level, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    log_fn(level, msg, log_user);
}

pbs2p_status pbs2p_fail(pbs2p_status status, const char *func, const char *fmt, ...) {
    /* Format into a local buffer first: the arguments may point into last_error itself (a caller adding
     * context to a callee's message). */
    char msg[PBS2P_ERROR_CAP];
    int n = snprintf(msg, sizeof msg, "%s: ", func ? func : "pbs2p");
    if (n < 0 || n >= (int)sizeof msg) n = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
    va_end(ap);
    memcpy(last_error, msg, sizeof msg);
    log_fn(PBS2P_LOG_ERROR, last_error, log_user);
    return status;
}

/* Round m >> shift to nearest, ties to even (1 <= shift <= 31). */
static uint32_t shift_rne(uint32_t m, uint32_t shift) {
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    return q + (rem > half || (rem == half && (q & 1u)));
}

uint16_t pbs2p_fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t e = (x >> 23) & 0xffu, man = x & 0x7fffffu;
    if (e == 0xff) /* inf stays inf; nan stays nan (quieted, top payload bits kept) */
        return (uint16_t)(sign | 0x7c00u | (man ? 0x200u | (man >> 13) : 0u));
    if (e >= 143) return (uint16_t)(sign | 0x7c00u); /* >= 2^16: beyond the largest half even after rounding */
    if (e >= 113) {
        /* normal half: rebias 127 -> 15, round 23 mantissa bits to 10; a carry out of the mantissa bumps the
         * exponent, and out of exponent 30 gives 0x7c00 = inf, both exactly right */
        uint32_t h = ((e - 112) << 10) | (man >> 13);
        uint32_t rem = man & 0x1fffu;
        h += rem > 0x1000u || (rem == 0x1000u && (h & 1u));
        return (uint16_t)(sign | h);
    }
    /* |f| < 2^-14: half subnormal, unit 2^-24. f = (man | 2^23) * 2^(e-150) = m * 2^-24 >> (126 - e).
     * Below 2^-25 (e < 102, float subnormals included) everything rounds to zero. */
    if (e < 102) return sign;
    return (uint16_t)(sign | shift_rne(man | 0x800000u, 126 - e));
}

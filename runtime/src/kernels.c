/* Kernel selection: the one place that looks at CPU features, PBS2P_KERNEL and pbs2p_set_kernel. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "format-spec.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

typedef struct cpu_features {
    int avx2, popcnt, f16c, bmi2, avx512f, avx512bw, avx512vnni, avx512vpopcntdq, avx512vbmi, neon;
} cpu_features;

/* All feature detection. __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0). */
static cpu_features detect_cpu(void) {
    cpu_features f = {0};
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    f.avx2 = __builtin_cpu_supports("avx2");
    f.popcnt = __builtin_cpu_supports("popcnt");
    /* clang before 15 has no "f16c" in __builtin_cpu_supports: read CPUID.1:ECX bit 29 directly (the YMM state
     * F16C needs is covered by the avx2 check it is always combined with). */
    unsigned int eax, ebx, ecx, edx;
    f.f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
    f.avx512f = __builtin_cpu_supports("avx512f");
    f.avx512bw = __builtin_cpu_supports("avx512bw");
    f.avx512vnni = __builtin_cpu_supports("avx512vnni");
    f.avx512vpopcntdq = __builtin_cpu_supports("avx512vpopcntdq");
    f.avx512vbmi = __builtin_cpu_supports("avx512vbmi");
    f.bmi2 = __builtin_cpu_supports("bmi2");
#endif
#if defined(__ARM_NEON)
    f.neon = 1; /* baseline on aarch64; on armv7 this build was compiled with -mfpu=neon */
#endif
    return f;
}

static cpu_features cpu;
static pthread_once_t cpu_once = PTHREAD_ONCE_INIT;
static void cpu_init(void) { cpu = detect_cpu(); }

/* The tables this CPU can run, by name (NULL when unknown or unsupported). */
static const pbs2p_kernels *find_named(const char *name) {
    if (strcmp(name, "scalar") == 0) return &pbs2p_kernels_ref;
#if defined(__x86_64__) || defined(__i386__)
    const int avx2 = cpu.avx2 && cpu.popcnt && cpu.f16c;
    const int avx512bw = cpu.avx512f && cpu.avx512bw && cpu.f16c && cpu.popcnt;
    if (strcmp(name, "avx2") == 0) return avx2 ? &pbs2p_kernels_avx2 : NULL;
    if (strcmp(name, "avx2-expand") == 0) return avx2 ? &pbs2p_kernels_avx2_expand : NULL;
    if (strcmp(name, "avx512") == 0) {
        if (!(avx512bw && cpu.avx512vpopcntdq)) return NULL;
        return cpu.avx512vnni ? &pbs2p_kernels_avx512vnni : &pbs2p_kernels_avx512;
    }
    if (strcmp(name, "avx512-expand") == 0) {
        if (!avx512bw) return NULL;
        return cpu.avx512vnni ? &pbs2p_kernels_avx512vnni_expand : &pbs2p_kernels_avx512_expand;
    }
#endif
#if defined(__ARM_NEON)
    if (strcmp(name, "neon") == 0) return cpu.neon ? &pbs2p_kernels_neon : NULL;
    if (strcmp(name, "neon-expand") == 0) return cpu.neon ? &pbs2p_kernels_neon_expand : NULL;
#endif
    return NULL;
}

const char *const pbs2p_kernel_names[] = {"scalar", "avx2", "avx2-expand", "avx512", "avx512-expand",
                                          "neon", "neon-expand", NULL};

/* The default ("auto"): the first available in this order. The popcount/expand order per ISA is the
 * decision recorded in benchmarks/kernels/RESULTS.md (popcount where it wins or ties). */
static const pbs2p_kernels *find_best(void) {
    /* x86: popcount on AVX-512 (VPOPCNTQ) won or tied; on AVX2 the nibble-pshufb popcount lost to the byte-mask
     * kernel (GEMV ~10 %, 8-token GEMM ~35 %). NEON: not measured on hardware; popcount by the rule above. */
    static const char *const order[] = {"avx512", "avx512-expand", "avx2-expand", "avx2", "neon", "neon-expand"};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++) {
        const pbs2p_kernels *k = find_named(order[i]);
        if (k != NULL) return k;
    }
    return &pbs2p_kernels_ref;
}

const pbs2p_kernels *pbs2p_kernels_find(const char *name) {
    pthread_once(&cpu_once, cpu_init);
    if (name == NULL || strcmp(name, "auto") == 0) return find_best();
    return find_named(name);
}

static _Atomic(const pbs2p_kernels *) current;
static pthread_once_t current_once = PTHREAD_ONCE_INIT;

/* First use: PBS2P_KERNEL (a name of pbs2p_kernel_names, or auto) or the best table. A bad value cannot fail a
 * getter, so it is logged and ignored. */
static void current_init(void) {
    const char *env = getenv("PBS2P_KERNEL");
    const pbs2p_kernels *k = NULL;
    if (env != NULL && env[0] != '\0') {
        k = pbs2p_kernels_find(env);
        if (k == NULL)
            pbs2p_log(PBS2P_LOG_WARN, "PBS2P_KERNEL=\"%s\" is not available on this CPU/build; using \"%s\"", env,
                      find_best()->name);
    }
    if (k == NULL) k = pbs2p_kernels_find(NULL);
    atomic_store(&current, k);
}

const pbs2p_kernels *pbs2p_kernels_get(void) {
    pthread_once(&current_once, current_init);
    return atomic_load_explicit(&current, memory_order_acquire);
}

pbs2p_sb_quantize_fn pbs2p_sb_quantizer(const pbs2p_kernels *k) {
    pthread_once(&cpu_once, cpu_init);
#if defined(__x86_64__) || defined(__i386__)
    if (k != &pbs2p_kernels_ref && cpu.avx2 && cpu.f16c) return pbs2p_sb_quantize_avx2;
#endif
    (void)k;
    return pbs2p_sb_quantize_ref;
}

pbs2p_nm_decode_fn pbs2p_nm_decoder(const pbs2p_kernels *k) {
    pthread_once(&cpu_once, cpu_init);
    if (k == &pbs2p_kernels_ref) return pbs2p_nm_decode_ref;
#if defined(__x86_64__) || defined(__i386__)
    /* PDEP is microcoded (slow) on AMD before Zen 3, which has no AVX-512 either: VBMI implies a fast PDEP */
    if (cpu.avx512f && cpu.avx512bw && cpu.avx512vbmi && cpu.bmi2) return pbs2p_nm_decode_vbmi;
#endif
    return pbs2p_nm_decode_lut;
}

/* Planes decoded per call for a few-token GEMM: 16 KB, in L1 beside the activations. Prefill (>= NM_WHOLE_TOK
 * tokens) decodes the thread's whole row range once (a heap buffer; the chunks again if it cannot get one), so
 * kernels with per-call set-up (the VNNI transpose) pay it once. */
enum { NM_CHUNK_WORDS = 2048, NM_WHOLE_TOK = 8 };
_Static_assert(NM_CHUNK_WORDS >= 2 * (PBS2P_SPEC_MAX_BLOCK_SIZE / 64), "one row of the largest K fits the buffer");

typedef struct nm_view {
    uint64_t *buf;
    _Alignas(64) uint64_t stack[NM_CHUNK_WORDS]; /* 64-byte aligned like a mapped planes tensor */
    int32_t chunk;
    int heap;
} nm_view;

static void nm_view_init(nm_view *v, const pbs2p_sb_weight *w, int32_t n_tok, int32_t r0, int32_t r1) {
    const size_t row_words = (size_t)2 * w->n_words;
    v->heap = 0;
    v->buf = v->stack;
    v->chunk = (int32_t)(NM_CHUNK_WORDS / row_words); /* >= 1: K <= MAX_SB_K (checked at load) */
    if (n_tok >= NM_WHOLE_TOK) {
        uint64_t *p = aligned_alloc(64, ((size_t)(r1 - r0) * row_words * 8 + 63) & ~(size_t)63);
        if (p != NULL) {
            v->buf = p;
            v->heap = 1;
            v->chunk = r1 - r0;
        }
    }
}

/* Rows [r0, r0 + g) of an N:M-coded w, decoded into buf, as a planes weight of g rows. */
static pbs2p_sb_weight nm_decoded(const pbs2p_sb_weight *w, pbs2p_nm_decode_fn dec, int32_t r0, int32_t g,
                                  uint64_t *buf) {
    dec(w, r0, r0 + g, buf);
    pbs2p_sb_weight v = *w;
    v.n_out = g;
    v.planes = buf;
    v.nm = NULL;
    v.alpha = w->alpha + (size_t)r0 * w->n_terms * w->n_blocks;
    v.mu = w->mu + (size_t)r0 * w->n_blocks;
    return v;
}

void pbs2p_sb_gemm_any(const pbs2p_kernels *k, const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y,
                       int64_t ldy, int32_t r0, int32_t r1) {
    if (w->nm == NULL) {
        k->sb_gemm(w, act, y, ldy, r0, r1);
        return;
    }
    const pbs2p_nm_decode_fn dec = pbs2p_nm_decoder(k);
    nm_view v;
    nm_view_init(&v, w, act->n_tok, r0, r1);
    for (int32_t rc = r0; rc < r1; rc += v.chunk) {
        const int32_t g = r1 - rc < v.chunk ? r1 - rc : v.chunk;
        const pbs2p_sb_weight d = nm_decoded(w, dec, rc, g, v.buf);
        k->sb_gemm(&d, act, y + rc, ldy, 0, g);
    }
    if (v.heap) free(v.buf);
}

void pbs2p_sb_sums_any(const pbs2p_kernels *k, const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t *sums,
                       int32_t r0, int32_t r1) {
    if (w->nm == NULL) {
        k->sb_sums(w, act, sums, r0, r1);
        return;
    }
    /* sums are [tok][r1 - r0][2][T][nb]: one chunk's rows are not contiguous across tokens, so decode all rows */
    const size_t words = (size_t)(r1 - r0) * 2 * w->n_words;
    uint64_t *buf = aligned_alloc(64, (words * 8 + 63) & ~(size_t)63);
    if (buf == NULL) { /* the tests' and benchmarks' entry point, not the model's: say so and leave zeros */
        pbs2p_log(PBS2P_LOG_ERROR, "pbs2p_sb_sums_any: out of memory for %zu decoded words", words);
        memset(sums, 0, (size_t)act->n_tok * (r1 - r0) * 2 * w->n_terms * w->n_blocks * sizeof *sums);
        return;
    }
    const pbs2p_sb_weight d = nm_decoded(w, pbs2p_nm_decoder(k), r0, r1 - r0, buf);
    k->sb_sums(&d, act, sums, 0, r1 - r0);
    free(buf);
}

const char *pbs2p_kernel_name(void) { return pbs2p_kernels_get()->name; }

pbs2p_status pbs2p_set_kernel(const char *name) {
    pthread_once(&current_once, current_init);
    const pbs2p_kernels *k = pbs2p_kernels_find(name);
    if (k == NULL)
        return PBS2P_FAIL(PBS2P_ERR_UNSUPPORTED,
                          "kernel \"%s\" is not available on this CPU/build (known: scalar, avx2, avx2-expand, "
                          "avx512, avx512-expand, neon, neon-expand, auto)",
                          name);
    atomic_store_explicit(&current, k, memory_order_release);
    return PBS2P_OK;
}

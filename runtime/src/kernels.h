/* Internal: matmul kernels. The scalar reference (kernels-ref.c) is the definition; every SIMD path must
 * produce bit-identical output (integer sums equal, float combination shared: pbs2p_sb_combine_row).
 * Kernel selection lives in one place: kernels.c (pbs2p_kernels_get). See docs/format.md for the math. */
#ifndef PBS2P_KERNELS_H
#define PBS2P_KERNELS_H

#include <stdint.h>
#include "pbs2p.h"

/* A sparse-binary linear layer, pointing into the mapped file (docs/format.md "sparse-binary encoding"). */
typedef struct pbs2p_sb_weight {
    int32_t n_out;        /* R rows */
    int32_t n_in;         /* K columns */
    int32_t n_terms;      /* T >= 1 */
    int32_t n_words;      /* W = ceil(K/64) */
    int32_t n_blocks;     /* nb = ceil(K/bs) */
    int32_t block_words;  /* bs/64 */
    const uint64_t *planes; /* [R][T][2][W]: pos plane then neg plane per term (64-byte aligned base) */
    const uint16_t *alpha;  /* f16 [R][T][nb] */
    const uint16_t *mu;     /* f16 [R][nb] */
    /* The N:M code (docs/format.md "The N:M code"): when nm != NULL the layer has one term, planes is NULL, and
     * row r's bits are the nm_row_bytes bytes at nm + r·nm_row_bytes (K/M pattern indices, then the signs). */
    const uint8_t *nm;
    int32_t nm_n, nm_m, nm_row_bytes;
} pbs2p_sb_weight;

/* --- the N:M code ----------------------------------------------------------------------------------------- */
/* Bits of one group's pattern index, ceil(log2 C(m, n)) (0 for n == m); number of patterns C(m, n). */
int32_t pbs2p_nm_pattern_bits(int32_t n, int32_t m);
int32_t pbs2p_nm_patterns(int32_t n, int32_t m);
/* The C(m, n) masks, ascending (70 bytes, zero past the count), for the decoders. */
const uint8_t *pbs2p_nm_masks(int32_t n, int32_t m);
/* Bytes of one row of K columns (K % 64 == 0). */
int32_t pbs2p_nm_row_bytes(int32_t K, int32_t n, int32_t m);
/* The first (row, group) whose pattern index is >= C(m, n), as row·(K/m) + group, or -1 when all are valid. */
int64_t pbs2p_nm_first_bad(const pbs2p_sb_weight *w);
/* Rows [r0, r1) of an N:M-coded weight as planes: out [r1-r0][2][W] (pos, neg), exactly the bits the code
 * stands for. The reference is the definition; every other decoder writes the same words. */
typedef void (*pbs2p_nm_decode_fn)(const pbs2p_sb_weight *w, int32_t r0, int32_t r1, uint64_t *out);
void pbs2p_nm_decode_ref(const pbs2p_sb_weight *w, int32_t r0, int32_t r1, uint64_t *out);
void pbs2p_nm_decode_lut(const pbs2p_sb_weight *w, int32_t r0, int32_t r1, uint64_t *out); /* table-driven, portable */
#if defined(__x86_64__) || defined(__i386__)
void pbs2p_nm_decode_vbmi(const pbs2p_sb_weight *w, int32_t r0, int32_t r1, uint64_t *out); /* AVX512-VBMI + BMI2 */
#endif

/* One or more tokens' activations, quantized for sparse-binary layers of input size K (= n_in). */
typedef struct pbs2p_sb_act {
    int32_t n_tok;
    int32_t n_words;      /* W */
    int32_t n_blocks;     /* nb */
    int32_t block_words;
    int8_t *q;            /* [n_tok][W*64] int8 values, zero padded */
    float *scale;         /* [n_tok][nb]  s_b = amax_b / 127 */
    uint64_t *xplanes;    /* [n_tok][W][8]  bit-plane k of u = q + 128, per 64-column word */
} pbs2p_sb_act;

/* Bytes needed for the three arrays of an act of n_tok tokens and K columns (caller allocates, 64-aligned). */
size_t pbs2p_sb_act_bytes(int32_t n_tok, int32_t K, int32_t block_size);
/* Lay out act over `mem` (pbs2p_sb_act_bytes bytes, 64-byte aligned). */
void pbs2p_sb_act_init(pbs2p_sb_act *act, void *mem, int32_t n_tok, int32_t K, int32_t block_size);
/* Quantize tokens [t0, t1) of x ([n_tok][K] f32) into act (q, scale, xplanes). Reference definition. */
void pbs2p_sb_quantize_ref(pbs2p_sb_act *act, const float *x, int32_t K, int32_t t0, int32_t t1);

/* The shared float combination of one row (docs/format.md order): sums are [T][nb] pos and [T][nb] neg
 * int32, xs the token's nb block scales. */
float pbs2p_sb_combine_row(const pbs2p_sb_weight *w, int32_t row, const int32_t *spos, const int32_t *sneg,
                           const float *xs);

/* Integer sums of one row for one token: spos/sneg [T][nb]. Reference definition. */
void pbs2p_sb_row_sums_ref(const pbs2p_sb_weight *w, int32_t row, const pbs2p_sb_act *act, int32_t tok,
                           int32_t *spos, int32_t *sneg);

/* y[t][r] for t < act->n_tok and r in [r0, r1), y row stride ldy floats. Adds nothing (no bias). */
typedef void (*pbs2p_sb_gemm_fn)(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y, int64_t ldy,
                                 int32_t r0, int32_t r1);
/* Same contract, integer part only: sums [n_tok][r1-r0][2][T][nb] (for the bit-exact kernel tests). */
typedef void (*pbs2p_sb_sums_fn)(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t *sums,
                                 int32_t r0, int32_t r1);

/* Q8_0 (ggml layout: f16 d + 32 int8) × Q8_0-quantized activations with f32 block scales. */
typedef struct pbs2p_q8_act {
    int32_t n_tok, n_blocks;  /* K / 32 blocks */
    int8_t *q;                /* [n_tok][K] */
    float *d;                 /* [n_tok][n_blocks] */
} pbs2p_q8_act;
/* d = amax/127, q = roundf(x * (127/amax)) (0 when amax == 0) — same rule as the sparse-binary quantizer. */
void pbs2p_q8_quantize_ref(pbs2p_q8_act *act, const float *x, int32_t K, int32_t t0, int32_t t1);
/* y[t][r] = Σ_blocks d_w · d_x · Σ q_w q_x, blocks ascending, for rows [r0, r1) of W (rows of K/32 blocks). */
typedef void (*pbs2p_q8_gemm_fn)(const uint8_t *w, int32_t K, const pbs2p_q8_act *act, float *y, int64_t ldy,
                                 int32_t r0, int32_t r1);

/* Q4_0 (ggml layout: f16 d + 16 bytes; element j < 16 is the low nibble of byte j, element j + 16 its high
 * nibble; value d·(nibble − 8)) × the same Q8_0-quantized activations: y[t][r] = Σ_blocks d_w · d_x ·
 * Σ (nibble − 8)·q_x, blocks ascending — the Q8_0 kernel's contract with 18-byte blocks. */
typedef pbs2p_q8_gemm_fn pbs2p_q4_gemm_fn;

/* Q3 (pbs2p's block, docs/format.md "Q3 blocks": f16 d, qs[8], qh[4]; element j has q = ((qs[j % 8] >> 2·(j / 8))
 * & 3) | ((qh[j / 8] >> (j % 8)) & 1) << 2, value d·(q − 4)) × the same activations: the Q8_0 contract with 14-byte
 * blocks. */
typedef pbs2p_q8_gemm_fn pbs2p_q3_gemm_fn;

/* Same contract and bit-identical output as pbs2p_sb_quantize_ref. */
typedef void (*pbs2p_sb_quantize_fn)(pbs2p_sb_act *act, const float *x, int32_t K, int32_t t0, int32_t t1);

typedef struct pbs2p_kernels {
    const char *name;           /* "scalar", "avx2", "avx512", "neon" (popcount), "avx2-expand", ... */
    pbs2p_sb_gemm_fn sb_gemm;
    pbs2p_sb_sums_fn sb_sums;
    pbs2p_q8_gemm_fn q8_gemm;
    pbs2p_q4_gemm_fn q4_gemm;
    pbs2p_q3_gemm_fn q3_gemm;
} pbs2p_kernels;

/* The activation quantizer to pair with table k: a SIMD one where this build and CPU have it, else
 * pbs2p_sb_quantize_ref. Every one is bit-identical to the reference (q, scale and xplanes). */
pbs2p_sb_quantize_fn pbs2p_sb_quantizer(const pbs2p_kernels *k);
#if defined(__x86_64__) || defined(__i386__)
void pbs2p_sb_quantize_avx2(pbs2p_sb_act *act, const float *x, int32_t K, int32_t t0, int32_t t1); /* AVX2 + F16C */
#endif

/* Reference kernels (always available). */
void pbs2p_sb_gemm_ref(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y, int64_t ldy,
                       int32_t r0, int32_t r1);
void pbs2p_sb_sums_ref(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t *sums, int32_t r0, int32_t r1);
void pbs2p_q8_gemm_ref(const uint8_t *w, int32_t K, const pbs2p_q8_act *act, float *y, int64_t ldy,
                       int32_t r0, int32_t r1);
void pbs2p_q4_gemm_ref(const uint8_t *w, int32_t K, const pbs2p_q8_act *act, float *y, int64_t ldy,
                       int32_t r0, int32_t r1);
void pbs2p_q3_gemm_ref(const uint8_t *w, int32_t K, const pbs2p_q8_act *act, float *y, int64_t ldy,
                       int32_t r0, int32_t r1);
extern const pbs2p_kernels pbs2p_kernels_ref;

/* SIMD tables (kernels-x86.c, kernels-arm.c); use them through pbs2p_kernels_find, which checks the CPU. */
/* Two families compute the same sums: popcount over activation bit-planes ("avx2", "avx512", "neon") and
 * bit expansion of the weight word into byte masks over the int8 activations ("*-expand"). */
#if defined(__x86_64__) || defined(__i386__)
extern const pbs2p_kernels pbs2p_kernels_avx2;               /* popcount: AVX2 + POPCNT + F16C */
extern const pbs2p_kernels pbs2p_kernels_avx512;             /* popcount: AVX512F + BW + VPOPCNTDQ (+ F16C) */
extern const pbs2p_kernels pbs2p_kernels_avx512vnni;         /* same name "avx512", Q8 dot products with VPDPBUSD */
extern const pbs2p_kernels pbs2p_kernels_avx2_expand;        /* expand: AVX2 + POPCNT + F16C */
extern const pbs2p_kernels pbs2p_kernels_avx512_expand;      /* expand: AVX512F + AVX512BW (+ F16C) */
extern const pbs2p_kernels pbs2p_kernels_avx512vnni_expand;  /* same name "avx512-expand", VPDPBUSD Q8 */
#endif
#if defined(__ARM_NEON)
extern const pbs2p_kernels pbs2p_kernels_neon;               /* popcount: vcnt + vpadal */
extern const pbs2p_kernels pbs2p_kernels_neon_expand;        /* expand: vtbl/vtst byte masks */
#endif
/* Every table name pbs2p_kernels_find knows (NULL-terminated), for tests and benchmarks. */
extern const char *const pbs2p_kernel_names[];

/* The N:M decoder to pair with table k (the reference for the scalar table; the fastest this CPU has otherwise). */
pbs2p_nm_decode_fn pbs2p_nm_decoder(const pbs2p_kernels *k);
/* k->sb_gemm / k->sb_sums for any sparse-binary weight: an N:M-coded one is decoded to planes a few rows at a time
 * (into a buffer in L1) and handed to k's kernel, so its sums are the planes' sums bit for bit. */
void pbs2p_sb_gemm_any(const pbs2p_kernels *k, const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y,
                       int64_t ldy, int32_t r0, int32_t r1);
void pbs2p_sb_sums_any(const pbs2p_kernels *k, const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t *sums,
                       int32_t r0, int32_t r1);

/* The kernel table in use (chosen once from CPUID / PBS2P_KERNEL / pbs2p_set_kernel). Thread-safe. */
const pbs2p_kernels *pbs2p_kernels_get(void);
/* Look up a table by name if this build and CPU support it (NULL otherwise). */
const pbs2p_kernels *pbs2p_kernels_find(const char *name);

#endif

/* x86 kernels: AVX2 and AVX-512, selected per function with target attributes (kernels.c checks CPUID).
 * Two families of sparse-binary kernels compute the same integer sums Σ_{j∈P} q_j:
 *   - popcount ("avx2", "avx512"; the section at the end of this file): AND of the weight word with the 8
 *     activation bit-planes, popcounts weighted by 2^k (docs/format.md "the popcount form");
 *   - bit expansion ("avx2-expand", "avx512-expand"; described here).
 *
 * Expand family. Instead of popcounts over the 8 activation bit-planes, these kernels turn the 64 bits of a
 * weight word P into a 64-byte mask and sum the selected int8 activations q_j directly:
 *   AVX-512: kmovq P -> k; vmovdqu8 {k}{z} q; vpmaddubsw(1, ·) -> int16 pairs; vpaddw.   (3 vector uops / word)
 *   AVX2:    vpshufb replicates byte i of P over 8 lanes, AND+CMPEQ with (1<<bit) gives 0x00/0xFF per column,
 *            AND q, vpmaddubsw(1, ·), vpaddw.                                          (6 vector uops / 32 cols)
 * The mask of a word is built once and applied to a tile of up to 4 tokens (prefill), and one row's planes
 * (T·2·W·8 bytes) stay in L1 across tiles, so each weight row is read from memory once per call.
 * int16 lanes get at most 2·254 per word (AVX2: 254 per word), so they are widened to int32 every 32 words.
 *
 * Q8_0: per block |w|·sign(x, w) with vpmaddubsw (|w| <= 128, |x| <= 127: pairs fit int16) and vpmaddwd
 * (or VPDPBUSD), 8 blocks' int32 vectors reduced together with hadd, then the float steps of the reference
 * (d_w·d_x, ·isum, acc += in ascending block order) so the result is bit-identical. */
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"

#define TARGET_AVX2 __attribute__((target("avx2,popcnt,f16c")))
#define TARGET_AVX512 __attribute__((target("avx2,popcnt,f16c,avx512f,avx512bw")))
#define TARGET_AVX512VNNI __attribute__((target("avx2,popcnt,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define INLINE static inline __attribute__((always_inline))

enum { SB_TILE = 4, SB_BUF = 8192, FLUSH_WORDS = 32 };

/* Writes out[tt·tok_stride + s·T·nb + t·nb + b] (s = 0 pos, 1 neg) for tokens tok0 .. tok0+nt-1 of one row. */
typedef void (*sb_tile_fn)(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t row, int32_t tok0, int32_t nt,
                           int32_t *out, size_t tok_stride);

static int32_t tile_tokens(const pbs2p_sb_weight *w) {
    int32_t per_tok = 2 * w->n_terms * w->n_blocks, nt = SB_BUF / per_tok;
    return nt < 1 ? 1 : nt > SB_TILE ? SB_TILE : nt;
}

static void sb_sums_drive(sb_tile_fn tile, const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t *sums,
                          int32_t r0, int32_t r1) {
    const size_t TB2 = 2 * (size_t)w->n_terms * w->n_blocks;
    const int32_t ntile = tile_tokens(w);
    for (int32_t r = r0; r < r1; r++)
        for (int32_t t0 = 0; t0 < act->n_tok; t0 += ntile) {
            int32_t nt = act->n_tok - t0 < ntile ? act->n_tok - t0 : ntile;
            tile(w, act, r, t0, nt, sums + ((size_t)t0 * (r1 - r0) + (r - r0)) * TB2, (size_t)(r1 - r0) * TB2);
        }
}

/* ------------------------------------------------------- SIMD row combination ----------------------------
 * pbs2p_sb_combine_row in two vector passes, bit-identical to it:
 *   contrib: per row, lanes = blocks: c_b = s_b·(0 + α_0·d_0 (+ α_t·d_t ...) + μ·k), exactly the scalar float
 *            steps per lane, f16 -> f32 by F16C (exact);
 *   sum:     per group of G rows, lanes = rows: acc = 0, then acc += c_b for b ascending (a gather of column b
 *            of the group's contributions), the scalar order of every row.
 * Row by row, the scalar combination's ~10 software f16 conversions per block and its chain of nb dependent
 * adds (with lane extracts on the port the popcounts need) cost as much as the popcount kernel itself. */
typedef void (*sb_contrib_fn)(const pbs2p_sb_weight *w, int32_t row, const int32_t *spos, const int32_t *sneg,
                              const float *xs, float *c);
/* y[i] = Σ_b c[i·ldc + b] in b order for the g <= G rows i of a group. */
typedef void (*sb_rowsum_fn)(const float *c, int32_t ldc, int32_t nb, int32_t g, float *y);

enum { SB_GROUP_MAX = 16, SB_MAX_NB = 64 }; /* contributions buffered for nb <= 64 (K <= 8192 at bs = 128) */

INLINE void sb_gemm_drive(sb_tile_fn tile, sb_contrib_fn contrib, sb_rowsum_fn rowsum, const int32_t G,
                          const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y, int64_t ldy, int32_t r0,
                          int32_t r1) {
    const int32_t TB = w->n_terms * w->n_blocks, nb = w->n_blocks, ldc = (nb + 15) & ~15;
    const int32_t ntile = tile_tokens(w);
    /* Sums of a whole row group are written before any is read back: the tiles store them as scalars, and a
     * vector load of scalars still in the store buffer cannot be forwarded (a ~20-cycle stall per row that
     * was 20 % of SmolLM2 decode); a group later they are plain L1 loads. + 16: contrib's vector loads of
     * sums may run past the last block. */
    int32_t buf[2 * SB_BUF + 16];
    float c[SB_TILE * SB_GROUP_MAX * SB_MAX_NB];
    if ((size_t)2 * TB > SB_BUF || nb > SB_MAX_NB) { /* beyond the buffers; keep exact results anyway */
        pbs2p_sb_gemm_ref(w, act, y, ldy, r0, r1);
        return;
    }
    for (int32_t rg = r0; rg < r1; rg += G) {
        const int32_t g = r1 - rg < G ? r1 - rg : G;
        for (int32_t t0 = 0; t0 < act->n_tok; t0 += ntile) {
            const int32_t nt = act->n_tok - t0 < ntile ? act->n_tok - t0 : ntile;
            const size_t per_row = (size_t)nt * 2 * TB;
            const int32_t batch = (size_t)g * per_row <= 2 * SB_BUF ? g : 1; /* rows whose sums fit buf */
            for (int32_t i0 = 0; i0 < g; i0 += batch) {
                const int32_t i1 = i0 + batch < g ? i0 + batch : g;
                for (int32_t i = i0; i < i1; i++) tile(w, act, rg + i, t0, nt, buf + (i - i0) * per_row, (size_t)2 * TB);
                for (int32_t i = i0; i < i1; i++)
                    for (int32_t tt = 0; tt < nt; tt++) {
                        const int32_t *sums = buf + (i - i0) * per_row + (size_t)tt * 2 * TB;
                        contrib(w, rg + i, sums, sums + TB, act->scale + (size_t)(t0 + tt) * nb,
                                c + ((size_t)tt * G + i) * ldc);
                    }
            }
            for (int32_t tt = 0; tt < nt; tt++)
                rowsum(c + (size_t)tt * G * ldc, ldc, nb, g, y + (int64_t)(t0 + tt) * ldy + rg);
        }
    }
}

/* n <= LANES f16 values at p, zero padded (no read past p[n-1]). */
#define LOAD_F16(p, n, LANES, tmp) \
    ((n) == (LANES) ? (const uint16_t *)(p) : (memset(tmp, 0, sizeof tmp), memcpy(tmp, p, (size_t)(n) * 2), tmp))

/* Writes c[0 .. round_up(nb, 8)); lanes past nb hold garbage that rowsum never reads. */
TARGET_AVX2 static void contrib_avx2(const pbs2p_sb_weight *w, int32_t row, const int32_t *sp, const int32_t *sn,
                                     const float *xs, float *c) {
    const int32_t T = w->n_terms, nb = w->n_blocks;
    const uint16_t *alpha = w->alpha + (size_t)row * T * nb, *mu = w->mu + (size_t)row * nb;
    static const int32_t lane_mask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    for (int32_t b0 = 0; b0 < nb; b0 += 8) {
        const int32_t n = nb - b0 < 8 ? nb - b0 : 8;
        const __m256i m = _mm256_loadu_si256((const __m256i *)(lane_mask + 8 - n));
        uint16_t tmp[8];
        __m256 s = _mm256_setzero_ps();
        for (int32_t t = 0; t < T; t++) {
            const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)LOAD_F16(alpha + (size_t)t * nb + b0, n, 8, tmp)));
            const __m256i d = _mm256_sub_epi32(_mm256_loadu_si256((const __m256i *)(sp + t * nb + b0)),
                                               _mm256_loadu_si256((const __m256i *)(sn + t * nb + b0)));
            s = _mm256_add_ps(s, _mm256_mul_ps(a, _mm256_cvtepi32_ps(d)));
        }
        const __m256 vm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)LOAD_F16(mu + b0, n, 8, tmp)));
        const __m256i k = _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(sp + b0)),
                                           _mm256_loadu_si256((const __m256i *)(sn + b0)));
        s = _mm256_add_ps(s, _mm256_mul_ps(vm, _mm256_cvtepi32_ps(k)));
        _mm256_storeu_ps(c + b0, _mm256_mul_ps(_mm256_maskload_ps(xs + b0, m), s));
    }
}

TARGET_AVX2 static void rowsum_avx2(const float *c, int32_t ldc, int32_t nb, int32_t g, float *y) {
    static const int32_t lane_mask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    const __m256i m = _mm256_loadu_si256((const __m256i *)(lane_mask + 8 - g));
    const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(ldc));
    __m256 acc = _mm256_setzero_ps();
    for (int32_t b = 0; b < nb; b++)
        acc = _mm256_add_ps(acc, _mm256_mask_i32gather_ps(_mm256_setzero_ps(), c + b, idx, _mm256_castsi256_ps(m), 4));
    _mm256_maskstore_ps(y, m, acc);
}

/* Writes c[0 .. round_up(nb, 16)). f16 tails by a masked 512-bit vmovdqu16 (AVX512BW; masked-off elements are
 * not read, so nothing past the row is touched), of which the low 16 halves are used. */
TARGET_AVX512 INLINE __m512 avx512_load_f16(const uint16_t *p, __mmask32 m) {
    return _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(m, p)));
}

TARGET_AVX512 static void contrib_avx512(const pbs2p_sb_weight *w, int32_t row, const int32_t *sp,
                                         const int32_t *sn, const float *xs, float *c) {
    const int32_t T = w->n_terms, nb = w->n_blocks;
    const uint16_t *alpha = w->alpha + (size_t)row * T * nb, *mu = w->mu + (size_t)row * nb;
    for (int32_t b0 = 0; b0 < nb; b0 += 16) {
        const int32_t n = nb - b0 < 16 ? nb - b0 : 16;
        const __mmask16 m = (__mmask16)((1u << n) - 1u);
        __m512 s = _mm512_setzero_ps();
        for (int32_t t = 0; t < T; t++) {
            const __m512 a = avx512_load_f16(alpha + (size_t)t * nb + b0, m);
            const __m512i d = _mm512_sub_epi32(_mm512_loadu_si512((const void *)(sp + t * nb + b0)),
                                               _mm512_loadu_si512((const void *)(sn + t * nb + b0)));
            s = _mm512_add_ps(s, _mm512_mul_ps(a, _mm512_cvtepi32_ps(d)));
        }
        const __m512 vm = avx512_load_f16(mu + b0, m);
        const __m512i k = _mm512_add_epi32(_mm512_loadu_si512((const void *)(sp + b0)),
                                           _mm512_loadu_si512((const void *)(sn + b0)));
        s = _mm512_add_ps(s, _mm512_mul_ps(vm, _mm512_cvtepi32_ps(k)));
        _mm512_storeu_ps(c + b0, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xs + b0), s));
    }
}

TARGET_AVX512 static void rowsum_avx512(const float *c, int32_t ldc, int32_t nb, int32_t g, float *y) {
    const __mmask16 m = (__mmask16)((1u << g) - 1u);
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(ldc));
    __m512 acc = _mm512_setzero_ps();
    for (int32_t b = 0; b < nb; b++)
        acc = _mm512_add_ps(acc, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, c + b, 4));
    _mm512_mask_storeu_ps(y, m, acc);
}

/* ------------------------------------------------------ SIMD activation quantizer ------------------------
 * pbs2p_sb_quantize_ref, 8 floats a step: amax by vmaxps (NaN inputs are skipped as by the scalar `a > amax`:
 * vmaxps(a, m) returns m when a is NaN), q = roundf(x·(127/amax)) with roundf built exactly from truncation
 * (t = trunc(v); |v − t| is exact; t ± 1 when it is >= 0.5: half away from zero), NaN -> 0, clamp ±127.
 * Bit-plane k of u = q ^ 0x80 over 64 columns: vpsllw by 7 − k puts bit k of every byte in its top bit
 * (bits cross only into the upper byte of a 16-bit lane, below its top bit) and vpmovmskb collects them.
 * Blocks whose length is not a multiple of 32 (K not a multiple of 32) take the scalar reference. */
TARGET_AVX2 void pbs2p_sb_quantize_avx2(pbs2p_sb_act *act, const float *x, int32_t K, int32_t t0, int32_t t1) {
    const int32_t W = act->n_words, nb = act->n_blocks, bs = act->block_words * 64;
    if (K % 32 != 0) {
        pbs2p_sb_quantize_ref(act, x, K, t0, t1);
        return;
    }
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 signm = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256 lim = _mm256_set1_ps(127.0f), nlim = _mm256_set1_ps(-127.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), flip = _mm256_set1_epi8((char)0x80);
    for (int32_t t = t0; t < t1; t++) {
        const float *xt = x + (size_t)t * K;
        int8_t *q = act->q + (size_t)t * W * 64;
        float *sc = act->scale + (size_t)t * nb;
        memset(q + K, 0, (size_t)W * 64 - (size_t)K);
        for (int32_t b = 0; b < nb; b++) {
            const int32_t j0 = b * bs, n = K - j0 < bs ? K - j0 : bs;
            __m256 mx = _mm256_setzero_ps();
            for (int32_t j = 0; j < n; j += 8) mx = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(xt + j0 + j), absm), mx);
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
            const float amax = _mm_cvtss_f32(m4);
            if (!(amax > 0.0f) || !(amax <= 3.402823466e38f)) { /* zero or non-finite block: all q = 0 */
                memset(q + j0, 0, (size_t)n);
                sc[b] = 0.0f;
                continue;
            }
            const __m256 inv = _mm256_set1_ps(127.0f / amax);
            for (int32_t j = 0; j < n; j += 32) {
                __m256i iv[4];
                for (int i = 0; i < 4; i++) {
                    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xt + j0 + j + 8 * i), inv);
                    v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));
                    __m256 r = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                    const __m256 ge = _mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(v, r), absm), half, _CMP_GE_OQ);
                    r = _mm256_add_ps(r, _mm256_and_ps(ge, _mm256_or_ps(_mm256_and_ps(v, signm), one)));
                    iv[i] = _mm256_cvttps_epi32(_mm256_max_ps(_mm256_min_ps(r, lim), nlim));
                }
                const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
                _mm256_storeu_si256((__m256i *)(q + j0 + j), _mm256_permutevar8x32_epi32(p, perm));
            }
            sc[b] = amax / 127.0f;
        }
        uint64_t *xp = act->xplanes + (size_t)t * W * 8;
        for (int32_t wi = 0; wi < W; wi++) {
            const __m256i u0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(q + (size_t)wi * 64)), flip);
            const __m256i u1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(q + (size_t)wi * 64 + 32)), flip);
            #pragma GCC unroll 8
            for (int k = 0; k < 8; k++) {
                const uint32_t lo = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(u0, 7 - k));
                const uint32_t hi = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(u1, 7 - k));
                xp[(size_t)wi * 8 + k] = (uint64_t)lo | (uint64_t)hi << 32;
            }
        }
    }
}

/* ---------------------------------------------------------------- AVX2 ---------------------------------- */

TARGET_AVX2 INLINE int32_t avx2_hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* Sums of one plane (W words) over every block for NT tokens: out[tt·stride + b]. */
TARGET_AVX2 INLINE void avx2_plane(const uint64_t *plane, const int8_t *q, size_t q_stride, int32_t W, int32_t nb,
                                   int32_t bw, int32_t *out, size_t stride, const int NT) {
    const __m256i idx_lo = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i idx_hi = _mm256_setr_epi8(4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5,
                                            6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7);
    const __m256i bitsel = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int32_t b = 0; b < nb; b++) {
        const int32_t i_end = (b + 1) * bw < W ? (b + 1) * bw : W;
        __m256i acc32[SB_TILE];
        #pragma GCC unroll 4
        for (int tt = 0; tt < NT; tt++) acc32[tt] = _mm256_setzero_si256();
        for (int32_t i0 = b * bw; i0 < i_end; i0 += FLUSH_WORDS) {
            const int32_t i1 = i0 + FLUSH_WORDS < i_end ? i0 + FLUSH_WORDS : i_end;
            __m256i acc16[SB_TILE];
            #pragma GCC unroll 4
            for (int tt = 0; tt < NT; tt++) acc16[tt] = _mm256_setzero_si256();
            for (int32_t i = i0; i < i1; i++) {
                const __m256i p = _mm256_set1_epi64x((long long)plane[i]);
                const __m256i m_lo = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(p, idx_lo), bitsel), bitsel);
                const __m256i m_hi = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(p, idx_hi), bitsel), bitsel);
                #pragma GCC unroll 4
                for (int tt = 0; tt < NT; tt++) {
                    const int8_t *qi = q + tt * q_stride + (size_t)i * 64;
                    const __m256i x_lo = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)qi), m_lo);
                    const __m256i x_hi = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(qi + 32)), m_hi);
                    acc16[tt] = _mm256_add_epi16(acc16[tt], _mm256_maddubs_epi16(ones8, x_lo));
                    acc16[tt] = _mm256_add_epi16(acc16[tt], _mm256_maddubs_epi16(ones8, x_hi));
                }
            }
            #pragma GCC unroll 4
            for (int tt = 0; tt < NT; tt++)
                acc32[tt] = _mm256_add_epi32(acc32[tt], _mm256_madd_epi16(acc16[tt], ones16));
        }
        #pragma GCC unroll 4
        for (int tt = 0; tt < NT; tt++) out[tt * stride + b] = avx2_hsum_i32(acc32[tt]);
    }
}

TARGET_AVX2 static void avx2_tile(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t row, int32_t tok0,
                                  int32_t nt, int32_t *out, size_t tok_stride) {
    const int32_t T = w->n_terms, W = w->n_words, nb = w->n_blocks, bw = w->block_words;
    const size_t q_stride = (size_t)W * 64;
    const int8_t *q = act->q + (size_t)tok0 * q_stride;
    for (int32_t t = 0; t < T; t++)
        for (int32_t s = 0; s < 2; s++) {
            const uint64_t *plane = w->planes + (((size_t)row * T + t) * 2 + s) * W;
            int32_t *o = out + (size_t)s * T * nb + (size_t)t * nb;
            switch (nt) {
            case 1: avx2_plane(plane, q, q_stride, W, nb, bw, o, tok_stride, 1); break;
            case 2: avx2_plane(plane, q, q_stride, W, nb, bw, o, tok_stride, 2); break;
            case 3: avx2_plane(plane, q, q_stride, W, nb, bw, o, tok_stride, 3); break;
            default: avx2_plane(plane, q, q_stride, W, nb, bw, o, tok_stride, 4); break;
            }
        }
}

static void sb_sums_avx2(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t *sums, int32_t r0, int32_t r1) {
    sb_sums_drive(avx2_tile, w, act, sums, r0, r1);
}

static void sb_gemm_avx2(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y, int64_t ldy, int32_t r0,
                         int32_t r1) {
    sb_gemm_drive(avx2_tile, contrib_avx2, rowsum_avx2, 8, w, act, y, ldy, r0, r1);
}

/* 8 vectors of 8 int32 -> one vector of their 8 sums (v[0]'s sum in lane 0). */
TARGET_AVX2 INLINE __m256i avx2_hsum8(const __m256i v[8]) {
    __m256i s01 = _mm256_hadd_epi32(v[0], v[1]), s23 = _mm256_hadd_epi32(v[2], v[3]);
    __m256i s45 = _mm256_hadd_epi32(v[4], v[5]), s67 = _mm256_hadd_epi32(v[6], v[7]);
    __m256i s0123 = _mm256_hadd_epi32(s01, s23), s4567 = _mm256_hadd_epi32(s45, s67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(s0123, s4567, 0x20),
                            _mm256_permute2x128_si256(s0123, s4567, 0x31));
}

/* The reference's float steps for 8 blocks of `bytes` bytes (34: Q8_0, 18: Q4_0; f16 d first):
 * dd = d_w·d_x, c = dd·(float)isum, acc += c in block order. */
TARGET_AVX2 INLINE float q_accumulate8(float acc, const uint8_t *row, size_t bytes, int32_t b0, const float *xd,
                                       __m256i isum) {
    uint16_t dh[8];
    for (int j = 0; j < 8; j++) memcpy(&dh[j], row + (size_t)(b0 + j) * bytes, 2);
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dh));
    const __m256 c = _mm256_mul_ps(_mm256_mul_ps(dw, _mm256_loadu_ps(xd + b0)), _mm256_cvtepi32_ps(isum));
    float cs[8];
    _mm256_storeu_ps(cs, c);
    for (int j = 0; j < 8; j++) acc = acc + cs[j];
    return acc;
}

TARGET_AVX2 INLINE float q_accumulate1(float acc, const uint8_t *row, size_t bytes, int32_t b, const float *xd,
                                       int32_t isum) {
    uint16_t dh;
    memcpy(&dh, row + (size_t)b * bytes, 2);
    float dd = _cvtsh_ss(dh) * xd[b];
    float c = dd * (float)isum;
    return acc + c;
}

/* Rows outer, tokens inner: a row (nb·BYTES bytes) is read from memory once and from L1 for the other tokens.
 * BLOCK(blk, x) gives int32 lanes summing to the block's integer dot product. */
#define DEFINE_QGEMM(NAME, TARGET, BLOCK, BYTES)                                                                   \
    TARGET static void NAME(const uint8_t *w, int32_t K, const pbs2p_q8_act *act, float *y, int64_t ldy,         \
                            int32_t r0, int32_t r1) {                                                            \
        const int32_t nb = K / 32;                                                                               \
        for (int32_t r = r0; r < r1; r++) {                                                                      \
            const uint8_t *row = w + (size_t)r * nb * (BYTES);                                                   \
            for (int32_t t = 0; t < act->n_tok; t++) {                                                           \
                const int8_t *xq = act->q + (size_t)t * K;                                                       \
                const float *xd = act->d + (size_t)t * nb;                                                       \
                float acc = 0.0f;                                                                                \
                int32_t b = 0;                                                                                   \
                for (; b + 8 <= nb; b += 8) {                                                                    \
                    __m256i v[8];                                                                                \
                    for (int j = 0; j < 8; j++) v[j] = BLOCK(row + (size_t)(b + j) * (BYTES), xq + (size_t)(b + j) * 32); \
                    acc = q_accumulate8(acc, row, (BYTES), b, xd, avx2_hsum8(v));                                 \
                }                                                                                                \
                for (; b < nb; b++)                                                                              \
                    acc = q_accumulate1(acc, row, (BYTES), b, xd,                                                \
                                        avx2_hsum_i32(BLOCK(row + (size_t)b * (BYTES), xq + (size_t)b * 32)));   \
                y[(int64_t)t * ldy + r] = acc;                                                                   \
            }                                                                                                    \
        }                                                                                                        \
    }

/* Q4_0 block -> 32 int8 weights in -8..7 (low nibbles = elements 0..15, high nibbles = 16..31). */
TARGET_AVX2 INLINE __m256i avx2_q4_weights(const uint8_t *blk) {
    const __m128i qs = _mm_loadu_si128((const __m128i *)(blk + 2));
    const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), _mm256_set1_epi8(15));
    return _mm256_sub_epi8(nib, _mm256_set1_epi8(8));
}

/* Q3 block -> 32 int8 weights in -4..3: the 8 low-part bytes broadcast to four 64-bit lanes shifted right by 0, 2,
 * 4, 6 (lane k = elements 8k..8k+7), the 32 high bits spread to bytes (byte j of qh / 8 in lane j / 8, then bit j % 8
 * tested by compare). */
TARGET_AVX2 INLINE __m256i avx2_q3_weights(const uint8_t *blk) {
    uint64_t lo;
    uint32_t hi;
    memcpy(&lo, blk + 2, 8);
    memcpy(&hi, blk + 10, 4);
    const __m256i l = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x((long long)lo), _mm256_set_epi64x(6, 4, 2, 0)),
                                       _mm256_set1_epi8(3));
    const __m256i sel = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i h = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)hi), sel), bit);
    const __m256i h4 = _mm256_and_si256(_mm256_cmpeq_epi8(h, bit), _mm256_set1_epi8(4));
    return _mm256_sub_epi8(_mm256_or_si256(l, h4), _mm256_set1_epi8(4));
}

/* int32 lanes summing to Σ w_j·x_j over one 32-value block: maddubs of |w| and sign(x, w) (maddubs needs an
 * unsigned left operand). */
TARGET_AVX2 INLINE __m256i avx2_dot32(__m256i wv, __m256i xv) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}
TARGET_AVX2 INLINE __m256i avx2_q8_block(const uint8_t *blk, const int8_t *x) {
    return avx2_dot32(_mm256_loadu_si256((const __m256i *)(blk + 2)), _mm256_loadu_si256((const __m256i *)x));
}
TARGET_AVX2 INLINE __m256i avx2_q4_block(const uint8_t *blk, const int8_t *x) {
    return avx2_dot32(avx2_q4_weights(blk), _mm256_loadu_si256((const __m256i *)x));
}
DEFINE_QGEMM(q8_gemm_avx2, TARGET_AVX2, avx2_q8_block, 34)
TARGET_AVX2 INLINE __m256i avx2_q3_block(const uint8_t *blk, const int8_t *x) {
    return avx2_dot32(avx2_q3_weights(blk), _mm256_loadu_si256((const __m256i *)x));
}
DEFINE_QGEMM(q4_gemm_avx2, TARGET_AVX2, avx2_q4_block, 18)
DEFINE_QGEMM(q3_gemm_avx2, TARGET_AVX2, avx2_q3_block, 14)

const pbs2p_kernels pbs2p_kernels_avx2_expand = {"avx2-expand", sb_gemm_avx2, sb_sums_avx2, q8_gemm_avx2,
                                                 q4_gemm_avx2, q3_gemm_avx2};

/* -------------------------------------------------------------- AVX-512 --------------------------------- */

TARGET_AVX512 INLINE void avx512_plane(const uint64_t *plane, const int8_t *q, size_t q_stride, int32_t W, int32_t nb,
                                       int32_t bw, int32_t *out, size_t stride, const int NT) {
    const __m512i ones8 = _mm512_set1_epi8(1), ones16 = _mm512_set1_epi16(1);
    for (int32_t b = 0; b < nb; b++) {
        const int32_t i_end = (b + 1) * bw < W ? (b + 1) * bw : W;
        __m512i acc32[SB_TILE];
        #pragma GCC unroll 4
        for (int tt = 0; tt < NT; tt++) acc32[tt] = _mm512_setzero_si512();
        for (int32_t i0 = b * bw; i0 < i_end; i0 += FLUSH_WORDS) {
            const int32_t i1 = i0 + FLUSH_WORDS < i_end ? i0 + FLUSH_WORDS : i_end;
            __m512i acc16[SB_TILE];
            #pragma GCC unroll 4
            for (int tt = 0; tt < NT; tt++) acc16[tt] = _mm512_setzero_si512();
            for (int32_t i = i0; i < i1; i++) {
                const __mmask64 m = _cvtu64_mask64(plane[i]);
                #pragma GCC unroll 4
                for (int tt = 0; tt < NT; tt++) {
                    const __m512i x = _mm512_maskz_loadu_epi8(m, q + tt * q_stride + (size_t)i * 64);
                    acc16[tt] = _mm512_add_epi16(acc16[tt], _mm512_maddubs_epi16(ones8, x));
                }
            }
            #pragma GCC unroll 4
            for (int tt = 0; tt < NT; tt++)
                acc32[tt] = _mm512_add_epi32(acc32[tt], _mm512_madd_epi16(acc16[tt], ones16));
        }
        #pragma GCC unroll 4
        for (int tt = 0; tt < NT; tt++) out[tt * stride + b] = _mm512_reduce_add_epi32(acc32[tt]);
    }
}

TARGET_AVX512 static void avx512_tile(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t row, int32_t tok0,
                                      int32_t nt, int32_t *out, size_t tok_stride) {
    const int32_t T = w->n_terms, W = w->n_words, nb = w->n_blocks, bw = w->block_words;
    const size_t q_stride = (size_t)W * 64;
    const int8_t *q = act->q + (size_t)tok0 * q_stride;
    for (int32_t t = 0; t < T; t++)
        for (int32_t s = 0; s < 2; s++) {
            const uint64_t *plane = w->planes + (((size_t)row * T + t) * 2 + s) * W;
            int32_t *o = out + (size_t)s * T * nb + (size_t)t * nb;
            switch (nt) {
            case 1: avx512_plane(plane, q, q_stride, W, nb, bw, o, tok_stride, 1); break;
            case 2: avx512_plane(plane, q, q_stride, W, nb, bw, o, tok_stride, 2); break;
            case 3: avx512_plane(plane, q, q_stride, W, nb, bw, o, tok_stride, 3); break;
            default: avx512_plane(plane, q, q_stride, W, nb, bw, o, tok_stride, 4); break;
            }
        }
}

static void sb_sums_avx512(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t *sums, int32_t r0, int32_t r1) {
    sb_sums_drive(avx512_tile, w, act, sums, r0, r1);
}

static void sb_gemm_avx512(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y, int64_t ldy, int32_t r0,
                           int32_t r1) {
    sb_gemm_drive(avx512_tile, contrib_avx512, rowsum_avx512, 16, w, act, y, ldy, r0, r1);
}

/* VPDPBUSD: Σ |w|·sign(x, w) over groups of 4 straight into int32 lanes (one instruction per block). */
TARGET_AVX512VNNI INLINE __m256i vnni_q8_block(const uint8_t *blk, const int8_t *x) {
    const __m256i wv = _mm256_loadu_si256((const __m256i *)(blk + 2));
    const __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
}

TARGET_AVX512VNNI INLINE __m256i vnni_q4_block(const uint8_t *blk, const int8_t *x) {
    const __m256i wv = avx2_q4_weights(blk);
    const __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
}
DEFINE_QGEMM(q8_gemm_avx512vnni, TARGET_AVX512VNNI, vnni_q8_block, 34)
TARGET_AVX512VNNI INLINE __m256i vnni_q3_block(const uint8_t *blk, const int8_t *x) {
    const __m256i wv = avx2_q3_weights(blk);
    const __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
}
DEFINE_QGEMM(q4_gemm_avx512vnni, TARGET_AVX512VNNI, vnni_q4_block, 18)
DEFINE_QGEMM(q3_gemm_avx512vnni, TARGET_AVX512VNNI, vnni_q3_block, 14)

const pbs2p_kernels pbs2p_kernels_avx512_expand = {"avx512-expand", sb_gemm_avx512, sb_sums_avx512, q8_gemm_avx2,
                                                   q4_gemm_avx2, q3_gemm_avx2};
const pbs2p_kernels pbs2p_kernels_avx512vnni_expand = {"avx512-expand", sb_gemm_avx512, sb_sums_avx512,
                                                       q8_gemm_avx512vnni, q4_gemm_avx512vnni, q3_gemm_avx512vnni};
/* ====================================================== popcount family ======================================
 *
 * docs/format.md: with u_j = q_j + 128 and X_k the bit-plane k of u over a 64-column word,
 *   Σ_{j∈P} q_j = Σ_{k<8} 2^k·popcount(X_k & P) − 128·popcount(P).
 * Since u = q ^ 0x80, plane 7 of u is the complement of q's sign bit, and the correction folds into it:
 *   Σ_{j∈P} q_j = Σ_{k<7} 2^k·popcount(X_k & P) − 128·popcount(~X_7 & P)                        (*)
 * so every plane gets a constant weight w = (1, 2, 4, 8, 16, 32, 64, −128) and no popcount(P) is needed.
 * The 8 planes of one word are contiguous in act->xplanes ([tok][W][8] u64): one zmm, or two ymm.
 * Per block the kernels accumulate the 8 plane counts of the pos and of the neg plane separately, weight them
 * once per block, and reduce the horizontal sums of 8 blocks together. */

/* ---------------------------------------------------------- AVX-512 popcount ---------------------------- */

#define TARGET_AVX512POP __attribute__((target("avx2,popcnt,f16c,avx512f,avx512bw,avx512vpopcntdq")))

enum { POP512_CHUNK = 256 }; /* words per int16-safe chunk: plane counts <= 64·256 < 2^15 for vpmaddwd */

/* 8 block vectors m[j] (dword 2k = weighted pos count of plane k, 2k+1 = neg) -> one vector of their 16
 * horizontal sums: dword 4j = pos of m[j], 4j+1 = neg of m[j], 4j+2 = pos of m[j+4], 4j+3 = neg of m[j+4].
 * A transposed add tree: 256-bit halves, then 128-bit lanes, then qwords (21 uops for 8 blocks). */
TARGET_AVX512POP INLINE __m512i pop512_reduce8v(__m512i m0, __m512i m1, __m512i m2, __m512i m3, __m512i m4,
                                                __m512i m5, __m512i m6, __m512i m7) {
    const __m512i s0 = _mm512_add_epi32(_mm512_shuffle_i64x2(m0, m1, 0x44), _mm512_shuffle_i64x2(m0, m1, 0xEE));
    const __m512i s1 = _mm512_add_epi32(_mm512_shuffle_i64x2(m2, m3, 0x44), _mm512_shuffle_i64x2(m2, m3, 0xEE));
    const __m512i s2 = _mm512_add_epi32(_mm512_shuffle_i64x2(m4, m5, 0x44), _mm512_shuffle_i64x2(m4, m5, 0xEE));
    const __m512i s3 = _mm512_add_epi32(_mm512_shuffle_i64x2(m6, m7, 0x44), _mm512_shuffle_i64x2(m6, m7, 0xEE));
    const __m512i t0 = _mm512_add_epi32(_mm512_shuffle_i64x2(s0, s1, 0x88), _mm512_shuffle_i64x2(s0, s1, 0xDD));
    const __m512i t1 = _mm512_add_epi32(_mm512_shuffle_i64x2(s2, s3, 0x88), _mm512_shuffle_i64x2(s2, s3, 0xDD));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
}

TARGET_AVX512POP INLINE __m512i pop512_reduce8(const __m512i m[8]) {
    return pop512_reduce8v(m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]);
}

/* Writes the sums of units u0 .. u0+n-1 (unit u = t·nb + b) from n pending block vectors. */
TARGET_AVX512POP INLINE void pop512_flush(__m512i pend[8], int n, int32_t *out, int32_t TB, int32_t u0) {
    int32_t v[16];
    for (int j = n; j < 8; j++) pend[j] = _mm512_setzero_si512();
    _mm512_storeu_si512((void *)v, pop512_reduce8(pend));
    for (int j = 0; j < n; j++) {
        const int at = j < 4 ? 4 * j : 4 * (j - 4) + 2;
        out[u0 + j] = v[at];
        out[TB + u0 + j] = v[at + 1];
    }
}

/* T = 1 only (unit u = block b): the contributions c_b of blocks u0 .. u0+n-1 straight from the reduced
 * vector, without storing the sums: vpermd gathers pos counts into lanes 0–7 and neg into 8–15, then every lane
 * does pbs2p_sb_combine_row's float steps (s = 0 + α·(S⁺ − S⁻); s += μ·(S⁺ + S⁻); c = s_b·s). Writes c[u0 .. u0+8)
 * (lanes past n are garbage that rowsum never reads; c rows are padded to 16). */
TARGET_AVX512POP INLINE void pop512_flush_cr(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t row,
                                             int32_t tok, __m512i reduced, int n, float *c, int32_t u0) {
    const int32_t nb = w->n_blocks;
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15);
    const __m512i pn = _mm512_permutexvar_epi32(idx, reduced);
    const __m256i sp = _mm512_castsi512_si256(pn), sn = _mm512_extracti64x4_epi64(pn, 1);
    const __mmask32 m = (__mmask32)((1u << n) - 1u);
    const __m256 a = _mm256_cvtph_ps(_mm512_castsi512_si128(_mm512_maskz_loadu_epi16(m, w->alpha + (size_t)row * nb + u0)));
    const __m256 mu = _mm256_cvtph_ps(_mm512_castsi512_si128(_mm512_maskz_loadu_epi16(m, w->mu + (size_t)row * nb + u0)));
    const __m256 xs = _mm512_castps512_ps256(_mm512_maskz_loadu_ps((__mmask16)m, act->scale + (size_t)tok * nb + u0));
    __m256 s = _mm256_add_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, _mm256_cvtepi32_ps(_mm256_sub_epi32(sp, sn))));
    s = _mm256_add_ps(s, _mm256_mul_ps(mu, _mm256_cvtepi32_ps(_mm256_add_epi32(sp, sn))));
    _mm256_storeu_ps(c + u0, _mm256_mul_ps(xs, s));
}

/* pend[n .. 8) zeroed here, then pop512_flush_cr. */
TARGET_AVX512POP INLINE void pop512_flush_c(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t row,
                                            int32_t tok, __m512i pend[8], int n, float *c, int32_t u0) {
    for (int j = n; j < 8; j++) pend[j] = _mm512_setzero_si512();
    pop512_flush_cr(w, act, row, tok, pop512_reduce8(pend), n, c, u0);
}

/* One word's 8 plane counts for weight word P: popcount((X ^ lane-7 flip) & P) per qword lane k (imm 0x28 =
 * (a ^ b) & c; the flip makes plane 7 the weight −128 plane of (*)). */
TARGET_AVX512POP INLINE __m512i pop512_word(__m512i X, __m512i P) {
    return _mm512_popcnt_epi64(_mm512_ternarylogic_epi64(X, _mm512_set_epi64(-1, 0, 0, 0, 0, 0, 0, 0), P, 0x28));
}

/* A block's pos (ap) and neg (an) plane counts into one vector: the pos counts in the even dwords, the neg in the
 * odd, each weighted by (w_k, 0, w_k, 0) per qword lane k (vpmaddwd applies (*) to both). */
TARGET_AVX512POP INLINE __m512i pop512_weigh(__m512i ap, __m512i an) {
    const __m512i wts = _mm512_set_epi64((long long)0xff800000ff80ull, 0x0000004000000040ll, 0x0000002000000020ll,
                                         0x0000001000000010ll, 0x0000000800000008ll, 0x0000000400000004ll,
                                         0x0000000200000002ll, 0x0000000100000001ll);
    return _mm512_madd_epi16(_mm512_mask_shuffle_epi32(ap, 0xAAAA, an, _MM_PERM_CDAB), wts);
}

/* One row, NT tokens. Per 64 weights (one pos and one neg word) and token, the inner loop is
 *   vpternlogq (X ^ lane-7 flip) & bcast(P)  ·  vpopcntq  ·  vpaddq      for P and for N: 6 vector uops,
 * the broadcasts are loads shared by the tile's tokens. Per block: one vpshufd merging the pos and neg qword
 * counts into the even/odd dwords and one vpmaddwd by (w_k, 0, w_k, 0) applying (*) to both (2 uops), and
 * 1/8 of the 21-uop reduction. bs = 128: (2·6 + 2 + 21/8) / 128 ≈ 0.13 vector uops per weight. */
TARGET_AVX512POP INLINE void pop512_tile_n(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t row,
                                           int32_t tok0, int32_t *out, size_t tok_stride, const int NT,
                                           float *cout, size_t c_stride) {
    const int32_t T = w->n_terms, W = w->n_words, nb = w->n_blocks, bw = w->block_words, TB = T * nb;
    const size_t xs = (size_t)W * 8;
    const uint64_t *xp = act->xplanes + (size_t)tok0 * xs;
    __m512i pend[SB_TILE][8];
    int np = 0;
    int32_t u0 = 0;
    for (int32_t t = 0; t < T; t++) {
        const uint64_t *pos = w->planes + ((size_t)row * T + t) * 2 * W, *neg = pos + W;
        for (int32_t b = 0; b < nb; b++) {
            const int32_t i_end = (b + 1) * bw < W ? (b + 1) * bw : W;
            __m512i m[SB_TILE];
            #pragma GCC unroll 4
            for (int tt = 0; tt < NT; tt++) m[tt] = _mm512_setzero_si512();
            for (int32_t c0 = b * bw; c0 < i_end; c0 += POP512_CHUNK) {
                const int32_t c1 = c0 + POP512_CHUNK < i_end ? c0 + POP512_CHUNK : i_end;
                __m512i ap[SB_TILE], an[SB_TILE];
                #pragma GCC unroll 4
                for (int tt = 0; tt < NT; tt++) ap[tt] = an[tt] = _mm512_setzero_si512();
                for (int32_t i = c0; i < c1; i++) {
                    const __m512i P = _mm512_set1_epi64((long long)pos[i]), N = _mm512_set1_epi64((long long)neg[i]);
                    #pragma GCC unroll 4
                    for (int tt = 0; tt < NT; tt++) {
                        const __m512i X = _mm512_loadu_si512((const void *)(xp + tt * xs + (size_t)i * 8));
                        ap[tt] = _mm512_add_epi64(ap[tt], pop512_word(X, P));
                        an[tt] = _mm512_add_epi64(an[tt], pop512_word(X, N));
                    }
                }
                #pragma GCC unroll 4
                for (int tt = 0; tt < NT; tt++) m[tt] = _mm512_add_epi32(m[tt], pop512_weigh(ap[tt], an[tt]));
            }
            #pragma GCC unroll 4
            for (int tt = 0; tt < NT; tt++) pend[tt][np] = m[tt];
            if (++np == 8) {
                #pragma GCC unroll 4
                for (int tt = 0; tt < NT; tt++) {
                    if (cout) pop512_flush_c(w, act, row, tok0 + tt, pend[tt], 8, cout + tt * c_stride, u0);
                    else pop512_flush(pend[tt], 8, out + tt * tok_stride, TB, u0);
                }
                u0 += 8;
                np = 0;
            }
        }
    }
    if (np > 0)
        #pragma GCC unroll 4
        for (int tt = 0; tt < NT; tt++) {
            if (cout) pop512_flush_c(w, act, row, tok0 + tt, pend[tt], np, cout + tt * c_stride, u0);
            else pop512_flush(pend[tt], np, out + tt * tok_stride, TB, u0);
        }
}

TARGET_AVX512POP static void pop512_tile(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t row,
                                         int32_t tok0, int32_t nt, int32_t *out, size_t tok_stride) {
    switch (nt) {
    case 1: pop512_tile_n(w, act, row, tok0, out, tok_stride, 1, NULL, 0); break;
    case 2: pop512_tile_n(w, act, row, tok0, out, tok_stride, 2, NULL, 0); break;
    case 3: pop512_tile_n(w, act, row, tok0, out, tok_stride, 3, NULL, 0); break;
    default: pop512_tile_n(w, act, row, tok0, out, tok_stride, 4, NULL, 0); break;
    }
}

static void sb_sums_pop512(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t *sums, int32_t r0, int32_t r1) {
    sb_sums_drive(pop512_tile, w, act, sums, r0, r1);
}

/* One row, one token, T = 1, blocks of at most POP512_CHUNK words: pop512_tile_n's sums and flush with the 8
 * pending block vectors in named registers (the generic tile indexes them by a running count, so they live on
 * the stack, and the flush's reloads of just-stored vectors cost as much as the popcounts at bs = 128). The same
 * integer operations in the same order: bit-identical. */
TARGET_AVX512POP INLINE __m512i pop512_block1(const uint64_t *xp, const uint64_t *pos, const uint64_t *neg,
                                              int32_t i0, int32_t i1) {
    __m512i ap = _mm512_setzero_si512(), an = _mm512_setzero_si512();
    for (int32_t i = i0; i < i1; i++) {
        const __m512i X = _mm512_loadu_si512((const void *)(xp + (size_t)i * 8));
        ap = _mm512_add_epi64(ap, pop512_word(X, _mm512_set1_epi64((long long)pos[i])));
        an = _mm512_add_epi64(an, pop512_word(X, _mm512_set1_epi64((long long)neg[i])));
    }
    return pop512_weigh(ap, an);
}

TARGET_AVX512POP INLINE void pop512_row1(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t row, int32_t tok,
                                         float *cout) {
    const int32_t W = w->n_words, nb = w->n_blocks, bw = w->block_words;
    const uint64_t *xp = act->xplanes + (size_t)tok * W * 8;
    const uint64_t *pos = w->planes + (size_t)row * 2 * W, *neg = pos + W;
#define POP512_B(j) (b0 + (j) < nb ? pop512_block1(xp, pos, neg, (b0 + (j)) * bw, \
                                                   (b0 + (j) + 1) * bw < W ? (b0 + (j) + 1) * bw : W) : _mm512_setzero_si512())
    for (int32_t b0 = 0; b0 < nb; b0 += 8) {
        const __m512i r = pop512_reduce8v(POP512_B(0), POP512_B(1), POP512_B(2), POP512_B(3), POP512_B(4),
                                          POP512_B(5), POP512_B(6), POP512_B(7));
        pop512_flush_cr(w, act, row, tok, r, nb - b0 < 8 ? nb - b0 : 8, cout, b0);
    }
#undef POP512_B
}

/* T = 1: contributions computed in the tile's flush (no sums round trip), then rowsum per 16-row group. */
TARGET_AVX512POP static void pop512_gemm_t1(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y, int64_t ldy,
                                            int32_t r0, int32_t r1) {
    enum { G = 16 };
    const int32_t nb = w->n_blocks, ldc = (nb + 15) & ~15, ntile = tile_tokens(w);
    float c[SB_TILE * G * SB_MAX_NB];
    for (int32_t rg = r0; rg < r1; rg += G) {
        const int32_t g = r1 - rg < G ? r1 - rg : G;
        for (int32_t t0 = 0; t0 < act->n_tok; t0 += ntile) {
            const int32_t nt = act->n_tok - t0 < ntile ? act->n_tok - t0 : ntile;
            for (int32_t i = 0; i < g; i++) {
                float *ci = c + (size_t)i * ldc;
                const size_t cs = (size_t)G * ldc;
                if (nt == 1 && w->block_words <= POP512_CHUNK) {
                    pop512_row1(w, act, rg + i, t0, ci);
                    continue;
                }
                switch (nt) {
                case 1: pop512_tile_n(w, act, rg + i, t0, NULL, 0, 1, ci, cs); break;
                case 2: pop512_tile_n(w, act, rg + i, t0, NULL, 0, 2, ci, cs); break;
                case 3: pop512_tile_n(w, act, rg + i, t0, NULL, 0, 3, ci, cs); break;
                default: pop512_tile_n(w, act, rg + i, t0, NULL, 0, 4, ci, cs); break;
                }
            }
            for (int32_t tt = 0; tt < nt; tt++)
                rowsum_avx512(c + (size_t)tt * G * ldc, ldc, nb, g, y + (int64_t)(t0 + tt) * ldy + rg);
        }
    }
}

static void sb_gemm_pop512(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y, int64_t ldy, int32_t r0,
                           int32_t r1) {
    if (w->n_terms == 1 && w->n_blocks <= SB_MAX_NB) {
        pop512_gemm_t1(w, act, y, ldy, r0, r1);
        return;
    }
    sb_gemm_drive(pop512_tile, contrib_avx512, rowsum_avx512, 16, w, act, y, ldy, r0, r1);
}

/* ------------------------------------------------ AVX-512 VNNI prefill GEMM (n_tok >= 8) ----------------
 * For a batch of tokens the popcount form does its ~6 uops per 64 weights for every token. Here the tokens go in
 * the 16 dword lanes instead: activations are transposed once per call to xt[c4][lane] = the 4 bytes
 * u[4·c4 .. 4·c4+3] (u = q ^ 0x80 = q + 128, unsigned) of token lane, and each weight row is expanded once per
 * group of 16 tokens to 0/1 bytes (wp = pos bits, wn = neg bits). VPDPBUSD(acc, xt[c4], bcast4(w[4·c4..]))
 * then adds Σ_{c<4} u·w for 16 tokens at once: 2 VPDPBUSD per 4 columns × 16 tokens (pos, neg), no horizontal
 * reduction, and per block S = Σ_P u − 128·popcount(P) (exact: |S| <= 255·bs). The combination is done in the
 * same lanes (lane = token), each lane with exactly the scalar float steps of pbs2p_sb_combine_row in block
 * order, so y is bit-identical. */

enum { VNNI_MIN_TOK = 8 };

typedef struct vnni_buf {
    uint8_t *mem;
    uint32_t *xt;  /* [W·16][16] */
    float *xsT;    /* [nb][16] */
    int8_t *wexp;  /* [T][2][W·64] */
} vnni_buf;

static int vnni_alloc(vnni_buf *b, const pbs2p_sb_weight *w) {
    const size_t W = (size_t)w->n_words, nb = (size_t)w->n_blocks, T = (size_t)w->n_terms;
    const size_t n_xt = W * 16 * 16 * 4, n_xs = nb * 16 * 4, n_w = T * 2 * W * 64;
    b->mem = aligned_alloc(64, n_xt + ((n_xs + 63) & ~(size_t)63) + n_w);
    if (b->mem == NULL) return 0;
    b->xt = (uint32_t *)b->mem;
    b->xsT = (float *)(b->mem + n_xt);
    b->wexp = (int8_t *)(b->mem + n_xt + ((n_xs + 63) & ~(size_t)63));
    return 1;
}

/* Tokens [g0, g0 + nt) into the lanes (lanes >= nt: u = 0; their results are never stored). */
static void vnni_transpose(const pbs2p_sb_act *act, vnni_buf *b, int32_t g0, int32_t nt) {
    const int32_t W = act->n_words, nb = act->n_blocks;
    memset(b->xt, 0, (size_t)W * 16 * 16 * 4);
    memset(b->xsT, 0, (size_t)nb * 16 * 4);
    for (int32_t l = 0; l < nt; l++) {
        const int8_t *q = act->q + (size_t)(g0 + l) * W * 64;
        for (int32_t c4 = 0; c4 < W * 16; c4++) {
            uint32_t v;
            memcpy(&v, q + 4 * c4, 4);
            b->xt[(size_t)c4 * 16 + l] = v ^ 0x80808080u;
        }
        for (int32_t bl = 0; bl < nb; bl++) b->xsT[(size_t)bl * 16 + l] = act->scale[(size_t)(g0 + l) * nb + bl];
    }
}

TARGET_AVX512VNNI INLINE void vnni_expand_row(const pbs2p_sb_weight *w, int32_t row, int8_t *wexp) {
    const int32_t T = w->n_terms, W = w->n_words;
    const __m512i one = _mm512_set1_epi8(1);
    const uint64_t *pl = w->planes + (size_t)row * T * 2 * W;
    for (int32_t i = 0; i < T * 2 * W; i++) _mm512_storeu_si512((void *)(wexp + (size_t)i * 64), _mm512_maskz_mov_epi8(pl[i], one));
}

/* Pos and neg sums of term t, block b, 16 token lanes. */
TARGET_AVX512VNNI INLINE void vnni_block(const pbs2p_sb_weight *w, int32_t row, int32_t t, int32_t b, const vnni_buf *bf,
                                         __m512i *sp, __m512i *sn) {
    const int32_t W = w->n_words, bw = w->block_words, T = w->n_terms;
    const int32_t i0 = b * bw, i1 = (b + 1) * bw < W ? (b + 1) * bw : W;
    const uint64_t *pos = w->planes + ((size_t)row * T + t) * 2 * W, *neg = pos + W;
    const int8_t *wp = bf->wexp + (size_t)t * 2 * W * 64, *wn = wp + (size_t)W * 64;
    __m512i ap0 = _mm512_setzero_si512(), an0 = _mm512_setzero_si512();
    __m512i ap1 = _mm512_setzero_si512(), an1 = _mm512_setzero_si512();
    int32_t pc = 0, nc = 0;
    for (int32_t i = i0; i < i1; i++) {
        pc += (int32_t)_mm_popcnt_u64(pos[i]);
        nc += (int32_t)_mm_popcnt_u64(neg[i]);
        const uint32_t *x = bf->xt + (size_t)i * 16 * 16;
        const int32_t *p4 = (const int32_t *)(const void *)(wp + (size_t)i * 64);
        const int32_t *n4 = (const int32_t *)(const void *)(wn + (size_t)i * 64);
        #pragma GCC unroll 8
        for (int c = 0; c < 16; c += 2) {
            const __m512i x0 = _mm512_load_si512((const void *)(x + c * 16));
            const __m512i x1 = _mm512_load_si512((const void *)(x + (c + 1) * 16));
            ap0 = _mm512_dpbusd_epi32(ap0, x0, _mm512_set1_epi32(p4[c]));
            an0 = _mm512_dpbusd_epi32(an0, x0, _mm512_set1_epi32(n4[c]));
            ap1 = _mm512_dpbusd_epi32(ap1, x1, _mm512_set1_epi32(p4[c + 1]));
            an1 = _mm512_dpbusd_epi32(an1, x1, _mm512_set1_epi32(n4[c + 1]));
        }
    }
    *sp = _mm512_sub_epi32(_mm512_add_epi32(ap0, ap1), _mm512_set1_epi32(128 * pc));
    *sn = _mm512_sub_epi32(_mm512_add_epi32(an0, an1), _mm512_set1_epi32(128 * nc));
}

TARGET_AVX512VNNI static void vnni_gemm(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y, int64_t ldy,
                                        int32_t r0, int32_t r1, vnni_buf *bf) {
    const int32_t T = w->n_terms, nb = w->n_blocks;
    for (int32_t g0 = 0; g0 < act->n_tok; g0 += 16) {
        const int32_t nt = act->n_tok - g0 < 16 ? act->n_tok - g0 : 16;
        const __mmask16 m = (__mmask16)((1u << nt) - 1u);
        const __m512i sidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                _mm512_set1_epi32((int32_t)ldy));
        vnni_transpose(act, bf, g0, nt);
        for (int32_t r = r0; r < r1; r++) {
            vnni_expand_row(w, r, bf->wexp);
            const uint16_t *alpha = w->alpha + (size_t)r * T * nb, *mu = w->mu + (size_t)r * nb;
            __m512 acc = _mm512_setzero_ps();
            for (int32_t b = 0; b < nb; b++) {
                __m512 s = _mm512_setzero_ps();
                __m512i k = _mm512_setzero_si512();
                for (int32_t t = 0; t < T; t++) {
                    __m512i sp, sn;
                    vnni_block(w, r, t, b, bf, &sp, &sn);
                    const __m512 a = _mm512_set1_ps(_cvtsh_ss(alpha[(size_t)t * nb + b]));
                    s = _mm512_add_ps(s, _mm512_mul_ps(a, _mm512_cvtepi32_ps(_mm512_sub_epi32(sp, sn))));
                    if (t == 0) k = _mm512_add_epi32(sp, sn);
                }
                s = _mm512_add_ps(s, _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(mu[b])), _mm512_cvtepi32_ps(k)));
                acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_load_ps(bf->xsT + (size_t)b * 16), s));
            }
            _mm512_mask_i32scatter_ps(y + (int64_t)g0 * ldy + r, m, sidx, acc, 4);
        }
    }
}

TARGET_AVX512VNNI static void vnni_sums(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t *sums, int32_t r0,
                                        int32_t r1, vnni_buf *bf) {
    const int32_t T = w->n_terms, nb = w->n_blocks, TB = T * nb;
    for (int32_t g0 = 0; g0 < act->n_tok; g0 += 16) {
        const int32_t nt = act->n_tok - g0 < 16 ? act->n_tok - g0 : 16;
        vnni_transpose(act, bf, g0, nt);
        for (int32_t r = r0; r < r1; r++) {
            vnni_expand_row(w, r, bf->wexp);
            for (int32_t t = 0; t < T; t++)
                for (int32_t b = 0; b < nb; b++) {
                    __m512i sp, sn;
                    int32_t vp[16], vn[16];
                    vnni_block(w, r, t, b, bf, &sp, &sn);
                    _mm512_storeu_si512((void *)vp, sp);
                    _mm512_storeu_si512((void *)vn, sn);
                    for (int32_t l = 0; l < nt; l++) {
                        int32_t *o = sums + ((size_t)(g0 + l) * (r1 - r0) + (r - r0)) * 2 * TB;
                        o[t * nb + b] = vp[l];
                        o[TB + t * nb + b] = vn[l];
                    }
                }
        }
    }
}

static void sb_gemm_pop512_vnni(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y, int64_t ldy, int32_t r0,
                                int32_t r1) {
    vnni_buf bf;
    if (act->n_tok >= VNNI_MIN_TOK && r0 < r1 && vnni_alloc(&bf, w)) {
        vnni_gemm(w, act, y, ldy, r0, r1, &bf);
        free(bf.mem);
        return;
    }
    sb_gemm_pop512(w, act, y, ldy, r0, r1);
}

static void sb_sums_pop512_vnni(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t *sums, int32_t r0,
                                int32_t r1) {
    vnni_buf bf;
    if (act->n_tok >= VNNI_MIN_TOK && r0 < r1 && vnni_alloc(&bf, w)) {
        vnni_sums(w, act, sums, r0, r1, &bf);
        free(bf.mem);
        return;
    }
    sb_sums_pop512(w, act, sums, r0, r1);
}

const pbs2p_kernels pbs2p_kernels_avx512 = {"avx512", sb_gemm_pop512, sb_sums_pop512, q8_gemm_avx2,
                                            q4_gemm_avx2, q3_gemm_avx2};
const pbs2p_kernels pbs2p_kernels_avx512vnni = {"avx512", sb_gemm_pop512_vnni, sb_sums_pop512_vnni,
                                              q8_gemm_avx512vnni, q4_gemm_avx512vnni, q3_gemm_avx512vnni};

/* ------------------------------------------------------------ AVX2 popcount ----------------------------- */

enum { POP2_CHUNK = 15 }; /* words per byte-count chunk: counts <= 8·15 = 120, so vpmaddubsw pairs fit int16 */

/* Byte popcounts of v (each <= 8): two nibble lookups with vpshufb. */
TARGET_AVX2 INLINE __m256i pop2_bytes(__m256i v, __m256i lut, __m256i m0f) {
    const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, m0f));
    const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f));
    return _mm256_add_epi8(lo, hi);
}

/* One row, NT tokens. A ymm holds planes 0..3 (lo) or 4..7 (hi, plane 7 flipped by one vpxor per token and
 * word, shared by pos and neg) of one word. Per 64 weights (pos + neg word) and token:
 *   4 × (vpand with bcast(P) · vpand 0x0f · vpsrlw · vpand 0x0f · 2 vpshufb · 2 vpaddb) + 1 vpxor = 33 uops,
 * byte counts accumulate for up to 15 words. Per chunk and plane: vpmaddubsw of the lo and hi byte counts by
 * the signed byte weights (1, 2, 4, 8 | 16, 32, 64, −128) of (*) (|sum| <= 2·120·(8 + 128) < 2^15), vpaddw,
 * vpmaddwd by 1 -> int32. Per block: pos and neg int32 vectors of 8 blocks are reduced with vphaddd. */
TARGET_AVX2 INLINE void pop2_tile_n(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t row, int32_t tok0,
                                    int32_t *out, size_t tok_stride, const int NT) {
    const int32_t T = w->n_terms, W = w->n_words, nb = w->n_blocks, bw = w->block_words, TB = T * nb;
    const size_t xs = (size_t)W * 8;
    const uint64_t *xp = act->xplanes + (size_t)tok0 * xs;
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i m0f = _mm256_set1_epi8(0x0f), ones16 = _mm256_set1_epi16(1);
    const __m256i flip7 = _mm256_set_epi64x(-1, 0, 0, 0);
    const __m256i w_lo = _mm256_set_epi64x(0x0808080808080808ll, 0x0404040404040404ll, 0x0202020202020202ll,
                                           0x0101010101010101ll);
    const __m256i w_hi = _mm256_set_epi64x((long long)0x8080808080808080ull, 0x4040404040404040ll,
                                           0x2020202020202020ll, 0x1010101010101010ll);
    __m256i pend[SB_TILE][2][8];
    int np = 0;
    int32_t u0 = 0;
    for (int32_t t = 0; t < T; t++) {
        const uint64_t *pos = w->planes + ((size_t)row * T + t) * 2 * W, *neg = pos + W;
        for (int32_t b = 0; b < nb; b++) {
            const int32_t i_end = (b + 1) * bw < W ? (b + 1) * bw : W;
            __m256i mp[SB_TILE], mn[SB_TILE];
            #pragma GCC unroll 4
            for (int tt = 0; tt < NT; tt++) mp[tt] = mn[tt] = _mm256_setzero_si256();
            for (int32_t c0 = b * bw; c0 < i_end; c0 += POP2_CHUNK) {
                const int32_t c1 = c0 + POP2_CHUNK < i_end ? c0 + POP2_CHUNK : i_end;
                __m256i plo[SB_TILE], phi[SB_TILE], nlo[SB_TILE], nhi[SB_TILE];
                #pragma GCC unroll 4
                for (int tt = 0; tt < NT; tt++) plo[tt] = phi[tt] = nlo[tt] = nhi[tt] = _mm256_setzero_si256();
                for (int32_t i = c0; i < c1; i++) {
                    const __m256i P = _mm256_set1_epi64x((long long)pos[i]), N = _mm256_set1_epi64x((long long)neg[i]);
                    #pragma GCC unroll 4
                    for (int tt = 0; tt < NT; tt++) {
                        const uint64_t *x = xp + tt * xs + (size_t)i * 8;
                        const __m256i xlo = _mm256_loadu_si256((const __m256i *)x);
                        const __m256i xhi = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(x + 4)), flip7);
                        plo[tt] = _mm256_add_epi8(plo[tt], pop2_bytes(_mm256_and_si256(xlo, P), lut, m0f));
                        phi[tt] = _mm256_add_epi8(phi[tt], pop2_bytes(_mm256_and_si256(xhi, P), lut, m0f));
                        nlo[tt] = _mm256_add_epi8(nlo[tt], pop2_bytes(_mm256_and_si256(xlo, N), lut, m0f));
                        nhi[tt] = _mm256_add_epi8(nhi[tt], pop2_bytes(_mm256_and_si256(xhi, N), lut, m0f));
                    }
                }
                #pragma GCC unroll 4
                for (int tt = 0; tt < NT; tt++) {
                    const __m256i sp = _mm256_add_epi16(_mm256_maddubs_epi16(plo[tt], w_lo), _mm256_maddubs_epi16(phi[tt], w_hi));
                    const __m256i sn = _mm256_add_epi16(_mm256_maddubs_epi16(nlo[tt], w_lo), _mm256_maddubs_epi16(nhi[tt], w_hi));
                    mp[tt] = _mm256_add_epi32(mp[tt], _mm256_madd_epi16(sp, ones16));
                    mn[tt] = _mm256_add_epi32(mn[tt], _mm256_madd_epi16(sn, ones16));
                }
            }
            #pragma GCC unroll 4
            for (int tt = 0; tt < NT; tt++) {
                pend[tt][0][np] = mp[tt];
                pend[tt][1][np] = mn[tt];
            }
            if (++np == 8 || (t == T - 1 && b == nb - 1)) {
                #pragma GCC unroll 4
                for (int tt = 0; tt < NT; tt++)
                    for (int s = 0; s < 2; s++) {
                        int32_t v[8];
                        for (int j = np; j < 8; j++) pend[tt][s][j] = _mm256_setzero_si256();
                        _mm256_storeu_si256((__m256i *)v, avx2_hsum8(pend[tt][s]));
                        for (int j = 0; j < np; j++) out[tt * tok_stride + (size_t)s * TB + u0 + j] = v[j];
                    }
                u0 += np;
                np = 0;
            }
        }
    }
}

TARGET_AVX2 static void pop2_tile(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t row, int32_t tok0,
                                  int32_t nt, int32_t *out, size_t tok_stride) {
    switch (nt) {
    case 1: pop2_tile_n(w, act, row, tok0, out, tok_stride, 1); break;
    case 2: pop2_tile_n(w, act, row, tok0, out, tok_stride, 2); break;
    case 3: pop2_tile_n(w, act, row, tok0, out, tok_stride, 3); break;
    default: pop2_tile_n(w, act, row, tok0, out, tok_stride, 4); break;
    }
}

static void sb_sums_pop2(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t *sums, int32_t r0, int32_t r1) {
    sb_sums_drive(pop2_tile, w, act, sums, r0, r1);
}

static void sb_gemm_pop2(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y, int64_t ldy, int32_t r0,
                         int32_t r1) {
    sb_gemm_drive(pop2_tile, contrib_avx2, rowsum_avx2, 8, w, act, y, ldy, r0, r1);
}

const pbs2p_kernels pbs2p_kernels_avx2 = {"avx2", sb_gemm_pop2, sb_sums_pop2, q8_gemm_avx2, q4_gemm_avx2,
                                          q3_gemm_avx2};

/* ------------------------------------------------------------ N:M decoder (VBMI) ------------------------
 * Eight words (64 groups of 8) per step for M = 8: the 8·pb pattern bytes in one masked load, each word's pb
 * bytes spread into its qword (VPERMB), the eight pb-bit indices of a qword pulled into bytes (VPMULTISHIFTQB),
 * the masks looked up in a 64- or 128-byte table (VPERMB / VPERMI2B: C(8, N) <= 70), then per word
 * pos = PDEP(its N sign bytes, kept), neg = kept & ~pos (a row's last step loads only its words' bytes). M = 4,
 * N = M and the tensor's last row go through pbs2p_nm_decode_lut: the same words. */

#define TARGET_VBMI __attribute__((target("avx2,popcnt,bmi2,avx512f,avx512bw,avx512vbmi")))

/* pos = PDEP(signs, kept), neg = kept & ~pos for nw words. Compiled without AVX-512 and not inlined: inside the
 * AVX-512 function gcc moves these scalars through mask registers (kmovq / kandnq), twice as slow. */
__attribute__((target("bmi2"), noinline)) static void nm_pos_neg(const uint8_t *signs, int n, uint64_t smask,
                                                                  const uint64_t *kept, int nw, uint64_t *pos,
                                                                  uint64_t *neg) {
    for (int j = 0; j < nw; j++) {
        uint64_t sf;
        memcpy(&sf, signs + (size_t)j * n, 8);
        const uint64_t p = _pdep_u64(sf & smask, kept[j]);
        pos[j] = p;
        neg[j] = kept[j] & ~p;
    }
}

TARGET_VBMI void pbs2p_nm_decode_vbmi(const pbs2p_sb_weight *w, int32_t r0, int32_t r1, uint64_t *out) {
    const int32_t n = w->nm_n, W = w->n_words, pb = pbs2p_nm_pattern_bits(n, w->nm_m);
    if (w->nm_m != 8 || pb == 0) {
        pbs2p_nm_decode_lut(w, r0, r1, out);
        return;
    }
    uint8_t tab[128] = {0}; /* zero past C(8, N): an index the loader refuses still reads inside it */
    memcpy(tab, pbs2p_nm_masks(n, 8), 70);
    const __m512i tlo = _mm512_loadu_si512((const void *)tab), thi = _mm512_loadu_si512((const void *)(tab + 64));
    uint8_t spread_idx[64], shift[64];
    for (int j = 0; j < 8; j++)
        for (int b = 0; b < 8; b++) {
            spread_idx[8 * j + b] = (uint8_t)(j * pb + b);
            shift[8 * j + b] = (uint8_t)(b * pb);
        }
    const __m512i vspread = _mm512_loadu_si512((const void *)spread_idx), vshift = _mm512_loadu_si512((const void *)shift);
    const __m512i vpmask = _mm512_set1_epi8((char)((1 << pb) - 1));
    const __mmask64 lmask = _cvtu64_mask64(((uint64_t)1 << (8 * pb)) - 1); /* 8·pb <= 56 bytes */
    const uint64_t smask = n == 8 ? ~(uint64_t)0 : ((uint64_t)1 << (8 * n)) - 1;
    const uint8_t *end = w->nm + (size_t)w->n_out * w->nm_row_bytes;
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = w->nm + (size_t)r * w->nm_row_bytes, *signs = row + (size_t)W * pb;
        uint64_t *pos = out + (size_t)(r - r0) * 2 * W, *neg = pos + W;
        if (end - (signs + (size_t)W * n) < 8) { /* the tensor's last row: 8-byte sign loads would run past it */
            pbs2p_nm_decode_lut(w, r, r + 1, pos);
            continue;
        }
        for (int32_t i = 0; i < W; i += 8) {
            const int32_t nw = W - i < 8 ? W - i : 8; /* the last step of a row may hold fewer words */
            const __mmask64 lm = nw == 8 ? lmask : _cvtu64_mask64(((uint64_t)1 << (nw * pb)) - 1);
            const __m512i raw = _mm512_maskz_loadu_epi8(lm, row + (size_t)i * pb);
            const __m512i idx = _mm512_and_si512(_mm512_multishift_epi64_epi8(vshift, _mm512_permutexvar_epi8(vspread, raw)),
                                                 vpmask);
            uint64_t kept[8];
            _mm512_storeu_si512((void *)kept, _mm512_permutex2var_epi8(tlo, idx, thi));
            nm_pos_neg(signs + (size_t)i * n, n, smask, kept, nw, pos + i, neg + i);
        }
    }
}

#endif

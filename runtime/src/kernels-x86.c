/* x86 kernels: AVX2 and AVX-512 (BW), selected per function with target attributes (kernels.c checks CPUID).
 *
 * Sparse-binary sums. Instead of popcounts over the 8 activation bit-planes (8 AND+POPCNT per weight word,
 * then 2^k weights and a −128·popcount(P) correction), these kernels turn the 64 bits of a weight word P into
 * a 64-byte mask and sum the selected int8 activations q_j directly — the same integer Σ_{j∈P} q_j:
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

static void sb_gemm_drive(sb_tile_fn tile, const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y, int64_t ldy,
                          int32_t r0, int32_t r1) {
    const int32_t TB = w->n_terms * w->n_blocks, nb = w->n_blocks;
    const int32_t ntile = tile_tokens(w);
    int32_t buf[SB_BUF];
    if ((size_t)2 * TB > SB_BUF) { /* beyond the load-time limits; keep exact results anyway */
        pbs2p_sb_gemm_ref(w, act, y, ldy, r0, r1);
        return;
    }
    for (int32_t r = r0; r < r1; r++)
        for (int32_t t0 = 0; t0 < act->n_tok; t0 += ntile) {
            int32_t nt = act->n_tok - t0 < ntile ? act->n_tok - t0 : ntile;
            tile(w, act, r, t0, nt, buf, (size_t)2 * TB);
            for (int32_t tt = 0; tt < nt; tt++) {
                const int32_t *s = buf + (size_t)tt * 2 * TB;
                y[(int64_t)(t0 + tt) * ldy + r] =
                    pbs2p_sb_combine_row(w, r, s, s + TB, act->scale + (size_t)(t0 + tt) * nb);
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
        for (int tt = 0; tt < NT; tt++) acc32[tt] = _mm256_setzero_si256();
        for (int32_t i0 = b * bw; i0 < i_end; i0 += FLUSH_WORDS) {
            const int32_t i1 = i0 + FLUSH_WORDS < i_end ? i0 + FLUSH_WORDS : i_end;
            __m256i acc16[SB_TILE];
            for (int tt = 0; tt < NT; tt++) acc16[tt] = _mm256_setzero_si256();
            for (int32_t i = i0; i < i1; i++) {
                const __m256i p = _mm256_set1_epi64x((long long)plane[i]);
                const __m256i m_lo = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(p, idx_lo), bitsel), bitsel);
                const __m256i m_hi = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(p, idx_hi), bitsel), bitsel);
                for (int tt = 0; tt < NT; tt++) {
                    const int8_t *qi = q + tt * q_stride + (size_t)i * 64;
                    const __m256i x_lo = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)qi), m_lo);
                    const __m256i x_hi = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(qi + 32)), m_hi);
                    acc16[tt] = _mm256_add_epi16(acc16[tt], _mm256_maddubs_epi16(ones8, x_lo));
                    acc16[tt] = _mm256_add_epi16(acc16[tt], _mm256_maddubs_epi16(ones8, x_hi));
                }
            }
            for (int tt = 0; tt < NT; tt++)
                acc32[tt] = _mm256_add_epi32(acc32[tt], _mm256_madd_epi16(acc16[tt], ones16));
        }
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
    sb_gemm_drive(avx2_tile, w, act, y, ldy, r0, r1);
}

/* 8 vectors of 8 int32 -> one vector of their 8 sums (v[0]'s sum in lane 0). */
TARGET_AVX2 INLINE __m256i avx2_hsum8(const __m256i v[8]) {
    __m256i s01 = _mm256_hadd_epi32(v[0], v[1]), s23 = _mm256_hadd_epi32(v[2], v[3]);
    __m256i s45 = _mm256_hadd_epi32(v[4], v[5]), s67 = _mm256_hadd_epi32(v[6], v[7]);
    __m256i s0123 = _mm256_hadd_epi32(s01, s23), s4567 = _mm256_hadd_epi32(s45, s67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(s0123, s4567, 0x20),
                            _mm256_permute2x128_si256(s0123, s4567, 0x31));
}

/* The reference's float steps for 8 blocks: dd = d_w·d_x, c = dd·(float)isum, acc += c in block order. */
TARGET_AVX2 INLINE float q8_accumulate8(float acc, const uint8_t *row, int32_t b0, const float *xd, __m256i isum) {
    uint16_t dh[8];
    for (int j = 0; j < 8; j++) memcpy(&dh[j], row + (size_t)(b0 + j) * 34, 2);
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dh));
    const __m256 c = _mm256_mul_ps(_mm256_mul_ps(dw, _mm256_loadu_ps(xd + b0)), _mm256_cvtepi32_ps(isum));
    float cs[8];
    _mm256_storeu_ps(cs, c);
    for (int j = 0; j < 8; j++) acc = acc + cs[j];
    return acc;
}

TARGET_AVX2 INLINE float q8_accumulate1(float acc, const uint8_t *row, int32_t b, const float *xd, int32_t isum) {
    uint16_t dh;
    memcpy(&dh, row + (size_t)b * 34, 2);
    float dd = _cvtsh_ss(dh) * xd[b];
    float c = dd * (float)isum;
    return acc + c;
}

/* int32 lanes summing to Σ w_j·x_j over one 32-value block. */
TARGET_AVX2 INLINE __m256i avx2_q8_block(const uint8_t *blk, const int8_t *x) {
    const __m256i wv = _mm256_loadu_si256((const __m256i *)(blk + 2));
    const __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* Rows outer, tokens inner: a row (nb·34 bytes) is read from memory once and from L1 for the other tokens. */
TARGET_AVX2 static void q8_gemm_avx2(const uint8_t *w, int32_t K, const pbs2p_q8_act *act, float *y, int64_t ldy,
                                     int32_t r0, int32_t r1) {
    const int32_t nb = K / 32;
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = w + (size_t)r * nb * 34;
        for (int32_t t = 0; t < act->n_tok; t++) {
            const int8_t *xq = act->q + (size_t)t * K;
            const float *xd = act->d + (size_t)t * nb;
            float acc = 0.0f;
            int32_t b = 0;
            for (; b + 8 <= nb; b += 8) {
                __m256i v[8];
                for (int j = 0; j < 8; j++) v[j] = avx2_q8_block(row + (size_t)(b + j) * 34, xq + (size_t)(b + j) * 32);
                acc = q8_accumulate8(acc, row, b, xd, avx2_hsum8(v));
            }
            for (; b < nb; b++)
                acc = q8_accumulate1(acc, row, b, xd, avx2_hsum_i32(avx2_q8_block(row + (size_t)b * 34, xq + (size_t)b * 32)));
            y[(int64_t)t * ldy + r] = acc;
        }
    }
}

const pbs2p_kernels pbs2p_kernels_avx2 = {"avx2", sb_gemm_avx2, sb_sums_avx2, q8_gemm_avx2};

/* -------------------------------------------------------------- AVX-512 --------------------------------- */

TARGET_AVX512 INLINE void avx512_plane(const uint64_t *plane, const int8_t *q, size_t q_stride, int32_t W, int32_t nb,
                                       int32_t bw, int32_t *out, size_t stride, const int NT) {
    const __m512i ones8 = _mm512_set1_epi8(1), ones16 = _mm512_set1_epi16(1);
    for (int32_t b = 0; b < nb; b++) {
        const int32_t i_end = (b + 1) * bw < W ? (b + 1) * bw : W;
        __m512i acc32[SB_TILE];
        for (int tt = 0; tt < NT; tt++) acc32[tt] = _mm512_setzero_si512();
        for (int32_t i0 = b * bw; i0 < i_end; i0 += FLUSH_WORDS) {
            const int32_t i1 = i0 + FLUSH_WORDS < i_end ? i0 + FLUSH_WORDS : i_end;
            __m512i acc16[SB_TILE];
            for (int tt = 0; tt < NT; tt++) acc16[tt] = _mm512_setzero_si512();
            for (int32_t i = i0; i < i1; i++) {
                const __mmask64 m = _cvtu64_mask64(plane[i]);
                for (int tt = 0; tt < NT; tt++) {
                    const __m512i x = _mm512_maskz_loadu_epi8(m, q + tt * q_stride + (size_t)i * 64);
                    acc16[tt] = _mm512_add_epi16(acc16[tt], _mm512_maddubs_epi16(ones8, x));
                }
            }
            for (int tt = 0; tt < NT; tt++)
                acc32[tt] = _mm512_add_epi32(acc32[tt], _mm512_madd_epi16(acc16[tt], ones16));
        }
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
    sb_gemm_drive(avx512_tile, w, act, y, ldy, r0, r1);
}

/* VPDPBUSD: Σ |w|·sign(x, w) over groups of 4 straight into int32 lanes (one instruction per block). */
TARGET_AVX512VNNI INLINE __m256i vnni_q8_block(const uint8_t *blk, const int8_t *x) {
    const __m256i wv = _mm256_loadu_si256((const __m256i *)(blk + 2));
    const __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
}

TARGET_AVX512VNNI static void q8_gemm_avx512vnni(const uint8_t *w, int32_t K, const pbs2p_q8_act *act, float *y,
                                                 int64_t ldy, int32_t r0, int32_t r1) {
    const int32_t nb = K / 32;
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = w + (size_t)r * nb * 34;
        for (int32_t t = 0; t < act->n_tok; t++) {
            const int8_t *xq = act->q + (size_t)t * K;
            const float *xd = act->d + (size_t)t * nb;
            float acc = 0.0f;
            int32_t b = 0;
            for (; b + 8 <= nb; b += 8) {
                __m256i v[8];
                for (int j = 0; j < 8; j++) v[j] = vnni_q8_block(row + (size_t)(b + j) * 34, xq + (size_t)(b + j) * 32);
                acc = q8_accumulate8(acc, row, b, xd, avx2_hsum8(v));
            }
            for (; b < nb; b++)
                acc = q8_accumulate1(acc, row, b, xd, avx2_hsum_i32(vnni_q8_block(row + (size_t)b * 34, xq + (size_t)b * 32)));
            y[(int64_t)t * ldy + r] = acc;
        }
    }
}

const pbs2p_kernels pbs2p_kernels_avx512 = {"avx512", sb_gemm_avx512, sb_sums_avx512, q8_gemm_avx2};
const pbs2p_kernels pbs2p_kernels_avx512vnni = {"avx512", sb_gemm_avx512, sb_sums_avx512, q8_gemm_avx512vnni};

#endif

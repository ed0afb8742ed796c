/* NEON kernels (aarch64, and armv7 built with -mfpu=neon). Two families compute the same integer sums:
 *   - popcount ("neon", the section before the Q8 kernels): vcnt over the activation bit-planes AND the
 *     weight word, vpadal widening accumulation, 2^k plane weights per block (docs/format.md);
 *   - bit expansion ("neon-expand", described here), the formulation of kernels-x86.c's "*-expand" tables:
 * the 64 bits of a weight word become 64 byte masks and the selected int8 activations are summed directly:
 *   vtbl replicates byte c of P over 8 lanes, vtst with (1 << lane) gives 0x00/0xFF per column,
 *   AND q, vpadal (pairwise add-accumulate int8 -> int16).          (16 columns: tbl, tst, and, padal)
 * The masks of a word are built once per tile of up to 4 tokens. int16 lanes gain at most 4·254 per word,
 * so they are widened to int32 every 32 words (32·1016 < 32767).
 * Q8_0: vmull_s8 (|w·x| <= 128·127 fits int16) + vpadal into int32, one integer sum per block, then the
 * reference's float steps in block order (bit-identical). The float combination of sparse-binary sums is
 * the shared scalar pbs2p_sb_combine_row, so armv7 NEON's flush-to-zero float never touches results. */
#if defined(__ARM_NEON)

#include <arm_neon.h>
#include <string.h>

#include "common.h"
#include "kernels.h"

#define INLINE static inline __attribute__((always_inline))

enum { SB_TILE = 4, SB_BUF = 8192, FLUSH_WORDS = 32 };

INLINE int32_t hsum_s32(int32x4_t v) {
#if defined(__aarch64__)
    return vaddvq_s32(v);
#else
    int32x2_t s = vadd_s32(vget_low_s32(v), vget_high_s32(v));
    return vget_lane_s32(vpadd_s32(s, s), 0);
#endif
}

/* 16 byte masks for columns 16c .. 16c+15 of word P (pb = P's bytes). */
INLINE uint8x16_t expand16(uint8x8_t pb, int c, uint8x16_t bitsel) {
    const uint8x8_t i_lo = vdup_n_u8((uint8_t)(2 * c)), i_hi = vdup_n_u8((uint8_t)(2 * c + 1));
    return vtstq_u8(vcombine_u8(vtbl1_u8(pb, i_lo), vtbl1_u8(pb, i_hi)), bitsel);
}

INLINE void neon_plane(const uint64_t *plane, const int8_t *q, size_t q_stride, int32_t W, int32_t nb, int32_t bw,
                       int32_t *out, size_t stride, const int NT) {
    const uint8_t bits[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t bitsel = vld1q_u8(bits);
    for (int32_t b = 0; b < nb; b++) {
        const int32_t i_end = (b + 1) * bw < W ? (b + 1) * bw : W;
        int32x4_t acc32[SB_TILE];
        #pragma GCC unroll 4
        for (int tt = 0; tt < NT; tt++) acc32[tt] = vdupq_n_s32(0);
        for (int32_t i0 = b * bw; i0 < i_end; i0 += FLUSH_WORDS) {
            const int32_t i1 = i0 + FLUSH_WORDS < i_end ? i0 + FLUSH_WORDS : i_end;
            int16x8_t acc16[SB_TILE];
            #pragma GCC unroll 4
            for (int tt = 0; tt < NT; tt++) acc16[tt] = vdupq_n_s16(0);
            for (int32_t i = i0; i < i1; i++) {
                const uint8x8_t pb = vcreate_u8(plane[i]);
                const int8x16_t m0 = vreinterpretq_s8_u8(expand16(pb, 0, bitsel));
                const int8x16_t m1 = vreinterpretq_s8_u8(expand16(pb, 1, bitsel));
                const int8x16_t m2 = vreinterpretq_s8_u8(expand16(pb, 2, bitsel));
                const int8x16_t m3 = vreinterpretq_s8_u8(expand16(pb, 3, bitsel));
                #pragma GCC unroll 4
                for (int tt = 0; tt < NT; tt++) {
                    const int8_t *qi = q + tt * q_stride + (size_t)i * 64;
                    acc16[tt] = vpadalq_s8(acc16[tt], vandq_s8(vld1q_s8(qi), m0));
                    acc16[tt] = vpadalq_s8(acc16[tt], vandq_s8(vld1q_s8(qi + 16), m1));
                    acc16[tt] = vpadalq_s8(acc16[tt], vandq_s8(vld1q_s8(qi + 32), m2));
                    acc16[tt] = vpadalq_s8(acc16[tt], vandq_s8(vld1q_s8(qi + 48), m3));
                }
            }
            #pragma GCC unroll 4
            for (int tt = 0; tt < NT; tt++) acc32[tt] = vpadalq_s16(acc32[tt], acc16[tt]);
        }
        #pragma GCC unroll 4
        for (int tt = 0; tt < NT; tt++) out[tt * stride + b] = hsum_s32(acc32[tt]);
    }
}

/* out[tt·tok_stride + s·T·nb + t·nb + b] for tokens tok0 .. tok0+nt-1 of one row. */
static void neon_tile(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t row, int32_t tok0, int32_t nt,
                      int32_t *out, size_t tok_stride) {
    const int32_t T = w->n_terms, W = w->n_words, nb = w->n_blocks, bw = w->block_words;
    const size_t q_stride = (size_t)W * 64;
    const int8_t *q = act->q + (size_t)tok0 * q_stride;
    for (int32_t t = 0; t < T; t++)
        for (int32_t s = 0; s < 2; s++) {
            const uint64_t *plane = w->planes + (((size_t)row * T + t) * 2 + s) * W;
            int32_t *o = out + (size_t)s * T * nb + (size_t)t * nb;
            switch (nt) {
            case 1: neon_plane(plane, q, q_stride, W, nb, bw, o, tok_stride, 1); break;
            case 2: neon_plane(plane, q, q_stride, W, nb, bw, o, tok_stride, 2); break;
            case 3: neon_plane(plane, q, q_stride, W, nb, bw, o, tok_stride, 3); break;
            default: neon_plane(plane, q, q_stride, W, nb, bw, o, tok_stride, 4); break;
            }
        }
}

/* Writes out[tt·tok_stride + s·T·nb + t·nb + b] (s = 0 pos, 1 neg) for tokens tok0 .. tok0+nt-1 of one row. */
typedef void (*sb_tile_fn)(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t row, int32_t tok0, int32_t nt,
                           int32_t *out, size_t tok_stride);

static int32_t tile_tokens(const pbs2p_sb_weight *w, int32_t max_tile) {
    int32_t per_tok = 2 * w->n_terms * w->n_blocks, nt = SB_BUF / per_tok;
    return nt < 1 ? 1 : nt > max_tile ? max_tile : nt;
}

static void sb_sums_drive(sb_tile_fn tile, int32_t max_tile, const pbs2p_sb_weight *w, const pbs2p_sb_act *act,
                          int32_t *sums, int32_t r0, int32_t r1) {
    const size_t TB2 = 2 * (size_t)w->n_terms * w->n_blocks;
    const int32_t ntile = tile_tokens(w, max_tile);
    for (int32_t r = r0; r < r1; r++)
        for (int32_t t0 = 0; t0 < act->n_tok; t0 += ntile) {
            int32_t nt = act->n_tok - t0 < ntile ? act->n_tok - t0 : ntile;
            tile(w, act, r, t0, nt, sums + ((size_t)t0 * (r1 - r0) + (r - r0)) * TB2, (size_t)(r1 - r0) * TB2);
        }
}

static void sb_gemm_drive(sb_tile_fn tile, int32_t max_tile, const pbs2p_sb_weight *w, const pbs2p_sb_act *act,
                          float *y, int64_t ldy, int32_t r0, int32_t r1) {
    const int32_t TB = w->n_terms * w->n_blocks, nb = w->n_blocks;
    const int32_t ntile = tile_tokens(w, max_tile);
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

static void sb_sums_neon_expand(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t *sums, int32_t r0,
                                int32_t r1) {
    sb_sums_drive(neon_tile, SB_TILE, w, act, sums, r0, r1);
}

static void sb_gemm_neon_expand(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y, int64_t ldy,
                                int32_t r0, int32_t r1) {
    sb_gemm_drive(neon_tile, SB_TILE, w, act, y, ldy, r0, r1);
}

/* ------------------------------------------------------------- popcount ------------------------------------
 * With u = q + 128 and X_k its bit-plane k over a 64-column word, plane 7 of u is the complement of q's sign
 * bit, so the −128·popcount(P) correction folds into plane 7:
 *   Σ_{j∈P} q_j = Σ_{k<7} 2^k·popcount(X_k & P) − 128·popcount(~X_7 & P)                           (*)
 * A q register holds planes (2i, 2i+1) of a word (xplanes is [tok][W][8] u64). Per 64 weights (pos + neg
 * word) and token: 4 registers × 2 × (vand with dup(P), vcnt, vpadal u8 -> u16) + 1 veor (plane 7 flip,
 * shared by pos and neg) = 25 ops. u16 lanes gain <= 16 per word: flushed every 1024 words (< 2^15 for vmlal_s16). Per block and
 * plane: 8 vmlal_s16 by the plane weights (1, 2, ..., 64, −128) into int32 and one horizontal add.
 * Tiles of 2 tokens keep the 16 accumulators of a tile in registers on aarch64. */
enum { POPN_TILE = 2, POPN_CHUNK = 1024 };

INLINE int32x4_t popn_weight(int32x4_t acc, const uint16x8_t c[4]) {
    static const int16_t wk[8] = {1, 2, 4, 8, 16, 32, 64, -128};
    for (int i = 0; i < 4; i++) {
        const int16x8_t v = vreinterpretq_s16_u16(c[i]);
        acc = vmlal_n_s16(acc, vget_low_s16(v), wk[2 * i]);
        acc = vmlal_n_s16(acc, vget_high_s16(v), wk[2 * i + 1]);
    }
    return acc;
}

INLINE void popn_tile_n(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t row, int32_t tok0,
                        int32_t *out, size_t tok_stride, const int NT) {
    const int32_t T = w->n_terms, W = w->n_words, nb = w->n_blocks, bw = w->block_words, TB = T * nb;
    const size_t xs = (size_t)W * 8;
    const uint64_t *xp = act->xplanes + (size_t)tok0 * xs;
    const uint64x2_t flip7 = vcombine_u64(vcreate_u64(0), vcreate_u64(~0ull));
    for (int32_t t = 0; t < T; t++) {
        const uint64_t *pos = w->planes + ((size_t)row * T + t) * 2 * W, *neg = pos + W;
        for (int32_t b = 0; b < nb; b++) {
            const int32_t i_end = (b + 1) * bw < W ? (b + 1) * bw : W;
            int32x4_t sp[POPN_TILE], sn[POPN_TILE];
            #pragma GCC unroll 4
            for (int tt = 0; tt < NT; tt++) sp[tt] = sn[tt] = vdupq_n_s32(0);
            for (int32_t c0 = b * bw; c0 < i_end; c0 += POPN_CHUNK) {
                const int32_t c1 = c0 + POPN_CHUNK < i_end ? c0 + POPN_CHUNK : i_end;
                uint16x8_t cp[POPN_TILE][4], cn[POPN_TILE][4];
                #pragma GCC unroll 4
                for (int tt = 0; tt < NT; tt++)
                    for (int i = 0; i < 4; i++) cp[tt][i] = cn[tt][i] = vdupq_n_u16(0);
                for (int32_t i = c0; i < c1; i++) {
                    const uint64x2_t P = vdupq_n_u64(pos[i]), N = vdupq_n_u64(neg[i]);
                    #pragma GCC unroll 4
                    for (int tt = 0; tt < NT; tt++) {
                        const uint64_t *x = xp + tt * xs + (size_t)i * 8;
                        for (int k = 0; k < 4; k++) {
                            uint64x2_t xk = vld1q_u64(x + 2 * k);
                            if (k == 3) xk = veorq_u64(xk, flip7);
                            cp[tt][k] = vpadalq_u8(cp[tt][k], vcntq_u8(vreinterpretq_u8_u64(vandq_u64(xk, P))));
                            cn[tt][k] = vpadalq_u8(cn[tt][k], vcntq_u8(vreinterpretq_u8_u64(vandq_u64(xk, N))));
                        }
                    }
                }
                #pragma GCC unroll 4
                for (int tt = 0; tt < NT; tt++) {
                    sp[tt] = popn_weight(sp[tt], cp[tt]);
                    sn[tt] = popn_weight(sn[tt], cn[tt]);
                }
            }
            #pragma GCC unroll 4
            for (int tt = 0; tt < NT; tt++) {
                out[tt * tok_stride + t * nb + b] = hsum_s32(sp[tt]);
                out[tt * tok_stride + TB + t * nb + b] = hsum_s32(sn[tt]);
            }
        }
    }
}

static void popn_tile(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t row, int32_t tok0, int32_t nt,
                      int32_t *out, size_t tok_stride) {
    if (nt == 1)
        popn_tile_n(w, act, row, tok0, out, tok_stride, 1);
    else
        popn_tile_n(w, act, row, tok0, out, tok_stride, 2);
}

static void sb_sums_neon(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, int32_t *sums, int32_t r0, int32_t r1) {
    sb_sums_drive(popn_tile, POPN_TILE, w, act, sums, r0, r1);
}

static void sb_gemm_neon(const pbs2p_sb_weight *w, const pbs2p_sb_act *act, float *y, int64_t ldy, int32_t r0,
                         int32_t r1) {
    sb_gemm_drive(popn_tile, POPN_TILE, w, act, y, ldy, r0, r1);
}

/* ------------------------------------------------------------------ Q8_0 ----------------------------------- */

INLINE int32_t dot32_s8(int8x16_t w0, int8x16_t w1, const int8_t *x) {
    const int8x16_t x0 = vld1q_s8(x), x1 = vld1q_s8(x + 16);
    int32x4_t acc = vdupq_n_s32(0);
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w0), vget_low_s8(x0)));
    acc = vpadalq_s16(acc, vmull_s8(vget_high_s8(w0), vget_high_s8(x0)));
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w1), vget_low_s8(x1)));
    acc = vpadalq_s16(acc, vmull_s8(vget_high_s8(w1), vget_high_s8(x1)));
    return hsum_s32(acc);
}

INLINE int32_t q8_block(const uint8_t *blk, const int8_t *x) {
    return dot32_s8(vld1q_s8((const int8_t *)blk + 2), vld1q_s8((const int8_t *)blk + 18), x);
}

/* Q4_0: low nibbles are elements 0..15, high nibbles 16..31, value nibble - 8. */
INLINE int32_t q4_block(const uint8_t *blk, const int8_t *x) {
    const uint8x16_t qs = vld1q_u8(blk + 2);
    const int8x16_t eight = vdupq_n_s8(8);
    return dot32_s8(vsubq_s8(vreinterpretq_s8_u8(vandq_u8(qs, vdupq_n_u8(15))), eight),
                    vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(qs, 4)), eight), x);
}

/* Q3: low 2-bit parts of elements 8k..8k+7 in bits 2k, 2k+1 of the 8 qs bytes; high bit of element j = bit j % 8
 * of qh byte j / 8 (vtst against one bit per lane); value q - 4. */
INLINE int32_t q3_block(const uint8_t *blk, const int8_t *x) {
    const uint8x8_t qs = vld1_u8(blk + 2), m3 = vdup_n_u8(3), bit = vcreate_u8(0x8040201008040201ULL);
    const uint8x16_t lo0 = vcombine_u8(vand_u8(qs, m3), vand_u8(vshr_n_u8(qs, 2), m3));
    const uint8x16_t lo1 = vcombine_u8(vand_u8(vshr_n_u8(qs, 4), m3), vshr_n_u8(qs, 6));
    const uint8x16_t hi0 = vcombine_u8(vtst_u8(vdup_n_u8(blk[10]), bit), vtst_u8(vdup_n_u8(blk[11]), bit));
    const uint8x16_t hi1 = vcombine_u8(vtst_u8(vdup_n_u8(blk[12]), bit), vtst_u8(vdup_n_u8(blk[13]), bit));
    const uint8x16_t four = vdupq_n_u8(4);
    const int8x16_t s4 = vdupq_n_s8(4);
    return dot32_s8(vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(lo0, vandq_u8(hi0, four))), s4),
                    vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(lo1, vandq_u8(hi1, four))), s4), x);
}

/* Rows outer, tokens inner: a row (nb·bytes) is read from memory once and from L1 for the other tokens. */
INLINE void q_gemm_neon(int32_t (*block)(const uint8_t *, const int8_t *), size_t bytes, const uint8_t *w,
                        int32_t K, const pbs2p_q8_act *act, float *y, int64_t ldy, int32_t r0, int32_t r1) {
    const int32_t nb = K / 32;
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = w + (size_t)r * nb * bytes;
        for (int32_t t = 0; t < act->n_tok; t++) {
            const int8_t *xq = act->q + (size_t)t * K;
            const float *xd = act->d + (size_t)t * nb;
            float acc = 0.0f;
            for (int32_t b = 0; b < nb; b++) {
                uint16_t dh;
                memcpy(&dh, row + (size_t)b * bytes, 2);
                int32_t s = block(row + (size_t)b * bytes, xq + (size_t)b * 32);
                float dd = pbs2p_fp16_to_fp32(dh) * xd[b];
                float c = dd * (float)s;
                acc = acc + c;
            }
            y[(int64_t)t * ldy + r] = acc;
        }
    }
}

static void q8_gemm_neon(const uint8_t *w, int32_t K, const pbs2p_q8_act *act, float *y, int64_t ldy, int32_t r0,
                         int32_t r1) {
    q_gemm_neon(q8_block, 34, w, K, act, y, ldy, r0, r1);
}

static void q4_gemm_neon(const uint8_t *w, int32_t K, const pbs2p_q8_act *act, float *y, int64_t ldy, int32_t r0,
                         int32_t r1) {
    q_gemm_neon(q4_block, 18, w, K, act, y, ldy, r0, r1);
}

static void q3_gemm_neon(const uint8_t *w, int32_t K, const pbs2p_q8_act *act, float *y, int64_t ldy, int32_t r0,
                         int32_t r1) {
    q_gemm_neon(q3_block, 14, w, K, act, y, ldy, r0, r1);
}

const pbs2p_kernels pbs2p_kernels_neon = {"neon", sb_gemm_neon, sb_sums_neon, q8_gemm_neon, q4_gemm_neon,
                                          q3_gemm_neon};
const pbs2p_kernels pbs2p_kernels_neon_expand = {"neon-expand", sb_gemm_neon_expand, sb_sums_neon_expand,
                                                 q8_gemm_neon, q4_gemm_neon, q3_gemm_neon};

#endif

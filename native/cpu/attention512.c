/*
 * attention512.c -- the paged INT8 attention items on AVX-512 (attention.c dispatches to them when the
 * CPU has AVX-512 and head_dim is a multiple of 16). Compiled with target attributes, so the library
 * still loads on AVX2-only CPUs. Same arithmetic as attention.c's AVX2 item: scores from dequantized
 * keys times the scale, online softmax through the exp table, values with their scale folded in.
 */
#include <math.h>
#include "attention.h"
#include "transpose512.h"

/* The same item on AVX-512 (head_dim a multiple of 16): keys dequantized transposed, kT [hd][16 keys],
 * so 16 scores are one zmm accumulation over d (no horizontal sums); values dequantized with their scale
 * folded in, so p v is one broadcast-FMA per (key, 16 dims).  Keys past a row's causal limit are masked
 * to -inf before the max and to 0 after the exp. */

/* Keys i0 .. i0 + 15 of a tile (zero past nvalid), dims d0 .. d0 + 15, as floats transposed: r[d] holds
 * dim d0 + d of the 16 keys. */
static inline __attribute__((always_inline)) T512A void key_chunk_t(__m512 r[16], const int8_t *kq, int64_t hd,
                                                                      int64_t i0, int64_t d0, int64_t nvalid) {
    for (int64_t i = 0; i < 16; i++)
        r[i] = i0 + i < nvalid ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                     _mm_loadu_si128((const __m128i *)(kq + (i0 + i) * hd + d0))))
                               : _mm512_setzero_ps();
    transpose16_ps(r);
}

HIDDEN T512A void attend_item512(const attn_args *a, int64_t s, int64_t g, int64_t ctx, int64_t qlen, int64_t row0,
                                 int64_t nq, int64_t token0) {
    const int64_t hd = a->head_dim, bs = a->block_size, group = a->num_heads / a->num_kv_heads;
    const int64_t rows = nq * group, bsp = (bs + 15) & ~(int64_t)15;
    /* stack buffers: rows <= 32, hd <= 256, bs <= 64 (<= 224 KiB) */
    float qs[rows][hd], acc[rows][hd], m[rows], l[rows];
    float kT[hd][bsp], vt[bsp][hd], sc[bsp];
    for (int64_t r = 0; r < rows; r++) {
        const float *src = a->q + (token0 + row0 + r / group) * a->q_stride + (g * group + r % group) * hd;
        for (int64_t d = 0; d < hd; d++) { qs[r][d] = src[d] * a->scale; acc[r][d] = 0.0f; }
        if (rotated_head_dim(hd)) hadamard_inplace(qs[r], hd);
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    const int64_t last_pos = ctx - qlen + row0 + nq - 1;
    const int32_t *table = a->block_tables + s * a->max_blocks_per_seq;
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    for (int64_t p0 = 0; p0 <= last_pos; p0 += bs) {
        const int64_t tile = (int64_t)table[p0 / bs] * a->num_kv_heads + g;
        const int64_t nvalid = ctx - p0 < bs ? ctx - p0 : bs;
        const int8_t *kq = a->key_cache + tile * bs * hd, *vq = a->value_cache + tile * bs * hd;
        const float ks = a->k_scales[tile];
        const __m512 vs = _mm512_set1_ps(a->v_scales[tile]);
        for (int64_t i0 = 0; i0 < bsp; i0 += 16)
            for (int64_t d0 = 0; d0 < hd; d0 += 16) {
                __m512 r[16];
                key_chunk_t(r, kq, hd, i0, d0, nvalid);
                for (int64_t d = 0; d < 16; d++) _mm512_storeu_ps(&kT[d0 + d][i0], r[d]);
            }
        for (int64_t i = 0; i < nvalid; i++)
            for (int64_t d = 0; d < hd; d += 16)
                _mm512_storeu_ps(&vt[i][d], _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                              _mm_loadu_si128((const __m128i *)(vq + i * hd + d)))), vs));
        for (int64_t r = 0; r < rows; r++) {
            const int64_t qpos = ctx - qlen + row0 + r / group;
            const int64_t nk = qpos - p0 + 1 < nvalid ? qpos - p0 + 1 : nvalid;
            if (nk <= 0) continue;
            /* scores, 16 keys a zmm; running max over the valid ones */
            __m512 vmax = neg_inf;
            for (int64_t i0 = 0; i0 < nk; i0 += 16) {
                __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
                for (int64_t d = 0; d < hd; d += 2) {
                    s0 = _mm512_fmadd_ps(_mm512_set1_ps(qs[r][d]), _mm512_loadu_ps(&kT[d][i0]), s0);
                    s1 = _mm512_fmadd_ps(_mm512_set1_ps(qs[r][d + 1]), _mm512_loadu_ps(&kT[d + 1][i0]), s1);
                }
                const int64_t left = nk - i0;
                const __mmask16 km = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                const __m512 sv = _mm512_mask_mov_ps(neg_inf, km, _mm512_mul_ps(_mm512_add_ps(s0, s1), _mm512_set1_ps(ks)));
                _mm512_storeu_ps(sc + i0, sv);
                vmax = _mm512_max_ps(vmax, sv);
            }
            const float mx = fmaxf(m[r], _mm512_reduce_max_ps(vmax));
            const float corr = exp_lut(m[r] - mx);
            __m512 psum = _mm512_setzero_ps();
            const __m256 vmx = _mm256_set1_ps(mx);
            for (int64_t i0 = 0; i0 < nk; i0 += 16) {
                const int64_t left = nk - i0;
                const __mmask16 km = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                const __m512 x = _mm512_loadu_ps(sc + i0);
                /* masked lanes hold -inf: clamp before the table, zero after */
                const __m256 lo = exp_lut_ps(_mm256_max_ps(_mm256_sub_ps(_mm512_castps512_ps256(x), vmx), _mm256_set1_ps(-80.0f)));
                const __m256 hi = exp_lut_ps(_mm256_max_ps(_mm256_sub_ps(_mm512_extractf32x8_ps(x, 1), vmx), _mm256_set1_ps(-80.0f)));
                const __m512 p = _mm512_maskz_mov_ps(km, _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1));
                _mm512_storeu_ps(sc + i0, p);
                psum = _mm512_add_ps(psum, p);
            }
            l[r] = l[r] * corr + _mm512_reduce_add_ps(psum);
            m[r] = mx;
            /* acc = acc * corr + sum_j p_j (vs v_j), 4 zmm of dims at a time */
            const __m512 vcorr = _mm512_set1_ps(corr);
            for (int64_t d0 = 0; d0 < hd; d0 += 64) {
                const int nc = hd - d0 >= 64 ? 4 : (int)((hd - d0) / 16);
                __m512 o[4];
                for (int c = 0; c < nc; c++) o[c] = _mm512_mul_ps(_mm512_loadu_ps(&acc[r][d0 + 16 * c]), vcorr);
                for (int64_t j = 0; j < nk; j++) {
                    const __m512 pj = _mm512_set1_ps(sc[j]);
                    for (int c = 0; c < nc; c++) o[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(&vt[j][d0 + 16 * c]), o[c]);
                }
                for (int c = 0; c < nc; c++) _mm512_storeu_ps(&acc[r][d0 + 16 * c], o[c]);
            }
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        float *dst = a->out + (token0 + row0 + r / group) * a->num_heads * hd + (g * group + r % group) * hd;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (int64_t d = 0; d < hd; d++) dst[d] = acc[r][d] * inv;
        if (rotated_head_dim(hd)) hadamard_inplace(dst, hd);
    }
}

/* attend_item512 for one query token (decode) with a group of at most 4 query heads: the same arithmetic
 * in the same order per row, so the same bits, but the rows go through each tile together: the scores
 * of all rows are accumulated from the transposed key registers (no kT buffer; 2 chains a row as above,
 * 2-8 chains in flight instead of 2, which left the loop waiting on FMA latency), and each value vector
 * is converted once for all rows (no vt buffer). */
HIDDEN T512A void attend_decode512(const attn_args *a, int64_t s, int64_t g, int64_t ctx, int64_t token) {
    const int64_t hd = a->head_dim, bs = a->block_size, rows = a->num_heads / a->num_kv_heads;
    float qs[DECODE_ROWS][hd], acc[DECODE_ROWS][hd], m[DECODE_ROWS], l[DECODE_ROWS];
    float sc[DECODE_ROWS][(bs + 15) & ~(int64_t)15];
    for (int64_t r = 0; r < rows; r++) {
        const float *src = a->q + token * a->q_stride + (g * rows + r) * hd;
        for (int64_t d = 0; d < hd; d++) { qs[r][d] = src[d] * a->scale; acc[r][d] = 0.0f; }
        if (rotated_head_dim(hd)) hadamard_inplace(qs[r], hd);
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    const int32_t *table = a->block_tables + s * a->max_blocks_per_seq;
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    for (int64_t p0 = 0; p0 < ctx; p0 += bs) {
        const int64_t tile = (int64_t)table[p0 / bs] * a->num_kv_heads + g;
        const int64_t nk = ctx - p0 < bs ? ctx - p0 : bs;        /* every key of the tile is visible */
        const int8_t *kq = a->key_cache + tile * bs * hd, *vq = a->value_cache + tile * bs * hd;
        const __m512 ks = _mm512_set1_ps(a->k_scales[tile]), vs = _mm512_set1_ps(a->v_scales[tile]);
        /* step 1: scores of 16 keys at a time for every row */
        __m512 vmax[DECODE_ROWS];
        for (int64_t r = 0; r < rows; r++) vmax[r] = neg_inf;
        for (int64_t i0 = 0; i0 < nk; i0 += 16) {
            __m512 s0[DECODE_ROWS], s1[DECODE_ROWS];
            for (int64_t r = 0; r < rows; r++) s0[r] = s1[r] = _mm512_setzero_ps();
            for (int64_t d0 = 0; d0 < hd; d0 += 16) {
                __m512 kt[16];
                key_chunk_t(kt, kq, hd, i0, d0, nk);
                for (int64_t d = 0; d < 16; d += 2)
                    for (int64_t r = 0; r < rows; r++) {
                        s0[r] = _mm512_fmadd_ps(_mm512_set1_ps(qs[r][d0 + d]), kt[d], s0[r]);
                        s1[r] = _mm512_fmadd_ps(_mm512_set1_ps(qs[r][d0 + d + 1]), kt[d + 1], s1[r]);
                    }
            }
            const int64_t left = nk - i0;
            const __mmask16 km = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            for (int64_t r = 0; r < rows; r++) {
                const __m512 sv = _mm512_mask_mov_ps(neg_inf, km, _mm512_mul_ps(_mm512_add_ps(s0[r], s1[r]), ks));
                _mm512_storeu_ps(&sc[r][i0], sv);
                vmax[r] = _mm512_max_ps(vmax[r], sv);
            }
        }
        /* step 2: p = exp(score - max) per row, the row's running state rescaled */
        float corr[DECODE_ROWS];
        for (int64_t r = 0; r < rows; r++) {
            const float mx = fmaxf(m[r], _mm512_reduce_max_ps(vmax[r]));
            corr[r] = exp_lut(m[r] - mx);
            __m512 psum = _mm512_setzero_ps();
            const __m256 vmx = _mm256_set1_ps(mx);
            for (int64_t i0 = 0; i0 < nk; i0 += 16) {
                const int64_t left = nk - i0;
                const __mmask16 km = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                const __m512 x = _mm512_loadu_ps(&sc[r][i0]);
                const __m256 lo = exp_lut_ps(_mm256_max_ps(_mm256_sub_ps(_mm512_castps512_ps256(x), vmx), _mm256_set1_ps(-80.0f)));
                const __m256 hi = exp_lut_ps(_mm256_max_ps(_mm256_sub_ps(_mm512_extractf32x8_ps(x, 1), vmx), _mm256_set1_ps(-80.0f)));
                const __m512 p = _mm512_maskz_mov_ps(km, _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1));
                _mm512_storeu_ps(&sc[r][i0], p);
                psum = _mm512_add_ps(psum, p);
            }
            l[r] = l[r] * corr[r] + _mm512_reduce_add_ps(psum);
            m[r] = mx;
        }
        /* step 3: acc = acc * corr + sum_j p_j (vs v_j), each v_j converted once for all rows */
        for (int64_t d0 = 0; d0 < hd; d0 += 64) {
            const int nc = hd - d0 >= 64 ? 4 : (int)((hd - d0) / 16);
            __m512 o[DECODE_ROWS][4];
            for (int64_t r = 0; r < rows; r++)
                for (int c = 0; c < nc; c++)
                    o[r][c] = _mm512_mul_ps(_mm512_loadu_ps(&acc[r][d0 + 16 * c]), _mm512_set1_ps(corr[r]));
            for (int64_t j = 0; j < nk; j++) {
                __m512 v[4];
                for (int c = 0; c < nc; c++)
                    v[c] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                             _mm_loadu_si128((const __m128i *)(vq + j * hd + d0 + 16 * c)))), vs);
                for (int64_t r = 0; r < rows; r++) {
                    const __m512 pj = _mm512_set1_ps(sc[r][j]);
                    for (int c = 0; c < nc; c++) o[r][c] = _mm512_fmadd_ps(pj, v[c], o[r][c]);
                }
            }
            for (int64_t r = 0; r < rows; r++)
                for (int c = 0; c < nc; c++) _mm512_storeu_ps(&acc[r][d0 + 16 * c], o[r][c]);
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        float *dst = a->out + token * a->num_heads * hd + (g * rows + r) * hd;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (int64_t d = 0; d < hd; d++) dst[d] = acc[r][d] * inv;
        if (rotated_head_dim(hd)) hadamard_inplace(dst, hd);
    }
}

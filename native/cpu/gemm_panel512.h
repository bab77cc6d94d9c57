/*
 * gemm_panel512.h -- the INT8 GEMM for many activation rows (prefill, large batches) on AVX-512 VNNI,
 * included once by gemm.c.  The [N, K] weights are repacked, one panel of PANEL_N = 32 rows at a time,
 * into the order vpdpbusd wants: for every 4 bytes of K, the 32 rows' 4 bytes side by side (2 zmm), as
 * unsigned bytes w + 128.  Each activation row's 4 bytes are then one broadcast, and one vpdpbusd gives
 * 16 rows' dots at once: 16 per 32-block and MR_P x 2 accumulators, with the per-block scale work
 * (correction, int -> float, scale product, FMA) only ~9 ops per 16 vpdpbusd, where the 4 x 4 tile of
 * gemm_tile512.h spent ~5 ops of it per vpdpbusd.
 *
 * Exact int32 per 32-block: dot(a, w) = dot(a, w + 128) - 128 * sum(a), sum(a) per (row, block) computed
 * once per call; then y += float(dot) * (w scale * a scale), one rounding per block.
 */
#define T512P __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

#define PANEL_N 32                 /* weight rows per panel: 2 zmm of int32 lanes */
#define PANEL_MR 6                 /* activation rows per register tile: 24 accumulators */

/* Panel rows n0 .. n0 + rows - 1 (rows <= PANEL_N; missing rows are zero weights, scale 0) into
 * wp [nb * 8][PANEL_N] uint32 (4 bytes of K, +128 each) and sp [nb][PANEL_N] float. */
static T512P void pack_panel512(uint32_t *wp, float *sp, const int8_t *w, const float *ws, int64_t k, int64_t rows) {
    const int64_t nb = k / QK, quads = k / 4;
    const __m512i bias = _mm512_set1_epi32((int)0x80808080u);
    for (int64_t r0 = 0; r0 < PANEL_N; r0 += 16) {
        int64_t c = 0;
        for (; c + 16 <= quads; c += 16) {            /* 16 rows x 64 bytes -> 16 quads x 16 rows */
            __m512i v[16];
            for (int64_t i = 0; i < 16; i++)
                v[i] = r0 + i < rows ? _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + (r0 + i) * k + 4 * c)), bias)
                                     : bias;
            transpose16_epi32(v);
            for (int64_t q = 0; q < 16; q++) _mm512_storeu_si512((void *)(wp + (c + q) * PANEL_N + r0), v[q]);
        }
        for (; c < quads; c++)                        /* an odd last block */
            for (int64_t i = 0; i < 16; i++) {
                uint32_t x = 0x80808080u;
                if (r0 + i < rows) {
                    memcpy(&x, w + (r0 + i) * k + 4 * c, 4);
                    x ^= 0x80808080u;
                }
                wp[c * PANEL_N + r0 + i] = x;
            }
    }
    for (int64_t b = 0; b < nb; b++)
        for (int64_t r = 0; r < PANEL_N; r++) sp[b * PANEL_N + r] = r < rows ? ws[r * nb + b] : 0.0f;
}

/* 128 * sum of each 32-block of each activation row: asum [m][nb] int32. */
static T512P void block_sums512(int32_t *asum, const int8_t *xq, int64_t m, int64_t k) {
    const int64_t nb = k / QK;
    const __m256i ones = _mm256_set1_epi8(1);
    for (int64_t i = 0; i < m; i++)
        for (int64_t b = 0; b < nb; b++) {
            /* sum of 32 int8: vpdpbusd with unsigned ones, then the 8 lanes */
            const __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones,
                                                  _mm256_loadu_si256((const __m256i *)(xq + i * k + b * QK)));
            __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
            asum[i * nb + b] = 128 * _mm_cvtsi128_si32(h);
        }
}

/* y[i, n0 .. n0 + cols) for activation rows i0 .. i0 + MR - 1 over the packed panel. */
static inline __attribute__((always_inline)) T512P void
panel_tile512(float *y, int64_t ldy, const int8_t *xq, const float *xs, const int32_t *asum, const uint32_t *wp,
              const float *sp, int64_t nb, int64_t k, const int MR, int cols) {
    __m512 acc[PANEL_MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i d[PANEL_MR][2];
        for (int i = 0; i < MR; i++) d[i][0] = d[i][1] = _mm512_set1_epi32(-asum[i * nb + b]);
        const uint32_t *wb = wp + b * 8 * PANEL_N;
        for (int q = 0; q < 8; q++) {
            const __m512i w0 = _mm512_loadu_si512((const void *)(wb + q * PANEL_N));
            const __m512i w1 = _mm512_loadu_si512((const void *)(wb + q * PANEL_N + 16));
            for (int i = 0; i < MR; i++) {
                int32_t a4;
                memcpy(&a4, xq + i * k + b * QK + 4 * q, 4);
                const __m512i a = _mm512_set1_epi32(a4);
                d[i][0] = _mm512_dpbusd_epi32(d[i][0], w0, a);
                d[i][1] = _mm512_dpbusd_epi32(d[i][1], w1, a);
            }
        }
        const __m512 s0 = _mm512_loadu_ps(sp + b * PANEL_N), s1 = _mm512_loadu_ps(sp + b * PANEL_N + 16);
        for (int i = 0; i < MR; i++) {
            const __m512 x = _mm512_set1_ps(xs[i * nb + b]);
            acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i][0]), _mm512_mul_ps(s0, x), acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i][1]), _mm512_mul_ps(s1, x), acc[i][1]);
        }
    }
    const __mmask16 m0 = cols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1);
    const __mmask16 m1 = cols >= 32 ? (__mmask16)0xFFFF : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
    for (int i = 0; i < MR; i++) {
        _mm512_mask_storeu_ps(y + i * ldy, m0, acc[i][0]);
        _mm512_mask_storeu_ps(y + i * ldy + 16, m1, acc[i][1]);
    }
}

#define PTILE(MR_) panel_tile512(y + i0 * ldy, ldy, xq + i0 * k, xs + i0 * nb, asum + i0 * nb, wp, sp, nb, k, MR_, cols)
/* Every activation row against one packed panel: y [m, ldy] at column n0 (already offset). */
static T512P void panel_rows512(float *y, int64_t ldy, const int8_t *xq, const float *xs, const int32_t *asum,
                                const uint32_t *wp, const float *sp, int64_t m, int64_t k, int cols) {
    const int64_t nb = k / QK;
    int64_t i0 = 0;
    for (; i0 + PANEL_MR <= m; i0 += PANEL_MR) PTILE(PANEL_MR);
    switch (m - i0) {
    case 1: PTILE(1); break;
    case 2: PTILE(2); break;
    case 3: PTILE(3); break;
    case 4: PTILE(4); break;
    case 5: PTILE(5); break;
    default: break;
    }
}
#undef PTILE
#undef T512P

/*
 * gemm_tile.h -- the INT8 GEMM micro-kernel, included by gemm.c once per instruction set with
 * TILE_SUFFIX (name suffix), TILE_TARGET (gcc target string) and TILE_VNNI (0: vpmaddubsw + vpmaddwd,
 * 1: vpdpbusd) defined.  Defines tile_q8_<suffix> and tile_dispatch_<suffix>; undefines the macros.
 */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define TILE_FN CAT(tile_q8, TILE_SUFFIX)
#define DISPATCH_FN CAT(tile_dispatch, TILE_SUFFIX)
#define DOT_FN CAT(dot_block, TILE_SUFFIX)

/* int32 dot of one 32-block as 8 float lanes: |a| (u8) times w with a's sign (s8), so the unsigned
 * operand never exceeds 127 and vpmaddubsw's int16 pair sums (<= 2 * 127 * 127) cannot saturate. */
static inline __attribute__((always_inline, target(TILE_TARGET))) __m256
DOT_FN(__m256i abs_a, __m256i a, __m256i w) {
#if TILE_VNNI
    return _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), abs_a, _mm256_sign_epi8(w, a)));
#else
    __m256i p16 = _mm256_maddubs_epi16(abs_a, _mm256_sign_epi8(w, a));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
#endif
}

/* y[i, j] for an MR x NR tile over the whole K; MR, NR are constants at every call site so the
 * MR * NR accumulators stay in registers. */
static inline __attribute__((always_inline, target(TILE_TARGET))) void
TILE_FN(float *y, int64_t ldy, const int8_t *xq, const float *xs, const int8_t *w, const float *ws,
        int64_t nb, const int MR, const int NR) {
    __m256 acc[4][8];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    const int64_t k = nb * QK;
    for (int64_t b = 0; b < nb; b++) {
        __m256i wv[8];
        __m256 wsc[8];
        for (int j = 0; j < NR; j++) {
            wv[j] = _mm256_loadu_si256((const __m256i *)(w + j * k + b * QK));
            wsc[j] = _mm256_broadcast_ss(ws + j * nb + b);          /* a load-port broadcast */
        }
        for (int i = 0; i < MR; i++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(xq + i * k + b * QK));
            __m256i abs_a = _mm256_sign_epi8(a, a);
            const __m256 xsc = _mm256_broadcast_ss(xs + i * nb + b);
            for (int j = 0; j < NR; j++)
                acc[i][j] = _mm256_fmadd_ps(_mm256_mul_ps(DOT_FN(abs_a, a, wv[j]), wsc[j]), xsc, acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[i * ldy + j] = hsum_ps(acc[i][j]);
}

/* One tile with runtime mr (1..4) and nr (1..8 when mr == 1, else 1..4). */
#define TILE(MR_, NR_) TILE_FN(y, ldy, xq, xs, w, ws, nb, MR_, NR_)
static __attribute__((target(TILE_TARGET))) void
DISPATCH_FN(float *y, int64_t ldy, const int8_t *xq, const float *xs, const int8_t *w, const float *ws,
            int64_t nb, int mr, int nr) {
    switch (mr * 8 + nr) {
    case 1 * 8 + 1: TILE(1, 1); break;
    case 1 * 8 + 2: TILE(1, 2); break;
    case 1 * 8 + 3: TILE(1, 3); break;
    case 1 * 8 + 4: TILE(1, 4); break;
    case 1 * 8 + 5: TILE(1, 5); break;
    case 1 * 8 + 6: TILE(1, 6); break;
    case 1 * 8 + 7: TILE(1, 7); break;
    case 1 * 8 + 8: TILE(1, 8); break;
    case 2 * 8 + 1: TILE(2, 1); break;
    case 2 * 8 + 2: TILE(2, 2); break;
    case 2 * 8 + 3: TILE(2, 3); break;
    case 2 * 8 + 4: TILE(2, 4); break;
    case 3 * 8 + 1: TILE(3, 1); break;
    case 3 * 8 + 2: TILE(3, 2); break;
    case 3 * 8 + 3: TILE(3, 3); break;
    case 3 * 8 + 4: TILE(3, 4); break;
    case 4 * 8 + 1: TILE(4, 1); break;
    case 4 * 8 + 2: TILE(4, 2); break;
    case 4 * 8 + 3: TILE(4, 3); break;
    case 4 * 8 + 4: TILE(4, 4); break;
    default: break;
    }
}
#undef TILE
#undef DOT_FN
#undef DISPATCH_FN
#undef TILE_FN
#undef CAT
#undef CAT_
#undef TILE_SUFFIX
#undef TILE_TARGET
#undef TILE_VNNI

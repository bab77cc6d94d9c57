/*
 * gemm_tile512.h -- the INT8 GEMM micro-kernel on AVX-512 VNNI (zmm, vpdpbusd), included once by
 * gemm.c.  Compiled with a target attribute so the library still loads on AVX2-only CPUs; gemm.c
 * calls it only when the CPU reports avx512f/bw/dq/vl/vnni (and pa_set_isa_cpu allows it).
 *
 * One zmm holds two 32-blocks along K (64 int8).  Signed x signed through vpdpbusd (u8 x s8):
 * u = a XOR 0x80 = a + 128 as u8, so dot(u, w) = dot(a, w) + 128 * sum(w); each weight row's
 * 128 * sum(w) per lane is computed once per tile step (one vpdpbusd with 0x80 bytes) and is the
 * starting value of every row's accumulation, so the int32 dot per 4 bytes is exact.  Lanes 0-7 are
 * block b, lanes 8-15 block b + 1; their float scales are broadcast per half.  An odd last block
 * is loaded with a 32-byte mask (upper half zero: contributes 0).
 */
#define T512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

/* [s[0] x 8, s[step] x 8] (s[step] only when two blocks are live; else s[0] twice). */
static inline __attribute__((always_inline)) T512 __m512 scale_pair512(const float *s, int two) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_broadcast_ss(s)), _mm256_broadcast_ss(s + two), 1);
}

static inline __attribute__((always_inline)) T512 void
tile_q8_avx512(float *y, int64_t ldy, const int8_t *xq, const float *xs, const int8_t *w, const float *ws,
               int64_t nb, const int MR, const int NR) {
    __m512 acc[4][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    const int64_t k = nb * QK;
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    for (int64_t b = 0; b < nb; b += 2) {
        const int two = b + 1 < nb;
        const __mmask64 lm = two ? ~(__mmask64)0 : (__mmask64)0xFFFFFFFFu;
        __m512i wv[4], corr[4];
        __m512 wsc[4];
        for (int j = 0; j < NR; j++) {
            wv[j] = _mm512_maskz_loadu_epi8(lm, w + j * k + b * QK);
            corr[j] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, wv[j]));
            wsc[j] = scale_pair512(ws + j * nb + b, two);
        }
        for (int i = 0; i < MR; i++) {
            const __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(lm, xq + i * k + b * QK), bias);
            const __m512 xsc = scale_pair512(xs + i * nb + b, two);
            for (int j = 0; j < NR; j++) {
                const __m512 d = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr[j], u, wv[j]));
                acc[i][j] = _mm512_fmadd_ps(d, _mm512_mul_ps(wsc[j], xsc), acc[i][j]);
            }
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
}

/* One tile with runtime mr (1..4) and nr (1..4). */
#define TILE(MR_, NR_) tile_q8_avx512(y, ldy, xq, xs, w, ws, nb, MR_, NR_)
static T512 void tile_dispatch_avx512(float *y, int64_t ldy, const int8_t *xq, const float *xs, const int8_t *w,
                                      const float *ws, int64_t nb, int mr, int nr) {
    switch (mr * 8 + nr) {
    case 1 * 8 + 1: TILE(1, 1); break;
    case 1 * 8 + 2: TILE(1, 2); break;
    case 1 * 8 + 3: TILE(1, 3); break;
    case 1 * 8 + 4: TILE(1, 4); break;
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
#undef T512

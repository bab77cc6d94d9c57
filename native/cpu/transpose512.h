/*
 * transpose512.h -- 16 x 16 transposes of 32-bit values held in 16 zmm, for the AVX-512 kernels
 * (attention.c: key tiles; gemm_panel512.h: weight panels).  Compiled with a target attribute, like
 * the kernels that include it, so the library still loads on AVX2-only CPUs.
 */
#ifndef PA_TRANSPOSE512_H
#define PA_TRANSPOSE512_H
#include <immintrin.h>

#define T512T __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

/* r[i][j] <- r[j][i] (unpack 32-bit, unpack 64-bit, two rounds of 128-bit lane shuffles). */
static inline __attribute__((always_inline)) T512T void transpose16_epi32(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4)
        for (int j = 0; j < 2; j++) {
            r[i + 2 * j] = _mm512_unpacklo_epi64(t[i + j], t[i + j + 2]);
            r[i + 2 * j + 1] = _mm512_unpackhi_epi64(t[i + j], t[i + j + 2]);
        }
    /* now 128-bit lane L of r[4a + c] holds rows 4a..4a+3 of column 4L + c */
    for (int i = 0; i < 8; i++) {
        const int a = (i / 4) * 8 + i % 4;                      /* pairs (0,4) (1,5) (2,6) (3,7) (8,12) ... */
        t[a] = _mm512_shuffle_i32x4(r[a], r[a + 4], 0x88);
        t[a + 4] = _mm512_shuffle_i32x4(r[a], r[a + 4], 0xDD);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    }
}

static inline __attribute__((always_inline)) T512T void transpose16_ps(__m512 r[16]) {
    __m512i v[16];
    for (int i = 0; i < 16; i++) v[i] = _mm512_castps_si512(r[i]);
    transpose16_epi32(v);
    for (int i = 0; i < 16; i++) r[i] = _mm512_castsi512_ps(v[i]);
}

#undef T512T
#endif /* PA_TRANSPOSE512_H */

/*
 * exp_lut.c -- exp for the softmax through a table, and a polynomial exp for SiLU.
 *
 * exp_lut: exp(x) = 2^(x * log2(e)); with t = x * log2(e) * 256, n = floor(t) = 256 * e + j:
 *   exp(x) = 2^e * (T[j] + (t - n) * (T[j + 1] - T[j])),  T[j] = 2^(j / 256)  (exp_table.h)
 * Linear interpolation on a step of 1/256 in the exponent has relative error at most
 * (ln 2 / 256)^2 / 8 = 9.2e-7; with float rounding of t the measured maximum relative error is
 * below 2e-6 on [-20, 0] (tests/test_cpu_kernels.py::test_exp_lut checks it).  Only x <= 0 is used
 * (softmax subtracts the running max); x < -87 gives 0.
 */
#include "cpu_common.h"
#include "exp_table.h"

HIDDEN __m256 exp_lut_ps(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);            /* lanes below -87 (or NaN) -> 0 */
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_setzero_ps()), lo);
    /* step 1: t in units of 1/256 of a power of two */
    __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f * 256.0f));
    __m256 tf = _mm256_floor_ps(t);
    __m256 frac = _mm256_sub_ps(t, tf);
    __m256i n = _mm256_cvtps_epi32(tf);
    /* step 2: table lookup and interpolation inside [2^(j/256), 2^((j+1)/256)] */
    __m256i j = _mm256_and_si256(n, _mm256_set1_epi32(255));
    __m256 t0 = _mm256_i32gather_ps(EXP2_TABLE, j, 4);
    __m256 t1 = _mm256_i32gather_ps(EXP2_TABLE + 1, j, 4);
    __m256 v = _mm256_fmadd_ps(frac, _mm256_sub_ps(t1, t0), t0);
    /* step 3: scale by 2^e through the exponent bits (e >= -126 since x >= -87) */
    __m256i e = _mm256_srai_epi32(n, 8);
    __m256 pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
    return _mm256_and_ps(_mm256_mul_ps(v, pow2), keep);
}

HIDDEN float exp_lut(float x) {
    if (!(x >= -87.0f)) return 0.0f;
    if (x > 0.0f) x = 0.0f;
    float t = x * (1.4426950408889634f * 256.0f);
    float tf = floorf(t);
    int n = (int)tf;
    int j = n & 255;
    float v = EXP2_TABLE[j] + (t - tf) * (EXP2_TABLE[j + 1] - EXP2_TABLE[j]);
    /* v * 2^e through the exponent bits, as exp_lut_ps (exact like ldexpf: e >= -126 since x >= -87,
     * and ldexpf was a libm call per softmax row and tile) */
    union { uint32_t u; float f; } pow2 = {.u = (uint32_t)((n >> 8) + 127) << 23};
    return v * pow2.f;
}

/* Cephes-style expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial for e^r. */
HIDDEN __m256 exp_poly_ps(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447504f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
    return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
}

/* ---- export for the parity test: out[i] = exp(x[i]) through the table ---- */
pa_status pa_exp_lut_cpu(float *out, const float *x, int64_t n) {
    CHECK_PTR(out); CHECK_PTR(x);
    CHECK(n >= 0, "n = %ld < 0", (long)n);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, exp_lut_ps(_mm256_loadu_ps(x + i)));
    for (; i < n; i++) out[i] = exp_lut(x[i]);
    return PA_OK;
}

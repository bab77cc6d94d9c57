/*
 * norm.c -- RMSNorm (with the residual add fused, in place), RoPE (HF rotate_half), SiLU * mul.
 */
#include "cpu_common.h"

/* ================================================================================================
 * RMSNorm: residual += x (when residual is given), out = r / sqrt(mean(r^2) + eps) * weight.
 * ============================================================================================== */
HIDDEN void rms_norm_row(float *out, float *res, const float *x, const float *weight, int64_t hidden, float eps) {
    /* step 1: the sum r (written back to the residual) and its sum of squares */
    const float *r = res ? res : x;
    __m256 ss = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= hidden; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        if (res) {
            v = _mm256_add_ps(v, _mm256_loadu_ps(res + i));
            _mm256_storeu_ps(res + i, v);
        }
        ss = _mm256_fmadd_ps(v, v, ss);
    }
    float sum = hsum_ps(ss);
    for (; i < hidden; i++) {
        float v = x[i] + (res ? res[i] : 0.0f);
        if (res) res[i] = v;
        sum += v * v;
    }
    /* step 2: scale (torch's order: (r * inv) * weight) */
    const float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
    const __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= hidden; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(r + i), vinv), _mm256_loadu_ps(weight + i)));
    for (; i < hidden; i++) out[i] = (r[i] * inv) * weight[i];
}

HIDDEN void rms_norm_rows(float *out, float *residual, const float *x, const float *weight,
                          int64_t rows, int64_t hidden, float eps) {
    #pragma omp parallel for schedule(static) if (rows >= 256)   /* the final norm of a step stays serial */
    for (int64_t t = 0; t < rows; t++)
        rms_norm_row(out + t * hidden, residual ? residual + t * hidden : NULL, x + t * hidden, weight, hidden, eps);
}

pa_status pa_rms_norm_cpu(float *out, float *residual, const float *x, const float *weight,
                          int64_t num_tokens, int64_t hidden, float eps) {
    CHECK_PTR(out); CHECK_PTR(x); CHECK_PTR(weight);
    CHECK(num_tokens >= 0 && hidden > 0, "bad sizes num_tokens=%ld hidden=%ld", (long)num_tokens, (long)hidden);
    CHECK(eps > 0.0f, "eps must be positive");
    rms_norm_rows(out, residual, x, weight, num_tokens, hidden, eps);
    return PA_OK;
}

/* ================================================================================================
 * RoPE.  The table holds cos/sin [T, head_dim / 2] of pos * theta^(-2i / head_dim), computed in
 * double and rounded to float (as torch_ref.rope_cos_sin); built once per forward, read by every layer.
 * ============================================================================================== */
pa_status pa_rope_table_cpu(float *cos_t, float *sin_t, const int64_t *positions, int64_t num_tokens,
                            int64_t head_dim, double theta) {
    CHECK_PTR(cos_t); CHECK_PTR(sin_t); CHECK_PTR(positions);
    CHECK(num_tokens >= 0 && head_dim > 0 && head_dim % 2 == 0, "bad sizes num_tokens=%ld head_dim=%ld",
          (long)num_tokens, (long)head_dim);
    CHECK(theta > 0.0, "theta must be positive");
    const int64_t half = head_dim / 2;
    /* serial: ~1 us a token, and an OpenMP team left spinning would compete with the layer pool */
    for (int64_t t = 0; t < num_tokens; t++) {
        for (int64_t i = 0; i < half; i++) {
            double inv_freq = 1.0 / pow(theta, (double)(2 * i) / (double)head_dim);
            double f = (double)positions[t] * inv_freq;
            cos_t[t * half + i] = (float)cos(f);
            sin_t[t * half + i] = (float)sin(f);
        }
    }
    return PA_OK;
}

/* x [heads, head_dim] in place: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), no fma (torch's rounding). */
HIDDEN void rope_heads(float *x, int64_t heads, int64_t head_dim, const float *c, const float *s) {
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *x1 = x + h * head_dim, *x2 = x1 + half;
        int64_t i = 0;
        for (; i + 8 <= half; i += 8) {
            __m256 a = _mm256_loadu_ps(x1 + i), b = _mm256_loadu_ps(x2 + i);
            __m256 vc = _mm256_loadu_ps(c + i), vs = _mm256_loadu_ps(s + i);
            _mm256_storeu_ps(x1 + i, _mm256_sub_ps(_mm256_mul_ps(a, vc), _mm256_mul_ps(b, vs)));
            _mm256_storeu_ps(x2 + i, _mm256_add_ps(_mm256_mul_ps(b, vc), _mm256_mul_ps(a, vs)));
        }
        for (; i < half; i++) {
            float a = x1[i], b = x2[i];
            x1[i] = a * c[i] - b * s[i];
            x2[i] = b * c[i] + a * s[i];
        }
    }
}

HIDDEN void rope_rows(float *q, float *k, const float *cos_t, const float *sin_t, int64_t num_tokens,
                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t q_stride,
                      int64_t k_stride) {
    const int64_t half = head_dim / 2;
    #pragma omp parallel for schedule(static) if (num_tokens >= 32)
    for (int64_t t = 0; t < num_tokens; t++) {
        rope_heads(q + t * q_stride, num_heads, head_dim, cos_t + t * half, sin_t + t * half);
        rope_heads(k + t * k_stride, num_kv_heads, head_dim, cos_t + t * half, sin_t + t * half);
    }
}

pa_status pa_rope_cpu(float *q, float *k, const float *cos_t, const float *sin_t, int64_t num_tokens,
                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t q_stride,
                      int64_t k_stride) {
    CHECK_PTR(q); CHECK_PTR(k); CHECK_PTR(cos_t); CHECK_PTR(sin_t);
    CHECK(num_tokens >= 0 && num_heads > 0 && num_kv_heads > 0 && head_dim > 0 && head_dim % 2 == 0,
          "bad sizes num_tokens=%ld num_heads=%ld num_kv_heads=%ld head_dim=%ld", (long)num_tokens,
          (long)num_heads, (long)num_kv_heads, (long)head_dim);
    CHECK(q_stride >= num_heads * head_dim && k_stride >= num_kv_heads * head_dim,
          "row strides too small (q_stride=%ld k_stride=%ld)", (long)q_stride, (long)k_stride);
    rope_rows(q, k, cos_t, sin_t, num_tokens, num_heads, num_kv_heads, head_dim, q_stride, k_stride);
    return PA_OK;
}

/* ================================================================================================
 * SiLU * mul: gate_up [T, 2I] (gate then up) -> out [T, I] = gate / (1 + exp(-gate)) * up.
 * ============================================================================================== */
/* columns [i0, i1) of one row */
HIDDEN void silu_mul_span(float *o, const float *g, const float *u, int64_t i0, int64_t i1) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
        __m256 vg = _mm256_loadu_ps(g + i);
        __m256 e = exp_poly_ps(_mm256_sub_ps(_mm256_setzero_ps(), vg));
        __m256 silu = _mm256_div_ps(vg, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
    }
    for (; i < i1; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

HIDDEN void silu_mul_rows(float *out, const float *gate_up, int64_t rows, int64_t inter) {
    #pragma omp parallel for schedule(static) if (rows * inter >= 32768)
    for (int64_t t = 0; t < rows; t++)
        silu_mul_span(out + t * inter, gate_up + t * 2 * inter, gate_up + t * 2 * inter + inter, 0, inter);
}

pa_status pa_silu_mul_cpu(float *out, const float *gate_up, int64_t num_tokens, int64_t intermediate) {
    CHECK_PTR(out); CHECK_PTR(gate_up);
    CHECK(num_tokens >= 0 && intermediate > 0, "bad sizes num_tokens=%ld intermediate=%ld",
          (long)num_tokens, (long)intermediate);
    silu_mul_rows(out, gate_up, num_tokens, intermediate);
    return PA_OK;
}

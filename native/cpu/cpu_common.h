/*
 * cpu_common.h -- shared by the files of native/cpu: error reporting, argument checks, small AVX2 helpers.
 * Internal helpers are hidden (not exported); the exports are declared in pa.h.
 */
#ifndef PA_CPU_COMMON_H
#define PA_CPU_COMMON_H
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>
#include "pa.h"

#define HIDDEN __attribute__((visibility("hidden")))

/* Weights and activations are quantized in groups of QK values along the reduction dim. */
#define QK 32
/* Bounds for stack buffers inside the attention kernel. */
#define MAX_HEAD_DIM 256
#define MAX_BLOCK_SIZE 256

/* Record "<kernel>: <reason>" as this thread's last error and return status. */
HIDDEN pa_status cpu_fail(pa_status status, const char *kernel, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Return PA_ERR_INVALID_ARG from the calling export when cond is false. */
#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        if (!(cond)) return cpu_fail(PA_ERR_INVALID_ARG, __func__, __VA_ARGS__); \
    } while (0)
#define CHECK_PTR(p) CHECK((p) != NULL, "%s is NULL", #p)

/* A team's shared work counter: threads claim chunks with atomic_fetch_add. */
typedef _Atomic int64_t work_counter;

/* ---- internal kernels shared between the exports and the fused layer ---------------------- */
/* x [m, k] float -> xq [m, k] int8, xs [m, k/QK] float (symmetric, round to nearest even). */
HIDDEN void quantize_rows_q8(int8_t *xq, float *xs, const float *x, int64_t m, int64_t k, int64_t x_stride);
/* y [m, n] = dequant(xq) @ dequant(w).T ; w [n, k] int8, ws [n, k/QK]. */
HIDDEN void gemm_q8(float *y, const int8_t *xq, const float *xs, const int8_t *w, const float *ws,
                    int64_t m, int64_t n, int64_t k);
HIDDEN void gemm_q8_part(float *y, const int8_t *xq, const float *xs, const int8_t *w, const float *ws,
                         int64_t m, int64_t n, int64_t k, work_counter *next, int nt);
HIDDEN void quantize_row_q8(int8_t *q, float *s, const float *x, int64_t k);
HIDDEN void rms_norm_row(float *out, float *res, const float *x, const float *weight, int64_t hidden, float eps);
HIDDEN void rope_heads(float *x, int64_t heads, int64_t head_dim, const float *c, const float *s);
HIDDEN void silu_mul_span(float *o, const float *g, const float *u, int64_t i0, int64_t i1);
HIDDEN void write_kv_q8_part(int8_t *key_cache, float *k_scales, int8_t *value_cache, float *v_scales,
                             const float *k, const float *v, const int32_t *slot_mapping, int64_t num_tokens,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t k_stride,
                             int64_t v_stride, int part, int nparts);
HIDDEN void paged_attention_q8_part(float *out, const float *q, const int8_t *key_cache, const float *k_scales,
                                    const int8_t *value_cache, const float *v_scales,
                                    const int32_t *block_tables, const int32_t *context_lens,
                                    const int32_t *query_start_loc, int64_t num_seqs, int64_t num_heads,
                                    int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                    int64_t max_blocks_per_seq, int64_t q_stride, float scale, work_counter *next);
HIDDEN void rms_norm_rows(float *out, float *residual, const float *x, const float *weight,
                          int64_t rows, int64_t hidden, float eps);
HIDDEN void rope_rows(float *q, float *k, const float *cos_t, const float *sin_t, int64_t num_tokens,
                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t q_stride,
                      int64_t k_stride);
HIDDEN void silu_mul_rows(float *out, const float *gate_up, int64_t rows, int64_t inter);
HIDDEN void write_kv_q8(int8_t *key_cache, float *k_scales, int8_t *value_cache, float *v_scales,
                        const float *k, const float *v, const int32_t *slot_mapping, int64_t num_tokens,
                        int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t k_stride,
                        int64_t v_stride);
HIDDEN void paged_attention_q8(float *out, const float *q, const int8_t *key_cache, const float *k_scales,
                               const int8_t *value_cache, const float *v_scales,
                               const int32_t *block_tables, const int32_t *context_lens,
                               const int32_t *query_start_loc, int64_t num_seqs, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                               int64_t max_blocks_per_seq, int64_t q_stride, float scale);

/* Run fn(arg, tid, nt) on every member of the pool's team (the caller is member 0); returns when all did,
 * with the seconds the caller then waited for late members. */
HIDDEN double pool_run(pa_pool_cpu *pool, void (*fn)(void *, int, int), void *arg);
HIDDEN int pool_size(const pa_pool_cpu *pool);
/* 1 when this call should run on the caller alone (no pool, or the cores were contended lately). */
HIDDEN int pool_take_solo(pa_pool_cpu *pool);
/* After a team call of `elapsed` seconds that lost `waited` to members not running: maybe go solo. */
HIDDEN void pool_check_contention(pa_pool_cpu *pool, double waited, double elapsed);
HIDDEN pa_status check_attention_batch(const char *kernel, const int32_t *block_tables, const int32_t *context_lens,
                                       const int32_t *query_start_loc, int64_t num_seqs, int64_t num_tokens,
                                       int64_t block_size, int64_t max_blocks_per_seq, int64_t num_blocks);

/* ---- futex: sleep until *addr != expected, wake every sleeper (Linux) ---------------------- */
#include <linux/futex.h>
#include <sys/syscall.h>
extern long syscall(long number, ...);          /* unistd.h hides it under -std=c11 */
static inline void futex_wait(_Atomic uint32_t *addr, uint32_t expected) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}
static inline void futex_wake_all(_Atomic uint32_t *addr) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
}

/* monotonic seconds (for the contention check only) */
#include <time.h>
static inline double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- AVX2 helpers ------------------------------------------------------------------------- */
static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax_ps(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 int8 -> 8 float */
static inline __m256 load8_i8_ps(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* exp(x) for x <= 0 through the 2^(j/256) table with linear interpolation (exp_lut.c). */
HIDDEN __m256 exp_lut_ps(__m256 x);
HIDDEN float exp_lut(float x);
/* Instruction-set level in use: 0 AVX2, 1 AVX-VNNI, 2 AVX-512 (VNNI) (gemm.c; capped by pa_set_isa_cpu). */
HIDDEN int isa_level(void);
/* exp(x) by a degree-6 polynomial after range reduction; relative error < 2e-7 (silu). */
HIDDEN __m256 exp_poly_ps(__m256 x);

#endif /* PA_CPU_COMMON_H */

/*
 * gemm.c -- INT8 linear layers: activations quantized on the fly in blocks of 32 along K
 * (symmetric, one float scale a block, like llama.cpp's Q8_0), weights int8 [N, K] with a float
 * scale per group of 32 along K.  Per 32-block the dot is exact in int32 (vpmaddubsw + vpmaddwd with
 * the sign moved from a onto w so the unsigned operand is |a|), then acc += isum * sa * sw in float.
 *
 * y[m, n] = sum_b xs[m, b] * ws[n, b] * sum_{k in block b} xq[m, k] * w[n, k]
 *
 * M = 1 (decode) is a GEMV split over N across threads, 2 weight rows at a time with the rows 6 tiles
 * ahead prefetched: over the model's 4 layer matrices cycled through 120 MB (DRAM, as in a forward pass)
 * one core measured 31.8 GB/s with 8 rows a tile and 2 tiles ahead, 35.0 with 4 rows 6 ahead, 41.4 with
 * 2 rows 6 ahead (a plain streaming read: 41); 1 row: 29.3.  M > 1 is a tiled GEMM: each thread owns a range of N; for every
 * NR weight rows (NR * K bytes, L1-resident) it sweeps all activation rows in tiles of MR, so every
 * weight byte is read from memory once for the whole batch.
 */
#ifdef _OPENMP
#include <omp.h>
#endif
#include "cpu_common.h"
#ifndef GEMV_NR
#define GEMV_NR 2
#endif
#ifndef GEMV_AHEAD
#define GEMV_AHEAD 6
#endif
#ifndef GEMM_PREFETCH
#define GEMM_PREFETCH 2
#endif
#ifndef GEMV_PREFETCH
#define GEMV_PREFETCH 1
#endif
#ifndef GEMM_HINT
#define GEMM_HINT _MM_HINT_T0
#endif
#ifndef GEMV_MAX_M
#define GEMV_MAX_M 1
#endif
#ifndef GEMM_MR
#define GEMM_MR 4
#endif
#ifndef GEMM_NR
#define GEMM_NR 3
#endif
/* tile_dispatch_* has bodies for mr <= 4 with nr <= 4, and mr == 1 with nr <= 8 (4x3: measured best) */
_Static_assert(GEMM_MR <= 4 && GEMM_NR <= 4 && GEMV_NR <= 8, "no micro-kernel for this tile");

/* ================================================================================================
 * Activation quantization: x [m, k] (row stride x_stride) -> xq [m, k] int8, xs [m, k/QK] float.
 * ============================================================================================== */
HIDDEN void quantize_row_q8(int8_t *q, float *s, const float *x, int64_t k) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < k / QK; b++) {
        const float *xb = x + b * QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        /* step 1: absmax of the block -> scale = absmax / 127 */
        __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign_bit, v0), _mm256_andnot_ps(sign_bit, v1));
        m = _mm256_max_ps(m, _mm256_max_ps(_mm256_andnot_ps(sign_bit, v2), _mm256_andnot_ps(sign_bit, v3)));
        float amax = hmax_ps(m);
        float d = amax / 127.0f;
        s[b] = d;
        __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        /* step 2: round to nearest even, pack 32 int32 -> 32 int8 in order */
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
        __m256i p01 = _mm256_packs_epi32(i0, i1), p23 = _mm256_packs_epi32(i2, i3);
        __m256i p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm);
        _mm256_storeu_si256((__m256i *)(q + b * QK), p);
    }
}

HIDDEN void quantize_rows_q8(int8_t *xq, float *xs, const float *x, int64_t m, int64_t k, int64_t x_stride) {
    #pragma omp parallel for schedule(static) if (m * k >= 16384)
    for (int64_t i = 0; i < m; i++) quantize_row_q8(xq + i * k, xs + i * (k / QK), x + i * x_stride, k);
}

/* ================================================================================================
 * Micro-kernels: gemm_tile.h instantiated for plain AVX2 and for AVX-VNNI (vpdpbusd, VEX-encoded,
 * no AVX-512), chosen at run time.
 * ============================================================================================== */
#define TILE_SUFFIX avx2
#define TILE_TARGET "avx2,fma"
#define TILE_VNNI 0
#include "gemm_tile.h"
#define TILE_SUFFIX vnni
#define TILE_TARGET "avx2,fma,avxvnni"
#define TILE_VNNI 1
#include "gemm_tile.h"
#include "gemm_tile512.h"
#include <string.h>
#include "transpose512.h"
#include "gemm_panel512.h"
#ifndef PANEL_MIN_M
#define PANEL_MIN_M 4
#endif
#define PANEL_MAX_SUMS (1 << 17)          /* m * K/32 block sums on the stack: <= 512 KiB */
#ifndef GEMM_NR512
#define GEMM_NR512 4
#endif
_Static_assert(GEMM_NR512 <= 4, "no AVX-512 micro-kernel for this tile");

/* ================================================================================================
 * GEMM/GEMV over pre-quantized activations.
 * ============================================================================================== */
/* Instruction-set levels: 0 AVX2 (vpmaddubsw), 1 AVX-VNNI (vpdpbusd on ymm), 2 AVX-512 VNNI (zmm, GEMM
 * tiles only: M = 1 stays on ymm, memory-bound).  The cap is process-wide CPU configuration (like the
 * cpuid result it limits), set by pa_set_isa_cpu for parity tests; it holds no per-call state. */
static _Atomic int isa_cap = 2;

static int cpu_isa_level(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni"))
        return 2;
#ifndef PA_CPU_NO_VNNI
    if (__builtin_cpu_supports("avxvnni")) return 1;
#endif
    return 0;
}

HIDDEN int isa_level(void) {
    const int hw = cpu_isa_level(), cap = atomic_load_explicit(&isa_cap, memory_order_relaxed);
    return hw < cap ? hw : cap;
}

/* ymm kernels at level >= 1 need AVX-VNNI itself (an AVX-512 VNNI CPU without it uses the EVEX form,
 * which gcc emits for the same intrinsic under avx512vnni+avx512vl) */
static int use_vnni(void) {
#ifdef PA_CPU_NO_VNNI
    return 0;
#else
    return isa_level() >= 1 && __builtin_cpu_supports("avxvnni");
#endif
}

/* gemm_q8_part for m >= PANEL_MIN_M on AVX-512 VNNI: the thread claims 32-row weight panels, packs each
 * (gemm_panel512.h) and runs every activation row against it. */
static __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni"))) void
gemm_panel_part(float *y, const int8_t *xq, const float *xs, const int8_t *w, const float *ws, int64_t m, int64_t n,
                int64_t k, work_counter *next) {
    const int64_t nb = k / QK, num_panels = (n + PANEL_N - 1) / PANEL_N;
    int32_t asum[m * nb];
    uint32_t wp[(k / 4) * PANEL_N];
    float sp[nb * PANEL_N];
    block_sums512(asum, xq, m, k);
    for (;;) {
        const int64_t t = atomic_fetch_add_explicit(next, 1, memory_order_relaxed);
        if (t >= num_panels) break;
        const int64_t n0 = t * PANEL_N, rows = n - n0 < PANEL_N ? n - n0 : PANEL_N;
        pack_panel512(wp, sp, w + n0 * k, ws + n0 * nb, k, rows);
        panel_rows512(y + n0, n, xq, xs, asum, wp, sp, m, k, (int)rows);
    }
}

/* The calling thread's share of y: it claims chunks of NR-row weight tiles from *next until none are
 * left (dynamic: the 2 cores are shared, and a static split waits for the slower thread).  Every
 * thread of a team (nt members) calls this with the same counter, zeroed before.  M = 1 claims
 * 1/nt of the rows at a time, so each thread streams one contiguous range: two 2-core streams read
 * 45 GB/s where one reads 41, and fine-grained interleaved chunks only 29 (batch-1 layers 3.7 ->
 * 2.85 ms a token); a thread that finds the other's chunk unclaimed (its core taken) runs it too. */
HIDDEN void gemm_q8_part(float *y, const int8_t *xq, const float *xs, const int8_t *w, const float *ws,
                         int64_t m, int64_t n, int64_t k, work_counter *next, int nt) {
    const int64_t nb = k / QK;
    if (m >= PANEL_MIN_M && m * nb <= PANEL_MAX_SUMS && isa_level() >= 2) {
        gemm_panel_part(y, xq, xs, w, ws, m, n, k, next);
        return;
    }
    /* up to GEMV_MAX_M rows: GEMV tiles (8 weight streams from DRAM), each row in turn while the
     * 8 weight rows sit in L1; more rows: the register-tiled GEMM */
    const int small = m <= GEMV_MAX_M;
    const int wide = !small && isa_level() >= 2;    /* AVX-512 VNNI GEMM tiles */
    const int nr = small ? GEMV_NR : wide ? GEMM_NR512 : GEMM_NR;   /* weight rows per tile */
    const int mr = small ? 1 : GEMM_MR;             /* activation rows per tile */
    const int64_t num_tiles = (n + nr - 1) / nr;
    const int64_t parts = small ? (nt > 1 ? nt : 1) : 32;
    const int64_t chunk = num_tiles / parts > 1 ? (num_tiles + parts - 1) / parts : 1;
    const int vnni = use_vnni();
    for (;;) {
        const int64_t t0 = atomic_fetch_add_explicit(next, chunk, memory_order_relaxed);
        if (t0 >= num_tiles) break;
        const int64_t t1 = t0 + chunk < num_tiles ? t0 + chunk : num_tiles;
        for (int64_t t = t0; t < t1; t++) {
            const int64_t n0 = t * nr;
            /* the weight rows GEMM_PREFETCH tiles ahead, so their DRAM latency hides behind this
             * tile's compute (without: lm_head at M = 8 took 4.0 ms, with: 1.7 ms) */
            const int64_t ahead = small ? GEMV_AHEAD : GEMM_PREFETCH;
            if ((!small || GEMV_PREFETCH) && t + ahead < num_tiles) {
                const int8_t *p = w + (n0 + ahead * nr) * k;
                for (int64_t off = 0; off < nr * k; off += 64) _mm_prefetch((const char *)(p + off), GEMM_HINT);
                const float *ps = ws + (n0 + ahead * nr) * nb;
                for (int64_t off = 0; off < nr * nb; off += 16) _mm_prefetch((const char *)(ps + off), GEMM_HINT);
            }
            const int nr_t = (int)(n - n0 < nr ? n - n0 : nr);
            for (int64_t m0 = 0; m0 < m; m0 += mr) {
                const int mr_t = (int)(m - m0 < mr ? m - m0 : mr);
                if (wide)
                    tile_dispatch_avx512(y + m0 * n + n0, n, xq + m0 * k, xs + m0 * nb, w + n0 * k, ws + n0 * nb, nb,
                                         mr_t, nr_t);
                else if (vnni)
                    tile_dispatch_vnni(y + m0 * n + n0, n, xq + m0 * k, xs + m0 * nb, w + n0 * k, ws + n0 * nb, nb,
                                       mr_t, nr_t);
                else
                    tile_dispatch_avx2(y + m0 * n + n0, n, xq + m0 * k, xs + m0 * nb, w + n0 * k, ws + n0 * nb, nb,
                                       mr_t, nr_t);
            }
        }
    }
}

HIDDEN void gemm_q8(float *y, const int8_t *xq, const float *xs, const int8_t *w, const float *ws,
                    int64_t m, int64_t n, int64_t k) {
    work_counter next = 0;
    #pragma omp parallel if (m * n * k >= 65536)
    {
        int nt = 1;
#ifdef _OPENMP
        nt = omp_get_num_threads();
#endif
        gemm_q8_part(y, xq, xs, w, ws, m, n, k, &next, nt);
    }
}

/* The same on a worker pool (no OpenMP threads spinning next to the pool's). */
typedef struct { float *y; const int8_t *xq; const float *xs, *ws; const int8_t *w; int64_t m, n, k; work_counter next; } gemm_job;

static void gemm_team(void *arg, int tid, int nt) {
    gemm_job *j = arg;
    gemm_q8_part(j->y, j->xq, j->xs, j->w, j->ws, j->m, j->n, j->k, &j->next, nt);
}

static void gemm_q8_on(pa_pool_cpu *pool, float *y, const int8_t *xq, const float *xs, const int8_t *w,
                       const float *ws, int64_t m, int64_t n, int64_t k) {
    if (pool == NULL) {
        gemm_q8(y, xq, xs, w, ws, m, n, k);
        return;
    }
    gemm_job job = {y, xq, xs, ws, w, m, n, k, 0};
    if (m * n * k < 65536 || pool_take_solo(pool)) {
        gemm_team(&job, 0, 1);
        return;
    }
    const double t0 = now_seconds();
    const double waited = pool_run(pool, gemm_team, &job);
    pool_check_contention(pool, waited, now_seconds() - t0);
}

/* ================================================================================================
 * Exports
 * ============================================================================================== */
int32_t pa_set_isa_cpu(int32_t max_level) {
    atomic_store(&isa_cap, max_level < 0 ? 0 : max_level > 2 ? 2 : max_level);
    return isa_level();
}

pa_status pa_quantize_q8_cpu(int8_t *xq, float *xs, const float *x, int64_t m, int64_t k) {
    CHECK_PTR(xq); CHECK_PTR(xs); CHECK_PTR(x);
    CHECK(m >= 0 && k > 0 && k % QK == 0, "need m >= 0 and k a positive multiple of %d (m=%ld k=%ld)",
          QK, (long)m, (long)k);
    quantize_rows_q8(xq, xs, x, m, k, k);
    return PA_OK;
}

pa_status pa_gemm_q8_cpu(float *y, const int8_t *xq, const float *xs, const int8_t *w, const float *ws,
                         int64_t m, int64_t n, int64_t k) {
    CHECK_PTR(y); CHECK_PTR(xq); CHECK_PTR(xs); CHECK_PTR(w); CHECK_PTR(ws);
    CHECK(m >= 0 && n > 0 && k > 0 && k % QK == 0, "bad sizes m=%ld n=%ld k=%ld (k must be a multiple of %d)",
          (long)m, (long)n, (long)k, QK);
    gemm_q8(y, xq, xs, w, ws, m, n, k);
    return PA_OK;
}

pa_status pa_linear_q8_cpu(pa_pool_cpu *pool, float *y, void *scratch, int64_t scratch_bytes, const float *x,
                           const int8_t *w, const float *ws, int64_t m, int64_t n, int64_t k) {
    CHECK_PTR(y); CHECK_PTR(x); CHECK_PTR(w); CHECK_PTR(ws);
    CHECK(m >= 0 && n > 0 && k > 0 && k % QK == 0, "bad sizes m=%ld n=%ld k=%ld (k must be a multiple of %d)",
          (long)m, (long)n, (long)k, QK);
    /* scratch: xq [m, k] int8 padded to 64 bytes, then xs [m, k / QK] float */
    const int64_t q_bytes = (m * k + 63) & ~(int64_t)63;
    const int64_t need = q_bytes + m * (k / QK) * (int64_t)sizeof(float);
    CHECK(scratch != NULL && scratch_bytes >= need, "scratch of %ld bytes given, %ld needed",
          (long)scratch_bytes, (long)need);
    int8_t *xq = (int8_t *)scratch;
    float *xs = (float *)(xq + q_bytes);
    if (pool != NULL)
        for (int64_t i = 0; i < m; i++) quantize_row_q8(xq + i * k, xs + i * (k / QK), x + i * k, k);
    else
        quantize_rows_q8(xq, xs, x, m, k, k);
    gemm_q8_on(pool, y, xq, xs, w, ws, m, n, k);
    return PA_OK;
}

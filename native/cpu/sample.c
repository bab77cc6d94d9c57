/*
 * sample.c -- pa_sample_rows_cpu: one sampled token a row, the CUDA kernel's algorithm (native/cuda/sample.cu)
 * on one core a row, so a CPU backend's sampled step costs what its argmax does rather than a sort of the
 * vocabulary (engine/sampler.py's torch path: a row sort, scans and ~20 ops a step).
 *
 * x = logit / temperature. Masses are exp(x - max) in 2^-40 units from the same table times degree-6 series
 * (exact integer sums, an element below 2^-41 has none), so totals do not depend on order. Rows that top-k or
 * top-p cut: one pass builds a histogram over 4096 buckets of max - x (1/128 wide; counts and masses), one
 * scan of it finds the bucket where each filter's crossing and the draw lie, and only that bucket is
 * gathered and sorted (descending x, equal x by index) -- a few hundred elements on flat rows. Other rows
 * (temperature and min-p alone) walk their masses in index order. The walk and its cuts are
 * engine/sampler.py's filter_rows / sample_rows; the tokens are the CUDA kernel's (which sorts a bucket of
 * more than 4096 elements by bisection instead: the same order) but for the last bit of a table entry.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

#define NB 4096                       /* buckets of d = max - x: [b / 128, (b + 1) / 128), the last open */
#define PER_UNIT 128.f
#define FIX 1099511627776.0           /* 2^40 units of mass */
#define NO_MASS_D 28.5                /* exp(-28.5) * 2^40 < 0.5: no mass past this d */

typedef unsigned long long u64;

static double etab[NB];               /* exp(-j / 128) */
static pthread_once_t etab_once = PTHREAD_ONCE_INIT;

static void etab_init(void) {
    for (int j = 0; j < NB; j++) etab[j] = exp(-j * (1.0 / 128.0));
}

static inline uint32_t order_key(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline float key_value(uint32_t k) {
    const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

static inline int bucket_of(float m, float x) {
    const float d = m - x;            /* monotone in x; NaN (no maximum) -> the last bucket */
    return d < (float)NB / PER_UNIT ? (int)(d * PER_UNIT) : NB - 1;
}

/* exp(x - m) in 2^-40 units: the table entry times exp(-r) by its series (r = d - j / 128, exact). */
static inline u64 mass_of(float m, float x) {
    const double d = (double)m - (double)x;
    if (!(d <= NO_MASS_D)) return 0;
    const int j = (int)(d * 128.0);
    const double r = d - j * (1.0 / 128.0);
    double p = 1.0 / 720.0;
    p = fma(p, -r, 1.0 / 120.0);
    p = fma(p, -r, 1.0 / 24.0);
    p = fma(p, -r, 1.0 / 6.0);
    p = fma(p, -r, 0.5);
    p = fma(p, -r, 1.0);
    p = fma(p, -r, 1.0);
    return (u64)nearbyint(etab[j] * p * FIX);
}

/* out[i] = mass_of(m, x[i]) for i < n: four at a time in AVX2, the same operations in the same order (the
 * rounding to an integer by adding 2^52: round-half-even, as nearbyint). */
static void row_masses(float m, const float *x, int n, u64 *out) {
    const __m256d md = _mm256_set1_pd((double)m), lim = _mm256_set1_pd(NO_MASS_D), k128 = _mm256_set1_pd(128.0),
                  inv = _mm256_set1_pd(1.0 / 128.0), fix = _mm256_set1_pd(FIX),
                  magic = _mm256_set1_pd(4503599627370496.0);
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const __m256d d = _mm256_sub_pd(md, _mm256_cvtps_pd(_mm_loadu_ps(x + i)));
        const __m256d ok = _mm256_cmp_pd(d, lim, _CMP_LE_OQ);       /* NaN: no */
        const __m256d dc = _mm256_and_pd(d, ok);                     /* lanes without mass: 0 (a valid index) */
        const __m128i j = _mm256_cvttpd_epi32(_mm256_mul_pd(dc, k128));
        const __m256d r = _mm256_fnmadd_pd(_mm256_cvtepi32_pd(j), inv, dc);
        __m256d p = _mm256_set1_pd(1.0 / 720.0);                     /* fma(p, -r, c) = c - p r, one rounding */
        p = _mm256_fnmadd_pd(p, r, _mm256_set1_pd(1.0 / 120.0));
        p = _mm256_fnmadd_pd(p, r, _mm256_set1_pd(1.0 / 24.0));
        p = _mm256_fnmadd_pd(p, r, _mm256_set1_pd(1.0 / 6.0));
        p = _mm256_fnmadd_pd(p, r, _mm256_set1_pd(0.5));
        p = _mm256_fnmadd_pd(p, r, _mm256_set1_pd(1.0));
        p = _mm256_fnmadd_pd(p, r, _mm256_set1_pd(1.0));
        const __m256d v = _mm256_mul_pd(_mm256_mul_pd(_mm256_i32gather_pd(etab, j, 8), p), fix);
        const __m256i q = _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(v, magic)), _mm256_castpd_si256(magic));
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_and_si256(q, _mm256_castpd_si256(ok)));
    }
    for (; i < n; i++) out[i] = mass_of(m, x[i]);
}

static inline u64 draw_target(u64 u24, u64 total) { /* floor(u * total), u = u24 / 2^24 */
    return (u64)(((unsigned __int128)u24 * total) >> 24);
}

/* One row's state: its x values, the histogram's exclusive prefixes, the gathered bucket. */
typedef struct {
    const float *x;
    int vocab;
    float m;
    u64 mass[NB + 1];
    uint32_t count[NB + 1];
    u64 *sorted, *smass;              /* the gathered bucket, descending; its masses' exclusive prefix */
    int gathered, n;                  /* the bucket in sorted[] (-1: none), its elements */
} Row;

typedef struct {
    uint32_t pos;                     /* its position in the row's order */
    u64 mass_incl;                    /* the mass of the prefix through it */
    int index;                        /* its token (-1: none) */
} Hit;

static int desc_u64(const void *a, const void *b) {
    const u64 x = *(const u64 *)a, y = *(const u64 *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

static void gather_sorted(Row *r, int b) {
    int n = 0;
    for (int i = 0; i < r->vocab; i++)
        if (bucket_of(r->m, r->x[i]) == b) r->sorted[n++] = ((u64)order_key(r->x[i]) << 32) | (uint32_t)~(uint32_t)i;
    qsort(r->sorted, (size_t)n, sizeof(u64), desc_u64);
    u64 acc = 0;
    for (int j = 0; j < n; j++) {
        r->smass[j] = acc;
        acc += mass_of(r->m, key_value((uint32_t)(r->sorted[j] >> 32)));
    }
    r->smass[n] = acc;
    r->n = n;
    r->gathered = b;
}

/* The element where the prefix count (by_mass 0) or mass crosses t (< the row's total of it). */
static Hit resolve(Row *r, int by_mass, u64 t) {
    Hit h = {0, 0, -1};
    int lo = 0, hi = NB;              /* the first bucket whose inclusive prefix exceeds t */
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        const u64 incl = by_mass ? r->mass[mid + 1] : r->count[mid + 1];
        if (incl > t) hi = mid; else lo = mid + 1;
    }
    if (lo >= NB) return h;
    const int b = lo;
    const u64 tl = t - (by_mass ? r->mass[b] : r->count[b]);
    if (r->gathered != b) gather_sorted(r, b);
    int j = -1;
    if (!by_mass) {
        j = (int)tl;
    } else {
        int a = 0, z = r->n;          /* the first j whose inclusive prefix exceeds tl */
        while (a < z) {
            const int mid = (a + z) / 2;
            if (r->smass[mid + 1] > tl) z = mid; else a = mid + 1;
        }
        j = a;
    }
    if (j < 0 || j >= r->n) return h;  /* (never: t is inside the bucket) */
    h.pos = r->count[b] + (uint32_t)j;
    h.mass_incl = r->mass[b] + r->smass[j + 1];
    h.index = (int)~(uint32_t)r->sorted[j];
    return h;
}

/* One row -> its token; x, sorted and smass: vocab (+ 1) elements of scratch. */
static int64_t sample_row(const float *logits, int vocab, const double *kn, float *x, u64 *sorted, u64 *smass,
                          Row *r) {
    const float temperature = (float)kn[0];
    uint32_t best_key = order_key(logits[0]);
    int best = 0;
    for (int i = 1; i < vocab; i++) {   /* the first largest logit (torch.argmax's choice; NaN the largest) */
        const uint32_t k = order_key(logits[i]);
        if (k > best_key) {
            best_key = k;
            best = i;
        }
    }
    if (!(temperature > 0.f)) return best;              /* a greedy row: the argmax */
    for (int i = 0; i < vocab; i++) x[i] = temperature == 1.f ? logits[i] : logits[i] / temperature;
    const float m = x[best];
    const int top_k = (int)kn[1];
    const double top_p = kn[2];
    const float log_min_p = (float)kn[3];
    const u64 u24 = (u64)(kn[4] * 16777216.0);
    const int cut_k = top_k > 0 && top_k < vocab, cut_min_p = log_min_p > -INFINITY;
    const float floor_x = m + log_min_p;
    int64_t token = best;                                /* when nothing has mass (no finite maximum) */
    if (!cut_k && !(top_p < 1.0)) {                       /* the whole row (or min-p's part) in index order */
        u64 total = 0;
        row_masses(m, x, vocab, sorted);
        for (int i = 0; i < vocab; i++) {
            if (cut_min_p && !(x[i] >= floor_x)) sorted[i] = 0;
            total += sorted[i];
        }
        if (total) {
            const u64 t = draw_target(u24, total);
            u64 at = 0;
            for (int i = 0; i < vocab; i++) {
                if (at <= t && t < at + sorted[i]) return i;
                at += sorted[i];
            }
        }
        return token;
    }
    r->x = x;
    r->vocab = vocab;
    r->m = m;
    r->sorted = sorted;
    r->smass = smass;
    r->gathered = -1;
    memset(r->mass, 0, sizeof r->mass);
    memset(r->count, 0, sizeof r->count);
    u64 min_count = 0, min_mass = 0;
    row_masses(m, x, vocab, smass);                      /* (smass is free until a bucket is gathered) */
    for (int i = 0; i < vocab; i++) {
        const int b = bucket_of(m, x[i]);
        const u64 e = smass[i];
        r->count[b]++;
        r->mass[b] += e;
        if (cut_min_p && x[i] >= floor_x) {
            min_count++;
            min_mass += e;
        }
    }
    u64 mass_acc = 0;                                    /* exclusive prefixes, [NB] = the totals */
    uint32_t count_acc = 0;
    for (int j = 0; j <= NB; j++) {
        const u64 mj = j < NB ? r->mass[j] : 0;
        const uint32_t cj = j < NB ? r->count[j] : 0;
        r->mass[j] = mass_acc;
        r->count[j] = count_acc;
        mass_acc += mj;
        count_acc += cj;
    }
    u64 kept = (u64)vocab, kept_mass = r->mass[NB];
    if (cut_k) {
        kept = (u64)top_k;
        if ((u64)(top_k - 1) >= r->count[NB - 1])       /* past every element with mass */
            kept_mass = r->mass[NB];
        else
            kept_mass = resolve(r, 0, (u64)(top_k - 1)).mass_incl;
    }
    if (top_p < 1.0 && kept_mass > 0) {
        const double p = ceil(top_p * (double)kept_mass);
        const u64 need = p < 1.0 ? 1ull : (p >= (double)kept_mass ? kept_mass : (u64)p);
        const Hit h = resolve(r, 1, need - 1);           /* its prefix before it < need <= through it */
        if (h.index >= 0 && h.pos + 1 < kept) {
            kept = h.pos + 1;
            kept_mass = h.mass_incl;
        }
    }
    if (cut_min_p && min_count < kept) {
        kept = min_count;
        kept_mass = min_mass;
    }
    if (kept_mass > 0) {
        const Hit h = resolve(r, 1, draw_target(u24, kept_mass));
        if (h.index >= 0) token = h.index;
    }
    return token;
}

/* A thread's scratch for rows of up to cap elements, kept between calls (OpenMP's threads persist). */
typedef struct {
    float *x;
    u64 *sorted, *smass;
    Row *row;
    int cap;
} Scratch;
static _Thread_local Scratch scratch;

static int scratch_fits(int vocab) {
    if (scratch.cap >= vocab) return 1;
    free(scratch.x);
    free(scratch.sorted);
    free(scratch.smass);
    free(scratch.row);
    scratch.x = malloc((size_t)vocab * sizeof(float));
    scratch.sorted = malloc((size_t)vocab * sizeof(u64));
    scratch.smass = malloc(((size_t)vocab + 1) * sizeof(u64));
    scratch.row = malloc(sizeof(Row));
    scratch.cap = scratch.x && scratch.sorted && scratch.smass && scratch.row ? vocab : 0;
    return scratch.cap > 0;
}

/* Rows claimed one at a time by the pool's members (no OpenMP team spinning beside the pool's). */
typedef struct {
    int64_t *out;
    const float *logits;
    const double *knobs;
    int64_t row_stride;
    int32_t num_rows, vocab;
    work_counter next;
    _Atomic int failed;
} sample_job;

static void sample_team(void *arg, int tid, int nt) {
    sample_job *j = arg;
    const int ok = scratch_fits(j->vocab);
    for (int64_t i; (i = atomic_fetch_add(&j->next, 1)) < j->num_rows;) {
        if (!ok) {
            atomic_store(&j->failed, 1);
            continue;
        }
        j->out[i] = sample_row(j->logits + i * j->row_stride, j->vocab, j->knobs + 5 * i, scratch.x, scratch.sorted,
                               scratch.smass, scratch.row);
    }
}

pa_status pa_sample_rows_cpu(pa_pool_cpu *pool, int64_t *out, const float *logits, int64_t row_stride,
                             const double *knobs, int32_t num_rows, int32_t vocab) {
    CHECK(num_rows >= 0 && vocab >= 1 && vocab <= (1 << 23) && row_stride >= vocab,
          "bad arguments (rows %d, vocab %d, row stride %ld)", (int)num_rows, (int)vocab, (long)row_stride);
    if (num_rows == 0) return PA_OK;
    CHECK_PTR(out); CHECK_PTR(logits); CHECK_PTR(knobs);
    pthread_once(&etab_once, etab_init);
    sample_job job = {out, logits, knobs, row_stride, num_rows, vocab, 0, 0};
    if (num_rows == 1 || pool_take_solo(pool)) {
        sample_team(&job, 0, 1);
    } else {
        const double t0 = now_seconds();
        const double waited = pool_run(pool, sample_team, &job);
        pool_check_contention(pool, waited, now_seconds() - t0);
    }
    if (atomic_load(&job.failed))
        return cpu_fail(PA_ERR_OUT_OF_MEMORY, __func__, "no memory for the scratch of a row of %d", (int)vocab);
    return PA_OK;
}

/*
 * pool.c -- the worker team of pa_llama_layers_cpu (and pa_linear_q8_cpu).  OpenMP's fork/join sleeps on a futex when
 * OMP_WAIT_POLICY=PASSIVE (the web server sets it so idle OpenMP threads do not steal its cores),
 * which costs ~50-80 us a layer on these VMs.  These workers spin for a while after each job (the next
 * layer call comes ~20 us later) and only then sleep, so an idle server still costs no CPU.
 * The calling thread is member 0 of the team.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include "cpu_common.h"

#define MAX_WORKERS 64
#define SPIN_BEFORE_SLEEP (1 << 16)          /* pause iterations (~1-2 ms) before a worker sleeps */

struct pa_pool_cpu {
    int num_threads;                           /* team size, the caller included */
    pthread_t threads[MAX_WORKERS];
    _Atomic uint32_t generation;               /* bumped for every job; the futex word */
    _Atomic int done;                          /* workers finished with the current job */
    _Atomic int sleepers;
    _Atomic int stop;
    _Atomic int solo_left;                     /* calls to run on the caller alone (cores contended) */
    _Atomic int64_t solo_total, stalls;        /* counters for benchmarks */
    int last_cold;                             /* the last job found a worker asleep (caller's thread only) */
    void (*fn)(void *arg, int tid, int nt);
    void *arg;
};

typedef struct { pa_pool_cpu *pool; int tid; } worker_arg;

static void *worker_main(void *p) {
    worker_arg wa = *(worker_arg *)p;
    free(p);
    pa_pool_cpu *pool = wa.pool;
    uint32_t seen = 0;
    for (;;) {
        /* step 1: wait for a new generation: spin, then sleep on the futex */
        uint32_t gen;
        long spins = 0;
        while ((gen = atomic_load_explicit(&pool->generation, memory_order_acquire)) == seen) {
            if (++spins < SPIN_BEFORE_SLEEP) {
                _mm_pause();
                continue;
            }
            atomic_fetch_add(&pool->sleepers, 1);
            if (atomic_load_explicit(&pool->generation, memory_order_acquire) == seen)
                futex_wait(&pool->generation, seen);
            atomic_fetch_sub(&pool->sleepers, 1);
            spins = 0;
        }
        seen = gen;
        if (atomic_load(&pool->stop)) return NULL;
        /* step 2: run our share of the job */
        pool->fn(pool->arg, wa.tid, pool->num_threads);
        atomic_fetch_add_explicit(&pool->done, 1, memory_order_release);
    }
}

HIDDEN int pool_size(const pa_pool_cpu *pool) { return pool ? pool->num_threads : 1; }

/* Contention: when the team spent over half a call waiting for members that were not running (their
 * cores went to other processes), the next SOLO_CALLS calls run on the calling thread alone, then the
 * team is tried again. Alone is about half the speed of two free cores; a team on contended cores was
 * measured 5x slower at batch 8. A short stall in a long call (prefill) keeps the team. */
#define SOLO_CALLS 30

HIDDEN int pool_take_solo(pa_pool_cpu *pool) {
    if (pool == NULL || pool->num_threads == 1) return 1;
    int left = atomic_load_explicit(&pool->solo_left, memory_order_relaxed);
    if (left <= 0) return 0;
    atomic_store_explicit(&pool->solo_left, left - 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool->solo_total, 1, memory_order_relaxed);
    return 1;
}

HIDDEN void pool_check_contention(pa_pool_cpu *pool, double waited, double elapsed) {
    /* A job that found a worker asleep (idle > ~1 ms before it) waited for its futex wake-up, not for a
     * contended core: not counted. Counting it made a feedback loop: a stall -> 30 solo calls -> the
     * idle worker sleeps -> the next team call waits for its wake-up -> a stall (measured: 390 of the
     * ~1,100 layer calls of a benchmark round solo, batch 8 decode 480 instead of 670 tok/s). */
    if (pool == NULL || pool->last_cold || waited <= 0.5 * elapsed) return;
    atomic_store_explicit(&pool->solo_left, SOLO_CALLS, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool->stalls, 1, memory_order_relaxed);
}

pa_status pa_pool_stats_cpu(int64_t *stalls, int64_t *solo_calls, const pa_pool_cpu *pool) {
    CHECK_PTR(stalls); CHECK_PTR(solo_calls); CHECK_PTR(pool);
    *stalls = atomic_load(&pool->stalls);
    *solo_calls = atomic_load(&pool->solo_total);
    return PA_OK;
}

HIDDEN double pool_run(pa_pool_cpu *pool, void (*fn)(void *, int, int), void *arg) {
    if (pool == NULL || pool->num_threads == 1) {
        fn(arg, 0, 1);
        return 0.0;
    }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store_explicit(&pool->done, 0, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pool->last_cold = atomic_load(&pool->sleepers) > 0;
    if (pool->last_cold) futex_wake_all(&pool->generation);
    fn(arg, 0, pool->num_threads);
    /* the job ends when every worker has finished its share (a worker still running means it lost its
     * core for a while: yield ours) */
    double yielding_since = 0.0;
    for (long spins = 0; atomic_load_explicit(&pool->done, memory_order_acquire) < pool->num_threads - 1; spins++) {
        if (spins < 2048) {
            _mm_pause();
            continue;
        }
        if (yielding_since == 0.0) yielding_since = now_seconds();
        sched_yield();
    }
    return yielding_since != 0.0 ? now_seconds() - yielding_since : 0.0;   /* waited for a late worker */
}

pa_status pa_pool_create_cpu(pa_pool_cpu **out, int32_t num_threads) {
    CHECK_PTR(out);
    CHECK(num_threads >= 1 && num_threads <= MAX_WORKERS + 1, "num_threads=%d outside [1, %d]", num_threads,
          MAX_WORKERS + 1);
    pa_pool_cpu *pool = calloc(1, sizeof *pool);
    if (pool == NULL) return cpu_fail(PA_ERR_OUT_OF_MEMORY, __func__, "out of memory");
    pool->num_threads = num_threads;
    for (int t = 1; t < num_threads; t++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (wa == NULL) { pool->num_threads = t; pa_pool_destroy_cpu(pool); return cpu_fail(PA_ERR_OUT_OF_MEMORY, __func__, "out of memory"); }
        wa->pool = pool;
        wa->tid = t;
        if (pthread_create(&pool->threads[t - 1], NULL, worker_main, wa) != 0) {
            free(wa);
            pool->num_threads = t;
            pa_pool_destroy_cpu(pool);
            return cpu_fail(PA_ERR_OUT_OF_MEMORY, __func__, "pthread_create failed for worker %d", t);
        }
    }
    *out = pool;
    return PA_OK;
}

pa_status pa_pool_destroy_cpu(pa_pool_cpu *pool) {
    if (pool == NULL) return PA_OK;
    atomic_store(&pool->stop, 1);
    atomic_fetch_add(&pool->generation, 1);
    futex_wake_all(&pool->generation);
    for (int t = 1; t < pool->num_threads; t++) pthread_join(pool->threads[t - 1], NULL);
    free(pool);
    return PA_OK;
}

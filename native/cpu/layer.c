/*
 * layer.c -- one native call per decoder layer (Python overhead between ~10 small ops per layer
 * costs more than the ops themselves at batch 1), and the int8 embedding lookup.
 * The layer is exactly model.py's LlamaModel.layer composed from this library's kernels.
 */
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "cpu_common.h"

static int64_t round64(int64_t n) { return (n + 63) & ~(int64_t)63; }

/* Scratch carve-up, in this order: xq int8 [T, kmax], xs [T, kmax/32], x [T, H], qkv [T, q+2kv],
 * attn [T, q], gate_up [T, 2I], act [T, I]; each piece 64-byte aligned. */
typedef struct { int8_t *xq; float *xs, *x, *qkv, *attn, *gate_up, *act; int64_t bytes; } layer_scratch;

static layer_scratch carve(char *base, const pa_layer_dims_cpu *d, int64_t t) {
    const int64_t q_size = d->num_heads * d->head_dim, kv_size = d->num_kv_heads * d->head_dim;
    int64_t kmax = d->hidden > d->intermediate ? d->hidden : d->intermediate;
    kmax = kmax > q_size ? kmax : q_size;
    layer_scratch s;
    int64_t off = 0;
#define TAKE(field, type, count) s.field = (type *)(base ? base + off : NULL); off += round64((count) * (int64_t)sizeof(type))
    TAKE(xq, int8_t, t * kmax);
    TAKE(xs, float, t * (kmax / QK));
    TAKE(x, float, t * d->hidden);
    TAKE(qkv, float, t * (q_size + 2 * kv_size));
    TAKE(attn, float, t * q_size);
    TAKE(gate_up, float, t * 2 * d->intermediate);
    TAKE(act, float, t * d->intermediate);
#undef TAKE
    s.bytes = off;
    return s;
}

int64_t pa_llama_layer_scratch_bytes_cpu(const pa_layer_dims_cpu *dims, int64_t num_tokens) {
    if (dims == NULL || num_tokens < 0) return -1;
    return carve(NULL, dims, num_tokens).bytes;
}

/* ================================================================================================
 * The barrier between the layer's ~9 dependent phases: it spins ~50 us (OpenMP's barriers sleep at
 * once under OMP_WAIT_POLICY=PASSIVE, which the web server sets, ~10-50 us a phase), then sleeps on a
 * futex, so a thread whose partner lost its core to another process gives its own core up too.
 * ============================================================================================== */
typedef struct { _Atomic int count; _Atomic uint32_t phase; _Atomic int sleepers; _Atomic int64_t slept_ns; int n; }
    spin_barrier;

#define BARRIER_SPIN 2048        /* pause iterations (~50 us) before a waiter sleeps on the futex */

static void barrier_wait(spin_barrier *b) {
    const uint32_t phase = atomic_load(&b->phase);
    if (atomic_fetch_add(&b->count, 1) == b->n - 1) {
        atomic_store(&b->count, 0);
        atomic_store(&b->phase, phase + 1);
        if (atomic_load(&b->sleepers) > 0) futex_wake_all(&b->phase);
        return;
    }
    /* spin while the others are a few us away; sleep when they are not running (shared cores) */
    double slept_at = 0.0;
    for (long spins = 0; atomic_load(&b->phase) == phase; spins++) {
        if (spins < BARRIER_SPIN) {
            _mm_pause();
            continue;
        }
        if (slept_at == 0.0) slept_at = now_seconds();
        atomic_fetch_add(&b->sleepers, 1);
        futex_wait(&b->phase, phase);                  /* returns at once if the phase moved on */
        atomic_fetch_sub(&b->sleepers, 1);
    }
    if (slept_at != 0.0)                               /* time lost to a partner that was not running */
        atomic_fetch_add(&b->slept_ns, (int64_t)((now_seconds() - slept_at) * 1e9));
}

/* Columns [c0, c1) of row t for thread tid of nt, in whole QK blocks: rows are dealt round-robin when
 * there are enough of them, else every row is split by columns. Returns 0 when the thread has no share. */
static int share(int64_t t, int64_t rows, int64_t cols, int tid, int nt, int64_t *c0, int64_t *c1) {
    if (rows >= nt) {
        *c0 = 0;
        *c1 = cols;
        return t % nt == tid;
    }
    const int64_t blocks = cols / QK;
    *c0 = blocks * tid / nt * QK;
    *c1 = blocks * (tid + 1) / nt * QK;
    return *c1 > *c0;
}

/* Everything one layer call needs, shared by its team. */
typedef struct {
    float *hidden_io, *residual; int first; layer_scratch s;
    int8_t *key_cache; float *k_scales; int8_t *value_cache; float *v_scales;
    const pa_layer_weights_cpu *w; const pa_layer_dims_cpu *d; const float *cos_t, *sin_t;
    const int32_t *slot_mapping, *block_tables, *context_lens, *query_start_loc;
    int64_t num_tokens, num_seqs, max_blocks_per_seq;
    work_counter next[5];                              /* one per dynamically shared phase */
    spin_barrier bar;
} layer_ctx;

/* Member tid of nt: the layer in commented steps, phases separated by the spinning barrier. */
static void layer_team(void *arg, int tid, int nt) {
    layer_ctx *c = arg;
    const pa_layer_dims_cpu *d = c->d;
    const pa_layer_weights_cpu *w = c->w;
    const layer_scratch s = c->s;
    float *hidden_io = c->hidden_io, *residual = c->residual;
    const int first = c->first;
    const float *cos_t = c->cos_t, *sin_t = c->sin_t;
    const int64_t T = c->num_tokens, H = d->hidden, I = d->intermediate, hd = d->head_dim;
    const int64_t q_size = d->num_heads * hd, kv_size = d->num_kv_heads * hd, qkv_n = q_size + 2 * kv_size;
    const int64_t nkv = d->num_kv_heads;
    work_counter *next = c->next;
    spin_barrier *bar = &c->bar;
    /* step 1: residual (+)= h; x = rms_norm(residual) * input_norm, quantized (rows dealt out) */
    for (int64_t t = tid; t < T; t += nt) {
        float *res = residual + t * H, *h = hidden_io + t * H;
        if (first) memcpy(res, h, (size_t)H * sizeof(float));
        rms_norm_row(s.x + t * H, first ? NULL : res, first ? res : h, w->input_norm, H, d->eps);
        quantize_row_q8(s.xq + t * H, s.xs + t * (H / QK), s.x + t * H, H);
    }
    barrier_wait(bar);
    /* step 2: qkv = x @ Wqkv.T */
    gemm_q8_part(s.qkv, s.xq, s.xs, w->qkv, w->qkv_scales, T, qkv_n, H, &next[0], nt);
    barrier_wait(bar);
    /* step 3: RoPE on q (rows dealt out); each (kv head, K|V) stream: RoPE on its k, then the int8 write */
    for (int64_t t = tid; t < T; t += nt)
        rope_heads(s.qkv + t * qkv_n, d->num_heads, hd, cos_t + t * (hd / 2), sin_t + t * (hd / 2));
    for (int64_t hv = tid; hv < 2 * nkv; hv += nt)
        if ((hv & 1) == 0)
            for (int64_t t = 0; t < T; t++)
                rope_heads(s.qkv + t * qkv_n + q_size + (hv >> 1) * hd, 1, hd, cos_t + t * (hd / 2),
                           sin_t + t * (hd / 2));
    write_kv_q8_part(c->key_cache, c->k_scales, c->value_cache, c->v_scales, s.qkv + q_size, s.qkv + q_size + kv_size,
                     c->slot_mapping, T, nkv, hd, d->block_size, qkv_n, qkv_n, tid, nt);
    barrier_wait(bar);
    /* step 4: attention over the pool */
    paged_attention_q8_part(s.attn, s.qkv, c->key_cache, c->k_scales, c->value_cache, c->v_scales, c->block_tables,
                            c->context_lens, c->query_start_loc, c->num_seqs, d->num_heads, nkv, hd, d->block_size,
                            c->max_blocks_per_seq, qkv_n, d->attn_scale, &next[1]);
    barrier_wait(bar);
    for (int64_t t = tid; t < T; t += nt)
        quantize_row_q8(s.xq + t * q_size, s.xs + t * (q_size / QK), s.attn + t * q_size, q_size);
    barrier_wait(bar);
    /* step 5: h = attn @ Wo.T; residual += h; x = rms_norm(residual) * post_norm, quantized */
    gemm_q8_part(hidden_io, s.xq, s.xs, w->o, w->o_scales, T, H, q_size, &next[2], nt);
    barrier_wait(bar);
    for (int64_t t = tid; t < T; t += nt) {
        rms_norm_row(s.x + t * H, residual + t * H, hidden_io + t * H, w->post_norm, H, d->eps);
        quantize_row_q8(s.xq + t * H, s.xs + t * (H / QK), s.x + t * H, H);
    }
    barrier_wait(bar);
    /* step 6: MLP: act = silu(x @ Wg.T) * (x @ Wu.T), quantized in place of x; h = act @ Wd.T */
    gemm_q8_part(s.gate_up, s.xq, s.xs, w->gate_up, w->gate_up_scales, T, 2 * I, H, &next[3], nt);
    barrier_wait(bar);
    for (int64_t t = 0; t < T; t++) {
        int64_t c0, c1;
        if (!share(t, T, I, tid, nt, &c0, &c1)) continue;
        const float *g = s.gate_up + t * 2 * I;
        silu_mul_span(s.act + t * I, g, g + I, c0, c1);
        quantize_row_q8(s.xq + t * I + c0, s.xs + t * (I / QK) + c0 / QK, s.act + t * I + c0, c1 - c0);
    }
    barrier_wait(bar);
    gemm_q8_part(hidden_io, s.xq, s.xs, w->down, w->down_scales, T, H, I, &next[4], nt);
}

/* The checks every layer call of a step shares: dimensions, scratch, the batch's index arrays. */
static pa_status check_layer_call(const char *kernel, const pa_layer_dims_cpu *d, int64_t scratch_bytes,
                                  const int32_t *slot_mapping, const int32_t *block_tables,
                                  const int32_t *context_lens, const int32_t *query_start_loc, int64_t num_tokens,
                                  int64_t num_seqs, int64_t max_blocks_per_seq) {
#define LCHECK(cond, ...) do { if (!(cond)) return cpu_fail(PA_ERR_INVALID_ARG, kernel, __VA_ARGS__); } while (0)
    LCHECK(num_tokens > 0 && num_seqs > 0 && max_blocks_per_seq > 0 && d->num_blocks > 0, "bad batch sizes");
    LCHECK(d->hidden % QK == 0 && d->intermediate % QK == 0 && (d->num_heads * d->head_dim) % QK == 0,
           "hidden=%ld, intermediate=%ld and num_heads*head_dim must be multiples of %d", (long)d->hidden,
           (long)d->intermediate, QK);
    LCHECK(d->num_kv_heads > 0 && d->num_heads % d->num_kv_heads == 0 && d->num_heads / d->num_kv_heads <= 32,
           "num_heads=%ld / num_kv_heads=%ld", (long)d->num_heads, (long)d->num_kv_heads);
    LCHECK(d->head_dim % 8 == 0 && d->head_dim <= MAX_HEAD_DIM && d->block_size > 0 && d->block_size <= 64,
           "head_dim=%ld (multiple of 8, <= %d), block_size=%ld (<= 64)", (long)d->head_dim, MAX_HEAD_DIM,
           (long)d->block_size);
    LCHECK(d->eps > 0.0f, "eps must be positive");
    const int64_t need = carve(NULL, d, num_tokens).bytes;
    LCHECK(scratch_bytes >= need, "scratch of %ld bytes given, %ld needed", (long)scratch_bytes, (long)need);
    for (int64_t t = 0; t < num_tokens; t++)
        LCHECK(slot_mapping[t] >= -1 && slot_mapping[t] < d->num_blocks * d->block_size,
               "slot_mapping[%ld] = %d out of range", (long)t, slot_mapping[t]);
#undef LCHECK
    return check_attention_batch(kernel, block_tables, context_lens, query_start_loc, num_seqs, num_tokens,
                                 d->block_size, max_blocks_per_seq, d->num_blocks);
}

static int layer_weights_complete(const pa_layer_weights_cpu *w) {
    return w->input_norm && w->post_norm && w->qkv && w->qkv_scales && w->o && w->o_scales && w->gate_up &&
           w->gate_up_scales && w->down && w->down_scales;
}

/* One layer on the team (or the caller alone), arguments checked. */
static void run_layer(pa_pool_cpu *pool, layer_ctx *ctx) {
    /* One token too runs on the team: each thread streams its half of every matrix (gemm_q8_part), two
     * streams read ~10% more than one, and the barriers cost ~2 us a layer with both threads awake.
     * When the cores are shared, pool_take_solo runs the next calls on the caller alone. */
    if (pool != NULL && pool_take_solo(pool)) {
        layer_team(ctx, 0, 1);
        return;
    }
    if (pool != NULL) {
        ctx->bar.n = pool_size(pool);
        const double t0 = now_seconds();
        const double waited = pool_run(pool, layer_team, ctx) + 1e-9 * (double)atomic_load(&ctx->bar.slept_ns);
        pool_check_contention(pool, waited, now_seconds() - t0);
        return;
    }
    #pragma omp parallel
    {
        int tid = 0, nt = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        #pragma omp single
        ctx->bar.n = nt;                               /* the implied barrier publishes it */
        layer_team(ctx, tid, nt);
    }
}

pa_status pa_llama_layers_cpu(pa_pool_cpu *pool, float *hidden_io, float *residual, void *scratch,
                              int64_t scratch_bytes, int64_t num_layers, int8_t *const *key_caches,
                              float *const *k_scales, int8_t *const *value_caches, float *const *v_scales,
                              const pa_layer_weights_cpu *w, const pa_layer_dims_cpu *d, const float *cos_t,
                              const float *sin_t, const int32_t *slot_mapping, const int32_t *block_tables,
                              const int32_t *context_lens, const int32_t *query_start_loc, int64_t num_tokens,
                              int64_t num_seqs, int64_t max_blocks_per_seq) {
    CHECK_PTR(hidden_io); CHECK_PTR(residual); CHECK_PTR(scratch); CHECK_PTR(w); CHECK_PTR(d);
    CHECK_PTR(key_caches); CHECK_PTR(k_scales); CHECK_PTR(value_caches); CHECK_PTR(v_scales);
    CHECK_PTR(cos_t); CHECK_PTR(sin_t); CHECK_PTR(slot_mapping); CHECK_PTR(block_tables);
    CHECK_PTR(context_lens); CHECK_PTR(query_start_loc);
    CHECK(num_layers > 0, "num_layers=%ld must be positive", (long)num_layers);
    for (int64_t i = 0; i < num_layers; i++) {
        CHECK(layer_weights_complete(&w[i]), "layer %ld: a weight pointer is NULL", (long)i);
        CHECK(key_caches[i] && k_scales[i] && value_caches[i] && v_scales[i], "layer %ld: a KV pointer is NULL",
              (long)i);
    }
    pa_status st = check_layer_call(__func__, d, scratch_bytes, slot_mapping, block_tables, context_lens,
                                    query_start_loc, num_tokens, num_seqs, max_blocks_per_seq);
    if (st != PA_OK) return st;
    const layer_scratch s = carve((char *)scratch, d, num_tokens);
    for (int64_t i = 0; i < num_layers; i++) {
        layer_ctx ctx = {hidden_io, residual, i == 0, s, key_caches[i], k_scales[i], value_caches[i], v_scales[i],
                         &w[i], d, cos_t, sin_t, slot_mapping, block_tables, context_lens, query_start_loc,
                         num_tokens, num_seqs, max_blocks_per_seq, {0, 0, 0, 0, 0}, {0, 0, 0, 0, 1}};
        run_layer(pool, &ctx);
    }
    return PA_OK;
}

/* ================================================================================================
 * Embedding from int8 rows: out [T, hidden] <- q[ids] * scales[ids] (per group of 32).
 * ============================================================================================== */
pa_status pa_embed_q8_cpu(float *out, const int64_t *ids, const int8_t *q, const float *scales, int64_t num_tokens,
                          int64_t vocab, int64_t hidden) {
    CHECK_PTR(out); CHECK_PTR(ids); CHECK_PTR(q); CHECK_PTR(scales);
    CHECK(num_tokens >= 0 && vocab > 0 && hidden > 0 && hidden % QK == 0, "bad sizes");
    for (int64_t t = 0; t < num_tokens; t++)
        CHECK(ids[t] >= 0 && ids[t] < vocab, "ids[%ld] = %ld outside [0, %ld)", (long)t, (long)ids[t], (long)vocab);
    for (int64_t t = 0; t < num_tokens; t++) {
        const int8_t *row = q + ids[t] * hidden;
        const float *sc = scales + ids[t] * (hidden / QK);
        for (int64_t i = 0; i < hidden; i += 8)
            _mm256_storeu_ps(out + t * hidden + i, _mm256_mul_ps(load8_i8_ps(row + i), _mm256_set1_ps(sc[i / QK])));
    }
    return PA_OK;
}

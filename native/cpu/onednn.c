/*
 * onednn.c -- the second INT8 matmul path, through oneDNN's matmul primitive (for comparison and for
 * shapes where it measures faster).  oneDNN is dlopen'ed at run time from a path the caller gives, so
 * the library neither needs it to load nor depends on which oneDNN build is installed.
 *
 * Numerics differ from gemm.c: oneDNN (3.2 .. 3.13 on x64) runs s8 x s8 matmul with one src scale per
 * tensor and one weight scale per output channel, so this path quantizes each activation row with one
 * scale (not per 32-block) and needs per-channel weights: w_pc [N, K] int8, w_pc_scales [N].
 * y[m, n] = xs[m] * w_pc_scales[n] * sum_k xq[m, k] * w_pc[n, k].
 *
 * A handle owns the engine, the stream and a cache of primitives per (m, n, k).
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cpu_common.h"

#ifdef PA_HAVE_ONEDNN
#include <oneapi/dnnl/dnnl.h>

#define CACHE_SLOTS 64

typedef struct {
    int64_t m, n, k;
    dnnl_primitive_t prim;
    dnnl_memory_t src, wei, dst, wscale;
} cache_entry;

/* The oneDNN entry points we use, resolved by dlsym. */
#define DNNL_FUNCS(X)                                                                               \
    X(dnnl_engine_create) X(dnnl_engine_destroy) X(dnnl_stream_create) X(dnnl_stream_destroy)       \
    X(dnnl_stream_wait) X(dnnl_memory_desc_create_with_tag) X(dnnl_memory_desc_destroy)              \
    X(dnnl_primitive_attr_create) X(dnnl_primitive_attr_destroy) X(dnnl_primitive_attr_set_scales_mask) \
    X(dnnl_matmul_primitive_desc_create) X(dnnl_primitive_desc_query) X(dnnl_primitive_desc_destroy) \
    X(dnnl_primitive_create) X(dnnl_primitive_destroy) X(dnnl_primitive_execute) X(dnnl_memory_create) \
    X(dnnl_memory_set_data_handle) X(dnnl_memory_destroy) X(dnnl_set_verbose)

struct pa_onednn_cpu {
    void *dl;
#define X(f) __typeof__(&f) f;
    DNNL_FUNCS(X)
#undef X
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    cache_entry cache[CACHE_SLOTS];
    int next_slot;
    char impl[128];
};

static void destroy_entry(pa_onednn_cpu *h, cache_entry *e) {
    if (e->prim) h->dnnl_primitive_destroy(e->prim);
    if (e->src) h->dnnl_memory_destroy(e->src);
    if (e->wei) h->dnnl_memory_destroy(e->wei);
    if (e->dst) h->dnnl_memory_destroy(e->dst);
    if (e->wscale) h->dnnl_memory_destroy(e->wscale);
    memset(e, 0, sizeof *e);
}

pa_status pa_onednn_close_cpu(pa_onednn_cpu *h) {
    if (h == NULL) return PA_OK;
    for (int i = 0; i < CACHE_SLOTS; i++) destroy_entry(h, &h->cache[i]);
    if (h->stream) h->dnnl_stream_destroy(h->stream);
    if (h->engine) h->dnnl_engine_destroy(h->engine);
    if (h->dl) dlclose(h->dl);
    free(h);
    return PA_OK;
}

pa_status pa_onednn_open_cpu(pa_onednn_cpu **out, const char *lib_path) {
    CHECK_PTR(out); CHECK_PTR(lib_path);
    *out = NULL;
    pa_onednn_cpu *h = calloc(1, sizeof *h);
    if (h == NULL) return cpu_fail(PA_ERR_OUT_OF_MEMORY, __func__, "out of memory");
    h->dl = dlopen(lib_path, RTLD_NOW | RTLD_LOCAL);
    if (h->dl == NULL) {
        pa_status st = cpu_fail(PA_ERR_UNSUPPORTED, __func__, "cannot dlopen %s: %s", lib_path, dlerror());
        free(h);
        return st;
    }
#define X(f)                                                                                        \
    h->f = (__typeof__(&f))dlsym(h->dl, #f);                                                        \
    if (h->f == NULL) {                                                                             \
        pa_onednn_close_cpu(h);                                                                     \
        return cpu_fail(PA_ERR_UNSUPPORTED, __func__, "%s lacks %s", lib_path, #f);                \
    }
    DNNL_FUNCS(X)
#undef X
    h->dnnl_set_verbose(0);                            /* oneDNN prints errors by default: not here */
    if (h->dnnl_engine_create(&h->engine, dnnl_cpu, 0) != dnnl_success ||
        h->dnnl_stream_create(&h->stream, h->engine, dnnl_stream_default_flags) != dnnl_success) {
        pa_onednn_close_cpu(h);
        return cpu_fail(PA_ERR_UNSUPPORTED, __func__, "%s: no usable CPU engine (a SYCL-runtime build?)", lib_path);
    }
    *out = h;
    return PA_OK;
}

/* The cached matmul for (m, n, k), created on first use. */
static pa_status get_entry(pa_onednn_cpu *h, int64_t m, int64_t n, int64_t k, cache_entry **out) {
    for (int i = 0; i < CACHE_SLOTS; i++) {
        cache_entry *e = &h->cache[i];
        if (e->prim && e->m == m && e->n == n && e->k == k) { *out = e; return PA_OK; }
    }
    cache_entry *e = &h->cache[h->next_slot];
    h->next_slot = (h->next_slot + 1) % CACHE_SLOTS;
    destroy_entry(h, e);
    /* src [m, k] s8 row-major, weights [k, n] s8 viewed from our [n, k] (tag ba), dst [m, n] f32 */
    dnnl_memory_desc_t src_md = NULL, wei_md = NULL, dst_md = NULL, sc_md = NULL;
    dnnl_dims_t sd = {m, k}, wd = {k, n}, dd = {m, n}, scd = {n};
    dnnl_primitive_attr_t attr = NULL;
    dnnl_primitive_desc_t pd = NULL;
    pa_status st = PA_OK;
    if (h->dnnl_memory_desc_create_with_tag(&src_md, 2, sd, dnnl_s8, dnnl_ab) != dnnl_success ||
        h->dnnl_memory_desc_create_with_tag(&wei_md, 2, wd, dnnl_s8, dnnl_ba) != dnnl_success ||
        h->dnnl_memory_desc_create_with_tag(&dst_md, 2, dd, dnnl_f32, dnnl_ab) != dnnl_success ||
        h->dnnl_memory_desc_create_with_tag(&sc_md, 1, scd, dnnl_f32, dnnl_a) != dnnl_success ||
        h->dnnl_primitive_attr_create(&attr) != dnnl_success ||
        h->dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_WEIGHTS, 1 << 1) != dnnl_success) {
        st = cpu_fail(PA_ERR_UNSUPPORTED, "pa_linear_onednn_cpu", "oneDNN descriptor set-up failed");
        goto done;
    }
    if (h->dnnl_matmul_primitive_desc_create(&pd, h->engine, src_md, wei_md, NULL, dst_md, attr) != dnnl_success ||
        h->dnnl_primitive_create(&e->prim, pd) != dnnl_success) {
        st = cpu_fail(PA_ERR_UNSUPPORTED, "pa_linear_onednn_cpu", "oneDNN has no s8 matmul for m=%ld n=%ld k=%ld",
                      (long)m, (long)n, (long)k);
        e->prim = NULL;
        goto done;
    }
    const char *impl = NULL;
    if (h->dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) == dnnl_success && impl)
        snprintf(h->impl, sizeof h->impl, "%s", impl);
    if (h->dnnl_memory_create(&e->src, src_md, h->engine, DNNL_MEMORY_NONE) != dnnl_success ||
        h->dnnl_memory_create(&e->wei, wei_md, h->engine, DNNL_MEMORY_NONE) != dnnl_success ||
        h->dnnl_memory_create(&e->dst, dst_md, h->engine, DNNL_MEMORY_NONE) != dnnl_success ||
        h->dnnl_memory_create(&e->wscale, sc_md, h->engine, DNNL_MEMORY_NONE) != dnnl_success) {
        destroy_entry(h, e);
        st = cpu_fail(PA_ERR_OUT_OF_MEMORY, "pa_linear_onednn_cpu", "oneDNN memory objects");
        goto done;
    }
    e->m = m; e->n = n; e->k = k;
    *out = e;
done:
    if (pd) h->dnnl_primitive_desc_destroy(pd);
    if (attr) h->dnnl_primitive_attr_destroy(attr);
    if (src_md) h->dnnl_memory_desc_destroy(src_md);
    if (wei_md) h->dnnl_memory_desc_destroy(wei_md);
    if (dst_md) h->dnnl_memory_desc_destroy(dst_md);
    if (sc_md) h->dnnl_memory_desc_destroy(sc_md);
    return st;
}

/* x [m, k] -> one scale a row (absmax / 127), int8 */
static void quantize_rows_per_row(int8_t *xq, float *xs, const float *x, int64_t m, int64_t k) {
    #pragma omp parallel for schedule(static) if (m * k >= 16384)
    for (int64_t i = 0; i < m; i++) {
        float amax = 0.0f;
        for (int64_t j = 0; j < k; j++) amax = fmaxf(amax, fabsf(x[i * k + j]));
        xs[i] = amax / 127.0f;
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int64_t j = 0; j < k; j++) xq[i * k + j] = (int8_t)nearbyintf(x[i * k + j] * inv);
    }
}

pa_status pa_linear_onednn_cpu(float *y, pa_onednn_cpu *h, void *scratch, int64_t scratch_bytes, const float *x,
                               const int8_t *w_pc, const float *w_pc_scales, int64_t m, int64_t n, int64_t k) {
    CHECK_PTR(y); CHECK_PTR(h); CHECK_PTR(x); CHECK_PTR(w_pc); CHECK_PTR(w_pc_scales);
    CHECK(m > 0 && n > 0 && k > 0, "bad sizes m=%ld n=%ld k=%ld", (long)m, (long)n, (long)k);
    const int64_t q_bytes = (m * k + 63) & ~(int64_t)63;
    CHECK(scratch != NULL && scratch_bytes >= q_bytes + m * 4, "scratch of %ld bytes given, %ld needed",
          (long)scratch_bytes, (long)(q_bytes + m * 4));
    int8_t *xq = (int8_t *)scratch;
    float *xs = (float *)(xq + q_bytes);
    cache_entry *e = NULL;
    pa_status st = get_entry(h, m, n, k, &e);
    if (st != PA_OK) return st;
    /* step 1: per-row activation quantization; step 2: the matmul with per-channel weight scales */
    quantize_rows_per_row(xq, xs, x, m, k);
    h->dnnl_memory_set_data_handle(e->src, xq);
    h->dnnl_memory_set_data_handle(e->wei, (void *)w_pc);
    h->dnnl_memory_set_data_handle(e->dst, y);
    h->dnnl_memory_set_data_handle(e->wscale, (void *)w_pc_scales);
    dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, e->src}, {DNNL_ARG_WEIGHTS, e->wei}, {DNNL_ARG_DST, e->dst},
                               {DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, e->wscale}};
    if (h->dnnl_primitive_execute(e->prim, h->stream, 4, args) != dnnl_success ||
        h->dnnl_stream_wait(h->stream) != dnnl_success)
        return cpu_fail(PA_ERR_UNSUPPORTED, __func__, "oneDNN matmul failed");
    /* step 3: the activation row scales */
    #pragma omp parallel for schedule(static) if (m * n >= 16384)
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) y[i * n + j] *= xs[i];
    return PA_OK;
}

pa_status pa_onednn_impl_cpu(char *out, int64_t out_len, pa_onednn_cpu *h) {
    CHECK_PTR(out); CHECK_PTR(h);
    CHECK(out_len > 0, "out_len must be positive");
    snprintf(out, (size_t)out_len, "%s", h->impl);
    return PA_OK;
}

#else /* !PA_HAVE_ONEDNN: the exports exist and say why they cannot run */
struct pa_onednn_cpu { int unused; };
pa_status pa_onednn_open_cpu(pa_onednn_cpu **out, const char *lib_path) {
    return cpu_fail(PA_ERR_UNSUPPORTED, __func__, "built without oneDNN headers (onednn-devel)");
}
pa_status pa_onednn_close_cpu(pa_onednn_cpu *h) { return PA_OK; }
pa_status pa_linear_onednn_cpu(float *y, pa_onednn_cpu *h, void *scratch, int64_t scratch_bytes, const float *x,
                               const int8_t *w_pc, const float *w_pc_scales, int64_t m, int64_t n, int64_t k) {
    return cpu_fail(PA_ERR_UNSUPPORTED, __func__, "built without oneDNN headers (onednn-devel)");
}
pa_status pa_onednn_impl_cpu(char *out, int64_t out_len, pa_onednn_cpu *h) {
    return cpu_fail(PA_ERR_UNSUPPORTED, __func__, "built without oneDNN headers (onednn-devel)");
}
#endif

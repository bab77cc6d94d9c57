/*
 * attention.c -- the INT8 paged KV cache: the write that quantizes as it stores, and causal paged
 * attention over int8 K/V tiles (decode and chunked prefill, GQA).
 *
 * Pool layout (pa.h): cache [num_blocks, num_kv_heads, block_size, head_dim] int8,
 * scales [num_blocks, num_kv_heads] float.  A tile is one (block, kv head).
 *
 * Rotated storage: when head_dim is a power of two, every k and v head vector is stored as H x, H the
 * orthonormal (Sylvester) Hadamard matrix of size head_dim, so value = H (int8 * scale) and H = H^-1.
 * Attention is unchanged: (H q) . (H k) = q . k, and sum p (H v) = H (sum p v).  Why: SmolLM2's keys
 * have a few channels far larger than the rest; one scale per (block, head) then spends the int8 range
 * on them, while H spreads every channel over all of them (teacher-forced top-1 agreement, keys only:
 * 0.971 -> 0.990 in the study in benchmarks/results_cpu.md).
 */
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "cpu_common.h"

/* ================================================================================================
 * x <- H x for the orthonormal Hadamard matrix of size n (a power of two, a multiple of 8): butterflies
 * within each 8-float vector by permutes, then across vectors.
 * ============================================================================================== */
static inline __m256 butterfly8(__m256 x, __m256 swapped, int mask) {
    return _mm256_blend_ps(_mm256_add_ps(x, swapped), _mm256_sub_ps(swapped, x), mask);
}

HIDDEN int rotated_head_dim(int64_t n) { return n >= 8 && (n & (n - 1)) == 0; }

HIDDEN void hadamard_inplace(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        v = butterfly8(v, _mm256_permute_ps(v, 0xB1), 0xAA);              /* pairs (0,1) (2,3) ... */
        v = butterfly8(v, _mm256_permute_ps(v, 0x4E), 0xCC);              /* (0,2) (1,3) ... */
        v = butterfly8(v, _mm256_permute2f128_ps(v, v, 1), 0xF0);         /* (0,4) ... */
        _mm256_storeu_ps(x + i, v);
    }
    for (int64_t h = 8; h < n; h *= 2)
        for (int64_t i = 0; i < n; i += 2 * h)
            for (int64_t j = i; j < i + h; j += 8) {
                __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
                _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
                _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
            }
    const __m256 norm = _mm256_set1_ps(1.0f / sqrtf((float)n));
    for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), norm));
}

/* ================================================================================================
 * KV write.  Tokens of one tile arrive in increasing offsets (a sequence fills its blocks in order).
 * The tokens of one call that land in the same tile are stored together: the tile's scale becomes
 * max(scale, absmax of the new tokens / 127) once, the tile's earlier tokens are requantized once if
 * it grew, and the new tokens are quantized with it.  A run that starts at offset 0 starts the tile
 * afresh (a reused block keeps a stale scale).
 * ============================================================================================== */
static float absmax(const float *x, int64_t n) {
    __m256 m = _mm256_setzero_ps();
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    int64_t d = 0;
    for (; d + 8 <= n; d += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(x + d)));
    float r = hmax_ps(m);
    for (; d < n; d++) r = fmaxf(r, fabsf(x[d]));
    return r;
}

/* x: the run's tokens (row stride `stride`), stored at offsets off0 .. off0 + count - 1 of the tile. */
static void store_run(int8_t *tile, float *scale, const float *x, int64_t stride, int64_t off0, int64_t count,
                      int64_t head_dim) {
    /* step 1: absmax of the new tokens */
    float amax = 0.0f;
    for (int64_t i = 0; i < count; i++) amax = fmaxf(amax, absmax(x + i * stride, head_dim));
    float s = off0 == 0 ? 0.0f : *scale;
    /* step 2: grow the tile's scale, requantizing the tokens already stored */
    if (amax > 127.0f * s) {
        const float s_new = amax / 127.0f;
        if (s > 0.0f) {
            const float ratio = s / s_new;
            for (int64_t i = 0; i < off0 * head_dim; i++) tile[i] = (int8_t)nearbyintf((float)tile[i] * ratio);
        }
        s = s_new;
    }
    *scale = s;
    /* step 3: quantize the new tokens (round to nearest even, clamp to +-127) */
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    for (int64_t i = 0; i < count; i++) {
        int8_t *dst = tile + (off0 + i) * head_dim;
        for (int64_t d = 0; d < head_dim; d++) {
            float q = nearbyintf(x[i * stride + d] * inv);
            dst[d] = (int8_t)(q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q));
        }
    }
}

/* Items hv = part, part + nparts, ... of the 2 * num_kv_heads (kv head, K or V) streams. */
HIDDEN void write_kv_q8_part(int8_t *key_cache, float *k_scales, int8_t *value_cache, float *v_scales,
                             const float *k, const float *v, const int32_t *slot_mapping, int64_t num_tokens,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t k_stride,
                             int64_t v_stride, int part, int nparts) {
    for (int64_t hv = part; hv < 2 * num_kv_heads; hv += nparts) {
        const int64_t h = hv >> 1, is_v = hv & 1;
        int8_t *cache = is_v ? value_cache : key_cache;
        float *scales = is_v ? v_scales : k_scales;
        const float *src = is_v ? v : k;
        const int64_t stride = is_v ? v_stride : k_stride;
        for (int64_t t = 0; t < num_tokens;) {
            const int64_t slot = slot_mapping[t];
            if (slot < 0) { t++; continue; }
            /* the run: following tokens at the next offsets of the same block */
            int64_t n = 1;
            while (t + n < num_tokens && slot_mapping[t + n] == slot + n && (slot + n) % block_size != 0) n++;
            const int64_t tile = (slot / block_size) * num_kv_heads + h;
            const float *x = src + t * stride + h * head_dim;
            int64_t x_stride = stride;
            float rot[rotated_head_dim(head_dim) ? n * head_dim : 1];   /* <= 64 x 256 floats */
            if (rotated_head_dim(head_dim)) {
                for (int64_t i = 0; i < n; i++) {
                    memcpy(rot + i * head_dim, x + i * stride, (size_t)head_dim * sizeof(float));
                    hadamard_inplace(rot + i * head_dim, head_dim);
                }
                x = rot;
                x_stride = head_dim;
            }
            store_run(cache + tile * block_size * head_dim, scales + tile, x, x_stride, slot % block_size, n, head_dim);
            t += n;
        }
    }
}

HIDDEN void write_kv_q8(int8_t *key_cache, float *k_scales, int8_t *value_cache, float *v_scales,
                        const float *k, const float *v, const int32_t *slot_mapping, int64_t num_tokens,
                        int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t k_stride,
                        int64_t v_stride) {
    /* threads over (kv head, K or V); each walks the tokens in order, a run of one tile at a time */
    #pragma omp parallel if (num_tokens >= 16)
    {
        int part = 0, nparts = 1;
#ifdef _OPENMP
        part = omp_get_thread_num();
        nparts = omp_get_num_threads();
#endif
        write_kv_q8_part(key_cache, k_scales, value_cache, v_scales, k, v, slot_mapping, num_tokens, num_kv_heads,
                         head_dim, block_size, k_stride, v_stride, part, nparts);
    }
}

pa_status pa_write_kv_q8_cpu(int8_t *key_cache, float *k_scales, int8_t *value_cache, float *v_scales,
                             const float *k, const float *v, const int32_t *slot_mapping, int64_t num_tokens,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t num_blocks,
                             int64_t k_stride, int64_t v_stride) {
    CHECK_PTR(key_cache); CHECK_PTR(k_scales); CHECK_PTR(value_cache); CHECK_PTR(v_scales);
    CHECK_PTR(k); CHECK_PTR(v); CHECK_PTR(slot_mapping);
    CHECK(num_tokens >= 0 && num_kv_heads > 0 && head_dim > 0 && block_size > 0 && num_blocks > 0,
          "bad sizes num_tokens=%ld num_kv_heads=%ld head_dim=%ld block_size=%ld num_blocks=%ld",
          (long)num_tokens, (long)num_kv_heads, (long)head_dim, (long)block_size, (long)num_blocks);
    CHECK(k_stride >= num_kv_heads * head_dim && v_stride >= num_kv_heads * head_dim, "row strides too small");
    CHECK(head_dim <= MAX_HEAD_DIM && block_size <= 64, "head_dim=%ld (<= %d), block_size=%ld (<= 64)",
          (long)head_dim, MAX_HEAD_DIM, (long)block_size);
    for (int64_t t = 0; t < num_tokens; t++)
        CHECK(slot_mapping[t] >= -1 && slot_mapping[t] < num_blocks * block_size,
              "slot_mapping[%ld] = %d outside [-1, %ld)", (long)t, slot_mapping[t], (long)(num_blocks * block_size));
    write_kv_q8(key_cache, k_scales, value_cache, v_scales, k, v, slot_mapping, num_tokens, num_kv_heads,
                head_dim, block_size, k_stride, v_stride);
    return PA_OK;
}

/* ================================================================================================
 * Paged attention.  A work item is (sequence, kv head, chunk of up to QC query rows); its rows are
 * the chunk's queries x the group's query heads.  Each K/V tile is dequantized once per item (to
 * float, scale folded in later) and serves all rows; softmax is online (running max m, sum l).
 * ============================================================================================== */
#include "attention.h"

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    return hsum_ps(acc);
}

/* Rows r of the item: query row qrow0 + r / group, head g * group + r % group. */
static void attend_item(const attn_args *a, int64_t s, int64_t g, int64_t ctx, int64_t qlen, int64_t row0,
                        int64_t nq, int64_t token0) {
    const int64_t hd = a->head_dim, bs = a->block_size, group = a->num_heads / a->num_kv_heads;
    const int64_t rows = nq * group;
    /* stack buffers, bounded by the export's checks: rows <= 32, hd <= 256, bs <= 64 (<= 192 KiB) */
    float qs[rows][hd], acc[rows][hd], m[rows], l[rows];
    float kt[bs][hd], vt[bs][hd], sc[bs];
    /* step 1: scaled queries, empty accumulators */
    for (int64_t r = 0; r < rows; r++) {
        const float *src = a->q + (token0 + row0 + r / group) * a->q_stride + (g * group + r % group) * hd;
        for (int64_t d = 0; d < hd; d++) { qs[r][d] = src[d] * a->scale; acc[r][d] = 0.0f; }
        if (rotated_head_dim(hd)) hadamard_inplace(qs[r], hd);          /* meets the stored H k */
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    const int64_t last_pos = ctx - qlen + row0 + nq - 1;         /* the chunk's furthest visible key */
    const int32_t *table = a->block_tables + s * a->max_blocks_per_seq;
    for (int64_t p0 = 0; p0 <= last_pos; p0 += bs) {
        /* step 2: dequantize this tile's valid keys and values (int8 -> float; scales applied below) */
        const int64_t tile = (int64_t)table[p0 / bs] * a->num_kv_heads + g;
        const int64_t nvalid = ctx - p0 < bs ? ctx - p0 : bs;
        const int8_t *kq = a->key_cache + tile * bs * hd, *vq = a->value_cache + tile * bs * hd;
        const float ks = a->k_scales[tile], vs = a->v_scales[tile];
        for (int64_t i = 0; i < nvalid; i++)
            for (int64_t d = 0; d < hd; d += 8) {
                _mm256_storeu_ps(&kt[i][d], load8_i8_ps(kq + i * hd + d));
                _mm256_storeu_ps(&vt[i][d], load8_i8_ps(vq + i * hd + d));
            }
        for (int64_t r = 0; r < rows; r++) {
            /* step 3: scores of the keys this row may see (causal), running max */
            const int64_t qpos = ctx - qlen + row0 + r / group;
            const int64_t nk = qpos - p0 + 1 < nvalid ? qpos - p0 + 1 : nvalid;
            if (nk <= 0) continue;
            float mx = m[r];
            for (int64_t i = 0; i < nk; i++) {
                sc[i] = dot_f32(qs[r], kt[i], hd) * ks;
                mx = sc[i] > mx ? sc[i] : mx;
            }
            /* step 4: p = exp(score - max) through the table; rescale the row's state */
            const float corr = exp_lut(m[r] - mx);
            int64_t i = 0;
            const __m256 vmx = _mm256_set1_ps(mx);
            __m256 psum = _mm256_setzero_ps();
            for (; i + 8 <= nk; i += 8) {
                __m256 p = exp_lut_ps(_mm256_sub_ps(_mm256_loadu_ps(sc + i), vmx));
                _mm256_storeu_ps(sc + i, p);
                psum = _mm256_add_ps(psum, p);
            }
            float sum = hsum_ps(psum);
            for (; i < nk; i++) { sc[i] = exp_lut(sc[i] - mx); sum += sc[i]; }
            l[r] = l[r] * corr + sum;
            m[r] = mx;
            /* step 5: acc = acc * corr + sum_i p_i * vs * v_i */
            for (int64_t d = 0; d < hd; d += 8) {
                __m256 o = _mm256_mul_ps(_mm256_loadu_ps(&acc[r][d]), _mm256_set1_ps(corr));
                for (int64_t j = 0; j < nk; j++)
                    o = _mm256_fmadd_ps(_mm256_set1_ps(sc[j] * vs), _mm256_loadu_ps(&vt[j][d]), o);
                _mm256_storeu_ps(&acc[r][d], o);
            }
        }
    }
    /* step 6: normalise into out [T, num_heads, head_dim] */
    for (int64_t r = 0; r < rows; r++) {
        float *dst = a->out + (token0 + row0 + r / group) * a->num_heads * hd + (g * group + r % group) * hd;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (int64_t d = 0; d < hd; d++) dst[d] = acc[r][d] * inv;
        if (rotated_head_dim(hd)) hadamard_inplace(dst, hd);            /* sum p H v -> sum p v */
    }
}


/* The calling thread's share: it claims work items from *next (zeroed before) until none are left. */
HIDDEN void paged_attention_q8_part(float *out, const float *q, const int8_t *key_cache, const float *k_scales,
                                    const int8_t *value_cache, const float *v_scales,
                                    const int32_t *block_tables, const int32_t *context_lens,
                                    const int32_t *query_start_loc, int64_t num_seqs, int64_t num_heads,
                                    int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                    int64_t max_blocks_per_seq, int64_t q_stride, float scale, work_counter *next) {
    const attn_args a = {q, out, key_cache, k_scales, value_cache, v_scales, block_tables, num_heads,
                         num_kv_heads, head_dim, block_size, max_blocks_per_seq, q_stride, scale};
    const int64_t group = num_heads / num_kv_heads;
    const int wide = head_dim % 16 == 0 && isa_level() >= 2;        /* attend_item512 */
    const int64_t qc = MAX_ROWS / group;                         /* query rows per item */
    int64_t max_qlen = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t qlen = query_start_loc[s + 1] - query_start_loc[s];
        max_qlen = qlen > max_qlen ? qlen : max_qlen;
    }
    const int64_t chunks = (max_qlen + qc - 1) / qc;
    const int64_t items = num_seqs * num_kv_heads * chunks;
    for (;;) {
        const int64_t it = atomic_fetch_add_explicit(next, 1, memory_order_relaxed);
        if (it >= items) break;
        const int64_t s = it / (num_kv_heads * chunks), g = (it / chunks) % num_kv_heads, c = it % chunks;
        const int64_t qlen = query_start_loc[s + 1] - query_start_loc[s];
        const int64_t row0 = c * qc;
        if (row0 >= qlen) continue;
        const int64_t nq = qlen - row0 < qc ? qlen - row0 : qc;
        if (wide && nq == 1 && qlen == 1 && group <= DECODE_ROWS)
            attend_decode512(&a, s, g, context_lens[s], query_start_loc[s]);
        else if (wide)
            attend_item512(&a, s, g, context_lens[s], qlen, row0, nq, query_start_loc[s]);
        else
            attend_item(&a, s, g, context_lens[s], qlen, row0, nq, query_start_loc[s]);
    }
}

HIDDEN void paged_attention_q8(float *out, const float *q, const int8_t *key_cache, const float *k_scales,
                               const int8_t *value_cache, const float *v_scales,
                               const int32_t *block_tables, const int32_t *context_lens,
                               const int32_t *query_start_loc, int64_t num_seqs, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                               int64_t max_blocks_per_seq, int64_t q_stride, float scale) {
    work_counter next = 0;
    #pragma omp parallel if (num_seqs * num_kv_heads > 1)
    paged_attention_q8_part(out, q, key_cache, k_scales, value_cache, v_scales, block_tables, context_lens,
                            query_start_loc, num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                            max_blocks_per_seq, q_stride, scale, &next);
}

/* Validate the batch's index arrays against the pool (cheap: one pass over the needed entries). */
HIDDEN pa_status check_attention_batch(const char *kernel, const int32_t *block_tables, const int32_t *context_lens,
                                       const int32_t *query_start_loc, int64_t num_seqs, int64_t num_tokens,
                                       int64_t block_size, int64_t max_blocks_per_seq, int64_t num_blocks) {
    if (query_start_loc[0] != 0 || query_start_loc[num_seqs] != num_tokens)
        return cpu_fail(PA_ERR_INVALID_ARG, kernel, "query_start_loc must run from 0 to num_tokens=%ld",
                        (long)num_tokens);
    for (int64_t s = 0; s < num_seqs; s++) {
        const int64_t qlen = query_start_loc[s + 1] - query_start_loc[s], ctx = context_lens[s];
        if (qlen < 0 || ctx < qlen || ctx > max_blocks_per_seq * block_size)
            return cpu_fail(PA_ERR_INVALID_ARG, kernel, "sequence %ld: query_len=%ld context_len=%ld "
                            "(need 0 <= query_len <= context_len <= %ld)", (long)s, (long)qlen, (long)ctx,
                            (long)(max_blocks_per_seq * block_size));
        for (int64_t b = 0; qlen > 0 && b < (ctx + block_size - 1) / block_size; b++) {
            const int32_t blk = block_tables[s * max_blocks_per_seq + b];
            if (blk < 0 || blk >= num_blocks)
                return cpu_fail(PA_ERR_INVALID_ARG, kernel, "block_tables[%ld, %ld] = %d outside [0, %ld)",
                                (long)s, (long)b, blk, (long)num_blocks);
        }
    }
    return PA_OK;
}

pa_status pa_paged_attention_q8_cpu(float *out, const float *q, const int8_t *key_cache, const float *k_scales,
                                    const int8_t *value_cache, const float *v_scales, const int32_t *block_tables,
                                    const int32_t *context_lens, const int32_t *query_start_loc, int64_t num_seqs,
                                    int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                    int64_t block_size, int64_t max_blocks_per_seq, int64_t num_blocks,
                                    int64_t q_stride, float scale) {
    CHECK_PTR(out); CHECK_PTR(q); CHECK_PTR(key_cache); CHECK_PTR(k_scales); CHECK_PTR(value_cache);
    CHECK_PTR(v_scales); CHECK_PTR(block_tables); CHECK_PTR(context_lens); CHECK_PTR(query_start_loc);
    CHECK(num_seqs >= 0 && num_tokens >= 0 && num_blocks > 0 && max_blocks_per_seq > 0, "bad sizes");
    CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0 && num_heads / num_kv_heads <= MAX_ROWS,
          "num_heads=%ld must be a multiple of num_kv_heads=%ld, at most %d per kv head", (long)num_heads,
          (long)num_kv_heads, MAX_ROWS);
    CHECK(head_dim > 0 && head_dim % 8 == 0 && head_dim <= MAX_HEAD_DIM, "head_dim=%ld must be a multiple of 8, <= %d",
          (long)head_dim, MAX_HEAD_DIM);
    CHECK(block_size > 0 && block_size <= 64, "block_size=%ld must be in [1, 64]", (long)block_size);
    CHECK(q_stride >= num_heads * head_dim, "q_stride=%ld too small", (long)q_stride);
    pa_status st = check_attention_batch(__func__, block_tables, context_lens, query_start_loc, num_seqs, num_tokens,
                                         block_size, max_blocks_per_seq, num_blocks);
    if (st != PA_OK) return st;
    paged_attention_q8(out, q, key_cache, k_scales, value_cache, v_scales, block_tables, context_lens,
                       query_start_loc, num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                       max_blocks_per_seq, q_stride, scale);
    return PA_OK;
}

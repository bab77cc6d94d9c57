// elementwise.cu -- the small per-token kernels: fused RMSNorm + residual, SiLU-mul, RoPE (+ KV write).
// Rounding follows HF transformers in bf16/fp16 step by step, so greedy tokens can match it exactly.
#include "common.cuh"

// =============================================================================================
// RMSNorm (+ residual add)
// =============================================================================================
static constexpr int kNormVecsPerThread = 4;   // 16-byte vectors a thread keeps in registers

// One block per token row: sum = x + residual (rounded to T, as torch adds in T), sum of squares in
// float, then out = T(T(sum * rsqrt(mean + eps)) * weight).
template <typename T>
__global__ void rms_norm_kernel(T *__restrict__ out, T *residual_out, const T *__restrict__ x,
                                const T *residual, const T *__restrict__ weight, int hidden, float eps) {
    const int nvec = hidden / 8;
    const int64_t row = (int64_t)blockIdx.x * hidden;
    __shared__ float warp_sums[32];

    // 1. load, add the residual, keep the (rounded) sum in registers
    uint4 sum[kNormVecsPerThread];
    float sq = 0.f;
#pragma unroll
    for (int j = 0; j < kNormVecsPerThread; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v >= nvec) continue;
        uint4 xv = reinterpret_cast<const uint4 *>(x + row)[v];
        float f[8];
        Vec<T>::to_float(xv, f);
        if (residual != nullptr) {
            float r[8];
            Vec<T>::to_float(reinterpret_cast<const uint4 *>(residual + row)[v], r);
#pragma unroll
            for (int e = 0; e < 8; ++e) f[e] = round_to<T>(f[e] + r[e]);
            xv = Vec<T>::from_float(f);
            if (residual_out != nullptr) reinterpret_cast<uint4 *>(residual_out + row)[v] = xv;
        } else if (residual_out != nullptr) {
            reinterpret_cast<uint4 *>(residual_out + row)[v] = xv;
        }
        sum[j] = xv;
#pragma unroll
        for (int e = 0; e < 8; ++e) sq += f[e] * f[e];
    }

    // 2. block-wide sum of squares
    sq = warp_sum(sq);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_sums[warp] = sq;
    __syncthreads();
    if (warp == 0) {
        float t = lane < (int)(blockDim.x / 32) ? warp_sums[lane] : 0.f;
        t = warp_sum(t);
        if (lane == 0) warp_sums[0] = t;
    }
    __syncthreads();
    const float inv_rms = rsqrtf(warp_sums[0] / (float)hidden + eps);

    // 3. normalise, round, scale by the weight, round
#pragma unroll
    for (int j = 0; j < kNormVecsPerThread; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v >= nvec) continue;
        float f[8], w[8];
        Vec<T>::to_float(sum[j], f);
        Vec<T>::to_float(reinterpret_cast<const uint4 *>(weight)[v], w);
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = round_to<T>(f[e] * inv_rms) * w[e];
        reinterpret_cast<uint4 *>(out + row)[v] = Vec<T>::from_float(f);
    }
}

template <typename T>
static pa_status launch_rms_norm(T *out, T *residual_out, const T *x, const T *residual, const T *weight,
                                 int num_tokens, int hidden, float eps, cudaStream_t stream) {
    const int nvec = hidden / 8;
    int threads = (nvec + kNormVecsPerThread - 1) / kNormVecsPerThread;
    threads = ((threads + 31) / 32) * 32;
    rms_norm_kernel<T><<<num_tokens, threads, 0, stream>>>(out, residual_out, x, residual, weight, hidden, eps);
    return check_launch("rms_norm_kernel");
}

extern "C" pa_status pa_rms_norm_cuda(void *out, void *residual_out, const void *x, const void *residual,
                                      const void *weight, int32_t num_tokens, int32_t hidden, float eps,
                                      int32_t dtype, void *stream) {
    if (out == nullptr || x == nullptr || weight == nullptr || num_tokens < 0 || hidden <= 0 || hidden % 8 ||
        hidden > 8 * kNormVecsPerThread * 1024)
        return cuda_fail(PA_ERR_INVALID_ARG, "rms_norm_kernel: bad arguments (hidden %d must be a multiple "
                         "of 8 and at most %d)", (int)hidden, 8 * kNormVecsPerThread * 1024);
    if (num_tokens == 0) return PA_OK;
    return dispatch_dtype(dtype, "rms_norm_kernel", [&](auto tag) {
        using T = decltype(tag);
        return launch_rms_norm<T>((T *)out, (T *)residual_out, (const T *)x, (const T *)residual,
                                  (const T *)weight, num_tokens, hidden, eps, (cudaStream_t)stream);
    });
}

// =============================================================================================
// SiLU(gate) * up
// =============================================================================================
// One thread per 8 outputs: out = T(T(silu(gate)) * up), as HF's act_fn(gate) * up in T.
template <typename T>
__global__ void silu_mul_kernel(T *__restrict__ out, const T *__restrict__ gate_up, int64_t num_vecs,
                                int intermediate) {
    const int vecs_per_row = intermediate / 8;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < num_vecs;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / vecs_per_row;
        const int col = (int)(i % vecs_per_row);
        const uint4 *src = reinterpret_cast<const uint4 *>(gate_up + row * 2 * intermediate);
        float g[8], u[8];
        Vec<T>::to_float(src[col], g);
        Vec<T>::to_float(src[col + vecs_per_row], u);
#pragma unroll
        for (int e = 0; e < 8; ++e) g[e] = round_to<T>(g[e] / (1.f + expf(-g[e]))) * u[e];
        reinterpret_cast<uint4 *>(out)[i] = Vec<T>::from_float(g);
    }
}

extern "C" pa_status pa_silu_mul_cuda(void *out, const void *gate_up, int32_t num_tokens, int32_t intermediate,
                                      int32_t dtype, void *stream) {
    if (out == nullptr || gate_up == nullptr || num_tokens < 0 || intermediate <= 0 || intermediate % 8)
        return cuda_fail(PA_ERR_INVALID_ARG, "silu_mul_kernel: bad arguments (intermediate %d must be a "
                         "multiple of 8)", (int)intermediate);
    if (num_tokens == 0) return PA_OK;
    return dispatch_dtype(dtype, "silu_mul_kernel", [&](auto tag) {
        using T = decltype(tag);
        const int64_t num_vecs = (int64_t)num_tokens * intermediate / 8;
        const int threads = 256;
        const int64_t blocks = (num_vecs + threads - 1) / threads;
        silu_mul_kernel<T><<<(unsigned)(blocks < 65535 ? blocks : 65535), threads, 0, (cudaStream_t)stream>>>(
            (T *)out, (const T *)gate_up, num_vecs, intermediate);
        return check_launch("silu_mul_kernel");
    });
}

// =============================================================================================
// RoPE, optionally followed by the KV write of the rotated k and of v
// =============================================================================================
// One block per token, one thread per 4 rotation pairs of one head (no shared memory, no barrier).
// cos/sin as HF: float32 inv_freq = 1 / theta^(2i/d), angle = pos * inv_freq, cos/sin rounded to T;
// x1' = T(T(x1 c) + T(-x2 s)), x2' = T(T(x2 c) + T(x1 s)). With WRITE_KV the rotated k and v also
// go to the token's slot (threads past the rotation work copy v, 16 bytes each).
template <typename T, bool WRITE_KV>
__global__ void rope_kernel(T *q, T *k, T *key_cache, T *value_cache, const T *v, const int32_t *positions,
                            const int32_t *slot_mapping, int num_heads, int num_kv_heads, int head_dim,
                            int block_size, int64_t q_stride, int64_t k_stride, int64_t v_stride, float theta) {
    const int half = head_dim / 2, quads = half / 4;
    const int64_t token = blockIdx.x;
    const int rot_items = (num_heads + num_kv_heads) * quads;
    int64_t slot = -1;
    if (WRITE_KV) slot = slot_mapping[token];
    const int64_t block = slot >= 0 ? slot / block_size : 0, offset = slot >= 0 ? slot % block_size : 0;

    for (int i = threadIdx.x; i < rot_items; i += blockDim.x) {
        const int head = i / quads, j0 = (i % quads) * 4;
        const bool is_q = head < num_heads;
        const int kv_head = head - num_heads;
        T *row = is_q ? q + token * q_stride + (int64_t)head * head_dim
                      : k + token * k_stride + (int64_t)kv_head * head_dim;
        const uint2 lo = *reinterpret_cast<const uint2 *>(row + j0);          // x1: 4 values
        const uint2 hi = *reinterpret_cast<const uint2 *>(row + j0 + half);   // x2: 4 values
        const T *x1 = reinterpret_cast<const T *>(&lo), *x2 = reinterpret_cast<const T *>(&hi);
        const float pos = (float)positions[token];
        uint2 olo, ohi;
        T *y1 = reinterpret_cast<T *>(&olo), *y2 = reinterpret_cast<T *>(&ohi);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float inv_freq = 1.f / powf(theta, (float)(2 * (j0 + e)) / (float)head_dim);
            float sn, cn;
            sincosf(pos * inv_freq, &sn, &cn);
            const float c = round_to<T>(cn), s = round_to<T>(sn);
            const float a = to_f(x1[e]), b = to_f(x2[e]);
            y1[e] = from_f<T>(round_to<T>(a * c) + round_to<T>(-b * s));
            y2[e] = from_f<T>(round_to<T>(b * c) + round_to<T>(a * s));
        }
        *reinterpret_cast<uint2 *>(row + j0) = olo;
        *reinterpret_cast<uint2 *>(row + j0 + half) = ohi;
        if (WRITE_KV && !is_q && slot >= 0) {
            T *dst = key_cache + ((block * num_kv_heads + kv_head) * block_size + offset) * head_dim;
            *reinterpret_cast<uint2 *>(dst + j0) = olo;
            *reinterpret_cast<uint2 *>(dst + j0 + half) = ohi;
        }
    }
    if (WRITE_KV && slot >= 0) {   // v into the cache
        const int vecs = num_kv_heads * head_dim / 8, per_head = head_dim / 8;
        for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
            const int kv_head = i / per_head, c = i % per_head;
            const uint4 val = reinterpret_cast<const uint4 *>(v + token * v_stride + (int64_t)kv_head * head_dim)[c];
            reinterpret_cast<uint4 *>(value_cache + ((block * num_kv_heads + kv_head) * block_size + offset) *
                                                        head_dim)[c] = val;
        }
    }
}

template <bool WRITE_KV>
static pa_status launch_rope(int32_t dtype, void *q, void *k, void *key_cache, void *value_cache, const void *v,
                             const int32_t *positions, const int32_t *slot_mapping, int32_t num_tokens,
                             int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
                             int64_t q_stride, int64_t k_stride, int64_t v_stride, float theta, void *stream) {
    const char *name = WRITE_KV ? "rope_write_kv_kernel" : "rope_kernel";
    if (q == nullptr || k == nullptr || positions == nullptr || num_tokens < 0 || num_heads <= 0 ||
        num_kv_heads <= 0 || head_dim <= 0 || head_dim % 8 || head_dim > 512 || !(theta > 0.f) ||
        q_stride % 4 || k_stride % 4)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: bad arguments", name);
    if (WRITE_KV && (key_cache == nullptr || value_cache == nullptr || v == nullptr || slot_mapping == nullptr ||
                     block_size <= 0))
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: bad cache arguments", name);
    if (num_tokens == 0) return PA_OK;
    return dispatch_dtype(dtype, name, [&](auto tag) {
        using T = decltype(tag);
        const int items = (num_heads + num_kv_heads) * (head_dim / 8);
        const int threads = items >= 512 ? 512 : ((items + 31) / 32) * 32;
        rope_kernel<T, WRITE_KV><<<num_tokens, threads, 0, (cudaStream_t)stream>>>(
            (T *)q, (T *)k, (T *)key_cache, (T *)value_cache, (const T *)v, positions, slot_mapping, num_heads,
            num_kv_heads, head_dim, block_size, q_stride, k_stride, v_stride, theta);
        return check_launch(name);
    });
}

extern "C" pa_status pa_rope_cuda(void *q, void *k, const int32_t *positions, int32_t num_tokens, int32_t num_heads,
                                  int32_t num_kv_heads, int32_t head_dim, int64_t q_stride, int64_t k_stride,
                                  float theta, int32_t dtype, void *stream) {
    return launch_rope<false>(dtype, q, k, nullptr, nullptr, nullptr, positions, nullptr, num_tokens, num_heads,
                              num_kv_heads, head_dim, 1, q_stride, k_stride, 0, theta, stream);
}

extern "C" pa_status pa_rope_write_kv_cuda(void *q, void *k, void *key_cache, void *value_cache, const void *v,
                                           const int32_t *positions, const int32_t *slot_mapping,
                                           int32_t num_tokens, int32_t num_heads, int32_t num_kv_heads,
                                           int32_t head_dim, int32_t block_size, int64_t q_stride,
                                           int64_t k_stride, int64_t v_stride, float theta, int32_t dtype,
                                           void *stream) {
    return launch_rope<true>(dtype, q, k, key_cache, value_cache, v, positions, slot_mapping, num_tokens,
                             num_heads, num_kv_heads, head_dim, block_size, q_stride, k_stride, v_stride, theta,
                             stream);
}

// =============================================================================================
// KV write
// =============================================================================================
// One block per token; each thread moves 16 bytes of k and of v into the token's slot.
template <typename T>
__global__ void write_kv_kernel(T *__restrict__ key_cache, T *__restrict__ value_cache, const T *__restrict__ k,
                                const T *__restrict__ v, const int32_t *__restrict__ slot_mapping,
                                int num_kv_heads, int head_dim, int block_size, int64_t k_stride,
                                int64_t v_stride) {
    const int64_t token = blockIdx.x;
    const int64_t slot = slot_mapping[token];
    if (slot < 0) return;
    const int64_t block = slot / block_size, offset = slot % block_size;
    const int per_head = head_dim / 8, vecs = num_kv_heads * per_head;
    for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
        const int kv_head = i / per_head, c = i % per_head;
        const int64_t dst = ((block * num_kv_heads + kv_head) * block_size + offset) * head_dim;
        reinterpret_cast<uint4 *>(key_cache + dst)[c] =
            reinterpret_cast<const uint4 *>(k + token * k_stride + (int64_t)kv_head * head_dim)[c];
        reinterpret_cast<uint4 *>(value_cache + dst)[c] =
            reinterpret_cast<const uint4 *>(v + token * v_stride + (int64_t)kv_head * head_dim)[c];
    }
}

extern "C" pa_status pa_write_kv_cuda(void *key_cache, void *value_cache, const void *k, const void *v,
                                      const int32_t *slot_mapping, int32_t num_tokens, int32_t num_kv_heads,
                                      int32_t head_dim, int32_t block_size, int64_t k_stride, int64_t v_stride,
                                      int32_t dtype, void *stream) {
    if (key_cache == nullptr || value_cache == nullptr || k == nullptr || v == nullptr || slot_mapping == nullptr ||
        num_tokens < 0 || num_kv_heads <= 0 || head_dim <= 0 || head_dim % 8 || block_size <= 0)
        return cuda_fail(PA_ERR_INVALID_ARG, "write_kv_kernel: bad arguments");
    if (num_tokens == 0) return PA_OK;
    return dispatch_dtype(dtype, "write_kv_kernel", [&](auto tag) {
        using T = decltype(tag);
        write_kv_kernel<T><<<num_tokens, 128, 0, (cudaStream_t)stream>>>(
            (T *)key_cache, (T *)value_cache, (const T *)k, (const T *)v, slot_mapping, num_kv_heads, head_dim,
            block_size, k_stride, v_stride);
        return check_launch("write_kv_kernel");
    });
}

// One thread a row; thread 0 also advances the step counter after every thread has read it.
__global__ void greedy_advance_kernel(const int32_t *tokens, int32_t num_rows, int32_t *step, int32_t *token_log,
                                      int32_t max_steps, int32_t *input_ids, int32_t *positions,
                                      int32_t *context_lens, int32_t *slot_mapping, const int32_t *block_tables,
                                      int32_t table_width, int32_t block_size) {
    const int s = *step;
    for (int m = threadIdx.x; m < num_rows; m += blockDim.x) {
        const int32_t tok = tokens[m];
        if (s < max_steps) token_log[(int64_t)s * num_rows + m] = tok;
        if (context_lens[m] <= 0) continue;                       // a padding row: nothing moves
        const int32_t pos = positions[m] + 1;
        input_ids[m] = tok;
        positions[m] = pos;
        context_lens[m] += 1;
        const int page = pos / block_size;
        slot_mapping[m] = page < table_width ? block_tables[(int64_t)m * table_width + page] * block_size +
                                                   pos % block_size
                                             : -1;
    }
    __syncthreads();
    if (threadIdx.x == 0) *step = s + 1;
}

extern "C" pa_status pa_greedy_advance_cuda(const int32_t *tokens, int32_t num_rows, int32_t *step,
                                            int32_t *token_log, int32_t max_steps, int32_t *input_ids,
                                            int32_t *positions, int32_t *context_lens, int32_t *slot_mapping,
                                            const int32_t *block_tables, int32_t table_width, int32_t block_size,
                                            void *stream) {
    if (tokens == nullptr || step == nullptr || token_log == nullptr || input_ids == nullptr ||
        positions == nullptr || context_lens == nullptr || slot_mapping == nullptr || block_tables == nullptr ||
        num_rows < 0 || max_steps <= 0 || table_width <= 0 || block_size <= 0)
        return cuda_fail(PA_ERR_INVALID_ARG, "greedy_advance_kernel: bad arguments");
    if (num_rows == 0) return PA_OK;
    greedy_advance_kernel<<<1, 256, 0, (cudaStream_t)stream>>>(tokens, num_rows, step, token_log, max_steps,
                                                               input_ids, positions, context_lens, slot_mapping,
                                                               block_tables, table_width, block_size);
    return check_launch("greedy_advance_kernel");
}

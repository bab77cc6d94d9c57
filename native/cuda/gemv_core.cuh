// gemv_core.cuh -- the small-batch GEMV's pieces (see gemv.cu), shared by the standalone GEMV kernel
// and the persistent decode-layers kernel (decode_layers.cu), which runs the same row loop as phases
// of one launch. Activations are read with ld.global.cg (L2, not L1): in the persistent kernel they
// were written by other blocks earlier in the same launch.
#pragma once

#include <climits>

#include "common.cuh"

namespace gemv {


constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 4;   // 16-byte weight loads per lane and row in a batch (two batches in flight)
constexpr int kUnrollDeep = 8;   // PA_CUDA_GEMV_DEEP (one row a warp, two blocks an SM)

// The mode of pa_gemv_rope_cuda (internal: pa_gemv_cuda rejects it): the NORM prologue, rows paired as
// RoPE pairs them, rotation and the KV write in the epilogue.
constexpr int kModeNormRope = 100;

struct GemvArgs {
    void *out;
    const void *x, *weight, *norm_weight, *residual;
    int rows, n, k, mode;
    float eps;
    // kModeNormRope only
    const int32_t *positions = nullptr, *slots = nullptr;
    void *key_cache = nullptr, *value_cache = nullptr;
    int num_heads = 0, num_kv_heads = 0, head_dim = 0, block_size = 0;
    float theta = 0.f;
};

__device__ __forceinline__ bool norm_prologue(int mode) {
    return mode == PA_CUDA_GEMV_NORM || mode == PA_CUDA_GEMV_NORM_SILU || mode == kModeNormRope;
}


template <typename T, int MR>
__device__ void stage_input(const GemvArgs &a, T *xs, float *scratch) {
    const int nv = a.k / 8, tid = threadIdx.x;
    const T *x = (const T *)a.x;
    if (a.mode == PA_CUDA_GEMV_SILU) {          // x = [gate | up], [rows, 2k]
        for (int i = tid; i < MR * nv; i += kThreads) {
            const int m = i / nv, v = i % nv;
            float g[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, u[8];
            if (m < a.rows) {
                const uint4 *row = reinterpret_cast<const uint4 *>(x + (int64_t)m * 2 * a.k);
                Vec<T>::to_float(__ldcg(row + v), g);
                Vec<T>::to_float(__ldcg(row + v + nv), u);
#pragma unroll
                for (int e = 0; e < 8; ++e) g[e] = round_to<T>(g[e] / (1.f + expf(-g[e]))) * u[e];
            }
            reinterpret_cast<uint4 *>(xs)[i] = Vec<T>::from_float(g);
        }
        return;
    }
    // plain and norm: the raw rows into shared memory, with their sums of squares
    float sq[MR];
#pragma unroll
    for (int m = 0; m < MR; ++m) sq[m] = 0.f;
    for (int i = tid; i < MR * nv; i += kThreads) {
        const int m = i / nv, v = i % nv;
        uint4 raw = make_uint4(0, 0, 0, 0);
        if (m < a.rows) raw = __ldcg(reinterpret_cast<const uint4 *>(x + (int64_t)m * a.k) + v);
        reinterpret_cast<uint4 *>(xs)[i] = raw;
        if (norm_prologue(a.mode)) {
            float f[8], t = 0.f;
            Vec<T>::to_float(raw, f);
#pragma unroll
            for (int e = 0; e < 8; ++e) t += f[e] * f[e];
#pragma unroll
            for (int mm = 0; mm < MR; ++mm)
                if (mm == m) sq[mm] += t;   // constant-indexed: stays in registers
        }
    }
    if (!norm_prologue(a.mode)) return;
    const int warp = tid / 32, lane = tid % 32;
#pragma unroll
    for (int m = 0; m < MR; ++m) {
        sq[m] = warp_sum(sq[m]);
        if (lane == 0) scratch[warp * MR + m] = sq[m];
    }
    __syncthreads();
    float inv_rms[MR];
#pragma unroll
    for (int m = 0; m < MR; ++m) {
        float t = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) t += scratch[w * MR + m];
        inv_rms[m] = rsqrtf(t / (float)a.k + a.eps);
    }
    // normalise in place: each thread rewrites the vectors it staged
    for (int i = tid; i < MR * nv; i += kThreads) {
        const int m = i / nv, v = i % nv;
        float f[8], w[8], r = 0.f;
#pragma unroll
        for (int mm = 0; mm < MR; ++mm)
            if (mm == m) r = inv_rms[mm];
        Vec<T>::to_float(reinterpret_cast<const uint4 *>(xs)[i], f);
        Vec<T>::to_float(reinterpret_cast<const uint4 *>(a.norm_weight)[v], w);
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = round_to<T>(f[e] * r) * w[e];
        reinterpret_cast<uint4 *>(xs)[i] = Vec<T>::from_float(f);
    }
}

// The weight row of a warp's r-th row: consecutive rows, or for NORM_SILU (RPW = 2) the gate row j and
// the up row half + j of output j = row0 / 2 (weight = [gate; up], n = 2 * half rows).
// With kModeNormRope (RPW = 2) pair p = row0 / 2 is (head, j): rows head * hd + j and + hd / 2.
__device__ __forceinline__ int weight_row(const GemvArgs &a, int row0, int r) {
    if (a.mode == PA_CUDA_GEMV_NORM_SILU) return min(row0 / 2 + r * (a.n / 2), a.n - 1);
    if (a.mode == kModeNormRope) {
        const int half = a.head_dim / 2, p = row0 / 2;
        return min((p / half) * a.head_dim + p % half + r * half, a.n - 1);
    }
    return min(row0 + r, a.n - 1);
}

// The weight rows of a warp's group starting at row0 (wrow) and their first U 16-byte loads (wv).
// One batch: U 16-byte loads a row from vector v0 on (32 apart), zeros past the row's nv vectors.
template <int RPW, int U>
__device__ __forceinline__ void load_batch(const uint4 *const (&wrow)[RPW], int v0, int nv, uint4 (&dst)[RPW][U]) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
            const int v = v0 + u * 32;
            dst[r][u] = v < nv ? __ldg(wrow[r] + v) : make_uint4(0, 0, 0, 0);
        }
}

template <typename T, int RPW, int U = kUnroll>
__device__ __forceinline__ void first_loads(const GemvArgs &a, int row0, int lane, const uint4 *(&wrow)[RPW],
                                            uint4 (&wv)[RPW][U]) {
#pragma unroll
    for (int r = 0; r < RPW; ++r)
        wrow[r] = reinterpret_cast<const uint4 *>((const T *)a.weight + (int64_t)weight_row(a, row0, r) * a.k);
    load_batch<RPW, U>(wrow, lane, a.k / 8, wv);
}

// A running argmax as torch.argmax decides it: NaN is the largest value, ties go to the lower index. The
// order is total, so partial results combine in any order to the same index.
struct ArgBest {
    float v = -INFINITY;
    int i = INT_MAX;
    __device__ __forceinline__ void take(float w, int j) {
        const bool wn = w != w, vn = v != v;
        const bool better = (wn || vn) ? (wn && (!vn || j < i)) : (w > v || (w == v && j < i));
        if (better) {
            v = w;
            i = j;
        }
    }
};

// The end of a warp's row group starting at row0: reduce acc over the warp; lane m writes row m's value
// (+ residual), or with NORM_SILU the (gate j, up j) pair as silu(gate) * up, rounded as pa_silu_mul_cuda
// rounds it, or with kModeNormRope the rotated pair and its KV-cache slots.
// best (plain mode): lane m also folds row m's stored values into its running argmax.
template <typename T, int MR, int RPW>
__device__ __forceinline__ void store_group(const GemvArgs &a, int row0, int lane, const float (&acc)[RPW][MR],
                                            ArgBest *best = nullptr) {
    if (RPW == 2 && a.mode == kModeNormRope) {
        // x1, x2 rounded as the GEMV stores them; q and k rotated as rope_kernel rotates; k and v
        // stored in their slots as rope_kernel stores them
        const int half = a.head_dim / 2, p = row0 / 2, head = p / half, j = p % half;
        const bool valid = p < a.n / 2, is_v = head >= a.num_heads + a.num_kv_heads;
#pragma unroll
        for (int m = 0; m < MR; ++m) {
            const float x1 = round_to<T>(warp_sum(acc[0][m]));
            const float x2 = round_to<T>(warp_sum(acc[RPW - 1][m]));
            if (lane != m || m >= a.rows || !valid) continue;
            float y1 = x1, y2 = x2;
            if (!is_v) {
                const float inv_freq = 1.f / powf(a.theta, (float)(2 * j) / (float)a.head_dim);
                float sn, cn;
                sincosf((float)a.positions[m] * inv_freq, &sn, &cn);
                const float c = round_to<T>(cn), s = round_to<T>(sn);
                y1 = round_to<T>(x1 * c) + round_to<T>(-x2 * s);
                y2 = round_to<T>(x2 * c) + round_to<T>(x1 * s);
            }
            T *o = (T *)a.out + (int64_t)m * a.n + (int64_t)head * a.head_dim;
            o[j] = from_f<T>(y1);
            o[j + half] = from_f<T>(y2);
            const int64_t slot = a.slots[m];
            if (head >= a.num_heads && slot >= 0) {
                const int kv_head = is_v ? head - a.num_heads - a.num_kv_heads : head - a.num_heads;
                T *dst = (T *)(is_v ? a.value_cache : a.key_cache) +
                         (((slot / a.block_size) * a.num_kv_heads + kv_head) * a.block_size + slot % a.block_size) *
                             a.head_dim;
                dst[j] = from_f<T>(y1);
                dst[j + half] = from_f<T>(y2);
            }
        }
        return;
    }
    if (RPW == 2 && a.mode == PA_CUDA_GEMV_NORM_SILU) {
        const int half = a.n / 2, j = row0 / 2;
#pragma unroll
        for (int m = 0; m < MR; ++m) {
            const float g = round_to<T>(warp_sum(acc[0][m]));
            const float u = round_to<T>(warp_sum(acc[RPW - 1][m]));
            if (lane == m && m < a.rows && j < half)
                ((T *)a.out)[(int64_t)m * half + j] = from_f<T>(round_to<T>(g / (1.f + expf(-g))) * u);
        }
        return;
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int n = row0 + r;
#pragma unroll
        for (int m = 0; m < MR; ++m) {
            const float sum = warp_sum(acc[r][m]);
            if (lane == m && m < a.rows && n < a.n) {
                const int64_t idx = (int64_t)m * a.n + n;
                float y = round_to<T>(sum);
                if (a.residual != nullptr) y += to_f(__ldcg((const T *)a.residual + idx));
                ((T *)a.out)[idx] = from_f<T>(y);
                if (best != nullptr) best->take(round_to<T>(y), n);   // the stored value
            }
        }
    }
}

// The rows of groups group, group + stride, ... (8 * RPW rows each) against the staged input xs: wrow
// and wv hold the first group's row pointers and first loads (first_loads), issued by the caller. U: the
// 16-byte loads a lane and row in one batch (two batches in flight). best: as store_group takes it.
template <typename T, int MR, int RPW, int U = kUnroll>
__device__ __forceinline__ void gemv_groups(const GemvArgs &a, const T *xs, int group, int stride,
                                            const uint4 *(&wrow)[RPW], uint4 (&wv)[RPW][U], ArgBest *best = nullptr) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int nv = a.k / 8;
    const int num_groups = (a.n + kWarps * RPW - 1) / (kWarps * RPW);
    const uint4 *xv = reinterpret_cast<const uint4 *>(xs);
    int row0 = (group * kWarps + warp) * RPW;
    int next_row0 = row0;
    for (; group < num_groups; group += stride) {
        row0 = next_row0;                        // wv already holds this group's first loads
        // 2. stream the rows: two batches of U x RPW 16-byte loads in flight per lane
        float acc[RPW][MR];
#pragma unroll
        for (int r = 0; r < RPW; ++r)
#pragma unroll
            for (int m = 0; m < MR; ++m) acc[r][m] = 0.f;
        for (int v0 = lane; v0 < nv; v0 += 32 * U) {
            uint4 nxt[RPW][U];
            load_batch<RPW, U>(wrow, v0 + 32 * U, nv, nxt);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int v = v0 + u * 32;
                if (v >= nv) break;
#pragma unroll
                for (int m = 0; m < MR; ++m) {
                    float xf[8];
                    Vec<T>::to_float(xv[m * nv + v], xf);
#pragma unroll
                    for (int r = 0; r < RPW; ++r) {
                        float wf[8];
                        Vec<T>::to_float(wv[r][u], wf);
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[r][m] = fmaf(wf[e], xf[e], acc[r][m]);
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u)
#pragma unroll
                for (int r = 0; r < RPW; ++r) wv[r][u] = nxt[r][u];
        }
        // 3. the next group's first loads go out now: their DRAM latency hides behind this group's
        //    reduction and epilogue (and the block's later groups start with data in flight)
        if (group + stride < num_groups) {
            next_row0 = ((group + stride) * kWarps + warp) * RPW;
            first_loads<T, RPW, U>(a, next_row0, lane, wrow, wv);
        }
        // 4. reduce over the warp and write the group's outputs
        store_group<T, MR, RPW>(a, row0, lane, acc, best);
    }
}

}  // namespace gemv

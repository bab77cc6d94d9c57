// gemv.cu -- small-batch matrix-vector products for decode steps, with the neighbouring element-wise
// work fused in: RMSNorm of the input (qkv, gate_up, lm_head), SiLU-mul of the input (down), and the
// residual add in the epilogue (o, down). Memory-bound: each weight row is read once, 16 bytes a lane.
//
// One block (8 warps) per 8 * RPW output rows. The block first stages its input rows (after the
// prologue transform) in shared memory as T, rounded exactly as pa_rms_norm_cuda / pa_silu_mul_cuda
// round them; then each warp streams RPW weight rows and accumulates MR dot products in float.
#include "common.cuh"

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 4;   // 16-byte weight loads per lane and row in a batch (two batches in flight)

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

// Programmatic dependent launch (sm_90): with pdl set, the next kernel of the stream (when it too is a
// PDL launch) may start as soon as every block of this one has started; it prefetches its weights,
// which no kernel writes, and waits for this grid's completion before it reads anything else.
// Without the launch attribute both instructions are no-ops.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

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
                Vec<T>::to_float(row[v], g);
                Vec<T>::to_float(row[v + nv], u);
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
        if (m < a.rows) raw = reinterpret_cast<const uint4 *>(x + (int64_t)m * a.k)[v];
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

// The weight rows of a warp's group starting at row0 (wrow) and their first kUnroll 16-byte loads (wv).
template <typename T, int RPW>
__device__ __forceinline__ void first_loads(const GemvArgs &a, int row0, int lane, const uint4 *(&wrow)[RPW],
                                            uint4 (&wv)[RPW][kUnroll]) {
    const int nv = a.k / 8;
#pragma unroll
    for (int r = 0; r < RPW; ++r)
        wrow[r] = reinterpret_cast<const uint4 *>((const T *)a.weight + (int64_t)weight_row(a, row0, r) * a.k);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
            const int v = lane + u * 32;
            wv[r][u] = v < nv ? __ldg(wrow[r] + v) : make_uint4(0, 0, 0, 0);
        }
}

// A grid-stride loop over groups of 8 * RPW rows: the prologue (staging the transformed input) is
// paid once per block, however many rows the block then streams.
template <typename T, int MR, int RPW>
__global__ void __launch_bounds__(kThreads) gemv_kernel(GemvArgs a) {
    extern __shared__ __align__(16) unsigned char gemv_smem[];
    T *xs = reinterpret_cast<T *>(gemv_smem);                              // [MR][k]
    float *scratch = reinterpret_cast<float *>(gemv_smem + (size_t)MR * a.k * sizeof(T));  // [8][MR]
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int nv = a.k / 8;
    const int num_groups = (a.n + kWarps * RPW - 1) / (kWarps * RPW);
    const uint4 *xv = reinterpret_cast<const uint4 *>(xs);
    pdl_trigger();

    // 1. the first weight loads go out before the input is staged (they do not depend on it), and
    //    before the wait for the previous kernel (PDL launches only)
    int group = blockIdx.x;
    int row0 = (group * kWarps + warp) * RPW;
    const uint4 *wrow[RPW];
    uint4 wv[RPW][kUnroll];
    first_loads<T, RPW>(a, row0, lane, wrow, wv);
    pdl_wait();
    stage_input<T, MR>(a, xs, scratch);
    __syncthreads();

    int next_row0 = row0;
    for (; group < num_groups; group += gridDim.x) {
        row0 = next_row0;                        // wv already holds this group's first loads
        // 2. stream the rows: two batches of kUnroll x RPW 16-byte loads in flight per lane
        float acc[RPW][MR];
#pragma unroll
        for (int r = 0; r < RPW; ++r)
#pragma unroll
            for (int m = 0; m < MR; ++m) acc[r][m] = 0.f;
        for (int v0 = lane; v0 < nv; v0 += 32 * kUnroll) {
            uint4 nxt[RPW][kUnroll];
            const int vn = v0 + 32 * kUnroll;
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
#pragma unroll
                for (int r = 0; r < RPW; ++r) {
                    const int v = vn + u * 32;
                    nxt[r][u] = v < nv ? __ldg(wrow[r] + v) : make_uint4(0, 0, 0, 0);
                }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
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
            for (int u = 0; u < kUnroll; ++u)
#pragma unroll
                for (int r = 0; r < RPW; ++r) wv[r][u] = nxt[r][u];
        }
        // 3. the next group's first loads go out now: their DRAM latency hides behind this group's
        //    reduction and epilogue (and the block's later groups start with data in flight)
        if (group + (int)gridDim.x < num_groups) {
            next_row0 = ((group + gridDim.x) * kWarps + warp) * RPW;
            first_loads<T, RPW>(a, next_row0, lane, wrow, wv);
        }
        // 4. reduce over the warp; lane m writes row m's value (+ residual), or with NORM_SILU the
        //    warp's (gate j, up j) pair as silu(gate) * up, rounded as pa_silu_mul_cuda rounds it
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
            continue;
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
            continue;
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
                    if (a.residual != nullptr) y += to_f(((const T *)a.residual)[idx]);
                    ((T *)a.out)[idx] = from_f<T>(y);
                }
            }
        }
    }
}

template <typename T, int MR, int RPW>
pa_status launch_gemv_cfg(const GemvArgs &a, size_t smem, int num_sms, bool pdl, cudaStream_t stream) {
    PA_RETURN_IF_ERR((raise_smem_limit<gemv_kernel<T, MR, RPW>>("gemv_kernel")));
    const int groups = (a.n + kWarps * RPW - 1) / (kWarps * RPW);
    // Blocks an SM while the input is small: four for the one-row-a-warp kernels (<= 64 registers:
    // all four fit, so a 3072-row GEMV streams in one round instead of two), else two.
    const int per_sm = smem > 48 * 1024 ? 1 : (RPW == 1 && MR <= 4 ? 4 : 2);
    const int blocks = groups < per_sm * num_sms ? groups : per_sm * num_sms;
    if (!pdl) {
        gemv_kernel<T, MR, RPW><<<blocks, kThreads, smem, stream>>>(a);
        return check_launch("gemv_kernel");
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr_pdl[1];
    attr_pdl[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr_pdl[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr_pdl;
    cfg.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, gemv_kernel<T, MR, RPW>, a);
    if (err != cudaSuccess)
        return cuda_fail(PA_ERR_CUDA, "gemv_kernel (PDL launch): %s", cudaGetErrorString(err));
    return check_launch("gemv_kernel");
}

template <typename T, int MR>
pa_status launch_gemv(const GemvArgs &a, int num_sms, bool pdl, cudaStream_t stream) {
    const size_t smem = (size_t)MR * a.k * sizeof(T) + kWarps * MR * sizeof(float);
    if (smem > 200 * 1024)
        return cuda_fail(PA_ERR_UNSUPPORTED, "gemv_kernel: %d rows of k=%d need %zu bytes of shared memory", a.rows,
                         a.k, smem);
    // Two rows a warp for tall matrices (more loads in flight), one for the rest; NORM_SILU always
    // takes two (the gate and up rows of one output).
    if (a.mode == PA_CUDA_GEMV_NORM_SILU || a.mode == kModeNormRope || a.n >= 32 * num_sms)
        return launch_gemv_cfg<T, MR, 2>(a, smem, num_sms, pdl, stream);
    return launch_gemv_cfg<T, MR, 1>(a, smem, num_sms, pdl, stream);
}

// The shared tail of both exports: the row limit, the SM count, the dtype and row-count dispatch.
pa_status run_gemv(const char *name, const GemvArgs &a, int32_t pdl, int32_t dtype, void *stream) {
    if (a.rows > 8) return cuda_fail(PA_ERR_UNSUPPORTED, "%s: %d rows (at most 8: use a GEMM)", name, a.rows);
    if (a.rows == 0) return PA_OK;
    int device = 0, num_sms = 132;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
    cudaStream_t st = (cudaStream_t)stream;
    return dispatch_dtype(dtype, name, [&](auto tag) {
        using T = decltype(tag);
        if (a.rows == 1) return launch_gemv<T, 1>(a, num_sms, pdl != 0, st);
        if (a.rows == 2) return launch_gemv<T, 2>(a, num_sms, pdl != 0, st);
        if (a.rows <= 4) return launch_gemv<T, 4>(a, num_sms, pdl != 0, st);
        return launch_gemv<T, 8>(a, num_sms, pdl != 0, st);
    });
}

}  // namespace

extern "C" pa_status pa_gemv_cuda(void *out, const void *x, const void *weight, const void *norm_weight,
                                  const void *residual, int32_t num_rows, int32_t n, int32_t k, int32_t mode,
                                  float eps, int32_t pdl, int32_t dtype, void *stream) {
    const char *name = "gemv_kernel";
    if (out == nullptr || x == nullptr || weight == nullptr || num_rows < 0 || n <= 0 || k <= 0 || k % 8)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: bad arguments (k %d must be a positive multiple of 8)", name, (int)k);
    if (mode != PA_CUDA_GEMV_PLAIN && mode != PA_CUDA_GEMV_NORM && mode != PA_CUDA_GEMV_SILU &&
        mode != PA_CUDA_GEMV_NORM_SILU)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: unknown mode %d", name, (int)mode);
    if ((mode == PA_CUDA_GEMV_NORM || mode == PA_CUDA_GEMV_NORM_SILU) && norm_weight == nullptr)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: mode %d needs norm_weight", name, (int)mode);
    if (mode == PA_CUDA_GEMV_NORM_SILU && (n % 2 || residual != nullptr))
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: PA_CUDA_GEMV_NORM_SILU needs an even n and no residual", name);
    return run_gemv(name, GemvArgs{out, x, weight, norm_weight, residual, num_rows, n, k, mode, eps}, pdl, dtype,
                    stream);
}

extern "C" pa_status pa_gemv_rope_cuda(void *out, const void *x, const void *weight, const void *norm_weight,
                                       const int32_t *positions, const int32_t *slot_mapping, void *key_cache,
                                       void *value_cache, int32_t num_rows, int32_t k, int32_t num_heads,
                                       int32_t num_kv_heads, int32_t head_dim, int32_t block_size, float eps,
                                       float theta, int32_t pdl, int32_t dtype, void *stream) {
    const char *name = "gemv_kernel (RoPE epilogue)";
    if (out == nullptr || x == nullptr || weight == nullptr || norm_weight == nullptr || positions == nullptr ||
        slot_mapping == nullptr || key_cache == nullptr || value_cache == nullptr || num_rows < 0 || k <= 0 ||
        k % 8 || num_heads <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads || head_dim <= 0 ||
        head_dim % 2 || block_size <= 0 || !(theta > 0.f))
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: bad arguments", name);
    GemvArgs a{out, x, weight, norm_weight, nullptr, num_rows, (num_heads + 2 * num_kv_heads) * head_dim, k,
               kModeNormRope, eps};
    a.positions = positions;
    a.slots = slot_mapping;
    a.key_cache = key_cache;
    a.value_cache = value_cache;
    a.num_heads = num_heads;
    a.num_kv_heads = num_kv_heads;
    a.head_dim = head_dim;
    a.block_size = block_size;
    a.theta = theta;
    return run_gemv(name, a, pdl, dtype, stream);
}

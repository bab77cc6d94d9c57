// gemv.cu -- small-batch matrix-vector products for decode steps, with the neighbouring element-wise
// work fused in: RMSNorm of the input (qkv, gate_up, lm_head), SiLU-mul of the input (down), and the
// residual add in the epilogue (o, down). Memory-bound: each weight row is read once, 16 bytes a lane.
//
// One block (8 warps) per 8 * RPW output rows. The block first stages its input rows (after the
// prologue transform) in shared memory as T, rounded exactly as pa_rms_norm_cuda / pa_silu_mul_cuda
// round them; then each warp streams RPW weight rows and accumulates MR dot products in float.
#include "gemv_core.cuh"

namespace {

using namespace gemv;

// The argmax epilogue of PA_CUDA_GEMV_ARGMAX (pa_gemv_argmax_cuda): where each block leaves its rows'
// best and how the last block to finish finds the tokens.
struct ArgmaxArgs {
    int32_t *tokens = nullptr;      // [rows]
    float *part_v = nullptr;        // [blocks][MR]
    int32_t *part_i = nullptr;      // [blocks][MR]
    int32_t *arrivals = nullptr;    // one counter, zero between launches
    int capacity = 0;               // entries of part_v and of part_i
};

// Lane m of every warp holds its rows' best of row m (best): the block's best per row goes to the
// partials; the last block to arrive reduces every block's partials into tokens[m].
template <int MR>
__device__ void argmax_epilogue(const GemvArgs &a, const ArgmaxArgs &g, const ArgBest &best) {
    __shared__ float sv[kWarps][MR];
    __shared__ int si[kWarps][MR];
    __shared__ bool last;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane < MR) {
        sv[warp][lane] = best.v;
        si[warp][lane] = best.i;
    }
    __syncthreads();
    if (threadIdx.x < MR) {
        ArgBest b;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) b.take(sv[w][threadIdx.x], si[w][threadIdx.x]);
        g.part_v[blockIdx.x * MR + threadIdx.x] = b.v;
        g.part_i[blockIdx.x * MR + threadIdx.x] = b.i;
    }
    __syncthreads();
    if (threadIdx.x == 0) last = last_arrival(g.arrivals, gridDim.x);
    __syncthreads();
    if (!last) return;
    // the last block (last_arrival's acquire, passed on by the barrier, orders the partials before these
    // loads): every thread takes its share of the partials of all rows (loads all in flight), then warps
    // reduce and warp 0 merges the warps' results
    ArgBest b[MR];
    for (int j = threadIdx.x; j < (int)gridDim.x; j += kThreads)
#pragma unroll
        for (int m = 0; m < MR; ++m) b[m].take(__ldcg(g.part_v + j * MR + m), __ldcg(g.part_i + j * MR + m));
#pragma unroll
    for (int m = 0; m < MR; ++m) {
#pragma unroll
        for (int off = 16; off > 0; off /= 2) {
            const float v = __shfl_xor_sync(0xffffffffu, b[m].v, off);
            const int i = __shfl_xor_sync(0xffffffffu, b[m].i, off);
            b[m].take(v, i);
        }
    }
    __syncthreads();                       // sv / si are free again
    if (lane == 0)
#pragma unroll
        for (int m = 0; m < MR; ++m) {
            sv[warp][m] = b[m].v;
            si[warp][m] = b[m].i;
        }
    __syncthreads();
    if (threadIdx.x < MR && threadIdx.x < a.rows) {
        ArgBest t;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) t.take(sv[w][threadIdx.x], si[w][threadIdx.x]);
        g.tokens[threadIdx.x] = t.i;
    }
}

// A grid-stride loop over groups of 8 * RPW rows: the prologue (staging the transformed input) is
// paid once per block, however many rows the block then streams. U: loads a lane and row in a batch;
// ARGMAX: also the argmax of every row's outputs (argmax_epilogue).
// At most 128 registers a thread: two blocks an SM always fit (gemv_per_sm).
template <typename T, int MR, int RPW, int U, bool ARGMAX>
__global__ void __launch_bounds__(kThreads, 2) gemv_kernel(GemvArgs a, ArgmaxArgs g) {
    extern __shared__ __align__(16) unsigned char gemv_smem[];
    T *xs = reinterpret_cast<T *>(gemv_smem);                              // [MR][k]
    float *scratch = reinterpret_cast<float *>(gemv_smem + (size_t)MR * a.k * sizeof(T));  // [8][MR]
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    pdl_trigger();
    // the first weight loads go out before the input is staged (they do not depend on it), and
    // before the wait for the previous kernel (PDL launches only)
    const uint4 *wrow[RPW];
    uint4 wv[RPW][U];
    first_loads<T, RPW, U>(a, (blockIdx.x * kWarps + warp) * RPW, lane, wrow, wv);
    pdl_wait();
    stage_input<T, MR>(a, xs, scratch);
    __syncthreads();
    ArgBest best;
    gemv_groups<T, MR, RPW, U>(a, xs, blockIdx.x, gridDim.x, wrow, wv, ARGMAX ? &best : nullptr);
    if constexpr (ARGMAX) argmax_epilogue<MR>(a, g, best);
}

// The grid: groups of 8 * RPW rows over at most per_sm blocks an SM.
template <int RPW>
int gemv_blocks(int n, int per_sm, int num_sms) {
    const int groups = (n + kWarps * RPW - 1) / (kWarps * RPW);
    return groups < per_sm * num_sms ? groups : per_sm * num_sms;
}

template <typename T, int MR, int RPW, int U, bool ARGMAX>
pa_status launch_gemv_cfg(const GemvArgs &a, const ArgmaxArgs &g, size_t smem, int blocks, bool pdl,
                          cudaStream_t stream) {
    auto kernel = gemv_kernel<T, MR, RPW, U, ARGMAX>;
    PA_RETURN_IF_ERR((raise_smem_limit<gemv_kernel<T, MR, RPW, U, ARGMAX>>("gemv_kernel")));
    if (!pdl) {
        kernel<<<blocks, kThreads, smem, stream>>>(a, g);
        return check_launch("gemv_kernel");
    }
    return launch_with_attribute(kernel, "gemv_kernel (PDL)", dim3(blocks), smem, kThreads, stream, pdl_attribute(),
                                 a, g);
}

// Blocks an SM while the input is small: four for the one-row-a-warp kernels (<= 64 registers: all four
// fit, so a 3072-row GEMV streams in one round instead of two), else two; PA_CUDA_GEMV_DEEP's one-row
// kernel (8 loads a lane in a batch, ~100 registers) two.
inline int gemv_per_sm(size_t smem, int rpw, int mr, bool deep) {
    if (smem > 48 * 1024) return 1;
    return rpw == 1 && mr <= 4 && !deep ? 4 : 2;
}

// Two rows a warp for tall matrices (more loads in flight), one for the rest; NORM_SILU and the RoPE
// epilogue always take two (the gate and up rows of one output, the two rows of a rotation pair).
inline bool gemv_two_rows(const GemvArgs &a, int num_sms) {
    return a.mode == PA_CUDA_GEMV_NORM_SILU || a.mode == kModeNormRope || a.n >= 32 * num_sms;
}

template <typename T, int MR, bool ARGMAX>
pa_status launch_gemv(const GemvArgs &a, const ArgmaxArgs &g, int num_sms, int32_t flags, cudaStream_t stream) {
    const bool pdl = flags & PA_CUDA_GEMV_PDL, deep = flags & PA_CUDA_GEMV_DEEP;
    const bool two = gemv_two_rows(a, num_sms);
    const size_t smem = (size_t)MR * a.k * sizeof(T) + kWarps * MR * sizeof(float);
    if (smem > 200 * 1024)
        return cuda_fail(PA_ERR_UNSUPPORTED, "gemv_kernel: %d rows of k=%d need %zu bytes of shared memory", a.rows,
                         a.k, smem);
    const int per_sm = gemv_per_sm(smem, two ? 2 : 1, MR, deep);
    const int blocks = two ? gemv_blocks<2>(a.n, per_sm, num_sms) : gemv_blocks<1>(a.n, per_sm, num_sms);
    if (ARGMAX && (int64_t)blocks * MR > g.capacity)   // every block leaves MR partials
        return cuda_fail(PA_ERR_INVALID_ARG, "gemv_kernel (argmax): %d blocks x %d rows of partials, capacity %d",
                         blocks, MR, g.capacity);
    if (two) return launch_gemv_cfg<T, MR, 2, kUnroll, ARGMAX>(a, g, smem, blocks, pdl, stream);
    if (deep) return launch_gemv_cfg<T, MR, 1, kUnrollDeep, ARGMAX>(a, g, smem, blocks, pdl, stream);
    return launch_gemv_cfg<T, MR, 1, kUnroll, ARGMAX>(a, g, smem, blocks, pdl, stream);
}

// The shared tail of the exports: the flags, the row limit, the SM count, the dtype and row-count dispatch.
template <bool ARGMAX = false>
pa_status run_gemv(const char *name, const GemvArgs &a, int32_t flags, int32_t dtype, void *stream,
                   const ArgmaxArgs &g = ArgmaxArgs{}) {
    if (flags & ~(PA_CUDA_GEMV_PDL | PA_CUDA_GEMV_DEEP))
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: unknown flags 0x%x", name, (unsigned)flags);
    if (a.rows > 8) return cuda_fail(PA_ERR_UNSUPPORTED, "%s: %d rows (at most 8: use a GEMM)", name, a.rows);
    if (a.rows == 0) return PA_OK;
    const int num_sms = device_sms();
    cudaStream_t st = (cudaStream_t)stream;
    return dispatch_dtype(dtype, name, [&](auto tag) {
        using T = decltype(tag);
        if (a.rows == 1) return launch_gemv<T, 1, ARGMAX>(a, g, num_sms, flags, st);
        if (a.rows == 2) return launch_gemv<T, 2, ARGMAX>(a, g, num_sms, flags, st);
        if (a.rows <= 4) return launch_gemv<T, 4, ARGMAX>(a, g, num_sms, flags, st);
        return launch_gemv<T, 8, ARGMAX>(a, g, num_sms, flags, st);
    });
}

}  // namespace

extern "C" pa_status pa_gemv_cuda(void *out, const void *x, const void *weight, const void *norm_weight,
                                  const void *residual, int32_t num_rows, int32_t n, int32_t k, int32_t mode,
                                  float eps, int32_t flags, int32_t dtype, void *stream) {
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
    return run_gemv(name, GemvArgs{out, x, weight, norm_weight, residual, num_rows, n, k, mode, eps}, flags, dtype,
                    stream);
}

extern "C" pa_status pa_gemv_argmax_cuda(void *out, int32_t *tokens, float *part_values, int32_t *part_indices,
                                         int32_t *arrivals, int32_t part_capacity, const void *x, const void *weight,
                                         const void *norm_weight, int32_t num_rows, int32_t n, int32_t k, int32_t mode,
                                         float eps, int32_t flags, int32_t dtype, void *stream) {
    const char *name = "gemv_kernel (argmax)";
    if (out == nullptr || tokens == nullptr || part_values == nullptr || part_indices == nullptr ||
        arrivals == nullptr || x == nullptr || weight == nullptr || num_rows < 0 || n <= 0 || k <= 0 || k % 8)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: bad arguments (k %d must be a positive multiple of 8)", name, (int)k);
    if (mode != PA_CUDA_GEMV_PLAIN && mode != PA_CUDA_GEMV_NORM)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: mode %d (PA_CUDA_GEMV_PLAIN or PA_CUDA_GEMV_NORM only)", name,
                         (int)mode);
    if (mode == PA_CUDA_GEMV_NORM && norm_weight == nullptr)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: mode %d needs norm_weight", name, (int)mode);
    ArgmaxArgs g;
    g.tokens = tokens;
    g.part_v = part_values;
    g.part_i = part_indices;
    g.arrivals = arrivals;
    g.capacity = part_capacity;     // launch_gemv checks the grid it picks against it
    return run_gemv<true>(name, GemvArgs{out, x, weight, norm_weight, nullptr, num_rows, n, k, mode, eps}, flags,
                          dtype, stream, g);
}

extern "C" pa_status pa_gemv_rope_cuda(void *out, const void *x, const void *weight, const void *norm_weight,
                                       const int32_t *positions, const int32_t *slot_mapping, void *key_cache,
                                       void *value_cache, int32_t num_rows, int32_t k, int32_t num_heads,
                                       int32_t num_kv_heads, int32_t head_dim, int32_t block_size, float eps,
                                       float theta, int32_t flags, int32_t dtype, void *stream) {
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
    return run_gemv(name, a, flags, dtype, stream);
}

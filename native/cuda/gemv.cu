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

// A grid-stride loop over groups of 8 * RPW rows: the prologue (staging the transformed input) is
// paid once per block, however many rows the block then streams.
template <typename T, int MR, int RPW>
__global__ void __launch_bounds__(kThreads) gemv_kernel(GemvArgs a) {
    extern __shared__ __align__(16) unsigned char gemv_smem[];
    T *xs = reinterpret_cast<T *>(gemv_smem);                              // [MR][k]
    float *scratch = reinterpret_cast<float *>(gemv_smem + (size_t)MR * a.k * sizeof(T));  // [8][MR]
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    pdl_trigger();
    // the first weight loads go out before the input is staged (they do not depend on it), and
    // before the wait for the previous kernel (PDL launches only)
    const uint4 *wrow[RPW];
    uint4 wv[RPW][kUnroll];
    first_loads<T, RPW>(a, (blockIdx.x * kWarps + warp) * RPW, lane, wrow, wv);
    pdl_wait();
    stage_input<T, MR>(a, xs, scratch);
    __syncthreads();
    gemv_groups<T, MR, RPW>(a, xs, blockIdx.x, gridDim.x, wrow, wv);
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
    return launch_with_attribute(gemv_kernel<T, MR, RPW>, "gemv_kernel (PDL)", dim3(blocks), smem, kThreads, stream,
                                 pdl_attribute(), a);
}

template <typename T, int MR>
pa_status launch_gemv(const GemvArgs &a, int num_sms, int32_t flags, cudaStream_t stream) {
    const bool pdl = flags & PA_CUDA_GEMV_PDL;
    const bool two = a.mode == PA_CUDA_GEMV_NORM_SILU || a.mode == kModeNormRope || a.n >= 32 * num_sms;
    const size_t smem = (size_t)MR * a.k * sizeof(T) + kWarps * MR * sizeof(float);
    if (smem > 200 * 1024)
        return cuda_fail(PA_ERR_UNSUPPORTED, "gemv_kernel: %d rows of k=%d need %zu bytes of shared memory", a.rows,
                         a.k, smem);
    // Two rows a warp for tall matrices (more loads in flight), one for the rest; NORM_SILU always
    // takes two (the gate and up rows of one output).
    if (two) return launch_gemv_cfg<T, MR, 2>(a, smem, num_sms, pdl, stream);
    return launch_gemv_cfg<T, MR, 1>(a, smem, num_sms, pdl, stream);
}

// The shared tail of both exports: the flags, the row limit, the SM count, the dtype and row-count dispatch.
pa_status run_gemv(const char *name, const GemvArgs &a, int32_t flags, int32_t dtype, void *stream) {
    if (flags & ~PA_CUDA_GEMV_PDL)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: unknown flags 0x%x", name, (unsigned)flags);
    if (a.rows > 8) return cuda_fail(PA_ERR_UNSUPPORTED, "%s: %d rows (at most 8: use a GEMM)", name, a.rows);
    if (a.rows == 0) return PA_OK;
    int device = 0, num_sms = 132;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
    cudaStream_t st = (cudaStream_t)stream;
    return dispatch_dtype(dtype, name, [&](auto tag) {
        using T = decltype(tag);
        if (a.rows == 1) return launch_gemv<T, 1>(a, num_sms, flags, st);
        if (a.rows == 2) return launch_gemv<T, 2>(a, num_sms, flags, st);
        if (a.rows <= 4) return launch_gemv<T, 4>(a, num_sms, flags, st);
        return launch_gemv<T, 8>(a, num_sms, flags, st);
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

// common.cuh -- shared helpers of the CUDA kernels: dtypes, 16-byte vectors, errors, reductions.
// Everything here is header-only and internal; the exports live in the .cu files (see pa.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "pa.h"

// ---- errors ---------------------------------------------------------------------------------
// Sets the thread-local message that pa_last_error_cuda() returns and gives back `status`.
__attribute__((visibility("hidden"))) pa_status cuda_fail(pa_status status, const char *fmt, ...);

// After a launch: turn a pending CUDA error into PA_ERR_CUDA with the kernel's name.
static inline pa_status check_launch(const char *kernel) {
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        return cuda_fail(PA_ERR_CUDA, "%s: %s (%s)", kernel, cudaGetErrorString(err), cudaGetErrorName(err));
    return PA_OK;
}

#define PA_RETURN_IF_ERR(expr)              \
    do {                                    \
        pa_status st_ = (expr);             \
        if (st_ != PA_OK) return st_;       \
    } while (0)

// Set a kernel's dynamic shared-memory limit to 200 KiB, once per kernel (the first launch of each
// instantiation); a failure is PA_ERR_CUDA naming the kernel.
template <auto Kernel>
pa_status raise_smem_limit(const char *kernel) {
    static const cudaError_t attr =
        cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    if (attr != cudaSuccess)
        return cuda_fail(PA_ERR_CUDA, "%s: cudaFuncSetAttribute: %s", kernel, cudaGetErrorString(attr));
    return PA_OK;
}

// Programmatic dependent launch (sm_90): a kernel launched with pdl_attribute() may start once every
// block of the kernel before it has called pdl_trigger() (or exited); it must call pdl_wait() -- which
// returns when that kernel has completed and its memory is visible -- before it reads anything that
// kernel writes or writes anything it reads. Without the launch attribute both are no-ops.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

// One thread of a block whose stores precede this call (program order, or a barrier): count its arrival
// at cnt with an acq_rel atomic at device scope -- the release publishes those stores, the acquire (in
// the n-th arrival, which returns true) makes every earlier arrival's visible to what follows it, in
// the block too once a barrier passes it on. The n-th also zeroes the count for the next launch.
__device__ __forceinline__ bool last_arrival(int32_t *cnt, int n) {
    int old;
    asm volatile("atom.add.acq_rel.gpu.s32 %0, [%1], 1;\n" : "=r"(old) : "l"(cnt) : "memory");
    const bool last = old == n - 1;
    if (last) atomicExch(cnt, 0);
    return last;
}

// The current device's SM count (132 when it cannot be read), which the launchers size their grids by.
static inline int device_sms() {
    int device = 0, num_sms = 132;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
    return num_sms;
}

// The attribute of a programmatic dependent launch (PDL, sm_90).
static inline cudaLaunchAttribute pdl_attribute() {
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    return attr;
}

// cudaLaunchKernelEx with one launch attribute (PDL, cooperative); a failure is PA_ERR_CUDA naming the kernel.
template <typename Kernel, typename... Args>
pa_status launch_with_attribute(Kernel kernel, const char *name, dim3 grid, size_t smem, int threads,
                                cudaStream_t stream, cudaLaunchAttribute attr, const Args &...args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args...);
    if (err != cudaSuccess) return cuda_fail(PA_ERR_CUDA, "%s (launch): %s", name, cudaGetErrorString(err));
    return check_launch(name);
}

// ---- paged attention arguments ----------------------------------------------------------------
static constexpr float kLog2e = 1.4426950408889634f;   // the kernels take exp2 of log2(e)-scaled scores

// What every paged attention kernel (decode, tensor-core decode, prefill) reads; each extends it.
struct PagedArgs {
    void *out;
    const void *q, *key_cache, *value_cache;
    const int32_t *block_tables, *context_lens, *query_start_loc;
    int num_heads, num_kv_heads, group, bs_log2, max_blocks;
    int64_t q_stride;
    float scale_log2e;
};

// The head_dim and block_size every paged kernel takes; on success bs_log2 = log2(block_size).
static inline pa_status check_paged_shape(const char *name, int32_t head_dim, int32_t block_size, int &bs_log2) {
    if (head_dim != 64 && head_dim != 128)
        return cuda_fail(PA_ERR_UNSUPPORTED, "%s: head_dim %d (supported: 64, 128)", name, (int)head_dim);
    if (block_size <= 0 || (block_size & (block_size - 1)))
        return cuda_fail(PA_ERR_UNSUPPORTED, "%s: block_size %d is not a power of two", name, (int)block_size);
    bs_log2 = 0;
    while ((1 << bs_log2) < block_size) ++bs_log2;
    return PA_OK;
}

// The checks the paged attention exports share, then a's common fields (scale in natural-log units).
static inline pa_status fill_paged_args(PagedArgs &a, const char *name, void *out, const void *q,
                                        const void *key_cache, const void *value_cache,
                                        const int32_t *block_tables, const int32_t *context_lens,
                                        const int32_t *query_start_loc, int32_t num_seqs, int32_t num_heads,
                                        int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
                                        int32_t max_blocks_per_seq, int64_t q_stride, float scale) {
    if (out == nullptr || q == nullptr || key_cache == nullptr || value_cache == nullptr || block_tables == nullptr ||
        context_lens == nullptr || query_start_loc == nullptr || num_seqs < 0 || num_heads <= 0 ||
        num_kv_heads <= 0 || num_heads % num_kv_heads || max_blocks_per_seq <= 0)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: bad arguments", name);
    PA_RETURN_IF_ERR(check_paged_shape(name, head_dim, block_size, a.bs_log2));
    if (num_seqs > 65535)
        return cuda_fail(PA_ERR_UNSUPPORTED, "%s: %d sequences exceed the grid (65535)", name, (int)num_seqs);
    a.out = out;
    a.q = q;
    a.key_cache = key_cache;
    a.value_cache = value_cache;
    a.block_tables = block_tables;
    a.context_lens = context_lens;
    a.query_start_loc = query_start_loc;
    a.num_heads = num_heads;
    a.num_kv_heads = num_kv_heads;
    a.group = num_heads / num_kv_heads;
    a.max_blocks = max_blocks_per_seq;
    a.q_stride = q_stride;
    a.scale_log2e = scale * kLog2e;
    return PA_OK;
}

// What both prefill kernels (CUDA cores, tensor cores) take: query tokens a block besides PagedArgs.
struct PrefillArgs : PagedArgs {
    int tile_tokens;
    // Split keys (prefill_attention_tc.cu): 0, or keys a split (a multiple of the key tile); rows at position
    // >= split_keys leave (unnormalised O, max, sum) per split in partial_out [T, num_heads, max_splits, D] /
    // partial_ml [T, num_heads, max_splits, 2] for the merge.
    int split_keys, max_splits;
    float *partial_out, *partial_ml;
};

// The prefill exports' own checks after fill_paged_args: max_query_len, and at most max_group query heads
// per kv head (the rows one block holds for a single token).
static inline pa_status check_prefill(const char *name, const PagedArgs &a, int32_t max_query_len, int max_group) {
    if (max_query_len < 0)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: bad arguments (max_query_len %d)", name, (int)max_query_len);
    if (a.group > max_group)
        return cuda_fail(PA_ERR_UNSUPPORTED, "%s: %d query heads per kv head (at most %d)", name, a.group, max_group);
    return PA_OK;
}

// ---- element types --------------------------------------------------------------------------
// 8 elements of a 16-bit type in one 16-byte vector.
template <typename T> struct Vec;
template <> struct Vec<__nv_bfloat16> {
    static __device__ __forceinline__ void to_float(const uint4 &v, float (&f)[8]) {
        const __nv_bfloat162 *p = reinterpret_cast<const __nv_bfloat162 *>(&v);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float2 t = __bfloat1622float2(p[i]);
            f[2 * i] = t.x;
            f[2 * i + 1] = t.y;
        }
    }
    static __device__ __forceinline__ uint4 from_float(const float (&f)[8]) {
        uint4 v;
        __nv_bfloat162 *p = reinterpret_cast<__nv_bfloat162 *>(&v);
#pragma unroll
        for (int i = 0; i < 4; ++i) p[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
        return v;
    }
};
template <> struct Vec<__half> {
    static __device__ __forceinline__ void to_float(const uint4 &v, float (&f)[8]) {
        const __half2 *p = reinterpret_cast<const __half2 *>(&v);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float2 t = __half22float2(p[i]);
            f[2 * i] = t.x;
            f[2 * i + 1] = t.y;
        }
    }
    static __device__ __forceinline__ uint4 from_float(const float (&f)[8]) {
        uint4 v;
        __half2 *p = reinterpret_cast<__half2 *>(&v);
#pragma unroll
        for (int i = 0; i < 4; ++i) p[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
        return v;
    }
};

// Scalar conversions and "round through T" (what torch does when an op's result is stored as T).
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_f(from_f<T>(x)); }

// ---- reductions -----------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- dispatch -------------------------------------------------------------------------------
// Calls body.template operator()<T>() with T the element type named by a PA_CUDA_DTYPE_* code.
template <typename F> static inline pa_status dispatch_dtype(int32_t dtype, const char *op, F &&body) {
    if (dtype == PA_CUDA_DTYPE_BF16) return body(__nv_bfloat16(0.0f));
    if (dtype == PA_CUDA_DTYPE_F16) return body(__half(0.0f));
    return cuda_fail(PA_ERR_INVALID_ARG, "%s: unknown dtype code %d", op, (int)dtype);
}


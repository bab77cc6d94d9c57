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

static constexpr float kLog2e = 1.4426950408889634f;

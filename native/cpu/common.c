/*
 * common.c -- ABI version, the thread-local last error, and the CPU feature check.
 */
#include <stdarg.h>
#include <stdio.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "cpu_common.h"

/* ================================================================================================
 * Errors: one message per thread, overwritten by the next failure on that thread.
 * ============================================================================================== */
static _Thread_local char last_error[512];

HIDDEN pa_status cpu_fail(pa_status status, const char *kernel, const char *fmt, ...) {
    int n = snprintf(last_error, sizeof last_error, "%s: ", kernel);
    if (n < 0 || n >= (int)sizeof last_error) n = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error + n, sizeof last_error - (size_t)n, fmt, ap);
    va_end(ap);
    return status;
}

int32_t pa_abi_version_cpu(void) { return PA_ABI_VERSION; }

const char *pa_last_error_cpu(void) { return last_error; }

/* ================================================================================================
 * Feature check: the library is compiled for AVX2 + FMA + F16C; the engine asks before any kernel.
 * ============================================================================================== */
int32_t pa_supported_cpu(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

int32_t pa_num_threads_cpu(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// common.cu -- the ABI version and the thread-local error text of the CUDA library.
#include <stdarg.h>
#include <stdio.h>

#include "common.cuh"

// One message per calling thread: pa_last_error_cuda() must not race between engine threads.
static thread_local char last_error[512] = "";

pa_status cuda_fail(pa_status status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, args);
    va_end(args);
    return status;
}

extern "C" int32_t pa_abi_version_cuda(void) { return PA_ABI_VERSION; }

extern "C" const char *pa_last_error_cuda(void) { return last_error; }

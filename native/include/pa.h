/*
 * pa.h -- the one C ABI of pagedecode's native kernels.
 *
 * Every export is named pa_<op>_<backend> and takes outputs, then inputs, then sizes.
 * Every export returns a pa_status (0 = ok); engine/native.py raises NativeError otherwise.
 * The block between PA_CDEF_BEGIN and PA_CDEF_END is handed verbatim to cffi's cdef():
 * keep it to plain C declarations and integer #defines (no macros with arguments, no
 * #include, no attributes). Change anything in it -> bump PA_ABI_VERSION.
 *
 * KV cache layout (one for every backend, so one test tensor feeds all three):
 *   key_cache, value_cache per layer: [num_blocks, num_kv_heads, block_size, head_dim]
 *   a token's slot is block_id * block_size + offset_in_block (slot_mapping, int32; -1 = skip).
 *   INT8 pools add a float scale per (block, kv head): k_scales, v_scales [num_blocks, num_kv_heads];
 *   value = int8 * scale. A write whose absmax exceeds 127 * scale requantizes that tile.
 * Block tables: int32 [num_seqs, max_blocks_per_seq], padded with -1.
 * Attention queries of sequence s are rows query_start_loc[s] .. query_start_loc[s+1]-1 and are the
 * LAST query_len tokens of its context_lens[s] tokens (causal: query j sees keys 0..ctx-qlen+j).
 */
#ifndef PA_H
#define PA_H
#include <stdint.h>
#include <stddef.h>
#ifdef __cplusplus
extern "C" {
#endif

/* PA_CDEF_BEGIN */
#define PA_ABI_VERSION 1

typedef int32_t pa_status;
#define PA_OK 0
#define PA_ERR_INVALID_ARG 1
#define PA_ERR_UNSUPPORTED 2
#define PA_ERR_OUT_OF_MEMORY 3
#define PA_ERR_CUDA 4
#define PA_ERR_NO_CPU_SUPPORT 5

/* ---- common ------------------------------------------------------------------------------ */
int32_t pa_abi_version_cpu(void);
int32_t pa_abi_version_cuda(void);
/* Human-readable text of the last error on this thread (kernel name + reason). */
const char *pa_last_error_cpu(void);
const char *pa_last_error_cuda(void);

/* ---- CPU (native/cpu) -------------------------------------------------------------------- */
/* CPU_EXPORTS_BEGIN */
/* CPU_EXPORTS_END */

/* ---- CUDA (native/cuda) ------------------------------------------------------------------ */
/* CUDA_EXPORTS_BEGIN */
/* CUDA_EXPORTS_END */

/* PA_CDEF_END */

#ifdef __cplusplus
}
#endif
#endif /* PA_H */

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
 *   value = int8 * scale. A write whose absmax exceeds 127 * scale requantizes that tile. The CPU
 *   backend stores k and v multiplied by an orthonormal Hadamard matrix when head_dim is a power of
 *   two (q and the attention output are rotated to match; see the CPU section).
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
#define PA_ABI_VERSION 15

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
/* INT8 conventions: weights int8 [N, K] with float scales [N, K/32] (symmetric, a group of 32 along
 * K); activations are quantized on the fly the same way per row.  K must be a multiple of 32.
 * KV tiles: writing offset 0 of a (block, kv head) tile starts it afresh (resets its scale). When
 * head_dim is a power of two the int8 pools hold every k and v head vector rotated by the orthonormal
 * Hadamard matrix H (self-inverse): value = H (int8 * scale); attention rotates q and its output
 * (H spreads SmolLM2's few large key channels over all of them, so one scale per tile fits).
 * Threads: a pa_pool_cpu team (fused layer, linear) or OpenMP; work is handed out by atomic counters.
 * Scratch is passed in; handles (pool, oneDNN primitive cache) are created and freed by the caller. */
/* 1 when this CPU runs the library (AVX2 + FMA), else 0; call before anything else. */
int32_t pa_supported_cpu(void);
int32_t pa_num_threads_cpu(void);
/* Caps the instruction set of the INT8 GEMM kernels (0 AVX2, 1 AVX-VNNI, 2 AVX-512 VNNI; default 2)
 * for the whole process; returns the level now in use (the cap or what the CPU has, the lower). */
int32_t pa_set_isa_cpu(int32_t max_level);

/* xq [m, k] int8, xs [m, k/32] <- x [m, k] float */
pa_status pa_quantize_q8_cpu(int8_t *xq, float *xs, const float *x, int64_t m, int64_t k);
/* y [m, n] <- (xq, xs) [m, k] @ (w [n, k] int8, ws [n, k/32]).T */
pa_status pa_gemm_q8_cpu(float *y, const int8_t *xq, const float *xs, const int8_t *w, const float *ws,
                         int64_t m, int64_t n, int64_t k);
/* y [m, n] <- x [m, k] @ dequant(w, ws).T ; scratch >= round_up(m * k, 64) + m * (k/32) * 4 bytes;
 * pool: a pa_pool_cpu team to run on (declared below), NULL: OpenMP */
typedef struct pa_pool_cpu pa_pool_cpu;
pa_status pa_linear_q8_cpu(pa_pool_cpu *pool, float *y, void *scratch, int64_t scratch_bytes, const float *x,
                           const int8_t *w, const float *ws, int64_t m, int64_t n, int64_t k);

/* out [T, hidden] <- rms_norm(x + residual) * weight; residual [T, hidden] += x in place (NULL: none) */
pa_status pa_rms_norm_cpu(float *out, float *residual, const float *x, const float *weight,
                          int64_t num_tokens, int64_t hidden, float eps);
/* cos_t, sin_t [T, head_dim/2] <- positions [T] (computed in double, as torch_ref.rope_cos_sin) */
pa_status pa_rope_table_cpu(float *cos_t, float *sin_t, const int64_t *positions, int64_t num_tokens,
                            int64_t head_dim, double theta);
/* in place: q rows [T] of [num_heads, head_dim] (row stride q_stride floats), k likewise */
pa_status pa_rope_cpu(float *q, float *k, const float *cos_t, const float *sin_t, int64_t num_tokens,
                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t q_stride,
                      int64_t k_stride);
/* out [T, I] <- silu(gate_up[:, :I]) * gate_up[:, I:]; gate_up [T, 2I] */
pa_status pa_silu_mul_cpu(float *out, const float *gate_up, int64_t num_tokens, int64_t intermediate);
/* out [n] <- exp(x [n]) through the softmax's lookup table (x <= 0; for tests) */
pa_status pa_exp_lut_cpu(float *out, const float *x, int64_t n);
/* One sampled token a row of logits [num_rows] rows of vocab float32 (row r at logits + r * row_stride): the
 * same knobs [num_rows][5] float64, filters, walk and fixed-point masses as pa_sample_rows_cuda (whose doc
 * below says what they mean; temperature <= 0: the argmax), one core a row (rows spread over the pool's
 * members; pool NULL: the caller alone): a histogram of the row, then only the bucket holding each crossing
 * sorted. out [num_rows] int64. */
pa_status pa_sample_rows_cpu(pa_pool_cpu *pool, int64_t *out, const float *logits, int64_t row_stride,
                             const double *knobs, int32_t num_rows, int32_t vocab);

/* key_cache, value_cache [num_blocks, nkv, block_size, head_dim] int8, k_scales, v_scales
 * [num_blocks, nkv] float <- k, v rows [T] of [nkv, head_dim] (row strides k_stride, v_stride)
 * at slot_mapping [T] int32 (-1 = skip) */
pa_status pa_write_kv_q8_cpu(int8_t *key_cache, float *k_scales, int8_t *value_cache, float *v_scales,
                             const float *k, const float *v, const int32_t *slot_mapping, int64_t num_tokens,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t num_blocks,
                             int64_t k_stride, int64_t v_stride);
/* out [T, num_heads, head_dim] <- causal attention of q rows [T] of [num_heads, head_dim] (row stride
 * q_stride) over the int8 pools; block_tables [num_seqs, max_blocks_per_seq], context_lens [num_seqs],
 * query_start_loc [num_seqs + 1] int32 (semantics at the top of this file). head_dim % 8 == 0,
 * head_dim <= 256, block_size <= 64, num_heads / num_kv_heads <= 32. */
pa_status pa_paged_attention_q8_cpu(float *out, const float *q, const int8_t *key_cache, const float *k_scales,
                                    const int8_t *value_cache, const float *v_scales, const int32_t *block_tables,
                                    const int32_t *context_lens, const int32_t *query_start_loc, int64_t num_seqs,
                                    int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                    int64_t block_size, int64_t max_blocks_per_seq, int64_t num_blocks,
                                    int64_t q_stride, float scale);

/* out [T, hidden] <- dequantized rows ids [T] of q [vocab, hidden] int8, scales [vocab, hidden/32] */
pa_status pa_embed_q8_cpu(float *out, const int64_t *ids, const int8_t *q, const float *scales, int64_t num_tokens,
                          int64_t vocab, int64_t hidden);

/* One whole decoder layer (model.py's LlamaModel.layer) in one call. */
typedef struct {
    const float *input_norm, *post_norm;                 /* [hidden] */
    const int8_t *qkv; const float *qkv_scales;          /* [q_size + 2 kv_size, hidden], [.., hidden/32] */
    const int8_t *o; const float *o_scales;              /* [hidden, q_size], [hidden, q_size/32] */
    const int8_t *gate_up; const float *gate_up_scales;  /* [2 I, hidden], [2 I, hidden/32] */
    const int8_t *down; const float *down_scales;        /* [hidden, I], [hidden, I/32] */
} pa_layer_weights_cpu;
typedef struct {
    int64_t hidden, intermediate, num_heads, num_kv_heads, head_dim, block_size, num_blocks;
    float eps, attn_scale;
} pa_layer_dims_cpu;
/* Scratch bytes pa_llama_layers_cpu needs for num_tokens rows (-1 on bad arguments). */
int64_t pa_llama_layer_scratch_bytes_cpu(const pa_layer_dims_cpu *dims, int64_t num_tokens);
/* A team of num_threads (the calling thread + num_threads - 1 workers that spin ~1 ms after a job,
 * then sleep): runs pa_llama_layers_cpu without OpenMP's fork/join, which sleeps under
 * OMP_WAIT_POLICY=PASSIVE. */
pa_status pa_pool_create_cpu(pa_pool_cpu **pool, int32_t num_threads);
pa_status pa_pool_destroy_cpu(pa_pool_cpu *pool);
/* stalls: team waits > 2 ms for a partner (its core was taken); solo_calls: calls then run alone */
pa_status pa_pool_stats_cpu(int64_t *stalls, int64_t *solo_calls, const pa_pool_cpu *pool);
/* Every decoder layer of the model (model.py's LlamaModel.layer, composed from this library's kernels) in
 * one call. hidden_io [T, hidden]: in the embedded h, out the last layer's h; residual [T, hidden] out
 * (layer 0 sets it to h, as model.py's residual=None); w [num_layers] and the pools per layer (layout as
 * pa_write_kv_q8_cpu); cos_t, sin_t from pa_rope_table_cpu; batch arrays as pa_paged_attention_q8_cpu,
 * checked once. pool: the team to run on (NULL: an OpenMP parallel region). */
pa_status pa_llama_layers_cpu(pa_pool_cpu *pool, float *hidden_io, float *residual, void *scratch,
                              int64_t scratch_bytes, int64_t num_layers, int8_t *const *key_caches,
                              float *const *k_scales, int8_t *const *value_caches, float *const *v_scales,
                              const pa_layer_weights_cpu *w, const pa_layer_dims_cpu *d, const float *cos_t,
                              const float *sin_t, const int32_t *slot_mapping, const int32_t *block_tables,
                              const int32_t *context_lens, const int32_t *query_start_loc, int64_t num_tokens,
                              int64_t num_seqs, int64_t max_blocks_per_seq);

/* oneDNN matmul path (native/cpu/onednn.c): libdnnl is dlopen'ed from lib_path; the handle owns the
 * engine, stream and a primitive cache per (m, n, k). Per-row activation scales and per-channel
 * weights (oneDNN's s8 matmul has no grouped scales in the builds we have):
 * y [m, n] <- x [m, k] @ (w_pc [n, k] int8 * w_pc_scales [n]).T; scratch >= round_up(m * k, 64) + 4 m */
typedef struct pa_onednn_cpu pa_onednn_cpu;
pa_status pa_onednn_open_cpu(pa_onednn_cpu **handle, const char *lib_path);
pa_status pa_onednn_close_cpu(pa_onednn_cpu *handle);
pa_status pa_linear_onednn_cpu(float *y, pa_onednn_cpu *handle, void *scratch, int64_t scratch_bytes, const float *x,
                               const int8_t *w_pc, const float *w_pc_scales, int64_t m, int64_t n, int64_t k);
/* the implementation oneDNN chose for the last primitive created (e.g. "brg:avx512_core_vnni") */
pa_status pa_onednn_impl_cpu(char *out, int64_t out_len, pa_onednn_cpu *handle);
/* CPU_EXPORTS_END */

/* ---- CUDA (native/cuda) ------------------------------------------------------------------ */
/* CUDA_EXPORTS_BEGIN */
/* All pointers are device pointers except `stream` (a cudaStream_t: torch's current stream).
 * Element type of the 16-bit tensors (q, k, v, caches, activations, weights) is given by `dtype`.
 * Token strides (`*_stride`) are in elements between consecutive tokens' rows, so q/k/v may be
 * views into one fused qkv activation. Head rows themselves are contiguous ([heads, head_dim]).
 * Supported: head_dim 64 or 128; block_size a power of two; num_heads / num_kv_heads <= 32. */
#define PA_CUDA_DTYPE_BF16 0
#define PA_CUDA_DTYPE_F16 1

/* out = rms_norm(x + residual) * weight, rounded like HF (normalised value -> dtype -> * weight).
 * out [num_tokens, hidden]; residual_out [num_tokens, hidden] gets x + residual (NULL: not stored;
 * may alias residual); x [num_tokens, hidden]; residual [num_tokens, hidden] or NULL; weight [hidden]. */
pa_status pa_rms_norm_cuda(void *out, void *residual_out, const void *x, const void *residual,
                           const void *weight, int32_t num_tokens, int32_t hidden, float eps,
                           int32_t dtype, void *stream);

/* out [num_tokens, intermediate] = silu(gate) * up; gate_up [num_tokens, 2 * intermediate]. */
pa_status pa_silu_mul_cuda(void *out, const void *gate_up, int32_t num_tokens, int32_t intermediate,
                           int32_t dtype, void *stream);

/* RoPE (HF rotate_half; cos/sin from float32 positions * theta^(-2i/head_dim), cast to dtype), in place.
 * q [num_tokens, num_heads, head_dim] (row stride q_stride); k [num_tokens, num_kv_heads, head_dim]
 * (row stride k_stride); positions [num_tokens] int32. */
pa_status pa_rope_cuda(void *q, void *k, const int32_t *positions, int32_t num_tokens, int32_t num_heads,
                       int32_t num_kv_heads, int32_t head_dim, int64_t q_stride, int64_t k_stride,
                       float theta, int32_t dtype, void *stream);

/* Store k, v [num_tokens, num_kv_heads, head_dim] into their slots of key_cache, value_cache
 * [num_blocks, num_kv_heads, block_size, head_dim]; slot_mapping [num_tokens] int32, -1 = skip. */
pa_status pa_write_kv_cuda(void *key_cache, void *value_cache, const void *k, const void *v,
                           const int32_t *slot_mapping, int32_t num_tokens, int32_t num_kv_heads,
                           int32_t head_dim, int32_t block_size, int64_t k_stride, int64_t v_stride,
                           int32_t dtype, void *stream);

/* pa_rope_cuda then pa_write_kv_cuda of the rotated k, in one launch. */
pa_status pa_rope_write_kv_cuda(void *q, void *k, void *key_cache, void *value_cache, const void *v,
                                const int32_t *positions, const int32_t *slot_mapping, int32_t num_tokens,
                                int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
                                int64_t q_stride, int64_t k_stride, int64_t v_stride, float theta,
                                int32_t dtype, void *stream);

/* Decode attention: one query row per sequence (query_start_loc[s+1] - query_start_loc[s] == 1;
 * 0 = no output), over its context_lens[s] cached tokens, flash-decoding style: the context is cut
 * into partitions of partition_size tokens (a multiple of 16), one thread block per
 * (partition, kv head, sequence); a second kernel merges partitions by log-sum-exp.
 * out [num_tokens, num_heads, head_dim] (contiguous); q [num_tokens, num_heads, head_dim] (row stride
 * q_stride); block_tables [num_seqs, max_blocks_per_seq]; context_lens [num_seqs];
 * query_start_loc [num_seqs + 1]. A sequence with context_lens 0 gets zeros.
 * max_splits: partitions launched per sequence (>= ceil(max context / partition_size); extra ones exit).
 * partial_out [num_seqs, num_heads, max_splits, head_dim] float32 and partial_ml
 * [num_seqs, num_heads, max_splits, 2] float32 are workspace (may be NULL when max_splits == 1). */
pa_status pa_paged_attention_decode_cuda(void *out, float *partial_out, float *partial_ml, const void *q,
                                         const void *key_cache, const void *value_cache,
                                         const int32_t *block_tables, const int32_t *context_lens,
                                         const int32_t *query_start_loc, int32_t num_seqs, int32_t num_heads,
                                         int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
                                         int32_t max_blocks_per_seq, int32_t partition_size, int32_t max_splits,
                                         int64_t q_stride, float scale, int32_t dtype, void *stream);

/* The same contract as pa_paged_attention_decode_cuda, on the tensor cores (mma.sync m16n8k16): the
 * query heads of a kv head are the rows of an m16 tile (groups <= 8 use its upper half; larger groups
 * are split into blocks of 16 heads); same workspace. counters: NULL (partitions merged by a second
 * kernel) or int32 [num_seqs * num_kv_heads * ceil(group / (group <= 8 ? 8 : 16))], all zero on entry
 * and left zero: the last partition block of each (sequence, head group) merges the partitions.
 * Both decode kernels are launched as programmatic dependents (sm_90): they read block_tables,
 * context_lens and query_start_loc before the kernel ahead of them in the stream has finished, and this
 * one also the K/V of each sequence's positions before context_lens - 1. That kernel may write q and the
 * newest position's K/V (a decode step's qkv projection does), nothing else these kernels read. */
pa_status pa_paged_attention_decode_tc_cuda(void *out, float *partial_out, float *partial_ml, int32_t *counters,
                                            const void *q,
                                            const void *key_cache, const void *value_cache,
                                            const int32_t *block_tables, const int32_t *context_lens,
                                            const int32_t *query_start_loc, int32_t num_seqs, int32_t num_heads,
                                            int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
                                            int32_t max_blocks_per_seq, int32_t partition_size,
                                            int32_t max_splits, int64_t q_stride, float scale, int32_t dtype,
                                            void *stream);

/* Prefill / mixed attention: any query_len per sequence (the last query_len of context_lens[s] tokens,
 * causal), tiled over the paged K/V. Shapes as in the decode entry; max_query_len bounds the grid. */
pa_status pa_paged_attention_prefill_cuda(void *out, const void *q, const void *key_cache,
                                          const void *value_cache, const int32_t *block_tables,
                                          const int32_t *context_lens, const int32_t *query_start_loc,
                                          int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads,
                                          int32_t head_dim, int32_t block_size, int32_t max_blocks_per_seq,
                                          int32_t max_query_len, int64_t q_stride, float scale, int32_t dtype,
                                          void *stream);
/* The same attention on the tensor cores (mma.sync; FlashAttention-2 tiling: 64 query rows x 64 keys, the
 * kv head's query heads sharing each K/V tile): same results, groups of at most 64 query heads per kv
 * head. split_keys 0: one block a (query tile, kv head, sequence). split_keys > 0 (a multiple of 64) cuts
 * the keys into spans of that many, one block each (at most max_splits >= 2 spans: max_splits x split_keys
 * must cover every context), for short chunks on long prefixes that would leave SMs idle; rows that see
 * more than one span leave partials in partial_out [T, num_heads, max_splits, head_dim] and partial_ml
 * [T, num_heads, max_splits, 2] (float32, T = query rows) and a second kernel merges them. */
pa_status pa_paged_attention_prefill_tc_cuda(void *out, float *partial_out, float *partial_ml, const void *q,
                                             const void *key_cache, const void *value_cache,
                                             const int32_t *block_tables, const int32_t *context_lens,
                                             const int32_t *query_start_loc, int32_t num_seqs, int32_t num_heads,
                                             int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
                                             int32_t max_blocks_per_seq, int32_t max_query_len, int32_t split_keys,
                                             int32_t max_splits, int64_t q_stride, float scale, int32_t dtype,
                                             void *stream);
/* Query tokens one block of pa_paged_attention_prefill_tc_cuda holds for this head_dim and GQA group (the
 * grid is ceil(max_query_len / it) x kv heads x sequences); 0 for shapes it does not take. */
int32_t pa_prefill_tc_tile_tokens_cuda(int32_t head_dim, int32_t group);
/* Small-batch GEMV (decode, num_rows <= 8): out[m, j] = sum_i x'[m, i] * weight[j, i] (+ residual[m, j]).
 * x' is x (PA_CUDA_GEMV_PLAIN; x [num_rows, k]); rms_norm(x) * norm_weight rounded as pa_rms_norm_cuda
 * does (PA_CUDA_GEMV_NORM; x [num_rows, k], norm_weight [k]); or silu(gate) * up rounded as
 * pa_silu_mul_cuda does (PA_CUDA_GEMV_SILU; x = [gate | up] [num_rows, 2k]). weight [n, k] (HF [out, in]).
 * out [num_rows, n] = T(T(dot) + residual) when residual [num_rows, n] is given (it may alias out).
 * flags: PA_CUDA_GEMV_PDL, a programmatic dependent launch (sm_90): the kernel starts before the previous
 * kernel of the stream has finished, prefetches weight rows (which nothing may write meanwhile), then
 * waits for it; PA_CUDA_GEMV_DEEP, one-row-a-warp launches keep twice the weight loads in flight a lane
 * (8 x 16 bytes a batch, two blocks an SM instead of four: for grids under two blocks an SM); no other bit
 * is defined. */
#define PA_CUDA_GEMV_PDL 1
#define PA_CUDA_GEMV_DEEP 2
#define PA_CUDA_GEMV_PLAIN 0
#define PA_CUDA_GEMV_NORM 1
#define PA_CUDA_GEMV_SILU 2
/* PA_CUDA_GEMV_NORM_SILU: x' as for NORM, weight = [gate; up] [n, k] (n even); out [num_rows, n / 2] =
 * silu(T(x' . gate_j)) * T(x' . up_j), rounded as pa_silu_mul_cuda rounds it; no residual. */
#define PA_CUDA_GEMV_NORM_SILU 3
pa_status pa_gemv_cuda(void *out, const void *x, const void *weight, const void *norm_weight,
                       const void *residual, int32_t num_rows, int32_t n, int32_t k, int32_t mode, float eps,
                       int32_t flags, int32_t dtype, void *stream);
/* pa_gemv_cuda (PLAIN or NORM, no residual) that also writes tokens[m] = argmax_j out[m, j] (int32; the first
 * maximum, NaN the largest, as torch.argmax decides it on the stored values): each block leaves its rows'
 * best in part_values / part_indices (capacity entries each; too few -> PA_ERR_INVALID_ARG before any
 * launch) and the last block to count itself in arrivals (one int32, zero before the first launch; each
 * launch leaves it zero) reduces them. Launches sharing the workspace must be ordered (one stream). */
pa_status pa_gemv_argmax_cuda(void *out, int32_t *tokens, float *part_values, int32_t *part_indices,
                              int32_t *arrivals, int32_t part_capacity, const void *x, const void *weight,
                              const void *norm_weight, int32_t num_rows, int32_t n, int32_t k, int32_t mode,
                              float eps, int32_t flags, int32_t dtype, void *stream);
/* The qkv projection of a decode layer with RoPE and the KV write in its epilogue (one launch where
 * pa_gemv_cuda(NORM) + pa_rope_write_kv_cuda took two): out [num_rows, (nh + 2 nkv) hd] = T(rms_norm(x) *
 * norm_weight @ weight.T), then q and k heads rotated and k, v stored in their slots (slot_mapping[m] < 0:
 * not stored), every value rounded exactly as the two kernels round it. weight [(nh + 2 nkv) hd, k].
 * flags as for pa_gemv_cuda. */
pa_status pa_gemv_rope_cuda(void *out, const void *x, const void *weight, const void *norm_weight,
                            const int32_t *positions, const int32_t *slot_mapping, void *key_cache,
                            void *value_cache, int32_t num_rows, int32_t k, int32_t num_heads,
                            int32_t num_kv_heads, int32_t head_dim, int32_t block_size, float eps, float theta,
                            int32_t flags, int32_t dtype, void *stream);
/* A multi-step greedy decode graph's step advance, given the step's tokens [num_rows] (int32): token_log
 * [max_steps, num_rows][*step] = tokens (when *step < max_steps), then for each row with context_lens > 0:
 * input_ids = token, positions += 1, context_lens += 1, slot_mapping = the slot of the new position in
 * block_tables [num_rows, table_width] (-1 past the table); rows with context_lens <= 0 are left as they
 * are. Finally *step += 1. */
pa_status pa_greedy_advance_cuda(const int32_t *tokens, int32_t num_rows, int32_t *step, int32_t *token_log,
                                 int32_t max_steps, int32_t *input_ids, int32_t *positions, int32_t *context_lens,
                                 int32_t *slot_mapping, const int32_t *block_tables, int32_t table_width,
                                 int32_t block_size, void *stream);
/* Every layer of a decode step of num_rows <= 8 one-token sequences in one persistent (cooperative)
 * launch: per layer the pa_gemv_rope_cuda qkv projection, paged decode attention, o + residual, gate_up
 * with SiLU-mul (PA_CUDA_GEMV_NORM_SILU) and down + residual, as phases separated by grid barriers; each
 * block puts its first weight rows of the next phase in flight before every barrier. x [num_rows, hidden]
 * is the residual stream, updated in place. layers: a device array of num_layers pa_cuda_decode_layer
 * (weights as pa_gemv_cuda takes them: qkv [(nh + 2 nkv) hd, hidden], o [hidden, nh hd], gate_up
 * [2 inter, hidden] = [gate; up], down [hidden, inter]). Workspaces: qkv_ws [num_rows, (nh + 2 nkv) hd],
 * attn_ws [num_rows, nh hd], act_ws [num_rows, inter] (T); partial_out [num_rows, nh, max_splits, hd] and
 * partial_ml [num_rows, nh, max_splits, 2] (float); counters [num_rows, nkv] (int32) and barrier [2]
 * (uint32) zeroed once when allocated (each launch leaves them zero). timing: NULL, or [5 num_layers - 1][3]
 * uint64 filled before the launch with (UINT64_MAX, 0, 0): per grid barrier the %globaltimer ns of the
 * first and last block to arrive and of block 0 leaving (a profile of the phases). Row m is sequence m: its position,
 * slot (< 0: K/V not stored), block table row and context length (0: the row's attention is zeros).
 * head_dim 64 or 128, GQA group <= 8, block_size a power of two. */
typedef struct pa_cuda_decode_layer {
    const void *input_norm, *qkv, *o, *post_norm, *gate_up, *down;
    void *key_cache, *value_cache;
} pa_cuda_decode_layer;
pa_status pa_decode_layers_cuda(void *x, void *qkv_ws, void *attn_ws, void *act_ws, float *partial_out,
                                float *partial_ml, int32_t *counters, uint32_t *barrier, uint64_t *timing,
                                const pa_cuda_decode_layer *layers, int32_t num_layers, const int32_t *positions,
                                const int32_t *slot_mapping, const int32_t *block_tables,
                                const int32_t *context_lens, int32_t num_rows, int32_t hidden,
                                int32_t intermediate, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
                                int32_t block_size, int32_t max_blocks_per_seq, int32_t max_splits, float eps,
                                float theta, float scale, int32_t dtype, void *stream);
/* One sampled token a row of logits [num_rows] rows of vocab float32 (row r at logits + r * row_stride), in
 * one launch (one block a row, or a cluster of blocks a row; no sort of the row): x = logits / temperature; the candidates are the
 * top_k largest x (top_k <= 0 or >= vocab: all), cut to the shortest prefix (in descending x, equal x by
 * index) whose mass reaches top_p of theirs, and to x >= max + log_min_p (-inf: no cut); the token is the
 * first candidate whose cumulative mass exceeds u of the candidates' -- walked in descending order when
 * top_k or top_p cuts (top_p < 1), in index order otherwise (as engine/sampler.py's filter_rows and
 * sample_rows decide). Masses are exp(x - max) in fixed point (2^-40 units, exact integer sums; below
 * 2^-41 a token has none). knobs [num_rows][5] float64: temperature (<= 0: the row's argmax, its first
 * largest logit, the other knobs ignored -- a greedy row among sampled ones), top_k, top_p (in (0, 1]),
 * log_min_p, u (in [0, 1), a multiple of 2^-24). out [num_rows] int64. gather_cap: the most elements of
 * one mass bucket the kernel sorts in shared memory (0..4096; -1: 4096); a bigger bucket is searched by
 * bisection over the row (the same tokens, slower; 0 forces it, for tests). blocks_per_row: 1, 2, 4 or 8
 * (a thread-block cluster a row, each block a slice of it; the same tokens), 0: the kernel's choice (4 while
 * num_rows x 4 blocks take at most half the SMs and vocab >= 16384, else 1). vocab <= 2^23. */
pa_status pa_sample_rows_cuda(int64_t *out, const float *logits, int64_t row_stride, const double *knobs,
                              int32_t num_rows, int32_t vocab, int32_t gather_cap, int32_t blocks_per_row,
                              void *stream);
/* CUDA_EXPORTS_END */

/* PA_CDEF_END */

#ifdef __cplusplus
}
#endif
#endif /* PA_H */

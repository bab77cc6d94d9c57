/*
 * attention.h -- shared by attention.c (KV write, AVX2 attention, the dispatcher) and attention512.c
 * (the AVX-512 attention items). Internal; the exports are in pa.h.
 */
#ifndef PA_ATTENTION_H
#define PA_ATTENTION_H
#include "cpu_common.h"

#define MAX_ROWS 32

typedef struct {
    const float *q; float *out; const int8_t *key_cache; const float *k_scales; const int8_t *value_cache;
    const float *v_scales; const int32_t *block_tables; int64_t num_heads, num_kv_heads, head_dim,
    block_size, max_blocks_per_seq, q_stride; float scale;
} attn_args;
#define DECODE_ROWS 4                  /* attend_decode512: at most this many query heads per KV head */
#define T512A __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

HIDDEN int rotated_head_dim(int64_t n);
HIDDEN void hadamard_inplace(float *x, int64_t n);
/* One work item (sequence s, kv head g, query rows row0 .. row0 + nq - 1 of the sequence's qlen) on
 * AVX-512; head_dim a multiple of 16. */
HIDDEN T512A void attend_item512(const attn_args *a, int64_t s, int64_t g, int64_t ctx, int64_t qlen, int64_t row0,
                                 int64_t nq, int64_t token0);
/* The same for one query token (decode) whose GQA group has at most DECODE_ROWS heads. */
HIDDEN T512A void attend_decode512(const attn_args *a, int64_t s, int64_t g, int64_t ctx, int64_t token);

#endif /* PA_ATTENTION_H */

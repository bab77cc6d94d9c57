// decode_attention.cu -- paged decode attention, flash-decoding style, GQA-aware.
//
// One thread block per (partition of the context, kv head [x group of <= 8 query heads], sequence).
// The block reads each K/V row of its partition once, for all query heads of its kv head:
//   1. a warp takes 16 tokens at a time; a token row (head_dim 16-bit values) is read by LPT lanes,
//      16 bytes each, so a warp load moves 32 x 16 B; dots for all heads, reduced by a butterfly
//      that halves the heads at each shuffle stage, land as log2-scaled scores in shared memory;
//   2. softmax of the partition per head (max, exp2, sum), probabilities back in shared memory;
//   3. the same walk over V accumulates p * v per head in registers; warps are summed in shared memory.
// With one partition the block writes the output; otherwise it writes (unnormalised out, max, sum)
// and merge_kernel combines the partitions by log-sum-exp.
#include "common.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 16;           // tokens a warp takes per step
constexpr unsigned kFull = 0xffffffffu;

// v[0..N): one lane's partial dots of one token for N heads. Reduces over the lanes of the token
// group (xor widths W, W/2, .., 1): while N > 1, each stage sends half of the heads to the partner
// lane and keeps the other half, so a lane ends with the full dot of one head (`head`).
template <int N, int W> struct Butterfly {
    static __device__ __forceinline__ float run(float *v, int lane, int &head) {
        if constexpr (N > 1) {
            const bool upper = (lane & W) != 0;
#pragma unroll
            for (int j = 0; j < N / 2; ++j) {
                const float send = upper ? v[j] : v[j + N / 2];
                const float keep = upper ? v[j + N / 2] : v[j];
                v[j] = keep + __shfl_xor_sync(kFull, send, W);
            }
            if (upper) head += N / 2;
            return Butterfly<N / 2, W / 2>::run(v, lane, head);
        } else {
            float x = v[0];
#pragma unroll
            for (int w = W; w >= 1; w >>= 1) x += __shfl_xor_sync(kFull, x, w);
            return x;
        }
    }
};

struct DecodeArgs {
    void *out;
    float *partial_out, *partial_ml;
    const void *q, *key_cache, *value_cache;
    const int32_t *block_tables, *context_lens, *query_start_loc;
    int num_heads, num_kv_heads, group, head_groups, bs_log2, max_blocks, partition, max_splits;
    int64_t q_stride;
    float scale_log2e;
};

// Shared memory of one block: scores [GP][partition] (reused as [kWarps][GP][D] sums), then the
// partition's block-table slice, then (max, sum) per head.
template <int GP, int D> __host__ __device__ constexpr int reduce_floats() { return kWarps * GP * D; }

template <typename T, int D, int GP>
__global__ void __launch_bounds__(kThreads) decode_kernel(DecodeArgs a) {
    constexpr int LPT = D / 8;              // lanes per token row (16 B each)
    constexpr int TPI = 32 / LPT;           // tokens per warp load
    constexpr int ITERS = kChunk / TPI;     // warp loads per 16-token step
    extern __shared__ float smem[];

    const int seq = blockIdx.z, split = blockIdx.x;
    const int kv_head = blockIdx.y / a.head_groups, hg = blockIdx.y % a.head_groups;
    const int q_row = a.query_start_loc[seq];
    if (a.query_start_loc[seq + 1] - q_row != 1) return;
    const int ctx = a.context_lens[seq];
    const int start = split * a.partition;
    if (split > 0 && start >= ctx) return;
    const int end = min(ctx, start + a.partition), ntok = end - start;
    const bool direct = ctx <= a.partition;   // one partition: this block writes the output
    const int h0 = kv_head * a.group + hg * GP;
    const int nheads = min(GP, a.group - hg * GP);
    T *out = (T *)a.out + ((int64_t)q_row * a.num_heads + h0) * D;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    if (ctx <= 0) {   // nothing to attend to: zeros
        for (int i = tid; i < nheads * D; i += kThreads) out[i] = from_f<T>(0.f);
        return;
    }

    const int red_floats = reduce_floats<GP, D>();
    const int score_floats = GP * a.partition;
    float *scores = smem;                                                      // [GP][partition]
    int *table = (int *)(smem + (score_floats > red_floats ? score_floats : red_floats));
    const int first_blk = start >> a.bs_log2, nblk = ((end - 1) >> a.bs_log2) - first_blk + 1;
    float *ml = (float *)(table + nblk + 1);                                   // [GP][2]

    // 1. this partition's slice of the block table; this lane's 8 dims of every query head
    const int32_t *bt = a.block_tables + (int64_t)seq * a.max_blocks + first_blk;
    for (int i = tid; i < nblk; i += kThreads) table[i] = bt[i];
    const int dim0 = (lane % LPT) * 8;
    float qr[GP][8];
#pragma unroll
    for (int h = 0; h < GP; ++h) {
        if (h < nheads) {
            const T *qp = (const T *)a.q + (int64_t)q_row * a.q_stride + (int64_t)(h0 + h) * D + dim0;
            Vec<T>::to_float(*reinterpret_cast<const uint4 *>(qp), qr[h]);
#pragma unroll
            for (int e = 0; e < 8; ++e) qr[h][e] *= a.scale_log2e;
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) qr[h][e] = 0.f;
        }
    }
    __syncthreads();

    const int bs_mask = (1 << a.bs_log2) - 1;
    const int64_t head_off = (int64_t)kv_head << a.bs_log2;
    const int nchunks = (ntok + kChunk - 1) / kChunk;
    const int sub = lane / LPT;               // which token of a warp load this lane reads
    auto row_ptr = [&](const T *cache, int t) {   // t: token index within the partition
        const int gt = start + t;
        const int64_t blk = table[(gt >> a.bs_log2) - first_blk];
        return cache + (((blk * a.num_kv_heads) << a.bs_log2) + head_off + (gt & bs_mask)) * D + dim0;
    };

    // 2. scores: q . k for 16 tokens per warp step
    const bool writer = (lane & (LPT / GP - 1)) == 0;
    for (int c = warp; c < nchunks; c += kWarps) {
        uint4 kv[ITERS];
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const int t = c * kChunk + it * TPI + sub;
            kv[it] = t < ntok ? __ldg(reinterpret_cast<const uint4 *>(row_ptr((const T *)a.key_cache, t)))
                              : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            float kf[8], dot[GP];
            Vec<T>::to_float(kv[it], kf);
#pragma unroll
            for (int h = 0; h < GP; ++h) {
                float acc = 0.f;
#pragma unroll
                for (int e = 0; e < 8; ++e) acc = fmaf(qr[h][e], kf[e], acc);
                dot[h] = acc;
            }
            int head = 0;
            const float s = Butterfly<GP, LPT / 2>::run(dot, lane, head);
            const int t = c * kChunk + it * TPI + sub;
            if (writer && t < ntok && head < nheads) scores[head * a.partition + t] = s;
        }
    }
    __syncthreads();

    // 3. softmax of the partition, per head (log2 domain)
    for (int h = warp; h < nheads; h += kWarps) {
        float *sc = scores + h * a.partition;
        float m = -INFINITY;
        for (int t = lane; t < ntok; t += 32) m = fmaxf(m, sc[t]);
        m = warp_max(m);
        float l = 0.f;
        for (int t = lane; t < ntok; t += 32) {
            const float p = exp2f(sc[t] - m);
            sc[t] = p;
            l += p;
        }
        l = warp_sum(l);
        if (lane == 0) {
            ml[2 * h] = m;
            ml[2 * h + 1] = l;
        }
    }
    __syncthreads();

    // 4. p . v, same walk as the scores
    float acc[GP][8];
#pragma unroll
    for (int h = 0; h < GP; ++h)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[h][e] = 0.f;
    for (int c = warp; c < nchunks; c += kWarps) {
        uint4 vv[ITERS];
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const int t = c * kChunk + it * TPI + sub;
            vv[it] = t < ntok ? __ldg(reinterpret_cast<const uint4 *>(row_ptr((const T *)a.value_cache, t)))
                              : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const int t = c * kChunk + it * TPI + sub;
            float vf[8];
            Vec<T>::to_float(vv[it], vf);
#pragma unroll
            for (int h = 0; h < GP; ++h) {
                const float p = (t < ntok && h < nheads) ? scores[h * a.partition + t] : 0.f;
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[h][e] = fmaf(p, vf[e], acc[h][e]);
            }
        }
    }
    // sum the token groups of the warp, then the warps
#pragma unroll
    for (int o = LPT; o < 32; o <<= 1)
#pragma unroll
        for (int h = 0; h < GP; ++h)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[h][e] += __shfl_xor_sync(kFull, acc[h][e], o);
    __syncthreads();   // scores are no longer read: reuse them for the warp sums
    float *red = smem;   // [kWarps][GP][D]
    if (lane < LPT) {
#pragma unroll
        for (int h = 0; h < GP; ++h)
#pragma unroll
            for (int e = 0; e < 8; ++e) red[(warp * GP + h) * D + dim0 + e] = acc[h][e];
    }
    __syncthreads();

    // 5. write the output (one partition) or this partition's share for merge_kernel
    for (int i = tid; i < nheads * D; i += kThreads) {
        const int h = i / D, d = i % D;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) v += red[(w * GP + h) * D + d];
        if (direct) {
            out[i] = from_f<T>(v / ml[2 * h + 1]);
        } else {
            const int64_t idx = ((int64_t)seq * a.num_heads + h0 + h) * a.max_splits + split;
            a.partial_out[idx * D + d] = v;
            if (d == 0) {
                a.partial_ml[idx * 2] = ml[2 * h];
                a.partial_ml[idx * 2 + 1] = ml[2 * h + 1];
            }
        }
    }
}

// One block per (query head, sequence), one thread per dim: out = sum_i w_i o_i / sum_i w_i l_i,
// w_i = 2^(m_i - max m).
template <typename T, int D>
__global__ void __launch_bounds__(D) merge_kernel(DecodeArgs a) {
    const int head = blockIdx.x, seq = blockIdx.y, d = threadIdx.x;
    const int q_row = a.query_start_loc[seq];
    if (a.query_start_loc[seq + 1] - q_row != 1) return;
    const int ctx = a.context_lens[seq];
    const int n = (ctx + a.partition - 1) / a.partition;
    if (n <= 1) return;   // written directly by decode_kernel
    const int64_t base = ((int64_t)seq * a.num_heads + head) * a.max_splits;
    const float *ml = a.partial_ml + base * 2;
    const float *po = a.partial_out + base * D + d;
    float m = -INFINITY;
    for (int i = 0; i < n; ++i) m = fmaxf(m, ml[2 * i]);
    float num = 0.f, den = 0.f;
    for (int i = 0; i < n; ++i) {
        const float w = exp2f(ml[2 * i] - m);
        num = fmaf(w, po[(int64_t)i * D], num);
        den = fmaf(w, ml[2 * i + 1], den);
    }
    ((T *)a.out)[((int64_t)q_row * a.num_heads + head) * D + d] = from_f<T>(num / den);
}

template <typename T, int D, int GP>
pa_status launch_decode(const DecodeArgs &a, int num_seqs, cudaStream_t stream) {
    const int score_floats = GP * a.partition, red_floats = reduce_floats<GP, D>();
    const size_t smem = sizeof(float) * (score_floats > red_floats ? score_floats : red_floats) +
                        sizeof(int) * ((a.partition >> a.bs_log2) + 3) + sizeof(float) * 2 * GP;
    if (smem > 48 * 1024)
        return cuda_fail(PA_ERR_UNSUPPORTED, "decode_kernel: partition_size %d needs %zu bytes of shared "
                         "memory (at most 49152)", a.partition, smem);
    dim3 grid(a.max_splits, a.num_kv_heads * a.head_groups, num_seqs);
    decode_kernel<T, D, GP><<<grid, kThreads, smem, stream>>>(a);
    PA_RETURN_IF_ERR(check_launch("decode_kernel"));
    if (a.max_splits > 1) {
        merge_kernel<T, D><<<dim3(a.num_heads, num_seqs), D, 0, stream>>>(a);
        PA_RETURN_IF_ERR(check_launch("decode_merge_kernel"));
    }
    return PA_OK;
}

template <typename T, int D>
pa_status launch_decode_g(const DecodeArgs &a, int gp, int num_seqs, cudaStream_t stream) {
    switch (gp) {
    case 1: return launch_decode<T, D, 1>(a, num_seqs, stream);
    case 2: return launch_decode<T, D, 2>(a, num_seqs, stream);
    case 4: return launch_decode<T, D, 4>(a, num_seqs, stream);
    default: return launch_decode<T, D, 8>(a, num_seqs, stream);
    }
}

}  // namespace

extern "C" pa_status pa_paged_attention_decode_cuda(void *out, float *partial_out, float *partial_ml, const void *q,
                                                    const void *key_cache, const void *value_cache,
                                                    const int32_t *block_tables, const int32_t *context_lens,
                                                    const int32_t *query_start_loc, int32_t num_seqs,
                                                    int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
                                                    int32_t block_size, int32_t max_blocks_per_seq,
                                                    int32_t partition_size, int32_t max_splits, int64_t q_stride,
                                                    float scale, int32_t dtype, void *stream) {
    const char *name = "decode_kernel";
    if (out == nullptr || q == nullptr || key_cache == nullptr || value_cache == nullptr || block_tables == nullptr ||
        context_lens == nullptr || query_start_loc == nullptr || num_seqs < 0 || num_heads <= 0 ||
        num_kv_heads <= 0 || num_heads % num_kv_heads || max_blocks_per_seq <= 0 || max_splits <= 0)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: bad arguments", name);
    if (head_dim != 64 && head_dim != 128)
        return cuda_fail(PA_ERR_UNSUPPORTED, "%s: head_dim %d (supported: 64, 128)", name, (int)head_dim);
    if (block_size <= 0 || (block_size & (block_size - 1)))
        return cuda_fail(PA_ERR_UNSUPPORTED, "%s: block_size %d is not a power of two", name, (int)block_size);
    if (partition_size <= 0 || partition_size % kChunk)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: partition_size %d is not a positive multiple of %d", name,
                         (int)partition_size, kChunk);
    if (max_splits > 1 && (partial_out == nullptr || partial_ml == nullptr))
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: max_splits %d needs the partial_out/partial_ml workspace", name,
                         (int)max_splits);
    if (max_splits > 65535)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: max_splits %d exceeds 65535", name, (int)max_splits);
    if (num_seqs == 0) return PA_OK;
    if (num_seqs > 65535)
        return cuda_fail(PA_ERR_UNSUPPORTED, "%s: %d sequences exceed the grid (65535)", name, (int)num_seqs);

    const int group = num_heads / num_kv_heads;
    int gp_fit = 1;   // query heads a block takes: the group rounded up to a power of two, at most 8
    while (gp_fit < group && gp_fit < 8) gp_fit <<= 1;
    DecodeArgs a;
    a.out = out;
    a.partial_out = partial_out;
    a.partial_ml = partial_ml;
    a.q = q;
    a.key_cache = key_cache;
    a.value_cache = value_cache;
    a.block_tables = block_tables;
    a.context_lens = context_lens;
    a.query_start_loc = query_start_loc;
    a.num_heads = num_heads;
    a.num_kv_heads = num_kv_heads;
    a.group = group;
    a.head_groups = (group + gp_fit - 1) / gp_fit;
    int bs_log2 = 0;
    while ((1 << bs_log2) < block_size) ++bs_log2;
    a.bs_log2 = bs_log2;
    a.max_blocks = max_blocks_per_seq;
    a.partition = partition_size;
    a.max_splits = max_splits;
    a.q_stride = q_stride;
    a.scale_log2e = scale * kLog2e;
    cudaStream_t st = (cudaStream_t)stream;
    return dispatch_dtype(dtype, name, [&](auto tag) {
        using T = decltype(tag);
        return head_dim == 64 ? launch_decode_g<T, 64>(a, gp_fit, num_seqs, st)
                              : launch_decode_g<T, 128>(a, gp_fit, num_seqs, st);
    });
}

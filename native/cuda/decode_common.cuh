// decode_common.cuh -- pieces shared by the two decode-attention kernels (decode_attention.cu: CUDA
// cores; decode_attention_tc.cu: tensor cores): their arguments, the final write of
// a block's merged result, and the kernel that merges a sequence's partitions by log-sum-exp.
#pragma once

#include "mma.cuh"

namespace decode {

struct DecodeArgs : PagedArgs {
    float *partial_out, *partial_ml;
    int head_groups, partition, max_splits;
    int32_t *counters;   // tensor-core kernel only: [num_seqs][gridDim.y] arrival counts (NULL: merge_kernel)
};

// Which (sequence, partition, kv head, head group) a decode block serves, and its tokens [start, end);
// live is false for a sequence that is not a one-token decode and for a partition past its context.
struct DecodeBlock {
    int seq, split, kv_head, hg, q_row, ctx, start, end;
    bool live;
};
__device__ __forceinline__ DecodeBlock decode_block(const DecodeArgs &a) {
    DecodeBlock b;
    b.seq = blockIdx.z;
    b.split = blockIdx.x;
    b.kv_head = blockIdx.y / a.head_groups;
    b.hg = blockIdx.y % a.head_groups;
    b.q_row = a.query_start_loc[b.seq];
    b.ctx = a.context_lens[b.seq];
    b.start = b.split * a.partition;
    b.end = min(b.ctx, b.start + a.partition);
    b.live = a.query_start_loc[b.seq + 1] - b.q_row == 1 && (b.split == 0 || b.start < b.ctx);
    return b;
}

// The start of a decode block, both decode kernels being programmatic dependents: the kernel after
// this one may launch now (pdl_trigger); a block without work (live false: it returns) still passes
// pdl_wait, so the grid's completion always implies the previous kernel's.
__device__ __forceinline__ DecodeBlock decode_block_pdl(const DecodeArgs &a) {
    pdl_trigger();
    const DecodeBlock b = decode_block(a);
    if (!b.live) pdl_wait();
    return b;
}

// The block's slice of its sequence's block table into table (shared memory; none for an empty
// context), staged while the previous kernel drains -- no kernel writes block tables. Returns the
// slice's first block index. The caller synchronises before reading table.
__device__ __forceinline__ int stage_table(const DecodeArgs &a, const DecodeBlock &b, int *table, int nthreads) {
    const int first = b.start >> a.bs_log2, n = ((b.end - 1) >> a.bs_log2) - first + 1;
    const int32_t *bt = a.block_tables + (int64_t)b.seq * a.max_blocks + first;
    for (int i = threadIdx.x; i < n; i += nthreads) table[i] = bt[i];
    return first;
}

// stage_table, then pdl_wait: q, K/V and every write of the block come after it.
__device__ __forceinline__ int stage_table_then_wait(const DecodeArgs &a, const DecodeBlock &b, int *table,
                                                     int nthreads) {
    const int first = stage_table(a, b, table, nthreads);
    pdl_wait();
    return first;
}

// The end of a decode block: NW warps left their unnormalised outputs in red [NW][GP][D] and their
// (running max, sum) in wml [NW][GP][2] (log2 domain; max -inf for a warp that saw no token).
// Writes out (one partition: `direct`) or this partition's share of the workspace for merge_kernel.
template <typename T, int D, int GP, int NW, int NT>
__device__ __forceinline__ void finish_block(const DecodeArgs &a, const float *red, const float *wml, T *out,
                                             int seq, int h0, int nheads, int split, bool direct) {
    for (int i = threadIdx.x; i < nheads * D; i += NT) {
        const int h = i / D, d = i % D;
        float m = -INFINITY;
#pragma unroll
        for (int w = 0; w < NW; ++w) m = fmaxf(m, wml[(w * GP + h) * 2]);
        float num = 0.f, den = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float wm = wml[(w * GP + h) * 2];
            const float f = wm == -INFINITY ? 0.f : exp2f(wm - m);   // a warp without chunks
            num = fmaf(f, red[(w * GP + h) * D + d], num);
            den = fmaf(f, wml[(w * GP + h) * 2 + 1], den);
        }
        if (direct) {
            out[i] = from_f<T>(den > 0.f ? num / den : 0.f);   // an empty context (a padding row): zeros
        } else {
            const int64_t idx = ((int64_t)seq * a.num_heads + h0 + h) * a.max_splits + split;
            a.partial_out[idx * D + d] = num;
            if (d == 0) {
                a.partial_ml[idx * 2] = m;
                a.partial_ml[idx * 2 + 1] = den;
            }
        }
    }
}

// Dim d of a (sequence, head)'s n partitions, ml [n][2] (max, sum; log2 domain) and po [n][D] (unnormalised):
// sum_i w_i o_i / sum_i w_i l_i, w_i = 2^(m_i - max m); a partition that saw no token weighs 0, and no token
// at all gives 0. Loads go through L2: other blocks of the same launch may have written the partials.
// The loads of kBatch partitions go out together (one L2 round trip per batch, not per partition: at 16
// partitions a one-at-a-time loop was ~32 dependent round trips); the sums still run in partition order.
template <int D>
__device__ __forceinline__ float merge_partitions(const float *ml, const float *po, int n) {
    constexpr int kBatch = 8;
    float m = -INFINITY;
    for (int i0 = 0; i0 < n; i0 += kBatch) {
        float v[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) v[u] = i0 + u < n ? __ldcg(ml + 2 * (i0 + u)) : -INFINITY;
#pragma unroll
        for (int u = 0; u < kBatch; ++u) m = fmaxf(m, v[u]);
    }
    float num = 0.f, den = 0.f;
    for (int i0 = 0; i0 < n; i0 += kBatch) {
        float mi[kBatch], li[kBatch], oi[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            const bool ok = i0 + u < n;
            mi[u] = ok ? __ldcg(ml + 2 * (i0 + u)) : -INFINITY;
            li[u] = ok ? __ldcg(ml + 2 * (i0 + u) + 1) : 0.f;
            oi[u] = ok ? __ldcg(po + (int64_t)(i0 + u) * D) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            if (i0 + u >= n) break;
            const float w = mi[u] == -INFINITY ? 0.f : exp2f(mi[u] - m);
            num = fmaf(w, oi[u], num);
            den = fmaf(w, li[u], den);
        }
    }
    return den > 0.f ? num / den : 0.f;
}

// merge_partitions for a block's nheads (<= GP) heads at once, by NT threads, with the same arithmetic (so
// the same bits), in one L2 round trip and short dependent chains: the partial outputs of every (head,
// partition) come in by cp.async into shared memory (scratch) while threads < nheads x n bring the (max,
// sum) pairs; then each pair's thread turns its max into the weight 2^(m_i - max m) (every thread of a head
// reading the head's maxima at once), and each output folds its partitions in order. When scratch cannot
// hold every partition, rounds of as many as it holds. (Was: the weights by one thread a head and the
// outputs 4 partitions a round trip, 3.1 of 21.3 us at batch 1 / 16k on the H200, results_cuda.md
// session 6.) Returns false (nothing written) when scratch cannot hold the pairs and one partition; the
// caller then uses merge_partitions.
template <typename T, int D, int GP, int NT>
__device__ bool merge_block(const DecodeArgs &a, float *scratch, int scratch_floats, T *out, int seq, int h0,
                            int nheads, int n) {
    const int pairs = nheads * n, po_at = (3 * pairs + 3) & ~3;   // po 16-byte aligned
    const int nb = min(n, (scratch_floats - po_at) / (nheads * D));   // partitions a round
    if (nb < 1) return false;
    float *ms = scratch, *ls = scratch + pairs, *ws = scratch + 2 * pairs, *po = scratch + po_at;   // po [h][nb][D]
    const int tid = threadIdx.x, total = nheads * D;
    const int64_t base = ((int64_t)seq * a.num_heads + h0) * a.max_splits;   // (head 0, partition 0)
    auto stage = [&](int p0) {   // partitions [p0, p0 + nb) of every head into po, 16 bytes a copy
        constexpr int kVec = D / 4;
        const int cnt = min(nb, n - p0);
        for (int i = tid; i < nheads * cnt * kVec; i += NT) {
            const int v = i % kVec, r = i / kVec, q = r % cnt, h = r / cnt;
            cp_async16(po + (h * nb + q) * D + v * 4,
                       a.partial_out + (base + (int64_t)h * a.max_splits + p0 + q) * D + v * 4, 16);
        }
        cp_async_commit();
    };
    stage(0);
    for (int i = tid; i < pairs; i += NT) {
        const int h = i / n, p = i % n;
        const float2 ml = __ldcg(reinterpret_cast<const float2 *>(a.partial_ml) + base + (int64_t)h * a.max_splits + p);
        ms[i] = ml.x;
        ls[i] = ml.y;
    }
    __syncthreads();
    for (int i = tid; i < pairs; i += NT) {
        const float *mh = ms + (i / n) * n;
        float m = -INFINITY;
#pragma unroll 8
        for (int p = 0; p < n; ++p) m = fmaxf(m, mh[p]);
        ws[i] = ms[i] == -INFINITY ? 0.f : exp2f(ms[i] - m);
    }
    cp_async_wait<0>();
    __syncthreads();
    constexpr int U = (GP * D + NT - 1) / NT;      // outputs a thread, at most
    float num[U], den[U];
#pragma unroll
    for (int u = 0; u < U; ++u) num[u] = den[u] = 0.f;
    for (int p0 = 0; p0 < n; p0 += nb) {
        if (p0 > 0) {   // the next round into the same buffer once every thread has read this one
            __syncthreads();
            stage(p0);
            cp_async_wait<0>();
            __syncthreads();
        }
        const int cnt = min(nb, n - p0);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int idx = tid + u * NT;
            if (idx >= total) break;
            const int h = idx / D, d = idx % D;
            const float *w = ws + h * n + p0, *l = ls + h * n + p0, *o = po + h * nb * D + d;
#pragma unroll 8
            for (int q = 0; q < cnt; ++q) {
                num[u] = fmaf(w[q], o[q * D], num[u]);
                den[u] = fmaf(w[q], l[q], den[u]);
            }
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int idx = tid + u * NT;
        if (idx < total) out[idx] = from_f<T>(den[u] > 0.f ? num[u] / den[u] : 0.f);
    }
    return true;
}

// One block per (query head, sequence), one thread per dim: merge_partitions into the output row.
// Launched as a programmatic dependent of the decode kernel (which lets it start at once): its blocks
// are resident before the decode grid ends and read the partials as soon as its memory is flushed.
template <typename T, int D>
__global__ void __launch_bounds__(D) merge_kernel(DecodeArgs a) {
    pdl_wait();
    const int head = blockIdx.x, seq = blockIdx.y, d = threadIdx.x;
    const int q_row = a.query_start_loc[seq];
    if (a.query_start_loc[seq + 1] - q_row != 1) return;
    const int ctx = a.context_lens[seq];
    const int n = (ctx + a.partition - 1) / a.partition;
    if (n <= 1) return;   // written directly by the decode kernel
    const int64_t base = ((int64_t)seq * a.num_heads + head) * a.max_splits;
    ((T *)a.out)[((int64_t)q_row * a.num_heads + head) * D + d] =
        from_f<T>(merge_partitions<D>(a.partial_ml + base * 2, a.partial_out + base * D + d, n));
}

template <typename T, int D>
pa_status launch_merge(const DecodeArgs &a, int num_seqs, cudaStream_t stream) {
    if (a.max_splits <= 1) return PA_OK;
    return launch_with_attribute(merge_kernel<T, D>, "decode_merge_kernel", dim3(a.num_heads, num_seqs), 0, D, stream,
                                 pdl_attribute(), a);
}

// Argument checks and DecodeArgs of the pa_paged_attention_decode*_cuda exports; gp_max bounds the
// query heads one block takes (the group is split into head_groups of at most gp_max).
pa_status make_decode_args(DecodeArgs &a, const char *name, void *out, float *partial_out, float *partial_ml,
                           const void *q, const void *key_cache, const void *value_cache,
                           const int32_t *block_tables, const int32_t *context_lens,
                           const int32_t *query_start_loc, int32_t num_seqs, int32_t num_heads,
                           int32_t num_kv_heads, int32_t head_dim, int32_t block_size, int32_t max_blocks_per_seq,
                           int32_t partition_size, int32_t max_splits, int64_t q_stride, float scale, int gp);

}  // namespace decode

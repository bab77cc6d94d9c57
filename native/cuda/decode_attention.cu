// decode_attention.cu -- paged decode attention, flash-decoding style, GQA-aware.
//
// One thread block (4 warps) per (partition of the context, kv head [x group of <= 8 query heads],
// sequence). Each K/V row of the partition is read once, for all query heads of its kv head:
//   - a warp takes 16-token chunks (warp, warp + 4, ...); K and V of a chunk come in by cp.async,
//     16 bytes a lane, two chunks in flight per warp; a token row is head_dim / 8 lanes wide;
//   - dots for all heads, reduced by a butterfly that halves the heads at each shuffle stage;
//   - an online softmax per warp (running max and sum per head, log2 domain), p . v in registers;
//   - the warps' states are merged through shared memory at the end.
// With one partition the block writes the output; otherwise it writes (unnormalised out, max, sum)
// and merge_kernel combines the partitions by log-sum-exp.
#include "decode_common.cuh"

using namespace decode;

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

// The head whose full dot Butterfly<N, W> leaves in `lane`.
template <int N, int W> __device__ __forceinline__ int butterfly_head(int lane) {
    if constexpr (N > 1) return ((lane & W) ? N / 2 : 0) + butterfly_head<N / 2, W / 2>(lane);
    else return 0;
}

// Shared memory of one block, in floats: the warps' copy stages (STAGES 16-token K+V chunks per warp,
// reused for the final warp merge), the per-warp exchange of probabilities and rescale factors, then
// the partition's block-table slice. Two stages for full grids (three blocks an SM); four when the
// grid is smaller than the chip, so a warp has more of its few chunks in flight at once.
template <int GP, int D, int STAGES> __host__ __device__ constexpr int stage_floats() {
    return kWarps * STAGES * 2 * (kChunk * D / 8) * 4;   // [warp][stage][K|V][16 tokens x D] 16-bit
}
template <int GP, int D> __host__ __device__ constexpr int merge_floats() { return kWarps * GP * (D + 2); }
template <int GP> __host__ __device__ constexpr int exchange_floats() { return kWarps * (kChunk + 1) * GP; }
template <int GP, int D, int STAGES> __host__ __device__ constexpr int front_floats() {
    return (stage_floats<GP, D, STAGES>() > merge_floats<GP, D>() ? stage_floats<GP, D, STAGES>()
                                                                   : merge_floats<GP, D>()) +
           exchange_floats<GP>();
}

template <typename T, int D, int GP, int kStages>
__global__ void __launch_bounds__(kThreads) decode_kernel(DecodeArgs a) {
    constexpr int LPT = D / 8;              // lanes per token row (16 B each)
    constexpr int TPI = 32 / LPT;           // tokens per warp load
    constexpr int ITERS = kChunk / TPI;     // warp loads per 16-token chunk
    extern __shared__ __align__(16) float smem[];

    // A programmatic dependent launch (decode_block_pdl, stage_table_then_wait in decode_common.cuh)
    const DecodeBlock blk = decode_block_pdl(a);
    if (!blk.live) return;
    const int seq = blk.seq, split = blk.split, kv_head = blk.kv_head, hg = blk.hg, q_row = blk.q_row;
    const int ctx = blk.ctx, start = blk.start, end = blk.end, ntok = end - start;
    const bool direct = ctx <= a.partition;   // one partition: this block writes the output
    const int h0 = kv_head * a.group + hg * GP;
    const int nheads = min(GP, a.group - hg * GP);
    T *out = (T *)a.out + ((int64_t)q_row * a.num_heads + h0) * D;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    uint4 *stages = reinterpret_cast<uint4 *>(smem);                         // [warp][stage][2][ITERS][32]
    float *xchg = smem + (front_floats<GP, D, kStages>() - exchange_floats<GP>());   // [warp][16 + 1][GP]
    int *table = reinterpret_cast<int *>(smem + front_floats<GP, D, kStages>());

    // 1. this partition's slice of the block table; this lane's 8 dims of every query head
    const int first_blk = stage_table_then_wait(a, blk, table, kThreads);
    if (ctx <= 0) {   // nothing to attend to: zeros
        for (int i = tid; i < nheads * D; i += kThreads) out[i] = from_f<T>(0.f);
        return;
    }
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

    // 2. each warp walks its chunks (warp, warp + 4, ...) through a kStages-deep cp.async pipeline.
    //    A lane only ever reads back the 16-byte pieces it copied itself: no barrier is needed.
    const int bs_mask = (1 << a.bs_log2) - 1;
    const int64_t head_off = (int64_t)kv_head << a.bs_log2;
    const int sub = lane / LPT;               // which token of a warp load this lane reads
    const int nchunks = (ntok + kChunk - 1) / kChunk;
    const int mine = nchunks > warp ? (nchunks - warp + kWarps - 1) / kWarps : 0;
    uint4 *my_stages = stages + (size_t)warp * kStages * 2 * ITERS * 32;
    auto issue = [&](int j) {                  // j-th chunk of this warp -> stage j % kStages
        const int c = warp + j * kWarps;
        uint4 *dst = my_stages + (size_t)(j % kStages) * 2 * ITERS * 32;
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const int t = c * kChunk + it * TPI + sub;
            const bool ok = t < ntok;
            int64_t off = 0;
            if (ok) {
                const int gt = start + t;
                const int64_t blk = table[(gt >> a.bs_log2) - first_blk];
                off = (((blk * a.num_kv_heads) << a.bs_log2) + head_off + (gt & bs_mask)) * D + dim0;
            }
            cp_async16(dst + it * 32 + lane, (const T *)a.key_cache + off, ok ? 16 : 0);
            cp_async16(dst + (ITERS + it) * 32 + lane, (const T *)a.value_cache + off, ok ? 16 : 0);
        }
    };
#pragma unroll
    for (int j = 0; j < kStages - 1; ++j) {
        if (j < mine) issue(j);
        cp_async_commit();
    }

    float acc[GP][8];
#pragma unroll
    for (int h = 0; h < GP; ++h)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[h][e] = 0.f;
    float m_run = -INFINITY, l_run = 0.f;      // of this lane's head
    const int head = butterfly_head<GP, LPT / 2>(lane);
    const bool writer = (lane & (LPT / GP - 1)) == 0;
    float *wx = xchg + warp * (kChunk + 1) * GP;   // [16 tokens][GP] probabilities, then [GP] rescales

    for (int j = 0; j < mine; ++j) {
        if (j + kStages - 1 < mine) issue(j + kStages - 1);
        cp_async_commit();
        cp_async_wait<kStages - 1>();           // this lane's copies of chunk j have landed
        const uint4 *src = my_stages + (size_t)(j % kStages) * 2 * ITERS * 32;
        const int c = warp + j * kWarps;

        // 2a. scores of the chunk's 16 tokens; after the butterfly a lane holds its head's score
        float s[ITERS];
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            float kf[8], dot[GP];
            Vec<T>::to_float(src[it * 32 + lane], kf);
#pragma unroll
            for (int h = 0; h < GP; ++h) {
                float d = 0.f;
#pragma unroll
                for (int e = 0; e < 8; ++e) d = fmaf(qr[h][e], kf[e], d);
                dot[h] = d;
            }
            int h_it = 0;
            s[it] = Butterfly<GP, LPT / 2>::run(dot, lane, h_it);
            if (c * kChunk + it * TPI + sub >= ntok) s[it] = -INFINITY;
        }
        // 2b. online softmax of this lane's head over the chunk (all subs of the warp)
        float mc = s[0];
#pragma unroll
        for (int it = 1; it < ITERS; ++it) mc = fmaxf(mc, s[it]);
#pragma unroll
        for (int o = LPT; o < 32; o <<= 1) mc = fmaxf(mc, __shfl_xor_sync(kFull, mc, o));
        const float m_new = fmaxf(m_run, mc);   // finite: every chunk has a valid token
        const float alpha = exp2f(m_run - m_new);
        float ps = 0.f;
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            s[it] = exp2f(s[it] - m_new);
            ps += s[it];
        }
#pragma unroll
        for (int o = LPT; o < 32; o <<= 1) ps += __shfl_xor_sync(kFull, ps, o);
        l_run = l_run * alpha + ps;
        m_run = m_new;
        if (writer) {
#pragma unroll
            for (int it = 0; it < ITERS; ++it) wx[(it * TPI + sub) * GP + head] = s[it];
            if (sub == 0) wx[kChunk * GP + head] = alpha;
        }
        __syncwarp();
        // 2c. rescale and accumulate p . v for every head
        float al[GP];
#pragma unroll
        for (int h = 0; h < GP; ++h) al[h] = wx[kChunk * GP + h];
#pragma unroll
        for (int h = 0; h < GP; ++h)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[h][e] *= al[h];
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            float vf[8], p[GP];
            Vec<T>::to_float(src[(ITERS + it) * 32 + lane], vf);   // zeros past the context
#pragma unroll
            for (int h = 0; h < GP; ++h) p[h] = wx[(it * TPI + sub) * GP + h];
#pragma unroll
            for (int h = 0; h < GP; ++h)
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[h][e] = fmaf(p[h], vf[e], acc[h][e]);
        }
        __syncwarp();   // wx is rewritten by the next chunk
    }
    cp_async_wait<0>();

    // 3. sum the token groups of the warp, then merge the warps (each has its own running max)
#pragma unroll
    for (int o = LPT; o < 32; o <<= 1)
#pragma unroll
        for (int h = 0; h < GP; ++h)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[h][e] += __shfl_xor_sync(kFull, acc[h][e], o);
    __syncthreads();   // every warp is done with its stages: reuse them
    float *red = smem;                         // [warp][GP][D]
    float *wml = smem + kWarps * GP * D;       // [warp][GP][2]
    if (lane < LPT) {
#pragma unroll
        for (int h = 0; h < GP; ++h)
#pragma unroll
            for (int e = 0; e < 8; ++e) red[(warp * GP + h) * D + dim0 + e] = acc[h][e];
    }
    if (writer && sub == 0) {
        wml[(warp * GP + head) * 2] = m_run;
        wml[(warp * GP + head) * 2 + 1] = l_run;
    }
    __syncthreads();

    // 4. write the output (one partition) or this partition's share for merge_kernel
    finish_block<T, D, GP, kWarps, kThreads>(a, red, wml, out, seq, h0, nheads, split, direct);
}

template <typename T, int D, int GP, int STAGES>
pa_status launch_decode_stages(const DecodeArgs &a, int num_seqs, cudaStream_t stream) {
    const size_t smem =
        sizeof(float) * front_floats<GP, D, STAGES>() + sizeof(int) * ((a.partition >> a.bs_log2) + 2);
    if (smem > 200 * 1024)
        return cuda_fail(PA_ERR_UNSUPPORTED, "decode_kernel: partition_size %d with block_size %d needs %zu "
                         "bytes of shared memory", a.partition, 1 << a.bs_log2, smem);
    PA_RETURN_IF_ERR((raise_smem_limit<decode_kernel<T, D, GP, STAGES>>("decode_kernel")));
    dim3 grid(a.max_splits, a.num_kv_heads * a.head_groups, num_seqs);
    return launch_with_attribute(decode_kernel<T, D, GP, STAGES>, "decode_kernel", grid, smem, kThreads, stream,
                                 pdl_attribute(), a);
}

template <typename T, int D, int GP>
pa_status launch_decode(const DecodeArgs &a, int num_seqs, cudaStream_t stream) {
    const int num_sms = device_sms();
    const long blocks = (long)a.max_splits * a.num_kv_heads * a.head_groups * num_seqs;
    const pa_status st = blocks < num_sms ? launch_decode_stages<T, D, GP, 4>(a, num_seqs, stream)
                                          : launch_decode_stages<T, D, GP, 2>(a, num_seqs, stream);
    if (st != PA_OK) return st;
    return launch_merge<T, D>(a, num_seqs, stream);
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

namespace decode {

__attribute__((visibility("hidden"))) pa_status make_decode_args(
    DecodeArgs &a, const char *name, void *out, float *partial_out, float *partial_ml, const void *q,
    const void *key_cache, const void *value_cache, const int32_t *block_tables, const int32_t *context_lens,
    const int32_t *query_start_loc, int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
    int32_t block_size, int32_t max_blocks_per_seq, int32_t partition_size, int32_t max_splits, int64_t q_stride,
    float scale, int gp) {
    PA_RETURN_IF_ERR(fill_paged_args(a, name, out, q, key_cache, value_cache, block_tables, context_lens,
                                     query_start_loc, num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                                     max_blocks_per_seq, q_stride, scale));
    if (max_splits <= 0) return cuda_fail(PA_ERR_INVALID_ARG, "%s: bad arguments (max_splits %d)", name, (int)max_splits);
    if (partition_size <= 0 || partition_size % 16)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: partition_size %d is not a positive multiple of 16", name,
                         (int)partition_size);
    if (max_splits > 1 && (partial_out == nullptr || partial_ml == nullptr))
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: max_splits %d needs the partial_out/partial_ml workspace", name,
                         (int)max_splits);
    if (max_splits > 65535)
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: max_splits %d exceeds 65535", name, (int)max_splits);
    a.partial_out = partial_out;
    a.partial_ml = partial_ml;
    a.head_groups = (a.group + gp - 1) / gp;
    a.partition = partition_size;
    a.max_splits = max_splits;
    a.counters = nullptr;
    return PA_OK;
}

}  // namespace decode

extern "C" pa_status pa_paged_attention_decode_cuda(void *out, float *partial_out, float *partial_ml, const void *q,
                                                    const void *key_cache, const void *value_cache,
                                                    const int32_t *block_tables, const int32_t *context_lens,
                                                    const int32_t *query_start_loc, int32_t num_seqs,
                                                    int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
                                                    int32_t block_size, int32_t max_blocks_per_seq,
                                                    int32_t partition_size, int32_t max_splits, int64_t q_stride,
                                                    float scale, int32_t dtype, void *stream) {
    const char *name = "decode_kernel";
    int gp_fit = 1;   // query heads a block takes: the group rounded up to a power of two, at most 8
    const int group = num_kv_heads > 0 ? num_heads / num_kv_heads : 1;
    while (gp_fit < group && gp_fit < 8) gp_fit <<= 1;
    DecodeArgs a;
    PA_RETURN_IF_ERR(make_decode_args(a, name, out, partial_out, partial_ml, q, key_cache, value_cache, block_tables,
                                      context_lens, query_start_loc, num_seqs, num_heads, num_kv_heads, head_dim,
                                      block_size, max_blocks_per_seq, partition_size, max_splits, q_stride, scale,
                                      gp_fit));
    if (num_seqs == 0) return PA_OK;
    cudaStream_t st = (cudaStream_t)stream;
    return dispatch_dtype(dtype, name, [&](auto tag) {
        using T = decltype(tag);
        return head_dim == 64 ? launch_decode_g<T, 64>(a, gp_fit, num_seqs, st)
                              : launch_decode_g<T, 128>(a, gp_fit, num_seqs, st);
    });
}

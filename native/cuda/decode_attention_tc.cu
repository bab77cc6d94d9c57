// decode_attention_tc.cu -- paged decode attention on the tensor cores (mma.sync m16n8k16), for GQA.
//
// Same grid and outputs as decode_attention.cu (one block -- 4 warps; 8 when there are fewer (sequence,
// kv head) units than SMs -- per (partition, kv head [x group of query heads], sequence); partitions
// merged by merge_kernel or by the last of them to finish), but the arithmetic is two small matrix
// products per 16-token chunk: the kv head's query heads are the M = 16 rows (padded with zero rows),
//   S [16 heads x 16 tokens] = Q [16 x D] . K^T      (D/16 k-steps x 2 n-tiles of 8 tokens)
//   O [16 heads x D]        += P [16 x 16 tokens] . V (D/8 n-tiles, one k-step)
// S's accumulator fragments are re-packed in registers as P's A fragments (no shared-memory trip).
// K and V of a chunk come in by cp.async (16 B a lane) into a per-warp ring of kStages stages, rows
// XOR-swizzled in 16-byte units so the ldmatrix reads (K plain, V transposed) are conflict-free.
// Per chunk a warp issues 8 ldmatrix.x4 + 16 mma for S and 8 ldmatrix.x4.trans + 16 mma for P.V
// (D = 128): ~10x fewer instructions than the CUDA-core kernel, which ncu showed issue-bound.
#include "decode_common.cuh"

using namespace decode;

// PA_STAMPS (diagnostic builds only, scripts/stamps_attention.py): thread 0 of each block records %smid and
// %globaltimer at entry, after the PDL wait, after its first chunk, a quarter and half way through warp 0's
// chunks, after every warp's loop and at exit; pa_debug_stamps copies them out (the last launch's, 8
// words a block, blocks in linear grid order).
#ifdef PA_STAMPS
constexpr long kStampBlocks = 16384, kChunkStampBlocks = 1024;   // blocks the two buffers have room for
__device__ unsigned long long pa_stamps_buf[kStampBlocks * 8];
__device__ __forceinline__ long stamp_block() {   // the block's index in linear grid order
    return blockIdx.x + (long)gridDim.x * (blockIdx.y + (long)gridDim.y * blockIdx.z);
}
#define PA_STAMP(k, v)                                                                                          \
    do {                                                                                                      \
        if (threadIdx.x == 0 && stamp_block() < kStampBlocks) pa_stamps_buf[stamp_block() * 8 + (k)] = (v);  \
    } while (0)
__device__ __forceinline__ unsigned long long stamp_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %globaltimer;\n" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned long long stamp_smid() {
    unsigned r;
    asm volatile("mov.u32 %0, %smid;\n" : "=r"(r));
    return r;
}
// and lane 0 of each warp the time each of its chunks is ready to compute (at most 256 chunks a warp):
// pa_chunk_buf[(block * 8 + warp) * 256 + j]
__device__ unsigned long long pa_chunk_buf[kChunkStampBlocks * 8 * 256];
extern "C" int pa_debug_stamps(void *dst, long words) {
    return (int)cudaMemcpyFromSymbol(dst, pa_stamps_buf, words * 8);
}
extern "C" int pa_debug_chunks(void *dst, long words) {
    return (int)cudaMemcpyFromSymbol(dst, pa_chunk_buf, words * 8);
}
#else
#define PA_STAMP(k, v)
#endif

namespace {

constexpr int kChunk = 16;
constexpr unsigned kFull = 0xffffffffu;

// Shared memory, bytes: per warp kStages x (K chunk | V chunk) of 16 rows x D 16-bit values, reused
// at the end for the warp merge ([warp][GP][D] + [warp][GP][2] floats); then the block-table slice.
template <int D, int kStages, int NW> __host__ __device__ constexpr int tc_stage_bytes() {
    return NW * kStages * 2 * kChunk * D * 2;
}
template <int D, int GP, int NW> __host__ __device__ constexpr int tc_merge_bytes() { return NW * GP * (D + 2) * 4; }
template <int D, int GP, int kStages, int NW> __host__ __device__ constexpr int tc_front_bytes() {
    return tc_stage_bytes<D, kStages, NW>() > tc_merge_bytes<D, GP, NW>() ? tc_stage_bytes<D, kStages, NW>()
                                                                          : tc_merge_bytes<D, GP, NW>();
}

// GP: query-head rows a block serves, 8 (the group fits the upper-left half of the m16 tile: only
// accumulator rows 0..7 are real) or 16. NW: warps a block (4: two blocks an SM; 8: one).
template <typename T, int D, int GP, int kStages, int NW>
__global__ void __launch_bounds__(NW * 32, 8 / NW) decode_tc_kernel(DecodeArgs a) {
    constexpr int kWarps = NW, kThreads = NW * 32;
    constexpr int ROW = D * 2;                     // bytes of one token's K (or V) row
    constexpr int CPR = D / 8;                     // 16-byte pieces per row
    constexpr int CHUNK_BYTES = kChunk * ROW;
    constexpr int PIECES = kChunk * CPR / 32;      // pieces per lane per K (or V) chunk
    constexpr int KS = D / 16;                     // k-steps of Q.K^T
    constexpr int NT = D / 8;                      // n-tiles of O
    extern __shared__ __align__(128) unsigned char tc_smem[];

    // Launched as a programmatic dependent of the kernel before it (the qkv GEMV): the block table is
    // staged while that kernel drains, everything it produces (q, the new token's K/V) read after the
    // wait; a PDL-launched kernel after this one (the o GEMV) may start at once and prefetch weights.
    PA_STAMP(1, stamp_now());
    PA_STAMP(0, stamp_smid());
    const DecodeBlock blk = decode_block_pdl(a);
    if (!blk.live) return;
    const int seq = blk.seq, split = blk.split, kv_head = blk.kv_head, hg = blk.hg, q_row = blk.q_row;
    const int ctx = blk.ctx, start = blk.start, end = blk.end, ntok = end - start;
    const bool direct = ctx <= a.partition;
    const int h0 = kv_head * a.group + hg * GP;
    const int nheads = min(GP, a.group - hg * GP);
    T *out = (T *)a.out + ((int64_t)q_row * a.num_heads + h0) * D;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    int *table = reinterpret_cast<int *>(tc_smem + tc_front_bytes<D, GP, kStages, NW>());
    const int first_blk = stage_table(a, blk, table, kThreads);
    __syncthreads();

    const int bs_mask = (1 << a.bs_log2) - 1;
    const bool whole_chunks = a.bs_log2 >= 4;      // a 16-token chunk lies inside one block
    const int nchunks = ntok > 0 ? (ntok + kChunk - 1) / kChunk : 0;
    const int mine = nchunks > warp ? (nchunks - warp + kWarps - 1) / kWarps : 0;
    unsigned char *my_stages = tc_smem + (size_t)warp * kStages * 2 * CHUNK_BYTES;
    const T *kcache = (const T *)a.key_cache, *vcache = (const T *)a.value_cache;
    auto issue = [&](int j) {                      // j-th chunk of this warp -> stage j % kStages
        const int t0 = (warp + j * kWarps) * kChunk;   // partition-local first token
        unsigned char *dst = my_stages + (size_t)(j % kStages) * 2 * CHUNK_BYTES;
        int64_t base = 0;
        if (whole_chunks) {
            const int gt0 = start + t0;
            const int64_t blk = table[(gt0 >> a.bs_log2) - first_blk];
            base = (((blk * a.num_kv_heads + kv_head) << a.bs_log2) + (gt0 & bs_mask)) * D;
        }
#pragma unroll
        for (int p = 0; p < PIECES; ++p) {
            const int idx = p * 32 + lane, tok = idx / CPR, ch = idx % CPR;
            const bool ok = t0 + tok < ntok;
            int64_t off;
            if (whole_chunks) {
                off = base + (int64_t)idx * 8;     // rows of one block are contiguous
            } else {
                off = 0;
                if (ok) {
                    const int gt = start + t0 + tok;
                    const int64_t blk = table[(gt >> a.bs_log2) - first_blk];
                    off = (((blk * a.num_kv_heads + kv_head) << a.bs_log2) + (gt & bs_mask)) * D + ch * 8;
                }
            }
            const int soff = tok * ROW + ((ch ^ (tok & 7)) << 4);
            cp_async16(dst + soff, kcache + off, ok ? 16 : 0);
            cp_async16(dst + CHUNK_BYTES + soff, vcache + off, ok ? 16 : 0);
        }
    };
    // The first chunks go out before the wait when they cannot hold the sequence's newest token (position
    // ctx - 1, the only one the kernel ahead of this one may be writing: pa.h); the rest after it.
    int early = 0;
    for (; early < kStages - 1 && early < mine; ++early) {
        if (start + (warp + early * kWarps) * kChunk + kChunk >= ctx) break;
        issue(early);
        cp_async_commit();
    }
    pdl_wait();
    PA_STAMP(2, stamp_now());

    if (ctx <= 0) {
        for (int i = tid; i < nheads * D; i += kThreads) out[i] = from_f<T>(0.f);
        return;
    }

    // Q as A fragments: row r = lane / 4 (and r + 8), columns c2, c2 + 1 (and + 8) of each k-step.
    const int r = lane >> 2, c2 = (lane & 3) * 2;
    uint32_t qf[KS][4];
    {
        const T *qb = (const T *)a.q + (int64_t)q_row * a.q_stride + (int64_t)h0 * D;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            const bool lo = r < nheads, hi = GP == 16 && r + 8 < nheads;
            qf[ks][0] = lo ? *reinterpret_cast<const uint32_t *>(qb + r * D + ks * 16 + c2) : 0u;
            qf[ks][2] = lo ? *reinterpret_cast<const uint32_t *>(qb + r * D + ks * 16 + 8 + c2) : 0u;
            qf[ks][1] = hi ? *reinterpret_cast<const uint32_t *>(qb + (r + 8) * D + ks * 16 + c2) : 0u;
            qf[ks][3] = hi ? *reinterpret_cast<const uint32_t *>(qb + (r + 8) * D + ks * 16 + 8 + c2) : 0u;
        }
    }
    for (int j = early; j < kStages - 1; ++j) {
        if (j < mine) issue(j);
        cp_async_commit();
    }

    // ldmatrix row addresses of this lane: matrix m = lane / 8 supplies rows lane % 8.
    const int mi = lane >> 3;
    const int tok_k = ((mi >> 1) << 3) + (lane & 7), half_k = mi & 1;    // K: (n-tile, k half)
    const int tok_v = ((mi & 1) << 3) + (lane & 7), half_v = mi >> 1;    // V: (k half, n-tile)
    const unsigned ring = (unsigned)__cvta_generic_to_shared(my_stages);

    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;   // rows r and r + 8

    // The warps go round in step: a barrier a round keeps the block's copies on one window of kWarps
    // chunks instead of letting warps drift apart (~1 % faster at batch >= 16: results_cuda.md session
    // 11). Every warp runs `rounds` rounds, so the barrier is uniform; a warp past its chunks only waits.
    const int rounds = (nchunks + kWarps - 1) / kWarps;
    for (int j = 0; j < rounds; ++j) {
        __syncthreads();
        if (j >= mine) continue;
        if (j + kStages - 1 < mine) issue(j + kStages - 1);
        cp_async_commit();
        cp_async_wait<kStages - 1>();   // this lane's copies of chunk j have landed ...
        __syncwarp();                   // ... and every other lane's (ldmatrix reads them all)
        const unsigned kb = ring + (unsigned)((j % kStages) * 2 * CHUNK_BYTES), vb = kb + CHUNK_BYTES;
        const int t0 = (warp + j * kWarps) * kChunk;

        // S = Q . K^T: n-tile 0 = tokens 0..7, n-tile 1 = tokens 8..15
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            uint32_t b[4];
            ldsm_x4(b, kb + tok_k * ROW + (((ks * 2 + half_k) ^ (tok_k & 7)) << 4));
            Mma<T>::run(s[0], qf[ks], b[0], b[1]);
            Mma<T>::run(s[1], qf[ks], b[2], b[3]);
        }
        // online softmax (log2 domain); a row's 16 scores live in the 4 lanes of a quad
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int tok = n * 8 + c2 + (e & 1);
                s[n][e] = t0 + tok < ntok ? s[n][e] * a.scale_log2e : -INFINITY;
            }
        float mx = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
        mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 2));
        const float mn_lo = fmaxf(m_lo, mx);       // finite: every chunk has a valid token
        const float al_lo = exp2f(m_lo - mn_lo);
        m_lo = mn_lo;
        float ps = 0.f;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                s[n][e] = exp2f(s[n][e] - mn_lo);
                ps += s[n][e];
            }
        l_lo = l_lo * al_lo + ps;   // this lane's share; the quad is summed at the end
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            o[n][0] *= al_lo;
            o[n][1] *= al_lo;
        }
        uint32_t pa[4];
        pa[0] = Mma<T>::pack(s[0][0], s[0][1]);
        pa[2] = Mma<T>::pack(s[1][0], s[1][1]);
        pa[1] = pa[3] = 0u;
        if constexpr (GP == 16) {
            float mh = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
            mh = fmaxf(mh, __shfl_xor_sync(kFull, mh, 1));
            mh = fmaxf(mh, __shfl_xor_sync(kFull, mh, 2));
            const float mn_hi = fmaxf(m_hi, mh);
            const float al_hi = exp2f(m_hi - mn_hi);
            m_hi = mn_hi;
            float ph = 0.f;
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 2; e < 4; ++e) {
                    s[n][e] = exp2f(s[n][e] - mn_hi);
                    ph += s[n][e];
                }
            l_hi = l_hi * al_hi + ph;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                o[n][2] *= al_hi;
                o[n][3] *= al_hi;
            }
            pa[1] = Mma<T>::pack(s[0][2], s[0][3]);
            pa[3] = Mma<T>::pack(s[1][2], s[1][3]);
        }
        // O += P . V: V rows are tokens (k), read transposed into B fragments two n-tiles at a time
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t b[4];
            ldsm_x4_trans(b, vb + tok_v * ROW + (((dp * 2 + half_v) ^ (tok_v & 7)) << 4));
            Mma<T>::run(o[2 * dp], pa, b[0], b[1]);
            Mma<T>::run(o[2 * dp + 1], pa, b[2], b[3]);
        }
        __syncwarp();   // every lane is done reading this stage before it is refilled
#ifdef PA_STAMPS
        if (lane == 0 && j < 256 && stamp_block() < kChunkStampBlocks)
            pa_chunk_buf[(stamp_block() * 8 + warp) * 256 + j] = stamp_now();
        if (j == 0) PA_STAMP(3, stamp_now());
        if (j + 1 == mine / 4) PA_STAMP(6, stamp_now());
        if (j + 1 == mine / 2) PA_STAMP(7, stamp_now());
#endif
    }
    cp_async_wait<0>();

    // merge the warps: unnormalised O rows and (max, quad-summed sum) through shared memory
    l_lo += __shfl_xor_sync(kFull, l_lo, 1);
    l_lo += __shfl_xor_sync(kFull, l_lo, 2);
    l_hi += __shfl_xor_sync(kFull, l_hi, 1);
    l_hi += __shfl_xor_sync(kFull, l_hi, 2);
    __syncthreads();   // every warp is done with its stages: reuse them
    PA_STAMP(4, stamp_now());
    float *red = reinterpret_cast<float *>(tc_smem);   // [warp][GP][D]
    float *wml = red + kWarps * GP * D;                 // [warp][GP][2]
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        red[(warp * GP + r) * D + n * 8 + c2] = o[n][0];
        red[(warp * GP + r) * D + n * 8 + c2 + 1] = o[n][1];
        if constexpr (GP == 16) {
            red[(warp * GP + r + 8) * D + n * 8 + c2] = o[n][2];
            red[(warp * GP + r + 8) * D + n * 8 + c2 + 1] = o[n][3];
        }
    }
    if ((lane & 3) == 0) {
        wml[(warp * GP + r) * 2] = m_lo;
        wml[(warp * GP + r) * 2 + 1] = l_lo;
        if constexpr (GP == 16) {
            wml[(warp * GP + r + 8) * 2] = m_hi;
            wml[(warp * GP + r + 8) * 2 + 1] = l_hi;
        }
    }
    __syncthreads();
    finish_block<T, D, GP, kWarps, kThreads>(a, red, wml, out, seq, h0, nheads, split, direct);
    PA_STAMP(5, stamp_now());
    if (direct || a.counters == nullptr) return;

    // The last partition of this (sequence, head group) to finish merges them all (no merge launch): the
    // block's partial stores, a barrier, then one thread's acq_rel arrival -- its release covers the
    // block's stores (ordered before it by the barrier), and in the last block its acquire, passed on by
    // the second barrier, orders every partition's partials before the merge's loads. (One acq_rel atomic
    // in place of each thread's __threadfence, the atomic and a second fence: 6.5 -> 6.2 us at batch 1 /
    // 1k, H200, results_cuda.md session 6.)
    __shared__ int is_last;
    const int n = (ctx + a.partition - 1) / a.partition;
    __syncthreads();
    if (tid == 0) is_last = last_arrival(a.counters + (int64_t)seq * gridDim.y + blockIdx.y, n);
    __syncthreads();
    if (!is_last) return;
    if (merge_block<T, D, GP, kThreads>(a, reinterpret_cast<float *>(tc_smem), tc_front_bytes<D, GP, kStages, NW>() / 4,
                                        out, seq, h0, nheads, n))
        return;
    for (int i = tid; i < nheads * D; i += kThreads) {
        const int h = i / D, d = i % D;
        const int64_t base = ((int64_t)seq * a.num_heads + h0 + h) * a.max_splits;
        out[i] = from_f<T>(merge_partitions<D>(a.partial_ml + base * 2, a.partial_out + base * D + d, n));
    }
}

template <typename T, int D, int GP, int STAGES, int NW>
pa_status launch_tc_stages(const DecodeArgs &a, int num_seqs, cudaStream_t stream) {
    const size_t smem = tc_front_bytes<D, GP, STAGES, NW>() + sizeof(int) * ((a.partition >> a.bs_log2) + 2);
    if (smem > 200 * 1024)
        return cuda_fail(PA_ERR_UNSUPPORTED, "decode_tc_kernel: partition_size %d with block_size %d needs %zu "
                         "bytes of shared memory", a.partition, 1 << a.bs_log2, smem);
    PA_RETURN_IF_ERR((raise_smem_limit<decode_tc_kernel<T, D, GP, STAGES, NW>>("decode_tc_kernel")));
    dim3 grid(a.max_splits, a.num_kv_heads * a.head_groups, num_seqs);
    PA_RETURN_IF_ERR(launch_with_attribute(decode_tc_kernel<T, D, GP, STAGES, NW>, "decode_tc_kernel", grid, smem,
                                           NW * 32, stream, pdl_attribute(), a));
    return a.counters != nullptr ? PA_OK : launch_merge<T, D>(a, num_seqs, stream);
}

// Fewer (sequence, kv head) units than SMs: 8-warp blocks with three stages (192 KB at D = 128: one
// block an SM; on the H200 1-4 % faster than 4 warps with four stages, benchmarks/results_cuda.md
// session 4), so each SM has twice the warps to hide the per-chunk latency and 16 chunks in flight.
// Otherwise 4-warp blocks with three stages (96 KB at D = 128: two blocks an SM, which is also the
// register limit).
// Block shape switches for A/B builds (scripts/build_ab.sh NAME -DTC_SMALL_WARPS=4 ...): session 8 call 8
// found every shape of 4 / 8 warps x 2-6 stages within 1 % of these at batch >= 16 (results_cuda.md).
#ifndef TC_SMALL_WARPS
#define TC_SMALL_WARPS 8
#endif
#ifndef TC_SMALL_STAGES
#define TC_SMALL_STAGES 3
#endif
#ifndef TC_BIG_WARPS
#define TC_BIG_WARPS 4
#endif
#ifndef TC_BIG_STAGES
#define TC_BIG_STAGES 3
#endif
template <typename T, int D, int GP>
pa_status launch_tc(const DecodeArgs &a, int num_seqs, cudaStream_t stream) {
    const int num_sms = device_sms();
    // Units, not blocks: a decode graph sizes its grid for its longest context (max_splits), while the
    // live blocks of a step are the units times the partitions its contexts fill.
    const long units = (long)a.num_kv_heads * a.head_groups * num_seqs;
    return units < num_sms ? launch_tc_stages<T, D, GP, TC_SMALL_STAGES, TC_SMALL_WARPS>(a, num_seqs, stream)
                           : launch_tc_stages<T, D, GP, TC_BIG_STAGES, TC_BIG_WARPS>(a, num_seqs, stream);
}

}  // namespace

extern "C" pa_status pa_paged_attention_decode_tc_cuda(void *out, float *partial_out, float *partial_ml,
                                                       int32_t *counters, const void *q, const void *key_cache,
                                                       const void *value_cache, const int32_t *block_tables,
                                                       const int32_t *context_lens, const int32_t *query_start_loc,
                                                       int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads,
                                                       int32_t head_dim, int32_t block_size,
                                                       int32_t max_blocks_per_seq, int32_t partition_size,
                                                       int32_t max_splits, int64_t q_stride, float scale,
                                                       int32_t dtype, void *stream) {
    const char *name = "decode_tc_kernel";
    const int group = num_kv_heads > 0 ? num_heads / num_kv_heads : 1;
    const int gp = group <= 8 ? 8 : 16;
    DecodeArgs a;
    PA_RETURN_IF_ERR(make_decode_args(a, name, out, partial_out, partial_ml, q, key_cache, value_cache, block_tables,
                                      context_lens, query_start_loc, num_seqs, num_heads, num_kv_heads, head_dim,
                                      block_size, max_blocks_per_seq, partition_size, max_splits, q_stride, scale,
                                      gp));
    a.counters = max_splits > 1 ? counters : nullptr;
    if (num_seqs == 0) return PA_OK;
    cudaStream_t st = (cudaStream_t)stream;
    return dispatch_dtype(dtype, name, [&](auto tag) {
        using T = decltype(tag);
        if (head_dim == 64)
            return gp == 8 ? launch_tc<T, 64, 8>(a, num_seqs, st) : launch_tc<T, 64, 16>(a, num_seqs, st);
        return gp == 8 ? launch_tc<T, 128, 8>(a, num_seqs, st) : launch_tc<T, 128, 16>(a, num_seqs, st);
    });
}

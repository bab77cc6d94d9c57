// prefill_attention.cu -- causal attention of query chunks over paged K/V (prefill, chunked prefill
// on a cached prefix, and mixed batches). Correctness first: a tiled kernel on CUDA cores.
//
// One thread block per (tile of query tokens, kv head, sequence). The tile holds 32 query rows:
// 32 / group tokens x all query heads of the kv head, so each K/V tile is loaded once for all of them.
// Keys go through shared memory 32 at a time; lane j of a warp scores key j for the warp's 8 rows,
// then an online softmax (log2 domain) updates each row's running max, sum and output.
#include "common.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 32;                 // query rows per block
constexpr int kRowsPerWarp = kRows / kWarps;
constexpr int kKeys = 32;                 // keys per tile

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) prefill_kernel(PrefillArgs a) {
    constexpr int VPR = D / 8;            // 16-byte vectors per row
    constexpr int PAD = 8;                // elements of padding per K/V row: conflict-free 16 B reads
    constexpr int DPL = D / 32;           // output dims per lane
    __shared__ __align__(16) float qs[kRows][D];
    __shared__ __align__(16) T ks[kKeys][D + PAD];
    __shared__ __align__(16) T vs[kKeys][D + PAD];
    __shared__ __align__(16) float ps[kWarps][kKeys][kRowsPerWarp];

    const int seq = blockIdx.z, kv_head = blockIdx.y;
    const int q_begin = a.query_start_loc[seq], qlen = a.query_start_loc[seq + 1] - q_begin;
    const int tok0 = blockIdx.x * a.tile_tokens;
    if (tok0 >= qlen) return;
    const int ctx = a.context_lens[seq];
    const int ntok = min(a.tile_tokens, qlen - tok0), nrows = ntok * a.group;
    const int first_pos = ctx - qlen + tok0;          // position of the tile's first query token
    const int kmax = first_pos + ntok;                 // keys 0 .. kmax-1 are visible to some row
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    // 1. the tile's query rows (row r = token r / group, head r % group), pre-scaled by scale * log2 e
    for (int i = tid; i < kRows * VPR; i += kThreads) {
        const int r = i / VPR, c = i % VPR;
        float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (r < nrows) {
            const int tok = tok0 + r / a.group, head = kv_head * a.group + r % a.group;
            const T *src = (const T *)a.q + (int64_t)(q_begin + tok) * a.q_stride + (int64_t)head * D + c * 8;
            Vec<T>::to_float(*reinterpret_cast<const uint4 *>(src), f);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) qs[r][c * 8 + e] = f[e] * a.scale_log2e;
    }
    int pos[kRowsPerWarp];                 // last key each of this warp's rows may see
    float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][DPL];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
        const int r = warp * kRowsPerWarp + i;
        pos[i] = r < nrows ? first_pos + r / a.group : kmax - 1;
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int e = 0; e < DPL; ++e) acc[i][e] = 0.f;
    }

    const int bs_mask = (1 << a.bs_log2) - 1;
    const int32_t *table = a.block_tables + (int64_t)seq * a.max_blocks;
    for (int k0 = 0; k0 < kmax; k0 += kKeys) {
        __syncthreads();   // the previous tile is consumed (and, the first time, qs is written)
        // 2. K and V tile into shared memory; keys past kmax are zeros
        for (int i = tid; i < kKeys * VPR; i += kThreads) {
            const int j = i / VPR, c = i % VPR, key = k0 + j;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (key < kmax) {
                const int64_t blk = table[key >> a.bs_log2];
                const int64_t off = (((blk * a.num_kv_heads + kv_head) << a.bs_log2) + (key & bs_mask)) * D + c * 8;
                kv = __ldg(reinterpret_cast<const uint4 *>((const T *)a.key_cache + off));
                vv = __ldg(reinterpret_cast<const uint4 *>((const T *)a.value_cache + off));
            }
            *reinterpret_cast<uint4 *>(&ks[j][c * 8]) = kv;
            *reinterpret_cast<uint4 *>(&vs[j][c * 8]) = vv;
        }
        __syncthreads();

        // 3. scores of key (k0 + lane) for the warp's rows
        float s[kRowsPerWarp];
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) s[i] = 0.f;
#pragma unroll 4
        for (int c = 0; c < VPR; ++c) {
            float kf[8];
            Vec<T>::to_float(*reinterpret_cast<const uint4 *>(&ks[lane][c * 8]), kf);
#pragma unroll
            for (int i = 0; i < kRowsPerWarp; ++i) {
                const float4 qa = *reinterpret_cast<const float4 *>(&qs[warp * kRowsPerWarp + i][c * 8]);
                const float4 qb = *reinterpret_cast<const float4 *>(&qs[warp * kRowsPerWarp + i][c * 8 + 4]);
                s[i] = fmaf(qa.x, kf[0], s[i]);
                s[i] = fmaf(qa.y, kf[1], s[i]);
                s[i] = fmaf(qa.z, kf[2], s[i]);
                s[i] = fmaf(qa.w, kf[3], s[i]);
                s[i] = fmaf(qb.x, kf[4], s[i]);
                s[i] = fmaf(qb.y, kf[5], s[i]);
                s[i] = fmaf(qb.z, kf[6], s[i]);
                s[i] = fmaf(qb.w, kf[7], s[i]);
            }
        }

        // 4. online softmax per row; probabilities to shared memory for the p . v loop
        const int key = k0 + lane;
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
            const float si = key <= pos[i] ? s[i] : -INFINITY;
            const float m_new = fmaxf(m[i], warp_max(si));   // finite: key 0 is visible to every row
            const float alpha = exp2f(m[i] - m_new);
            const float p = exp2f(si - m_new);
            l[i] = l[i] * alpha + warp_sum(p);
            m[i] = m_new;
#pragma unroll
            for (int e = 0; e < DPL; ++e) acc[i][e] *= alpha;
            ps[warp][lane][i] = p;
        }
        __syncwarp();

        // 5. acc += p . v (lane owns DPL consecutive dims)
#pragma unroll 4
        for (int j = 0; j < kKeys; ++j) {
            float vf[DPL];
            if constexpr (DPL == 4) {
                const uint2 raw = *reinterpret_cast<const uint2 *>(&vs[j][lane * 4]);
                const T *h = reinterpret_cast<const T *>(&raw);
#pragma unroll
                for (int e = 0; e < 4; ++e) vf[e] = to_f(h[e]);
            } else {
                const uint32_t raw = *reinterpret_cast<const uint32_t *>(&vs[j][lane * DPL]);
                const T *h = reinterpret_cast<const T *>(&raw);
#pragma unroll
                for (int e = 0; e < DPL; ++e) vf[e] = to_f(h[e]);
            }
            float p[kRowsPerWarp];
            *reinterpret_cast<float4 *>(&p[0]) = *reinterpret_cast<const float4 *>(&ps[warp][j][0]);
            *reinterpret_cast<float4 *>(&p[4]) = *reinterpret_cast<const float4 *>(&ps[warp][j][4]);
#pragma unroll
            for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
                for (int e = 0; e < DPL; ++e) acc[i][e] = fmaf(p[i], vf[e], acc[i][e]);
        }
        __syncwarp();
    }

    // 6. normalise and store the valid rows
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
        const int r = warp * kRowsPerWarp + i;
        if (r >= nrows) continue;
        const int tok = tok0 + r / a.group, head = kv_head * a.group + r % a.group;
        T *dst = (T *)a.out + ((int64_t)(q_begin + tok) * a.num_heads + head) * D + lane * DPL;
        const float inv = 1.f / l[i];
#pragma unroll
        for (int e = 0; e < DPL; ++e) dst[e] = from_f<T>(acc[i][e] * inv);
    }
}

}  // namespace

extern "C" pa_status pa_paged_attention_prefill_cuda(void *out, const void *q, const void *key_cache,
                                                     const void *value_cache, const int32_t *block_tables,
                                                     const int32_t *context_lens, const int32_t *query_start_loc,
                                                     int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads,
                                                     int32_t head_dim, int32_t block_size, int32_t max_blocks_per_seq,
                                                     int32_t max_query_len, int64_t q_stride, float scale,
                                                     int32_t dtype, void *stream) {
    const char *name = "prefill_kernel";
    PrefillArgs a;
    PA_RETURN_IF_ERR(fill_paged_args(a, name, out, q, key_cache, value_cache, block_tables, context_lens,
                                     query_start_loc, num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                                     max_blocks_per_seq, q_stride, scale));
    PA_RETURN_IF_ERR(check_prefill(name, a, max_query_len, kRows));
    if (num_seqs == 0 || max_query_len == 0) return PA_OK;
    a.tile_tokens = kRows / a.group;
    dim3 grid((max_query_len + a.tile_tokens - 1) / a.tile_tokens, num_kv_heads, num_seqs);
    return dispatch_dtype(dtype, name, [&](auto tag) {
        using T = decltype(tag);
        if (head_dim == 64) prefill_kernel<T, 64><<<grid, kThreads, 0, (cudaStream_t)stream>>>(a);
        else prefill_kernel<T, 128><<<grid, kThreads, 0, (cudaStream_t)stream>>>(a);
        return check_launch(name);
    });
}

// prefill_attention_tc.cu -- causal attention of query chunks over paged K/V on the tensor cores
// (mma.sync m16n8k16), in the FlashAttention-2 pattern: prefill, chunked prefill on a cached prefix, and
// the decode rows of mixed steps. Same entry arguments and results as prefill_attention.cu (CUDA cores).
//
// One block (4 warps) per (tile of query rows, kv head, sequence). A tile is 64 rows -- 64 / group
// tokens x the group's query heads, so each K/V tile is read once for all heads of the kv head; warp w
// owns rows 16w .. 16w + 15 as the M rows of its products. Keys go through shared memory 64 at a time
// (cp.async, kStages tiles in flight, rows XOR-swizzled in 16-byte units as in decode_attention_tc.cu):
//   S [16 rows x 64 keys] = Q [16 x D] . K^T      (D/16 k-steps x 8 n-tiles)
//   O [16 rows x D]      += P [16 x 64] . V       (4 k-steps x D/8 n-tiles)
// with an online softmax (log2 domain) per row in between; S's accumulators become P's A fragments in
// registers. A warp skips the key tiles past its rows' last position and masks only the tiles that
// cross the diagonal; blocks run the longest query tiles (the last of a chunk) first.
#include "mma.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = kWarps * 16;        // query rows (token x head) a block
constexpr int kKeys = 64;                 // keys a tile
constexpr unsigned kFull = 0xffffffffu;

struct PrefillTcArgs : PagedArgs {
    int tile_tokens;
};

template <int D, int kStages> __host__ __device__ constexpr int prefill_tc_smem() {
    return kStages * 2 * kKeys * D * 2;
}

template <typename T, int D, int kStages>
__global__ void __launch_bounds__(kThreads, 2) prefill_tc_kernel(PrefillTcArgs a) {
    constexpr int ROW = D * 2;                      // bytes of one key's K (or V) row
    constexpr int CPR = D / 8;                      // 16-byte pieces a row
    constexpr int TILE_BYTES = kKeys * ROW;
    constexpr int PIECES = kKeys * CPR / kThreads;  // pieces a thread per K (or V) tile
    constexpr int KS = D / 16;                      // k-steps of Q . K^T
    constexpr int NT = D / 8;                       // n-tiles of O
    constexpr int SN = kKeys / 8;                   // n-tiles of S
    extern __shared__ __align__(128) unsigned char pf_smem[];

    const int seq = blockIdx.z, kv_head = blockIdx.y;
    const int q_begin = a.query_start_loc[seq], qlen = a.query_start_loc[seq + 1] - q_begin;
    const int tile = (int)gridDim.x - 1 - (int)blockIdx.x;    // the longest (last) tiles first
    const int tok0 = tile * a.tile_tokens;
    if (tok0 >= qlen) return;
    const int ctx = a.context_lens[seq];
    const int ntok = min(a.tile_tokens, qlen - tok0), nrows = ntok * a.group;
    const int first_pos = ctx - qlen + tok0;       // position of the tile's first query token
    const int kmax = first_pos + ntok;              // keys 0 .. kmax - 1 are visible to some row
    const int ntiles = (kmax + kKeys - 1) / kKeys;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    const int bs_mask = (1 << a.bs_log2) - 1;
    const int32_t *table = a.block_tables + (int64_t)seq * a.max_blocks;
    const T *kcache = (const T *)a.key_cache, *vcache = (const T *)a.value_cache;
    auto issue = [&](int t) {                       // key tile t -> stage t % kStages
        unsigned char *dst = pf_smem + (size_t)(t % kStages) * 2 * TILE_BYTES;
#pragma unroll
        for (int p = 0; p < PIECES; ++p) {
            const int idx = p * kThreads + tid, j = idx / CPR, ch = idx % CPR, key = t * kKeys + j;
            const bool ok = key < kmax;
            int64_t off = 0;
            if (ok) {
                const int64_t blk = __ldg(table + (key >> a.bs_log2));
                off = (((blk * a.num_kv_heads + kv_head) << a.bs_log2) + (key & bs_mask)) * D + ch * 8;
            }
            const int soff = j * ROW + ((ch ^ (j & 7)) << 4);
            cp_async16(dst + soff, kcache + off, ok ? 16 : 0);     // keys past kmax: zeros (P . V stays finite)
            cp_async16(dst + TILE_BYTES + soff, vcache + off, ok ? 16 : 0);
        }
    };
#pragma unroll
    for (int t = 0; t < kStages - 1; ++t) {
        if (t < ntiles) issue(t);
        cp_async_commit();
    }

    // This lane's rows: r_lo = 16 warp + lane / 4 and r_hi = r_lo + 8 (the accumulator layout); a row is
    // (token r / group, head r % group). Rows past nrows see every key (finite sums) and are not stored.
    const int r = lane >> 2, c2 = (lane & 3) * 2;
    const int r_lo = warp * 16 + r, r_hi = r_lo + 8;
    const int pos_lo = r_lo < nrows ? first_pos + r_lo / a.group : kmax - 1;
    const int pos_hi = r_hi < nrows ? first_pos + r_hi / a.group : kmax - 1;
    const bool warp_live = warp * 16 < nrows;
    const int warp_first = first_pos + (warp * 16) / a.group;                     // smallest position
    const int warp_last = first_pos + (min(warp * 16 + 15, nrows - 1)) / a.group;  // largest
    const int warp_tiles = warp_live ? warp_last / kKeys + 1 : 0;

    // Q as A fragments: rows r_lo, r_hi; columns c2, c2 + 1 (and + 8) of each k-step.
    uint32_t qf[KS][4];
    {
        const T *qlo = (const T *)a.q + (int64_t)(q_begin + tok0 + r_lo / a.group) * a.q_stride +
                       (int64_t)(kv_head * a.group + r_lo % a.group) * D;
        const T *qhi = (const T *)a.q + (int64_t)(q_begin + tok0 + r_hi / a.group) * a.q_stride +
                       (int64_t)(kv_head * a.group + r_hi % a.group) * D;
        const bool lo = r_lo < nrows, hi = r_hi < nrows;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            qf[ks][0] = lo ? *reinterpret_cast<const uint32_t *>(qlo + ks * 16 + c2) : 0u;
            qf[ks][2] = lo ? *reinterpret_cast<const uint32_t *>(qlo + ks * 16 + 8 + c2) : 0u;
            qf[ks][1] = hi ? *reinterpret_cast<const uint32_t *>(qhi + ks * 16 + c2) : 0u;
            qf[ks][3] = hi ? *reinterpret_cast<const uint32_t *>(qhi + ks * 16 + 8 + c2) : 0u;
        }
    }

    // ldmatrix row addresses of this lane: matrix m = lane / 8 supplies rows lane % 8.
    const int mi = lane >> 3;
    const int tok_k = ((mi >> 1) << 3) + (lane & 7), half_k = mi & 1;    // K: (n-tile, k half)
    const int tok_v = ((mi & 1) << 3) + (lane & 7), half_v = mi >> 1;    // V: (k half, n-tile)
    const unsigned ring = (unsigned)__cvta_generic_to_shared(pf_smem);

    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

    for (int t = 0; t < ntiles; ++t) {
        if (t + kStages - 1 < ntiles) issue(t + kStages - 1);
        cp_async_commit();
        cp_async_wait<kStages - 1>();   // this thread's copies of tile t have landed ...
        __syncthreads();                // ... and every thread's
        if (t < warp_tiles) {
            const int k0 = t * kKeys;
            const unsigned kb = ring + (unsigned)((t % kStages) * 2 * TILE_BYTES), vb = kb + TILE_BYTES;
            float s[SN][4];
#pragma unroll
            for (int n = 0; n < SN; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks)
#pragma unroll
                for (int np = 0; np < SN / 2; ++np) {
                    uint32_t b[4];
                    ldsm_x4(b, kb + (np * 16 + tok_k) * ROW + (((ks * 2 + half_k) ^ (tok_k & 7)) << 4));
                    Mma<T>::run(s[2 * np], qf[ks], b[0], b[1]);
                    Mma<T>::run(s[2 * np + 1], qf[ks], b[2], b[3]);
                }
            // scale; the causal mask only where the tile reaches past the warp's first position
            const bool masked = k0 + kKeys - 1 > warp_first;
#pragma unroll
            for (int n = 0; n < SN; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = k0 + n * 8 + c2 + (e & 1);
                    const int pos = e < 2 ? pos_lo : pos_hi;
                    s[n][e] = !masked || key <= pos ? s[n][e] * a.scale_log2e : -INFINITY;
                }
            float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
            for (int n = 0; n < SN; ++n) {
                mx_lo = fmaxf(mx_lo, fmaxf(s[n][0], s[n][1]));
                mx_hi = fmaxf(mx_hi, fmaxf(s[n][2], s[n][3]));
            }
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(kFull, mx_lo, 1));
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(kFull, mx_lo, 2));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(kFull, mx_hi, 1));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(kFull, mx_hi, 2));
            // finite: tile 0 holds key 0, which every row sees, so m is finite from the first tile on
            const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
            const float al_lo = exp2f(m_lo - mn_lo), al_hi = exp2f(m_hi - mn_hi);
            m_lo = mn_lo;
            m_hi = mn_hi;
            float ps_lo = 0.f, ps_hi = 0.f;
#pragma unroll
            for (int n = 0; n < SN; ++n) {
                s[n][0] = exp2f(s[n][0] - mn_lo);
                s[n][1] = exp2f(s[n][1] - mn_lo);
                s[n][2] = exp2f(s[n][2] - mn_hi);
                s[n][3] = exp2f(s[n][3] - mn_hi);
                ps_lo += s[n][0] + s[n][1];
                ps_hi += s[n][2] + s[n][3];
            }
            l_lo = l_lo * al_lo + ps_lo;   // this lane's share; the quad is summed at the end
            l_hi = l_hi * al_hi + ps_hi;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                o[n][0] *= al_lo;
                o[n][1] *= al_lo;
                o[n][2] *= al_hi;
                o[n][3] *= al_hi;
            }
            // O += P . V, 16 keys (two S n-tiles) a k-step
#pragma unroll
            for (int kk = 0; kk < kKeys / 16; ++kk) {
                uint32_t pa[4];
                pa[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
                pa[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
                pa[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                pa[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    uint32_t b[4];
                    ldsm_x4_trans(b, vb + (kk * 16 + tok_v) * ROW + (((dp * 2 + half_v) ^ (tok_v & 7)) << 4));
                    Mma<T>::run(o[2 * dp], pa, b[0], b[1]);
                    Mma<T>::run(o[2 * dp + 1], pa, b[2], b[3]);
                }
            }
        }
        __syncthreads();   // every warp is done with this stage before it is refilled
    }
    cp_async_wait<0>();
    if (!warp_live) return;

    l_lo += __shfl_xor_sync(kFull, l_lo, 1);
    l_lo += __shfl_xor_sync(kFull, l_lo, 2);
    l_hi += __shfl_xor_sync(kFull, l_hi, 1);
    l_hi += __shfl_xor_sync(kFull, l_hi, 2);
    const float inv_lo = 1.f / l_lo, inv_hi = 1.f / l_hi;
    T *out = (T *)a.out;
    if (r_lo < nrows) {
        T *dst = out + ((int64_t)(q_begin + tok0 + r_lo / a.group) * a.num_heads + kv_head * a.group + r_lo % a.group) * D;
#pragma unroll
        for (int n = 0; n < NT; ++n)
            *reinterpret_cast<uint32_t *>(dst + n * 8 + c2) = Mma<T>::pack(o[n][0] * inv_lo, o[n][1] * inv_lo);
    }
    if (r_hi < nrows) {
        T *dst = out + ((int64_t)(q_begin + tok0 + r_hi / a.group) * a.num_heads + kv_head * a.group + r_hi % a.group) * D;
#pragma unroll
        for (int n = 0; n < NT; ++n)
            *reinterpret_cast<uint32_t *>(dst + n * 8 + c2) = Mma<T>::pack(o[n][2] * inv_hi, o[n][3] * inv_hi);
    }
}

template <typename T, int D, int kStages>
pa_status launch_prefill_tc(const PrefillTcArgs &a, dim3 grid, cudaStream_t stream) {
    constexpr int smem = prefill_tc_smem<D, kStages>();
    if constexpr (smem > 48 * 1024) PA_RETURN_IF_ERR((raise_smem_limit<prefill_tc_kernel<T, D, kStages>>("prefill_tc_kernel")));
    prefill_tc_kernel<T, D, kStages><<<grid, kThreads, smem, stream>>>(a);
    return check_launch("prefill_tc_kernel");
}

}  // namespace

extern "C" pa_status pa_paged_attention_prefill_tc_cuda(void *out, const void *q, const void *key_cache,
                                                        const void *value_cache, const int32_t *block_tables,
                                                        const int32_t *context_lens, const int32_t *query_start_loc,
                                                        int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads,
                                                        int32_t head_dim, int32_t block_size,
                                                        int32_t max_blocks_per_seq, int32_t max_query_len,
                                                        int64_t q_stride, float scale, int32_t dtype, void *stream) {
    const char *name = "prefill_tc_kernel";
    PrefillTcArgs a;
    PA_RETURN_IF_ERR(fill_paged_args(a, name, out, q, key_cache, value_cache, block_tables, context_lens,
                                     query_start_loc, num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                                     max_blocks_per_seq, q_stride, scale));
    if (max_query_len < 0) return cuda_fail(PA_ERR_INVALID_ARG, "%s: bad arguments (max_query_len %d)", name,
                                            (int)max_query_len);
    if (a.group > kRows)
        return cuda_fail(PA_ERR_UNSUPPORTED, "%s: %d query heads per kv head (at most %d)", name, a.group, kRows);
    if (num_seqs == 0 || max_query_len == 0) return PA_OK;
    a.tile_tokens = kRows / a.group;
    const dim3 grid((max_query_len + a.tile_tokens - 1) / a.tile_tokens, num_kv_heads, num_seqs);
    cudaStream_t st = (cudaStream_t)stream;
    return dispatch_dtype(dtype, name, [&](auto tag) {
        using T = decltype(tag);
        return head_dim == 64 ? launch_prefill_tc<T, 64, 2>(a, grid, st) : launch_prefill_tc<T, 128, 2>(a, grid, st);
    });
}

// prefill_attention_tc.cu -- causal attention of query chunks over paged K/V on the tensor cores
// (mma.sync m16n8k16), in the FlashAttention-2 pattern: prefill, chunked prefill on a cached prefix, and
// the decode rows of mixed steps. Same entry arguments and results as prefill_attention.cu (CUDA cores).
//
// One block (4 warps) per (tile of query rows, kv head, sequence). A tile is 64 MT rows -- 64 MT / group
// tokens x the group's query heads, so each K/V tile is read once for all heads of the kv head; warp w
// owns MT m16 tiles of rows as the M rows of its products (the K / V fragments it loads serve all MT).
// Keys go through shared memory KEYS at a time (cp.async, STAGES tiles in flight, rows XOR-swizzled in
// 16-byte units as in decode_attention_tc.cu):
//   S [16 rows x KEYS] = Q [16 x D] . K^T      (D/16 k-steps x KEYS/8 n-tiles, per m-tile)
//   O [16 rows x D]   += P [16 x KEYS] . V     (KEYS/16 k-steps x D/8 n-tiles)
// with an online softmax (log2 domain) per row in between; S's accumulators become P's A fragments in
// registers. A warp skips the key tiles past its rows' last position and masks only the tiles that
// cross the diagonal; blocks run the longest query tiles (the last of a chunk) first.
//
// Split keys: when (tiles x kv heads x sequences) would leave most SMs idle -- a short chunk on a long
// prefix, a follow-up turn of a chat -- the keys are cut into spans of split_keys and grid.y runs every
// (split, kv head): a block takes its tile's keys in its span only. A row sees spans 0 .. pos / split_keys;
// a row with one span (pos < split_keys) is written by split 0 as usual, the others leave the span's
// unnormalised O, max and sum, which prefill_merge_kernel folds (log-sum-exp) into the row's output.
#include "mma.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxGroup = 64;             // query heads a kv head (the smallest tile: 64 rows, one token)
constexpr unsigned kFull = 0xffffffffu;

// Per head_dim: MT m16 tiles a warp (rows a block = 64 MT), KEYS keys a tile, Q kept in registers or read
// from shared memory by ldmatrix at each k-step (QSMEM: fewer registers, more shared-memory reads), STAGES
// key tiles in flight. Defaults: the best of six builds on the H200 (scripts/ab_prefill.py, results_cuda.md
// session 7 call 2): head_dim 64 two m-tiles a warp (its 8192 x 8192 chunk 1.40 -> 1.16 ms), 128 one; three
// stages for both; 64-key tiles and Q in registers.
#ifndef PF_TC_MT_64
#define PF_TC_MT_64 2
#endif
#ifndef PF_TC_KEYS_64
#define PF_TC_KEYS_64 64
#endif
#ifndef PF_TC_QSMEM_64
#define PF_TC_QSMEM_64 0
#endif
#ifndef PF_TC_STAGES_64
#define PF_TC_STAGES_64 3
#endif
#ifndef PF_TC_MT_128
#define PF_TC_MT_128 1
#endif
#ifndef PF_TC_KEYS_128
#define PF_TC_KEYS_128 64
#endif
#ifndef PF_TC_QSMEM_128
#define PF_TC_QSMEM_128 0
#endif
#ifndef PF_TC_STAGES_128
#define PF_TC_STAGES_128 3
#endif

// Query tokens a block takes: its warps' rows (MT m-tiles of 16 rows each) over the group's heads. One formula
// for the launcher's grid and for pa_prefill_tc_tile_tokens_cuda, which the split policy in Python reads.
__host__ __device__ constexpr int prefill_tc_tile_tokens(int mt, int group) { return kWarps * mt * 16 / group; }
template <int D> constexpr int prefill_tc_mt() { return D == 64 ? PF_TC_MT_64 : PF_TC_MT_128; }

template <int D, int MT, int KEYS, bool QSMEM, int kStages> __host__ __device__ constexpr int prefill_tc_smem() {
    return kStages * 2 * KEYS * D * 2 + (QSMEM ? kWarps * MT * 16 * D * 2 : 0);
}

template <typename T, int D, int MT, int KEYS, bool QSMEM, int kStages>
__global__ void __launch_bounds__(kThreads, 2) prefill_tc_kernel(PrefillArgs a) {
    constexpr int ROW = D * 2;                      // bytes of one key's K (or V) row
    constexpr int CPR = D / 8;                      // 16-byte pieces a row
    constexpr int TILE_BYTES = KEYS * ROW;
    constexpr int PIECES = KEYS * CPR / kThreads;   // pieces a thread per K (or V) tile
    constexpr int KS = D / 16;                      // k-steps of Q . K^T
    constexpr int NT = D / 8;                       // n-tiles of O
    constexpr int SN = KEYS / 8;                    // n-tiles of S
    constexpr int WROWS = MT * 16;                  // rows a warp
    constexpr int ROWS = kWarps * WROWS;            // rows a block
    static_assert(PIECES * kThreads == KEYS * CPR, "a tile's pieces spread evenly over the threads");
    extern __shared__ __align__(128) unsigned char pf_smem[];

    const int seq = blockIdx.z, kv_head = blockIdx.y % a.num_kv_heads, split = blockIdx.y / a.num_kv_heads;
    const int q_begin = a.query_start_loc[seq], qlen = a.query_start_loc[seq + 1] - q_begin;
    const int tile = (int)gridDim.x - 1 - (int)blockIdx.x;    // the longest (last) tiles first
    const int tok0 = tile * a.tile_tokens;
    if (tok0 >= qlen) return;
    const int ctx = a.context_lens[seq];
    const int ntok = min(a.tile_tokens, qlen - tok0), nrows = ntok * a.group;
    const int first_pos = ctx - qlen + tok0;       // position of the tile's first query token
    const int kmax = first_pos + ntok;              // keys 0 .. kmax - 1 are visible to some row
    // this block's key tiles: [t_begin, ntiles) -- every tile, or those of its split's span
    const int span = a.split_keys > 0 ? a.split_keys : kmax;
    const int k_begin = split * span;
    if (k_begin >= kmax) return;                    // no row of the tile reaches this span
    const int t_begin = k_begin / KEYS, ntiles = (min(kmax, k_begin + span) + KEYS - 1) / KEYS;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    const int bs_mask = (1 << a.bs_log2) - 1;
    const int32_t *table = a.block_tables + (int64_t)seq * a.max_blocks;
    const T *kcache = (const T *)a.key_cache, *vcache = (const T *)a.value_cache;
    unsigned char *qs = pf_smem + kStages * 2 * TILE_BYTES;   // QSMEM: the block's Q rows, swizzled
    auto q_row = [&](int row) {                      // block row -> its q vector
        return (const T *)a.q + (int64_t)(q_begin + tok0 + row / a.group) * a.q_stride +
               (int64_t)(kv_head * a.group + row % a.group) * D;
    };
    auto issue = [&](int t) {                       // key tile t -> stage t % kStages
        unsigned char *dst = pf_smem + (size_t)(t % kStages) * 2 * TILE_BYTES;
#pragma unroll
        for (int p = 0; p < PIECES; ++p) {
            const int idx = p * kThreads + tid, j = idx / CPR, ch = idx % CPR, key = t * KEYS + j;
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
    if constexpr (QSMEM) {                          // with the first tile's group; rows past nrows: zeros
        for (int idx = tid; idx < ROWS * CPR; idx += kThreads) {
            const int row = idx / CPR, ch = idx % CPR;
            const bool ok = row < nrows;
            cp_async16(qs + row * ROW + ((ch ^ (row & 7)) << 4), ok ? q_row(row) + ch * 8 : (const T *)a.q,
                       ok ? 16 : 0);
        }
    }
#pragma unroll
    for (int t = 0; t < kStages - 1; ++t) {
        if (t_begin + t < ntiles) issue(t_begin + t);
        cp_async_commit();
    }

    // This lane's rows: in m-tile mt, r_lo = warp rows + 16 mt + lane / 4 and r_hi = r_lo + 8 (the
    // accumulator layout); a row is (token r / group, head r % group). Rows past nrows see every key
    // (finite sums) and are not stored.
    const int r = lane >> 2, c2 = (lane & 3) * 2;
    int pos[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = warp * WROWS + mt * 16 + h * 8 + r;
            pos[mt][h] = row < nrows ? first_pos + row / a.group : kmax - 1;
        }
    const bool warp_live = warp * WROWS < nrows;
    const int warp_first = first_pos + (warp * WROWS) / a.group;                        // smallest position
    const int warp_last = first_pos + (min(warp * WROWS + WROWS - 1, nrows - 1)) / a.group;  // largest
    const int warp_tiles = warp_live ? warp_last / KEYS + 1 : 0;

    // Q as A fragments (registers): rows r_lo, r_hi of each m-tile; columns c2, c2 + 1 (and + 8).
    uint32_t qf[QSMEM ? 1 : MT][QSMEM ? 1 : KS][4];
    if constexpr (!QSMEM) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const int rl = warp * WROWS + mt * 16 + r, rh = rl + 8;
            const bool lo = rl < nrows, hi = rh < nrows;
            const T *qlo = q_row(lo ? rl : 0), *qhi = q_row(hi ? rh : 0);
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                qf[mt][ks][0] = lo ? *reinterpret_cast<const uint32_t *>(qlo + ks * 16 + c2) : 0u;
                qf[mt][ks][2] = lo ? *reinterpret_cast<const uint32_t *>(qlo + ks * 16 + 8 + c2) : 0u;
                qf[mt][ks][1] = hi ? *reinterpret_cast<const uint32_t *>(qhi + ks * 16 + c2) : 0u;
                qf[mt][ks][3] = hi ? *reinterpret_cast<const uint32_t *>(qhi + ks * 16 + 8 + c2) : 0u;
            }
        }
    }

    // ldmatrix row addresses of this lane: matrix m = lane / 8 supplies rows lane % 8.
    const int mi = lane >> 3;
    const int tok_k = ((mi >> 1) << 3) + (lane & 7), half_k = mi & 1;    // K: (n-tile, k half)
    const int tok_v = ((mi & 1) << 3) + (lane & 7), half_v = mi >> 1;    // V: (k half, n-tile)
    const int row_q = ((mi & 1) << 3) + (lane & 7), half_q = mi >> 1;    // Q: (row half, k half)
    const unsigned ring = (unsigned)__cvta_generic_to_shared(pf_smem);
    const unsigned qbase = (unsigned)__cvta_generic_to_shared(qs) + (unsigned)(warp * WROWS * ROW);

    float o[MT][NT][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < NT; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
        m[mt][0] = m[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.f;
    }

    for (int t = t_begin; t < ntiles; ++t) {
        if (t + kStages - 1 < ntiles) issue(t + kStages - 1);
        cp_async_commit();
        cp_async_wait<kStages - 1>();   // this thread's copies of tile t (and Q) have landed ...
        __syncthreads();                // ... and every thread's
        if (t < warp_tiles) {
            const int k0 = t * KEYS;
            const unsigned kb = ring + (unsigned)((t % kStages) * 2 * TILE_BYTES), vb = kb + TILE_BYTES;
            float s[MT][SN][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < SN; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                uint32_t qa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if constexpr (QSMEM) {
                        const int row = mt * 16 + row_q;
                        ldsm_x4(qa[mt], qbase + row * ROW + (((ks * 2 + half_q) ^ (row & 7)) << 4));
                    } else {
#pragma unroll
                        for (int i = 0; i < 4; ++i) qa[mt][i] = qf[QSMEM ? 0 : mt][QSMEM ? 0 : ks][i];
                    }
                }
#pragma unroll
                for (int np = 0; np < SN / 2; ++np) {
                    uint32_t b[4];
                    ldsm_x4(b, kb + (np * 16 + tok_k) * ROW + (((ks * 2 + half_k) ^ (tok_k & 7)) << 4));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        Mma<T>::run(s[mt][2 * np], qa[mt], b[0], b[1]);
                        Mma<T>::run(s[mt][2 * np + 1], qa[mt], b[2], b[3]);
                    }
                }
            }
            // scale; the causal mask only where the tile reaches past the warp's first position
            const bool masked = k0 + KEYS - 1 > warp_first;
            uint32_t pa[MT][KEYS / 16][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int n = 0; n < SN; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int key = k0 + n * 8 + c2 + (e & 1);
                        s[mt][n][e] = !masked || key <= pos[mt][e >> 1] ? s[mt][n][e] * a.scale_log2e : -INFINITY;
                    }
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float mx = -INFINITY;
#pragma unroll
                    for (int n = 0; n < SN; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * h], s[mt][n][2 * h + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 2));
                    // Finite once the row has seen a key: tile 0 holds key 0, which every row sees. A row
                    // before its block's span (split keys) sees none: mref 0 keeps its sums 0, not NaN.
                    const float mn = fmaxf(m[mt][h], mx);
                    const float mref = mn == -INFINITY ? 0.f : mn;
                    const float al = exp2f(m[mt][h] - mref);
                    m[mt][h] = mn;
                    float ps = 0.f;
#pragma unroll
                    for (int n = 0; n < SN; ++n) {
                        s[mt][n][2 * h] = exp2f(s[mt][n][2 * h] - mref);
                        s[mt][n][2 * h + 1] = exp2f(s[mt][n][2 * h + 1] - mref);
                        ps += s[mt][n][2 * h] + s[mt][n][2 * h + 1];
                    }
                    l[mt][h] = l[mt][h] * al + ps;   // this lane's share; the quad is summed at the end
#pragma unroll
                    for (int n = 0; n < NT; ++n) {
                        o[mt][n][2 * h] *= al;
                        o[mt][n][2 * h + 1] *= al;
                    }
                }
#pragma unroll
                for (int kk = 0; kk < KEYS / 16; ++kk) {
                    pa[mt][kk][0] = Mma<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    pa[mt][kk][1] = Mma<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    pa[mt][kk][2] = Mma<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    pa[mt][kk][3] = Mma<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
            }
            // O += P . V, 16 keys (two S n-tiles) a k-step
#pragma unroll
            for (int kk = 0; kk < KEYS / 16; ++kk)
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    uint32_t b[4];
                    ldsm_x4_trans(b, vb + (kk * 16 + tok_v) * ROW + (((dp * 2 + half_v) ^ (tok_v & 7)) << 4));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        Mma<T>::run(o[mt][2 * dp], pa[mt][kk], b[0], b[1]);
                        Mma<T>::run(o[mt][2 * dp + 1], pa[mt][kk], b[2], b[3]);
                    }
                }
        }
        __syncthreads();   // every warp is done with this stage before it is refilled
    }
    cp_async_wait<0>();
    if (!warp_live) return;

    T *out = (T *)a.out;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float sum = l[mt][h];
            sum += __shfl_xor_sync(kFull, sum, 1);
            sum += __shfl_xor_sync(kFull, sum, 2);
            const int row = warp * WROWS + mt * 16 + h * 8 + r;
            if (row >= nrows || pos[mt][h] < k_begin) continue;   // past the tile; before this span
            const int64_t head_row = (int64_t)(q_begin + tok0 + row / a.group) * a.num_heads + kv_head * a.group +
                                     row % a.group;
            if (a.split_keys > 0 && pos[mt][h] >= a.split_keys) {  // one of several spans: partials
                float *po = a.partial_out + (head_row * a.max_splits + split) * D;
#pragma unroll
                for (int n = 0; n < NT; ++n)
                    *reinterpret_cast<float2 *>(po + n * 8 + c2) = make_float2(o[mt][n][2 * h], o[mt][n][2 * h + 1]);
                if ((lane & 3) == 0)
                    *reinterpret_cast<float2 *>(a.partial_ml + (head_row * a.max_splits + split) * 2) =
                        make_float2(m[mt][h], sum);
                continue;
            }
            const float inv = 1.f / sum;
            T *dst = out + head_row * D;
#pragma unroll
            for (int n = 0; n < NT; ++n)
                *reinterpret_cast<uint32_t *>(dst + n * 8 + c2) =
                    Mma<T>::pack(o[mt][n][2 * h] * inv, o[mt][n][2 * h + 1] * inv);
        }
}

// Folds the spans of every row that has more than one (pos >= split_keys): one warp a (token, head) pair of
// one sequence -- the spans' maxima and sums across the lanes, then each lane's D / 32 outputs over the
// spans; the max / sum pairs are in the log2 domain of the kernel.
constexpr int kMergeWarps = 4;
template <typename T, int D>
__global__ void __launch_bounds__(kMergeWarps * 32) prefill_merge_kernel(PrefillArgs a) {
    constexpr int PER = D / 32;                     // output values a lane
    const int seq = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int q_begin = a.query_start_loc[seq], qlen = a.query_start_loc[seq + 1] - q_begin;
    const int pair = blockIdx.x * kMergeWarps + warp, tok = pair / a.num_heads, h = pair % a.num_heads;
    if (tok >= qlen) return;
    const int pos = a.context_lens[seq] - qlen + tok;
    if (pos < a.split_keys) return;                 // one span: the kernel wrote the row
    const int n = min(pos / a.split_keys + 1, a.max_splits);   // the spans cover every context (pa.h)
    const int64_t head_row = (int64_t)(q_begin + tok) * a.num_heads + h;
    const float *ml = a.partial_ml + head_row * a.max_splits * 2;
    const float *po = a.partial_out + head_row * a.max_splits * D;
    float mx = -INFINITY;
    for (int s = lane; s < n; s += 32) mx = fmaxf(mx, ml[2 * s]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, o));
    float sum = 0.f;                                // every span holds a key the row sees: its m is finite
    for (int s = lane; s < n; s += 32) sum += exp2f(ml[2 * s] - mx) * ml[2 * s + 1];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(kFull, sum, o);
    float acc[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) acc[i] = 0.f;
#pragma unroll 4
    for (int s = 0; s < n; ++s) {
        const float w = exp2f(ml[2 * s] - mx);
#pragma unroll
        for (int i = 0; i < PER; ++i) acc[i] += w * po[s * D + i * 32 + lane];
    }
    const float inv = 1.f / sum;
    T *dst = (T *)a.out + head_row * D;
#pragma unroll
    for (int i = 0; i < PER; ++i) dst[i * 32 + lane] = from_f<T>(acc[i] * inv);
}

template <typename T, int D, int MT, int KEYS, bool QSMEM, int STAGES>
pa_status launch_prefill_tc(PrefillArgs a, int max_query_len, int num_seqs, cudaStream_t stream) {
    constexpr int smem = prefill_tc_smem<D, MT, KEYS, QSMEM, STAGES>();
    constexpr auto kernel = prefill_tc_kernel<T, D, MT, KEYS, QSMEM, STAGES>;
    if constexpr (smem > 48 * 1024) PA_RETURN_IF_ERR((raise_smem_limit<kernel>("prefill_tc_kernel")));
    static_assert(MT == prefill_tc_mt<D>(), "the exported tile size assumes the head_dim's MT");
    a.tile_tokens = prefill_tc_tile_tokens(MT, a.group);   // >= 1: check_prefill took groups <= kMaxGroup
    if (a.split_keys % KEYS)
        return cuda_fail(PA_ERR_INVALID_ARG, "prefill_tc_kernel: split_keys %d is not a multiple of %d keys",
                         a.split_keys, KEYS);
    const int splits = a.split_keys > 0 ? a.max_splits : 1;
    const dim3 grid((max_query_len + a.tile_tokens - 1) / a.tile_tokens, a.num_kv_heads * splits, num_seqs);
    kernel<<<grid, kThreads, smem, stream>>>(a);
    PA_RETURN_IF_ERR(check_launch("prefill_tc_kernel"));
    if (a.split_keys == 0) return PA_OK;
    const dim3 mgrid((int)(((int64_t)max_query_len * a.num_heads + kMergeWarps - 1) / kMergeWarps), num_seqs);
    prefill_merge_kernel<T, D><<<mgrid, kMergeWarps * 32, 0, stream>>>(a);
    return check_launch("prefill_merge_kernel");
}

}  // namespace

extern "C" int32_t pa_prefill_tc_tile_tokens_cuda(int32_t head_dim, int32_t group) {
    if ((head_dim != 64 && head_dim != 128) || group <= 0 || group > kMaxGroup) return 0;
    return prefill_tc_tile_tokens(head_dim == 64 ? prefill_tc_mt<64>() : prefill_tc_mt<128>(), group);
}

extern "C" pa_status pa_paged_attention_prefill_tc_cuda(void *out, float *partial_out, float *partial_ml,
                                                        const void *q, const void *key_cache,
                                                        const void *value_cache, const int32_t *block_tables,
                                                        const int32_t *context_lens, const int32_t *query_start_loc,
                                                        int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads,
                                                        int32_t head_dim, int32_t block_size,
                                                        int32_t max_blocks_per_seq, int32_t max_query_len,
                                                        int32_t split_keys, int32_t max_splits,
                                                        int64_t q_stride, float scale, int32_t dtype, void *stream) {
    const char *name = "prefill_tc_kernel";
    PrefillArgs a;
    PA_RETURN_IF_ERR(fill_paged_args(a, name, out, q, key_cache, value_cache, block_tables, context_lens,
                                     query_start_loc, num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                                     max_blocks_per_seq, q_stride, scale));
    PA_RETURN_IF_ERR(check_prefill(name, a, max_query_len, kMaxGroup));
    if (split_keys < 0 || (split_keys > 0 && (max_splits < 2 || partial_out == nullptr ||
                                              partial_ml == nullptr || (int64_t)num_kv_heads * max_splits > 65535)))
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: bad split (split_keys %d, max_splits %d)", name, (int)split_keys,
                         (int)max_splits);
    a.split_keys = split_keys;
    a.max_splits = split_keys > 0 ? max_splits : 1;
    a.partial_out = partial_out;
    a.partial_ml = partial_ml;
    if (num_seqs == 0 || max_query_len == 0) return PA_OK;
    cudaStream_t st = (cudaStream_t)stream;
    return dispatch_dtype(dtype, name, [&](auto tag) {
        using T = decltype(tag);
        return head_dim == 64
                   ? launch_prefill_tc<T, 64, PF_TC_MT_64, PF_TC_KEYS_64, PF_TC_QSMEM_64, PF_TC_STAGES_64>(
                         a, max_query_len, num_seqs, st)
                   : launch_prefill_tc<T, 128, PF_TC_MT_128, PF_TC_KEYS_128, PF_TC_QSMEM_128, PF_TC_STAGES_128>(
                         a, max_query_len, num_seqs, st);
    });
}

// decode_layers.cu -- every layer of a decode step of <= 8 rows in one persistent launch (opt-in:
// CudaBackend(fuse_layers=True); measured slower than the five-kernel GEMV layer, see below).
//
// The GEMV path runs five kernels a layer (qkv + RoPE + KV write, attention, o + residual, gate_up +
// SiLU, down + residual); at batch 1 each pays ~2.5 us of launch, DRAM ramp and tail beside its
// streaming time. Here one cooperative grid (all blocks resident, 2 an SM) runs the same five phases for
// every layer, separated by grid barriers; before each barrier every block puts its first weight loads
// of the next phase in registers (and, for attention, its first round of old K/V), since the weights
// never depend on the activations.
//
// Outcome on the H200 (results_cuda.md, session 3): correct (parity below), but a 1B-like batch-1 step
// takes 1.10-1.27 ms against 0.96 ms for the kernel chain. Phase times from the kernel's own %globaltimer
// stamps: a barrier costs ~1-1.6 us, about what a kernel boundary costs; the GEMV phases run at 16 warps
// an SM (the attention phase needs ~128 registers a thread) and stream slower than the standalone GEMVs
// at 32 (qkv 8.4 vs 6.6 us, o 6.8 vs 4.6, down 14 vs 12); L2 prefetch of each block's next rows made the
// large phases slower still (gate_up 17.8 -> 21.5 us). Kept as the base for a dataflow version (per-head
// flags instead of full barriers).
//
// Phases of layer l (x = the residual stream [rows, hidden], updated in place):
//   qkv:       gemv_core's NormRope mode: qkv_ws = rope(rms_norm(x) . Wqkv), K and V into their slots
//   attention: units (split, sequence, kv head); a block's 8 warps stream the unit's tokens, 16 bytes
//              a lane (a token row is D/8 lanes), online softmax per lane in the log2 domain, merged
//              across lanes, then warps; split units leave (num, max, den) and the last of a
//              (sequence, kv head) to arrive merges them (arrival counters reset by that block)
//   o:         x += attn_ws . Wo                 (plain GEMV, residual epilogue)
//   gate_up:   act_ws = silu(g) * u of rms_norm(x) . [Wg; Wu]   (NORM_SILU)
//   down:      x += act_ws . Wd
// Every phase's arithmetic and rounding is gemv_core's (the GEMV phases equal the standalone
// kernels bit for bit); the attention sums in another order than the decode kernels (rel. ~1e-3).
#include "decode_common.cuh"
#include "gemv_core.cuh"

namespace {

using namespace gemv;

// Contexts split across blocks only past this many rounds a unit: a split's merge (partials, arrival
// counter, re-read) cost ~2 us at ctx 129, more than streaming 128 more tokens.
constexpr int kRoundsBeforeSplit = 4;

struct LayersArgs {
    void *x, *qkv, *attn, *act;                  // residual stream; workspaces
    float *part_o, *part_ml;                     // [rows][heads][max_splits][D], [..][2]
    int32_t *counters;                           // [rows][kv heads], zero between launches
    unsigned *barrier;                           // [2]: arrivals, exits (zero between launches)
    unsigned long long *timing;                  // NULL, or [barriers][3] (Barrier::sync)
    const pa_cuda_decode_layer *layers;
    const int32_t *positions, *slots, *block_tables, *context_lens;
    int num_layers, rows, hidden, inter, num_heads, num_kv_heads, head_dim, block_size, bs_log2, max_blocks;
    int max_splits, qkv_n;
    float eps, theta, scale_log2e;
    bool o_rpw2, down_rpw2;
};

__device__ __forceinline__ unsigned ld_acquire(const unsigned *p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ unsigned long long globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %globaltimer;\n" : "=l"(t));
    return t;
}

// All blocks of the (cooperative, fully resident) grid meet; writes before it are visible after it.
// Arrivals count up through the launch (barrier i completes at (i + 1) x blocks), each a fire-and-forget
// release add; the last block to finish the launch resets the count (finish_launch). With a.timing,
// barrier i records the first and last arrival (atomicMin / atomicMax of %globaltimer) and block 0's
// departure: [i][0] first arrival, [i][1] last arrival, [i][2] block 0 leaves.
struct Barrier {
    unsigned *count;
    unsigned long long *timing;
    unsigned next = 0;   // barriers passed so far
    __device__ __forceinline__ void sync() {
        __syncthreads();
        if (threadIdx.x == 0) {
            const unsigned target = (next + 1) * gridDim.x;
            if (timing != nullptr) {
                const unsigned long long t = globaltimer();
                atomicMin(timing + next * 3, t);
                atomicMax(timing + next * 3 + 1, t);
            }
            __threadfence();
            asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(count) : "memory");
            while (ld_acquire(count) < target) {
            }
            if (timing != nullptr && blockIdx.x == 0) timing[next * 3 + 2] = globaltimer();
        }
        ++next;
        __syncthreads();
    }
    // After the last barrier: the last block out zeroes the count for the next launch ([1]: exits).
    __device__ __forceinline__ void finish_launch() {
        if (threadIdx.x == 0 && atomicAdd(count + 1, 1u) == gridDim.x - 1) {
            count[0] = 0;
            count[1] = 0;
            __threadfence();
        }
    }
};

__device__ __forceinline__ void prefetch_l2(const void *p, unsigned bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
}

// One GEMV phase: this block's first loads to registers, then (when `wait`) the barrier, the input
// staged, the rows streamed. (Pulling the block's whole first row group into L2 before the barrier as
// well made the large phases slower: gate_up 17.8 -> 21.5 us, results_cuda.md session 3.)
template <typename T, int MR, int RPW>
__device__ __forceinline__ void gemv_phase(const GemvArgs &g, Barrier &bar, unsigned char *smem, bool wait) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint4 *wrow[RPW];
    uint4 wv[RPW][kUnroll];
    first_loads<T, RPW>(g, (blockIdx.x * kWarps + warp) * RPW, lane, wrow, wv);
    if (wait) bar.sync();
    T *xs = reinterpret_cast<T *>(smem);
    float *scratch = reinterpret_cast<float *>(smem + (size_t)MR * g.k * sizeof(T));
    stage_input<T, MR>(g, xs, scratch);
    __syncthreads();
    gemv_groups<T, MR, RPW>(g, xs, blockIdx.x, gridDim.x, wrow, wv);
}

template <typename T, int MR>
__device__ __forceinline__ void gemv_phase_rpw(const GemvArgs &g, Barrier &bar, unsigned char *smem, bool rpw2) {
    if (rpw2)
        gemv_phase<T, MR, 2>(g, bar, smem, true);
    else
        gemv_phase<T, MR, 1>(g, bar, smem, true);
}

// Tokens a block streams in one round: 8 warps x (32 / (D / 8)) token slots x U tokens in flight.
template <int D, int GP> struct AttnShape {
    static constexpr int kLpt = D / 8;                         // lanes a token row
    static constexpr int kTpw = 32 / kLpt;                     // token slots a warp
    static constexpr int kU = (D == 128 && GP == 8) ? 2 : 4;   // tokens in flight a lane
    static constexpr int kRound = kWarps * kTpw * kU;
};

// One attention unit: (seq, kv head, split of nsplit) of a context of ctx tokens -> tokens [start, end).
struct Unit {
    int seq, kvh, split, nsplit, ctx, start, end;
};
template <int D, int GP>
__device__ __forceinline__ Unit make_unit(const LayersArgs &a, int u, int heads, int target) {
    using S = AttnShape<D, GP>;
    Unit n;
    n.seq = (u % heads) / a.num_kv_heads;
    n.kvh = u % a.num_kv_heads;
    n.split = u / heads;
    n.ctx = a.context_lens[n.seq];
    n.nsplit = max(1, min(target, (n.ctx + kRoundsBeforeSplit * S::kRound - 1) / (kRoundsBeforeSplit * S::kRound)));
    const int plen = (n.ctx + n.nsplit - 1) / n.nsplit;
    n.start = n.split * plen;
    n.end = min(n.ctx, n.start + plen);
    return n;
}

// The cache row (in D-wide rows of [num_blocks, nkv, block_size, D]) of the unit's kv head at token t.
__device__ __forceinline__ int64_t kv_row(const LayersArgs &a, const Unit &n, int t) {
    const int32_t block = __ldg(a.block_tables + (int64_t)n.seq * a.max_blocks + (t >> a.bs_log2));
    return ((int64_t)block * a.num_kv_heads + n.kvh) * a.block_size + (t & (a.block_size - 1));
}

// K and V of one round of a lane's tokens (tb + u x 8 warps x token slots + slot), zeros past the end.
template <typename T, int D, int GP>
__device__ __forceinline__ void load_round(const LayersArgs &a, const pa_cuda_decode_layer &L, const Unit &n, int tb,
                                           uint4 (&kr)[AttnShape<D, GP>::kU], uint4 (&vr)[AttnShape<D, GP>::kU]) {
    using S = AttnShape<D, GP>;
    const int lane = threadIdx.x % 32, slot = lane / S::kLpt, dl = lane % S::kLpt;
    const uint4 *K = reinterpret_cast<const uint4 *>(L.key_cache);
    const uint4 *V = reinterpret_cast<const uint4 *>(L.value_cache);
#pragma unroll
    for (int u = 0; u < S::kU; ++u) {
        const int t = tb + u * kWarps * S::kTpw + slot;
        kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
        if (t < n.end) {
            const int64_t row = kv_row(a, n, t);
            kr[u] = __ldcg(K + row * (D / 8) + dl);   // the newest token was written in this launch
            vr[u] = __ldcg(V + row * (D / 8) + dl);
        }
    }
}

// One attention unit, the kv head's G query heads. pre: this warp's first round of K/V, loaded before the
// barrier that released the phase (every token but the newest, ctx - 1, which the qkv phase just wrote
// and is reloaded here), or nullptr.
template <typename T, int D, int GP>
__device__ void attention_unit(const LayersArgs &a, const pa_cuda_decode_layer &L, const Unit &n,
                               const uint4 (*pre_k)[AttnShape<D, GP>::kU], const uint4 (*pre_v)[AttnShape<D, GP>::kU],
                               float *sm) {
    using S = AttnShape<D, GP>;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, slot = lane / S::kLpt, dl = lane % S::kLpt;
    const int G = a.num_heads / a.num_kv_heads, h0 = n.kvh * G;
    const int seq = n.seq, kvh = n.kvh, split = n.split, nsplit = n.nsplit, start = n.start, end = n.end;

    float q[GP][8], m[GP], l[GP], acc[GP][8];
    const T *qrow = (const T *)a.qkv + (int64_t)seq * a.qkv_n + (int64_t)h0 * D;
#pragma unroll
    for (int g = 0; g < GP; ++g) {
        float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (g < G) Vec<T>::to_float(__ldcg(reinterpret_cast<const uint4 *>(qrow + g * D) + dl), f);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            q[g][e] = f[e] * a.scale_log2e;
            acc[g][e] = 0.f;
        }
        m[g] = -INFINITY;
        l[g] = 0.f;
    }
    for (int tb = start + warp * S::kTpw; tb < end; tb += S::kRound) {   // warp-uniform
        uint4 kr[S::kU], vr[S::kU];
        if (pre_k != nullptr && tb == start + warp * S::kTpw) {
#pragma unroll
            for (int u = 0; u < S::kU; ++u) {
                kr[u] = (*pre_k)[u];
                vr[u] = (*pre_v)[u];
                const int t = tb + u * kWarps * S::kTpw + slot;
                if (t == n.ctx - 1) {   // the new token: written by this step's qkv phase
                    const int64_t row = kv_row(a, n, t);
                    kr[u] = __ldcg(reinterpret_cast<const uint4 *>(L.key_cache) + row * (D / 8) + dl);
                    vr[u] = __ldcg(reinterpret_cast<const uint4 *>(L.value_cache) + row * (D / 8) + dl);
                }
            }
        } else {
            load_round<T, D, GP>(a, L, n, tb, kr, vr);
        }
        for (int u = 0; u < S::kU; ++u) {
            const bool valid = tb + u * kWarps * S::kTpw + slot < end;
            float kf[8], s[GP];
            Vec<T>::to_float(kr[u], kf);
#pragma unroll
            for (int g = 0; g < GP; ++g) {
                s[g] = 0.f;
#pragma unroll
                for (int e = 0; e < 8; ++e) s[g] = fmaf(q[g][e], kf[e], s[g]);
            }
#pragma unroll
            for (int o = S::kLpt / 2; o >= 1; o >>= 1)
#pragma unroll
                for (int g = 0; g < GP; ++g) s[g] += __shfl_xor_sync(0xffffffffu, s[g], o);
            if (valid) {
                float vf[8];
                Vec<T>::to_float(vr[u], vf);
#pragma unroll
                for (int g = 0; g < GP; ++g) {
                    const float mn = fmaxf(m[g], s[g]);
                    const float c = exp2f(m[g] - mn), p = exp2f(s[g] - mn);   // m = -inf: c = 0
                    l[g] = fmaf(l[g], c, p);
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e] * c);
                    m[g] = mn;
                }
            }
        }
    }
    // merge the warp's token slots (lanes that share a dim slice), then the warps in shared memory
#pragma unroll
    for (int o = S::kLpt; o < 32; o <<= 1)
#pragma unroll
        for (int g = 0; g < GP; ++g) {
            const float mo = __shfl_xor_sync(0xffffffffu, m[g], o), lo = __shfl_xor_sync(0xffffffffu, l[g], o);
            const float mn = fmaxf(m[g], mo);
            const float c1 = m[g] == -INFINITY ? 0.f : exp2f(m[g] - mn);
            const float c2 = mo == -INFINITY ? 0.f : exp2f(mo - mn);
            l[g] = l[g] * c1 + lo * c2;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float ao = __shfl_xor_sync(0xffffffffu, acc[g][e], o);
                acc[g][e] = acc[g][e] * c1 + ao * c2;
            }
            m[g] = mn;
        }
    float *wacc = sm;                              // [8 warps][GP][D]
    float *wml = sm + kWarps * GP * D;             // [8 warps][GP][2]
    int *flag = reinterpret_cast<int *>(wml + kWarps * GP * 2);
    if (slot == 0) {
#pragma unroll
        for (int g = 0; g < GP; ++g) {
#pragma unroll
            for (int e = 0; e < 8; ++e) wacc[(warp * GP + g) * D + dl * 8 + e] = acc[g][e];
            if (dl == 0) {
                wml[(warp * GP + g) * 2] = m[g];
                wml[(warp * GP + g) * 2 + 1] = l[g];
            }
        }
    }
    __syncthreads();
    T *out = (T *)a.attn + (int64_t)seq * a.num_heads * D + (int64_t)h0 * D;
    decode::DecodeArgs da{};                       // finish_block's partials layout is ours
    da.num_heads = a.num_heads;
    da.partial_out = a.part_o;
    da.partial_ml = a.part_ml;
    da.max_splits = a.max_splits;
    decode::finish_block<T, D, GP, kWarps, kThreads>(da, wacc, wml, out, seq, h0, G, split, nsplit == 1);
    if (nsplit > 1) {
        __syncthreads();
        if (threadIdx.x == 0) *flag = last_arrival(a.counters + seq * a.num_kv_heads + kvh, nsplit);
        __syncthreads();
        if (*flag) {
            for (int i = threadIdx.x; i < G * D; i += kThreads) {
                const int64_t base = ((int64_t)seq * a.num_heads + h0 + i / D) * a.max_splits;
                out[i] = from_f<T>(decode::merge_partitions<D>(a.part_ml + base * 2, a.part_o + base * D + i % D,
                                                               nsplit));
            }
        }
    }
    __syncthreads();   // shared memory is reused by the next unit
}

// The attention phase: units (split, sequence, kv head), split outermost so that the units of a
// step's splits are the first blocks' (one each while splits <= blocks / (rows x kv heads)). Before the
// barrier, a block with a unit loads its first round of K/V into registers and pulls the unit's other
// pages into L2: the old tokens' K/V do not depend on the qkv phase.
template <typename T, int D, int GP>
__device__ void attention_phase(const LayersArgs &a, const pa_cuda_decode_layer &L, Barrier &bar,
                                unsigned char *smem) {
    using S = AttnShape<D, GP>;
    const int heads = a.rows * a.num_kv_heads;
    const int target = max(1, min(a.max_splits, (int)gridDim.x / heads));
    const int warp = threadIdx.x / 32;
    int u = blockIdx.x;
    Unit first{};
    bool have = false;
    uint4 kr[S::kU], vr[S::kU];
    if (u < heads * target) {
        first = make_unit<D, GP>(a, u, heads, target);
        have = first.split < first.nsplit;
        if (have && first.end - first.start > S::kRound) {   // more than the first round: pages to L2
            const unsigned page = (unsigned)(a.block_size * D * sizeof(T));
            for (int b = (first.start >> a.bs_log2) + threadIdx.x; b <= ((first.end - 1) >> a.bs_log2);
                 b += kThreads) {
                const int64_t off = kv_row(a, first, b << a.bs_log2) * D;
                prefetch_l2((const T *)L.key_cache + off, page);
                prefetch_l2((const T *)L.value_cache + off, page);
            }
        }
        if (have) load_round<T, D, GP>(a, L, first, first.start + warp * S::kTpw, kr, vr);
    }
    bar.sync();
    float *sm = reinterpret_cast<float *>(smem);
    if (have) attention_unit<T, D, GP>(a, L, first, &kr, &vr, sm);
    for (u += gridDim.x; u < heads * target; u += gridDim.x) {
        const Unit n = make_unit<D, GP>(a, u, heads, target);
        if (n.split < n.nsplit) attention_unit<T, D, GP>(a, L, n, nullptr, nullptr, sm);
    }
}

template <typename T, int MR, int D, int GP>
__global__ void __launch_bounds__(kThreads, 2) decode_layers_kernel(LayersArgs a) {
    extern __shared__ __align__(16) unsigned char smem[];
    Barrier bar{a.barrier, a.timing};
    for (int li = 0; li < a.num_layers; ++li) {
        const pa_cuda_decode_layer L = a.layers[li];
        GemvArgs qkv{a.qkv, a.x, L.qkv, L.input_norm, nullptr, a.rows, a.qkv_n, a.hidden, kModeNormRope, a.eps};
        qkv.positions = a.positions;
        qkv.slots = a.slots;
        qkv.key_cache = L.key_cache;
        qkv.value_cache = L.value_cache;
        qkv.num_heads = a.num_heads;
        qkv.num_kv_heads = a.num_kv_heads;
        qkv.head_dim = D;
        qkv.block_size = a.block_size;
        qkv.theta = a.theta;
        gemv_phase<T, MR, 2>(qkv, bar, smem, li > 0);   // layer 0's input is ready at launch
        attention_phase<T, D, GP>(a, L, bar, smem);
        const GemvArgs o{a.x, a.attn, L.o, nullptr, a.x, a.rows, a.hidden, a.num_heads * D, PA_CUDA_GEMV_PLAIN, a.eps};
        gemv_phase_rpw<T, MR>(o, bar, smem, a.o_rpw2);
        const GemvArgs gu{a.act, a.x, L.gate_up, L.post_norm, nullptr, a.rows, 2 * a.inter, a.hidden,
                          PA_CUDA_GEMV_NORM_SILU, a.eps};
        gemv_phase<T, MR, 2>(gu, bar, smem, true);
        const GemvArgs dn{a.x, a.act, L.down, nullptr, a.x, a.rows, a.hidden, a.inter, PA_CUDA_GEMV_PLAIN, a.eps};
        gemv_phase_rpw<T, MR>(dn, bar, smem, a.down_rpw2);
    }
    bar.finish_launch();
}

template <typename T, int MR, int D, int GP>
pa_status launch_layers(LayersArgs a, cudaStream_t stream) {
    constexpr auto kernel = decode_layers_kernel<T, MR, D, GP>;
    PA_RETURN_IF_ERR((raise_smem_limit<kernel>("decode_layers_kernel")));
    const int widest = max(max(a.hidden, a.inter), a.num_heads * D);
    const size_t gemv_smem = (size_t)MR * widest * sizeof(T) + kWarps * MR * sizeof(float);
    const size_t attn_smem = (size_t)kWarps * GP * (D + 2) * sizeof(float) + 16;
    const size_t smem = gemv_smem > attn_smem ? gemv_smem : attn_smem;
    if (smem > 200 * 1024)
        return cuda_fail(PA_ERR_UNSUPPORTED, "decode_layers_kernel: %zu bytes of shared memory", smem);
    const int num_sms = device_sms();
    int per_sm = 0;
    const cudaError_t occ = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
    if (occ != cudaSuccess || per_sm < 1)
        return cuda_fail(PA_ERR_UNSUPPORTED, "decode_layers_kernel: no resident block (%s)", cudaGetErrorString(occ));
    const int blocks = num_sms * (per_sm < 2 ? per_sm : 2);
    // two rows a warp when there are enough rows for every block to take a group of 16
    a.o_rpw2 = a.hidden >= 16 * blocks;
    a.down_rpw2 = a.o_rpw2;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeCooperative;   // every block resident, or the launch fails
    attr.val.cooperative = 1;
    return launch_with_attribute(kernel, "decode_layers_kernel (cooperative)", dim3(blocks), smem, kThreads, stream,
                                 attr, a);
}

template <typename T, int MR>
pa_status launch_layers_d(const LayersArgs &a, cudaStream_t stream) {
    const int group = a.num_heads / a.num_kv_heads;
    if (a.head_dim == 64) return group <= 4 ? launch_layers<T, MR, 64, 4>(a, stream) : launch_layers<T, MR, 64, 8>(a, stream);
    return group <= 4 ? launch_layers<T, MR, 128, 4>(a, stream) : launch_layers<T, MR, 128, 8>(a, stream);
}

}  // namespace

extern "C" pa_status pa_decode_layers_cuda(void *x, void *qkv_ws, void *attn_ws, void *act_ws, float *partial_out,
                                           float *partial_ml, int32_t *counters, uint32_t *barrier,
                                           uint64_t *timing, const pa_cuda_decode_layer *layers,
                                           int32_t num_layers,
                                           const int32_t *positions, const int32_t *slot_mapping,
                                           const int32_t *block_tables, const int32_t *context_lens,
                                           int32_t num_rows, int32_t hidden, int32_t intermediate, int32_t num_heads,
                                           int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
                                           int32_t max_blocks_per_seq, int32_t max_splits, float eps, float theta,
                                           float scale, int32_t dtype, void *stream) {
    const char *name = "decode_layers_kernel";
    if (x == nullptr || qkv_ws == nullptr || attn_ws == nullptr || act_ws == nullptr || partial_out == nullptr ||
        partial_ml == nullptr || counters == nullptr || barrier == nullptr || layers == nullptr ||
        positions == nullptr || slot_mapping == nullptr || block_tables == nullptr || context_lens == nullptr ||
        num_layers < 0 || num_rows < 0 || hidden <= 0 || hidden % 8 || intermediate <= 0 || intermediate % 8 ||
        num_heads <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads || block_size <= 0 ||
        max_blocks_per_seq <= 0 || max_splits <= 0 || !(theta > 0.f))
        return cuda_fail(PA_ERR_INVALID_ARG, "%s: bad arguments", name);
    if (num_rows > 8) return cuda_fail(PA_ERR_UNSUPPORTED, "%s: %d rows (at most 8)", name, (int)num_rows);
    LayersArgs a{};
    PA_RETURN_IF_ERR(check_paged_shape(name, head_dim, block_size, a.bs_log2));
    if (num_heads / num_kv_heads > 8)
        return cuda_fail(PA_ERR_UNSUPPORTED, "%s: GQA group %d (at most 8)", name, (int)(num_heads / num_kv_heads));
    if (num_rows == 0 || num_layers == 0) return PA_OK;
    a.x = x;
    a.qkv = qkv_ws;
    a.attn = attn_ws;
    a.act = act_ws;
    a.part_o = partial_out;
    a.part_ml = partial_ml;
    a.counters = counters;
    a.barrier = barrier;
    a.timing = reinterpret_cast<unsigned long long *>(timing);
    a.layers = layers;
    a.positions = positions;
    a.slots = slot_mapping;
    a.block_tables = block_tables;
    a.context_lens = context_lens;
    a.num_layers = num_layers;
    a.rows = num_rows;
    a.hidden = hidden;
    a.inter = intermediate;
    a.num_heads = num_heads;
    a.num_kv_heads = num_kv_heads;
    a.head_dim = head_dim;
    a.block_size = block_size;
    a.max_blocks = max_blocks_per_seq;
    a.max_splits = max_splits;
    a.qkv_n = (num_heads + 2 * num_kv_heads) * head_dim;
    a.eps = eps;
    a.theta = theta;
    a.scale_log2e = scale * kLog2e;
    cudaStream_t st = (cudaStream_t)stream;
    return dispatch_dtype(dtype, name, [&](auto tag) {
        using T = decltype(tag);
        if (num_rows == 1) return launch_layers_d<T, 1>(a, st);
        if (num_rows == 2) return launch_layers_d<T, 2>(a, st);
        if (num_rows <= 4) return launch_layers_d<T, 4>(a, st);
        return launch_layers_d<T, 8>(a, st);
    });
}

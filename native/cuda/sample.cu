// sample.cu -- one sampled token a row in one launch: temperature, top-k, top-p, min-p and the inverse CDF,
// one block a row, without sorting the row (pa_sample_rows_cuda in pa.h).
//
// The row's order is descending x = logit / temperature, equal x by index (a 64-bit key: the float's
// order-preserving bits, then ~index). Every filter keeps a prefix of that order, and the draw is the
// element where the prefix mass crosses a target, so each step is one question -- which element does a
// prefix weight (a count for top-k, the mass for top-p and the draw) cross t at -- answered in two levels:
//   1. a histogram of the row over NB buckets of d = max - x (1/128 wide, the rest of the row in the last:
//      none of it has mass), counts and masses, scanned once; the bucket holding the crossing is the one
//      whose prefix range holds t;
//   2. that bucket's elements gathered into shared memory and sorted (bitonic; a few hundred elements on
//      flat rows), or -- when the bucket holds more than the gather capacity (many equal values) -- found
//      by bisection over the key, each probe a pass over the row, and among equal values by index.
// Masses are exp(x - max) rounded to multiples of 2^-40 (exact integer sums, so order and run do not
// change a total; an element below 2^-41 has none), in float64 as the torch path computes them: a table
// of exp(-j / 128) times a degree-6 series for the rest (a third of libdevice's exp's float64 work).
// Rows without top-k or top-p walk the mass in index order instead: per-warp sums over contiguous segments,
// then one warp scans its segment.
// Every pass over the row puts 8 elements a thread in flight before it uses them (float4 chunks where the
// rows allow): one block reads a row, so a pass is bound by its round trips, not by bandwidth.
// Few long rows (a batch-1 step leaves all but one SM idle): a cluster of C blocks a row (CL), each block
// its contiguous 1/C of the row. Every pass runs on all C slices; the per-block sums, maxima, histograms and
// gathered buckets are merged through distributed shared memory, and every block then takes the same
// decisions on the same merged data, so the tokens are the one-block kernel's bit for bit. An index-order
// walk first finds the block whose slice holds the crossing; that block alone narrows it down.
#include <cooperative_groups.h>

#include "common.cuh"

namespace cg = cooperative_groups;

namespace {

constexpr int THREADS = 1024;
constexpr int WARPS = THREADS / 32;
constexpr unsigned FULL = 0xffffffffu;
constexpr int NB = 4 * THREADS;            // buckets of d = max - x: [b / 128, (b + 1) / 128), the last open
constexpr float PER_UNIT = 128.f;
constexpr int CAP = 4 * THREADS;           // the most elements of one bucket sorted in shared memory
constexpr double FIX = 1099511627776.0;    // 2^40 units of mass
constexpr double NO_MASS_D = 28.5;         // exp(-28.5) * 2^40 < 0.5: no mass past this d
constexpr int PER_THREAD = 8;              // elements a thread loads before using them, a pass's round

typedef unsigned long long u64;

__device__ __forceinline__ uint32_t order_key(float x) {
    const uint32_t u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ int bucket_of(float m, float x) {
    const float d = m - x;                    // monotone in x; NaN (no maximum) -> the last bucket
    return d < float(NB) / PER_UNIT ? int(d * PER_UNIT) : NB - 1;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

template <typename T>
__device__ __forceinline__ T warp_inclusive(T v, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T y = __shfl_up_sync(FULL, v, o);
        if (lane >= o) v += y;
    }
    return v;
}

struct Shared {
    u64 mass[NB + 1];      // bucket masses, then their exclusive prefix ([NB]: the total)
    uint32_t count[NB + 1];
    u64 sorted[CAP];       // the gathered bucket: (key << 32 | ~index), descending
    u64 smass[CAP + 1];    // their masses' exclusive prefix
    double etab[NB];       // exp(-j / 128)
    u64 red[WARPS];
    u64 best, target, base;
    u64 xch, gbest;        // clusters: this block's part of a sum, the cluster's maximum
    int gathered;          // the bucket in sorted[], -1: none
    int hit_bucket, hit, hit_rank;
    uint32_t n, ln;        // sorted[]'s elements; clusters: this block's gathered ones (staged in smass[])
};
// Clusters reuse two arrays for this block's part while it is being merged: the bucket counts in sorted[]
// (free until a bucket is gathered), the gathered elements in smass[] (free until they are sorted).

// The block's sum of v (every thread calls it; red reusable after it returns).
__device__ u64 block_sum(u64 v, Shared &s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) s.red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = warp_sum(s.red[lane]);
        if (lane == 0) s.red[0] = v;
    }
    __syncthreads();
    v = s.red[0];
    __syncthreads();
    return v;
}

// The cluster's (CL) or the block's sum of v (every thread of every block calls it).
template <bool CL>
__device__ u64 group_sum(u64 v, Shared &s) {
    v = block_sum(v, s);
    if constexpr (CL) {
        cg::cluster_group cl = cg::this_cluster();
        if (threadIdx.x == 0) s.xch = v;
        cl.sync();
        if (threadIdx.x < 32) {
            u64 w = threadIdx.x < cl.num_blocks() ? *cl.map_shared_rank(&s.xch, threadIdx.x) : 0ull;
            w = warp_sum(w);
            if (threadIdx.x == 0) s.red[0] = w;
        }
        cl.sync();                                       // (every xch read before it is reused)
        v = s.red[0];
        __syncthreads();
    }
    return v;
}

// a[0 .. 4 THREADS) in place -> its exclusive prefix, a[4 THREADS] = the total.
template <typename T>
__device__ void scan4(T *a, Shared &s) {
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const T v0 = a[4 * t], v1 = a[4 * t + 1], v2 = a[4 * t + 2], v3 = a[4 * t + 3];
    const T mine = v0 + v1 + v2 + v3;
    const T inc = warp_inclusive(mine, lane);
    if (lane == 31) s.red[warp] = u64(inc);
    __syncthreads();
    if (warp == 0) {
        const u64 w = s.red[lane];
        s.red[lane] = warp_inclusive(w, lane) - w;
    }
    __syncthreads();
    const T ex = T(s.red[warp]) + inc - mine;
    a[4 * t] = ex;
    a[4 * t + 1] = ex + v0;
    a[4 * t + 2] = ex + v0 + v1;
    a[4 * t + 3] = ex + v0 + v1 + v2;
    if (t == THREADS - 1) a[4 * THREADS] = ex + mine;
    __syncthreads();
}

// A row as E-element chunks (E = 4: float4 loads, the row 16-byte aligned and vocab a multiple of 4), of
// which this block reads [begin, end) (all of them, or its cluster rank's slice). Warp w owns the contiguous
// chunks [begin + w seg, begin + (w + 1) seg) where index order matters, its lanes 32 apart.
template <int E>
struct Row {
    const float *logits;
    const double *etab;
    int vocab, chunks, begin, end, seg;
    float temperature, m;

    __device__ __forceinline__ void load(int c, float (&v)[E]) const {
        if constexpr (E == 4) {
            const float4 q = __ldg(reinterpret_cast<const float4 *>(logits) + c);
            v[0] = q.x;
            v[1] = q.y;
            v[2] = q.z;
            v[3] = q.w;
        } else {
            v[0] = __ldg(logits + c);
        }
    }
    __device__ __forceinline__ float x(float logit) const { return temperature == 1.f ? logit : logit / temperature; }

    // exp(x - m) in 2^-40 units: exp(-j / 128) from the table times exp(-r), r = d - j / 128 in [0, 1/128)
    // (exact), by its series to r^6 (the next term < 2^-60).
    __device__ __forceinline__ u64 mass(float xv) const {
        const double d = double(m) - double(xv);               // exact for two floats
        if (!(d <= NO_MASS_D)) return 0ull;
        const int j = int(d * 128.0);
        const double r = d - j * (1.0 / 128.0);
        double p = 1.0 / 720.0;
        p = fma(p, -r, 1.0 / 120.0);
        p = fma(p, -r, 1.0 / 24.0);
        p = fma(p, -r, 1.0 / 6.0);
        p = fma(p, -r, 0.5);
        p = fma(p, -r, 1.0);
        p = fma(p, -r, 1.0);
        return __double2ull_rn(etab[j] * p * FIX);
    }
};

// f(i, x) on every element (any order), a round of PER_THREAD loads in flight at a time (Scaled false:
// f(i, logit)).
template <bool Scaled = true, int E, typename F>
__device__ __forceinline__ void for_each(const Row<E> &row, F f) {
    constexpr int U = PER_THREAD / E;
    for (int c0 = row.begin + threadIdx.x; c0 < row.end; c0 += U * THREADS) {
        float v[U][E];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (c0 + u * THREADS < row.end) row.load(c0 + u * THREADS, v[u]);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * THREADS;
            if (c < row.end) {
#pragma unroll
                for (int e = 0; e < E; ++e) f(c * E + e, Scaled ? row.x(v[u][e]) : v[u][e]);
            }
        }
    }
}

// One lane's share of the weights of chunks [begin, end), its lanes 32 chunks apart.
template <int E, typename Weight>
__device__ __forceinline__ u64 lane_weight(const Row<E> &row, int begin, int end, Weight weight) {
    constexpr int U = PER_THREAD / E;
    u64 mine = 0;
    for (int c0 = begin + (threadIdx.x & 31); c0 < end; c0 += 32 * U) {
        float v[U][E];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (c0 + 32 * u < end) row.load(c0 + 32 * u, v[u]);
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (c0 + 32 * u < end) {
#pragma unroll
                for (int e = 0; e < E; ++e) mine += weight(row.x(v[u][e]));
            }
    }
    return mine;
}

// Index order within this block's chunks: the element at which the prefix of weight(x) crosses t =
// target(total weight), i.e. prefix <= t < prefix + its own weight; -1 when the total is 0 (preset: the
// prefix before the block's first chunk and t are in s.base and s.target already). Two levels of per-warp
// sums narrow the range to 1/1024 of it (warp w sums the w-th of 32 contiguous ranges; the range holding
// the crossing is split again), which one warp then walks.
template <int E, typename Weight, typename Target>
__device__ int select_in_range(const Row<E> &row, Shared &s, Weight weight, Target target, bool preset) {
    constexpr int U = PER_THREAD / E;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int lo = row.begin, hi = row.end, len = row.seg;    // row.seg: a multiple of 32
    for (int level = 0; level < 2; ++level) {
        const int b = lo + warp * len;
        const u64 mine = warp_sum(lane_weight(row, b, min(hi, b + len), weight));
        if (lane == 0) s.red[warp] = mine;
        __syncthreads();
        if (warp == 0) {
            const u64 w = s.red[lane];
            const u64 inc = warp_inclusive(w, lane), total = __shfl_sync(FULL, inc, 31);
            const u64 base = level || preset ? s.base : 0ull;
            const u64 t = level || preset ? s.target : (total ? target(total) : 0ull);
            if (lane == 0) {
                s.hit = -1;
                s.hit_bucket = -1;
                s.target = t;
            }
            __syncwarp();
            if (total && base + inc - w <= t && t < base + inc) {   // one lane: its range holds the crossing
                s.hit_bucket = lane;
                s.base = base + inc - w;
            }
        }
        __syncthreads();
        const int w_hit = s.hit_bucket;
        if (w_hit < 0) break;                            // (no weight at all: level 0 only)
        lo += w_hit * len;
        hi = min(hi, lo + len);
        len /= 32;
    }
    if (warp == 0 && s.hit_bucket >= 0) {                // walk [lo, hi), 32 chunks a step
        u64 base = s.base;
        const u64 t = s.target;
        bool found = false;
        for (int c0 = lo; c0 < hi && !found; c0 += 32 * U) {
            float v[U][E];
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (c0 + 32 * u + lane < hi) row.load(c0 + 32 * u + lane, v[u]);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = c0 + 32 * u + lane;
                u64 w[E], own = 0;
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    w[e] = c < hi ? weight(row.x(v[u][e])) : 0ull;
                    own += w[e];
                }
                const u64 inc = warp_inclusive(own, lane);
                const bool here = !found && base + inc - own <= t && t < base + inc;
                if (here) {
                    u64 at = base + inc - own;
#pragma unroll
                    for (int e = 0; e < E; ++e) {
                        if (at <= t && t < at + w[e]) s.hit = c * E + e;
                        at += w[e];
                    }
                }
                found = found || __any_sync(FULL, here);
                base += __shfl_sync(FULL, inc, 31);
            }
        }
    }
    __syncthreads();
    const int hit = s.hit;
    __syncthreads();
    return hit;
}

// select_in_range over the whole row. A cluster first sums each block's slice, finds the slice holding the
// crossing, and that block alone searches it; every block returns that block's answer.
template <int E, bool CL, typename Weight, typename Target>
__device__ int select_in_index_order(const Row<E> &row, Shared &s, Weight weight, Target target) {
    if constexpr (!CL) {
        return select_in_range(row, s, weight, target, false);
    } else {
        cg::cluster_group cl = cg::this_cluster();
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        u64 mine = 0;
        for_each(row, [&](int, float x) { mine += weight(x); });
        mine = block_sum(mine, s);
        if (threadIdx.x == 0) s.xch = mine;
        cl.sync();
        if (warp == 0) {
            const u64 w = lane < int(cl.num_blocks()) ? *cl.map_shared_rank(&s.xch, lane) : 0ull;
            const u64 inc = warp_inclusive(w, lane), total = __shfl_sync(FULL, inc, 31);
            const u64 t = total ? target(total) : 0ull;
            if (lane == 0) {
                s.hit_rank = -1;
                s.target = t;
            }
            __syncwarp();
            if (total && inc - w <= t && t < inc) {
                s.hit_rank = lane;
                s.base = inc - w;
            }
        }
        cl.sync();                                       // (every xch read before it is reused)
        const int h = s.hit_rank;                        // the same in every block
        if (h < 0) return -1;
        if (int(cl.block_rank()) == h) select_in_range(row, s, weight, target, true);
        cl.sync();
        if (threadIdx.x == 0) s.hit_bucket = *cl.map_shared_rank(&s.hit, h);
        cl.sync();                                       // (block h's hit read before it changes)
        const int hit = s.hit_bucket;
        __syncthreads();
        return hit;
    }
}

// The row's largest logit and its first index (torch.argmax's choice), as (key << 32 | ~index): x / T is
// monotone in the logit, so its x is the row's largest (no division an element).
template <int E, bool CL>
__device__ u64 row_best(const Row<E> &row, Shared &s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 best = 0;
    for_each<false>(row, [&best](int i, float v) { best = max(best, (u64(order_key(v)) << 32) | u64(~uint32_t(i))); });
#pragma unroll
    for (int o = 16; o; o >>= 1) best = max(best, __shfl_xor_sync(FULL, best, o));
    if (lane == 0) s.red[warp] = best;
    __syncthreads();
    if (warp == 0) {
        best = s.red[lane];
#pragma unroll
        for (int o = 16; o; o >>= 1) best = max(best, __shfl_xor_sync(FULL, best, o));
        if (lane == 0) s.best = best;
    }
    __syncthreads();
    if constexpr (CL) {
        cg::cluster_group cl = cg::this_cluster();
        cl.sync();
        if (warp == 0) {
            best = lane < int(cl.num_blocks()) ? *cl.map_shared_rank(&s.best, lane) : 0ull;
#pragma unroll
            for (int o = 16; o; o >>= 1) best = max(best, __shfl_xor_sync(FULL, best, o));
            if (lane == 0) s.gbest = best;
        }
        cl.sync();                                       // (every best read before any block moves on)
        return s.gbest;
    }
    best = s.best;
    __syncthreads();
    return best;
}

// Bucket b's elements into s.sorted, descending, and their masses' exclusive prefix into s.smass.
template <int E, bool CL>
__device__ void gather_sorted(const Row<E> &row, Shared &s, int b) {
    const int tid = threadIdx.x;
    u64 *dst = CL ? s.smass : s.sorted;                 // clusters: this block's part, staged
    uint32_t *cnt = CL ? &s.ln : &s.n;
    if (tid == 0) *cnt = 0;
    __syncthreads();
    const float m = row.m;
    for_each(row, [dst, cnt, m, b](int i, float x) {
        if (bucket_of(m, x) == b) dst[atomicAdd(cnt, 1u)] = (u64(order_key(x)) << 32) | u64(~uint32_t(i));
    });
    if constexpr (CL) {                                  // every block's part, in rank order, into sorted[]
        cg::cluster_group cl = cg::this_cluster();
        cl.sync();
        uint32_t at = 0;
        for (unsigned r = 0; r < cl.num_blocks(); ++r) {
            const uint32_t part = *cl.map_shared_rank(&s.ln, r);
            const u64 *src = cl.map_shared_rank(s.smass, r);
            for (uint32_t j = tid; j < part; j += THREADS) s.sorted[at + j] = src[j];
            at += part;
        }
        if (tid == 0) s.n = at;
        cl.sync();                                       // (every part read before smass[] is reused)
    }
    __syncthreads();
    const uint32_t n = s.n;
    uint32_t width = 1;
    while (width < n) width <<= 1;
    for (uint32_t j = n + tid; j < width; j += THREADS) s.sorted[j] = 0;   // below every element
    __syncthreads();
    for (uint32_t k = 2; k <= width; k <<= 1) {          // bitonic, descending
        for (uint32_t j = k >> 1; j; j >>= 1) {
            for (uint32_t i = tid; i < width; i += THREADS) {
                const uint32_t l = i ^ j;
                if (l > i) {
                    const u64 a = s.sorted[i], c = s.sorted[l];
                    if ((i & k) == 0 ? a < c : a > c) {
                        s.sorted[i] = c;
                        s.sorted[l] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    for (uint32_t j = tid; j < CAP; j += THREADS)
        s.smass[j] = j < n ? row.mass(key_value(uint32_t(s.sorted[j] >> 32))) : 0ull;
    __syncthreads();
    scan4(s.smass, s);
    if (tid == 0) s.gathered = b;
    __syncthreads();
}

struct Hit {
    uint32_t pos;      // its position in the row's order
    u64 mass_incl;     // the mass of the prefix through it
    int index;         // its token (-1: none)
};

// The element where the prefix count (by_mass false) or mass crosses t (< the row's total of it).
template <int E, bool CL>
__device__ Hit resolve(const Row<E> &row, Shared &s, bool by_mass, u64 t, int cap) {
    const int tid = threadIdx.x;
    if (tid == 0) {
        s.hit_bucket = -1;
        s.hit = -1;
    }
    __syncthreads();
    for (int j = 4 * tid; j < 4 * tid + 4; ++j) {
        const u64 lo = by_mass ? s.mass[j] : s.count[j], hi = by_mass ? s.mass[j + 1] : s.count[j + 1];
        if (lo <= t && t < hi) s.hit_bucket = j;
    }
    __syncthreads();
    const int b = s.hit_bucket;
    Hit h = {0, 0, -1};
    if (b < 0) return h;
    const u64 tl = t - (by_mass ? s.mass[b] : u64(s.count[b]));
    if (s.count[b + 1] - s.count[b] <= uint32_t(cap)) {
        if (s.gathered != b) gather_sorted<E, CL>(row, s, b);
        if (!by_mass) {
            s.hit = int(tl);                              // every thread writes the same
        } else {
            for (int j = 4 * tid; j < 4 * tid + 4; ++j)
                if (s.smass[j] <= tl && tl < s.smass[j + 1]) s.hit = j;
        }
        __syncthreads();
        const int j = s.hit;
        if (j >= 0) {                                       // (always: t is inside the bucket)
            h.pos = s.count[b] + j;
            h.mass_incl = s.mass[b] + s.smass[j + 1];
            h.index = int(~uint32_t(s.sorted[j]));
        }
        __syncthreads();
        return h;
    }
    // Too many elements to sort here: bisection over the key within the bucket, G(K) = the weight of its
    // elements with key >= K (G(lo) > tl >= G(hi)), then the equal values by index.
    u64 lo = 0, hi = 1ull << 32, c_hi = 0, m_hi = 0;
    const float m = row.m;
    while (hi - lo > 1) {
        const u64 mid = (lo + hi) >> 1;
        u64 c = 0, ms = 0;
        for_each(row, [&](int, float x) {
            if (bucket_of(m, x) == b && order_key(x) >= mid) {
                ++c;
                ms += row.mass(x);
            }
        });
        c = group_sum<CL>(c, s);
        ms = group_sum<CL>(ms, s);
        if ((by_mass ? ms : c) > tl) {
            lo = mid;
        } else {
            hi = mid;
            c_hi = c;
            m_hi = ms;
        }
    }
    const uint32_t key = uint32_t(lo);
    const u64 e = row.mass(key_value(key));
    const u64 r = by_mass ? (tl - m_hi) / e : tl - c_hi;
    h.pos = s.count[b] + uint32_t(c_hi + r);
    h.mass_incl = s.mass[b] + m_hi + (r + 1) * e;
    h.index = select_in_index_order<E, CL>(
        row, s, [key](float x) { return order_key(x) == key ? 1ull : 0ull; }, [r](u64) { return r; });
    return h;
}

__device__ __forceinline__ u64 draw_target(u64 u24, u64 total) {      // floor(u * total), u = u24 / 2^24
    return u64((unsigned __int128)u24 * total >> 24);
}

// One row a block, or (CL) a cluster a row: its blocks' ranks in blockIdx.x order.
template <int E, bool CL>
__global__ void __launch_bounds__(THREADS, 1)
sample_rows_kernel(int64_t *out, const float *logits, int64_t row_stride, const double *knobs, int vocab, int cap) {
    extern __shared__ __align__(16) unsigned char smem[];
    Shared &s = *reinterpret_cast<Shared *>(smem);
    int ranks = 1, rank = 0;
    if constexpr (CL) {
        ranks = int(cg::this_cluster().num_blocks());
        rank = int(cg::this_cluster().block_rank());
    }
    const int tid = threadIdx.x, r = blockIdx.x / ranks;
    const double *kn = knobs + 5 * size_t(r);
    Row<E> row;
    row.logits = logits + r * row_stride;
    row.etab = s.etab;
    row.vocab = vocab;
    row.chunks = vocab / E;
    row.begin = int(int64_t(row.chunks) * rank / ranks);
    row.end = int(int64_t(row.chunks) * (rank + 1) / ranks);
    row.seg = (row.end - row.begin + THREADS - 1) / THREADS * 32;
    row.temperature = float(kn[0]);
    const int top_k = int(kn[1]);
    const double top_p = kn[2];
    const float log_min_p = float(kn[3]);
    const u64 u24 = u64(kn[4] * 16777216.0);
    if (tid == 0) s.gathered = -1;
    for (int j = tid; j < NB; j += THREADS) s.etab[j] = exp(-j * (1.0 / 128.0));
    const u64 best = row_best<E, CL>(row, s);          // (its barriers publish etab too)
    if (!(row.temperature > 0.f)) {                     // a greedy row (T <= 0): the argmax
        if (tid == 0 && rank == 0) out[r] = int64_t(~uint32_t(best));
        return;
    }
    const float m = row.x(key_value(uint32_t(best >> 32)));
    row.m = m;
    int token = int(~uint32_t(best));                   // when nothing has mass (no finite maximum)
    const bool cut_k = top_k > 0 && top_k < vocab, cut_min_p = log_min_p > -INFINITY;
    const float floor_x = m + log_min_p;
    if (!cut_k && !(top_p < 1.0)) {                      // the whole row (or min-p's part) in index order
        const int hit = select_in_index_order<E, CL>(
            row, s, [&row, cut_min_p, floor_x](float x) { return !cut_min_p || x >= floor_x ? row.mass(x) : 0ull; },
            [u24](u64 total) { return draw_target(u24, total); });
        if (hit >= 0) token = hit;
    } else {
        uint32_t *count = CL ? reinterpret_cast<uint32_t *>(s.sorted) : s.count;     // clusters: this block's
        for (int j = tid; j <= NB; j += THREADS) count[j] = 0;
        // Bucket masses as 32-bit halves (shared memory has no 64-bit atomic add: a CAS loop, contended on
        // flat rows), a wrap of the low half carried into the high one; joined into s.mass after.
        uint32_t *lo = reinterpret_cast<uint32_t *>(s.smass), *hi = lo + NB;
        for (int j = tid; j < NB; j += THREADS) {
            lo[j] = 0;
            hi[j] = 0;
        }
        __syncthreads();
        u64 min_count = 0, min_mass = 0, tail = 0;
        for_each(row, [&](int, float x) {
            const int b = bucket_of(m, x);
            const u64 e = row.mass(x);
            if (b < NB - 1)
                atomicAdd(&count[b], 1u);
            else
                ++tail;                                   // long rows: most of them, counted apart
            if (e) {
                const uint32_t low = uint32_t(e), before = atomicAdd(&lo[b], low);
                const uint32_t high = uint32_t(e >> 32) + (before + low < before ? 1u : 0u);
                if (high) atomicAdd(&hi[b], high);
            }
            if (cut_min_p && x >= floor_x) {
                ++min_count;
                min_mass += e;
            }
        });
        tail = group_sum<CL>(tail, s);                    // (its barriers: every add above is done, in every
        if (cut_min_p) {                                  // block of a cluster)
            min_count = group_sum<CL>(min_count, s);
            min_mass = group_sum<CL>(min_mass, s);
        }
        if constexpr (CL) {                               // the blocks' histograms summed, in every block
            cg::cluster_group cl = cg::this_cluster();
            for (int j = tid; j < NB; j += THREADS) {
                u64 ms = 0;
                uint32_t c = j == NB - 1 ? uint32_t(tail) : 0u;
                for (unsigned q = 0; q < cl.num_blocks(); ++q) {
                    const uint32_t *ql = cl.map_shared_rank(lo, q);
                    ms += (u64(ql[NB + j]) << 32) + ql[j];
                    c += cl.map_shared_rank(count, q)[j];
                }
                s.mass[j] = ms;
                s.count[j] = c;
            }
            cl.sync();                                    // (every part read before sorted[] / smass[] are reused)
        } else {
            if (tid == 0) s.count[NB - 1] += uint32_t(tail);
            for (int j = tid; j < NB; j += THREADS) s.mass[j] = (u64(hi[j]) << 32) | lo[j];
        }
        __syncthreads();
        scan4(s.mass, s);
        scan4(s.count, s);
        u64 kept = u64(vocab), kept_mass = s.mass[NB];
        if (cut_k) {
            kept = u64(top_k);
            if (u64(top_k - 1) >= s.count[NB - 1])        // past every element with mass
                kept_mass = s.mass[NB];
            else
                kept_mass = resolve<E, CL>(row, s, false, u64(top_k - 1), cap).mass_incl;
        }
        if (top_p < 1.0 && kept_mass > 0) {
            const double p = ceil(top_p * double(kept_mass));
            const u64 need = p < 1.0 ? 1ull : (p >= double(kept_mass) ? kept_mass : u64(p));
            const Hit h = resolve<E, CL>(row, s, true, need - 1, cap);   // its prefix before it < need <= through it
            if (h.index >= 0 && h.pos + 1 < kept) {
                kept = h.pos + 1;
                kept_mass = h.mass_incl;
            }
        }
        if (cut_min_p && min_count < kept) {
            kept = min_count;
            kept_mass = min_mass;
        }
        if (kept_mass > 0) {
            const Hit h = resolve<E, CL>(row, s, true, draw_target(u24, kept_mass), cap);
            if (h.index >= 0) token = h.index;
        }
    }
    if (tid == 0 && rank == 0) out[r] = token;
}

template <int E>
pa_status launch(int64_t *out, const float *logits, int64_t row_stride, const double *knobs, int32_t num_rows,
                 int32_t vocab, int32_t cap, int ranks, cudaStream_t stream) {
    if (ranks == 1) {
        const char *name = E == 4 ? "sample_rows_kernel<4>" : "sample_rows_kernel<1>";
        PA_RETURN_IF_ERR((raise_smem_limit<sample_rows_kernel<E, false>>(name)));
        sample_rows_kernel<E, false><<<num_rows, THREADS, sizeof(Shared), stream>>>(out, logits, row_stride, knobs,
                                                                                    vocab, cap);
        return check_launch(name);
    }
    const char *name = E == 4 ? "sample_rows_kernel<4, cluster>" : "sample_rows_kernel<1, cluster>";
    PA_RETURN_IF_ERR((raise_smem_limit<sample_rows_kernel<E, true>>(name)));
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = unsigned(ranks);
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    return launch_with_attribute(sample_rows_kernel<E, true>, name, dim3(unsigned(num_rows * ranks)), sizeof(Shared),
                                 THREADS, stream, attr, out, logits, row_stride, knobs, int(vocab), int(cap));
}

// Blocks a row when the caller leaves it to the kernel: a cluster of 4 while the clusters take at most half
// the SMs and a block's slice is >= 4096 elements. Measured on the H200 (session 16, kernel alone): 4 is the
// best or within ~5 % of it at 1-16 rows of 49k and 128k (128k top-p at batch 1 66 us against 118 with one
// block; 49k 46 against 57); 2 is slower than 1 at T=1.0 (one more pass over the row), 8 ties 4 on 128k rows
// and loses on 49k top-p, and a grid of 128 cluster blocks takes two waves (twice the time).
int auto_blocks_per_row(int32_t num_rows, int32_t vocab) {
    return int64_t(num_rows) * 4 * 2 <= device_sms() && vocab >= 4 * 4096 ? 4 : 1;
}

}  // namespace

extern "C" pa_status pa_sample_rows_cuda(int64_t *out, const float *logits, int64_t row_stride, const double *knobs,
                                         int32_t num_rows, int32_t vocab, int32_t gather_cap, int32_t blocks_per_row,
                                         void *stream) {
    const bool ranks_ok = blocks_per_row == 0 || blocks_per_row == 1 || blocks_per_row == 2 || blocks_per_row == 4 ||
                          blocks_per_row == 8;
    if (num_rows < 0 || vocab < 1 || vocab > (1 << 23) || row_stride < vocab || gather_cap < -1 || gather_cap > CAP ||
        !ranks_ok || int64_t(num_rows) * (blocks_per_row ? blocks_per_row : 1) > (int64_t(1) << 30))
        return cuda_fail(PA_ERR_INVALID_ARG,
                         "sample_rows_kernel: bad arguments (rows %d, vocab %d, row stride %lld, gather_cap %d, "
                         "blocks_per_row %d)",
                         (int)num_rows, (int)vocab, (long long)row_stride, (int)gather_cap, (int)blocks_per_row);
    if (num_rows == 0) return PA_OK;                  // (an empty tensor's pointer may be NULL)
    if (out == nullptr || logits == nullptr || knobs == nullptr)
        return cuda_fail(PA_ERR_INVALID_ARG, "sample_rows_kernel: a NULL pointer for %d rows", (int)num_rows);
    const int cap = gather_cap < 0 ? CAP : gather_cap;
    const int ranks = blocks_per_row ? blocks_per_row : auto_blocks_per_row(num_rows, vocab);
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
    if (vocab % 4 == 0 && row_stride % 4 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0)
        return launch<4>(out, logits, row_stride, knobs, num_rows, vocab, cap, ranks, st);
    return launch<1>(out, logits, row_stride, knobs, num_rows, vocab, cap, ranks, st);
}

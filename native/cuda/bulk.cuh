// bulk.cuh -- sm_90 bulk asynchronous copies (global -> shared through the TMA unit, no tensor map) and
// the shared-memory mbarriers that count their bytes. A copy is issued by one thread and needs no
// registers or load slots while in flight, so a block can keep many kilobytes a warp in flight with few
// threads; the consumer waits on the stage's mbarrier phase.
#pragma once

#include <stdint.h>

namespace bulk {

__device__ __forceinline__ unsigned smem_addr(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }

// An mbarrier expecting one arrival (the issuing thread's arrive.expect_tx) per phase.
__device__ __forceinline__ void mbar_init(uint64_t *bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(bar)) : "memory");
}
// After the inits, before any copy names the barriers (visible to the async proxy).
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
}
// The issuing thread: this phase completes when `bytes` have landed.
__device__ __forceinline__ void mbar_expect_tx(uint64_t *bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}
// Spin until the phase of the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t *bar, unsigned parity) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT_%=;\n"
        "}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}
// bytes (a multiple of 16; both addresses 16-byte aligned) from global src to shared dst, counted on bar.
// The CTA is its own cluster when none is launched, so its shared::cta addresses are shared::cluster ones.
__device__ __forceinline__ void copy(void *dst, const void *src, unsigned bytes, uint64_t *bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
            smem_addr(dst)),
        "l"(src), "r"(bytes), "r"(smem_addr(bar))
        : "memory");
}

}  // namespace bulk

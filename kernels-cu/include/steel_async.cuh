// cp.async: asynchronous 16-byte copies from global to shared memory (sm_80+), the way tiles
// are streamed into shared memory while the previous tile is computed on.
//
//   cp_async_16(smem, gmem)   issue one copy (both addresses 16-byte aligned)
//   cp_async_commit()         close the copies issued so far into a group
//   cp_async_wait<N>()        wait until at most N of this thread's newest groups are pending
//
// A copy lands only at the wait that completes its group; other threads see it only after a
// barrier that follows that wait. Under the emulator the destination is unusable until then:
// touching it (by anyone) before the wait is an error naming both threads, so a missing wait or
// barrier is seen instead of a stale tile.
#pragma once
#include "steel_common.cuh"

static __device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
#ifdef STEEL_EMU
    steel_emu::cp_async(smem, gmem, 16);
#else
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#endif
}

static __device__ __forceinline__ void cp_async_commit() {
#ifdef STEEL_EMU
    steel_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
static __device__ __forceinline__ void cp_async_wait() {
#ifdef STEEL_EMU
    steel_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

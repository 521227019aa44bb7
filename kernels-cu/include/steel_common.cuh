// Shared device helpers of kernels-cu: types, bf16 conversions, warp and block reductions.
//
// Compiled by NVRTC for the device and by g++ for the emulator (STEEL_EMU, emu/shim.h). Helpers
// are `static __device__ __forceinline__`; no standard library on the device side.
#pragma once

#ifndef STEEL_EMU
#include <cuda_bf16.h>
#endif

typedef unsigned long long u64;
typedef __nv_bfloat16 bf16_t;

#define STEEL_FULL_MASK 0xffffffffu

// `#pragma unroll` for NVRTC; g++ (the emulator, warnings as errors) does not know the pragma.
#ifdef STEEL_EMU
#define STEEL_UNROLL
#else
#define STEEL_UNROLL _Pragma("unroll")
#endif
#define STEEL_NEG_INF __int_as_float(0xff800000)

// A parameter struct's size, checked on both sides of the FFI (the Rust mirror asserts it too).
#define STEEL_PARAMS_SIZE(T, bytes) static_assert(sizeof(T) == (bytes), #T " layout changed")

static __device__ __forceinline__ float bf16_to_f32(bf16_t h) { return __bfloat162float(h); }
static __device__ __forceinline__ bf16_t f32_to_bf16(float f) { return __float2bfloat16_rn(f); }

// Sum over the 32 lanes of a warp (all lanes active); every lane receives the result.
static __device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(STEEL_FULL_MASK, v, o);
    return v;
}

static __device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(STEEL_FULL_MASK, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, y = z = 1); every thread receives the result.
// `scratch` is STEEL_SHARED float[32]. Deterministic for a given blockDim.
static __device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // why: a previous block_sum may still be reading scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();  // why: every warp's partial is written before any thread reads them
#ifdef STEEL_MUTATE_BLOCK_SUM_UNINIT
    v = scratch[lane];  // test-only breakage: reads the partials of warps that do not exist
    (void)warps;
#else
    v = lane < warps ? scratch[lane] : 0.0f;
#endif
    return warp_sum(v);
}

// Online softmax statistics: the pair (max m, Σ exp(x − m)) merged in a numerically stable way.
// Only the side with the smaller max is rescaled: expf(0) is not promised to be exactly 1 (the
// emulator models expf's 2-ulp error), and a chain of merges must not compound that error.
static __device__ __forceinline__ void softmax_merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    if (mm == STEEL_NEG_INF) return;  // both empty
    s = (m == mm ? s : s * expf(m - mm)) + (m2 == mm ? s2 : s2 * expf(m2 - mm));
    m = mm;
}

// Merges (m, s) over the block; every thread receives the block's pair. `scratch_m` and
// `scratch_s` are STEEL_SHARED float[32].
static __device__ __forceinline__ void block_softmax_stats(float& m, float& s, float* scratch_m,
                                                           float* scratch_s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(STEEL_FULL_MASK, m, o);
        const float s2 = __shfl_xor_sync(STEEL_FULL_MASK, s, o);
        softmax_merge(m, s, m2, s2);
    }
    __syncthreads();  // why: a previous call may still be reading the scratch arrays
    if (lane == 0) {
        scratch_m[warp] = m;
        scratch_s[warp] = s;
    }
    __syncthreads();  // why: all warp pairs are written before any thread reads them
#ifdef STEEL_MUTATE_SOFTMAX_STATS_UNINIT
    m = scratch_m[lane];  // test-only breakage: reads the pairs of warps that do not exist
#else
    m = lane < warps ? scratch_m[lane] : STEEL_NEG_INF;
#endif
    s = lane < warps ? scratch_s[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(STEEL_FULL_MASK, m, o);
        const float s2 = __shfl_xor_sync(STEEL_FULL_MASK, s, o);
        softmax_merge(m, s, m2, s2);
    }
}

// Shared memory: every buffer is declared through these macros (build.rs refuses a raw
// `__shared__`). On the device they are plain `__shared__` arrays (16-byte aligned); under the
// emulator, regions of the block's checked arena, poisoned at every block start, bounds-checked
// and watched by the race detector (emu/check.cpp). `name` is a pointer there, so never take
// `sizeof(name)`: use the element count.
//   STEEL_SHARED(T, name, N)        T name[N]
//   STEEL_SHARED_2D(T, name, R, C)  T name[R][C]
//   STEEL_DYNAMIC_SHARED(T, name)   T* name: the launch's dynamic shared memory
#ifdef STEEL_EMU
#define STEEL_SHARED(T, name, N)                                                         \
    static const ::steel_emu::SharedSite steel_site_##name = {#name, __FILE__, __LINE__}; \
    T* const name = static_cast<T*>(::steel_emu::shared_static(&steel_site_##name,       \
                                                               sizeof(T) * (N), alignof(T)))
#define STEEL_SHARED_2D(T, name, R, C)                                                    \
    static const ::steel_emu::SharedSite steel_site_##name = {#name, __FILE__, __LINE__}; \
    T(*const name)[C] = static_cast<T(*)[C]>(                                             \
        ::steel_emu::shared_static(&steel_site_##name, sizeof(T) * (R) * (C), alignof(T)))
#define STEEL_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::steel_emu::dyn_shared())
#else
#define STEEL_SHARED(T, name, N) __shared__ __align__(16) T name[N]
#define STEEL_SHARED_2D(T, name, R, C) __shared__ __align__(16) T name[R][C]
#define STEEL_DYNAMIC_SHARED(T, name)                                \
    extern __shared__ __align__(16) unsigned char steel_dyn_smem_[]; \
    T* name = reinterpret_cast<T*>(steel_dyn_smem_)
#endif

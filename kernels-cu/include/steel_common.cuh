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
// `scratch` is __shared__ float[32]. Deterministic for a given blockDim.
static __device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // why: a previous block_sum may still be reading scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();  // why: every warp's partial is written before any thread reads them
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Online softmax statistics: the pair (max m, Σ exp(x − m)) merged in a numerically stable way.
static __device__ __forceinline__ void softmax_merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    if (mm == STEEL_NEG_INF) return;  // both empty
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// Merges (m, s) over the block; every thread receives the block's pair. `scratch_m` and
// `scratch_s` are __shared__ float[32].
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
    m = lane < warps ? scratch_m[lane] : STEEL_NEG_INF;
    s = lane < warps ? scratch_s[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(STEEL_FULL_MASK, m, o);
        const float s2 = __shfl_xor_sync(STEEL_FULL_MASK, s, o);
        softmax_merge(m, s, m2, s2);
    }
}

// Dynamic shared memory as `T* name` (the emulator provides a per-block buffer).
#ifdef STEEL_EMU
#define STEEL_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::steel_emu::dyn_shared())
#else
#define STEEL_DYNAMIC_SHARED(T, name)                      \
    extern __shared__ __align__(16) unsigned char steel_dyn_smem_[]; \
    T* name = reinterpret_cast<T*>(steel_dyn_smem_)
#endif

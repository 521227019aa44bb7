// Element access for the memory-bound kernels: f32 or bf16 storage, f32 arithmetic, and 128-bit
// vector loads and stores (LDG.E.128 / STG.E.128 in the SASS) on 16-byte aligned runs of elements.
//
// A kernel templated on its storage type `T` (float or bf16_t) reads with `ld_f32(p, i)` and
// writes with `st_f32(p, i, v)` (bf16 rounds to nearest even), and moves whole 16-byte vectors
// with `ld_vec`/`st_vec` when `is_aligned16(p)`: `Vec<T>::N` elements (4 f32 or 8 bf16) unpacked
// to floats. The pattern of every row or flat kernel is: a vector loop over the aligned prefix,
// then a scalar tail (and the scalar loop alone when a row does not start on 16 bytes).
#pragma once
#include "steel_common.cuh"

// 16 bytes, 16-byte aligned: the unit of a 128-bit global load or store.
struct __align__(16) Vec16 {
    unsigned w[4];
};

template <typename T>
struct Vec;
template <>
struct Vec<float> {
    static constexpr int N = 4;
};
template <>
struct Vec<bf16_t> {
    static constexpr int N = 8;
};

static __device__ __forceinline__ float to_f32(float v) { return v; }
static __device__ __forceinline__ float to_f32(bf16_t v) { return bf16_to_f32(v); }

template <typename T>
static __device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
    return v;
}
template <>
__device__ __forceinline__ bf16_t from_f32<bf16_t>(float v) {
    return f32_to_bf16(v);
}

template <typename T>
static __device__ __forceinline__ float ld_f32(const T* p, u64 i) {
    return to_f32(p[i]);
}
template <typename T>
static __device__ __forceinline__ void st_f32(T* p, u64 i, float v) {
    p[i] = from_f32<T>(v);
}

// Whether `p` starts a 16-byte vector (device allocations are 256-byte aligned; offsets into them
// may not be).
static __device__ __forceinline__ bool is_aligned16(const void* p) {
    return ((u64)p & 15u) == 0;
}

// Loads Vec<T>::N elements at `p` (16-byte aligned) into `out`, as floats.
static __device__ __forceinline__ void ld_vec(const float* p, float* out) {
    const Vec16 v = *reinterpret_cast<const Vec16*>(p);
    for (int j = 0; j < 4; ++j) out[j] = __uint_as_float(v.w[j]);
}
static __device__ __forceinline__ void ld_vec(const bf16_t* p, float* out) {
    const Vec16 v = *reinterpret_cast<const Vec16*>(p);
    for (int j = 0; j < 4; ++j) {
        out[2 * j] = __uint_as_float(v.w[j] << 16);
        out[2 * j + 1] = __uint_as_float(v.w[j] & 0xffff0000u);
    }
}

// Stores Vec<T>::N floats at `p` (16-byte aligned) as T.
static __device__ __forceinline__ void st_vec(float* p, const float* in) {
    Vec16 v;
    for (int j = 0; j < 4; ++j) v.w[j] = __float_as_uint(in[j]);
    *reinterpret_cast<Vec16*>(p) = v;
}
static __device__ __forceinline__ void st_vec(bf16_t* p, const float* in) {
    Vec16 v;
    for (int j = 0; j < 4; ++j) {
        const unsigned lo = __bfloat16_as_ushort(f32_to_bf16(in[2 * j]));
        const unsigned hi = __bfloat16_as_ushort(f32_to_bf16(in[2 * j + 1]));
        v.w[j] = lo | (hi << 16);
    }
    *reinterpret_cast<Vec16*>(p) = v;
}

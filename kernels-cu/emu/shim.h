// The host shim of the kernels-cu emulator (DESIGN §4): with it, g++ compiles the same .cu
// sources that NVRTC compiles for the device. Included first (`-include emu/shim.h`) with
// STEEL_EMU defined; never seen by NVRTC.
//
// Model: every CUDA thread is a fiber (emu.cpp); the fibers of one block run on one OS thread,
// one block at a time per OS thread. Index built-ins read the running fiber's record. Barriers,
// warp collectives, ldmatrix, mma.sync and cp.async are implemented in emu.cpp with CUDA's
// semantics; shared memory is a per-block arena (`STEEL_SHARED`, check.cpp) and every memory
// access of a kernel is seen by the checker through the `__tsan_*` hooks that g++'s
// `-fsanitize=thread` instrumentation calls (the ThreadSanitizer runtime is never linked).
// Misuse (a barrier not every thread reaches, lanes meeting at different collectives, a data
// race, an uninitialised or out-of-bounds access) is reported as an error naming the kernel,
// never a hang.
#pragma once
#ifndef STEEL_EMU
#error "emu/shim.h is for the host emulator build (STEEL_EMU) only"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
// No __noinline__: libstdc++ spells the attribute `__attribute__((__noinline__))` itself.
#define __restrict__ __restrict
// Erased here: build.rs reads each kernel's bounds from the source into the registry, and the
// launch checks the block against them.
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Shared memory is declared with STEEL_SHARED / STEEL_DYNAMIC_SHARED (steel_common.cuh), the
// emulator's checked arena; a raw `__shared__` does not compile here (and build.rs refuses it).
#define __shared__ steel_raw_shared_is_not_allowed_use_STEEL_SHARED

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};

namespace steel_emu {
// The running CUDA thread's built-ins; the scheduler points `steel_emu_builtins` at the fiber
// it switches to.
struct Builtins {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};
}  // namespace steel_emu
extern __thread const steel_emu::Builtins* steel_emu_builtins;

#define threadIdx (steel_emu_builtins->thread_idx)
#define blockIdx (steel_emu_builtins->block_idx)
#define blockDim (steel_emu_builtins->block_dim)
#define gridDim (steel_emu_builtins->grid_dim)
#define warpSize 32

namespace steel_emu {
// Block barrier (`__syncthreads`): orders every access before it, in every thread, before every
// access after it.
void sync_block();
// Barrier among the lanes of `mask` in the calling warp (`__syncwarp`); orders their accesses.
void sync_warp(unsigned mask);
// The kinds of warp collective: every lane of a mask must meet at the same kind with the same mask.
enum class Coll : uint8_t;
// Each lane of `mask` contributes `words` (≤ 4) 64-bit words; once every lane of the mask has
// arrived, the result points at every lane's words (`[lane * 4 + w]`), valid until the calling
// lane's next warp collective. Lanes outside the mask are rejected by callers. Orders nothing:
// only sync_block and sync_warp order memory.
const uint64_t* warp_exchange(Coll kind, unsigned mask, const uint64_t* mine, unsigned words);
constexpr Coll kShuffle = static_cast<Coll>(1);
constexpr Coll kVote = static_cast<Coll>(2);
// A fence: a real one, but it creates no happens-before edge (flag synchronisation is not
// modelled; a spin-wait would never yield to the other fibers).
void fence();
// Reports a misuse from inside a kernel and ends the block (never returns).
[[noreturn]] void fail(const char* what, unsigned detail);
// The calling thread's lane (threadIdx linearised % 32).
unsigned lane_id();
// Mask of lanes of the calling warp that exist and have not exited.
unsigned active_mask();
// Dynamic shared memory of the running block.
void* dyn_shared();
// A STEEL_SHARED declaration: its site, and its storage in the running block's arena (allocated
// and poisoned with 0xFF by the first thread that reaches it, the same address for all).
struct SharedSite {
    const char* name;
    const char* file;
    int line;
};
void* shared_static(const SharedSite* site, size_t bytes, size_t align);
void ldmatrix_x4(unsigned r[4], const void* row, bool trans);
void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]);
// cp.async: the copy happens at the wait_group that completes its group, as on the device, and
// its destination may not be touched before (the checker reports it).
void cp_async(void* smem, const void* gmem, unsigned bytes);
void cp_async_commit();
void cp_async_wait(unsigned newest_pending);

template <class T>
static inline uint64_t to_word(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a wide type");
    uint64_t w = 0;
    std::memcpy(&w, &v, sizeof(T));
    return w;
}
template <class T>
static inline T from_word(uint64_t w) {
    T v;
    std::memcpy(&v, &w, sizeof(T));
    return v;
}
// Shuffle core: `src` is the lane to read, or -1 to keep the own value.
template <class T>
static inline T shfl(unsigned mask, T v, int src) {
    uint64_t mine = to_word(v);
    const uint64_t* all = warp_exchange(kShuffle, mask, &mine, 1);
    if (src < 0) return v;
    if (!((mask >> src) & 1u)) fail("__shfl_*_sync reads a lane outside its mask", (unsigned)src);
    return from_word<T>(all[src * 4]);
}
}  // namespace steel_emu

static inline void __syncthreads() { steel_emu::sync_block(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { steel_emu::sync_warp(mask); }
static inline unsigned __activemask() { return steel_emu::active_mask(); }
static inline void __threadfence() { steel_emu::fence(); }
static inline void __threadfence_block() { steel_emu::fence(); }

template <class T>
static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    int lane = (int)steel_emu::lane_id();
    int seg = lane & ~(width - 1);
    return steel_emu::shfl(mask, v, seg + (src & (width - 1)));
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    int lane = (int)steel_emu::lane_id();
    int seg = lane & ~(width - 1);
    int s = lane ^ lane_mask;
    return steel_emu::shfl(mask, v, s >= seg + width ? -1 : s);
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = (int)steel_emu::lane_id();
    int seg = lane & ~(width - 1);
    int s = lane + (int)delta;
    return steel_emu::shfl(mask, v, s >= seg + width ? -1 : s);
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = (int)steel_emu::lane_id();
    int seg = lane & ~(width - 1);
    int s = lane - (int)delta;
    return steel_emu::shfl(mask, v, s < seg ? -1 : s);
}
static inline unsigned __ballot_sync(unsigned mask, int pred) {
    uint64_t mine = pred != 0;
    const uint64_t* all = steel_emu::warp_exchange(steel_emu::kVote, mask, &mine, 1);
    unsigned bits = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (((mask >> l) & 1u) && all[l * 4]) bits |= 1u << l;
    return bits;
}
static inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
static inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

// ---- atomics: real atomics, since blocks run on several OS threads ----------------------------
#define STEEL_EMU_ATOMIC_INT(T)                                                                   \
    static inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); } \
    static inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); } \
    static inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); } \
    static inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); } \
    static inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }   \
    static inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); } \
    static inline T atomicCAS(T* a, T cmp, T v) {                                                 \
        __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);       \
        return cmp;                                                                               \
    }                                                                                             \
    static inline T atomicMax(T* a, T v) {                                                        \
        T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                             \
        while (old < v &&                                                                         \
               !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) \
            ;                                                                                     \
        return old;                                                                               \
    }                                                                                             \
    static inline T atomicMin(T* a, T v) {                                                        \
        T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                             \
        while (old > v &&                                                                         \
               !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) \
            ;                                                                                     \
        return old;                                                                               \
    }
STEEL_EMU_ATOMIC_INT(int)
STEEL_EMU_ATOMIC_INT(unsigned)
STEEL_EMU_ATOMIC_INT(unsigned long long)
#undef STEEL_EMU_ATOMIC_INT

template <class F, class U>
static inline F steel_emu_atomic_float_add(F* a, F v) {
    U* bits = reinterpret_cast<U*>(a);
    U old = __atomic_load_n(bits, __ATOMIC_RELAXED), next;
    do {
        next = steel_emu::to_word(steel_emu::from_word<F>(old) + v);
    } while (!__atomic_compare_exchange_n(bits, &old, next, true, __ATOMIC_RELAXED,
                                          __ATOMIC_RELAXED));
    return steel_emu::from_word<F>(old);
}
static inline float atomicAdd(float* a, float v) {
    return steel_emu_atomic_float_add<float, uint32_t>(a, v);
}
static inline double atomicAdd(double* a, double v) {
    return steel_emu_atomic_float_add<double, uint64_t>(a, v);
}
static inline float atomicExch(float* a, float v) {
    return steel_emu::from_word<float>(__atomic_exchange_n(reinterpret_cast<uint32_t*>(a),
                                                           (uint32_t)steel_emu::to_word(v),
                                                           __ATOMIC_RELAXED));
}

// ---- math and bit casts -------------------------------------------------------------------------
// The device's math functions and intrinsics (expf, __expf, rsqrtf, __fdividef, …) with their
// documented accuracy: emu/device_math.h, which build.rs includes into the kernels only.
static inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
static inline float __int_as_float(int v) { return steel_emu::from_word<float>((uint32_t)v); }
static inline int __float_as_int(float v) { return (int)(uint32_t)steel_emu::to_word(v); }
static inline float __uint_as_float(unsigned v) { return steel_emu::from_word<float>(v); }
static inline unsigned __float_as_uint(float v) { return (uint32_t)steel_emu::to_word(v); }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) {
    return a < b ? a : b;
}
static inline unsigned long long max(unsigned long long a, unsigned long long b) {
    return a > b ? a : b;
}
// Bit counts of a 32-bit word (the device's POPC / FLO-based intrinsics).
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }

// ---- bf16: the shim's own type (cuda_bf16.h does not compile with host g++) --------------------
struct __nv_bfloat16 {
    unsigned short bits_;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits_; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
static inline float __bfloat162float(__nv_bfloat16 h) {
    return steel_emu::from_word<float>((uint32_t)h.bits_ << 16);
}
// Round to nearest even; NaN stays a (quiet) NaN.
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = (uint32_t)steel_emu::to_word(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(unsigned short)((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(unsigned short)(u >> 16)};
}
static inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// Elementwise ops over flat tensors: add, add_assign, scale (by a constant or a learned
// one-element tensor) and its backward, swiglu and its backward, and the f32 ↔ bf16 casts.
// Reference: runtime/src/cpu/elementwise.rs.
//
// Storage is f32 or bf16 (`T`), arithmetic f32, bf16 results rounded once to nearest even.
// Gradients (dy, dx, da, db, ds) are f32. Block b owns the elements b·CHUNK .. (b+1)·CHUNK
// (a partition fixed by n alone); it moves them as runs of 8 with 128-bit loads when every
// operand is 16-byte aligned, and element by element otherwise and for the tail.
//
// scale_by_bwd's Σ x·dy is deterministic: each block writes the f64 sum of its chunk (a fixed
// tree over its threads), and `sum_f64_into_f32` adds the partials in block order.
#include "steel_common.cuh"
#include "steel_vec.cuh"

#define EW_CHUNK 2048ull  // elements per block: 256 threads × 8

// ---- a + b, dst += src, alpha · x ------------------------------------------------------------

// out = f(a, b) elementwise: add, swiglu.
struct BinaryParams {
    const void* a;  // (n) T
    const void* b;  // (n) T
    void* out;      // (n) T
    u64 n;
};
STEEL_PARAMS_SIZE(BinaryParams, 32);

template <typename T>
static __device__ __forceinline__ void add_fwd(const BinaryParams& p) {
    const T* a = (const T*)p.a;
    const T* b = (const T*)p.b;
    T* out = (T*)p.out;
    const FlatSpan s =
        flat_span(p.n, EW_CHUNK, is_aligned16(a) && is_aligned16(b) && is_aligned16(out));
    for (u64 i = s.begin + 8 * (u64)threadIdx.x; i < s.vec_end; i += 8 * (u64)blockDim.x) {
        float x[8], y[8];
        ld8(a + i, x);
        ld8(b + i, y);
STEEL_UNROLL
        for (int j = 0; j < 8; ++j) x[j] += y[j];
        st8(out + i, x);
    }
#ifdef STEEL_MUTATE_ELEMENTWISE_OOB
    for (u64 i = s.vec_end + threadIdx.x; i <= s.end; i += blockDim.x) {  // test-only: one past
#else
    for (u64 i = s.vec_end + threadIdx.x; i < s.end; i += blockDim.x) {
#endif
#ifdef STEEL_MUTATE_ADD_FWD
        st_f32(out, i, ld_f32(a, i) - ld_f32(b, i));  // test-only breakage: the tail subtracts
#else
        st_f32(out, i, ld_f32(a, i) + ld_f32(b, i));
#endif
    }
}

extern "C" __global__ void __launch_bounds__(256) add_fwd_f32(const BinaryParams p) {
    add_fwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(256) add_fwd_bf16(const BinaryParams p) {
    add_fwd<bf16_t>(p);
}

struct AddAssignParams {
    void* dst;        // (n) T, += src
    const void* src;  // (n) T
    u64 n;
};
STEEL_PARAMS_SIZE(AddAssignParams, 24);

template <typename T>
static __device__ __forceinline__ void add_assign(const AddAssignParams& p) {
    T* dst = (T*)p.dst;
    const T* src = (const T*)p.src;
    const FlatSpan s = flat_span(p.n, EW_CHUNK, is_aligned16(dst) && is_aligned16(src));
    for (u64 i = s.begin + 8 * (u64)threadIdx.x; i < s.vec_end; i += 8 * (u64)blockDim.x) {
        float x[8], y[8];
        ld8(dst + i, x);
        ld8(src + i, y);
STEEL_UNROLL
        for (int j = 0; j < 8; ++j) x[j] += y[j];
        st8(dst + i, x);
    }
#ifdef STEEL_MUTATE_ADD_ASSIGN
    for (u64 i = s.vec_end + threadIdx.x; i + 1 < s.end; i += blockDim.x)  // test-only: drops one
#else
    for (u64 i = s.vec_end + threadIdx.x; i < s.end; i += blockDim.x)
#endif
        st_f32(dst, i, ld_f32(dst, i) + ld_f32(src, i));
}

extern "C" __global__ void __launch_bounds__(256) add_assign_f32(const AddAssignParams p) {
    add_assign<float>(p);
}
extern "C" __global__ void __launch_bounds__(256) add_assign_bf16(const AddAssignParams p) {
    add_assign<bf16_t>(p);
}

struct ScaleParams {
    const void* x;   // (n) T
    const float* s;  // (1) the learned scale, or null: alpha
    void* out;       // (n) T
    u64 n;
    float alpha;
    unsigned pad_;
};
STEEL_PARAMS_SIZE(ScaleParams, 40);

template <typename T>
static __device__ __forceinline__ void scale_fwd(const ScaleParams& p) {
    const T* x = (const T*)p.x;
    T* out = (T*)p.out;
    const float a = p.s ? p.s[0] : p.alpha;
    const FlatSpan s = flat_span(p.n, EW_CHUNK, is_aligned16(x) && is_aligned16(out));
    for (u64 i = s.begin + 8 * (u64)threadIdx.x; i < s.vec_end; i += 8 * (u64)blockDim.x) {
        float v[8];
        ld8(x + i, v);
STEEL_UNROLL
        for (int j = 0; j < 8; ++j) {
#ifdef STEEL_MUTATE_SCALE_FWD
            v[j] = v[j] * a + (j == 7 ? 1e-3f : 0.0f);  // test-only breakage: one lane off
#else
            v[j] = v[j] * a;
#endif
        }
        st8(out + i, v);
    }
    for (u64 i = s.vec_end + threadIdx.x; i < s.end; i += blockDim.x)
        st_f32(out, i, ld_f32(x, i) * a);
}

extern "C" __global__ void __launch_bounds__(256) scale_fwd_f32(const ScaleParams p) {
    scale_fwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(256) scale_fwd_bf16(const ScaleParams p) {
    scale_fwd<bf16_t>(p);
}

// ---- scale_by backward: dx += s · dy, ds += Σ x · dy ---------------------------------------------

struct ScaleByBwdParams {
    const void* x;    // (n) T
    const float* s;   // (1)
    const float* dy;  // (n)
    float* dx;        // (n), +=
    double* partial;  // (blocks) Σ x · dy of each block's chunk
    u64 n;
};
STEEL_PARAMS_SIZE(ScaleByBwdParams, 48);

template <typename T>
static __device__ __forceinline__ void scale_by_bwd(const ScaleByBwdParams& p) {
    STEEL_SHARED(double, warp_part, 32);
    const T* x = (const T*)p.x;
    const float a = p.s[0];
    const FlatSpan s =
        flat_span(p.n, EW_CHUNK, is_aligned16(x) && is_aligned16(p.dy) && is_aligned16(p.dx));
    double acc = 0.0;
    for (u64 i = s.begin + 8 * (u64)threadIdx.x; i < s.vec_end; i += 8 * (u64)blockDim.x) {
        float xv[8], g[8], d[8];
        ld8(x + i, xv);
        ld8(p.dy + i, g);
        ld8(p.dx + i, d);
STEEL_UNROLL
        for (int j = 0; j < 8; ++j) {
            d[j] += a * g[j];
            acc += (double)xv[j] * (double)g[j];
        }
        st8(p.dx + i, d);
    }
    for (u64 i = s.vec_end + threadIdx.x; i < s.end; i += blockDim.x) {
        const float g = p.dy[i];
        p.dx[i] += a * g;
        acc += (double)ld_f32(x, i) * (double)g;
    }
    // The block's sum: a fixed shuffle tree per warp, then the warps in order.
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(STEEL_FULL_MASK, acc, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) warp_part[warp] = acc;
    __syncthreads();  // why: every warp's sum is written before thread 0 adds them
    if (threadIdx.x == 0) {
        double total = 0.0;
#ifdef STEEL_MUTATE_SCALE_BY_BWD
        for (int w = 0; w + 1 < warps; ++w) total += warp_part[w];  // test-only: drops a warp
#else
        for (int w = 0; w < warps; ++w) total += warp_part[w];
#endif
        p.partial[blockIdx.x] = total;
    }
}

extern "C" __global__ void __launch_bounds__(256) scale_by_bwd_f32(const ScaleByBwdParams p) {
    scale_by_bwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(256) scale_by_bwd_bf16(const ScaleByBwdParams p) {
    scale_by_bwd<bf16_t>(p);
}

struct SumF64IntoF32Params {
    const double* partial;  // (count)
    float* out;             // (1), += the sum
    u64 count;
};
STEEL_PARAMS_SIZE(SumF64IntoF32Params, 24);

// out[0] += (float) Σ partial: the f64 partials added in index order by one thread (they are few:
// one per 2048 elements), rounded to f32 once, then added (as the CPU reference does).
extern "C" __global__ void __launch_bounds__(32) sum_f64_into_f32(const SumF64IntoF32Params p) {
    if (threadIdx.x != 0) return;
    double total = 0.0;
    for (u64 i = 0; i < p.count; ++i) total += p.partial[i];
    p.out[0] += (float)total;
}

// ---- swiglu: silu(a) ⊙ b and its backward --------------------------------------------------------

static __device__ __forceinline__ float sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }


template <typename T>
static __device__ __forceinline__ void swiglu_fwd(const BinaryParams& p) {
    const T* a = (const T*)p.a;
    const T* b = (const T*)p.b;
    T* out = (T*)p.out;
    const FlatSpan s =
        flat_span(p.n, EW_CHUNK, is_aligned16(a) && is_aligned16(b) && is_aligned16(out));
    for (u64 i = s.begin + 8 * (u64)threadIdx.x; i < s.vec_end; i += 8 * (u64)blockDim.x) {
        float x[8], y[8];
        ld8(a + i, x);
        ld8(b + i, y);
STEEL_UNROLL
        for (int j = 0; j < 8; ++j) x[j] = x[j] * sigmoid(x[j]) * y[j];
        st8(out + i, x);
    }
    for (u64 i = s.vec_end + threadIdx.x; i < s.end; i += blockDim.x) {
        const float x = ld_f32(a, i);
#ifdef STEEL_MUTATE_SWIGLU_FWD
        st_f32(out, i, x * sigmoid(-x) * ld_f32(b, i));  // test-only breakage: σ(−a)
#else
        st_f32(out, i, x * sigmoid(x) * ld_f32(b, i));
#endif
    }
}

extern "C" __global__ void __launch_bounds__(256) swiglu_fwd_f32(const BinaryParams p) {
    swiglu_fwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(256) swiglu_fwd_bf16(const BinaryParams p) {
    swiglu_fwd<bf16_t>(p);
}

struct SwigluBwdParams {
    const void* a;    // (n) T
    const void* b;    // (n) T
    const float* dy;  // (n)
    float* da;        // (n), +=
    float* db;        // (n), +=
    u64 n;
};
STEEL_PARAMS_SIZE(SwigluBwdParams, 48);

// da += dy · b · σ(a)(1 + a(1 − σ(a))), db += dy · a σ(a).
static __device__ __forceinline__ void swiglu_grad(float a, float b, float g, float& da,
                                                   float& db) {
    const float s = sigmoid(a);
#ifdef STEEL_MUTATE_SWIGLU_BWD
    const float dsilu = s * (1.0f + a * s);  // test-only breakage: (1 − σ) dropped
#else
    const float dsilu = s * (1.0f + a * (1.0f - s));
#endif
    da += g * b * dsilu;
    db += g * (a * s);
}

template <typename T>
static __device__ __forceinline__ void swiglu_bwd(const SwigluBwdParams& p) {
    const T* a = (const T*)p.a;
    const T* b = (const T*)p.b;
    const bool aligned = is_aligned16(a) && is_aligned16(b) && is_aligned16(p.dy) &&
                         is_aligned16(p.da) && is_aligned16(p.db);
    const FlatSpan s = flat_span(p.n, EW_CHUNK, aligned);
    for (u64 i = s.begin + 8 * (u64)threadIdx.x; i < s.vec_end; i += 8 * (u64)blockDim.x) {
        float x[8], y[8], g[8], da[8], db[8];
        ld8(a + i, x);
        ld8(b + i, y);
        ld8(p.dy + i, g);
        ld8(p.da + i, da);
        ld8(p.db + i, db);
STEEL_UNROLL
        for (int j = 0; j < 8; ++j) swiglu_grad(x[j], y[j], g[j], da[j], db[j]);
        st8(p.da + i, da);
        st8(p.db + i, db);
    }
    for (u64 i = s.vec_end + threadIdx.x; i < s.end; i += blockDim.x) {
        float da = p.da[i], db = p.db[i];
        swiglu_grad(ld_f32(a, i), ld_f32(b, i), p.dy[i], da, db);
        p.da[i] = da;
        p.db[i] = db;
    }
}

extern "C" __global__ void __launch_bounds__(256) swiglu_bwd_f32(const SwigluBwdParams p) {
    swiglu_bwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(256) swiglu_bwd_bf16(const SwigluBwdParams p) {
    swiglu_bwd<bf16_t>(p);
}

// ---- casts -----------------------------------------------------------------------------------

struct CastParams {
    const void* x;  // (n) S
    void* out;      // (n) D
    u64 n;
};
STEEL_PARAMS_SIZE(CastParams, 24);

template <typename S, typename D>
static __device__ __forceinline__ void cast(const CastParams& p) {
    const S* x = (const S*)p.x;
    D* out = (D*)p.out;
    const FlatSpan s = flat_span(p.n, EW_CHUNK, is_aligned16(x) && is_aligned16(out));
    for (u64 i = s.begin + 8 * (u64)threadIdx.x; i < s.vec_end; i += 8 * (u64)blockDim.x) {
        float v[8];
        ld8(x + i, v);
        st8(out + i, v);
    }
#ifdef STEEL_MUTATE_CAST
    for (u64 i = s.vec_end + threadIdx.x; i < s.end; i += blockDim.x)  // test-only: truncates
        out[i] = from_f32<D>(__uint_as_float(__float_as_uint(ld_f32(x, i)) & 0xffff0000u));
#else
    for (u64 i = s.vec_end + threadIdx.x; i < s.end; i += blockDim.x)
        st_f32(out, i, ld_f32(x, i));
#endif
}

extern "C" __global__ void __launch_bounds__(256) cast_f32_bf16(const CastParams p) {
    cast<float, bf16_t>(p);
}
extern "C" __global__ void __launch_bounds__(256) cast_bf16_f32(const CastParams p) {
    cast<bf16_t, float>(p);
}

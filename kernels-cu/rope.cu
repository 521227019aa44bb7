// Rotary position embedding, rotate_half (GPT-NeoX) layout, on rows of x [B, T, H, D] (D even,
// half = D/2: element j pairs with j + half). Reference: runtime/src/cpu/rope.rs. Launchers:
// runtime/src/gpu/rope.rs.
//
// The angles are not computed here: the launcher uploads the CPU's f32 tables cos, sin [T, half]
// (`cpu::rope::rope_tables`), so the kernels differ from the reference only by the rounding of
// their multiply-adds.
//   Forward  (`rope_fwd_<f32|bf16>`): y[j] = x[j]·c − x[j+half]·s, y[j+half] = x[j+half]·c + x[j]·s.
//   Backward (`rope_bwd_f32`, the transposed rotation, accumulated):
//            dx[j] += dy[j]·c + dy[j+half]·s, dx[j+half] += dy[j+half]·c − dy[j]·s.
// Row r = ((b · T) + t) · H + h uses the tables' row t = (r / H) mod T. Arithmetic in f32; a bf16
// y is rounded once, to nearest even.
//
// Work split: a flat grid-stride loop over units. When half is a multiple of the vector width
// (4 f32 or 8 bf16) and the tensors start on 16 bytes, a unit is one vector of each half of a
// row (two 128-bit loads, two 128-bit stores); otherwise a unit is one pair of elements. No
// shared memory, no barriers: every unit is independent.
#include "steel_vec.cuh"

constexpr int ROPE_BLOCK = 256;

struct RopeFwdParams {
    const void* x;     // (rows, 2·half) of T
    const float* cos;  // (seq, half)
    const float* sin;  // (seq, half)
    void* y;           // (rows, 2·half) of T
    u64 rows;          // B · T · H
    u64 seq;           // T
    u64 heads;         // H
    u64 half;          // D / 2
};
STEEL_PARAMS_SIZE(RopeFwdParams, 64);

struct RopeBwdParams {
    const float* dy;   // (rows, 2·half)
    const float* cos;  // (seq, half)
    const float* sin;  // (seq, half)
    float* dx;         // (rows, 2·half), accumulated
    u64 rows;
    u64 seq;
    u64 heads;
    u64 half;
};
STEEL_PARAMS_SIZE(RopeBwdParams, 64);

// The rotation of `n` pairs starting at column j0 of one row: a[k] = x[j0 + k] (first half),
// b[k] = x[j0 + half + k]; sign +1 forward, −1 for the transpose. Outputs overwrite a and b.
template <int n>
static __device__ __forceinline__ void rotate(float* a, float* b, const float* c, const float* s,
                                              float sign) {
STEEL_UNROLL
    for (int k = 0; k < n; ++k) {
        const float sk = sign * s[k];
        const float ya = a[k] * c[k] - b[k] * sk;
#ifdef STEEL_MUTATE_ROPE_FWD
        const float yb = b[k] * c[k] - a[k] * sk;  // test-only breakage: wrong sign on the second half
#else
        const float yb = b[k] * c[k] + a[k] * sk;
#endif
        a[k] = ya;
        b[k] = yb;
    }
}

// Units per row: vectors of N pairs when `vec`, else single pairs.
static __device__ __forceinline__ u64 units_per_row(u64 half, int n) {
#ifdef STEEL_MUTATE_ROPE_OOB
    return half / n + 1;  // test-only breakage: one unit past the end of every row
#else
    return half / n;
#endif
}

template <typename T>
static __device__ __forceinline__ void rope_fwd(const RopeFwdParams& p) {
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    constexpr int N = Vec<T>::N;
    const bool vec = p.half % N == 0 && is_aligned16(x) && is_aligned16(y);
    const int n = vec ? N : 1;
    const u64 per_row = units_per_row(p.half, n), units = p.rows * per_row;
    const u64 d = 2 * p.half;
    for (u64 u = (u64)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (u64)gridDim.x * blockDim.x) {
        const u64 r = u / per_row, j0 = (u % per_row) * n;
        const u64 t = (r / p.heads) % p.seq;
        const u64 xa = r * d + j0, xb = xa + p.half, tab = t * p.half + j0;
        float a[N], b[N], c[N], s[N];
        if (vec) {
            ld_vec(x + xa, a);
            ld_vec(x + xb, b);
STEEL_UNROLL
            for (int k = 0; k < N; ++k) {
                c[k] = p.cos[tab + k];
                s[k] = p.sin[tab + k];
            }
            rotate<N>(a, b, c, s, 1.0f);
            st_vec(y + xa, a);
            st_vec(y + xb, b);
        } else {
            a[0] = ld_f32(x, xa);
            b[0] = ld_f32(x, xb);
            c[0] = p.cos[tab];
            s[0] = p.sin[tab];
            rotate<1>(a, b, c, s, 1.0f);
            st_f32(y, xa, a[0]);
            st_f32(y, xb, b[0]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(ROPE_BLOCK) rope_fwd_f32(const RopeFwdParams p) {
    rope_fwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(ROPE_BLOCK) rope_fwd_bf16(const RopeFwdParams p) {
    rope_fwd<bf16_t>(p);
}

extern "C" __global__ void __launch_bounds__(ROPE_BLOCK) rope_bwd_f32(const RopeBwdParams p) {
    constexpr int N = Vec<float>::N;
    const bool vec = p.half % N == 0 && is_aligned16(p.dy) && is_aligned16(p.dx);
    const int n = vec ? N : 1;
    const u64 per_row = units_per_row(p.half, n), units = p.rows * per_row;
    const u64 d = 2 * p.half;
#ifdef STEEL_MUTATE_ROPE_BWD
    const float sign = 1.0f;  // test-only breakage: the forward rotation instead of its transpose
#else
    const float sign = -1.0f;
#endif
    for (u64 u = (u64)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (u64)gridDim.x * blockDim.x) {
        const u64 r = u / per_row, j0 = (u % per_row) * n;
        const u64 t = (r / p.heads) % p.seq;
        const u64 xa = r * d + j0, xb = xa + p.half, tab = t * p.half + j0;
        float a[N], b[N], c[N], s[N], oa[N], ob[N];
        if (vec) {
            ld_vec(p.dy + xa, a);
            ld_vec(p.dy + xb, b);
            ld_vec(p.dx + xa, oa);
            ld_vec(p.dx + xb, ob);
STEEL_UNROLL
            for (int k = 0; k < N; ++k) {
                c[k] = p.cos[tab + k];
                s[k] = p.sin[tab + k];
            }
            rotate<N>(a, b, c, s, sign);
STEEL_UNROLL
            for (int k = 0; k < N; ++k) {
                oa[k] += a[k];
                ob[k] += b[k];
            }
            st_vec(p.dx + xa, oa);
            st_vec(p.dx + xb, ob);
        } else {
            a[0] = p.dy[xa];
            b[0] = p.dy[xb];
            c[0] = p.cos[tab];
            s[0] = p.sin[tab];
            rotate<1>(a, b, c, s, sign);
            p.dx[xa] += a[0];
            p.dx[xb] += b[0];
        }
    }
}

// L2 normalisation along any axis (torch F.normalize), forward and backward; x and y stored as
// f32 or bf16, the norms and all arithmetic f32. Reference: runtime/src/cpu/l2_normalize.rs.
// Launchers: runtime/src/gpu/l2_normalize.rs (configurations shared with softmax.rs).
//
// The tensor is [outer, n, inner] around the axis; the work is cut as steel_axis.cuh describes:
// the row kernels (`l2_normalize_fwd_*`, `l2_normalize_bwd_*`: inner = 1, one block per row,
// 128-bit vectors over aligned rows, scalar tail) and the strided kernels
// (`l2_normalize_strided_*`: inner > 1, a tile of adjacent columns × row phases, one barrier
// between the partials and their in-order fold).
//
// Forward: norm = sqrt(Σ_i x_i²) (written, f32, one per [outer, inner] column), y_i = x_i /
// max(norm, eps). Backward from the saved y and norm: when norm > eps, dx_i += (dy_i − y_i · dot)
// / norm with dot = Σ_i y_i · dy_i; otherwise the divisor was the constant eps and dx_i += dy_i /
// eps. y f32 or bf16, dy and dx f32.
#include "steel_axis.cuh"

struct L2NormalizeFwdParams {
    const void* x;  // (outer, n, inner), T
    void* y;        // (outer, n, inner), T
    float* norm;    // (outer, inner)
    u64 outer;
    u64 n;
    u64 inner;       // 1 for the row kernels
    u64 col_blocks;  // strided kernels: column tiles per outer index (⌈inner / blockDim.x⌉)
    float eps;
    unsigned pad_;
};
STEEL_PARAMS_SIZE(L2NormalizeFwdParams, 64);

struct L2NormalizeBwdParams {
    const void* y;      // (outer, n, inner), T: the forward's output
    const float* norm;  // (outer, inner)
    const float* dy;    // (outer, n, inner)
    float* dx;          // (outer, n, inner), accumulated
    u64 outer;
    u64 n;
    u64 inner;
    u64 col_blocks;
    float eps;
    unsigned pad_;
};
STEEL_PARAMS_SIZE(L2NormalizeBwdParams, 72);

// ---- rows (inner = 1): one block per row ----------------------------------------------------------

template <typename T>
static __device__ __forceinline__ void l2_normalize_rows_fwd(const L2NormalizeFwdParams& p) {
    STEEL_SHARED(float, scratch, 32);
    const u64 n = p.n, t = threadIdx.x, step = blockDim.x;
    const T* x = static_cast<const T*>(p.x) + (u64)blockIdx.x * n;
    T* y = static_cast<T*>(p.y) + (u64)blockIdx.x * n;
    const u64 nv = vec_prefix(n, is_aligned16(x) && is_aligned16(y));
    float ss = 0.0f;
    for (u64 j = t * AXIS_VEC; j < nv; j += step * AXIS_VEC) {
        float v[AXIS_VEC];
        ld8(x + j, v);
        for (int k = 0; k < AXIS_VEC; ++k) ss += v[k] * v[k];
    }
#ifdef STEEL_MUTATE_L2_NORMALIZE_FWD
    const u64 ss_end = n - 1;  // test-only breakage: the row's last element left out of the norm
#else
    const u64 ss_end = n;
#endif
    for (u64 j = nv + t; j < ss_end; j += step) {
        const float v = ld_f32(x, j);
        ss += v * v;
    }
    const float norm = sqrtf(block_sum(ss, scratch));
    if (t == 0) p.norm[blockIdx.x] = norm;
    const float d = fmaxf(norm, p.eps);
    for (u64 j = t * AXIS_VEC; j < nv; j += step * AXIS_VEC) {
        float v[AXIS_VEC];
        ld8(x + j, v);
        for (int k = 0; k < AXIS_VEC; ++k) v[k] = v[k] / d;
        st8(y + j, v);
    }
    for (u64 j = nv + t; j < n; j += step) st_f32(y, j, ld_f32(x, j) / d);
}

template <typename T>
static __device__ __forceinline__ void l2_normalize_rows_bwd(const L2NormalizeBwdParams& p) {
    STEEL_SHARED(float, scratch, 32);
    const u64 n = p.n, t = threadIdx.x, step = blockDim.x, row = (u64)blockIdx.x * n;
    const T* y = static_cast<const T*>(p.y) + row;
    const float* dy = p.dy + row;
    float* dx = p.dx + row;
    const u64 nv = vec_prefix(n, is_aligned16(y) && is_aligned16(dy) && is_aligned16(dx));
    const float norm = p.norm[blockIdx.x];
    if (!(norm > p.eps)) {
        // The divisor was the constant eps: dx += dy / eps (a branch the whole block takes).
        for (u64 j = t * AXIS_VEC; j < nv; j += step * AXIS_VEC) {
            float vg[AXIS_VEC], vd[AXIS_VEC];
            ld8(dy + j, vg);
            ld8(dx + j, vd);
            for (int k = 0; k < AXIS_VEC; ++k) vd[k] += vg[k] / p.eps;
            st8(dx + j, vd);
        }
        for (u64 j = nv + t; j < n; j += step) dx[j] += dy[j] / p.eps;
        return;
    }
    float dot = 0.0f;
    for (u64 j = t * AXIS_VEC; j < nv; j += step * AXIS_VEC) {
        float vy[AXIS_VEC], vg[AXIS_VEC];
        ld8(y + j, vy);
        ld8(dy + j, vg);
        for (int k = 0; k < AXIS_VEC; ++k) dot += vy[k] * vg[k];
    }
#ifdef STEEL_MUTATE_L2_NORMALIZE_BWD
    const u64 dot_end = n - 1;  // test-only breakage: the row's last element left out of Σ y ⊙ dy
#else
    const u64 dot_end = n;
#endif
    for (u64 j = nv + t; j < dot_end; j += step) dot += ld_f32(y, j) * dy[j];
    dot = block_sum(dot, scratch);
    for (u64 j = t * AXIS_VEC; j < nv; j += step * AXIS_VEC) {
        float vy[AXIS_VEC], vg[AXIS_VEC], vd[AXIS_VEC];
        ld8(y + j, vy);
        ld8(dy + j, vg);
        ld8(dx + j, vd);
        for (int k = 0; k < AXIS_VEC; ++k) vd[k] += (vg[k] - vy[k] * dot) / norm;
        st8(dx + j, vd);
    }
    for (u64 j = nv + t; j < n; j += step) dx[j] += (dy[j] - ld_f32(y, j) * dot) / norm;
}

extern "C" __global__ void __launch_bounds__(AXIS_ROW_THREADS) l2_normalize_fwd_f32(const L2NormalizeFwdParams p) {
    l2_normalize_rows_fwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(AXIS_ROW_THREADS) l2_normalize_fwd_bf16(const L2NormalizeFwdParams p) {
    l2_normalize_rows_fwd<bf16_t>(p);
}
extern "C" __global__ void __launch_bounds__(AXIS_ROW_THREADS) l2_normalize_bwd_f32(const L2NormalizeBwdParams p) {
    l2_normalize_rows_bwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(AXIS_ROW_THREADS) l2_normalize_bwd_bf16(const L2NormalizeBwdParams p) {
    l2_normalize_rows_bwd<bf16_t>(p);
}

// ---- strided (inner > 1): a tile of columns × row phases --------------------------------------------

// The fold of a column's partials runs over ty = 0 .. L2_FOLD_END − 1 (blockDim.y).
#ifdef STEEL_MUTATE_L2_NORMALIZE_STRIDED_UNINIT
#define L2_FOLD_END (blockDim.y + 1)  // test-only breakage: one row phase past the tile
#else
#define L2_FOLD_END blockDim.y
#endif

template <typename T>
static __device__ __forceinline__ void l2_normalize_strided_fwd(const L2NormalizeFwdParams& p) {
    STEEL_SHARED(float, part, AXIS_STRIDED_THREADS);
    const AxisTile tile = axis_tile(p.n, p.inner, p.col_blocks);
    const T* x = static_cast<const T*>(p.x) + tile.base;
    T* y = static_cast<T*>(p.y) + tile.base;
    const u64 inner = p.inner;
#ifdef STEEL_MUTATE_L2_NORMALIZE_STRIDED_FWD
    const u64 ss_end = p.n - 1;  // test-only breakage: the last row left out of the norm
#else
    const u64 ss_end = p.n;
#endif
    float ss = 0.0f;
    if (tile.active)
        for (u64 i = threadIdx.y; i < ss_end; i += blockDim.y) {
            const float v = ld_f32(x, i * inner);
            ss += v * v;
        }
    part[tile.slot] = ss;
    __syncthreads();  // why: every row phase's partial of a column is written before any thread folds them
    ss = 0.0f;
    for (unsigned k = 0; k < L2_FOLD_END; ++k) ss += part[k * blockDim.x + threadIdx.x];
    if (!tile.active) return;
    const float norm = sqrtf(ss);
    if (threadIdx.y == 0) p.norm[tile.col] = norm;
    const float d = fmaxf(norm, p.eps);
    for (u64 i = threadIdx.y; i < p.n; i += blockDim.y) st_f32(y, i * inner, ld_f32(x, i * inner) / d);
}

template <typename T>
static __device__ __forceinline__ void l2_normalize_strided_bwd(const L2NormalizeBwdParams& p) {
    STEEL_SHARED(float, part, AXIS_STRIDED_THREADS);
    const AxisTile tile = axis_tile(p.n, p.inner, p.col_blocks);
    const T* y = static_cast<const T*>(p.y) + tile.base;
    const float* dy = p.dy + tile.base;
    float* dx = p.dx + tile.base;
    const u64 inner = p.inner;
#ifdef STEEL_MUTATE_L2_NORMALIZE_STRIDED_BWD
    const u64 dot_end = p.n - 1;  // test-only breakage: the last row left out of Σ y ⊙ dy
#else
    const u64 dot_end = p.n;
#endif
    float dot = 0.0f;
    if (tile.active)
        for (u64 i = threadIdx.y; i < dot_end; i += blockDim.y) dot += ld_f32(y, i * inner) * dy[i * inner];
    part[tile.slot] = dot;
    __syncthreads();  // why: every row phase's partial of a column is written before any thread folds them
    dot = 0.0f;
    for (unsigned k = 0; k < L2_FOLD_END; ++k) dot += part[k * blockDim.x + threadIdx.x];
    if (!tile.active) return;
    const float norm = p.norm[tile.col];
    if (norm > p.eps) {
        for (u64 i = threadIdx.y; i < p.n; i += blockDim.y)
            dx[i * inner] += (dy[i * inner] - ld_f32(y, i * inner) * dot) / norm;
    } else {
        for (u64 i = threadIdx.y; i < p.n; i += blockDim.y) dx[i * inner] += dy[i * inner] / p.eps;
    }
}

extern "C" __global__ void __launch_bounds__(AXIS_STRIDED_THREADS) l2_normalize_strided_fwd_f32(const L2NormalizeFwdParams p) {
    l2_normalize_strided_fwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(AXIS_STRIDED_THREADS) l2_normalize_strided_fwd_bf16(const L2NormalizeFwdParams p) {
    l2_normalize_strided_fwd<bf16_t>(p);
}
extern "C" __global__ void __launch_bounds__(AXIS_STRIDED_THREADS) l2_normalize_strided_bwd_f32(const L2NormalizeBwdParams p) {
    l2_normalize_strided_bwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(AXIS_STRIDED_THREADS) l2_normalize_strided_bwd_bf16(const L2NormalizeBwdParams p) {
    l2_normalize_strided_bwd<bf16_t>(p);
}

// Softmax along any axis, forward and backward; x and y stored as f32 or bf16, all arithmetic f32.
// Reference: runtime/src/cpu/softmax.rs. Launchers: runtime/src/gpu/softmax.rs.
//
// The tensor is [outer, n, inner] around the axis; the work is cut as steel_axis.cuh describes:
// the row kernels (`softmax_fwd_*`, `softmax_bwd_*`: inner = 1, one block per row, 128-bit
// vectors over aligned rows, scalar tail) and the strided kernels (`softmax_strided_*`: inner > 1,
// a tile of adjacent columns × row phases, one barrier between the partials and their in-order
// fold).
//
// Forward: m = max_i x_i, s = Σ_i exp(x_i − m) (accumulated online: each thread keeps its own
// pair, rescaled when its max grows), y_i = exp(x_i − m) / s, rounded once to y's storage type.
// x is read twice (statistics, then the write), y written once.
// Backward: dot = Σ_i y_i · dy_i, dx_i += y_i · (dy_i − dot); y f32 or bf16 (the saved output),
// dy and dx f32.
#include "steel_axis.cuh"

struct SoftmaxFwdParams {
    const void* x;  // (outer, n, inner), T
    void* y;        // (outer, n, inner), T
    u64 outer;
    u64 n;
    u64 inner;       // 1 for the row kernels
    u64 col_blocks;  // strided kernels: column tiles per outer index (⌈inner / blockDim.x⌉)
};
STEEL_PARAMS_SIZE(SoftmaxFwdParams, 48);

struct SoftmaxBwdParams {
    const void* y;    // (outer, n, inner), T: the forward's output
    const float* dy;  // (outer, n, inner)
    float* dx;        // (outer, n, inner), accumulated
    u64 outer;
    u64 n;
    u64 inner;
    u64 col_blocks;
};
STEEL_PARAMS_SIZE(SoftmaxBwdParams, 56);

// ---- rows (inner = 1): one block per row ----------------------------------------------------------

template <typename T>
static __device__ __forceinline__ void softmax_rows_fwd(const SoftmaxFwdParams& p) {
    STEEL_SHARED(float, scratch_m, 32);
    STEEL_SHARED(float, scratch_s, 32);
    const u64 n = p.n, t = threadIdx.x, step = blockDim.x;
    const T* x = static_cast<const T*>(p.x) + (u64)blockIdx.x * n;
    T* y = static_cast<T*>(p.y) + (u64)blockIdx.x * n;
    const u64 nv = vec_prefix(n, is_aligned16(x) && is_aligned16(y));
    float m = STEEL_NEG_INF, s = 0.0f;
    for (u64 j = t * AXIS_VEC; j < nv; j += step * AXIS_VEC) {
        float v[AXIS_VEC];
        ld8(x + j, v);
        online_add_chunk(m, s, v);
    }
#ifdef STEEL_MUTATE_SOFTMAX_FWD
    const u64 stats_end = n - 1;  // test-only breakage: the row's last element left out of the statistics
#else
    const u64 stats_end = n;
#endif
    for (u64 j = nv + t; j < stats_end; j += step) online_add(m, s, ld_f32(x, j));
    block_softmax_stats(m, s, scratch_m, scratch_s);
    for (u64 j = t * AXIS_VEC; j < nv; j += step * AXIS_VEC) {
        float v[AXIS_VEC];
        ld8(x + j, v);
        for (int k = 0; k < AXIS_VEC; ++k) v[k] = expf(v[k] - m) / s;
        st8(y + j, v);
    }
    for (u64 j = nv + t; j < n; j += step) st_f32(y, j, expf(ld_f32(x, j) - m) / s);
}

template <typename T>
static __device__ __forceinline__ void softmax_rows_bwd(const SoftmaxBwdParams& p) {
    STEEL_SHARED(float, scratch, 32);
    const u64 n = p.n, t = threadIdx.x, step = blockDim.x, row = (u64)blockIdx.x * n;
    const T* y = static_cast<const T*>(p.y) + row;
    const float* dy = p.dy + row;
    float* dx = p.dx + row;
    const u64 nv = vec_prefix(n, is_aligned16(y) && is_aligned16(dy) && is_aligned16(dx));
    float dot = 0.0f;
    for (u64 j = t * AXIS_VEC; j < nv; j += step * AXIS_VEC) {
        float vy[AXIS_VEC], vg[AXIS_VEC];
        ld8(y + j, vy);
        ld8(dy + j, vg);
        for (int k = 0; k < AXIS_VEC; ++k) dot += vy[k] * vg[k];
    }
#ifdef STEEL_MUTATE_SOFTMAX_BWD
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
        for (int k = 0; k < AXIS_VEC; ++k) vd[k] += vy[k] * (vg[k] - dot);
        st8(dx + j, vd);
    }
    for (u64 j = nv + t; j < n; j += step) dx[j] += ld_f32(y, j) * (dy[j] - dot);
}

extern "C" __global__ void __launch_bounds__(AXIS_ROW_THREADS) softmax_fwd_f32(const SoftmaxFwdParams p) {
    softmax_rows_fwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(AXIS_ROW_THREADS) softmax_fwd_bf16(const SoftmaxFwdParams p) {
    softmax_rows_fwd<bf16_t>(p);
}
extern "C" __global__ void __launch_bounds__(AXIS_ROW_THREADS) softmax_bwd_f32(const SoftmaxBwdParams p) {
    softmax_rows_bwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(AXIS_ROW_THREADS) softmax_bwd_bf16(const SoftmaxBwdParams p) {
    softmax_rows_bwd<bf16_t>(p);
}

// ---- strided (inner > 1): a tile of columns × row phases --------------------------------------------

// The fold of a column's partials, ty = 0, 1, … in order; `k_end` is blockDim.y.
#ifdef STEEL_MUTATE_SOFTMAX_STRIDED_UNINIT
#define SOFTMAX_FOLD_END (blockDim.y + 1)  // test-only breakage: one row phase past the tile
#else
#define SOFTMAX_FOLD_END blockDim.y
#endif

template <typename T>
static __device__ __forceinline__ void softmax_strided_fwd(const SoftmaxFwdParams& p) {
    STEEL_SHARED(float, part_m, AXIS_STRIDED_THREADS);
    STEEL_SHARED(float, part_s, AXIS_STRIDED_THREADS);
    const AxisTile tile = axis_tile(p.n, p.inner, p.col_blocks);
    const T* x = static_cast<const T*>(p.x) + tile.base;
    T* y = static_cast<T*>(p.y) + tile.base;
    const u64 inner = p.inner;
#ifdef STEEL_MUTATE_SOFTMAX_STRIDED_FWD
    const u64 stats_end = p.n - 1;  // test-only breakage: the last row left out of the statistics
#else
    const u64 stats_end = p.n;
#endif
    float m = STEEL_NEG_INF, s = 0.0f;
    if (tile.active)
        for (u64 i = threadIdx.y; i < stats_end; i += blockDim.y) online_add(m, s, ld_f32(x, i * inner));
    part_m[tile.slot] = m;
    part_s[tile.slot] = s;
    __syncthreads();  // why: every row phase's partial of a column is written before any thread folds them
    m = STEEL_NEG_INF;
    s = 0.0f;
    for (unsigned k = 0; k < SOFTMAX_FOLD_END; ++k)
        softmax_merge(m, s, part_m[k * blockDim.x + threadIdx.x], part_s[k * blockDim.x + threadIdx.x]);
    if (!tile.active) return;
    for (u64 i = threadIdx.y; i < p.n; i += blockDim.y)
        st_f32(y, i * inner, expf(ld_f32(x, i * inner) - m) / s);
}

template <typename T>
static __device__ __forceinline__ void softmax_strided_bwd(const SoftmaxBwdParams& p) {
    STEEL_SHARED(float, part, AXIS_STRIDED_THREADS);
    const AxisTile tile = axis_tile(p.n, p.inner, p.col_blocks);
    const T* y = static_cast<const T*>(p.y) + tile.base;
    const float* dy = p.dy + tile.base;
    float* dx = p.dx + tile.base;
    const u64 inner = p.inner;
#ifdef STEEL_MUTATE_SOFTMAX_STRIDED_BWD
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
    for (unsigned k = 0; k < SOFTMAX_FOLD_END; ++k) dot += part[k * blockDim.x + threadIdx.x];
    if (!tile.active) return;
    for (u64 i = threadIdx.y; i < p.n; i += blockDim.y)
        dx[i * inner] += ld_f32(y, i * inner) * (dy[i * inner] - dot);
}

extern "C" __global__ void __launch_bounds__(AXIS_STRIDED_THREADS) softmax_strided_fwd_f32(const SoftmaxFwdParams p) {
    softmax_strided_fwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(AXIS_STRIDED_THREADS) softmax_strided_fwd_bf16(const SoftmaxFwdParams p) {
    softmax_strided_fwd<bf16_t>(p);
}
extern "C" __global__ void __launch_bounds__(AXIS_STRIDED_THREADS) softmax_strided_bwd_f32(const SoftmaxBwdParams p) {
    softmax_strided_bwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(AXIS_STRIDED_THREADS) softmax_strided_bwd_bf16(const SoftmaxBwdParams p) {
    softmax_strided_bwd<bf16_t>(p);
}

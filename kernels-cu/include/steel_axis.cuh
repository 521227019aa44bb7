// Reductions along one axis of a contiguous tensor viewed as [outer, n, inner] around the axis
// (softmax.cu, l2_normalize.cu; the Rust side is runtime/src/gpu/softmax.rs: `row_block`,
// `strided_block`, `AxisLaunch`).
//
// Two layouts, two kernel shapes:
// - rows (inner = 1, the last axis): one block per row of n contiguous elements, blockDim.x a
//   multiple of 32 and at most AXIS_ROW_THREADS. Thread t reads chunks of AXIS_VEC elements
//   t·AXIS_VEC, (t + blockDim)·AXIS_VEC, … with 128-bit vector loads over the aligned prefix
//   when every row pointer the kernel touches starts on 16 bytes (decided per row: a ragged n
//   leaves some rows aligned and others not), then elements nv + t, nv + t + blockDim, … one by
//   one (the tail, or the whole row when a row start is not aligned). Row statistics are merged
//   over the block with the warp-shuffle + shared-scratch helpers of steel_common.cuh
//   (block_sum, block_softmax_stats): a fixed order for a fixed blockDim.
// - strided (inner > 1, a middle or first axis): a block is a tile of blockDim.x adjacent columns
//   c of one outer index × blockDim.y row phases (blockDim.x·blockDim.y ≤ AXIS_STRIDED_THREADS).
//   Thread (tx, ty) walks rows ty, ty + blockDim.y, … of column c, so the lanes of a warp read
//   adjacent columns (and, for blockDim.x < 32, adjacent rows: one contiguous run) — coalesced.
//   Each thread leaves its partial in a shared slot ty·blockDim.x + tx; after one barrier every
//   thread folds its column's blockDim.y partials in the order ty = 0, 1, … (the same order in
//   every thread of the column: deterministic, and every thread holds the column's result).
//   Threads whose column lies past `inner` take part in the barrier with empty partials.
//   grid.x = outer · col_blocks, col_blocks = ⌈inner / blockDim.x⌉.
#pragma once
#include "steel_vec.cuh"

// The widest row block (8 warps) and the largest strided tile (threads), both the kernels'
// __launch_bounds__; AXIS_STRIDED_THREADS also sizes the shared partial slots.
#define AXIS_ROW_THREADS 256
#define AXIS_STRIDED_THREADS 256
// Elements per vector step of the row kernels: one 16-byte vector of bf16, two of f32.
#define AXIS_VEC 8

static_assert(AXIS_VEC == 8 && AXIS_VEC % Vec<float>::N == 0 && AXIS_VEC % Vec<bf16_t>::N == 0,
              "a vector step is whole 16-byte vectors of either storage type");

// AXIS_VEC elements at a 16-byte aligned `p` move with ld8/st8 (steel_vec.cuh).

// The end of a row's vector prefix: a whole number of chunks when `aligned`, else 0.
static __device__ __forceinline__ u64 vec_prefix(u64 n, bool aligned) {
    return aligned ? n / AXIS_VEC * AXIS_VEC : 0;
}

// Where a strided thread works: `base` indexes row 0 of its column in the [outer, n, inner]
// tensor, `col` the column in the [outer, inner] statistics, `slot` its shared partial.
struct AxisTile {
    u64 base;
    u64 col;
    unsigned slot;
    bool active;  // the column exists (c < inner)
};

static __device__ __forceinline__ AxisTile axis_tile(u64 n, u64 inner, u64 col_blocks) {
    const u64 o = blockIdx.x / col_blocks;
    const u64 c = (blockIdx.x % col_blocks) * blockDim.x + threadIdx.x;
    AxisTile t;
    t.base = o * n * inner + c;
    t.col = o * inner + c;
    t.slot = threadIdx.y * blockDim.x + threadIdx.x;
    t.active = c < inner;
    return t;
}

// One element into the online softmax pair (max m, Σ exp(x − m)).
static __device__ __forceinline__ void online_add(float& m, float& s, float v) {
    if (v > m) {
        s = s * expf(m - v) + 1.0f;
        m = v;
    } else {
        s += expf(v - m);
    }
}

// A chunk of AXIS_VEC elements into the pair: one rescale at most.
static __device__ __forceinline__ void online_add_chunk(float& m, float& s, const float* v) {
    float cm = v[0];
    for (int k = 1; k < AXIS_VEC; ++k) cm = fmaxf(cm, v[k]);
    if (cm > m) {
        s *= expf(m - cm);
        m = cm;
    }
    for (int k = 0; k < AXIS_VEC; ++k) s += expf(v[k] - m);
}

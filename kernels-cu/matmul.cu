// The bias gradient of the GEMMs: out[c] += Σ_r x[r, c] (sum_rows_into). Reference:
// runtime/src/cpu/matmul.rs. The GEMMs themselves are cuBLASLt's (Gpu::gemm_ex).
//
// Deterministic and in the CPU's order: pass 1 sums each chunk of 64 rows per column in row
// order (grid.y = chunk, one thread per column, so a warp reads 32 consecutive columns);
// pass 2 adds the chunks' partial sums to out in chunk order.
#include "steel_common.cuh"
#include "steel_vec.cuh"

struct SumRowsPartialParams {
    const void* x;   // (rows, cols) T
    float* partial;  // (chunks, cols)
    u64 rows;
    u64 cols;
    u64 rows_per_chunk;
};
STEEL_PARAMS_SIZE(SumRowsPartialParams, 40);

template <typename T>
static __device__ __forceinline__ void sum_rows_partial(const SumRowsPartialParams& p) {
    const T* x = (const T*)p.x;
    const u64 col = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= p.cols) return;
    const u64 r0 = (u64)blockIdx.y * p.rows_per_chunk;
    const u64 r1 = min(r0 + p.rows_per_chunk, p.rows);
    float acc = 0.0f;
#ifdef STEEL_MUTATE_SUM_ROWS
    for (u64 r = r0 + 1; r < r1; ++r) acc += ld_f32(x, r * p.cols + col);  // test-only: skips a row
#else
    for (u64 r = r0; r < r1; ++r) acc += ld_f32(x, r * p.cols + col);
#endif
    p.partial[(u64)blockIdx.y * p.cols + col] = acc;
}

extern "C" __global__ void __launch_bounds__(128) sum_rows_partial_f32(const SumRowsPartialParams p) {
    sum_rows_partial<float>(p);
}
extern "C" __global__ void __launch_bounds__(128) sum_rows_partial_bf16(const SumRowsPartialParams p) {
    sum_rows_partial<bf16_t>(p);
}

struct SumRowsReduceParams {
    const float* partial;  // (chunks, cols)
    float* out;            // (cols), +=
    u64 chunks;
    u64 cols;
};
STEEL_PARAMS_SIZE(SumRowsReduceParams, 32);

extern "C" __global__ void __launch_bounds__(128) sum_rows_reduce_f32(const SumRowsReduceParams p) {
    const u64 col = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= p.cols) return;
    float acc = p.out[col];
    for (u64 k = 0; k < p.chunks; ++k) acc += p.partial[k * p.cols + col];
    p.out[col] = acc;
}

// ---- the empty product (k = 0) with a bias: every row of out is the bias ------------------------

struct BroadcastRowsParams {
    const void* bias;  // (n) units
    void* out;         // (rows, n) units
    u64 rows;
    u64 n;
};
STEEL_PARAMS_SIZE(BroadcastRowsParams, 32);

template <typename E>
static __device__ __forceinline__ void broadcast_rows(const BroadcastRowsParams& p) {
    const E* bias = (const E*)p.bias;
    E* out = (E*)p.out;
    const u64 total = p.rows * p.n;
    const u64 begin = (u64)blockIdx.x * 2048ull, end = min(begin + 2048ull, total);
#ifdef STEEL_MUTATE_BROADCAST_ROWS
    for (u64 i = begin + threadIdx.x; i < end; i += blockDim.x) out[i] = bias[(i + 1) % p.n];  // test-only
#else
    for (u64 i = begin + threadIdx.x; i < end; i += blockDim.x) out[i] = bias[i % p.n];
#endif
}

extern "C" __global__ void __launch_bounds__(256) broadcast_rows_u16(const BroadcastRowsParams p) {
    broadcast_rows<unsigned short>(p);
}
extern "C" __global__ void __launch_bounds__(256) broadcast_rows_u32(const BroadcastRowsParams p) {
    broadcast_rows<unsigned>(p);
}

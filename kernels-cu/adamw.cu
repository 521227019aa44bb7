// Multi-tensor fused AdamW: every parameter tensor in one launch, fp32 master weights and
// moments, the bf16 copy written in the same pass. Reference: runtime/src/cpu/adamw.rs.
//
// Per element, with g = grad · grad_scale (PyTorch torch.optim.AdamW):
//   p ← p · (1 − lr · wd); m ← m + (1 − β₁)(g − m); v ← β₂ v + (1 − β₂) g²;
//   p ← p − step_size · m / (sqrt(v) / sqrt(1 − β₂ᵗ) + eps); copy ← bf16(p)
// with step_size = lr / (1 − β₁ᵗ) computed on the host. Tensor i owns the blocks
// block_start[i] .. block_start[i + 1]; a block finds its tensor by binary search.
// The guarded step (`status` non-null, written by `adamw_guard_f64` below) reads its verdict
// from the device: skipped → nothing is written; else g = grad · grad_scale · status[2].
#include "steel_common.cuh"

struct AdamWTensor {
    float* param;       // (n) fp32 master weights, updated
    const float* grad;  // (n)
    float* m;           // (n) first moment, updated
    float* v;           // (n) second moment, updated
    bf16_t* copy;       // (n) bf16 copy of the updated weights, or null
    u64 n;
    u64 block_start;    // first block of this tensor in the launch
    float decay;        // 1 − lr · weight_decay
    unsigned pad_;
};
STEEL_PARAMS_SIZE(AdamWTensor, 64);

struct AdamWParams {
    const AdamWTensor* tensors;  // (count), sorted by block_start
    u64 count;
    u64 elems_per_block;
    float beta1;
    float beta2;
    float eps;
    float grad_scale;
    float step_size;  // lr / (1 − β₁ᵗ)
    float bc2_sqrt;   // sqrt(1 − β₂ᵗ)
    const float* status;  // (4) [loss, grad_norm, clip factor, skipped] of adamw_guard_f64, or null
};
STEEL_PARAMS_SIZE(AdamWParams, 56);

extern "C" __global__ void __launch_bounds__(256) adamw_step_f32(const AdamWParams p) {
    // The last tensor whose block_start ≤ this block.
    u64 lo = 0, hi = p.count;
    while (hi - lo > 1) {
        const u64 mid = (lo + hi) / 2;
        if (p.tensors[mid].block_start <= blockIdx.x) lo = mid; else hi = mid;
    }
    const AdamWTensor t = p.tensors[lo];
    const u64 begin = ((u64)blockIdx.x - t.block_start) * p.elems_per_block;
#if defined(STEEL_MUTATE_ADAMW)
    const u64 end = min(begin + p.elems_per_block, t.n - 1);  // test-only breakage
#elif defined(STEEL_MUTATE_ADAMW_OOB)
    const u64 end = min(begin + p.elems_per_block, t.n + 1);  // test-only: one past the end
#else
    const u64 end = min(begin + p.elems_per_block, t.n);
#endif
    float grad_scale = p.grad_scale;
    if (p.status) {
#ifndef STEEL_MUTATE_ADAMW_GUARD
        if (p.status[3] != 0.0f) return;  // the step was skipped: nothing is applied
#endif
        grad_scale = p.grad_scale * p.status[2];
    }
    const float one_b1 = 1.0f - p.beta1, one_b2 = 1.0f - p.beta2;
    for (u64 i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float g = t.grad[i] * grad_scale;
        float w = t.param[i] * t.decay;
        float m = t.m[i];
        m += one_b1 * (g - m);
        const float v = t.v[i] * p.beta2 + one_b2 * g * g;
        const float denom = sqrtf(v) / p.bc2_sqrt + p.eps;
        w -= p.step_size * (m / denom);
        t.param[i] = w;
        t.m[i] = m;
        t.v[i] = v;
        if (t.copy) t.copy[i] = f32_to_bf16(w);
    }
}

// ---- global_norm: sqrt(Σ_t Σ_i t_i²), deterministic, in f64 --------------------------------------
//
// Every tensor in one launch (a table as for AdamW): block b squares and sums its chunk of
// NORM_ELEMS_PER_BLOCK elements in f64 (a fixed shuffle tree per warp, the warps in order) and
// writes partial[b]; `global_norm_reduce_f64` adds the partials in block order. Tensors are f32
// or bf16 (`is_bf16`); 128-bit loads on 16-byte aligned runs of 8.
#include "steel_vec.cuh"

struct NormTensor {
    const void* x;  // (n) f32 or bf16
    u64 n;
    u64 block_start;
    unsigned is_bf16;
    unsigned pad_;
};
STEEL_PARAMS_SIZE(NormTensor, 32);

struct GlobalNormParams {
    const NormTensor* tensors;  // (count), sorted by block_start
    double* partial;            // (blocks)
    u64 count;
    u64 elems_per_block;
};
STEEL_PARAMS_SIZE(GlobalNormParams, 32);

// The sum of every thread's `acc`, returned on thread 0 (0 elsewhere): a fixed shuffle tree per
// warp, then the warps in order — deterministic for a fixed block size. Once per kernel
// (`warp_part` is not reused after the barrier).
static __device__ __forceinline__ double block_sum_f64(double acc, double* warp_part) {
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(STEEL_FULL_MASK, acc, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) warp_part[warp] = acc;
    __syncthreads();  // why: every warp's sum is written before thread 0 adds them
    double total = 0.0;
    if (threadIdx.x == 0) {
        for (int w = 0; w < warps; ++w) total += warp_part[w];
    }
    return total;
}

template <typename T>
static __device__ __forceinline__ double sum_squares(const T* x, u64 begin, u64 end) {
    double acc = 0.0;
    const u64 vec_end = is_aligned16(x) ? begin + ((end - begin) / 8) * 8 : begin;
    for (u64 i = begin + 8 * (u64)threadIdx.x; i < vec_end; i += 8 * (u64)blockDim.x) {
        float v[8];
        ld8(x + i, v);
STEEL_UNROLL
        for (int j = 0; j < 8; ++j) acc += (double)v[j] * (double)v[j];
    }
    for (u64 i = vec_end + threadIdx.x; i < end; i += blockDim.x) {
        const double v = ld_f32(x, i);
        acc += v * v;
    }
    return acc;
}

extern "C" __global__ void __launch_bounds__(256) global_norm_partial_f64(const GlobalNormParams p) {
    STEEL_SHARED(double, warp_part, 32);
    u64 lo = 0, hi = p.count;
    while (hi - lo > 1) {
        const u64 mid = (lo + hi) / 2;
        if (p.tensors[mid].block_start <= blockIdx.x) lo = mid; else hi = mid;
    }
    const NormTensor t = p.tensors[lo];
    const u64 begin = ((u64)blockIdx.x - t.block_start) * p.elems_per_block;
#ifdef STEEL_MUTATE_GLOBAL_NORM
    const u64 end = min(begin + p.elems_per_block, t.n) - (t.n > 1 ? 1 : 0);  // test-only: drops one
#else
    const u64 end = min(begin + p.elems_per_block, t.n);
#endif
    const double acc = t.is_bf16 ? sum_squares((const bf16_t*)t.x, begin, end)
                                 : sum_squares((const float*)t.x, begin, end);
    const double total = block_sum_f64(acc, warp_part);
    if (threadIdx.x == 0) p.partial[blockIdx.x] = total;
}

struct GlobalNormReduceParams {
    const double* partial;  // (count)
    double* out;            // (1) Σ partial
    u64 count;
};
STEEL_PARAMS_SIZE(GlobalNormReduceParams, 24);

// One block: thread k sums the partials k, k + 256, … in order, then the block's threads are
// added in a fixed tree. Deterministic for the fixed block size.
extern "C" __global__ void __launch_bounds__(256) global_norm_reduce_f64(const GlobalNormReduceParams p) {
    STEEL_SHARED(double, warp_part, 32);
    double acc = 0.0;
    for (u64 i = threadIdx.x; i < p.count; i += blockDim.x) acc += p.partial[i];
    const double total = block_sum_f64(acc, warp_part);
    if (threadIdx.x == 0) p.out[0] = total;
}

// ---- the guard of a training step: norm, verdict and clip factor, on the device -----------------
//
// One block: the global norm from `global_norm_partial_f64`'s partials (added exactly as
// `global_norm_reduce_f64` does), then thread 0 writes
//   status = [loss, norm, factor, skipped],  skipped = loss or norm not finite,
//   factor = skipped ? 0 : (clip > 0 && norm > clip ? clip / norm : 1)   (in f64, stored as f32)
// for `adamw_step_f32` to read, and for the host's one download of the step.
// Reference: runtime/src/cpu/adamw.rs (adamw_step_guarded, step_verdict).

// x − x is 0 exactly for a finite x and NaN for ±inf and NaN (IEEE; no fast-math here).
static __device__ __forceinline__ bool finite_f64(double x) { return x - x == 0.0; }

struct AdamWGuardParams {
    const double* partial;  // (count) squared sums
    const float* loss;      // (1) the step's loss
    float* status;          // (4)
    u64 count;
    double clip;            // ≤ 0: no clipping
};
STEEL_PARAMS_SIZE(AdamWGuardParams, 40);

extern "C" __global__ void __launch_bounds__(256) adamw_guard_f64(const AdamWGuardParams p) {
    STEEL_SHARED(double, warp_part, 32);
    double acc = 0.0;
    for (u64 i = threadIdx.x; i < p.count; i += blockDim.x) acc += p.partial[i];
    // Added exactly as global_norm_reduce_f64 adds them.
    const double total = block_sum_f64(acc, warp_part);
    if (threadIdx.x == 0) {
        const double norm = sqrt(total);
        const float loss = p.loss[0];
#ifdef STEEL_MUTATE_ADAMW_VERDICT
        const bool skipped = !finite_f64(norm);  // test-only: a NaN loss is applied
#else
        const bool skipped = !(finite_f64(loss) && finite_f64(norm));
#endif
        const double factor = skipped ? 0.0 : (p.clip > 0.0 && norm > p.clip ? p.clip / norm : 1.0);
        p.status[0] = loss;
        p.status[1] = (float)norm;
        p.status[2] = (float)factor;
        p.status[3] = skipped ? 1.0f : 0.0f;
    }
}

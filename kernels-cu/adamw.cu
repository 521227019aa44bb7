// Multi-tensor fused AdamW: every parameter tensor in one launch, fp32 master weights and
// moments, the bf16 copy written in the same pass. Reference: runtime/src/cpu/adamw.rs.
//
// Per element, with g = grad · grad_scale (PyTorch torch.optim.AdamW):
//   p ← p · (1 − lr · wd); m ← m + (1 − β₁)(g − m); v ← β₂ v + (1 − β₂) g²;
//   p ← p − step_size · m / (sqrt(v) / sqrt(1 − β₂ᵗ) + eps); copy ← bf16(p)
// with step_size = lr / (1 − β₁ᵗ) computed on the host. Tensor i owns the blocks
// block_start[i] .. block_start[i + 1]; a block finds its tensor by binary search.
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
};
STEEL_PARAMS_SIZE(AdamWParams, 48);

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
    const float one_b1 = 1.0f - p.beta1, one_b2 = 1.0f - p.beta2;
    for (u64 i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float g = t.grad[i] * p.grad_scale;
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

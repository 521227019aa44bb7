// Softmax cross entropy over a chunk of lm_head logits (the GEMM is cuBLASLt's), fp32.
// Reference: runtime/src/cpu/lm_head_ce.rs. One block per token row; within a row the
// statistics (max, Σ exp) are streamed over the vocabulary in one pass (online softmax) and
// merged across the block.
//
// Forward: lse = log Σ_j exp(l_j), nll = lse − l[target]; ignored rows give lse = nll = 0.
// Backward, in place: l_j ← g · exp(l_j − lse) − g · [j = target], g = dloss[0] · scale;
// ignored rows become 0.
#include "steel_common.cuh"

// How the targets are stored.
#define STEEL_TARGETS_I32 0u
#define STEEL_TARGETS_U32 1u

static __device__ __forceinline__ long long load_target(const void* targets, unsigned kind, u64 i) {
    return kind == STEEL_TARGETS_U32 ? (long long)((const unsigned*)targets)[i]
                                     : (long long)((const int*)targets)[i];
}

struct SoftmaxCeFwdParams {
    const float* logits;   // (rows, v)
    const void* targets;   // (rows), I32 or U32
    float* lse;            // (rows)
    float* nll;            // (rows)
    u64 rows;
    u64 v;
    long long ignore_index;
    unsigned target_kind;  // STEEL_TARGETS_*
    unsigned pad_;
};
STEEL_PARAMS_SIZE(SoftmaxCeFwdParams, 64);

extern "C" __global__ void __launch_bounds__(1024) softmax_ce_fwd_f32(const SoftmaxCeFwdParams p) {
    STEEL_SHARED(float, scratch_m, 32);
    STEEL_SHARED(float, scratch_s, 32);
    const u64 row = blockIdx.x;
    const long long t = load_target(p.targets, p.target_kind, row);
    if (t == p.ignore_index) {  // uniform over the block: no barrier is skipped by some only
        if (threadIdx.x == 0) p.lse[row] = 0.0f, p.nll[row] = 0.0f;
        return;
    }
    const float* l = p.logits + row * p.v;
#if defined(STEEL_MUTATE_LM_HEAD_CE_FWD)
    const u64 v = p.v - 1;  // test-only breakage: the last class is left out
#elif defined(STEEL_MUTATE_LM_HEAD_CE_OOB)
    const u64 v = p.v + 1;  // test-only breakage: one class past the end of the row
#else
    const u64 v = p.v;
#endif
    float m = STEEL_NEG_INF, s = 0.0f;
    for (u64 j = threadIdx.x; j < v; j += blockDim.x) {
        const float x = l[j];
        if (x > m) {
            s = s * expf(m - x) + 1.0f;
            m = x;
        } else {
            s += expf(x - m);
        }
    }
    block_softmax_stats(m, s, scratch_m, scratch_s);
    if (threadIdx.x == 0) {
        const float lse = m + logf(s);
        p.lse[row] = lse;
        p.nll[row] = lse - l[t];
    }
}

struct SoftmaxCeBwdParams {
    float* logits;         // (rows, v): logits in, dlogits out
    const void* targets;   // (rows), I32 or U32
    const float* lse;      // (rows)
    const float* dloss;    // (1)
    u64 rows;
    u64 v;
    long long ignore_index;
    float scale;
    unsigned target_kind;  // STEEL_TARGETS_*
};
STEEL_PARAMS_SIZE(SoftmaxCeBwdParams, 64);

extern "C" __global__ void __launch_bounds__(1024) softmax_ce_bwd_f32(const SoftmaxCeBwdParams p) {
    const u64 row = blockIdx.x;
    const long long t = load_target(p.targets, p.target_kind, row);
    float* l = p.logits + row * p.v;
    if (t == p.ignore_index) {
        for (u64 j = threadIdx.x; j < p.v; j += blockDim.x) l[j] = 0.0f;
        return;
    }
    const float g = p.dloss[0] * p.scale, lse = p.lse[row];
#ifdef STEEL_MUTATE_LM_HEAD_CE_BWD
    const u64 start = threadIdx.x + 1;  // test-only breakage: an off-by-one in the column index
#else
    const u64 start = threadIdx.x;
#endif
    for (u64 j = start; j < p.v; j += blockDim.x) {
        float d = expf(l[j] - lse) * g;
        if ((long long)j == t) d -= g;
        l[j] = d;
    }
}

struct SumF32Params {
    const float* x;  // (n)
    float* out;      // (1): the sum, overwritten
    u64 n;
};
STEEL_PARAMS_SIZE(SumF32Params, 24);

// One block: out[0] = Σ x (fixed order for a given blockDim: deterministic).
extern "C" __global__ void __launch_bounds__(256) sum_f32(const SumF32Params p) {
    STEEL_SHARED(float, scratch, 32);
    float acc = 0.0f;
    for (u64 i = threadIdx.x; i < p.n; i += blockDim.x) acc += p.x[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) p.out[0] = acc;
}

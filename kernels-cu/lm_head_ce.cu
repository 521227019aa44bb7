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
        // An invalid target (ce_count_targets reports it before the loss is used) reads nothing.
        p.nll[row] = (t >= 0 && (u64)t < p.v) ? lse - l[t] : __int_as_float(0x7fc00000);
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

// ---- the targets' count and validity, on the device -----------------------------------------------

struct CeCountParams {
    const void* targets;  // (n), I32 or U32
    u64* out;             // (2): the counted targets, then the first invalid position (n if none)
    u64 n;
    u64 v;
    long long ignore_index;
    unsigned target_kind;
    unsigned pad_;
};
STEEL_PARAMS_SIZE(CeCountParams, 48);

// One block of 256 threads: integer sums and minima (exact, so any order gives the same result).
// Instead of downloading every target on every call, the op downloads these two words.
extern "C" __global__ void __launch_bounds__(256) ce_count_targets(const CeCountParams p) {
    STEEL_SHARED(u64, count_part, 8);
    STEEL_SHARED(u64, bad_part, 8);
    u64 count = 0, bad = p.n;
    for (u64 i = threadIdx.x; i < p.n; i += blockDim.x) {
        const long long t = load_target(p.targets, p.target_kind, i);
        if (t == p.ignore_index) continue;
#ifdef STEEL_MUTATE_CE_COUNT
        if (t < 0 || (u64)t > p.v) {  // test-only breakage: v itself passes as a class
#else
        if (t < 0 || (u64)t >= p.v) {
#endif
            bad = min(bad, i);
        } else {
            ++count;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        count += __shfl_xor_sync(STEEL_FULL_MASK, count, o);
        bad = min(bad, (u64)__shfl_xor_sync(STEEL_FULL_MASK, bad, o));
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        count_part[warp] = count;
        bad_part[warp] = bad;
    }
    __syncthreads();  // why: every warp's partials are written before thread 0 combines them
    if (threadIdx.x == 0) {
        u64 c = 0, b = p.n;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
            c += count_part[w];
            b = min(b, bad_part[w]);
        }
        p.out[0] = c;
        p.out[1] = b;
    }
}

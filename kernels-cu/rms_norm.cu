// RMSNorm fused with the residual add, forward and backward (fp32).
// Reference: runtime/src/cpu/rms_norm.rs. Launchers: runtime/src/gpu/launch.rs (row_block:
// at most 8 warps; COLUMN_BLOCK = 128 for the dw passes).
//
// Forward: s = x + r, rstd = 1 / sqrt(mean(s²) + eps), y = w ⊙ (s · rstd). One block per row.
// Backward with x̂ = s · rstd: g = rstd · (dy ⊙ w − x̂ · mean(dy ⊙ w ⊙ x̂)) + dsum, dx += g,
// dr += g (one block per row); dw += Σ_rows dy ⊙ x̂ in two deterministic passes (per chunk of
// rows a partial sum, then the chunks added in order).
#include "steel_common.cuh"

struct AddRmsNormFwdParams {
    const float* x;  // (rows, h)
    const float* r;  // (rows, h), or null: the plain RMSNorm
    const float* w;  // (h)
    float* sum;      // (rows, h), null exactly when r is
    float* y;        // (rows, h)
    float* rstd;     // (rows)
    u64 rows;
    u64 h;
    float eps;
    unsigned pad_;
};
STEEL_PARAMS_SIZE(AddRmsNormFwdParams, 72);

extern "C" __global__ void __launch_bounds__(256) add_rms_norm_fwd_f32(const AddRmsNormFwdParams p) {
    STEEL_SHARED(float, scratch, 32);
    const u64 base = (u64)blockIdx.x * p.h;
#if defined(STEEL_MUTATE_ADD_RMS_NORM_FWD)
    const u64 h = p.h - 1;  // test-only breakage: the last column is left out
#elif defined(STEEL_MUTATE_RMS_NORM_OOB)
    const u64 h = p.h + 1;  // test-only breakage: one column past the end of the row
#else
    const u64 h = p.h;
#endif
    float ss = 0.0f;
    for (u64 j = threadIdx.x; j < h; j += blockDim.x) {
        const float s = p.r ? p.x[base + j] + p.r[base + j] : p.x[base + j];
        if (p.sum) p.sum[base + j] = s;
        ss += s * s;
    }
    ss = block_sum(ss, scratch);
    const float rstd = 1.0f / sqrtf(ss / (float)p.h + p.eps);
    if (threadIdx.x == 0) p.rstd[blockIdx.x] = rstd;
    // Each thread reads back only the sums it wrote itself: no barrier needed.
    const float* s = p.sum ? p.sum : p.x;
    for (u64 j = threadIdx.x; j < h; j += blockDim.x) p.y[base + j] = p.w[j] * (s[base + j] * rstd);
}

struct AddRmsNormBwdParams {
    const float* sum;   // (rows, h): the forward's x + r
    const float* w;     // (h)
    const float* rstd;  // (rows)
    const float* dy;    // (rows, h)
    const float* dsum;  // (rows, h), or null: gradient that reached `sum` directly
    float* dx;          // (rows, h), accumulated
    float* dr;          // (rows, h), accumulated; null for the plain RMSNorm
    u64 rows;
    u64 h;
};
STEEL_PARAMS_SIZE(AddRmsNormBwdParams, 72);

extern "C" __global__ void __launch_bounds__(256) add_rms_norm_bwd_f32(const AddRmsNormBwdParams p) {
    STEEL_SHARED(float, scratch, 32);
    const u64 base = (u64)blockIdx.x * p.h;
    const float rstd = p.rstd[blockIdx.x];
#ifdef STEEL_MUTATE_ADD_RMS_NORM_BWD
    const u64 h = p.h - 1;  // test-only breakage: the last column is left out of the dot product
#else
    const u64 h = p.h;
#endif
    float dot = 0.0f;
    for (u64 j = threadIdx.x; j < h; j += blockDim.x)
        dot += p.dy[base + j] * p.w[j] * (p.sum[base + j] * rstd);
    const float mean = block_sum(dot, scratch) / (float)p.h;
    for (u64 j = threadIdx.x; j < p.h; j += blockDim.x) {
        float g = rstd * (p.dy[base + j] * p.w[j] - p.sum[base + j] * rstd * mean);
        if (p.dsum) g += p.dsum[base + j];
        p.dx[base + j] += g;
        if (p.dr) p.dr[base + j] += g;
    }
}

struct AddRmsNormDwParams {
    const float* sum;   // (rows, h)
    const float* rstd;  // (rows)
    const float* dy;    // (rows, h)
    float* partial;     // (chunks, h): one partial sum of dy ⊙ x̂ per chunk of rows
    u64 rows;
    u64 h;
    u64 rows_per_chunk;
};
STEEL_PARAMS_SIZE(AddRmsNormDwParams, 56);

// grid (ceil(h / blockDim.x), chunks): thread = one column of one chunk, rows in order.
extern "C" __global__ void __launch_bounds__(128) add_rms_norm_bwd_dw_f32(const AddRmsNormDwParams p) {
    const u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.h) return;
    const u64 r0 = (u64)blockIdx.y * p.rows_per_chunk;
    const u64 r1 = min(r0 + p.rows_per_chunk, p.rows);
    float acc = 0.0f;
    for (u64 i = r0; i < r1; ++i) acc += p.dy[i * p.h + j] * (p.sum[i * p.h + j] * p.rstd[i]);
    p.partial[(u64)blockIdx.y * p.h + j] = acc;
}

struct AddRmsNormDwReduceParams {
    const float* partial;  // (chunks, h)
    float* dw;             // (h), accumulated
    u64 chunks;
    u64 h;
};
STEEL_PARAMS_SIZE(AddRmsNormDwReduceParams, 32);

// dw[j] += Σ_c partial[c, j], chunks in order (deterministic).
extern "C" __global__ void __launch_bounds__(128) add_rms_norm_bwd_dw_reduce_f32(const AddRmsNormDwReduceParams p) {
    const u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.h) return;
    float acc = 0.0f;
    for (u64 c = 0; c < p.chunks; ++c) acc += p.partial[c * p.h + j];
    p.dw[j] += acc;
}

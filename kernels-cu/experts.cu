// All E double-SwiGLU ("senet") experts of the soft MoE in one launch per stage (DESIGN §1).
// Reference: runtime/src/cpu/experts.rs. Launchers: runtime/src/gpu/experts.rs.
//
// Expert e maps its R rows (micro-batch × slots per expert: ~8 in training) through two stages of
// the same shape, `h = silu(v W1ᵀ) ⊙ (v W2ᵀ)` with W1, W2 [N, K]: stage 1 is v = x, K = d, N = f
// (W_gate_up, W_up), stage 2 is v = u, K = f, N = d (W_gate_down, W_down). With so few rows the
// work is weight-bandwidth bound, so every kernel reads each weight element once per 8 rows
// (rows beyond 8 re-read it from L2) and the weights of all experts go through one launch
// (per-expert pointer tables in the parameter struct).
//
//   experts_fwd_<T>        one warp per output row o of one expert: both products of the stage
//                          (W1 and W2 rows streamed together, 16-byte vectors when aligned), the
//                          warp's sums reduced by the butterfly, a, b and h = silu(a) ⊙ b stored.
//   experts_gate_grad_<T>  elementwise: g = Σ_k P[k] over the partial sums of the stage above
//                          (dy itself for stage 2), ga = g ⊙ b ⊙ silu'(a), gb = g ⊙ silu(a).
//   experts_wgrad_<T>      one thread per input column k, a chunk of EXPERTS_OC output rows per
//                          block: dW1[o, k] += Σ_r ga[r, o] v[r, k], dW2 likewise (each element
//                          has one owner: no atomics), and the input gradient's partial
//                          Σ_{o in chunk} ga[r, o] W1[o, k] + gb[r, o] W2[o, k], written per chunk.
//   experts_reduce         dst += Σ_chunks partials, chunks in order.
// Backward = gate_grad(stage 2), wgrad(stage 2), gate_grad(stage 1, from its partials),
// wgrad(stage 1), reduce into dx: one pass over every weight and its gradient.
#include "steel_common.cuh"
#include "steel_vec.cuh"

#define EXPERTS_MAX 32
#define EXPERTS_WARPS 8
#define EXPERTS_THREADS (EXPERTS_WARPS * 32)
#define EXPERTS_ROWS 8
#define EXPERTS_OC 32
#define EXPERTS_KT 128

struct ExpertsFwdParams {
    const void* w1[EXPERTS_MAX];  // per expert [N, K], T
    const void* w2[EXPERTS_MAX];
    const void* v;  // [E, R, K], T
    void* a;        // [E, R, N], T
    void* b;
    void* h;
    u64 experts;
    u64 rows;
    u64 n;
    u64 k;
};
STEEL_PARAMS_SIZE(ExpertsFwdParams, 8 * (2 * EXPERTS_MAX) + 64);

struct ExpertsGateGradParams {
    const float* part;  // [chunks, E·R·N]
    const void* a;      // [E·R·N], T
    const void* b;
    float* ga;  // [E·R·N]
    float* gb;
    u64 n;  // E·R·N
    u64 chunks;
};
STEEL_PARAMS_SIZE(ExpertsGateGradParams, 56);

struct ExpertsWgradParams {
    const void* w1[EXPERTS_MAX];  // per expert [N, K], T
    const void* w2[EXPERTS_MAX];
    float* dw1[EXPERTS_MAX];  // per expert [N, K], accumulated
    float* dw2[EXPERTS_MAX];
    const float* ga;  // [E, R, N]
    const float* gb;
    const void* v;  // [E, R, K], T
    float* part;    // [⌈N / OC⌉, E, R, K]
    u64 experts;
    u64 rows;
    u64 n;
    u64 k;
};
STEEL_PARAMS_SIZE(ExpertsWgradParams, 8 * (4 * EXPERTS_MAX) + 64);

struct ExpertsReduceParams {
    const float* part;  // [chunks, n]
    float* dst;         // [n], accumulated
    u64 n;
    u64 chunks;
};
STEEL_PARAMS_SIZE(ExpertsReduceParams, 32);

static __device__ __forceinline__ float silu(float a) { return a / (1.0f + expf(-a)); }

// ---- forward: one warp per (expert, output row) -------------------------------------------------

template <typename T>
static __device__ __forceinline__ void experts_fwd(const ExpertsFwdParams& p) {
    const unsigned lane = threadIdx.x & 31;
    const u64 o = (u64)blockIdx.x * EXPERTS_WARPS + (threadIdx.x >> 5), e = blockIdx.y;
    if (o >= p.n) return;  // the whole warp: no barrier follows
    const u64 K = p.k, N = p.n, R = p.rows;
    const T* w1 = static_cast<const T*>(p.w1[e]) + o * K;
    const T* w2 = static_cast<const T*>(p.w2[e]) + o * K;
    const T* v = static_cast<const T*>(p.v) + e * R * K;
    // Vectors of 8 when every row of W and v starts on 16 bytes.
    const bool vec = (K % 8 == 0) && is_aligned16(w1) && is_aligned16(w2) && is_aligned16(v) &&
                     (K * sizeof(T)) % 16 == 0;
    const u64 kv = vec ? K : 0;
#ifdef STEEL_MUTATE_EXPERTS_FWD
    const u64 r_end = R < EXPERTS_ROWS ? R : EXPERTS_ROWS;  // test-only breakage: one row group only
#else
    const u64 r_end = R;
#endif
    for (u64 r0 = 0; r0 < r_end; r0 += EXPERTS_ROWS) {
        float sa[EXPERTS_ROWS], sb[EXPERTS_ROWS];
STEEL_UNROLL
        for (int r = 0; r < EXPERTS_ROWS; ++r) sa[r] = sb[r] = 0.0f;
        for (u64 k = (u64)lane * 8; k < kv; k += 32 * 8) {
            float x1[8], x2[8];
            ld8(w1 + k, x1);
            ld8(w2 + k, x2);
STEEL_UNROLL
            for (int r = 0; r < EXPERTS_ROWS; ++r) {
                if (r0 + r >= R) break;
                float xv[8];
                ld8(v + (r0 + r) * K + k, xv);
STEEL_UNROLL
                for (int j = 0; j < 8; ++j) {
                    sa[r] += x1[j] * xv[j];
                    sb[r] += x2[j] * xv[j];
                }
            }
        }
        for (u64 k = kv + lane; k < K; k += 32) {
            const float x1 = to_f32(w1[k]), x2 = to_f32(w2[k]);
STEEL_UNROLL
            for (int r = 0; r < EXPERTS_ROWS; ++r) {
                if (r0 + r >= R) break;
                const float xv = to_f32(v[(r0 + r) * K + k]);
                sa[r] += x1 * xv;
                sb[r] += x2 * xv;
            }
        }
STEEL_UNROLL
        for (int r = 0; r < EXPERTS_ROWS; ++r) {
            sa[r] = warp_sum(sa[r]);
            sb[r] = warp_sum(sb[r]);
        }
        // Lane r stores row r0 + r.
STEEL_UNROLL
        for (int r = 0; r < EXPERTS_ROWS; ++r)
            if (lane == (unsigned)r && r0 + r < R) {
                const u64 i = (e * R + r0 + r) * N + o;
                st_f32(static_cast<T*>(p.a), i, sa[r]);
                st_f32(static_cast<T*>(p.b), i, sb[r]);
                st_f32(static_cast<T*>(p.h), i, silu(sa[r]) * sb[r]);
            }
    }
}

// ---- backward -----------------------------------------------------------------------------------

template <typename T>
static __device__ __forceinline__ void experts_gate_grad(const ExpertsGateGradParams& p) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    float g = 0.0f;
#ifdef STEEL_MUTATE_EXPERTS_GATE_GRAD
    const u64 chunks = p.chunks > 1 ? p.chunks - 1 : 1;  // test-only breakage: the last chunk dropped
#else
    const u64 chunks = p.chunks;
#endif
    for (u64 k = 0; k < chunks; ++k) g += p.part[k * p.n + i];
    const float a = ld_f32(static_cast<const T*>(p.a), i), b = ld_f32(static_cast<const T*>(p.b), i);
    const float s = 1.0f / (1.0f + expf(-a));
    p.ga[i] = g * b * s * (1.0f + a * (1.0f - s));
    p.gb[i] = g * a * s;
}

template <typename T>
static __device__ __forceinline__ void experts_wgrad(const ExpertsWgradParams& p) {
    STEEL_SHARED_2D(float, g1, EXPERTS_OC, EXPERTS_ROWS);
    STEEL_SHARED_2D(float, g2, EXPERTS_OC, EXPERTS_ROWS);
    const u64 K = p.k, N = p.n, R = p.rows, E = p.experts;
    const u64 k = (u64)blockIdx.x * EXPERTS_KT + threadIdx.x, chunk = blockIdx.y, e = blockIdx.z;
    const u64 o0 = chunk * EXPERTS_OC, o1 = min(o0 + EXPERTS_OC, N);
    const T* w1 = static_cast<const T*>(p.w1[e]);
    const T* w2 = static_cast<const T*>(p.w2[e]);
    float* dw1 = p.dw1[e];
    float* dw2 = p.dw2[e];
    const T* v = static_cast<const T*>(p.v) + e * R * K;
    for (u64 r0 = 0; r0 < R; r0 += EXPERTS_ROWS) {
        __syncthreads();  // why: the previous row group's gate gradients are still being read
        for (u64 i = threadIdx.x; i < EXPERTS_OC * EXPERTS_ROWS; i += blockDim.x) {
            const u64 oo = i / EXPERTS_ROWS, r = i % EXPERTS_ROWS;
            const bool in = o0 + oo < o1 && r0 + r < R;
            const u64 src = (e * R + r0 + r) * N + o0 + oo;
            g1[oo][r] = in ? p.ga[src] : 0.0f;
            g2[oo][r] = in ? p.gb[src] : 0.0f;
        }
        __syncthreads();  // why: the row group's gate gradients are staged before any thread uses them
#ifdef STEEL_MUTATE_EXPERTS_OOB
        if (k > K) continue;  // test-only breakage: one column past the weights
#else
        if (k >= K) continue;
#endif
        float x[EXPERTS_ROWS], dv[EXPERTS_ROWS];
STEEL_UNROLL
        for (int r = 0; r < EXPERTS_ROWS; ++r) {
            x[r] = r0 + r < R ? to_f32(v[(r0 + r) * K + k]) : 0.0f;
            dv[r] = 0.0f;
        }
        for (u64 o = o0; o < o1; ++o) {
            const float a1 = to_f32(w1[o * K + k]), a2 = to_f32(w2[o * K + k]);
            float s1 = 0.0f, s2 = 0.0f;
STEEL_UNROLL
            for (int r = 0; r < EXPERTS_ROWS; ++r) {
                const float ga = g1[o - o0][r], gb = g2[o - o0][r];
                dv[r] += ga * a1 + gb * a2;
                s1 += ga * x[r];
                s2 += gb * x[r];
            }
#ifdef STEEL_MUTATE_EXPERTS_WGRAD
            dw1[o * K + k] = s1;  // test-only breakage: overwrites instead of accumulating
#else
            dw1[o * K + k] += s1;
#endif
            dw2[o * K + k] += s2;
        }
STEEL_UNROLL
        for (int r = 0; r < EXPERTS_ROWS; ++r)
            if (r0 + r < R) p.part[((chunk * E + e) * R + r0 + r) * K + k] = dv[r];
    }
}

extern "C" __global__ void __launch_bounds__(EXPERTS_THREADS) experts_reduce(const ExpertsReduceParams p) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    float g = 0.0f;
    for (u64 k = 0; k < p.chunks; ++k) g += p.part[k * p.n + i];
    p.dst[i] += g;
}

extern "C" __global__ void __launch_bounds__(EXPERTS_THREADS) experts_fwd_f32(const ExpertsFwdParams p) { experts_fwd<float>(p); }
extern "C" __global__ void __launch_bounds__(EXPERTS_THREADS) experts_fwd_bf16(const ExpertsFwdParams p) { experts_fwd<bf16_t>(p); }
extern "C" __global__ void __launch_bounds__(EXPERTS_THREADS) experts_gate_grad_f32(const ExpertsGateGradParams p) { experts_gate_grad<float>(p); }
extern "C" __global__ void __launch_bounds__(EXPERTS_THREADS) experts_gate_grad_bf16(const ExpertsGateGradParams p) { experts_gate_grad<bf16_t>(p); }
extern "C" __global__ void __launch_bounds__(EXPERTS_KT) experts_wgrad_f32(const ExpertsWgradParams p) { experts_wgrad<float>(p); }
extern "C" __global__ void __launch_bounds__(EXPERTS_KT) experts_wgrad_bf16(const ExpertsWgradParams p) { experts_wgrad<bf16_t>(p); }

// Flash attention (FlashAttention-2's scheme), causal, GQA/MQA, on mma.sync m16n8k16 (bf16 in,
// fp32 accumulate). Reference: runtime/src/cpu/attention.rs; launchers: runtime/src/gpu/attention.rs.
//
// Tensors are [B, T, heads, D] bf16 in global memory, unpadded; `lse` and `delta` are
// [B, Hq, Tq] f32. Query i sits at position Tk − Tq + i and sees keys 0 ..= Tk − Tq + i; query
// head h reads KV head h / (Hq / Hkv).
//
// Tiles: 64 queries × 64 keys per step; a block is 4 warps and each warp owns 16 rows of the
// block's 64 (queries in the forward and dQ kernels, keys in the dK/dV kernel). A tile sits in
// shared memory as 64 rows of DP + 8 bf16, where DP is D rounded up to a multiple of 16 (the
// mma k-step): columns D .. DP are zeros written once per block (global memory holds only D),
// and the 8 extra columns offset successive rows by 16 bytes so ldmatrix's eight row reads fall in
// different banks. Rows past the sequence are zero-filled; the causal mask removes them.
//
//   attention_fwd_d{DP}     grid (q tiles, B·Hq): Q in registers, K/V double-buffered through
//                           cp.async, S = QKᵀ, online softmax (running max and sum per row, fp32,
//                           exp2 with the scale folded into log2 e), O += PV; tiles above the
//                           diagonal are never loaded, the diagonal tile is masked; writes O
//                           (bf16 or f32) and lse.
//   attention_bwd_delta     δ = rowsum(dO ⊙ O) into [B, Hq, Tq] (one thread per row).
//   attention_bwd_dkdv_d{DP} grid (kv tiles, B·Hkv): dK and dV of one KV tile in registers; the
//                           query heads of the KV head and their query tiles in a fixed order,
//                           Q/dO/lse/δ double-buffered. dK += scale·dSᵀQ, dV += PᵀdO.
//   attention_bwd_dq_d{DP}  grid (q tiles, B·Hq): dQ of one query tile in registers, K/V
//                           double-buffered. dQ += scale·dS K.
// Every gradient element is written by exactly one thread (a read-modify-write of the f32
// accumulator), so there are no atomics and two runs agree bit for bit; the price is that the dQ
// pass recomputes S and dP (7 tile GEMMs per tile pair instead of 5).
#include "steel_async.cuh"
#include "steel_mma.cuh"
#include "steel_vec.cuh"

#define ATT_TILE 64
#define ATT_THREADS 128

struct AttentionFwdParams {
    const bf16_t* q;  // [B, Tq, Hq, D]
    const bf16_t* k;  // [B, Tk, Hkv, D]
    const bf16_t* v;  // [B, Tk, Hkv, D]
    void* o;          // [B, Tq, Hq, D], bf16 or f32 (o_f32)
    float* lse;       // [B, Hq, Tq]
    u64 batch;
    u64 tq;
    u64 tk;
    u64 hq;
    u64 hkv;
    u64 d;
    float scale_log2;  // scale · log2 e
    unsigned o_f32;
};
STEEL_PARAMS_SIZE(AttentionFwdParams, 96);

struct AttentionBwdParams {
    const bf16_t* q;     // [B, Tq, Hq, D]
    const bf16_t* k;     // [B, Tk, Hkv, D]
    const bf16_t* v;     // [B, Tk, Hkv, D]
    const bf16_t* d_o;   // [B, Tq, Hq, D]
    const float* lse;    // [B, Hq, Tq]
    const float* delta;  // [B, Hq, Tq]
    float* dq;           // [B, Tq, Hq, D], += (the dQ kernel)
    float* dk;           // [B, Tk, Hkv, D], += (the dK/dV kernel)
    float* dv;           // [B, Tk, Hkv, D], += (the dK/dV kernel)
    u64 batch;
    u64 tq;
    u64 tk;
    u64 hq;
    u64 hkv;
    u64 d;
    float scale;
    float scale_log2;
};
STEEL_PARAMS_SIZE(AttentionBwdParams, 128);

struct AttentionDeltaParams {
    const bf16_t* d_o;  // [B, Tq, Hq, D]
    const bf16_t* o;    // [B, Tq, Hq, D]
    float* delta;       // [B, Hq, Tq]
    u64 batch;
    u64 tq;
    u64 hq;
    u64 d;
};
STEEL_PARAMS_SIZE(AttentionDeltaParams, 56);

// The causal mask as one integer per thread and tile: key kbase + kk is visible to the query at
// position qbase + qq iff kk ≤ qq + diag, where diag = qbase − kbase (clamped to ±2^30, beyond
// which a tile is wholly visible or wholly masked). Per element it is then a compare of
// compile-time offsets with one register.
static __device__ __forceinline__ int att_diag(u64 qbase, u64 kbase) {
    long long d = (long long)qbase - (long long)kbase;
    d = d > (1 << 30) ? (1 << 30) : d < -(1 << 30) ? -(1 << 30) : d;
#ifdef STEEL_MUTATE_ATTENTION_CAUSAL
    return (int)d - 1;  // test-only breakage: the diagonal is masked off
#else
    return (int)d;
#endif
}

static __device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    return (unsigned)__bfloat16_as_ushort(f32_to_bf16(lo)) |
           ((unsigned)__bfloat16_as_ushort(f32_to_bf16(hi)) << 16);
}

static __device__ __forceinline__ void zero16(bf16_t* s) { *reinterpret_cast<Vec16*>(s) = Vec16{}; }

// Zeroes columns d .. DP of `tiles` consecutive 64-row tiles (the padding of a head_dim that is
// not a multiple of 16: never written by a tile load, so once per block is enough).
template <int DP>
static __device__ void zero_padding(bf16_t* base, unsigned tiles, unsigned d) {
#ifdef STEEL_MUTATE_ATTENTION_PAD_UNINIT
    if (d < DP) return;  // test-only breakage: the padding columns are left unwritten
#endif
    const unsigned chunks = (DP - d) / 8, rows = tiles * ATT_TILE;
    for (unsigned e = threadIdx.x; e < rows * chunks; e += ATT_THREADS)
        zero16(base + (e / chunks) * (DP + 8) + d + (e % chunks) * 8);
}

// Issues the cp.async copies of rows r0 .. r0 + 64 of one head (`head` points at row 0, rows
// `stride` elements apart, `d` columns) into `dst`; rows at or past `n` are zero-filled.
template <int DP>
static __device__ void load_tile(bf16_t* dst, const bf16_t* head, u64 stride, u64 r0, u64 n,
                                 unsigned d) {
    const unsigned chunks = d / 8;
    for (unsigned e = threadIdx.x; e < ATT_TILE * chunks; e += ATT_THREADS) {
        const unsigned r = e / chunks, c = (e % chunks) * 8;
        bf16_t* s = dst + r * (DP + 8) + c;
        if (r0 + r < n)
            cp_async_16(s, head + (r0 + r) * stride + c);
        else
            zero16(s);
    }
}

// The A fragment (16 rows × k 16) of rows `row0 ..` and columns `col0 ..` of a tile.
template <int DP>
static __device__ __forceinline__ void ld_a(unsigned a[4], const bf16_t* tile, unsigned row0,
                                            unsigned col0) {
    const unsigned lane = threadIdx.x & 31, mat = lane / 8, rr = lane % 8;
    ldmatrix_x4(a, tile + (row0 + rr + (mat & 1) * 8) * (DP + 8) + col0 + (mat >> 1) * 8);
}

// B fragments for two n-tiles of 8 when B[k][n] = tile[n][k] (rows n0 .. n0 + 16 of the tile are
// the n index, columns k0 .. k0 + 16 the k index): b[0..2] for n0 .. n0 + 8, b[2..4] for the next 8.
template <int DP>
static __device__ __forceinline__ void ld_b_rows(unsigned b[4], const bf16_t* tile, unsigned n0,
                                                 unsigned k0) {
    const unsigned lane = threadIdx.x & 31, mat = lane / 8, rr = lane % 8;
    ldmatrix_x4(b, tile + (n0 + (mat >> 1) * 8 + rr) * (DP + 8) + k0 + (mat & 1) * 8);
}

// B fragments for two n-tiles when B[k][n] = tile[k][n] (rows k0 .. k0 + 16 are k, columns
// n0 .. n0 + 16 are n): the transposing ldmatrix.
template <int DP>
static __device__ __forceinline__ void ld_b_cols(unsigned b[4], const bf16_t* tile, unsigned k0,
                                                 unsigned n0) {
    const unsigned lane = threadIdx.x & 31, mat = lane / 8, rr = lane % 8;
    ldmatrix_x4_trans(b, tile + (k0 + (mat & 1) * 8 + rr) * (DP + 8) + n0 + (mat >> 1) * 8);
}

// acc[NT][4] (16 rows × 8·NT) = A-tile rows `arow0 ..` (all DP columns) · (B-tile rows 0 .. 8·NT)ᵀ
// (all DP columns): S = Q Kᵀ, dP = dO Vᵀ and their transposes.
template <int DP, int NT>
static __device__ __forceinline__ void tile_abt(float acc[NT][4], const bf16_t* at, unsigned arow0,
                                                const bf16_t* bt) {
    STEEL_UNROLL
    for (int n = 0; n < NT; ++n) {
        STEEL_UNROLL
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
    }
    STEEL_UNROLL
    for (int kk = 0; kk < DP / 16; ++kk) {
        unsigned a[4];
        ld_a<DP>(a, at, arow0, 16 * kk);
        STEEL_UNROLL
        for (int t = 0; t < NT / 2; ++t) {
            unsigned b[4];
            ld_b_rows<DP>(b, bt, 16 * t, 16 * kk);
            const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
            mma_m16n8k16_bf16(acc[2 * t], a, b0, acc[2 * t]);
            mma_m16n8k16_bf16(acc[2 * t + 1], a, b1, acc[2 * t + 1]);
        }
    }
}

// out[DP/8][4] (16 rows × DP) += X (16 rows × 8·NT, the accumulator layout of `x`, rounded to
// bf16) · tile rows 0 .. 8·NT (all DP columns): O += PV, dV += PᵀdO, dK += dSᵀQ, dQ += dS K.
template <int DP, int NT>
static __device__ __forceinline__ void tile_xb(float out[DP / 8][4], const float x[NT][4],
                                               const bf16_t* bt) {
    STEEL_UNROLL
    for (int kk = 0; kk < NT / 2; ++kk) {
        // The accumulators of n-tiles 2kk and 2kk + 1 are the A fragment of k-step kk.
        const unsigned a[4] = {pack_bf16x2(x[2 * kk][0], x[2 * kk][1]),
                               pack_bf16x2(x[2 * kk][2], x[2 * kk][3]),
                               pack_bf16x2(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                               pack_bf16x2(x[2 * kk + 1][2], x[2 * kk + 1][3])};
        STEEL_UNROLL
        for (int n = 0; n < DP / 16; ++n) {
            unsigned b[4];
            ld_b_cols<DP>(b, bt, 16 * kk, 16 * n);
            const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
            mma_m16n8k16_bf16(out[2 * n], a, b0, out[2 * n]);
            mma_m16n8k16_bf16(out[2 * n + 1], a, b1, out[2 * n + 1]);
        }
    }
}

// ---- forward ------------------------------------------------------------------------------------

template <int DP>
static __device__ void attention_fwd_body(const AttentionFwdParams& p) {
    constexpr int ROW = DP + 8, TILE_ELEMS = ATT_TILE * ROW;
    STEEL_DYNAMIC_SHARED(bf16_t, smem);
    bf16_t* const qs = smem;                  // [64][ROW]
    bf16_t* const ks = smem + TILE_ELEMS;     // [2][64][ROW]
    bf16_t* const vs = smem + 3 * TILE_ELEMS; // [2][64][ROW]
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane / 4, t4 = lane % 4;
    const unsigned d = (unsigned)p.d;
    // 32-bit index arithmetic (a 64-bit division is a subroutine call).
    const unsigned bh = blockIdx.y, hq = (unsigned)p.hq, b = bh / hq, h = bh % hq;
    const unsigned kvh = h / (hq / (unsigned)p.hkv);
    // The heaviest tiles (the last queries see the most keys) are scheduled first.
    const u64 q0 = (u64)(gridDim.x - 1 - blockIdx.x) * ATT_TILE;
    const u64 off = p.tk - p.tq;
    const u64 q_end = q0 + ATT_TILE < p.tq ? q0 + ATT_TILE : p.tq;
    const u64 n_tiles = (off + q_end + ATT_TILE - 1) / ATT_TILE;  // keys 0 .. off + q_end
    const u64 qstride = p.hq * p.d, kstride = p.hkv * p.d;
    const bf16_t* qh = p.q + (b * p.tq * p.hq + h) * p.d;
    const bf16_t* kh = p.k + (b * p.tk * p.hkv + kvh) * p.d;
    const bf16_t* vh = p.v + (b * p.tk * p.hkv + kvh) * p.d;

    zero_padding<DP>(smem, 5, d);
    load_tile<DP>(qs, qh, qstride, q0, p.tq, d);
    cp_async_commit();
    load_tile<DP>(ks, kh, kstride, 0, p.tk, d);
    load_tile<DP>(vs, vh, kstride, 0, p.tk, d);
    cp_async_commit();
    cp_async_wait<1>();  // Q landed; K/V tile 0 stays in flight
    __syncthreads();     // why: every thread's Q copies (and the zero padding) are visible
    // The warp's 16 query rows as A fragments, held in registers for every KV tile.
    unsigned qf[DP / 16][4];
    STEEL_UNROLL
    for (int kk = 0; kk < DP / 16; ++kk) ld_a<DP>(qf[kk], qs, warp * 16, 16 * kk);

    // Rows g and g + 8 of the warp's 16: running max (log2 units), partial sum (this lane's
    // columns; the quad is summed at the end), output accumulators.
    float m[2] = {STEEL_NEG_INF, STEEL_NEG_INF}, l[2] = {0.0f, 0.0f};
    float acc[DP / 8][4];
    STEEL_UNROLL
    for (int n = 0; n < DP / 8; ++n) {
        STEEL_UNROLL
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
    }
    const u64 row_pos = off + q0 + warp * 16 + g;  // of row g; row g + 8 is 8 later

#ifdef STEEL_MUTATE_ATTENTION_SKIP_TILE
    const u64 last = n_tiles > 1 ? n_tiles - 1 : n_tiles;  // test-only breakage: one tile less
#else
    const u64 last = n_tiles;
#endif
    for (u64 j = 0; j < last; ++j) {
        const unsigned buf = (unsigned)(j & 1);
        if (j + 1 < n_tiles) {
            load_tile<DP>(ks + (buf ^ 1) * TILE_ELEMS, kh, kstride, (j + 1) * ATT_TILE, p.tk, d);
            load_tile<DP>(vs + (buf ^ 1) * TILE_ELEMS, vh, kstride, (j + 1) * ATT_TILE, p.tk, d);
            cp_async_commit();
#ifndef STEEL_MUTATE_ATTENTION_NO_WAIT
            cp_async_wait<1>();  // tile j (and Q) landed; tile j + 1 stays in flight
#endif
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // why: every thread's copies of tile j are visible to every warp
        const bf16_t* kt = ks + buf * TILE_ELEMS;
        const bf16_t* vt = vs + buf * TILE_ELEMS;

        float s[8][4];
        STEEL_UNROLL
        for (int n = 0; n < 8; ++n) {
            STEEL_UNROLL
            for (int i = 0; i < 4; ++i) s[n][i] = 0.0f;
        }
        STEEL_UNROLL
        for (int kk = 0; kk < DP / 16; ++kk) {
            STEEL_UNROLL
            for (int t = 0; t < 4; ++t) {
                unsigned bb[4];
                ld_b_rows<DP>(bb, kt, 16 * t, 16 * kk);
                const unsigned b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
                mma_m16n8k16_bf16(s[2 * t], qf[kk], b0, s[2 * t]);
                mma_m16n8k16_bf16(s[2 * t + 1], qf[kk], b1, s[2 * t + 1]);
            }
        }
        // Scores in log2 units (scale · log2 e folded in, so any sign of scale works), and the
        // causal mask on the tiles that reach past the block's first query.
        const u64 k0 = j * ATT_TILE;
        const bool masked = k0 + ATT_TILE - 1 > off + q0;
        const int diag = att_diag(row_pos, k0 + 2 * t4);
        STEEL_UNROLL
        for (int n = 0; n < 8; ++n) {
            STEEL_UNROLL
            for (int i = 0; i < 4; ++i)
                s[n][i] = masked && 8 * n + (i & 1) > 8 * (i >> 1) + diag ? STEEL_NEG_INF
                                                                         : s[n][i] * p.scale_log2;
        }
        // Online softmax: the new running max, the rescale of what came before, P = 2^(S − m).
        STEEL_UNROLL
        for (int r = 0; r < 2; ++r) {
            float mx = STEEL_NEG_INF;
            STEEL_UNROLL
            for (int n = 0; n < 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(STEEL_FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(STEEL_FULL_MASK, mx, 2));
            // Key 0 is in tile 0 and visible to every row, so the max is finite from tile 0 on.
            const float m_new = fmaxf(m[r], mx);
            const float alpha = exp2f(m[r] - m_new);
            m[r] = m_new;
            float sum = 0.0f;
            STEEL_UNROLL
            for (int n = 0; n < 8; ++n) {
                STEEL_UNROLL
                for (int c = 0; c < 2; ++c) {
                    const float e = exp2f(s[n][2 * r + c] - m_new);
                    s[n][2 * r + c] = e;
                    sum += e;
                }
            }
            l[r] = l[r] * alpha + sum;
            STEEL_UNROLL
            for (int n = 0; n < DP / 8; ++n) {
                acc[n][2 * r] *= alpha;
                acc[n][2 * r + 1] *= alpha;
            }
        }
        tile_xb<DP, 8>(acc, s, vt);
        __syncthreads();  // why: every warp is done with buffer `buf` before tile j + 2 refills it
    }

    // The quad's partial sums, then O / l and lse = log Σ exp(scale · s).
    STEEL_UNROLL
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(STEEL_FULL_MASK, l[r], 1);
        l[r] += __shfl_xor_sync(STEEL_FULL_MASK, l[r], 2);
    }
    STEEL_UNROLL
    for (int r = 0; r < 2; ++r) {
        const u64 i = q0 + warp * 16 + g + 8 * r;
        if (i >= p.tq) continue;
        const float inv = __fdividef(1.0f, l[r]);  // l ≥ 1: the row max contributes 1
        const u64 row = ((b * p.tq + i) * p.hq + h) * p.d;
        STEEL_UNROLL
        for (int n = 0; n < DP / 8; ++n) {
            const unsigned c = 8 * n + 2 * t4;
            if (c >= d) continue;
            const float x0 = acc[n][2 * r] * inv, x1 = acc[n][2 * r + 1] * inv;
            if (p.o_f32) {
                float* o = static_cast<float*>(p.o) + row + c;
                o[0] = x0;
                o[1] = x1;
            } else {
                *reinterpret_cast<unsigned*>(static_cast<bf16_t*>(p.o) + row + c) =
                    pack_bf16x2(x0, x1);
            }
        }
        if (t4 == 0)
            p.lse[(b * p.hq + h) * p.tq + i] =
                (m[r] + log2f(l[r])) * 0.69314718055994530942f;
    }
}

// One kernel per padded head_dim (D rounded up to a multiple of 16).
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_d16(const AttentionFwdParams p) {
    attention_fwd_body<16>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_d32(const AttentionFwdParams p) {
    attention_fwd_body<32>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_d48(const AttentionFwdParams p) {
    attention_fwd_body<48>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_d64(const AttentionFwdParams p) {
    attention_fwd_body<64>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_d80(const AttentionFwdParams p) {
    attention_fwd_body<80>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_d96(const AttentionFwdParams p) {
    attention_fwd_body<96>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_d112(const AttentionFwdParams p) {
    attention_fwd_body<112>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_d128(const AttentionFwdParams p) {
    attention_fwd_body<128>(p);
}

// ---- backward -----------------------------------------------------------------------------------

// δ[b, h, i] = Σ_d dO[b, i, h, d] · O[b, i, h, d] in f32, in d order; one thread per row. It
// reads the same bf16 dO as the dP tiles, so δ = rowsum(P ⊙ dP) holds to the rounding of P and O
// (a row with one visible key gets dS = 0 to the last bits, as it must).
extern "C" __global__ void __launch_bounds__(256) attention_bwd_delta(const AttentionDeltaParams p) {
    const u64 rows = p.batch * p.tq * p.hq;
    for (u64 r = (u64)blockIdx.x * blockDim.x + threadIdx.x; r < rows;
         r += (u64)gridDim.x * blockDim.x) {
        const u64 base = r * p.d;
        float s = 0.0f;
        for (u64 c = 0; c < p.d; ++c)
            s = fmaf(bf16_to_f32(p.d_o[base + c]), bf16_to_f32(p.o[base + c]), s);
        // row r is (b, i, h) of [B, Tq, Hq]; δ is [B, Hq, Tq].
        const u64 h = r % p.hq, bi = r / p.hq, i = bi % p.tq, b = bi / p.tq;
        p.delta[(b * p.hq + h) * p.tq + i] = s;
    }
}

// The dK/dV kernel: accumulator rows are keys, columns queries (Sᵀ, Pᵀ, dPᵀ, dSᵀ). MODE 0
// computes dK and dV together; above head_dim 96 their accumulators (2·DP/8·4 registers per
// thread) do not fit beside the tiles, so MODE 1 (dV only) and MODE 2 (dK only) split the work
// in two launches that each recompute Sᵀ (5 tile GEMMs instead of 4).
template <int DP, int MODE>
static __device__ void attention_bwd_dkdv_body(const AttentionBwdParams& p) {
    constexpr bool DO_V = MODE != 2, DO_K = MODE != 1;
    constexpr int ROW = DP + 8, TILE_ELEMS = ATT_TILE * ROW, QN = DP <= 48 || MODE ? 64 : 32;
    STEEL_DYNAMIC_SHARED(bf16_t, smem);
    bf16_t* const ks = smem;                    // [64][ROW]
    bf16_t* const vs = smem + TILE_ELEMS;       // [64][ROW]
    bf16_t* const qs = smem + 2 * TILE_ELEMS;   // [2][64][ROW]
    bf16_t* const dos = smem + 4 * TILE_ELEMS;  // [2][64][ROW]
    float* const lse_s = reinterpret_cast<float*>(smem + 6 * TILE_ELEMS);  // [2][64], · log2 e
    float* const dl_s = lse_s + 2 * ATT_TILE;                                // [2][64]
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane / 4, t4 = lane % 4;
    const unsigned d = (unsigned)p.d;
    const unsigned bg = blockIdx.y, hkv = (unsigned)p.hkv, b = bg / hkv, kvh = bg % hkv;
    const unsigned rep = (unsigned)p.hq / hkv;
    const u64 k0 = (u64)blockIdx.x * ATT_TILE, off = p.tk - p.tq;
    const u64 qstride = p.hq * p.d, kstride = p.hkv * p.d;
    // Query tiles that see a key of this tile: those ending after position k0 − off.
    const unsigned first_qt = k0 > off ? (unsigned)((k0 - off) / ATT_TILE) : 0;
    const unsigned n_qt = (unsigned)((p.tq + ATT_TILE - 1) / ATT_TILE);
    const unsigned per_head = n_qt - first_qt, n_iter = rep * per_head;

    zero_padding<DP>(smem, 6, d);
    load_tile<DP>(ks, p.k + (b * p.tk * p.hkv + kvh) * p.d, kstride, k0, p.tk, d);
    load_tile<DP>(vs, p.v + (b * p.tk * p.hkv + kvh) * p.d, kstride, k0, p.tk, d);

    // Step `it` is query head kvh·rep + it / per_head, query tile first_qt + it % per_head.
    auto issue = [&](unsigned it, unsigned buf) {
        const unsigned h = kvh * rep + it / per_head;
        const u64 q0 = (u64)(first_qt + it % per_head) * ATT_TILE;
        const u64 head = (b * p.tq * p.hq + h) * p.d;
        load_tile<DP>(qs + buf * TILE_ELEMS, p.q + head, qstride, q0, p.tq, d);
        load_tile<DP>(dos + buf * TILE_ELEMS, p.d_o + head, qstride, q0, p.tq, d);
        if (threadIdx.x < ATT_TILE) {
            const u64 i = q0 + threadIdx.x, at = (b * p.hq + h) * p.tq + i;
            // Rows past Tq: P = exp2(s − ∞) = 0 and δ = 0, so they add nothing.
            lse_s[buf * ATT_TILE + threadIdx.x] =
                i < p.tq ? p.lse[at] * 1.44269504088896340736f : __int_as_float(0x7f800000);
            dl_s[buf * ATT_TILE + threadIdx.x] = i < p.tq ? p.delta[at] : 0.0f;
        }
    };
    issue(0, 0);
    cp_async_commit();

    float dk[DO_K ? DP / 8 : 1][4], dv[DO_V ? DP / 8 : 1][4];
    STEEL_UNROLL
    for (int n = 0; n < DP / 8; ++n) {
        STEEL_UNROLL
        for (int i = 0; i < 4; ++i) {
            if (DO_K) dk[n][i] = 0.0f;
            if (DO_V) dv[n][i] = 0.0f;
        }
    }
    const u64 key0 = k0 + warp * 16 + g;  // the key of row g; row g + 8 is 8 later

    for (unsigned it = 0; it < n_iter; ++it) {
        const unsigned buf = (unsigned)(it & 1);
        if (it + 1 < n_iter) {
            issue(it + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // why: step it's tiles and statistics are visible to every warp
        const bf16_t* qt = qs + buf * TILE_ELEMS;
        const bf16_t* dot = dos + buf * TILE_ELEMS;
        const float* ls = lse_s + buf * ATT_TILE;
        const float* dls = dl_s + buf * ATT_TILE;
        const u64 qpos0 = off + (u64)(first_qt + it % per_head) * ATT_TILE;

        // The query tile in sub-tiles of QN queries: all 64 at once up to head_dim 48 (and in the
        // split kernels), halves where the dK and dV accumulators (2·DP/2 registers per thread)
        // leave less room for Sᵀ and dPᵀ (at 64 a whole tile spills one register).
        STEEL_UNROLL
        for (int sub = 0; sub < ATT_TILE / QN; ++sub) {
            const bf16_t* qsub = qt + sub * QN * ROW;
            const bf16_t* dosub = dot + sub * QN * ROW;
            const int diag = att_diag(qpos0 + sub * QN + 2 * t4, key0);
            float s[QN / 8][4], dp[DO_K ? QN / 8 : 1][4];
            tile_abt<DP, QN / 8>(s, ks, warp * 16, qsub);                // Sᵀ = K Qᵀ
            if (DO_K) tile_abt<DP, QN / 8>(dp, vs, warp * 16, dosub);  // dPᵀ = V dOᵀ
            STEEL_UNROLL
            for (int n = 0; n < QN / 8; ++n) {
                STEEL_UNROLL
                for (int i = 0; i < 4; ++i) {
                    const unsigned c = sub * QN + 8 * n + 2 * t4 + (i & 1);
                    const float pr = 8 * (i >> 1) <= 8 * n + (i & 1) + diag
                                         ? exp2f(fmaf(s[n][i], p.scale_log2, -ls[c]))
                                         : 0.0f;
                    s[n][i] = pr;
                    if (!DO_K) continue;
#ifdef STEEL_MUTATE_ATTENTION_DELTA
                    dp[n][i] = pr * (dp[n][i] + dls[c]);  // test-only breakage: δ added
#else
                    dp[n][i] = pr * (dp[n][i] - dls[c]);
#endif
                }
            }
            if (DO_V) tile_xb<DP, QN / 8>(dv, s, dosub);  // dV += Pᵀ dO
            if (DO_K) tile_xb<DP, QN / 8>(dk, dp, qsub);  // dK += dSᵀ Q
        }
        __syncthreads();  // why: every warp is done with buffer `buf` before step it + 2 refills it
    }
    STEEL_UNROLL
    for (int r = 0; r < 2; ++r) {
        const u64 key = key0 + 8 * r;
        if (key >= p.tk) continue;
        const u64 row = ((b * p.tk + key) * p.hkv + kvh) * p.d;
        STEEL_UNROLL
        for (int n = 0; n < DP / 8; ++n) {
            const unsigned c = 8 * n + 2 * t4;
            if (c >= d) continue;
            if (DO_K) {
                float* k_out = p.dk + row + c;
                k_out[0] += p.scale * dk[n][2 * r];
                k_out[1] += p.scale * dk[n][2 * r + 1];
            }
            if (DO_V) {
                float* v_out = p.dv + row + c;
                v_out[0] += dv[n][2 * r];
                v_out[1] += dv[n][2 * r + 1];
            }
        }
    }
}

// The dQ kernel: rows are queries, columns keys.
template <int DP>
static __device__ void attention_bwd_dq_body(const AttentionBwdParams& p) {
    constexpr int ROW = DP + 8, TILE_ELEMS = ATT_TILE * ROW;
    STEEL_DYNAMIC_SHARED(bf16_t, smem);
    bf16_t* const qs = smem;                    // [64][ROW]
    bf16_t* const dos = smem + TILE_ELEMS;      // [64][ROW]
    bf16_t* const ks = smem + 2 * TILE_ELEMS;   // [2][64][ROW]
    bf16_t* const vs = smem + 4 * TILE_ELEMS;   // [2][64][ROW]
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane / 4, t4 = lane % 4;
    const unsigned d = (unsigned)p.d;
    const unsigned bh = blockIdx.y, hq = (unsigned)p.hq, b = bh / hq, h = bh % hq;
    const unsigned kvh = h / (hq / (unsigned)p.hkv);
    const u64 q0 = (u64)(gridDim.x - 1 - blockIdx.x) * ATT_TILE;
    const u64 off = p.tk - p.tq;
    const u64 q_end = q0 + ATT_TILE < p.tq ? q0 + ATT_TILE : p.tq;
    const u64 n_tiles = (off + q_end + ATT_TILE - 1) / ATT_TILE;
    const u64 qstride = p.hq * p.d, kstride = p.hkv * p.d;
    const u64 head = (b * p.tq * p.hq + h) * p.d;
    const bf16_t* kh = p.k + (b * p.tk * p.hkv + kvh) * p.d;
    const bf16_t* vh = p.v + (b * p.tk * p.hkv + kvh) * p.d;

    zero_padding<DP>(smem, 6, d);
    load_tile<DP>(qs, p.q + head, qstride, q0, p.tq, d);
    load_tile<DP>(dos, p.d_o + head, qstride, q0, p.tq, d);
    load_tile<DP>(ks, kh, kstride, 0, p.tk, d);
    load_tile<DP>(vs, vh, kstride, 0, p.tk, d);
    cp_async_commit();

    // Rows g and g + 8: their lse (· log2 e) and δ; rows past Tq get P = 0.
    float ls[2], dl[2];
    const u64 qpos = off + q0 + warp * 16 + g;  // of row g; row g + 8 is 8 later
    STEEL_UNROLL
    for (int r = 0; r < 2; ++r) {
        const u64 i = q0 + warp * 16 + g + 8 * r, at = (b * p.hq + h) * p.tq + i;
        ls[r] = i < p.tq ? p.lse[at] * 1.44269504088896340736f : __int_as_float(0x7f800000);
        dl[r] = i < p.tq ? p.delta[at] : 0.0f;
    }
    float dq[DP / 8][4];
    STEEL_UNROLL
    for (int n = 0; n < DP / 8; ++n) {
        STEEL_UNROLL
        for (int i = 0; i < 4; ++i) dq[n][i] = 0.0f;
    }

    for (u64 j = 0; j < n_tiles; ++j) {
        const unsigned buf = (unsigned)(j & 1);
        if (j + 1 < n_tiles) {
            load_tile<DP>(ks + (buf ^ 1) * TILE_ELEMS, kh, kstride, (j + 1) * ATT_TILE, p.tk, d);
            load_tile<DP>(vs + (buf ^ 1) * TILE_ELEMS, vh, kstride, (j + 1) * ATT_TILE, p.tk, d);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // why: every thread's copies of tile j are visible to every warp
        const bf16_t* kt = ks + buf * TILE_ELEMS;
        const bf16_t* vt = vs + buf * TILE_ELEMS;
        const int diag = att_diag(qpos, j * ATT_TILE + 2 * t4);

        float s[8][4], dp[8][4];
        tile_abt<DP, 8>(s, qs, warp * 16, kt);    // S = Q Kᵀ
        tile_abt<DP, 8>(dp, dos, warp * 16, vt);  // dP = dO Vᵀ
        STEEL_UNROLL
        for (int n = 0; n < 8; ++n) {
            STEEL_UNROLL
            for (int i = 0; i < 4; ++i) {
                // Keys past Tk are never visible to a real query (and padded rows have P = 0).
                const int r = i >> 1;
                const float pr = 8 * n + (i & 1) <= 8 * r + diag
                                     ? exp2f(fmaf(s[n][i], p.scale_log2, -ls[r]))
                                     : 0.0f;
                dp[n][i] = pr * (dp[n][i] - dl[r]);
            }
        }
        tile_xb<DP, 8>(dq, dp, kt);  // dQ += dS K
        __syncthreads();  // why: every warp is done with buffer `buf` before tile j + 2 refills it
    }
    STEEL_UNROLL
    for (int r = 0; r < 2; ++r) {
        const u64 i = q0 + warp * 16 + g + 8 * r;
        if (i >= p.tq) continue;
        const u64 row = ((b * p.tq + i) * p.hq + h) * p.d;
        STEEL_UNROLL
        for (int n = 0; n < DP / 8; ++n) {
            const unsigned c = 8 * n + 2 * t4;
            if (c >= d) continue;
            float* out = p.dq + row + c;
            out[0] += p.scale * dq[n][2 * r];
            out[1] += p.scale * dq[n][2 * r + 1];
        }
    }
}

// The backward kernels of each padded head_dim (dK and dV apart above 96).
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dkdv_d16(const AttentionBwdParams p) {
    attention_bwd_dkdv_body<16, 0>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dkdv_d32(const AttentionBwdParams p) {
    attention_bwd_dkdv_body<32, 0>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dkdv_d48(const AttentionBwdParams p) {
    attention_bwd_dkdv_body<48, 0>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dkdv_d64(const AttentionBwdParams p) {
    attention_bwd_dkdv_body<64, 0>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dkdv_d80(const AttentionBwdParams p) {
    attention_bwd_dkdv_body<80, 0>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dkdv_d96(const AttentionBwdParams p) {
    attention_bwd_dkdv_body<96, 0>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dv_d112(const AttentionBwdParams p) {
    attention_bwd_dkdv_body<112, 1>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dk_d112(const AttentionBwdParams p) {
    attention_bwd_dkdv_body<112, 2>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dv_d128(const AttentionBwdParams p) {
    attention_bwd_dkdv_body<128, 1>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dk_d128(const AttentionBwdParams p) {
    attention_bwd_dkdv_body<128, 2>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dq_d16(const AttentionBwdParams p) {
    attention_bwd_dq_body<16>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dq_d32(const AttentionBwdParams p) {
    attention_bwd_dq_body<32>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dq_d48(const AttentionBwdParams p) {
    attention_bwd_dq_body<48>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dq_d64(const AttentionBwdParams p) {
    attention_bwd_dq_body<64>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dq_d80(const AttentionBwdParams p) {
    attention_bwd_dq_body<80>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dq_d96(const AttentionBwdParams p) {
    attention_bwd_dq_body<96>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dq_d112(const AttentionBwdParams p) {
    attention_bwd_dq_body<112>(p);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dq_d128(const AttentionBwdParams p) {
    attention_bwd_dq_body<128>(p);
}

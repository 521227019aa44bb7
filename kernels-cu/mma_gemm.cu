// A 64x64 bf16 tile GEMM on the ldmatrix / mma.sync wrappers (fp32 accumulation): the test
// kernel that pins the fragment layouts down before flash attention builds on them.
//
// c[m, n] = Σ_k a[m, k] · b[n, k]  (a · bᵀ, both row-major, as a Linear layer's x · Wᵀ).
// grid (ceil(n / 64), ceil(m / 64)), block 128 = 4 warps; warp w computes rows 16w .. 16w + 15
// of the block's tile as 8 mma tiles of 16x8. Ragged edges are zero-filled in shared memory.
#include "steel_mma.cuh"

struct MmaTileGemmParams {
    const bf16_t* a;  // (m, k)
    const bf16_t* b;  // (n, k)
    float* c;         // (m, n), overwritten
    u64 m;
    u64 n;
    u64 k;
};
STEEL_PARAMS_SIZE(MmaTileGemmParams, 48);

#define TILE 64
#define KSTEP 16
#define KPAD 24  // row stride in elements: 48 bytes keeps every ldmatrix row 16-byte aligned

extern "C" __global__ void __launch_bounds__(128) mma_tile_gemm_bf16(const MmaTileGemmParams p) {
    STEEL_SHARED(bf16_t, as, TILE * KPAD);
    STEEL_SHARED(bf16_t, bs, TILE * KPAD);
    const unsigned tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u64 m0 = (u64)blockIdx.y * TILE, n0 = (u64)blockIdx.x * TILE;
    const bf16_t zero = f32_to_bf16(0.0f);
    float acc[8][4];
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (u64 k0 = 0; k0 < p.k; k0 += KSTEP) {
#if defined(STEEL_MUTATE_MMA_TILE_GEMM_UNINIT)
        for (unsigned e = tid; e < TILE * KSTEP - 1; e += blockDim.x) {  // test-only: one left out
#elif defined(STEEL_MUTATE_MMA_TILE_GEMM_SHARED_OOB)
        for (unsigned e = tid; e <= TILE * KSTEP; e += blockDim.x) {  // test-only: one past the end
#else
        for (unsigned e = tid; e < TILE * KSTEP; e += blockDim.x) {
#endif
            const unsigned r = e / KSTEP, kk = e % KSTEP;
            const u64 gk = k0 + kk;
            as[r * KPAD + kk] = (m0 + r < p.m && gk < p.k) ? p.a[(m0 + r) * p.k + gk] : zero;
            bs[r * KPAD + kk] = (n0 + r < p.n && gk < p.k) ? p.b[(n0 + r) * p.k + gk] : zero;
        }
        __syncthreads();  // why: both tiles are complete before any warp loads fragments
        // A fragment: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
        // (rows 8-15, k 8-15) of the warp's 16 rows; lane l addresses row l % 8 of matrix l / 8.
        const unsigned mat = lane / 8, rr = lane % 8;
        unsigned af[4];
        ldmatrix_x4(af, &as[(warp * 16 + rr + (mat & 1) * 8) * KPAD + (mat >> 1) * 8]);
        for (int t = 0; t < 4; ++t) {
            // B fragments of n-tiles 2t and 2t + 1: matrices (n-tile, k 0-7), (n-tile, k 8-15).
            unsigned bf[4];
            ldmatrix_x4(bf, &bs[(8 * (2 * t + (mat >> 1)) + rr) * KPAD + (mat & 1) * 8]);
#ifdef STEEL_MUTATE_MMA_TILE_GEMM
            const unsigned b0[2] = {bf[1], bf[0]};  // test-only breakage: k halves swapped
#else
            const unsigned b0[2] = {bf[0], bf[1]};
#endif
            const unsigned b1[2] = {bf[2], bf[3]};
            mma_m16n8k16_bf16(acc[2 * t], af, b0, acc[2 * t]);
            mma_m16n8k16_bf16(acc[2 * t + 1], af, b1, acc[2 * t + 1]);
        }
        __syncthreads();  // why: every warp is done reading the tiles before they are refilled
    }
    const unsigned g = lane / 4, q = lane % 4;
    for (int nt = 0; nt < 8; ++nt)
        for (int i = 0; i < 4; ++i) {
            const u64 row = m0 + warp * 16 + g + 8 * (i / 2), col = n0 + nt * 8 + 2 * q + i % 2;
#ifdef STEEL_MUTATE_MMA_TILE_GEMM_OOB
            if (row <= p.m && col < p.n) p.c[row * p.n + col] = acc[nt][i];  // test-only breakage
#else
            if (row < p.m && col < p.n) p.c[row * p.n + col] = acc[nt][i];
#endif
        }
}

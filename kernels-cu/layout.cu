// Layout ops: transpose01 ([A, B, C] → [B, A, C]). Reference: runtime/src/cpu/layout.rs.
// slice0 and concat0 are device-to-device copies of whole rows and slice0_bwd is add_assign
// (elementwise.cu) on the rows; only the transpose needs a kernel.
//
// The kernel moves units `E` (2 or 4 bytes, or a 16-byte vector when every C-run is a whole
// number of aligned vectors): output unit o = (j·A + i)·C + c takes input unit (i·B + j)·C + c.
// Block b owns the output units b·CHUNK .. (b+1)·CHUNK; consecutive threads write consecutive
// units, so the writes coalesce (and so do the reads, along c).
#include "steel_common.cuh"
#include "steel_vec.cuh"

#define LAYOUT_CHUNK 2048ull  // output units per block: 256 threads × 8

struct Transpose01Params {
    const void* x;  // (A, B, C) units
    void* out;      // (B, A, C) units
    u64 a;
    u64 b;
    u64 c;  // in units of E
};
STEEL_PARAMS_SIZE(Transpose01Params, 40);

template <typename E>
static __device__ __forceinline__ void transpose01(const Transpose01Params& p) {
    const E* x = (const E*)p.x;
    E* out = (E*)p.out;
    const u64 n = p.a * p.b * p.c;
    const u64 begin = (u64)blockIdx.x * LAYOUT_CHUNK;
    const u64 end = min(begin + LAYOUT_CHUNK, n);
    for (u64 o = begin + threadIdx.x; o < end; o += blockDim.x) {
        const u64 c = o % p.c, row = o / p.c;  // row = j·A + i
        const u64 i = row % p.a, j = row / p.a;
#ifdef STEEL_MUTATE_TRANSPOSE01
        out[o] = x[(i * p.b + j) * p.c + (c + 1) % p.c];  // test-only breakage: rotates c
#else
        out[o] = x[(i * p.b + j) * p.c + c];
#endif
    }
}

extern "C" __global__ void __launch_bounds__(256) transpose01_u16(const Transpose01Params p) {
    transpose01<unsigned short>(p);
}
extern "C" __global__ void __launch_bounds__(256) transpose01_u32(const Transpose01Params p) {
    transpose01<unsigned>(p);
}
extern "C" __global__ void __launch_bounds__(256) transpose01_v16(const Transpose01Params p) {
    transpose01<Vec16>(p);
}

// Tensor-core wrappers: `ldmatrix` and `mma.sync` m16n8k16 (bf16 in, fp32 accumulate).
//
// On the device these are the PTX instructions; under the emulator (STEEL_EMU) they exchange
// registers across the warp and compute with the exact PTX fragment layouts (g = lane / 4,
// t = lane % 4):
//   A (16x16, row-major):  a[r] holds A[g + 8(r % 2)][2t + 8(r / 2) + {0, 1}]
//   B (16x8, "col"):       b[r] holds B[2t + 8r + {0, 1}][g]   (i.e. Bᵀ stored row-major)
//   C, D (16x8):           c[i] is  C[g + 8(i / 2)][2t + i % 2]
// Each 32-bit register packs two bf16, the lower index in the low half.
#pragma once
#include "steel_common.cuh"

// Four 8x8 b16 matrices from shared memory; lane l passes the (16-byte aligned) address of row
// l % 8 of matrix l / 8 and receives in r[j] the pair (row l / 4, cols 2(l % 4) + {0, 1}) of
// matrix j. All 32 lanes must call it.
static __device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* smem_row) {
#ifdef STEEL_EMU
    steel_emu::ldmatrix_x4(r, smem_row, false);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

// The transposing form: r[j] receives (rows 2(l % 4) + {0, 1}, col l / 4) of matrix j.
static __device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* smem_row) {
#ifdef STEEL_EMU
    steel_emu::ldmatrix_x4(r, smem_row, true);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

// d = a · b + c for one 16x8x16 tile per warp. All 32 lanes must call it.
static __device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const unsigned a[4],
                                                         const unsigned b[2], const float c[4]) {
#ifdef STEEL_EMU
    steel_emu::mma_m16n8k16_bf16(d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

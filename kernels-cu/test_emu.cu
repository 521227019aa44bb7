// Test kernels of the emulator itself (runtime/tests/emu.rs): warp collectives, atomics,
// block reductions, dynamic shared memory, ldmatrix, and a barrier that not every thread
// reaches. Valid CUDA, compiled by NVRTC like every other source.
#include "steel_mma.cuh"

struct EmuTestWarpParams {
    int* out;            // (blocks · threads, 8)
    unsigned* counter;   // (1), atomically incremented by every thread
    float* block_sums;   // (blocks): Σ threadIdx.x over the block
};
STEEL_PARAMS_SIZE(EmuTestWarpParams, 24);

// blockDim.x a multiple of 32, dynamic shared memory of blockDim.x ints.
extern "C" __global__ void emu_test_warp_ops(const EmuTestWarpParams p) {
    __shared__ float scratch[32];
    STEEL_DYNAMIC_SHARED(int, dyn);
    const unsigned tid = threadIdx.x, lane = tid & 31;
    const int v = (int)(tid * 10 + blockIdx.x);
    int* o = p.out + ((u64)blockIdx.x * blockDim.x + tid) * 8;
    o[0] = __shfl_xor_sync(STEEL_FULL_MASK, v, 1);
    o[1] = __shfl_down_sync(STEEL_FULL_MASK, v, 3);
    o[2] = __shfl_up_sync(STEEL_FULL_MASK, v, 5);
    o[3] = __shfl_sync(STEEL_FULL_MASK, v, 7, 16);
    o[4] = (int)__ballot_sync(STEEL_FULL_MASK, lane % 3 == 0);
    o[5] = __any_sync(STEEL_FULL_MASK, tid == 33);
    o[6] = __all_sync(STEEL_FULL_MASK, lane < 31);
    dyn[tid] = v;
    __syncthreads();  // why: every thread's value is in shared memory before the reversed read
    o[7] = dyn[blockDim.x - 1 - tid];
    atomicAdd(p.counter, 1u);
    const float s = block_sum((float)tid, scratch);
    if (tid == 0) p.block_sums[blockIdx.x] = s;
}

struct EmuTestLdmatrixParams {
    const bf16_t* src;  // (32, 8): four 8x8 matrices stacked
    unsigned* out;      // (32 lanes, 8): ldmatrix_x4 registers, then ldmatrix_x4_trans
};
STEEL_PARAMS_SIZE(EmuTestLdmatrixParams, 16);

// One warp.
extern "C" __global__ void emu_test_ldmatrix(const EmuTestLdmatrixParams p) {
    __shared__ __align__(16) bf16_t tile[32 * 8];
    const unsigned lane = threadIdx.x;
    for (unsigned i = lane; i < 32 * 8; i += 32) tile[i] = p.src[i];
    __syncwarp();  // why: the whole tile is in shared memory before any lane loads fragments
    unsigned r[4], t[4];
    ldmatrix_x4(r, &tile[lane * 8]);
    ldmatrix_x4_trans(t, &tile[lane * 8]);
    for (int j = 0; j < 4; ++j) {
        p.out[lane * 8 + j] = r[j];
        p.out[lane * 8 + 4 + j] = t[j];
    }
}

struct EmuTestDivergentParams {
    float* out;  // (blockDim.x)
};
STEEL_PARAMS_SIZE(EmuTestDivergentParams, 8);

// Deliberately wrong: threads 16 and up leave before the barrier the others wait at.
extern "C" __global__ void emu_test_divergent_barrier(const EmuTestDivergentParams p) {
    if (threadIdx.x >= 16) return;
    p.out[threadIdx.x] = 1.0f;
    __syncthreads();
    p.out[threadIdx.x] += 1.0f;
}

struct EmuTestSyncLoopParams {
    float* out;       // (gridDim.x · blockDim.x)
    u64 iterations;
};
STEEL_PARAMS_SIZE(EmuTestSyncLoopParams, 16);

// A barrier-bound loop: `iterations` rounds of (shared write, __syncthreads, warp shuffle,
// shared read, __syncthreads). Measures the emulator's switching cost and checks the result.
extern "C" __global__ void emu_test_sync_loop(const EmuTestSyncLoopParams p) {
    __shared__ float buf[1024];
    const unsigned t = threadIdx.x, n = blockDim.x;
    float acc = 0.0f;
    for (u64 i = 0; i < p.iterations; ++i) {
        buf[t] = (float)(t + i);
        __syncthreads();  // why: every value is written before the neighbour reads it
        acc += buf[(t + 1) % n] + __shfl_xor_sync(STEEL_FULL_MASK, (float)t, 1);
        __syncthreads();  // why: every read is done before the next round overwrites buf
    }
    p.out[(u64)blockIdx.x * n + t] = acc;
}

struct EmuTestStackParams {
    float* out;  // (1)
    u64 n;       // elements written into the local array
};
STEEL_PARAMS_SIZE(EmuTestStackParams, 16);

// A 128 KiB local array: twice the emulator's default fiber stack (the stack-overflow report),
// fine with STEEL_EMU_STACK_KB=512. Never launched on a device.
extern "C" __global__ void emu_test_stack(const EmuTestStackParams p) {
    volatile float local[32 * 1024];
    for (u64 i = 0; i < p.n; ++i) local[(p.n - 1 - i) % (32 * 1024)] = (float)i;
    if (threadIdx.x == 0) p.out[0] = local[0];
}

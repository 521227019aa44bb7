// Test kernels of the emulator itself (runtime/tests/gpu_kernels.rs and emu_checks.rs): warp
// collectives, atomics, block reductions (each shared helper twice in a row, as kernels use
// them), dynamic shared memory, ldmatrix, cp.async, warp-synchronous shared memory, and kernels
// broken on purpose for every detector of the emulator. Valid CUDA, compiled by NVRTC like every
// other source; the broken modes are only ever launched under the emulator.
#include "steel_async.cuh"
#include "steel_mma.cuh"

struct EmuTestWarpParams {
    int* out;            // (blocks · threads, 8)
    unsigned* counter;   // (1), atomically incremented by every thread
    float* block_sums;   // (blocks): Σ threadIdx.x over the block
};
STEEL_PARAMS_SIZE(EmuTestWarpParams, 24);

// blockDim.x a multiple of 32, dynamic shared memory of blockDim.x ints.
extern "C" __global__ void __launch_bounds__(1024) emu_test_warp_ops(const EmuTestWarpParams p) {
    STEEL_SHARED(float, scratch, 32);
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
extern "C" __global__ void __launch_bounds__(32) emu_test_ldmatrix(const EmuTestLdmatrixParams p) {
    STEEL_SHARED(bf16_t, tile, 32 * 8);
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
extern "C" __global__ void __launch_bounds__(1024) emu_test_divergent_barrier(const EmuTestDivergentParams p) {
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
extern "C" __global__ void __launch_bounds__(1024) emu_test_sync_loop(const EmuTestSyncLoopParams p) {
    STEEL_SHARED(float, buf, 1024);
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
    float* out;  // (gridDim.x)
    u64 n;       // elements written into the local array
};
STEEL_PARAMS_SIZE(EmuTestStackParams, 16);

// A 128 KiB local array: twice the emulator's default fiber stack (the stack-overflow report),
// fine with STEEL_EMU_STACK_KB=512. Never launched on a device.
extern "C" __global__ void __launch_bounds__(32) emu_test_stack(const EmuTestStackParams p) {
    volatile float local[32 * 1024];
    for (u64 i = 0; i < p.n; ++i) local[(p.n - 1 - i) % (32 * 1024)] = (float)i;
    if (threadIdx.x == 0) p.out[blockIdx.x] = local[0];
}

struct EmuTestHelpersParams {
    const float* x;  // (gridDim.x · blockDim.x)
    float* out;      // (gridDim.x, 4): block_sum of x and of 2x, softmax stats (m, s) of x then of −x
    float* out2;     // (gridDim.x, 2): the stats of −x
};
STEEL_PARAMS_SIZE(EmuTestHelpersParams, 24);

// Every shared helper called twice in a row on the same scratch, as kernels call them: the
// leading barrier of each helper is what protects the second call's writes from the first
// call's readers.
extern "C" __global__ void __launch_bounds__(1024) emu_test_helpers_twice(const EmuTestHelpersParams p) {
    STEEL_SHARED(float, scratch, 32);
    STEEL_SHARED(float, scratch_s, 32);
    const float v = p.x[(u64)blockIdx.x * blockDim.x + threadIdx.x];
    const float s1 = block_sum(v, scratch);
    const float s2 = block_sum(2.0f * v, scratch);
    float m1 = v, e1 = 1.0f, m2 = -v, e2 = 1.0f;
    block_softmax_stats(m1, e1, scratch, scratch_s);
    block_softmax_stats(m2, e2, scratch, scratch_s);
    if (threadIdx.x == 0) {
        float* o = p.out + (u64)blockIdx.x * 4;
        o[0] = s1, o[1] = s2, o[2] = m1, o[3] = e1;
        p.out2[(u64)blockIdx.x * 2] = m2, p.out2[(u64)blockIdx.x * 2 + 1] = e2;
    }
}

struct EmuTestSyncwarpParams {
    float* out;  // (blockDim.x)
    u64 rounds;
};
STEEL_PARAMS_SIZE(EmuTestSyncwarpParams, 16);

// Warp-synchronous shared memory: each warp exchanges values through its own slice of a shared
// buffer, ordered by __syncwarp only (no block barrier at all).
extern "C" __global__ void __launch_bounds__(1024) emu_test_syncwarp_exchange(const EmuTestSyncwarpParams p) {
    STEEL_SHARED(float, buf, 1024);
    const unsigned t = threadIdx.x, lane = t & 31, base = t - lane;
    float acc = 0.0f;
    for (u64 r = 0; r < p.rounds; ++r) {
        buf[t] = (float)(t * 3 + r);
        __syncwarp();  // why: the warp's values are written before any lane reads a neighbour's
        acc += buf[base + ((lane + 1) & 31)];
        __syncwarp();  // why: every lane has read before the next round overwrites the slice
    }
    p.out[t] = acc;
}

struct EmuTestBrokenParams {
    float* out;        // (n)
    const float* src;  // (n), device memory
    u64 n;
    unsigned mode;     // which bug (see the kernel)
    unsigned pad_;
};
STEEL_PARAMS_SIZE(EmuTestBrokenParams, 32);

#define EMU_BROKEN_RAW 0u          // shared read-after-write without a barrier
#define EMU_BROKEN_WAR 1u          // shared write-after-read without a barrier
#define EMU_BROKEN_CROSS_BLOCK 2u  // every block writes the same global words
#define EMU_BROKEN_UNINIT 3u       // reads shared memory nobody wrote
#define EMU_BROKEN_OOB_GLOBAL 4u   // writes one past the end of `out`
#define EMU_BROKEN_COLLECTIVE 5u   // half a warp shuffles while the other half votes
#define EMU_BROKEN_MASKS 6u        // half a warp shuffles with a half mask, the other half full
#define EMU_BROKEN_OOB_SHARED 7u   // writes one past the end of a shared array
#define EMU_BROKEN_LDMATRIX 8u     // ldmatrix from global memory
#define EMU_BROKEN_SHFL_ORDER 9u   // a shuffle used as if it ordered shared memory
#define EMU_BROKEN_NONE 10u        // the correct kernel: every thread's own slot, one barrier
#define EMU_BROKEN_OOB_FAR 11u     // writes 256 bytes past the end of `out` (its guard page)
#define EMU_BROKEN_EXIT 12u        // lane 0 exits while the rest of its warp shuffles with it

// Kernels broken on purpose, one bug per mode (uniform over the launch); each must fail under
// the emulator with the matching detector's message. blockDim.x ≤ 1024, n ≥ blockDim.x.
extern "C" __global__ void __launch_bounds__(1024) emu_test_broken(const EmuTestBrokenParams p) {
    STEEL_SHARED(float, buf, 1024);
    const unsigned t = threadIdx.x, n = blockDim.x, lane = t & 31;
    switch (p.mode) {
        case EMU_BROKEN_RAW:
            buf[t] = 0.0f;
            __syncthreads();  // why: buf is initialised before the racy round
            buf[t] = (float)t;
            p.out[t] = buf[(t + n - 1) % n];  // a lower thread's value of this epoch
            break;
        case EMU_BROKEN_WAR:
            buf[t] = 0.0f;
            __syncthreads();  // why: buf is initialised before the racy round
            buf[t] = (float)t;
            p.out[t] = buf[(t + 1) % n];  // read before the upper thread overwrites it
            break;
        case EMU_BROKEN_CROSS_BLOCK:
            p.out[t] = (float)blockIdx.x;
            break;
        case EMU_BROKEN_UNINIT:
            p.out[t] = buf[t];
            break;
        case EMU_BROKEN_OOB_GLOBAL:
            if (t == 0) p.out[p.n] = 1.0f;
            break;
        case EMU_BROKEN_COLLECTIVE:
            if (lane < 16) {
                p.out[t] = __shfl_sync(STEEL_FULL_MASK, (float)t, 0);
            } else {
                p.out[t] = (float)__ballot_sync(STEEL_FULL_MASK, 1);
            }
            break;
        case EMU_BROKEN_MASKS:
            p.out[t] = __shfl_sync(lane < 16 ? 0x0000ffffu : STEEL_FULL_MASK, (float)t, 0);
            break;
        case EMU_BROKEN_OOB_SHARED:
            buf[t] = 1.0f;
            if (t == 0) buf[1024] = 2.0f;
            break;
        case EMU_BROKEN_LDMATRIX: {
            unsigned r[4];
            ldmatrix_x4(r, p.src + (lane % 8) * 4);
            p.out[t] = (float)r[0];
            break;
        }
        case EMU_BROKEN_OOB_FAR:
            if (t == 0) p.out[p.n + 64] = 1.0f;
            break;
        case EMU_BROKEN_EXIT:
            if (lane == 0) break;
            p.out[t] = __shfl_sync(STEEL_FULL_MASK, (float)t, 1);
            break;
        case EMU_BROKEN_SHFL_ORDER: {
            if (lane == 0) buf[t] = 7.0f;
            const float go = __shfl_sync(STEEL_FULL_MASK, 1.0f, 0);  // no ordering
            p.out[t] = go * buf[t - lane];
            break;
        }
        default:
            buf[t] = p.src[t];
            __syncthreads();  // why: every slot is written before the reversed read
            p.out[t] = buf[n - 1 - t];
            break;
    }
}

struct EmuTestBoundsParams {
    float* out;  // (blockDim.x)
};
STEEL_PARAMS_SIZE(EmuTestBoundsParams, 8);

// Declares at most 64 threads per block: a wider launch must be refused.
extern "C" __global__ void __launch_bounds__(64) emu_test_bounds(const EmuTestBoundsParams p) {
    p.out[threadIdx.x] = (float)threadIdx.x;
}

struct EmuTestDynSharedParams {
    float* out;  // (blockDim.x)
    u64 n;       // floats of dynamic shared memory used
};
STEEL_PARAMS_SIZE(EmuTestDynSharedParams, 16);

// Fills `n` floats of dynamic shared memory (beyond 48 KiB needs the opt-in) and sums them back.
extern "C" __global__ void __launch_bounds__(256) emu_test_dyn_shared(const EmuTestDynSharedParams p) {
    STEEL_DYNAMIC_SHARED(float, dyn);
    for (u64 i = threadIdx.x; i < p.n; i += blockDim.x) dyn[i] = (float)(i % 7);
    __syncthreads();  // why: every value is written before threads read other threads' values
    float acc = 0.0f;
    for (u64 i = (threadIdx.x + 1) % blockDim.x; i < p.n; i += blockDim.x) acc += dyn[i];
    p.out[threadIdx.x] = acc;
}

struct EmuTestCpAsyncParams {
    const float* src;  // (blockDim.x · 4)
    float* out;        // (gridDim.x · blockDim.x · 4)
    unsigned mode;     // 0: correct, 1: the wait is missing, 2: the barrier after it is missing
    unsigned pad_;
};
STEEL_PARAMS_SIZE(EmuTestCpAsyncParams, 24);

// Each thread streams its 16-byte row into a shared tile with cp.async, waits for its group, and
// (after a barrier) reads its neighbour's row.
extern "C" __global__ void __launch_bounds__(256) emu_test_cp_async(const EmuTestCpAsyncParams p) {
    STEEL_SHARED(float, tile, 256 * 4);
    const unsigned t = threadIdx.x, n = blockDim.x;
    cp_async_16(&tile[t * 4], &p.src[t * 4]);
    cp_async_commit();
    if (p.mode != 1) cp_async_wait<0>();
    if (p.mode != 2) __syncthreads();  // why: every thread's copy has landed before the reads
    const unsigned o = (t + 1) % n;
    float* out = p.out + ((u64)blockIdx.x * n + t) * 4;
    for (unsigned i = 0; i < 4; ++i) out[i] = tile[o * 4 + i];
}

struct EmuTestPartialParams {
    float* out;  // (blockDim.x)
};
STEEL_PARAMS_SIZE(EmuTestPartialParams, 8);

// Two half-warp groups run different numbers of shuffles with their own masks, then the whole
// warp shuffles: every exchange must deliver its own values.
extern "C" __global__ void __launch_bounds__(1024) emu_test_partial_masks(const EmuTestPartialParams p) {
    const unsigned t = threadIdx.x, lane = t & 31;
    float v = (float)t;
    if (lane < 16) {
        v += __shfl_xor_sync(0x0000ffffu, v, 1);
        v += __shfl_xor_sync(0x0000ffffu, v, 2);
    } else {
        v += __shfl_xor_sync(0xffff0000u, v, 1);
    }
    p.out[t] = __shfl_xor_sync(STEEL_FULL_MASK, v, 16);
}

struct EmuTestMathParams {
    const float* x;  // (n), any sign
    const float* y;  // (n), positive
    float* out;      // (n, 12)
    u64 n;
};
STEEL_PARAMS_SIZE(EmuTestMathParams, 32);

// The device's math as kernels see it: full-precision functions, intrinsics, correctly rounded
// operations, and a multiply-add that contracts next to one that may not.
extern "C" __global__ void __launch_bounds__(256) emu_test_math(const EmuTestMathParams p) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    const float x = p.x[i], y = p.y[i];
    float* o = p.out + i * 12;
    o[0] = expf(x);
    o[1] = __expf(x);
    o[2] = logf(y);
    o[3] = __logf(y);
    o[4] = rsqrtf(y);
    o[5] = __fdividef(x, y);
    o[6] = sqrtf(y);
    o[7] = __frcp_rn(y);
    o[8] = tanhf(x);
    o[9] = x / y;
    o[10] = x * y + 1.0f;                    // contracts into one fma (NVRTC's --fmad=true)
    o[11] = __fadd_rn(__fmul_rn(x, y), 1.0f);  // never contracts
}

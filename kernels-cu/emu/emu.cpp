// The kernels-cu emulator runtime: fibers, the per-block scheduler, barriers, warp collectives,
// ldmatrix / mma.sync, and the C entry point `steel_emu_launch`.
//
// Execution model:
// - A launch splits its grid over up to STEEL_EMU_THREADS OS threads (default: the hardware
//   threads, at most 8); each OS thread runs whole blocks, one at a time, taking block indices
//   from a shared counter. Results do not depend on this split unless the kernel itself races
//   (atomics across blocks), exactly as on a device.
// - Every CUDA thread of a block is a fiber with its own mmap'd stack (STEEL_EMU_STACK_KB,
//   default 64 KiB, below it a PROT_NONE guard page so an overflow faults instead of corrupting
//   a neighbour). The scheduler runs the fibers round-robin; a fiber runs until it waits at a
//   barrier or exits.
// - `__syncthreads` releases when every thread of the block has arrived; a warp barrier (every
//   warp collective is one) releases when every lane of its mask has arrived. When no fiber can
//   run but some have not exited, the block is deadlocked: the launch fails with a message that
//   names the kernel, the block and which threads wait where and which exited.
// - Warp exchange slots are double-buffered by a per-lane generation counter: a lane can only
//   overwrite generation g's slot after passing barrier g + 1, i.e. after every lane of the mask
//   has finished reading generation g.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "registry.h"
#include "shim.h"
#include "switch_x86_64.h"

#ifdef STEEL_EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

extern "C" void steel_emu_switch(void** save_sp, void* load_sp);
extern "C" void steel_emu_fiber_entry();

__thread const steel_emu::Builtins* steel_emu_builtins;

namespace steel_emu {
namespace {

enum class State : uint8_t { Ready, AtBlockBarrier, AtWarpBarrier, Exited };

struct Stack {
    char* lo = nullptr;  // lowest usable byte (the guard page is below it)
    size_t size = 0;
};

struct Fiber {
    Builtins b;
    void* sp = nullptr;
    Stack stack;
    unsigned linear = 0, lane = 0, warp = 0;
    State state = State::Ready;
    unsigned wait_mask = 0;
    unsigned xgen = 0;
};

struct Warp {
    unsigned arrived = 0;  // lanes waiting at a warp barrier
    unsigned exists = 0;   // lanes that exist in this (possibly partial) warp
    unsigned exited = 0;
    uint64_t slots[2][32][4];
};

struct Block {
    const KernelEntry* kernel = nullptr;
    const void* params = nullptr;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<unsigned char> dyn;
    unsigned nthreads = 0, block_arrived = 0;
    Fiber* cur = nullptr;
    void* sched_sp = nullptr;
    bool failed = false;
    std::string error;
#ifdef STEEL_EMU_ASAN
    const void* sched_stack_lo = nullptr;
    size_t sched_stack_size = 0;
#endif
};

thread_local Block* tls_block = nullptr;

// ---- stacks ------------------------------------------------------------------------------------

size_t page_size() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

size_t stack_bytes() {
    static const size_t s = [] {
        size_t kb = 64;
        if (const char* e = std::getenv("STEEL_EMU_STACK_KB")) {
            long v = std::strtol(e, nullptr, 10);
            if (v >= 16) kb = (size_t)v;
        }
        size_t p = page_size();
        return (kb * 1024 + p - 1) / p * p;
    }();
    return s;
}

std::mutex g_stack_mutex;
std::vector<Stack> g_free_stacks;  // kept across launches: mmap once, reuse forever

bool take_stacks(std::vector<Fiber>& fibers, std::string& err) {
    std::lock_guard<std::mutex> lock(g_stack_mutex);
    for (Fiber& f : fibers) {
        if (!g_free_stacks.empty()) {
            f.stack = g_free_stacks.back();
            g_free_stacks.pop_back();
            continue;
        }
        size_t guard = page_size(), size = stack_bytes();
        void* p = mmap(nullptr, guard + size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            err = "emulator: cannot map a fiber stack (out of address space?)";
            return false;
        }
        if (mprotect(p, guard, PROT_NONE) != 0) {
            munmap(p, guard + size);
            err = "emulator: cannot protect a fiber stack's guard page";
            return false;
        }
        f.stack = Stack{static_cast<char*>(p) + guard, size};
    }
    return true;
}

void give_stacks(std::vector<Fiber>& fibers) {
    std::lock_guard<std::mutex> lock(g_stack_mutex);
    for (Fiber& f : fibers)
        if (f.stack.lo) g_free_stacks.push_back(f.stack), f.stack = Stack{};
}

// ---- switching ---------------------------------------------------------------------------------

// From the scheduler into fiber `f`.
void enter(Block& b, Fiber& f) {
    b.cur = &f;
    steel_emu_builtins = &f.b;
#ifdef STEEL_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack.lo, f.stack.size);
    steel_emu_switch(&b.sched_sp, f.sp);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    steel_emu_switch(&b.sched_sp, f.sp);
#endif
    b.cur = nullptr;
}

// From the running fiber back to the scheduler; returns when the scheduler resumes it.
// `last` marks the final switch of an exited fiber.
void leave(Block& b, Fiber& f, bool last) {
#ifdef STEEL_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(last ? nullptr : &fake, b.sched_stack_lo, b.sched_stack_size);
    steel_emu_switch(&f.sp, b.sched_sp);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    (void)last;
    steel_emu_switch(&f.sp, b.sched_sp);
#endif
}

void fiber_main(Fiber* f) {
    Block& b = *tls_block;
#ifdef STEEL_EMU_ASAN
    // A new fiber completes the switch `enter` started; ASan reports the scheduler's stack.
    __sanitizer_finish_switch_fiber(nullptr, &b.sched_stack_lo, &b.sched_stack_size);
#endif
    b.kernel->run(b.params);
    f->state = State::Exited;
    b.warps[f->warp].exited |= 1u << f->lane;
    leave(b, *f, true);
    std::abort();  // an exited fiber is never resumed
}

void init_fiber(Fiber& f) {
    // The frame steel_emu_switch pops: fcw, mxcsr, r15, r14, r13 (= fiber_main), r12 (= f),
    // rbx, rbp, then the return address steel_emu_fiber_entry. After `ret` the stack pointer is
    // 16-byte aligned, as the ABI wants before the `call` in the entry.
    uintptr_t top = (uintptr_t)(f.stack.lo + f.stack.size) & ~(uintptr_t)15;
    uint64_t* sp = reinterpret_cast<uint64_t*>(top - 88);
    uint16_t fcw;
    uint32_t mxcsr;
    __asm__ volatile("fnstcw %0" : "=m"(fcw));
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    sp[0] = fcw;
    sp[1] = mxcsr;
    sp[2] = 0;
    sp[3] = 0;
    sp[4] = (uint64_t)(uintptr_t)&fiber_main;
    sp[5] = (uint64_t)(uintptr_t)&f;
    sp[6] = 0;
    sp[7] = 0;
    sp[8] = (uint64_t)(uintptr_t)&steel_emu_fiber_entry;
    f.sp = sp;
}

std::string fmt(const char* format, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, format);
    vsnprintf(buf, sizeof buf, format, ap);
    va_end(ap);
    return buf;
}

std::string where(const Block& b) {
    const Builtins& x = b.fibers[0].b;
    return fmt("kernel %s, block (%u,%u,%u)", b.kernel->symbol, x.block_idx.x, x.block_idx.y,
               x.block_idx.z);
}

std::string thread_name(const Fiber& f) {
    return fmt("(%u,%u,%u)", f.b.thread_idx.x, f.b.thread_idx.y, f.b.thread_idx.z);
}

// Why a block cannot progress: who waits where, who exited.
std::string deadlock_report(const Block& b) {
    unsigned at_block = 0, at_warp = 0, exited = 0;
    const Fiber *first_block = nullptr, *first_warp = nullptr, *first_exit = nullptr;
    for (const Fiber& f : b.fibers) {
        if (f.state == State::AtBlockBarrier) at_block++, first_block = first_block ? first_block : &f;
        if (f.state == State::AtWarpBarrier) at_warp++, first_warp = first_warp ? first_warp : &f;
        if (f.state == State::Exited) exited++, first_exit = first_exit ? first_exit : &f;
    }
    std::string s = where(b) + ": barrier not reached by every thread (would hang on a GPU): ";
    if (at_block)
        s += fmt("%u of %u threads wait at __syncthreads (first: thread %s); ", at_block,
                 b.nthreads, thread_name(*first_block).c_str());
    if (at_warp)
        s += fmt("%u threads wait at a warp barrier/collective (first: thread %s, mask %#x); ",
                 at_warp, thread_name(*first_warp).c_str(), first_warp->wait_mask);
    if (exited)
        s += fmt("%u threads exited without reaching it (first: thread %s)", exited,
                 thread_name(*first_exit).c_str());
    return s;
}

// Runs one block to completion; false (with b.error) on a deadlock or a reported misuse.
bool run_block(Block& b) {
    for (Fiber& f : b.fibers) {
        f.state = State::Ready;
        f.xgen = 0;
        f.wait_mask = 0;
        init_fiber(f);
    }
    for (Warp& w : b.warps) w.arrived = 0, w.exited = 0;
    b.block_arrived = 0;
    b.failed = false;
    // Dynamic shared memory starts as NaN-like garbage, so a kernel that reads it before
    // writing fails its test instead of seeing zeros.
    std::fill(b.dyn.begin(), b.dyn.end(), (unsigned char)0xff);
    for (;;) {
        bool ran = false, all_exited = true;
        for (Fiber& f : b.fibers) {
            if (f.state == State::Ready) {
                enter(b, f);
                ran = true;
                if (b.failed) return false;
            }
            all_exited = all_exited && f.state == State::Exited;
        }
        if (all_exited) return true;
        if (!ran) {
            bool any_ready = false;
            for (Fiber& f : b.fibers) any_ready = any_ready || f.state == State::Ready;
            if (!any_ready) {
                b.error = deadlock_report(b);
                return false;
            }
        }
    }
}

// ---- stack overflow: the guard page below every fiber stack ------------------------------------
//
// A fiber that overflows its stack faults on the PROT_NONE page below it. The SIGSEGV handler
// (on an alternate signal stack, since the faulting stack is exhausted) recognises that page,
// names the kernel, block and thread, and aborts; any other fault goes to the previous handler
// (Rust's own guard-page handler, or the default action).

struct sigaction g_old_segv;

void segv_handler(int sig, siginfo_t* info, void* uctx) {
    const Block* b = tls_block;
    if (b && b->cur) {
        const char* addr = static_cast<const char*>(info->si_addr);
        const char* lo = b->cur->stack.lo;
        if (addr >= lo - page_size() && addr < lo) {
            const Builtins& x = b->cur->b;
            char msg[512];
            int n = snprintf(msg, sizeof msg,
                             "steel emulator: kernel %s, block (%u,%u,%u), thread (%u,%u,%u) overflowed "
                             "its %zu KiB fiber stack (large local arrays? raise STEEL_EMU_STACK_KB)\n",
                             b->kernel->symbol, x.block_idx.x, x.block_idx.y, x.block_idx.z,
                             x.thread_idx.x, x.thread_idx.y, x.thread_idx.z, stack_bytes() / 1024);
            if (n > 0) (void)!write(2, msg, (size_t)std::min(n, (int)sizeof msg - 1));
            std::abort();
        }
    }
    if (g_old_segv.sa_flags & SA_SIGINFO) {
        g_old_segv.sa_sigaction(sig, info, uctx);
    } else if (g_old_segv.sa_handler != SIG_DFL && g_old_segv.sa_handler != SIG_IGN) {
        g_old_segv.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);  // returning re-runs the access, which now takes the default action
    }
}

void install_segv_handler() {
#ifndef STEEL_EMU_ASAN  // AddressSanitizer reports overflows itself
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = segv_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_old_segv);
    });
#endif
}

// An alternate signal stack for the calling thread while it runs fibers (kept if one exists).
struct AltStack {
    std::vector<char> mem;
    bool installed = false;
    AltStack() {
        stack_t old;
        if (sigaltstack(nullptr, &old) == 0 && !(old.ss_flags & SS_DISABLE)) return;
        mem.resize(64 * 1024);
        stack_t ss;
        ss.ss_sp = mem.data();
        ss.ss_size = mem.size();
        ss.ss_flags = 0;
        installed = sigaltstack(&ss, nullptr) == 0;
    }
    ~AltStack() {
        if (!installed) return;
        stack_t ss;
        std::memset(&ss, 0, sizeof ss);
        ss.ss_flags = SS_DISABLE;
        sigaltstack(&ss, nullptr);
    }
};

Block& current_block() { return *tls_block; }
Fiber& current_fiber() { return *tls_block->cur; }

// Registry: the tables generated by build.rs (registry.cpp).
}  // namespace
}  // namespace steel_emu

extern "C" const steel_emu::KernelEntry* steel_emu_registry(size_t* count);

namespace steel_emu {

void sync_block() {
    Block& b = current_block();
    Fiber& f = current_fiber();
    if (++b.block_arrived == b.nthreads) {
        // Everyone is here: release all, and continue without a switch.
        b.block_arrived = 0;
        for (Fiber& o : b.fibers)
            if (o.state == State::AtBlockBarrier) o.state = State::Ready;
        return;
    }
    f.state = State::AtBlockBarrier;
    leave(b, f, false);
}

void sync_warp(unsigned mask) {
    Block& b = current_block();
    Fiber& f = current_fiber();
    Warp& w = b.warps[f.warp];
    if (!((mask >> f.lane) & 1u)) fail("a warp collective's mask does not contain the calling lane", mask);
    if (mask & ~w.exists) fail("a warp collective's mask names lanes that do not exist", mask);
    w.arrived |= 1u << f.lane;
    if ((w.arrived & mask) == mask) {
        w.arrived &= ~mask;
        for (unsigned l = 0; l < 32; ++l)
            if (((mask >> l) & 1u) && l != f.lane) {
                Fiber& o = b.fibers[f.warp * 32 + l];
                if (o.state == State::AtWarpBarrier) o.state = State::Ready;
            }
        return;
    }
    f.state = State::AtWarpBarrier;
    f.wait_mask = mask;
    leave(b, f, false);
}

const uint64_t* warp_exchange(unsigned mask, const uint64_t* mine, unsigned words) {
    Block& b = current_block();
    Fiber& f = current_fiber();
    Warp& w = b.warps[f.warp];
    unsigned g = f.xgen++ & 1u;
    for (unsigned i = 0; i < words; ++i) w.slots[g][f.lane][i] = mine[i];
    sync_warp(mask);
    // Generation g is overwritten only after every lane of the mask passed barrier g + 1, i.e.
    // after this lane's next collective: reading it in place until then is safe.
    return &w.slots[g][0][0];
}

void fail(const char* what, unsigned detail) {
    Block& b = current_block();
    Fiber& f = current_fiber();
    b.error = where(b) + fmt(", thread %s: %s (%#x)", thread_name(f).c_str(), what, detail);
    b.failed = true;
    f.state = State::Exited;
    leave(b, f, true);
    std::abort();  // a failed block is never resumed
}

unsigned lane_id() { return current_fiber().lane; }

unsigned active_mask() {
    Warp& w = current_block().warps[current_fiber().warp];
    return w.exists & ~w.exited;
}

void* dyn_shared() { return current_block().dyn.data(); }

void ldmatrix_x4(unsigned r[4], const void* row, bool trans) {
    // Lane l supplies the address of row l % 8 of matrix l / 8 (16 bytes: eight b16). Without
    // .trans, lane l receives from matrix j the pair at (row l / 4, cols 2(l % 4), 2(l % 4) + 1);
    // with .trans the pair at (rows 2(l % 4), 2(l % 4) + 1, col l / 4).
    if ((uintptr_t)row % 16 != 0) fail("ldmatrix row address is not 16-byte aligned", (unsigned)(uintptr_t)row);
    uint64_t mine = (uint64_t)(uintptr_t)row;
    const uint64_t* all = warp_exchange(0xffffffffu, &mine, 1);
    unsigned l = lane_id();
    for (unsigned j = 0; j < 4; ++j) {
        uint16_t lo, hi;
        if (!trans) {
            const uint16_t* p = reinterpret_cast<const uint16_t*>(all[(j * 8 + l / 4) * 4]);
            lo = p[2 * (l % 4)];
            hi = p[2 * (l % 4) + 1];
        } else {
            const uint16_t* p0 = reinterpret_cast<const uint16_t*>(all[(j * 8 + 2 * (l % 4)) * 4]);
            const uint16_t* p1 =
                reinterpret_cast<const uint16_t*>(all[(j * 8 + 2 * (l % 4) + 1) * 4]);
            lo = p0[l / 4];
            hi = p1[l / 4];
        }
        r[j] = (unsigned)lo | ((unsigned)hi << 16);
    }
}

namespace {
float bf16_half(uint64_t word, unsigned reg, unsigned half) {
    // Registers are packed two per 64-bit word; each register holds two bf16 (low = even index).
    unsigned r32 = (unsigned)(word >> (32 * (reg & 1)));
    return __bfloat162float(__ushort_as_bfloat16((unsigned short)(r32 >> (16 * half))));
}
}  // namespace

void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    // PTX ISA fragment layouts of mma.m16n8k16 (.bf16 inputs, .f32 accumulators), with
    // g = lane / 4 and t = lane % 4:
    //   A (16x16, row): register r holds A[g + 8(r % 2)][2t + 8(r / 2) + {0, 1}]
    //   B (16x8, col):  register r holds B[2t + 8r + {0, 1}][g]
    //   C, D (16x8):    element i is C[g + 8(i / 2)][2t + i % 2]
    // Each lane computes its own four outputs from the registers of the lanes that own them,
    // accumulating in fp32 in k order.
    uint64_t mine[3] = {(uint64_t)a[0] | ((uint64_t)a[1] << 32),
                        (uint64_t)a[2] | ((uint64_t)a[3] << 32), (uint64_t)b[0] | ((uint64_t)b[1] << 32)};
    const uint64_t* all = warp_exchange(0xffffffffu, mine, 3);
    unsigned l = lane_id(), g = l / 4, t = l % 4;
    float out[4];
    for (unsigned i = 0; i < 4; ++i) {
        unsigned row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float acc = c[i];
        for (unsigned k = 0; k < 16; ++k) {
            // A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register (row / 8) + 2 (k / 8).
            unsigned a_lane = (row % 8) * 4 + (k % 8) / 2, a_reg = row / 8 + 2 * (k / 8);
            float av = bf16_half(all[a_lane * 4 + a_reg / 2], a_reg, k & 1);
            // B[k][col]: lane col * 4 + (k % 8) / 2, register k / 8.
            unsigned b_lane = col * 4 + (k % 8) / 2, b_reg = k / 8;
            float bv = bf16_half(all[b_lane * 4 + 2], b_reg, k & 1);
            acc += av * bv;
        }
        out[i] = acc;
    }
    for (unsigned i = 0; i < 4; ++i) d[i] = out[i];
}

}  // namespace steel_emu

// ---- launch ------------------------------------------------------------------------------------

namespace {
using namespace steel_emu;

unsigned worker_threads() {
    static const unsigned n = [] {
        if (const char* e = std::getenv("STEEL_EMU_THREADS")) {
            long v = std::strtol(e, nullptr, 10);
            if (v >= 1 && v <= 256) return (unsigned)v;
        }
        unsigned h = std::thread::hardware_concurrency();
        return std::max(1u, std::min(h, 8u));
    }();
    return n;
}

struct Launch {
    const KernelEntry* kernel;
    const void* params;
    dim3 grid, block;
    size_t dyn_shared;
    uint64_t nblocks;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex err_mutex;
    uint64_t err_block = UINT64_MAX;
    std::string error;

    void record(uint64_t block, const std::string& e) {
        std::lock_guard<std::mutex> lock(err_mutex);
        if (block < err_block) err_block = block, error = e;  // the lowest failing block wins
        failed = true;
    }
};

void worker(Launch& L) {
    Block b;
    b.kernel = L.kernel;
    b.params = L.params;
    b.nthreads = L.block.x * L.block.y * L.block.z;
    b.fibers.resize(b.nthreads);
    b.warps.resize((b.nthreads + 31) / 32);
    b.dyn.resize(L.dyn_shared);
    for (unsigned i = 0; i < b.nthreads; ++i) {
        Fiber& f = b.fibers[i];
        f.linear = i;
        f.lane = i % 32;
        f.warp = i / 32;
        f.b.thread_idx = uint3{i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y)};
        f.b.block_dim = L.block;
        f.b.grid_dim = L.grid;
        b.warps[f.warp].exists |= 1u << f.lane;
    }
    std::string err;
    if (!take_stacks(b.fibers, err)) {
        L.record(0, err);
        return;
    }
    install_segv_handler();
    AltStack alt;
    Block* saved = tls_block;
    const Builtins* saved_builtins = steel_emu_builtins;
    tls_block = &b;
    for (;;) {
        if (L.failed) break;
        uint64_t i = L.next.fetch_add(1);
        if (i >= L.nblocks) break;
        uint3 bi{(unsigned)(i % L.grid.x), (unsigned)((i / L.grid.x) % L.grid.y),
                 (unsigned)(i / ((uint64_t)L.grid.x * L.grid.y))};
        for (Fiber& f : b.fibers) f.b.block_idx = bi;
        if (!run_block(b)) {
            L.record(i, b.error);
            break;
        }
    }
    tls_block = saved;
    steel_emu_builtins = saved_builtins;
    give_stacks(b.fibers);
}

void set_err(char* err, size_t errlen, const std::string& msg) {
    if (!err || errlen == 0) return;
    size_t n = std::min(errlen - 1, msg.size());
    std::memcpy(err, msg.data(), n);
    err[n] = 0;
}
}  // namespace

// Runs kernel `symbol` over the grid and returns 0, or nonzero with a message in `err`.
// Synchronous: every block has finished when it returns.
extern "C" int steel_emu_launch(const char* symbol, const unsigned* grid, const unsigned* block,
                                size_t dyn_shared, const void* params, size_t param_bytes,
                                char* err, size_t errlen) {
    size_t count = 0;
    const KernelEntry* table = steel_emu_registry(&count);
    const KernelEntry* k = nullptr;
    for (size_t i = 0; i < count; ++i)
        if (std::strcmp(table[i].symbol, symbol) == 0) k = &table[i];
    if (!k) {
        set_err(err, errlen, fmt("emulator: no kernel named %s in kernels-cu", symbol));
        return 1;
    }
    if (param_bytes != k->param_bytes) {
        set_err(err, errlen,
                fmt("kernel %s: parameter struct is %zu bytes in the .cu source but %zu were "
                    "passed (the Rust mirror is out of date)",
                    symbol, k->param_bytes, param_bytes));
        return 1;
    }
    uint64_t threads = (uint64_t)block[0] * block[1] * block[2];
    if (threads == 0 || threads > 1024 || block[2] > 64 || grid[0] == 0 || grid[1] == 0 ||
        grid[2] == 0 || grid[1] > 65535 || grid[2] > 65535) {
        set_err(err, errlen,
                fmt("kernel %s: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)",
                    symbol, grid[0], grid[1], grid[2], block[0], block[1], block[2]));
        return 1;
    }
    if (dyn_shared > 227 * 1024) {
        set_err(err, errlen,
                fmt("kernel %s: %zu bytes of dynamic shared memory exceed a block's 227 KiB",
                    symbol, dyn_shared));
        return 1;
    }
    Launch L;
    L.kernel = k;
    L.params = params;
    L.grid = dim3{grid[0], grid[1], grid[2]};
    L.block = dim3{block[0], block[1], block[2]};
    L.dyn_shared = dyn_shared;
    L.nblocks = (uint64_t)grid[0] * grid[1] * grid[2];
    unsigned nw = (unsigned)std::min<uint64_t>(worker_threads(), L.nblocks);
    if (nw <= 1) {
        worker(L);
    } else {
        std::vector<std::thread> pool;
        pool.reserve(nw);
        for (unsigned i = 0; i < nw; ++i) pool.emplace_back([&L] { worker(L); });
        for (std::thread& t : pool) t.join();
    }
    if (L.failed) {
        set_err(err, errlen, L.error);
        return 1;
    }
    return 0;
}

// The kernels the emulator knows, for diagnostics and tests.
extern "C" size_t steel_emu_kernel_count() {
    size_t count = 0;
    steel_emu_registry(&count);
    return count;
}
extern "C" const char* steel_emu_kernel_name(size_t i) {
    size_t count = 0;
    const KernelEntry* table = steel_emu_registry(&count);
    return i < count ? table[i].symbol : nullptr;
}

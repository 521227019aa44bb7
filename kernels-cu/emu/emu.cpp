// The kernels-cu emulator runtime: fibers, the schedules, barriers, warp collectives,
// ldmatrix / mma.sync, cp.async, and the C entry point `steel_emu_launch`.
//
// Execution model:
// - A launch splits its grid over up to STEEL_EMU_THREADS OS threads (default: the hardware
//   threads, at most 8); each OS thread runs whole blocks, one at a time, taking block indices
//   from a shared counter. Results do not depend on this split unless the kernel itself races,
//   and the checker reports such races (check.cpp).
// - Every CUDA thread of a block is a fiber with its own mmap'd stack (STEEL_EMU_STACK_KB,
//   default 64 KiB, below it a PROT_NONE guard page so an overflow faults instead of corrupting
//   a neighbour). A fiber runs until it waits at a barrier or a collective, or exits; the launch's
//   schedule then picks the next ready fiber: round-robin in thread order, reversed, warp-major
//   depth-first (always the lowest ready thread), or seeded random. Every schedule is a legal
//   order on a GPU, so a deterministic kernel gives bit-identical results under all of them.
// - `__syncthreads` releases when every thread of the block has arrived; a warp collective when
//   every lane of its mask has arrived at the same kind of collective with the same mask (an
//   Exchange, numbered per warp). Lanes meeting at different kinds or masks, a mask naming an
//   exited lane, and a state where nothing can run are reported as errors that name the kernel,
//   the block and the threads — never a hang.
// - Only `__syncthreads` (epochs) and `__syncwarp` (vector clocks of the warp's lanes) order
//   memory; shuffles, votes, ldmatrix and mma exchange registers only (check.cpp).
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>

#include "internal.h"
#include "switch_x86_64.h"

#ifdef STEEL_EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

extern "C" void steel_emu_switch(void** save_sp, void* load_sp);
extern "C" void steel_emu_fiber_entry();

__thread const steel_emu::Builtins* steel_emu_builtins;

namespace steel_emu {

static_assert(kShuffle == Coll::Shuffle && kVote == Coll::Vote, "shim.h's collective kinds");

thread_local Block* tls_block = nullptr;

const char* coll_name(Coll c) {
    switch (c) {
        case Coll::SyncWarp: return "__syncwarp";
        case Coll::Shuffle: return "__shfl_*_sync";
        case Coll::Vote: return "__ballot_sync/__any_sync/__all_sync";
        case Coll::Ldmatrix: return "ldmatrix";
        case Coll::Mma: return "mma.sync";
    }
    return "?";
}

// ---- reports -----------------------------------------------------------------------------------

std::string fmt(const char* format, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, format);
    vsnprintf(buf, sizeof buf, format, ap);
    va_end(ap);
    return buf;
}

std::string block_name(const Launch& L, uint64_t i) {
    return fmt("(%u,%u,%u)", (unsigned)(i % L.grid.x), (unsigned)((i / L.grid.x) % L.grid.y),
               (unsigned)(i / ((uint64_t)L.grid.x * L.grid.y)));
}

std::string where(const Block& b) {
    return fmt("kernel %s, block %s", b.kernel->symbol, block_name(*b.launch, b.linear).c_str());
}

std::string thread_name(const Block& b, unsigned tid) {
    const dim3 d = b.launch->block;
    return fmt("(%u,%u,%u)", tid % d.x, (tid / d.x) % d.y, tid / (d.x * d.y));
}

int32_t code_offset(const void* pc) {
    const Block* b = tls_block;
    if (!b || !pc) return INT32_MIN;
    const intptr_t d = (intptr_t)pc - (intptr_t)b->kernel->fn;
    return d > INT32_MIN && d < INT32_MAX ? (int32_t)d : INT32_MIN;
}

std::string source_marker(const Block& b, int32_t off) {
    // A return address points after its call: the access is the instruction before it.
    if (off == INT32_MIN || off <= 0) return "";
    return fmt(" @@src:%s:%s:%x@@", b.kernel->stem, b.kernel->symbol, (unsigned)(off - 1));
}

namespace {

// ---- stacks ------------------------------------------------------------------------------------

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

void release(Warp& w, Exchange*& x) {
    if (x && --x->refs == 0) w.free.push_back(x);
    x = nullptr;
}

void fiber_exit(Block& b, Fiber& f) {
    Warp& w = b.warps[f.warp];
    release(w, f.last);
    for (const Exchange* x : w.open)
        if (x->mask & (1u << f.lane))
            fail_block(where(b) + fmt(", thread %s: exits while lanes %#x of its warp wait for it at "
                                      "%s (mask %#x, exchange #%llu)",
                                      thread_name(b, f.tid).c_str(), x->arrived,
                                      coll_name(x->kind), x->mask, (unsigned long long)x->seq));
    f.state = State::Exited;
    w.exited |= 1u << f.lane;
}

void fiber_main(Fiber* f) {
    Block& b = *tls_block;
#ifdef STEEL_EMU_ASAN
    // A new fiber completes the switch `enter` started; ASan reports the scheduler's stack.
    __sanitizer_finish_switch_fiber(nullptr, &b.sched_stack_lo, &b.sched_stack_size);
#endif
    b.kernel->run(b.params);
    fiber_exit(b, *f);
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

// ---- scheduling --------------------------------------------------------------------------------

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void make_ready(Block& b, Fiber& f) {
    f.state = State::Ready;
    b.ready.add(f.tid);
}

unsigned pick(Block& b) {
    const int n = (int)b.nthreads;
    int i = -1;
    switch ((Schedule)b.launch->opt.schedule) {
        case Schedule::RoundRobin:
            i = b.ready.next_from((unsigned)b.pos);
            if (i < 0) i = b.ready.next_from(0);
            b.pos = i + 1 < n ? i + 1 : 0;
            break;
        case Schedule::Reverse:
            i = b.ready.prev_from(b.pos);
            if (i < 0) i = b.ready.prev_from(n - 1);
            b.pos = i > 0 ? i - 1 : n - 1;
            break;
        case Schedule::WarpMajor:
            i = b.ready.next_from(0);
            break;
        case Schedule::Random:
            i = b.ready.kth((unsigned)(splitmix(b.rng) % b.ready.count));
            break;
    }
    return (unsigned)i;
}

// Why a block cannot progress: who waits where, who exited.
std::string deadlock_report(const Block& b) {
    unsigned at_block = 0, at_warp = 0, exited = 0;
    const Fiber *first_block = nullptr, *first_warp = nullptr, *first_exit = nullptr;
    for (const Fiber& f : b.fibers) {
        if (f.state == State::AtBlockBarrier) at_block++, first_block = first_block ? first_block : &f;
        if (f.state == State::AtWarp) at_warp++, first_warp = first_warp ? first_warp : &f;
        if (f.state == State::Exited) exited++, first_exit = first_exit ? first_exit : &f;
    }
    std::string s = where(b) + ": barrier not reached by every thread (would hang on a GPU): ";
    if (at_block)
        s += fmt("%u of %u threads wait at __syncthreads (first: thread %s); ", at_block,
                 b.nthreads, thread_name(b, first_block->tid).c_str());
    if (at_warp)
        s += fmt("%u threads wait at a warp collective (first: thread %s at %s, mask %#x, lanes "
                 "%#x arrived); ",
                 at_warp, thread_name(b, first_warp->tid).c_str(),
                 coll_name(first_warp->waiting->kind), first_warp->waiting->mask,
                 first_warp->waiting->arrived);
    if (exited)
        s += fmt("%u threads exited without reaching it (first: thread %s); ", exited,
                 thread_name(b, first_exit->tid).c_str());
    // Every collective still waiting, so disagreeing masks are named side by side.
    unsigned listed = 0;
    for (size_t wi = 0; wi < b.warps.size(); ++wi)
        for (const Exchange* x : b.warps[wi].open)
            if (listed++ < 6)
                s += fmt("warp %zu waits at %s with mask %#x (lanes %#x arrived, exchange #%llu); ",
                         wi, coll_name(x->kind), x->mask, x->arrived, (unsigned long long)x->seq);
    return s.substr(0, s.size() - 2);
}

// Runs one block to completion; false (with b.error) on a deadlock or a reported misuse.
bool run_block(Block& b) {
    b.ready.reset(b.nthreads);
    for (Fiber& f : b.fibers) {
        f.waiting = f.last = nullptr;
        f.async.clear();
        f.commits = 0;
        init_fiber(f);
        make_ready(b, f);
    }
    for (Warp& w : b.warps) {
        w.exited = 0;
        w.seq = 0;
        w.open.clear();
        w.free.clear();
        for (auto& x : w.pool) w.free.push_back(x.get());
    }
    b.block_arrived = 0;
    b.failed = false;
    b.pos = (Schedule)b.launch->opt.schedule == Schedule::Reverse ? (int)b.nthreads - 1 : 0;
    b.rng = b.launch->opt.seed ^ (b.linear * 0x9e3779b97f4a7c15ull);
    checker_block_start(b);
    unsigned exited = 0;
    for (;;) {
        if (b.ready.count == 0) {
            exited = 0;
            for (const Fiber& f : b.fibers) exited += f.state == State::Exited;
            if (exited == b.nthreads) return true;
            b.error = deadlock_report(b);
            return false;
        }
        const unsigned i = pick(b);
        b.ready.remove(i);
        enter(b, b.fibers[i]);
        if (b.failed) return false;
    }
}

// ---- faults: the guard pages below fiber stacks and around allocations -------------------------
//
// A fiber that overflows its stack faults on the PROT_NONE page below it; an access the checker
// did not see (checks off, or code outside the kernels) that runs off an allocation faults on
// the guard page after it. The SIGSEGV handler (on an alternate signal stack, since the faulting
// stack may be exhausted) recognises both, names the kernel, block and thread, and aborts; any
// other fault goes to the previous handler (Rust's own guard-page handler, or the default).

struct sigaction g_old_segv;

void segv_handler(int sig, siginfo_t* info, void* uctx) {
    const Block* b = tls_block;
    if (b && b->cur) {
        const char* addr = static_cast<const char*>(info->si_addr);
        const char* lo = b->cur->stack.lo;
        const Builtins& x = b->cur->b;
        char msg[512];
        int n = 0;
        const Alloc* a = b->launch->allocs->find((uintptr_t)addr);
        if (addr >= lo - page_size() && addr < lo) {
            n = snprintf(msg, sizeof msg,
                         "steel emulator: kernel %s, block (%u,%u,%u), thread (%u,%u,%u) overflowed "
                         "its %zu KiB fiber stack (large local arrays? raise STEEL_EMU_STACK_KB)\n",
                         b->kernel->symbol, x.block_idx.x, x.block_idx.y, x.block_idx.z,
                         x.thread_idx.x, x.thread_idx.y, x.thread_idx.z, stack_bytes() / 1024);
        } else if (a) {
            n = snprintf(msg, sizeof msg,
                         "steel emulator: kernel %s, block (%u,%u,%u), thread (%u,%u,%u): "
                         "out-of-bounds access at offset %lld of device allocation #%llu (%zu "
                         "bytes): it hit the allocation's guard page\n",
                         b->kernel->symbol, x.block_idx.x, x.block_idx.y, x.block_idx.z,
                         x.thread_idx.x, x.thread_idx.y, x.thread_idx.z,
                         (long long)((uintptr_t)addr - a->base), (unsigned long long)a->id, a->size);
        } else {
            n = snprintf(msg, sizeof msg,
                         "steel emulator: kernel %s, block (%u,%u,%u), thread (%u,%u,%u): invalid "
                         "memory access at %p (no live device allocation, not the block's shared "
                         "memory)\n",
                         b->kernel->symbol, x.block_idx.x, x.block_idx.y, x.block_idx.z,
                         x.thread_idx.x, x.thread_idx.y, x.thread_idx.z, (const void*)addr);
        }
        if (n > 0) {
            (void)!write(2, msg, (size_t)std::min(n, (int)sizeof msg - 1));
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

}  // namespace

// ---- the ready set -----------------------------------------------------------------------------

void ReadySet::reset(unsigned n) {
    bits.assign((n + 63) / 64, 0);
    count = 0;
}
void ReadySet::add(unsigned i) {
    if (!has(i)) bits[i >> 6] |= 1ull << (i & 63), count++;
}
void ReadySet::remove(unsigned i) {
    if (has(i)) bits[i >> 6] &= ~(1ull << (i & 63)), count--;
}
int ReadySet::next_from(unsigned i) const {
    for (size_t w = i >> 6; w < bits.size(); ++w) {
        uint64_t m = bits[w];
        if (w == (i >> 6)) m &= ~0ull << (i & 63);
        if (m) return (int)(w * 64 + (unsigned)__builtin_ctzll(m));
    }
    return -1;
}
int ReadySet::prev_from(int i) const {
    if (i < 0) return -1;
    for (int w = i >> 6; w >= 0; --w) {
        uint64_t m = bits[(size_t)w];
        if (w == (i >> 6) && (i & 63) != 63) m &= (1ull << ((i & 63) + 1)) - 1;
        if (m) return w * 64 + 63 - __builtin_clzll(m);
    }
    return -1;
}
int ReadySet::kth(unsigned k) const {
    for (size_t w = 0; w < bits.size(); ++w) {
        uint64_t m = bits[w];
        const unsigned c = (unsigned)__builtin_popcountll(m);
        if (k >= c) {
            k -= c;
            continue;
        }
        for (; k > 0; --k) m &= m - 1;
        return (int)(w * 64 + (unsigned)__builtin_ctzll(m));
    }
    return -1;
}

// ---- failing -----------------------------------------------------------------------------------

void fail_block(std::string msg) {
    Block& b = current_block();
    Fiber& f = current_fiber();
    b.error = std::move(msg);
    b.failed = true;
    f.state = State::Exited;
    leave(b, f, true);
    std::abort();  // a failed block is never resumed
}

void fail(const char* what, unsigned detail) {
    Block& b = current_block();
    fail_block(where(b) + fmt(", thread %s: %s (%#x)", thread_name(b, current_fiber().tid).c_str(),
                              what, detail));
}

// ---- barriers and collectives ------------------------------------------------------------------

void sync_block() {
    Block& b = current_block();
    Fiber& f = current_fiber();
    for (const Exchange* x : b.warps[f.warp].open)
        if (x->mask & (1u << f.lane))
            fail_block(where(b) + fmt(", thread %s: reaches __syncthreads while lanes %#x of its "
                                      "warp wait for it at %s (mask %#x, exchange #%llu)",
                                      thread_name(b, f.tid).c_str(), x->arrived,
                                      coll_name(x->kind), x->mask, (unsigned long long)x->seq));
    if (++b.block_arrived == b.nthreads) {
        // Everyone is here: a new epoch; release all, and continue without a switch.
        b.block_arrived = 0;
        checker_block_barrier(b);
        for (Fiber& o : b.fibers)
            if (o.state == State::AtBlockBarrier) make_ready(b, o);
        return;
    }
    f.state = State::AtBlockBarrier;
    leave(b, f, false);
}

namespace {
// Joins the vector clocks of the lanes of `mask` (a __syncwarp): each lane's barrier count
// advances, and every lane then knows everything any of them knew.
void join_clocks(Warp& w, unsigned mask) {
    w.vc_dirty = true;
    uint32_t j[32] = {0};
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) w.vc[l][l]++;
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l) & 1u)
            for (unsigned k = 0; k < 32; ++k) j[k] = std::max(j[k], w.vc[l][k]);
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) std::memcpy(w.vc[l], j, sizeof j);
}

// The calling lane joins the collective `kind` of `mask` (opening it if it is the first lane);
// returns the completed exchange.
Exchange* collective(Coll kind, unsigned mask, const uint64_t* mine, unsigned words) {
    Block& b = current_block();
    Fiber& f = current_fiber();
    Warp& w = b.warps[f.warp];
    release(w, f.last);
    const unsigned bit = 1u << f.lane;
    const auto who = [&] {
        return where(b) + fmt(", thread %s (lane %u of warp %u)", thread_name(b, f.tid).c_str(),
                              f.lane, f.warp);
    };
    if (!(mask & bit))
        fail_block(who() + fmt(": %s with mask %#x, which does not contain the calling lane",
                             coll_name(kind), mask));
    if (mask & ~w.exists)
        fail_block(who() + fmt(": %s with mask %#x names lanes %#x that do not exist in this block",
                             coll_name(kind), mask, mask & ~w.exists));
    if (mask & w.exited)
        fail_block(who() + fmt(": %s with mask %#x names lanes %#x that have exited (would hang "
                             "on a GPU)",
                             coll_name(kind), mask, mask & w.exited));
    // At most one exchange per mask is open (every lane of it must finish it first); exchanges
    // of other, overlapping masks may be open too: lanes reach them later in their own order
    // (a lane that never does is a deadlock, reported when nothing can run).
    Exchange* x = nullptr;
    for (Exchange* o : w.open)
        if (o->mask == mask) x = o;
    if (x && x->kind != kind)
        fail_block(who() + fmt(": reaches %s with mask %#x while lanes %#x wait for it at %s with "
                               "the same mask (exchange #%llu): every lane of a mask must meet at "
                               "the same collective",
                               coll_name(kind), mask, x->arrived, coll_name(x->kind),
                               (unsigned long long)x->seq));
    if (!x) {
        if (w.free.empty()) {
            w.pool.push_back(std::make_unique<Exchange>());
            w.free.push_back(w.pool.back().get());
        }
        x = w.free.back();
        w.free.pop_back();
        x->seq = ++w.seq;
        x->kind = kind;
        x->mask = mask;
        x->arrived = 0;
        x->refs = 0;
        w.open.push_back(x);
    }
    for (unsigned i = 0; i < words; ++i) x->words[f.lane][i] = mine[i];
    x->arrived |= bit;
    if (x->arrived == mask) {
        w.open.erase(std::find(w.open.begin(), w.open.end(), x));
        x->refs = __builtin_popcount(mask);
        if (kind == Coll::SyncWarp) join_clocks(w, mask);
        for (unsigned l = 0; l < 32; ++l) {
            Fiber& o = b.fibers[f.warp * 32u + l];
            if (((mask >> l) & 1u) && l != f.lane && o.state == State::AtWarp && o.waiting == x) {
                o.waiting = nullptr;
                o.last = x;
                make_ready(b, o);
            }
        }
        f.last = x;
        return x;
    }
    f.state = State::AtWarp;
    f.waiting = x;
    leave(b, f, false);
    return f.last;
}
}  // namespace

void sync_warp(unsigned mask) { collective(Coll::SyncWarp, mask, nullptr, 0); }

const uint64_t* warp_exchange(Coll kind, unsigned mask, const uint64_t* mine, unsigned words) {
    return &collective(kind, mask, mine, words)->words[0][0];
}

void fence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

unsigned lane_id() { return current_fiber().lane; }

unsigned active_mask() {
    Warp& w = current_block().warps[current_fiber().warp];
    return w.exists & ~w.exited;
}

void* dyn_shared() { return current_block().arena; }

void ldmatrix_x4(unsigned r[4], const void* row, bool trans) {
    // Lane l supplies the address of row l % 8 of matrix l / 8 (16 bytes: eight b16). Without
    // .trans, lane l receives from matrix j the pair at (row l / 4, cols 2(l % 4), 2(l % 4) + 1);
    // with .trans the pair at (rows 2(l % 4), 2(l % 4) + 1, col l / 4). Each lane's row is its
    // read of shared memory; the exchange itself orders nothing.
    const void* pc = __builtin_return_address(0);
    if ((uintptr_t)row % 16 != 0) fail("ldmatrix row address is not 16-byte aligned", (unsigned)(uintptr_t)row);
    shared_access("ldmatrix", (uintptr_t)row, 16, false, pc);
    uint64_t mine = (uint64_t)(uintptr_t)row;
    const uint64_t* all = warp_exchange(Coll::Ldmatrix, 0xffffffffu, &mine, 1);
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
    const uint64_t* all = warp_exchange(Coll::Mma, 0xffffffffu, mine, 3);
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

// ---- cp.async ----------------------------------------------------------------------------------

void cp_async(void* smem, const void* gmem, unsigned bytes) {
    const void* pc = __builtin_return_address(0);
    Block& b = current_block();
    Fiber& f = current_fiber();
    if (bytes != 4 && bytes != 8 && bytes != 16) fail("cp.async copies 4, 8 or 16 bytes", bytes);
    if ((uintptr_t)smem % bytes || (uintptr_t)gmem % bytes)
        fail("cp.async addresses must be aligned to the copy size", bytes);
    if (!in_shared(b, (uintptr_t)smem, bytes))
        fail_block(where(b) + fmt(", thread %s: cp.async destination %p is not in the block's "
                                  "shared memory",
                                  thread_name(b, f.tid).c_str(), smem));
    // The destination must be usable and not already awaiting another copy.
    shared_mark((uintptr_t)smem, bytes, kAsyncPending, pc);
    global_bounds("cp.async source", (uintptr_t)gmem, bytes, pc);
    f.async.push_back(AsyncCopy{static_cast<unsigned char*>(smem),
                                static_cast<const unsigned char*>(gmem), bytes, f.commits});
}

void cp_async_commit() { current_fiber().commits++; }

void cp_async_wait(unsigned newest_pending) {
    const void* pc = __builtin_return_address(0);
    Fiber& f = current_fiber();
    const uint32_t limit = f.commits > newest_pending ? f.commits - newest_pending : 0;
    std::vector<AsyncCopy> keep;
    const std::vector<AsyncCopy> all = f.async;
    for (const AsyncCopy& c : all) {
        if (c.group >= limit) {
            keep.push_back(c);
            continue;
        }
        // The copy lands now: a read of global memory and a write of shared memory by this thread.
        shared_mark((uintptr_t)c.dst, c.bytes, kUsable, pc);
        on_access((uintptr_t)c.src, c.bytes, false, pc);
        on_access((uintptr_t)c.dst, c.bytes, true, pc);
        std::memcpy(c.dst, c.src, c.bytes);
    }
    current_fiber().async = std::move(keep);
}

}  // namespace steel_emu

// ---- launch ------------------------------------------------------------------------------------

extern "C" const steel_emu::KernelEntry* steel_emu_registry(size_t* count);

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

void record(Launch& L, uint64_t block, const std::string& e) {
    std::lock_guard<std::mutex> lock(L.err_mutex);
    if (block < L.err_block) L.err_block = block, L.error = e;  // the lowest failing block wins
    L.failed = true;
}

// The shared-memory arena of one OS thread: every usable byte, the red zones between regions.
constexpr size_t kArenaCap = kSharedLimit + 64 * 1024;

void worker(Launch& L) {
    Block b;
    b.kernel = L.kernel;
    b.params = L.params;
    b.launch = &L;
    b.nthreads = L.block.x * L.block.y * L.block.z;
    b.fibers.resize(b.nthreads);
    b.warps.resize((b.nthreads + 31) / 32);
    std::unique_ptr<unsigned char[]> arena(new unsigned char[kArenaCap]);
    b.arena = arena.get();
    b.arena_cap = kArenaCap;
    b.dyn_bytes = L.dyn_shared;
    for (unsigned i = 0; i < b.nthreads; ++i) {
        Fiber& f = b.fibers[i];
        f.tid = (uint16_t)i;
        f.lane = (uint8_t)(i % 32);
        f.warp = (uint16_t)(i / 32);
        f.b.thread_idx = uint3{i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y)};
        f.b.block_dim = L.block;
        f.b.grid_dim = L.grid;
        b.warps[f.warp].exists |= 1u << f.lane;
    }
    std::string err;
    if (!take_stacks(b.fibers, err)) {
        record(L, 0, err);
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
        b.linear = i;
        for (Fiber& f : b.fibers) f.b.block_idx = bi;
        if (!run_block(b)) {
            record(L, i, b.error);
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

const KernelEntry* find_kernel(const char* symbol) {
    size_t count = 0;
    const KernelEntry* table = steel_emu_registry(&count);
    for (size_t i = 0; i < count; ++i)
        if (std::strcmp(table[i].symbol, symbol) == 0) return &table[i];
    return nullptr;
}

// The driver's checks of a launch configuration, as `cuLaunchKernel` makes them on sm_90.
std::string validate(const KernelEntry& k, const unsigned* grid, const unsigned* block,
                     size_t dyn_shared, const steel_emu_options& opt) {
    const uint64_t threads = (uint64_t)block[0] * block[1] * block[2];
    if (threads == 0 || block[0] > 1024 || block[1] > 1024 || block[2] > 64 || threads > kMaxThreads ||
        grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 0x7fffffffu || grid[1] > 65535 ||
        grid[2] > 65535)
        return fmt("kernel %s: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u) "
                   "(block ≤ 1024 threads, x, y ≤ 1024, z ≤ 64; grid x < 2^31, y, z ≤ 65535)",
                   k.symbol, grid[0], grid[1], grid[2], block[0], block[1], block[2]);
    if (threads > k.max_threads)
        return fmt("kernel %s: a block of %llu threads exceeds its __launch_bounds__(%u) (the "
                   "device refuses the launch: too many resources requested)",
                   k.symbol, (unsigned long long)threads, k.max_threads);
    if (opt.dyn_shared_optin > kSharedLimit)
        return fmt("kernel %s: the dynamic shared memory opt-in of %u bytes exceeds the device's "
                   "%zu bytes per block",
                   k.symbol, opt.dyn_shared_optin, kSharedLimit);
    if (dyn_shared > kDefaultDynShared && dyn_shared > opt.dyn_shared_optin)
        return fmt("kernel %s: %zu bytes of dynamic shared memory exceed 48 KiB without the "
                   "per-kernel opt-in (cuFuncSetAttribute MAX_DYNAMIC_SHARED_SIZE_BYTES, "
                   "Gpu::opt_in_dynamic_shared; opted in: %u bytes)",
                   k.symbol, dyn_shared, opt.dyn_shared_optin);
    return "";
}
}  // namespace

// Runs kernel `symbol` over the grid and returns 0, or nonzero with a message in `err`.
// Synchronous: every block has finished when it returns.
extern "C" int steel_emu_launch(const char* symbol, const unsigned* grid, const unsigned* block,
                                size_t dyn_shared, const void* params, size_t param_bytes,
                                const steel_emu_options* opt, char* err, size_t errlen) {
    const KernelEntry* k = find_kernel(symbol);
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
    const std::string bad = validate(*k, grid, block, dyn_shared, *opt);
    if (!bad.empty()) {
        set_err(err, errlen, bad);
        return 1;
    }
    Launch L;
    L.kernel = k;
    L.params = params;
    L.grid = dim3{grid[0], grid[1], grid[2]};
    L.block = dim3{block[0], block[1], block[2]};
    L.dyn_shared = dyn_shared;
    L.opt = *opt;
    L.nblocks = (uint64_t)grid[0] * grid[1] * grid[2];
    L.allocs = alloc_table();
    if ((Check)opt->check == Check::Full) L.shadow = global_shadow_new(L);
    unsigned nw = (unsigned)std::min<uint64_t>(worker_threads(), L.nblocks);
    if (nw <= 1) {
        worker(L);
    } else {
        std::vector<std::thread> pool;
        pool.reserve(nw);
        for (unsigned i = 0; i < nw; ++i) pool.emplace_back([&L] { worker(L); });
        for (std::thread& t : pool) t.join();
    }
    global_shadow_free(L.shadow);
    if (!L.failed) {
        const std::string damage = check_canaries(*L.allocs, opt->owner);
        if (!damage.empty()) {
            L.failed = true;
            L.error = fmt("kernel %s wrote outside its allocations: ", symbol) + damage;
        }
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
// The `__launch_bounds__` of kernel i (its largest block).
extern "C" unsigned steel_emu_kernel_bounds(size_t i) {
    size_t count = 0;
    const KernelEntry* table = steel_emu_registry(&count);
    return i < count ? table[i].max_threads : 0;
}

// The emulator's memory checker: the shared-memory arena, happens-before race detection,
// uninitialised shared reads, out-of-bounds accesses.
//
// How accesses are seen: build.rs compiles the kernels (not this runtime) with g++'s
// `-fsanitize=thread` instrumentation, which calls `__tsan_read4(addr)`, `__tsan_write16(addr)`,
// … before every load and store that may touch memory outside the thread's own stack. The
// ThreadSanitizer runtime is never linked: the hooks below are ours, and they know CUDA blocks
// and threads (the running fiber), not OS threads. ldmatrix and cp.async, which the emulator
// performs itself, report their accesses here directly.
//
// The model (Check::Full; Check::Shared leaves out the global-memory shadow; Check::Off turns
// the hooks off):
// - Shared memory is one arena per block: every STEEL_SHARED declaration and the dynamic buffer
//   is a region, poisoned with 0xFF when the block starts (or the declaration is first reached),
//   separated by red zones; an access to a red zone or beyond is out of bounds, naming the nearest
//   region. Reading a byte no thread of the block has written is an uninitialised read.
// - Happens-before: a block's `__syncthreads` starts a new epoch (epochs count barriers and are
//   monotonic over an OS thread's blocks, so a previous block's history is simply old); within an
//   epoch, the lanes of a warp are ordered by `__syncwarp` through 32×32 vector clocks (a lane's
//   stamp is its own clock entry). Accesses of different warps in one epoch are never ordered;
//   accesses of different blocks in one launch are never ordered.
// - Every byte keeps its last write and its reads since (one reader; several lanes of one warp,
//   with each lane's stamp; several warps; several blocks). A write after an unordered read
//   (write-after-read), a read after an unordered write (read-after-write) and two unordered
//   writes (write-after-write) fail the launch with a report naming the kernel, the block, both
//   threads, the address (shared region or allocation + offset) and, where the code offsets can
//   be resolved, both source lines.
// - Global memory has one shadow per launch, built on first touch per 1 KiB of an allocation,
//   shared by the OS threads (a spin lock per page); its size is capped (STEEL_EMU_SHADOW_MB,
//   default 4096): past it the launch fails and says how to check shared memory only.
// - Atomics are checked for bounds only: atomics do not race with each other, and a mix of atomic
//   and plain accesses to one address is not reported (our kernels use no float atomics at all).
#include <algorithm>
#include <cstdlib>

#include "internal.h"

namespace steel_emu {
namespace {

constexpr size_t kRedZone = 64;
constexpr size_t kShadowPage = 1024;

struct ShadowPage {
    std::atomic<bool> lock;
    Cell cells[kShadowPage];
};

struct PageTable {
    size_t npages;
    std::atomic<ShadowPage*> pages[1];  // npages of them
};

size_t shadow_cap_bytes() {
    static const size_t cap = [] {
        size_t mb = 4096;
        if (const char* e = std::getenv("STEEL_EMU_SHADOW_MB")) {
            long v = std::strtol(e, nullptr, 10);
            if (v > 0) mb = (size_t)v;
        }
        return mb << 20;
    }();
    return cap;
}

const char* basename_of(const char* path) {
    const char* s = std::strrchr(path, '/');
    return s ? s + 1 : path;
}

size_t round16(size_t n) { return (n + 15) / 16 * 16; }

}  // namespace

struct GlobalShadow {
    const AllocTable* table;
    std::unique_ptr<std::atomic<PageTable*>[]> tables;  // one per allocation of the table
    std::atomic<size_t> bytes{0};
};

GlobalShadow* global_shadow_new(const Launch& L) {
    auto* s = new GlobalShadow;
    s->table = L.allocs.get();
    const size_t n = s->table->allocs.size();
    s->tables.reset(new std::atomic<PageTable*>[n]);
    for (size_t i = 0; i < n; ++i) s->tables[i].store(nullptr, std::memory_order_relaxed);
    return s;
}

void global_shadow_free(GlobalShadow* s) {
    if (!s) return;
    for (size_t i = 0; i < s->table->allocs.size(); ++i) {
        PageTable* t = s->tables[i].load();
        if (!t) continue;
        for (size_t p = 0; p < t->npages; ++p) std::free(t->pages[p].load());
        std::free(t);
    }
    delete s;
}

namespace {

// The shadow page of `a` holding byte `off` of it (created on first touch), or null past the cap.
ShadowPage* shadow_page(GlobalShadow& s, const Alloc& a, size_t off) {
    std::atomic<PageTable*>& slot = s.tables[s.table->index_of(&a)];
    PageTable* t = slot.load(std::memory_order_acquire);
    if (!t) {
        const size_t n = (a.size + kShadowPage - 1) / kShadowPage;
        auto* fresh = static_cast<PageTable*>(
            std::calloc(1, sizeof(PageTable) + n * sizeof(std::atomic<ShadowPage*>)));
        fresh->npages = n;
        if (slot.compare_exchange_strong(t, fresh, std::memory_order_acq_rel)) {
            t = fresh;
        } else {
            std::free(fresh);
        }
    }
    std::atomic<ShadowPage*>& ps = t->pages[off / kShadowPage];
    ShadowPage* p = ps.load(std::memory_order_acquire);
    if (!p) {
        if (s.bytes.load(std::memory_order_relaxed) + sizeof(ShadowPage) > shadow_cap_bytes())
            return nullptr;
        auto* fresh = static_cast<ShadowPage*>(std::calloc(1, sizeof(ShadowPage)));
        if (ps.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) {
            p = fresh;
            s.bytes.fetch_add(sizeof(ShadowPage), std::memory_order_relaxed);
        } else {
            std::free(fresh);
        }
    }
    return p;
}

// The accessing thread, as the cells need it.
struct Ctx {
    Block* b;
    Warp* w;
    uint32_t epoch, first, stamp, block;  // block: launch-linear + 1
    uint16_t tid, warp;
    uint8_t lane;
    int32_t pc;
};

Ctx ctx_of(Block& b, const void* pc) {
    Fiber& f = *b.cur;
    Warp& w = b.warps[f.warp];
    return Ctx{&b, &w, b.epoch, b.first_epoch, w.vc[f.lane][f.lane], (uint32_t)(b.linear + 1),
               f.tid, f.warp, f.lane, code_offset(pc)};
}

// Whether an earlier access of this block (thread `tid` at `epoch`, lane stamp `stamp`)
// happens before the current thread's present.
bool ordered(const Ctx& c, uint16_t tid, uint32_t epoch, uint32_t stamp) {
    if (epoch < c.epoch || tid == c.tid) return true;
    if (tid / 32 != c.warp) return false;
    return c.w->vc[c.lane][tid % 32] > stamp;
}

enum class Hazard : uint8_t { None, ReadAfterWrite, WriteAfterRead, WriteAfterWrite, Uninit };

struct Conflict {
    Hazard hazard = Hazard::None;
    uint32_t block = 0;  // the other access's block + 1
    uint16_t tid = 0;
    int32_t pc = INT32_MIN;
};

// Checks an access of the byte `c` against its history and records it; the first conflict is
// returned (and the byte left as it was).
Conflict touch(Cell& c, const Ctx& x, bool write, bool global) {
    Conflict k;
    const auto other = [&](Hazard h, uint32_t block, uint16_t tid, int32_t pc) {
        k.hazard = h;
        k.block = block;
        k.tid = tid;
        k.pc = pc;
        return k;
    };
    // The last write.
    const bool written = global ? c.w_block != 0 : c.w_epoch >= x.first;
    if (written) {
        const Hazard h = write ? Hazard::WriteAfterWrite : Hazard::ReadAfterWrite;
        if (c.w_block != x.block) return other(h, c.w_block, c.w_tid, c.w_pc);
        if (!ordered(x, c.w_tid, c.w_epoch, c.w_stamp)) return other(h, c.w_block, c.w_tid, c.w_pc);
    } else if (!global && !write) {
        return other(Hazard::Uninit, 0, 0, INT32_MIN);
    }
    const bool other_block_read =
        global && c.r_kind != kNoRead && (c.r_kind == kManyBlocks || c.r_block != x.block);
    const bool live_read = c.r_kind != kNoRead && !other_block_read && c.r_epoch == x.epoch &&
                           c.r_epoch >= x.first;
    if (write) {
        const Hazard h = Hazard::WriteAfterRead;
        if (other_block_read) {
            if (c.r_block != x.block) return other(h, c.r_block, c.r_tid, c.r_pc);
            return other(h, c.r_block2, c.r_tid2, INT32_MIN);
        }
        if (live_read) {
            switch (c.r_kind) {
                case kOneReader:
                    if (!ordered(x, c.r_tid, c.r_epoch, c.r_stamp))
                        return other(h, c.r_block, c.r_tid, c.r_pc);
                    break;
                case kWarpReaders: {
                    if (c.r_tid / 32 != x.warp) return other(h, c.r_block, c.r_tid, c.r_pc);
                    const StampSet& s = x.b->stamp_sets[c.r_stamp];
                    for (unsigned l = 0; l < 32; ++l)
                        if (((s.mask >> l) & 1u) && l != x.lane && x.w->vc[x.lane][l] <= s.stamps[l])
                            return other(h, c.r_block, (uint16_t)(x.warp * 32 + l),
                                         c.r_tid % 32 == l ? c.r_pc : INT32_MIN);
                    break;
                }
                case kManyWarps:
                    if (c.r_tid / 32 != x.warp) return other(h, c.r_block, c.r_tid, c.r_pc);
                    return other(h, c.r_block, c.r_tid2, INT32_MIN);
                default:
                    break;
            }
        }
        c.w_epoch = x.epoch;
        c.w_stamp = x.stamp;
        c.w_block = x.block;
        c.w_tid = x.tid;
        c.w_pc = x.pc;
        c.r_kind = kNoRead;
        return k;
    }
    // Record the read.
    if (other_block_read) {
        if (c.r_kind != kManyBlocks) {
            c.r_kind = kManyBlocks;
            c.r_block2 = x.block;
            c.r_tid2 = x.tid;
        }
        return k;
    }
    if (!live_read) {
        c.r_kind = kOneReader;
        c.r_epoch = x.epoch;
        c.r_block = x.block;
        c.r_tid = x.tid;
        c.r_stamp = x.stamp;
        c.r_pc = x.pc;
        return k;
    }
    switch (c.r_kind) {
        case kOneReader:
            if (c.r_tid == x.tid) {
                c.r_stamp = x.stamp;
                c.r_pc = x.pc;
            } else if (c.r_tid / 32 == x.warp) {
                StampSet s{};
                s.mask = (1u << (c.r_tid % 32)) | (1u << x.lane);
                s.stamps[c.r_tid % 32] = c.r_stamp;
                s.stamps[x.lane] = x.stamp;
                c.r_stamp = (uint32_t)x.b->stamp_sets.size();
                x.b->stamp_sets.push_back(s);
                c.r_kind = kWarpReaders;
            } else {
                c.r_kind = kManyWarps;
                c.r_tid2 = x.tid;
            }
            break;
        case kWarpReaders:
            if (c.r_tid / 32 == x.warp) {
                StampSet& s = x.b->stamp_sets[c.r_stamp];
                s.mask |= 1u << x.lane;
                s.stamps[x.lane] = x.stamp;
            } else {
                c.r_kind = kManyWarps;
                c.r_tid2 = x.tid;
            }
            break;
        default:
            break;
    }
    return k;
}

// ---- reports -----------------------------------------------------------------------------------

const SharedRegion* region_at(const Block& b, size_t off) {
    for (const SharedRegion& r : b.regions)
        if (off >= r.off && off < (size_t)r.off + r.bytes) return &r;
    return nullptr;
}

std::string region_name(const SharedRegion& r) {
    if (!r.site) return fmt("dynamic shared memory (%u bytes)", r.bytes);
    return fmt("shared `%s` (%u bytes, %s:%d)", r.site->name, r.bytes, basename_of(r.site->file),
               r.site->line);
}

// "offset 96 of shared `as` (…)" for a byte of the arena, usable or not.
std::string shared_place(const Block& b, size_t off) {
    if (const SharedRegion* r = region_at(b, off))
        return fmt("offset %zu of %s", off - r->off, region_name(*r).c_str());
    // Out of bounds: relative to the nearest region before it, else after it.
    const SharedRegion* best = nullptr;
    for (const SharedRegion& r : b.regions)
        if ((size_t)r.off + r.bytes <= off && (!best || r.off > best->off)) best = &r;
    if (best) return fmt("offset %zu of %s", off - best->off, region_name(*best).c_str());
    for (const SharedRegion& r : b.regions)
        if (r.off > off && (!best || r.off < best->off)) best = &r;
    if (best)
        return fmt("offset -%zu of %s", (size_t)best->off - off, region_name(*best).c_str());
    return fmt("byte %zu of the block's shared memory, where nothing is declared", off);
}

std::string global_place(const Alloc& a, uintptr_t addr) {
    return fmt("offset %lld of device allocation #%llu (%zu bytes)", (long long)(addr - a.base),
               (unsigned long long)a.id, a.size);
}

const char* verb(bool write) { return write ? "writes" : "reads"; }

[[noreturn]] void report(const Ctx& x, const Conflict& k, bool write, size_t n,
                         const std::string& place) {
    const Block& b = *x.b;
    const std::string me = fmt("thread %s", thread_name(b, x.tid).c_str());
    std::string msg = where(b) + ": ";
    if (k.hazard == Hazard::Uninit) {
        msg += fmt("%s %s %zu bytes of uninitialised shared memory at %s%s: no thread of this "
                   "block wrote them (shared memory holds garbage at every block start)",
                   me.c_str(), verb(false), n, place.c_str(), source_marker(b, x.pc).c_str());
        fail_block(msg);
    }
    const char* hazard = k.hazard == Hazard::ReadAfterWrite   ? "read-after-write"
                         : k.hazard == Hazard::WriteAfterRead ? "write-after-read"
                                                              : "write-after-write";
    const bool cross = k.block != x.block;
    const std::string them =
        cross ? fmt("thread %s of block %s", thread_name(b, k.tid).c_str(),
                    block_name(*b.launch, k.block - 1).c_str())
              : fmt("thread %s", thread_name(b, k.tid).c_str());
    msg += fmt("data race (%s) at %s: %s %s %zu bytes%s; %s %s %s%s, ", hazard, place.c_str(),
               me.c_str(), verb(write), n, source_marker(b, x.pc).c_str(), them.c_str(),
               k.hazard == Hazard::WriteAfterRead ? "read" : "wrote",
               n == 1 ? "it" : "them", source_marker(b, k.pc).c_str());
    msg += cross ? "and blocks are never ordered within a launch"
                 : "with no barrier between them (__syncthreads, or __syncwarp within a warp, "
                   "orders memory; shuffles, votes, ldmatrix and mma do not)";
    fail_block(msg);
}

// The kinds of arena bytes [off, off + n): reports a red zone or a pending cp.async.
void check_kinds(const Ctx& x, const char* what, size_t off, size_t n, bool write) {
    const Block& b = *x.b;
    for (size_t i = 0; i < n; ++i) {
        const size_t o = off + i;
        const unsigned char k = o < b.skind.size() ? b.skind[o] : (unsigned char)kUnusable;
        if (k == kUsable) continue;
        const std::string me = fmt("thread %s", thread_name(b, x.tid).c_str());
        if (k == kAsyncPending) {
            std::string owner = "a thread";
            for (const Fiber& f : b.fibers)
                for (const AsyncCopy& c : f.async)
                    if ((size_t)(c.dst - b.arena) <= o && o < (size_t)(c.dst - b.arena) + c.bytes)
                        owner = fmt("thread %s", thread_name(b, f.tid).c_str());
            fail_block(where(b) + fmt(": %s %s %zu bytes at %s%s, which a cp.async of %s has not "
                                      "yet written: a cp.async.wait_group (cp_async_wait) and a "
                                      "barrier must come between",
                                      me.c_str(), verb(write), n, shared_place(b, o).c_str(),
                                      source_marker(b, x.pc).c_str(), owner.c_str()));
        }
        const std::string who = what ? fmt("%s of %s", what, me.c_str()) : me;
        fail_block(where(b) + fmt(": out-of-bounds shared memory access: %s %s %zu bytes at %s%s",
                                  who.c_str(), verb(write), n, shared_place(b, o).c_str(),
                                  source_marker(b, x.pc).c_str()));
    }
}

void shared_cells(const Ctx& x, size_t off, size_t n, bool write) {
    Block& b = *x.b;
    for (size_t i = 0; i < n; ++i) {
        const Conflict k = touch(b.scells[off + i], x, write, false);
        if (k.hazard != Hazard::None) report(x, k, write, n, shared_place(b, off + i));
    }
}

void global_access(Block& b, const Alloc& a, uintptr_t addr, size_t n, bool write, const void* pc) {
    const Ctx x = ctx_of(b, pc);
    if (addr < a.base || addr + n > a.base + a.size)
        fail_block(where(b) + fmt(": out-of-bounds global memory access: thread %s %s %zu bytes "
                                  "at %s%s",
                                  thread_name(b, x.tid).c_str(), verb(write), n,
                                  global_place(a, addr).c_str(), source_marker(b, x.pc).c_str()));
    if ((Check)b.launch->opt.check != Check::Full) return;
    GlobalShadow& s = *b.launch->shadow;
    size_t done = 0;
    while (done < n) {
        const size_t off = addr + done - a.base;
        ShadowPage* p = shadow_page(s, a, off);
        if (!p)
            fail_block(where(b) + fmt(": the race detector's global-memory shadow of this launch "
                                      "exceeds %zu MiB (STEEL_EMU_SHADOW_MB); raise it, or set "
                                      "STEEL_EMU_CHECK=shared to check shared memory only",
                                      shadow_cap_bytes() >> 20));
        const size_t in_page = std::min(n - done, kShadowPage - off % kShadowPage);
        while (p->lock.exchange(true, std::memory_order_acquire)) {
        }
        Conflict k;
        size_t at = 0;
        for (size_t i = 0; i < in_page && k.hazard == Hazard::None; ++i) {
            k = touch(p->cells[off % kShadowPage + i], x, write, true);
            at = i;
        }
        p->lock.store(false, std::memory_order_release);
        if (k.hazard != Hazard::None) report(x, k, write, n, global_place(a, addr + done + at));
        done += in_page;
    }
}

}  // namespace

// ---- the arena ---------------------------------------------------------------------------------

namespace {
void arena_reserve(Block& b, size_t end) {
    if (b.skind.size() < end) {
        b.skind.resize(end, kUnusable);
        b.scells.resize(end, Cell{});
    }
    b.arena_high = std::max(b.arena_high, end);
}
}  // namespace

void checker_block_start(Block& b) {
    b.epoch++;
    b.first_epoch = b.epoch;
    std::fill(b.skind.begin(), b.skind.end(), (unsigned char)kUnusable);
    b.regions.clear();
    b.static_bytes = 0;
    b.arena_used = 0;
    b.stamp_sets.clear();
    b.last_alloc = nullptr;
    for (Warp& w : b.warps) std::memset(w.vc, 0, sizeof w.vc), w.vc_dirty = false;
    if (b.dyn_bytes) {
        b.regions.push_back(SharedRegion{nullptr, 0, (uint32_t)b.dyn_bytes});
        b.arena_used = round16(b.dyn_bytes) + kRedZone;
        arena_reserve(b, b.arena_used);
        std::memset(b.arena, 0xFF, b.dyn_bytes);
        std::fill(b.skind.begin(), b.skind.begin() + (ptrdiff_t)b.dyn_bytes, (unsigned char)kUsable);
    }
}

void checker_block_barrier(Block& b) {
    b.epoch++;
    b.stamp_sets.clear();
    for (Warp& w : b.warps)
        if (w.vc_dirty) std::memset(w.vc, 0, sizeof w.vc), w.vc_dirty = false;
}

void* shared_static(const SharedSite* site, size_t bytes, size_t align) {
    Block& b = *tls_block;
    for (const SharedRegion& r : b.regions)
        if (r.site == site) return b.arena + r.off;
    // The first thread to reach the declaration in this block allocates it.
    const size_t off = (b.arena_used + std::max<size_t>(align, 16) - 1) / std::max<size_t>(align, 16) *
                       std::max<size_t>(align, 16);
    const std::string decl =
        fmt("`%s` (%s:%d, %zu bytes)", site->name, basename_of(site->file), site->line, bytes);
    if (b.static_bytes + bytes > kStaticSharedLimit)
        fail_block(where(b) + fmt(": static shared memory exceeds the 48 KiB a block may declare "
                                  "(%zu bytes with %s); use dynamic shared memory and the opt-in",
                                  b.static_bytes + bytes, decl.c_str()));
    const size_t limit = b.launch->opt.dyn_shared_optin ? kSharedLimit : kDefaultDynShared;
    if (b.static_bytes + bytes + b.dyn_bytes > limit)
        fail_block(where(b) + fmt(": static (%zu bytes with %s) and dynamic (%zu bytes) shared "
                                  "memory exceed the block's %zu bytes%s",
                                  b.static_bytes + bytes, decl.c_str(), b.dyn_bytes, limit,
                                  limit == kSharedLimit ? "" : " (without the opt-in)"));
    if (off + bytes + kRedZone > b.arena_cap)
        fail_block(where(b) + fmt(": too many shared declarations for the emulator's arena (%s)",
                                  decl.c_str()));
    b.regions.push_back(SharedRegion{site, (uint32_t)off, (uint32_t)bytes});
    b.static_bytes += bytes;
    b.arena_used = off + bytes + kRedZone;
    arena_reserve(b, b.arena_used);
    std::memset(b.arena + off, 0xFF, bytes);
    std::fill(b.skind.begin() + (ptrdiff_t)off, b.skind.begin() + (ptrdiff_t)(off + bytes),
              (unsigned char)kUsable);
    return b.arena + off;
}

bool in_shared(const Block& b, uintptr_t addr, size_t n) {
    const uintptr_t lo = (uintptr_t)b.arena;
    return addr >= lo && addr + n <= lo + b.arena_cap;
}

void shared_access(const char* what, uintptr_t addr, size_t n, bool write, const void* pc) {
    Block& b = *tls_block;
    const Ctx x = ctx_of(b, pc);
    if (!in_shared(b, addr, n))
        fail_block(where(b) + fmt(", thread %s: %s address %#llx is not in the block's shared "
                                  "memory%s",
                                  thread_name(b, x.tid).c_str(), what, (unsigned long long)addr,
                                  source_marker(b, x.pc).c_str()));
    const size_t off = addr - (uintptr_t)b.arena;
    check_kinds(x, what, off, n, write);
    if ((Check)b.launch->opt.check != Check::Off) shared_cells(x, off, n, write);
}

void shared_mark(uintptr_t addr, size_t n, SharedKind kind, const void* pc) {
    Block& b = *tls_block;
    const size_t off = addr - (uintptr_t)b.arena;
    if (kind == kAsyncPending) check_kinds(ctx_of(b, pc), "cp.async", off, n, true);
    std::fill(b.skind.begin() + (ptrdiff_t)off, b.skind.begin() + (ptrdiff_t)(off + n),
              (unsigned char)kind);
}

void global_bounds(const char* what, uintptr_t addr, size_t n, const void* pc) {
    Block& b = *tls_block;
    const Alloc* a = b.launch->allocs->find(addr);
    const std::string me = fmt("thread %s", thread_name(b, b.cur->tid).c_str());
    if (!a)
        fail_block(where(b) + fmt(": %s %#llx of %s is not device memory%s", what,
                                  (unsigned long long)addr, me.c_str(),
                                  source_marker(b, code_offset(pc)).c_str()));
    if (addr < a->base || addr + n > a->base + a->size)
        fail_block(where(b) + fmt(": out-of-bounds global memory access: %s of %s, %zu bytes at "
                                  "%s%s",
                                  what, me.c_str(), n, global_place(*a, addr).c_str(),
                                  source_marker(b, code_offset(pc)).c_str()));
}

// An access the compiler emitted as naturally aligned (a `float4`-style vector load, a word) at an
// address that is not: the device faults with a misaligned-address error, so the emulator does too.
void misaligned(uintptr_t addr, size_t n, bool write, const void* pc) {
    Block* b = tls_block;
    if (!b || !b->cur || (Check)b->launch->opt.check == Check::Off) return;
    fail_block(where(*b) + fmt(", thread %s: misaligned %zu-byte %s at %#llx (the device requires "
                               "%zu-byte alignment)%s",
                               thread_name(*b, b->cur->tid).c_str(), n, write ? "store" : "load",
                               (unsigned long long)addr, n,
                               source_marker(*b, code_offset(pc)).c_str()));
}

void on_access(uintptr_t addr, size_t n, bool write, const void* pc) {
    Block* b = tls_block;
    if (!b || !b->cur || n == 0 || (Check)b->launch->opt.check == Check::Off) return;
    const uintptr_t lo = (uintptr_t)b->arena;
    if (addr - lo < b->arena_cap) {
        const Ctx x = ctx_of(*b, pc);
        const size_t off = addr - lo;
        check_kinds(x, nullptr, off, n, write);
        shared_cells(x, off, n, write);
        return;
    }
    const Fiber& f = *b->cur;
    if (addr - (uintptr_t)f.stack.lo < f.stack.size) return;  // the thread's own stack
    const Alloc* a = b->last_alloc;
    if (!a || addr < a->map_lo || addr >= a->map_hi) {
        a = b->launch->allocs->find(addr);
        if (!a) return;  // host memory: parameters, the emulator's own state
        b->last_alloc = a;
    }
    global_access(*b, *a, addr, n, write, pc);
}

}  // namespace steel_emu

// ---- the ThreadSanitizer instrumentation ABI, implemented by the checker -----------------------

using steel_emu::misaligned;
using steel_emu::on_access;

#define STEEL_TSAN_RW(N)                                                                         \
    extern "C" void __tsan_read##N(void* a) {                                                    \
        if ((uintptr_t)a % N) misaligned((uintptr_t)a, N, false, __builtin_return_address(0));   \
        on_access((uintptr_t)a, N, false, __builtin_return_address(0));                          \
    }                                                                                            \
    extern "C" void __tsan_write##N(void* a) {                                                   \
        if ((uintptr_t)a % N) misaligned((uintptr_t)a, N, true, __builtin_return_address(0));    \
        on_access((uintptr_t)a, N, true, __builtin_return_address(0));                           \
    }                                                                                            \
    extern "C" void __tsan_unaligned_read##N(void* a) {                                          \
        on_access((uintptr_t)a, N, false, __builtin_return_address(0));                          \
    }                                                                                            \
    extern "C" void __tsan_unaligned_write##N(void* a) {                                         \
        on_access((uintptr_t)a, N, true, __builtin_return_address(0));                           \
    }                                                                                            \
    extern "C" void __tsan_volatile_read##N(void* a) {                                           \
        on_access((uintptr_t)a, N, false, __builtin_return_address(0));                          \
    }                                                                                            \
    extern "C" void __tsan_volatile_write##N(void* a) {                                          \
        on_access((uintptr_t)a, N, true, __builtin_return_address(0));                           \
    }
STEEL_TSAN_RW(1)
STEEL_TSAN_RW(2)
STEEL_TSAN_RW(4)
STEEL_TSAN_RW(8)
STEEL_TSAN_RW(16)
#undef STEEL_TSAN_RW

extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_read_range(void* a, unsigned long n) {
    on_access((uintptr_t)a, n, false, __builtin_return_address(0));
}
extern "C" void __tsan_write_range(void* a, unsigned long n) {
    on_access((uintptr_t)a, n, true, __builtin_return_address(0));
}

namespace {
// An atomic of a kernel: performed sequentially consistent, checked for bounds only.
void atomic_bounds(const volatile void* a, size_t n, const void* pc) {
    steel_emu::Block* b = steel_emu::tls_block;
    if (!b || !b->cur || (steel_emu::Check)b->launch->opt.check == steel_emu::Check::Off) return;
    const uintptr_t addr = (uintptr_t)a;
    if (addr - (uintptr_t)b->arena < b->arena_cap || addr - (uintptr_t)b->cur->stack.lo < b->cur->stack.size)
        return;
    if (b->launch->allocs->find(addr)) steel_emu::global_bounds("an atomic", addr, n, pc);
}
}  // namespace

#define STEEL_TSAN_ATOMIC(N, T)                                                                  \
    extern "C" T __tsan_atomic##N##_load(const volatile T* a, int) {                             \
        atomic_bounds(a, sizeof(T), __builtin_return_address(0));                                \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                             \
    }                                                                                            \
    extern "C" void __tsan_atomic##N##_store(volatile T* a, T v, int) {                          \
        atomic_bounds(a, sizeof(T), __builtin_return_address(0));                                \
        __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                \
    }                                                                                            \
    extern "C" T __tsan_atomic##N##_exchange(volatile T* a, T v, int) {                          \
        atomic_bounds(a, sizeof(T), __builtin_return_address(0));                                \
        return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                      \
    }                                                                                            \
    extern "C" T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) {                         \
        atomic_bounds(a, sizeof(T), __builtin_return_address(0));                                \
        return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                       \
    }                                                                                            \
    extern "C" T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) {                         \
        atomic_bounds(a, sizeof(T), __builtin_return_address(0));                                \
        return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                       \
    }                                                                                            \
    extern "C" T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) {                         \
        atomic_bounds(a, sizeof(T), __builtin_return_address(0));                                \
        return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                       \
    }                                                                                            \
    extern "C" T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) {                          \
        atomic_bounds(a, sizeof(T), __builtin_return_address(0));                                \
        return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                        \
    }                                                                                            \
    extern "C" T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) {                         \
        atomic_bounds(a, sizeof(T), __builtin_return_address(0));                                \
        return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                       \
    }                                                                                            \
    extern "C" T __tsan_atomic##N##_fetch_nand(volatile T* a, T v, int) {                        \
        atomic_bounds(a, sizeof(T), __builtin_return_address(0));                                \
        return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                      \
    }                                                                                            \
    extern "C" bool __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int,    \
                                                                int) {                           \
        atomic_bounds(a, sizeof(T), __builtin_return_address(0));                                \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);  \
    }                                                                                            \
    extern "C" bool __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int,      \
                                                              int) {                             \
        atomic_bounds(a, sizeof(T), __builtin_return_address(0));                                \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);   \
    }                                                                                            \
    extern "C" T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {    \
        atomic_bounds(a, sizeof(T), __builtin_return_address(0));                                \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);        \
        return c;                                                                                \
    }
STEEL_TSAN_ATOMIC(8, uint8_t)
STEEL_TSAN_ATOMIC(16, uint16_t)
STEEL_TSAN_ATOMIC(32, uint32_t)
STEEL_TSAN_ATOMIC(64, uint64_t)
#undef STEEL_TSAN_ATOMIC

extern "C" void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

// The emulator's internal model, shared by its three parts:
//   emu.cpp     fibers, the schedules, barriers, warp collectives, ldmatrix / mma, cp.async, launch
//   check.cpp   the memory checker: the shared-memory arena, happens-before race detection,
//               uninitialised and out-of-bounds accesses (the `__tsan_*` hooks the kernels call)
//   memory.cpp  device allocations: guard pages, canaries, the table the checker looks up
// None of it is seen by the kernels, which only see shim.h.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "registry.h"
#include "shim.h"

namespace steel_emu {

// ---- launch options (mirrored by `EmuOptions` in kernels-cu/src/lib.rs) ------------------------

enum class Schedule : uint32_t { RoundRobin = 0, Reverse = 1, WarpMajor = 2, Random = 3 };
enum class Check : uint32_t { Off = 0, Shared = 1, Full = 2 };

}  // namespace steel_emu

struct steel_emu_options {
    uint32_t schedule;           // steel_emu::Schedule
    uint32_t check;              // steel_emu::Check
    uint64_t seed;               // of Schedule::Random
    uint64_t owner;              // allocations whose canaries are checked after the launch
    uint32_t dyn_shared_optin;   // the kernel's opted-in dynamic shared memory (0: 48 KiB)
    uint32_t pad;
};

namespace steel_emu {

// ---- device limits (sm_90) ---------------------------------------------------------------------

constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStaticSharedLimit = 48 * 1024;     // static __shared__ per block
constexpr size_t kDefaultDynShared = 48 * 1024;      // dynamic shared without the opt-in
constexpr size_t kSharedLimit = 227 * 1024;          // static + dynamic, with the opt-in

// ---- allocations (memory.cpp) ------------------------------------------------------------------

// One device allocation: [base, base + size) usable, surrounded inside its mapping by canary
// bytes, with PROT_NONE guard pages at both ends of the mapping.
struct Alloc {
    uintptr_t map_lo = 0, map_hi = 0;  // the whole mapping, guard pages included
    uintptr_t base = 0;
    size_t size = 0;
    uint64_t id = 0;     // allocation number, for reports
    uint64_t owner = 0;  // the EmuGpu that made it
};

// An immutable snapshot of every live allocation, sorted by map_lo (a launch holds one).
struct AllocTable {
    std::vector<Alloc> allocs;
    const Alloc* find(uintptr_t addr) const;  // the allocation whose mapping holds addr
    size_t index_of(const Alloc* a) const { return (size_t)(a - allocs.data()); }
};
std::shared_ptr<const AllocTable> alloc_table();
// Canary damage of `owner`'s allocations, as a report ("" when intact).
std::string check_canaries(const AllocTable& t, uint64_t owner);

// ---- warp collectives --------------------------------------------------------------------------

enum class Coll : uint8_t { SyncWarp, Shuffle, Vote, Ldmatrix, Mma };
const char* coll_name(Coll c);

// One warp collective in flight: opened by the first lane of its mask to arrive, complete when
// every lane of the mask has arrived; its words stay readable until each lane's next collective.
struct Exchange {
    uint64_t seq = 0;  // the warp's exchange number
    Coll kind = Coll::SyncWarp;
    unsigned mask = 0, arrived = 0;
    int refs = 0;  // lanes that may still read `words`
    uint64_t words[32][4];
};

// ---- memory checker state (check.cpp) ----------------------------------------------------------

// The history of one byte within a launch: its last write and the reads since.
struct Cell {
    uint32_t w_epoch, w_stamp, w_block;  // w_block: launch-linear block + 1 (0: no write)
    int32_t w_pc;
    uint32_t r_epoch, r_stamp, r_block, r_block2;  // r_stamp: a lane stamp, or a StampSet index
    int32_t r_pc;
    uint16_t w_tid, r_tid, r_tid2;
    uint8_t r_kind;  // ReadKind
    uint8_t pad;
};

enum ReadKind : uint8_t { kNoRead = 0, kOneReader, kWarpReaders, kManyWarps, kManyBlocks };

// Reads of one byte by several lanes of one warp in one epoch: each lane's latest stamp.
struct StampSet {
    uint32_t mask;
    uint32_t stamps[32];
};

struct SharedSite;

// One region of the block's shared memory: a STEEL_SHARED declaration or the dynamic buffer.
struct SharedRegion {
    const SharedSite* site;  // null: the dynamic shared memory
    uint32_t off, bytes;
};

enum SharedKind : uint8_t { kUnusable = 0, kUsable = 1, kAsyncPending = 2 };

struct GlobalShadow;

// ---- fibers and blocks -------------------------------------------------------------------------

enum class State : uint8_t { Ready, AtBlockBarrier, AtWarp, Exited };

struct Stack {
    char* lo = nullptr;  // lowest usable byte (the guard page is below it)
    size_t size = 0;
};

struct AsyncCopy {
    unsigned char* dst;
    const unsigned char* src;
    uint32_t bytes;
    uint32_t group;  // the number of commits before it was issued
};

struct Fiber {
    Builtins b;
    void* sp = nullptr;
    Stack stack;
    uint16_t tid = 0;  // linear thread index
    uint8_t lane = 0;
    uint16_t warp = 0;
    State state = State::Ready;
    Exchange* waiting = nullptr;  // the collective it waits at
    Exchange* last = nullptr;     // the completed collective whose words it may still read
    std::vector<AsyncCopy> async;  // cp.async copies not yet complete
    uint32_t commits = 0;
};

struct Warp {
    unsigned exists = 0;  // lanes of this (possibly partial) warp
    unsigned exited = 0;
    uint64_t seq = 0;
    std::vector<Exchange*> open;
    std::vector<std::unique_ptr<Exchange>> pool;
    std::vector<Exchange*> free;
    // Vector clocks of the lanes since the last block barrier: vc[l][k] is how many warp
    // barriers of lane k happen before lane l's present (vc[l][l]: lane l's own stamp).
    uint32_t vc[32][32];
    bool vc_dirty = false;  // a __syncwarp advanced vc in this epoch
};

struct Launch;

// The ready fibers of a block, as a bit set.
struct ReadySet {
    std::vector<uint64_t> bits;
    unsigned count = 0;
    void reset(unsigned n);
    void add(unsigned i);
    void remove(unsigned i);
    bool has(unsigned i) const { return (bits[i >> 6] >> (i & 63)) & 1u; }
    int next_from(unsigned i) const;  // first ready index ≥ i, or -1
    int prev_from(int i) const;       // last ready index ≤ i, or -1
    int kth(unsigned k) const;        // the k-th ready index (0-based)
};

// One OS thread's block: the running block's fibers, warps, shared memory and checker state.
struct Block {
    const KernelEntry* kernel = nullptr;
    const void* params = nullptr;
    Launch* launch = nullptr;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    unsigned nthreads = 0, block_arrived = 0;
    uint64_t linear = 0;  // launch-linear block index
    Fiber* cur = nullptr;
    void* sched_sp = nullptr;
    bool failed = false;
    std::string error;
    // scheduling
    ReadySet ready;
    int pos = 0;
    uint64_t rng = 0;
    // memory model: epochs count block barriers, monotonic over all blocks of this OS thread
    uint32_t epoch = 0, first_epoch = 0;
    // shared memory: [arena, arena + arena_cap); regions bump-allocated from 0
    unsigned char* arena = nullptr;
    size_t arena_cap = 0, arena_used = 0, arena_high = 0, static_bytes = 0, dyn_bytes = 0;
    std::vector<unsigned char> skind;  // SharedKind per arena byte
    std::vector<Cell> scells;          // the shadow of the arena
    std::vector<SharedRegion> regions;
    std::vector<StampSet> stamp_sets;  // reset at every block barrier
    const Alloc* last_alloc = nullptr;  // the checker's lookup cache
#ifdef STEEL_EMU_ASAN
    const void* sched_stack_lo = nullptr;
    size_t sched_stack_size = 0;
#endif
};

extern thread_local Block* tls_block;

// Everything a launch shares between its OS threads.
struct Launch {
    const KernelEntry* kernel;
    const void* params;
    dim3 grid, block;
    size_t dyn_shared;
    steel_emu_options opt;
    uint64_t nblocks;
    std::shared_ptr<const AllocTable> allocs;
    GlobalShadow* shadow = nullptr;  // null unless Check::Full
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex err_mutex;
    uint64_t err_block = UINT64_MAX;
    std::string error;
};

// ---- shared helpers ----------------------------------------------------------------------------

std::string fmt(const char* format, ...) __attribute__((format(printf, 1, 2)));
std::string where(const Block& b);                    // "kernel K, block (x,y,z)"
std::string thread_name(const Block& b, unsigned tid);  // "(x,y,z)"
std::string block_name(const Launch& L, uint64_t linear);
// A code address as the marker the Rust side turns into file:line (kernels-cu/src/lib.rs).
std::string source_marker(const Block& b, int32_t pc);
int32_t code_offset(const void* pc);
// Fails the running fiber's block with `msg` (already prefixed); never returns.
[[noreturn]] void fail_block(std::string msg);

// check.cpp
void checker_block_start(Block& b);
void checker_block_barrier(Block& b);
GlobalShadow* global_shadow_new(const Launch& L);
void global_shadow_free(GlobalShadow* s);
// The checker's view of an access by the running fiber (`pc`: the instruction's address).
void on_access(uintptr_t addr, size_t n, bool write, const void* pc);
// A read of `n` bytes that must lie in the block's shared memory (ldmatrix), or a write.
void shared_access(const char* what, uintptr_t addr, size_t n, bool write, const void* pc);
// Marks (kind = kAsyncPending) or clears (kUsable) the bytes of a cp.async destination.
void shared_mark(uintptr_t addr, size_t n, SharedKind kind, const void* pc);
bool in_shared(const Block& b, uintptr_t addr, size_t n);
// A global range a kernel touches through the emulator (cp.async source): bounds only.
void global_bounds(const char* what, uintptr_t addr, size_t n, const void* pc);
size_t page_size();

}  // namespace steel_emu

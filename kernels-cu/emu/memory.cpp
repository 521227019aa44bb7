// Device memory of the emulator (`EmuGpu::alloc` / `free` come here).
//
// Every allocation is its own mapping:
//
//   [guard page][canary ... | base: size bytes, poisoned 0xFF | canary to 256][guard page]
//
// The usable bytes end against the rear guard page (rounded up to 256 bytes, so the 256-byte
// alignment cudaMalloc promises holds); the slack on both sides is a canary. An access the
// checker sees that leaves [base, base + size) is reported at once (check.cpp); one it does not
// see faults on a guard page (emu.cpp's SIGSEGV handler names the kernel) or damages a canary,
// which the launch checks before it returns and `free` checks again.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <mutex>

#include "internal.h"

namespace steel_emu {

size_t page_size() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

namespace {

constexpr size_t kAlign = 256;
constexpr unsigned char kCanary = 0xCA;
// Bytes of the front canary checked after every launch (all of it at free).
constexpr size_t kFrontCheck = 256;

std::mutex g_mutex;
std::map<uintptr_t, Alloc> g_live;  // by base (the same order as by map_lo: mappings are disjoint)
uint64_t g_next_id = 1;
bool g_dirty = true;
std::shared_ptr<const AllocTable> g_table;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// The first damaged canary byte of `a` within `front` bytes before base (and all bytes after).
std::string damage(const Alloc& a, size_t front) {
    const unsigned char* base = reinterpret_cast<const unsigned char*>(a.base);
    const size_t rounded = round_up(std::max<size_t>(a.size, 1), kAlign);
    for (size_t i = a.size; i < rounded; ++i)
        if (base[i] != kCanary)
            return fmt("device allocation #%llu (%zu bytes) was written %zu bytes past its end "
                       "(offset %zu)",
                       (unsigned long long)a.id, a.size, i - a.size + 1, i);
    const size_t avail = a.base - (a.map_lo + page_size());
    for (size_t i = 1; i <= std::min(front, avail); ++i)
        if (base[-(ptrdiff_t)i] != kCanary)
            return fmt("device allocation #%llu (%zu bytes) was written %zu bytes before its "
                       "start (offset -%zu)",
                       (unsigned long long)a.id, a.size, i, i);
    return "";
}

}  // namespace

const Alloc* AllocTable::find(uintptr_t addr) const {
    auto it = std::upper_bound(allocs.begin(), allocs.end(), addr,
                               [](uintptr_t x, const Alloc& a) { return x < a.map_lo; });
    if (it == allocs.begin()) return nullptr;
    --it;
    return addr < it->map_hi ? &*it : nullptr;
}

std::shared_ptr<const AllocTable> alloc_table() {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_dirty || !g_table) {
        auto t = std::make_shared<AllocTable>();
        t->allocs.reserve(g_live.size());
        for (const auto& kv : g_live) t->allocs.push_back(kv.second);
        g_table = std::move(t);
        g_dirty = false;
    }
    return g_table;
}

std::string check_canaries(const AllocTable& t, uint64_t owner) {
    for (const Alloc& a : t.allocs)
        if (a.owner == owner) {
            std::string d = damage(a, kFrontCheck);
            if (!d.empty()) return d;
        }
    return "";
}

}  // namespace steel_emu

using namespace steel_emu;

namespace {
void set_err(char* err, size_t errlen, const std::string& msg) {
    if (!err || errlen == 0) return;
    size_t n = std::min(errlen - 1, msg.size());
    std::memcpy(err, msg.data(), n);
    err[n] = 0;
}
}  // namespace

// `bytes` of device memory for `owner`, poisoned with 0xFF; 0 with a message on failure.
extern "C" uint64_t steel_emu_alloc(size_t bytes, uint64_t owner, char* err, size_t errlen) {
    const size_t page = page_size();
    const size_t rounded = round_up(std::max<size_t>(bytes, 1), kAlign);
    if (rounded < bytes || rounded > ((size_t)1 << 46)) {
        set_err(err, errlen, fmt("%zu bytes do not fit the emulated device", bytes));
        return 0;
    }
    const size_t data = round_up(rounded, page), total = data + 2 * page;
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) {
        set_err(err, errlen, fmt("cannot map %zu bytes of host memory for the emulated device", total));
        return 0;
    }
    unsigned char* lo = static_cast<unsigned char*>(p);
    if (mprotect(lo, page, PROT_NONE) != 0 || mprotect(lo + page + data, page, PROT_NONE) != 0) {
        munmap(p, total);
        set_err(err, errlen, "cannot protect the guard pages of an emulated allocation");
        return 0;
    }
    Alloc a;
    a.map_lo = (uintptr_t)lo;
    a.map_hi = (uintptr_t)lo + total;
    a.base = (uintptr_t)lo + page + data - rounded;
    a.size = bytes;
    a.owner = owner;
    unsigned char* base = reinterpret_cast<unsigned char*>(a.base);
    std::memset(lo + page, kCanary, a.base - (uintptr_t)(lo + page));
    std::memset(base, 0xFF, bytes);  // unwritten outputs read as NaN
    std::memset(base + bytes, kCanary, rounded - bytes);
    std::lock_guard<std::mutex> lock(g_mutex);
    a.id = g_next_id++;
    g_live.emplace(a.base, a);
    g_dirty = true;
    return a.base;
}

// Frees an allocation of steel_emu_alloc: 0, or 1 with a report of damaged canaries (freed
// anyway), or 2 for an address that is no live allocation.
extern "C" int steel_emu_free(uint64_t base, char* err, size_t errlen) {
    Alloc a;
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        auto it = g_live.find(base);
        if (it == g_live.end()) {
            set_err(err, errlen, fmt("%#llx is not a live emulated allocation", (unsigned long long)base));
            return 2;
        }
        a = it->second;
        g_live.erase(it);
        g_dirty = true;
    }
    const std::string d = damage(a, SIZE_MAX);
    // Launches hold their own snapshot of the table: a mapping freed while another thread's
    // launch runs is only ever looked up, never dereferenced, by that launch.
    munmap(reinterpret_cast<void*>(a.map_lo), a.map_hi - a.map_lo);
    if (!d.empty()) {
        set_err(err, errlen, d);
        return 1;
    }
    return 0;
}

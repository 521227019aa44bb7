// The emulator's kernel registry: build.rs generates one table per .cu file with
// STEEL_EMU_ENTRY(symbol, bounds, stem) for every `__global__` function it finds (`bounds`: the
// first argument of its `__launch_bounds__`, copied from the source and evaluated here), and a
// registry.cpp that joins the tables. Each entry copies the parameter bytes into the kernel's one
// by-value parameter struct (on the fiber's stack, as the device passes it in constant memory).
#pragma once
#include <cstddef>
#include <cstring>
#include <type_traits>

namespace steel_emu {
struct KernelEntry {
    const char* symbol;
    void (*run)(const void* params);
    size_t param_bytes;
    unsigned max_threads;  // __launch_bounds__
    const char* stem;      // the .cu file without extension (source lines: kernels-cu/src/lib.rs)
    const void* fn;        // the kernel's code, for code offsets in reports
};

template <class F>
struct ParamOf;
template <class P>
struct ParamOf<void (*)(P)> {
    using type = typename std::remove_cv<P>::type;
};

template <auto F>
void trampoline(const void* params) {
    typename ParamOf<decltype(F)>::type p;
    std::memcpy(static_cast<void*>(&p), params, sizeof p);
    F(p);
}
}  // namespace steel_emu

#define STEEL_EMU_ENTRY(k, bounds, stem)                                                   \
    ::steel_emu::KernelEntry {                                                             \
        #k, &::steel_emu::trampoline<&k>,                                                  \
            sizeof(typename ::steel_emu::ParamOf<decltype(&k)>::type), (unsigned)(bounds), \
            stem, reinterpret_cast<const void*>(&k)                                        \
    }

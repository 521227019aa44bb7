//! Builds the kernels-cu emulator: every .cu source compiled for the host by the system C++
//! compiler with emu/shim.h, plus the fiber runtime and the memory checker, into one static
//! library.
//!
//! The kernels (not the runtime) are compiled with NVRTC's floating point (`-mfma
//! -ffp-contract=fast`, emu/device_math.h's functions) and with `-fsanitize=thread`: g++ then calls
//! `__tsan_read4(addr)`-style hooks before their memory accesses, which emu/check.cpp implements
//! (the ThreadSanitizer runtime is never linked). They are also compiled with debug line tables,
//! and their object files stay in OUT_DIR, so a report can name the source line of an access
//! (`STEEL_EMU_OBJECTS`, read by src/lib.rs).
//!
//! The sources are checked first: every `__global__` declares `__launch_bounds__` (the registry
//! records it, the launch enforces it), and no line uses a raw `__shared__` (STEEL_SHARED).
//!
//! Environment:
//! - `STEEL_EMU_MUTATE=name[,name…]` defines `STEEL_MUTATE_<NAME>` in every source: the test-only
//!   breakages that prove the property tests run the kernels (scripts/emu-mutation-check.sh).
//! - `STEEL_EMU_DROP_BARRIER=<file>:<k>` compiles a copy of the sources in which the k-th barrier
//!   call (`__syncthreads()` / `__syncwarp(…)`, 1-based, in source order) of `<file>` (a .cu or a
//!   header of include/) is removed: the barrier-removal mutations of the same script.
//! - `STEEL_EMU_ASAN=1` builds the emulator with AddressSanitizer instead of the checker's
//!   instrumentation (local debugging; run the tests with `LD_PRELOAD=$(g++
//!   -print-file-name=libasan.so)`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

include!("src/scan.rs");

fn main() {
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if arch != "x86_64" {
        panic!(
            "the kernels-cu emulator has a context switch for x86_64 only (target: {arch}); \
             add emu/switch_{arch}.h"
        );
    }
    for var in ["STEEL_EMU_MUTATE", "STEEL_EMU_ASAN", "STEEL_EMU_DROP_BARRIER", "CXX"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    for dir in ["emu", "include"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    // The crate's own directory too: a new .cu source (found by `files` below) must rebuild.
    println!("cargo:rerun-if-changed={}", root.display());
    let asan = std::env::var("STEEL_EMU_ASAN").is_ok_and(|v| v == "1");

    let mut cu: Vec<PathBuf> = files(&root, "cu");
    cu.sort();
    let headers = files(&root.join("include"), "cuh");
    for p in cu.iter().chain(&headers) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    check_sources(&cu, &headers);
    // The sources as compiled: the originals, or mutated copies without one barrier.
    let (cu, include) = match std::env::var("STEEL_EMU_DROP_BARRIER") {
        Ok(site) if !site.is_empty() => drop_barrier(&site, &cu, &headers, &out),
        _ => (cu, root.join("include")),
    };

    // One generated translation unit per .cu: the source, then its registry table.
    let mut units = Vec::new();
    let mut registry = String::from("#include \"registry.h\"\n");
    let mut tables = String::new();
    for path in &cu {
        let stem = path.file_stem().and_then(|s| s.to_str()).expect("utf-8 file name").to_string();
        let source = std::fs::read_to_string(path).expect("a readable .cu file");
        let decls = kernel_decls(&source);
        let mut unit = format!(
            "#include \"device_math.h\"\n#include \"{}\"\n#include \"registry.h\"\n",
            path.display()
        );
        let _ = writeln!(
            unit,
            "extern \"C\" const ::steel_emu::KernelEntry steel_emu_table_{stem}[] = {{"
        );
        for k in &decls {
            let bounds = k.bounds.as_deref().expect("checked by check_sources");
            let _ = writeln!(unit, "    STEEL_EMU_ENTRY({}, ({bounds}), \"{stem}\"),", k.name);
        }
        let _ = writeln!(unit, "}};");
        let _ = writeln!(
            unit,
            "extern \"C\" const size_t steel_emu_table_{stem}_len = {};",
            decls.len()
        );
        let file = out.join(format!("emu_{stem}.cpp"));
        write_if_changed(&file, &unit);
        units.push((stem.clone(), file));
        if !decls.is_empty() {
            let _ = writeln!(
                registry,
                "extern \"C\" const ::steel_emu::KernelEntry steel_emu_table_{stem}[];\n\
                 extern \"C\" const size_t steel_emu_table_{stem}_len;"
            );
            let _ = writeln!(tables, "    {{steel_emu_table_{stem}, steel_emu_table_{stem}_len}},");
        }
    }
    let _ = write!(
        registry,
        "#include <vector>\n\
         extern \"C\" const ::steel_emu::KernelEntry* steel_emu_registry(size_t* count) {{\n\
         \x20   struct T {{ const ::steel_emu::KernelEntry* e; size_t n; }};\n\
         \x20   static const std::vector<::steel_emu::KernelEntry> all = [] {{\n\
         \x20       std::vector<::steel_emu::KernelEntry> v;\n\
         \x20       const T tables[] = {{\n{tables}        {{nullptr, 0}}}};\n\
         \x20       for (const T& t : tables) for (size_t i = 0; i < t.n; ++i) v.push_back(t.e[i]);\n\
         \x20       return v;\n\
         \x20   }}();\n\
         \x20   *count = all.size();\n\
         \x20   return all.data();\n\
         }}\n"
    );
    let reg_file = out.join("emu_registry.cpp");
    write_if_changed(&reg_file, &registry);

    let base = |b: &mut cc::Build| {
        b.cpp(true)
            .std("c++17")
            .opt_level(2)
            .warnings(true)
            .extra_warnings(true)
            .warnings_into_errors(true)
            .flag("-Wno-unused-function")
            .flag("-Wno-unused-parameter")
            .flag("-fno-strict-aliasing")
            // Large frames probe every page, so an overflowing fiber always hits its guard page.
            .flag("-fstack-clash-protection")
            .define("STEEL_EMU", None)
            .include(root.join("emu"))
            .include(&include)
            .flag("-include")
            .flag(root.join("emu/shim.h").to_str().expect("utf-8 path"));
        if let Ok(m) = std::env::var("STEEL_EMU_MUTATE") {
            for name in m.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                b.define(&format!("STEEL_MUTATE_{}", name.to_ascii_uppercase()), None);
            }
        }
        if asan {
            b.define("STEEL_EMU_ASAN", None)
                .flag("-fsanitize=address")
                .flag("-fno-omit-frame-pointer");
        }
    };

    // The kernels, instrumented for the checker, with line tables for its reports, and with
    // NVRTC's floating point: multiply-adds contract (--fmad=true), so the host needs FMA.
    if !std::arch::is_x86_feature_detected!("fma") {
        panic!(
            "the kernels-cu emulator contracts multiply-adds as NVRTC does (-mfma \
             -ffp-contract=fast), and this CPU has no FMA instructions; build on an x86-64 CPU \
             with FMA (Intel Haswell / AMD Piledriver or newer)"
        );
    }
    let mut kernels = cc::Build::new();
    base(&mut kernels);
    kernels.debug(true).flag("-g").flag("-mfma").flag("-ffp-contract=fast");
    if !asan {
        kernels
            .flag("-fsanitize=thread")
            .flag("--param=tsan-instrument-func-entry-exit=0")
            // __threadfence is the runtime's fence(), so no atomic fence reaches the kernels.
            .flag("-Wno-tsan");
    }
    for (_, u) in &units {
        kernels.file(u);
    }
    let objects = kernels.compile_intermediates();
    let mut objects_env = String::new();
    for (stem, unit) in &units {
        let name = unit.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        if let Some(o) = objects.iter().find(|o| {
            o.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.ends_with(&format!("{name}.o")))
        }) {
            let _ = write!(objects_env, "{stem}={};", o.display());
        }
    }
    println!("cargo:rustc-env=STEEL_EMU_OBJECTS={objects_env}");

    // The runtime, uninstrumented, and the archive of both.
    let mut runtime = cc::Build::new();
    base(&mut runtime);
    for f in ["emu.cpp", "check.cpp", "memory.cpp"] {
        runtime.file(root.join("emu").join(f));
    }
    runtime.file(&reg_file).objects(&objects);
    runtime.compile("steel_emu");
    if asan {
        println!("cargo:rustc-link-lib=dylib=asan");
    }
    println!("cargo:rustc-link-lib=dylib=stdc++");
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{} is readable: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

/// Every kernel declares `__launch_bounds__`; no source declares a raw `__shared__`.
fn check_sources(cu: &[PathBuf], headers: &[PathBuf]) {
    let mut problems = Vec::new();
    for p in cu.iter().chain(headers) {
        let text = std::fs::read_to_string(p).expect("a readable source");
        let name = p.file_name().and_then(|f| f.to_str()).unwrap_or_default();
        for k in kernel_decls(&text) {
            if k.bounds.is_none() {
                problems.push(format!(
                    "{name}:{}: kernel {} declares no __launch_bounds__(max threads)",
                    k.line, k.name
                ));
            }
        }
        for line in raw_shared_lines(&text) {
            problems.push(format!(
                "{name}:{line}: raw __shared__; declare shared memory with STEEL_SHARED / \
                 STEEL_SHARED_2D / STEEL_DYNAMIC_SHARED (steel_common.cuh), which the emulator checks"
            ));
        }
    }
    if !problems.is_empty() {
        panic!("kernels-cu sources break the kernel rules:\n  {}", problems.join("\n  "));
    }
}

/// Copies of every source and header into OUT_DIR/mutated, with barrier `k` of `file` removed
/// (replaced by `((void)0)`, so line numbers stay the same).
fn drop_barrier(
    site: &str,
    cu: &[PathBuf],
    headers: &[PathBuf],
    out: &Path,
) -> (Vec<PathBuf>, PathBuf) {
    let (file, k) = site
        .rsplit_once(':')
        .and_then(|(f, k)| Some((f, k.parse::<usize>().ok()?)))
        .unwrap_or_else(|| panic!("STEEL_EMU_DROP_BARRIER={site}: expected <file>:<k>"));
    let dir = out.join("mutated");
    std::fs::create_dir_all(&dir).expect("OUT_DIR is writable");
    let mut found = false;
    let mut copies = Vec::new();
    for p in cu.iter().chain(headers) {
        let name = p.file_name().and_then(|f| f.to_str()).expect("utf-8 file name").to_string();
        let mut text = std::fs::read_to_string(p).expect("a readable source");
        if name == file {
            let sites = barrier_sites(&text);
            let Some((line, range)) = k.checked_sub(1).and_then(|i| sites.get(i)).cloned() else {
                panic!("STEEL_EMU_DROP_BARRIER={site}: {file} has {} barrier calls", sites.len());
            };
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines[line - 1].replace_range(range, "((void)0)");
            text = lines.join("\n") + "\n";
            found = true;
        }
        let dst = dir.join(&name);
        write_if_changed(&dst, &text);
        if p.extension().is_some_and(|x| x == "cu") {
            copies.push(dst);
        }
    }
    if !found {
        panic!("STEEL_EMU_DROP_BARRIER={site}: no source or header named {file}");
    }
    (copies, dir)
}

fn write_if_changed(path: &Path, text: &str) {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return;
    }
    std::fs::write(path, text).expect("OUT_DIR is writable");
}

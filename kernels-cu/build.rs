//! Builds the kernels-cu emulator: every .cu source compiled for the host by the system C++
//! compiler with emu/shim.h, plus the fiber runtime, into one static library.
//!
//! Environment:
//! - `STEEL_EMU_MUTATE=name[,name…]` defines `STEEL_MUTATE_<NAME>` in every source: the test-only
//!   breakages that prove the property tests run the kernels (scripts/emu-mutation-check.sh).
//! - `STEEL_EMU_ASAN=1` builds the emulator with AddressSanitizer (local debugging; run the tests
//!   with `LD_PRELOAD=$(g++ -print-file-name=libasan.so)`).

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
    println!("cargo:rerun-if-env-changed=STEEL_EMU_MUTATE");
    println!("cargo:rerun-if-env-changed=STEEL_EMU_ASAN");
    for dir in ["emu", "include"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }

    let mut cu: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("kernels-cu is readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    cu.sort();

    // One generated translation unit per .cu: the source, then its registry table.
    let mut units = Vec::new();
    let mut registry = String::from("#include \"registry.h\"\n");
    let mut tables = String::new();
    for path in &cu {
        println!("cargo:rerun-if-changed={}", path.display());
        let stem = path.file_stem().and_then(|s| s.to_str()).expect("utf-8 file name").to_string();
        let source = std::fs::read_to_string(path).expect("a readable .cu file");
        let symbols = global_symbols(&source);
        let mut unit = format!("#include \"{}\"\n#include \"registry.h\"\n", path.display());
        let _ = writeln!(
            unit,
            "extern \"C\" const ::steel_emu::KernelEntry steel_emu_table_{stem}[] = {{"
        );
        for s in &symbols {
            let _ = writeln!(unit, "    STEEL_EMU_ENTRY({s}),");
        }
        let _ = writeln!(unit, "}};");
        let _ = writeln!(
            unit,
            "extern \"C\" const size_t steel_emu_table_{stem}_len = {};",
            symbols.len()
        );
        let file = out.join(format!("emu_{stem}.cpp"));
        write_if_changed(&file, &unit);
        units.push(file);
        if !symbols.is_empty() {
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
    units.push(reg_file);

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        .flag("-Wno-unused-function")
        .flag("-Wno-unused-parameter")
        .flag("-fno-strict-aliasing")
        // Large frames probe every page, so an overflowing fiber always hits its guard page.
        .flag("-fstack-clash-protection")
        .define("STEEL_EMU", None)
        .include(root.join("emu"))
        .include(root.join("include"))
        .flag("-include")
        .flag(root.join("emu/shim.h").to_str().expect("utf-8 path"))
        .file(root.join("emu/emu.cpp"));
    for u in &units {
        build.file(u);
    }
    if let Ok(m) = std::env::var("STEEL_EMU_MUTATE") {
        for name in m.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            build.define(&format!("STEEL_MUTATE_{}", name.to_ascii_uppercase()), None);
        }
    }
    if std::env::var("STEEL_EMU_ASAN").is_ok_and(|v| v == "1") {
        build
            .define("STEEL_EMU_ASAN", None)
            .flag("-fsanitize=address")
            .flag("-fno-omit-frame-pointer");
        println!("cargo:rustc-link-lib=dylib=asan");
    }
    build.compile("steel_emu");
    println!("cargo:rustc-link-lib=dylib=stdc++");
}

fn write_if_changed(path: &Path, text: &str) {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return;
    }
    std::fs::write(path, text).expect("OUT_DIR is writable");
}

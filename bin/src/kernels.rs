//! `steel-bench kernels`: Steel's CUDA kernels, compiled with NVRTC and (on a GPU) timed.
//!
//! `--compile-only --arch sm_90` needs no GPU: it compiles every `.cu` source of kernels-cu for
//! the architecture, prints ptxas's own `-v` lines per kernel (registers, shared memory, stack
//! frame, spill stores/loads) and a summary table with each kernel's `__launch_bounds__`, and
//! fails (exit 2) on a compile error, a warning, a spill, registers × launch bounds above the
//! 65,536 registers of a block, or a kernel count different from the number of `__global__`
//! functions in the sources. Every cubin is then disassembled (`cuobjdump -sass`, see
//! `runtime::cuda::sass`) into a table of HMMA, LDSM, 128-bit global loads/stores, local memory
//! and barriers per kernel; a tensor-core kernel without HMMA/LDSM, or local memory in any kernel
//! but the emulator's stack test, fails too (`--require-sass`: so does a missing cuobjdump). `--export DIR` also writes the cubins as a bundle for `scripts/gpu-check.sh`.
//!
//! Without `--compile-only` the kernels run on the GPU chosen by `--device` (an explicit
//! `cuda` without a driver exits 2 with "no CUDA driver found; use --device cpu").

use anyhow::{bail, Context, Result};
use clap::Parser;
use rayon::prelude::*;
use std::path::PathBuf;
use std::time::Instant;
use steel_runtime::cuda::cache::{self, CubinCache};
use steel_runtime::cuda::nvrtc::{Arch, Compiled, Compiler, Source};
use steel_runtime::cuda::{bundle, libs, ptxas::KernelReport};
use steel_runtime::{choose_device, Device, DeviceRequest};

#[derive(Parser)]
pub struct KernelsArgs {
    /// auto (the GPU when one is usable), cpu, cuda, or emu (the checks of the table on the CPU
    /// emulator, small problems, no timings).
    #[arg(long, default_value = "auto")]
    device: DeviceRequest,
    /// Only compile every kernel with NVRTC and print ptxas's report (no GPU needed).
    #[arg(long)]
    compile_only: bool,
    /// Target architecture (default: the device's; sm_90 with --compile-only).
    #[arg(long)]
    arch: Option<String>,
    /// Cubin cache folder (default: $STEEL_CUBIN_CACHE, else ~/.cache/steel/cubin).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Compile everything afresh, neither reading nor writing the cache.
    #[arg(long)]
    no_cache: bool,
    /// Also write the cubins and a manifest to this folder (a bundle for gpu-check).
    #[arg(long)]
    export: Option<PathBuf>,
    /// Fail when the SASS cannot be read (cuobjdump missing); CI sets it.
    #[arg(long)]
    require_sass: bool,
    /// Compile threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed repeats per kernel on the GPU (the median is reported).
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// Wrap the GPU checks and timings in cuProfilerStart/Stop (for `nsys profile
    /// --capture-range=cudaProfilerApi`).
    #[arg(long)]
    profile: bool,
    /// A JSON line of bench/attention_torch.py (PyTorch's SDPA, FlashAttention backend, on the
    /// same GPU and shape): the attention rows are compared with it.
    #[arg(long, value_name = "FILE")]
    peer: Option<PathBuf>,
}

pub fn run(args: KernelsArgs) -> Result<()> {
    if args.compile_only {
        let arch: Arch = args.arch.as_deref().unwrap_or("sm_90").parse()?;
        return compile_all(&args, &arch);
    }
    let choice = choose_device(args.device, true)?;
    eprintln!("{}", choice.notice);
    if choice.emulated {
        return crate::gpu_bench::run_emu();
    }
    match choice.device {
        Device::Cpu => bail!(
            "steel-bench kernels times the CUDA kernels on a GPU and none is in use; run it with \
             --compile-only to compile them here, or see scripts/gpu-check.sh"
        ),
        Device::Cuda(ordinal) => {
            let peer = args.peer.as_deref().map(crate::gpu_bench::Peer::read).transpose()?;
            crate::gpu_bench::run(
                ordinal,
                args.repeats,
                args.arch.as_deref(),
                args.profile,
                peer.as_ref(),
            )
        }
    }
}

fn compiler(args: &KernelsArgs) -> Result<Compiler> {
    let cache = if args.no_cache {
        None
    } else {
        args.cache.clone().or_else(cache::default_dir).map(CubinCache::new)
    };
    Ok(Compiler::new(cache)?)
}

/// Registers of one block on sm_90 (64 K 32-bit registers per SM, all of them to one block at most).
const REGISTERS_PER_BLOCK: u64 = 65_536;

/// One source's outcome.
struct Outcome {
    file: &'static str,
    secs: f64,
    result: steel_runtime::cuda::Result<Compiled>,
}

fn compile_all(args: &KernelsArgs, arch: &Arch) -> Result<()> {
    let t0 = Instant::now();
    let compiler = compiler(args)?;
    let headers: Vec<(&str, &str)> = steel_kernels::headers().collect();
    let sources: Vec<(&'static str, &'static str)> = steel_kernels::cu_sources().collect();
    let expected = steel_kernels::kernel_symbols();
    let (major, minor) = compiler.version();
    println!(
        "steel-bench kernels --compile-only: NVRTC {major}.{minor}, {arch}, {} sources, {} \
         __global__ functions",
        sources.len(),
        expected.len()
    );
    for d in &compiler.include_dirs().dirs {
        println!("  include {}", d.display());
    }
    match compiler.cache() {
        Some(c) => println!("  cache   {}", c.dir().display()),
        None => println!("  cache   (off)"),
    }
    let (pool, _) = steel_cli::thread_pool(args.threads)?;
    let outcomes: Vec<Outcome> = pool.install(|| {
        sources
            .par_iter()
            .map(|&(file, text)| {
                let t = Instant::now();
                let result = compiler.compile(Source { name: file, text }, &headers, arch, &[]);
                Outcome { file, secs: t.elapsed().as_secs_f64(), result }
            })
            .collect()
    });

    let mut failures: Vec<String> = Vec::new();
    let mut reports: Vec<(&str, KernelReport)> = Vec::new();
    // Every kernel's declared block size, as the emulator's registry evaluated it.
    let bounds: std::collections::HashMap<String, u32> =
        steel_kernels::launch_bounds().into_iter().collect();
    let mut warnings = 0usize;
    for o in &outcomes {
        println!();
        match &o.result {
            Err(e) => {
                println!("{}: FAILED ({:.2} s)\n{e}", o.file, o.secs);
                failures.push(format!("{} did not compile", o.file));
            }
            Ok(c) => {
                let how = if c.cached {
                    "from the cache".to_string()
                } else {
                    format!("{:.2} s", o.secs)
                };
                println!("{} ({} bytes of cubin, {how})", o.file, c.cubin.len());
                for w in c.warnings() {
                    println!("  {w}");
                    warnings += 1;
                    failures.push(format!("{}: {w}", o.file));
                }
                for k in c.kernels() {
                    println!("  {}", k.name);
                    for line in &k.lines {
                        println!("    {line}");
                    }
                    let threads = bounds.get(k.name.as_str()).copied().unwrap_or(0);
                    if u64::from(k.registers) * u64::from(threads) > REGISTERS_PER_BLOCK {
                        failures.push(format!(
                            "{}: {} registers × __launch_bounds__({threads}) exceed the {} \
                             registers of a block",
                            k.name, k.registers, REGISTERS_PER_BLOCK
                        ));
                    }
                    if k.spills() {
                        failures.push(format!(
                            "{} spills ({} bytes stores, {} bytes loads)",
                            k.name, k.spill_store_bytes, k.spill_load_bytes
                        ));
                    }
                    reports.push((o.file, k));
                }
            }
        }
    }

    println!();
    println!(
        "{:<36} {:<18} {:>5} {:>7} {:>9} {:>7} {:>12}",
        "kernel", "file", "regs", "bounds", "smem B", "stack B", "spill st/ld"
    );
    for (file, k) in &reports {
        println!(
            "{:<36} {:<18} {:>5} {:>7} {:>9} {:>7} {:>12}",
            k.name,
            file,
            k.registers,
            bounds.get(k.name.as_str()).copied().unwrap_or(0),
            k.shared_bytes,
            k.stack_frame_bytes,
            format!("{}/{}", k.spill_store_bytes, k.spill_load_bytes)
        );
    }
    let mut got: Vec<&str> = reports.iter().map(|(_, k)| k.name.as_str()).collect();
    let mut want: Vec<&str> = expected.iter().map(|(_, s)| s.as_str()).collect();
    got.sort_unstable();
    want.sort_unstable();
    if got != want {
        let missing: Vec<&&str> = want.iter().filter(|s| !got.contains(s)).collect();
        let extra: Vec<&&str> = got.iter().filter(|s| !want.contains(s)).collect();
        failures.push(format!(
            "{} kernels compiled but the sources define {} __global__ functions (not compiled: \
             {missing:?}; unexpected: {extra:?})",
            got.len(),
            want.len()
        ));
    }
    let sass_line = sass_report(&outcomes, &reports, args.require_sass, &mut failures);
    let spills = reports.iter().filter(|(_, k)| k.spills()).count();
    println!();
    println!(
        "{} kernels compiled for {arch} from {} sources ({} __global__ functions in the sources); \
         {warnings} warnings; {spills} kernels with spills; {sass_line}; {:.1} s",
        reports.len(),
        outcomes.iter().filter(|o| o.result.is_ok()).count(),
        want.len(),
        t0.elapsed().as_secs_f64()
    );
    if let Some(dir) = &args.export {
        let cubins: Vec<(&str, &str, &[u8])> = outcomes
            .iter()
            .zip(&sources)
            .filter_map(|(o, &(_, text))| {
                o.result.as_ref().ok().map(|c| (o.file, text, &c.cubin[..]))
            })
            .collect();
        bundle::write(dir, arch.as_str(), &headers, &cubins)
            .with_context(|| format!("writing the kernel bundle to {}", dir.display()))?;
        println!("bundle: {} cubins and {} in {}", cubins.len(), bundle::MANIFEST, dir.display());
    }
    if !failures.is_empty() {
        bail!("{} problem(s):\n  {}", failures.len(), failures.join("\n  "));
    }
    Ok(())
}

/// Disassembles every cubin (`cuobjdump -sass`), prints per kernel the instructions that matter,
/// and records failures: a tensor-core kernel without HMMA/LDSM, local memory anywhere else than
/// the stack test, a kernel without SASS. Returns the summary's clause.
fn sass_report(
    outcomes: &[Outcome],
    reports: &[(&str, KernelReport)],
    required: bool,
    failures: &mut Vec<String>,
) -> String {
    use steel_runtime::cuda::sass;
    let Some(tool) = sass::find_cuobjdump() else {
        let why = "cuobjdump not found (pip install 'nvidia-cuda-cuobjdump>=13.2' \
                   'nvidia-cuda-nvdisasm>=13.2', or set STEEL_CUOBJDUMP)";
        if required {
            failures.push(format!("SASS: {why}"));
        }
        println!("\nSASS: skipped, {why}");
        return "SASS not read".to_string();
    };
    let mut counts: Vec<sass::SassCounts> = Vec::new();
    for o in outcomes {
        let Ok(c) = &o.result else { continue };
        match sass::disassemble(&tool, &c.cubin) {
            Ok(listing) => counts.extend(sass::parse(&listing)),
            Err(e) => failures.push(format!("SASS of {}: {e}", o.file)),
        }
    }
    println!("\nSASS ({}):", tool.display());
    println!(
        "{:<36} {:>6} {:>5} {:>5} {:>8} {:>8} {:>7} {:>7} {:>4}",
        "kernel", "instr", "HMMA", "LDSM", "LDG.128", "STG.128", "LDGSTS", "LDL/STL", "BAR"
    );
    for (_, k) in reports {
        let Some(c) = counts.iter().find(|c| c.name == k.name) else {
            failures.push(format!("{}: no SASS in its cubin", k.name));
            continue;
        };
        println!(
            "{:<36} {:>6} {:>5} {:>5} {:>8} {:>8} {:>7} {:>7} {:>4}",
            c.name, c.instructions, c.hmma, c.ldsm, c.ldg128, c.stg128, c.ldgsts, c.local, c.bar
        );
        failures.extend(sass::problems(c));
    }
    format!("SASS read for {} kernels", counts.len())
}

/// `(library, found)` lines for reports.
pub fn library_lines() -> Vec<String> {
    libs::report()
        .into_iter()
        .map(|(l, ok)| format!("  {:<14} {}", l.name(), if ok { "found" } else { "missing" }))
        .collect()
}

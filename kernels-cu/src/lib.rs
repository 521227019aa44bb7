//! Steel's CUDA kernels: the `.cu` sources and `include/` headers, embedded for run-time
//! compilation (NVRTC), and the host emulator that runs the same sources without a GPU
//! (DESIGN §4).
//!
//! - [`SOURCES`] lists every kernel source and header as `(file name, text)`; headers are named
//!   as the sources include them (`steel_common.cuh`).
//! - [`kernel_symbols`] lists every `__global__` function (their `extern "C"` names).
//! - [`emu_launch`] runs one kernel under the emulator (build.rs compiles every `.cu` with g++
//!   and `emu/shim.h`). Each CUDA thread is a fiber; see `emu/emu.cpp` for the model and
//!   `emu/check.cpp` for the memory checker; [`emu_alloc`]/[`emu_free`] manage its device memory
//!   (`emu/memory.cpp`).
//!
//! Kernel convention: `extern "C" __global__ void <op>_<fwd|bwd>_<dtype>(const XxxParams p)`,
//! one parameter struct by value, mirrored by a `#[repr(C)]` struct in the runtime's
//! launchers with a size assertion on both sides.

use std::ffi::{c_char, c_void, CStr, CString};

mod scan;

/// Every `.cu` source (compiled) and header of `include/` (included), as `(name, text)`.
pub const SOURCES: &[(&str, &str)] = &[
    ("adamw.cu", include_str!("../adamw.cu")),
    ("attention.cu", include_str!("../attention.cu")),
    ("elementwise.cu", include_str!("../elementwise.cu")),
    ("layout.cu", include_str!("../layout.cu")),
    ("embedding.cu", include_str!("../embedding.cu")),
    ("experts.cu", include_str!("../experts.cu")),
    ("l2_normalize.cu", include_str!("../l2_normalize.cu")),
    ("lm_head_ce.cu", include_str!("../lm_head_ce.cu")),
    ("matmul.cu", include_str!("../matmul.cu")),
    ("mma_gemm.cu", include_str!("../mma_gemm.cu")),
    ("rms_norm.cu", include_str!("../rms_norm.cu")),
    ("rope.cu", include_str!("../rope.cu")),
    ("soft_moe.cu", include_str!("../soft_moe.cu")),
    ("softmax.cu", include_str!("../softmax.cu")),
    ("test_emu.cu", include_str!("../test_emu.cu")),
    ("steel_async.cuh", include_str!("../include/steel_async.cuh")),
    ("steel_axis.cuh", include_str!("../include/steel_axis.cuh")),
    ("steel_common.cuh", include_str!("../include/steel_common.cuh")),
    ("steel_mma.cuh", include_str!("../include/steel_mma.cuh")),
    ("steel_vec.cuh", include_str!("../include/steel_vec.cuh")),
];

/// Kernels written for the tensor cores: their SASS must show HMMA, and LDSM (the ldmatrix loads
/// that feed them).
pub const TENSOR_CORE_KERNELS: &[&str] = &[
    "mma_tile_gemm_bf16",
    "attention_fwd_d16",
    "attention_fwd_d32",
    "attention_fwd_d48",
    "attention_fwd_d64",
    "attention_fwd_d80",
    "attention_fwd_d96",
    "attention_fwd_d112",
    "attention_fwd_d128",
    "attention_bwd_dkdv_d16",
    "attention_bwd_dkdv_d32",
    "attention_bwd_dkdv_d48",
    "attention_bwd_dkdv_d64",
    "attention_bwd_dkdv_d80",
    "attention_bwd_dkdv_d96",
    "attention_bwd_dv_d112",
    "attention_bwd_dk_d112",
    "attention_bwd_dv_d128",
    "attention_bwd_dk_d128",
    "attention_bwd_dq_d16",
    "attention_bwd_dq_d32",
    "attention_bwd_dq_d48",
    "attention_bwd_dq_d64",
    "attention_bwd_dq_d80",
    "attention_bwd_dq_d96",
    "attention_bwd_dq_d112",
    "attention_bwd_dq_d128",
];

/// Memory-bound kernels whose rows (or flat ranges) are read with 128-bit vector loads when
/// aligned (`include/steel_vec.cuh`): their SASS must show `LDG.E.128`.
pub const VECTOR_LOAD_KERNELS: &[&str] = &[
    "add_fwd_f32",
    "add_fwd_bf16",
    "add_assign_f32",
    "add_assign_bf16",
    "scale_fwd_f32",
    "scale_fwd_bf16",
    "scale_by_bwd_f32",
    "scale_by_bwd_bf16",
    "swiglu_fwd_f32",
    "swiglu_fwd_bf16",
    "swiglu_bwd_f32",
    "swiglu_bwd_bf16",
    "cast_f32_bf16",
    "cast_bf16_f32",
    "transpose01_v16",
    "global_norm_partial_f64",
    "embedding_fwd_f32",
    "embedding_fwd_bf16",
    "rope_fwd_f32",
    "rope_fwd_bf16",
    "rope_bwd_f32",
    "l2_normalize_fwd_f32",
    "l2_normalize_fwd_bf16",
    "l2_normalize_bwd_f32",
    "l2_normalize_bwd_bf16",
    "softmax_fwd_f32",
    "softmax_fwd_bf16",
    "softmax_bwd_f32",
    "softmax_bwd_bf16",
];

/// The only kernels allowed local memory (LDL/STL): the emulator's deliberate stack test.
pub const LOCAL_MEMORY_KERNELS: &[&str] = &["emu_test_stack"];

/// The `.cu` sources of [`SOURCES`] (what NVRTC compiles; the rest are headers).
pub fn cu_sources() -> impl Iterator<Item = (&'static str, &'static str)> {
    SOURCES.iter().copied().filter(|(name, _)| name.ends_with(".cu"))
}

/// The headers of [`SOURCES`] (for NVRTC's include list).
pub fn headers() -> impl Iterator<Item = (&'static str, &'static str)> {
    SOURCES.iter().copied().filter(|(name, _)| name.ends_with(".cuh"))
}

/// Every kernel symbol, with the `.cu` file that defines it, in file and source order.
pub fn kernel_symbols() -> Vec<(&'static str, String)> {
    cu_sources()
        .flat_map(|(file, text)| scan::global_symbols(text).into_iter().map(move |s| (file, s)))
        .collect()
}

/// Every barrier call (`__syncthreads()`, `__syncwarp(…)`) of the sources and headers as
/// `(file, 1-based line)`, in the order `STEEL_EMU_DROP_BARRIER=<file>:<k>` counts them
/// (scripts/emu-mutation-check.sh removes them one at a time).
pub fn barrier_sites() -> Vec<(&'static str, usize)> {
    SOURCES
        .iter()
        .flat_map(|&(file, text)| {
            scan::barrier_sites(text).into_iter().map(move |(l, _)| (file, l))
        })
        .collect()
}

/// Lines of the sources that declare shared memory with a raw `__shared__` (build.rs refuses
/// them: STEEL_SHARED is the emulator's checked arena).
pub fn raw_shared_lines() -> Vec<(&'static str, usize)> {
    SOURCES
        .iter()
        .flat_map(|&(file, text)| scan::raw_shared_lines(text).into_iter().map(move |l| (file, l)))
        .collect()
}

/// A grid or block size for [`emu_launch`].
pub type Dims = [u32; 3];

/// The order in which the emulator runs a block's threads between barriers. Every schedule is
/// one a GPU could take, so a deterministic kernel gives bit-identical results under all of them
/// (`STEEL_EMU_SCHEDULE=rr|rev|warp|random:SEED` sets the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Schedule {
    /// Thread order, each thread until it waits (`rr`).
    RoundRobin,
    /// Reversed thread order (`rev`).
    Reverse,
    /// Warp-major depth-first: always the lowest ready thread (`warp`).
    WarpMajor,
    /// A seeded random ready thread at every switch (`random:SEED`).
    Random(u64),
}

impl Schedule {
    /// All four kinds, the random one with `seed`.
    pub fn all(seed: u64) -> [Schedule; 4] {
        [Schedule::RoundRobin, Schedule::Reverse, Schedule::WarpMajor, Schedule::Random(seed)]
    }

    /// `STEEL_EMU_SCHEDULE`, or round-robin when it is unset; an invalid value is an error.
    pub fn from_env() -> Result<Schedule, String> {
        match std::env::var("STEEL_EMU_SCHEDULE") {
            Ok(v) if !v.is_empty() => v.parse(),
            _ => Ok(Schedule::RoundRobin),
        }
    }

    fn code(self) -> (u32, u64) {
        match self {
            Schedule::RoundRobin => (0, 0),
            Schedule::Reverse => (1, 0),
            Schedule::WarpMajor => (2, 0),
            Schedule::Random(seed) => (3, seed),
        }
    }
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Schedule, String> {
        match s {
            "rr" => Ok(Schedule::RoundRobin),
            "rev" => Ok(Schedule::Reverse),
            "warp" => Ok(Schedule::WarpMajor),
            _ => s
                .strip_prefix("random:")
                .and_then(|seed| seed.parse().ok())
                .map(Schedule::Random)
                .ok_or_else(|| {
                    format!("emulator schedule {s:?}: expected rr, rev, warp or random:SEED")
                }),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::RoundRobin => write!(f, "rr"),
            Schedule::Reverse => write!(f, "rev"),
            Schedule::WarpMajor => write!(f, "warp"),
            Schedule::Random(seed) => write!(f, "random:{seed}"),
        }
    }
}

/// How much of the memory checker runs (`STEEL_EMU_CHECK=full|shared|off`, default full).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Check {
    /// Only what costs nothing: guard pages, canaries, poison, collective and launch checks.
    Off,
    /// Shared memory (races, uninitialised reads, bounds) and global bounds.
    Shared,
    /// Shared memory and global memory races too (within a launch, across blocks).
    Full,
}

impl Check {
    /// `STEEL_EMU_CHECK`, or [`Check::Full`] when it is unset; an invalid value is an error.
    pub fn from_env() -> Result<Check, String> {
        match std::env::var("STEEL_EMU_CHECK").as_deref() {
            Err(_) | Ok("") | Ok("full") => Ok(Check::Full),
            Ok("shared") => Ok(Check::Shared),
            Ok("off") => Ok(Check::Off),
            Ok(v) => Err(format!("STEEL_EMU_CHECK={v:?}: expected full, shared or off")),
        }
    }
}

/// Per-launch settings of the emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmuOptions {
    pub schedule: Schedule,
    pub check: Check,
    /// The owner passed to [`emu_alloc`]: its allocations' canaries are checked after the launch.
    pub owner: u64,
    /// The kernel's opted-in dynamic shared memory (0: the default 48 KiB).
    pub dyn_shared_optin: u32,
}

/// `steel_emu_options` of emu/internal.h.
#[repr(C)]
struct RawOptions {
    schedule: u32,
    check: u32,
    seed: u64,
    owner: u64,
    dyn_shared_optin: u32,
    pad: u32,
}

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn steel_emu_launch(
        symbol: *const c_char,
        grid: *const u32,
        block: *const u32,
        dyn_shared: usize,
        params: *const c_void,
        param_bytes: usize,
        opt: *const RawOptions,
        err: *mut c_char,
        errlen: usize,
    ) -> i32;
    fn steel_emu_kernel_count() -> usize;
    fn steel_emu_kernel_name(i: usize) -> *const c_char;
    fn steel_emu_kernel_bounds(i: usize) -> u32;
    fn steel_emu_alloc(bytes: usize, owner: u64, err: *mut c_char, errlen: usize) -> u64;
    fn steel_emu_free(base: u64, err: *mut c_char, errlen: usize) -> i32;
}

/// A C error buffer and its message.
struct ErrBuf(Vec<c_char>);

impl ErrBuf {
    fn new() -> ErrBuf {
        ErrBuf(vec![0; 4096])
    }
    fn message(&self) -> String {
        // SAFETY: the emulator NUL-terminates the message inside the buffer (zeroed beforehand).
        unsafe { CStr::from_ptr(self.0.as_ptr()) }.to_string_lossy().into_owned()
    }
}

/// Runs `symbol` under the emulator and returns when every block has finished. The error
/// names the kernel: unknown symbol, parameter size mismatch, invalid launch configuration, a
/// barrier not every thread reaches, a misused warp collective, a data race, an uninitialised
/// shared read or an out-of-bounds access (with source lines where they can be resolved).
///
/// # Safety
/// `params` are the bytes of the kernel's parameter struct; every pointer in it must address
/// host memory valid for everything the kernel reads and writes under this grid and block.
pub unsafe fn emu_launch(
    symbol: &str,
    grid: Dims,
    block: Dims,
    dyn_shared: usize,
    params: &[u8],
    opt: &EmuOptions,
) -> Result<(), String> {
    let sym = CString::new(symbol).map_err(|_| format!("kernel name {symbol:?} contains NUL"))?;
    // Copy into 8-byte aligned storage: the emulator reads the struct with its C alignment.
    let mut aligned = vec![0u64; params.len().div_ceil(8)];
    // SAFETY: `aligned` has at least params.len() bytes; the ranges do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(params.as_ptr(), aligned.as_mut_ptr().cast(), params.len())
    };
    let (schedule, seed) = opt.schedule.code();
    let raw = RawOptions {
        schedule,
        check: opt.check as u32,
        seed,
        owner: opt.owner,
        dyn_shared_optin: opt.dyn_shared_optin,
        pad: 0,
    };
    let mut err = ErrBuf::new();
    // SAFETY: all pointers are valid for the call; the caller vouches for the params' pointers.
    let rc = unsafe {
        steel_emu_launch(
            sym.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            dyn_shared,
            aligned.as_ptr().cast(),
            params.len(),
            &raw,
            err.0.as_mut_ptr(),
            err.0.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    Err(source::resolve(&err.message()))
}

/// `bytes` of emulated device memory (poisoned with 0xFF, 256-byte aligned, ending against a
/// guard page, canaries around it) for `owner`; its host address.
pub fn emu_alloc(bytes: usize, owner: u64) -> Result<u64, String> {
    let mut err = ErrBuf::new();
    // SAFETY: plain call; the buffer outlives it.
    let p = unsafe { steel_emu_alloc(bytes, owner, err.0.as_mut_ptr(), err.0.len()) };
    if p == 0 {
        return Err(err.message());
    }
    Ok(p)
}

/// Frees an allocation of [`emu_alloc`]; an error reports canaries a kernel damaged (the memory
/// is freed anyway) or an address that is no live allocation.
///
/// # Safety
/// Nothing uses the allocation afterwards (no launch is running on it).
pub unsafe fn emu_free(ptr: u64) -> Result<(), String> {
    let mut err = ErrBuf::new();
    // SAFETY: the caller guarantees the memory is no longer in use.
    let rc = unsafe { steel_emu_free(ptr, err.0.as_mut_ptr(), err.0.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(err.message())
    }
}

/// The kernels compiled into the emulator.
pub fn emu_kernels() -> Vec<String> {
    // SAFETY: plain queries of a static table; names are NUL-terminated string literals.
    unsafe {
        (0..steel_emu_kernel_count())
            .filter_map(|i| {
                let p = steel_emu_kernel_name(i);
                (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
            })
            .collect()
    }
}

/// Every kernel's `__launch_bounds__` (its largest block), as the emulator evaluated them.
pub fn launch_bounds() -> Vec<(String, u32)> {
    // SAFETY: plain queries of a static table.
    let bounds: Vec<u32> =
        unsafe { (0..steel_emu_kernel_count()).map(|i| steel_emu_kernel_bounds(i)).collect() };
    emu_kernels().into_iter().zip(bounds).collect()
}

mod source;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scanner_reads_bounds_shared_declarations_and_barriers() {
        let src = "extern \"C\" __global__ void __launch_bounds__(MMA_THREADS, 2) k_fwd(P p) {\n\
                   __shared__ float raw[4];  // a raw declaration\n\
                   #define STEEL_X(n) \\\n    __shared__ float n[4]\n\
                   // __syncthreads(); in a comment\n\
                   __syncthreads(); my__syncthreads(); __syncwarp(mask & 3);\n\
                   }\n\
                   extern \"C\" __global__ void plain(P p) {}\n";
        let decls = scan::kernel_decls(src);
        assert_eq!(decls.len(), 2);
        assert_eq!(
            (decls[0].name.as_str(), decls[0].bounds.as_deref()),
            ("k_fwd", Some("MMA_THREADS"))
        );
        assert_eq!(
            (decls[1].name.as_str(), decls[1].bounds.as_deref(), decls[1].line),
            ("plain", None, 8)
        );
        assert_eq!(scan::raw_shared_lines(src), vec![2]);
        let sites = scan::barrier_sites(src);
        assert_eq!(sites.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![6, 6]);
        let line = src.lines().nth(5).unwrap();
        assert_eq!(&line[sites[0].1.clone()], "__syncthreads()");
        assert_eq!(&line[sites[1].1.clone()], "__syncwarp(mask & 3)");
    }

    #[test]
    fn every_kernel_follows_the_rules_and_has_its_bounds_in_the_registry() {
        assert!(raw_shared_lines().is_empty(), "{:?}", raw_shared_lines());
        let bounds = launch_bounds();
        assert_eq!(bounds.len(), kernel_symbols().len());
        for (k, b) in &bounds {
            assert!((1..=1024).contains(b), "{k}: __launch_bounds__({b})");
        }
        assert!(bounds.iter().any(|(k, b)| k == "mma_tile_gemm_bf16" && *b == 128), "{bounds:?}");
        assert!(barrier_sites().iter().any(|(f, _)| *f == "steel_common.cuh"));
    }

    #[test]
    fn emu_registry_holds_every_kernel_of_the_sources() {
        let mut want: Vec<String> = kernel_symbols().into_iter().map(|(_, s)| s).collect();
        let mut got = emu_kernels();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        assert!(want.iter().any(|s| s == "add_rms_norm_fwd_f32"), "{want:?}");
    }
}

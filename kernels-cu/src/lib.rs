//! Steel's CUDA kernels: the `.cu` sources and `include/` headers, embedded for run-time
//! compilation (NVRTC), and the host emulator that runs the same sources without a GPU
//! (DESIGN §4).
//!
//! - [`SOURCES`] lists every kernel source and header as `(file name, text)`; headers are named
//!   as the sources include them (`steel_common.cuh`).
//! - [`kernel_symbols`] lists every `__global__` function (their `extern "C"` names).
//! - [`emu_launch`] runs one kernel under the emulator (build.rs compiles every `.cu` with g++
//!   and `emu/shim.h`). Each CUDA thread is a fiber; see `emu/emu.cpp` for the model.
//!
//! Kernel convention: `extern "C" __global__ void <op>_<fwd|bwd>_<dtype>(const XxxParams p)`,
//! one parameter struct by value, mirrored by a `#[repr(C)]` struct in the runtime's
//! launchers with a size assertion on both sides.

use std::ffi::{c_char, c_void, CStr, CString};

mod scan;

/// Every `.cu` source (compiled) and header of `include/` (included), as `(name, text)`.
pub const SOURCES: &[(&str, &str)] = &[
    ("adamw.cu", include_str!("../adamw.cu")),
    ("cross_entropy.cu", include_str!("../cross_entropy.cu")),
    ("mma_gemm.cu", include_str!("../mma_gemm.cu")),
    ("rms_norm.cu", include_str!("../rms_norm.cu")),
    ("test_emu.cu", include_str!("../test_emu.cu")),
    ("steel_common.cuh", include_str!("../include/steel_common.cuh")),
    ("steel_mma.cuh", include_str!("../include/steel_mma.cuh")),
];

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

/// A grid or block size for [`emu_launch`].
pub type Dims = [u32; 3];

extern "C" {
    fn steel_emu_launch(
        symbol: *const c_char,
        grid: *const u32,
        block: *const u32,
        dyn_shared: usize,
        params: *const c_void,
        param_bytes: usize,
        err: *mut c_char,
        errlen: usize,
    ) -> i32;
    fn steel_emu_kernel_count() -> usize;
    fn steel_emu_kernel_name(i: usize) -> *const c_char;
}

/// Runs `symbol` under the emulator and returns when every block has finished. The error
/// names the kernel: unknown symbol, parameter size mismatch, invalid launch configuration, a
/// barrier not every thread reaches, or a misused warp collective.
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
) -> Result<(), String> {
    let sym = CString::new(symbol).map_err(|_| format!("kernel name {symbol:?} contains NUL"))?;
    // Copy into 8-byte aligned storage: the emulator reads the struct with its C alignment.
    let mut aligned = vec![0u64; params.len().div_ceil(8)];
    // SAFETY: `aligned` has at least params.len() bytes; the ranges do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(params.as_ptr(), aligned.as_mut_ptr().cast(), params.len())
    };
    let mut err = vec![0 as c_char; 2048];
    // SAFETY: all pointers are valid for the call; the caller vouches for the params' pointers.
    let rc = unsafe {
        steel_emu_launch(
            sym.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            dyn_shared,
            aligned.as_ptr().cast(),
            params.len(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the emulator NUL-terminates the message inside the buffer.
    Err(unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned())
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

#[cfg(test)]
mod tests {
    use super::*;

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

//! `EmuGpu`: the [`Gpu`] of CI. Host memory, every launch run by the kernels-cu emulator (the
//! same `.cu` sources compiled for the host), the CPU GEMM in place of cuBLASLt.
//!
//! Conventions:
//! - Launches are synchronous (the "stream" is the calling thread); `synchronize` is a no-op.
//! - Every allocation is poisoned with `0xFF` bytes (NaN for f32 and bf16), so an output a kernel
//!   forgets to write fails its test instead of reading as zero.
//! - A launch log (symbol, grid, block, shared bytes, the NVTX path at launch) and an NVTX log
//!   (every range's full path, in order) let tests prove the kernels ran, with which
//!   configuration, and under which names. Logging is per `EmuGpu`.
//! - The collective of an `EmuGpu` is the in-process one (`crate::comm::InProcessComm`); it
//!   needs no hook here because emulated device memory is host memory.

use super::{DevicePtr, Dim3, Fill, GemmDesc, Gpu, LaunchConfig, Op};
use crate::cpu::gemm::{gemm_batched, MatMut, MatRef};
use crate::{DType, Error, Result};
use half::bf16;
use std::alloc::Layout;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// One kernel launch as the emulator saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchRecord {
    pub symbol: &'static str,
    pub grid: Dim3,
    pub block: Dim3,
    pub shared_bytes: u32,
    /// The NVTX path open at the launch (`fwd/layer.3/add_rms_norm_fwd`), empty if none.
    pub nvtx: String,
}

/// Alignment of every emulated allocation (cudaMalloc gives at least 256).
const ALIGN: usize = 256;

#[derive(Default)]
struct State {
    allocs: HashMap<DevicePtr, Layout>,
    launches: Vec<LaunchRecord>,
    nvtx_stack: Vec<String>,
    nvtx_log: Vec<String>,
}

/// The emulated GPU (device ordinal 0 unless built with [`EmuGpu::with_ordinal`]).
pub struct EmuGpu {
    ordinal: usize,
    state: Mutex<State>,
}

impl Default for EmuGpu {
    fn default() -> Self {
        Self::new()
    }
}

impl EmuGpu {
    pub fn new() -> EmuGpu {
        Self::with_ordinal(0)
    }

    /// An emulated device that reports `Device::Cuda(ordinal)` (data-parallel tests).
    pub fn with_ordinal(ordinal: usize) -> EmuGpu {
        EmuGpu { ordinal, state: Mutex::new(State::default()) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every launch so far, in order.
    pub fn launches(&self) -> Vec<LaunchRecord> {
        self.state().launches.clone()
    }

    /// Forgets the launch and NVTX logs.
    pub fn clear_logs(&self) {
        let mut s = self.state();
        s.launches.clear();
        s.nvtx_log.clear();
    }

    /// The full path of every NVTX range opened so far, in order.
    pub fn nvtx_ranges(&self) -> Vec<String> {
        self.state().nvtx_log.clone()
    }

    /// Bytes currently allocated (tests check that temporary workspaces are returned).
    pub fn allocated_bytes(&self) -> usize {
        self.state().allocs.values().map(|l| l.size()).sum()
    }

    fn check_range(&self, op: &'static str, ptr: DevicePtr, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let s = self.state();
        let inside = s.allocs.iter().any(|(&base, l)| {
            ptr >= base
                && ptr.checked_add(bytes as u64).is_some_and(|end| end <= base + l.size() as u64)
        });
        if inside {
            Ok(())
        } else {
            Err(Error::gpu(
                op,
                format!("{bytes} bytes at {ptr:#x} are not inside one live emulated allocation"),
            ))
        }
    }
}

impl Drop for EmuGpu {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        for (ptr, layout) in s.allocs.drain() {
            // SAFETY: every entry was allocated by `alloc` with exactly this layout.
            unsafe { std::alloc::dealloc(ptr as usize as *mut u8, layout) };
        }
    }
}

/// A row-major operand of the CPU GEMM, widened to f32 when it is bf16.
enum Operand<'a> {
    F32(&'a [f32]),
    Owned(Vec<f32>),
}

impl Operand<'_> {
    fn ptr(&self) -> *const f32 {
        match self {
            Operand::F32(s) => s.as_ptr(),
            Operand::Owned(v) => v.as_ptr(),
        }
    }

    fn as_slice(&self) -> &[f32] {
        match self {
            Operand::F32(s) => s,
            Operand::Owned(v) => v,
        }
    }
}

/// # Safety
/// `ptr` addresses `len` live elements of `dtype`.
unsafe fn operand<'a>(ptr: DevicePtr, len: usize, dtype: DType) -> Result<Operand<'a>> {
    match dtype {
        // SAFETY: the caller guarantees the range.
        DType::F32 => {
            Ok(Operand::F32(unsafe { std::slice::from_raw_parts(ptr as usize as *const f32, len) }))
        }
        DType::BF16 => {
            // SAFETY: the caller guarantees the range.
            let s = unsafe { std::slice::from_raw_parts(ptr as usize as *const bf16, len) };
            Ok(Operand::Owned(s.iter().map(|x| x.to_f32()).collect()))
        }
        other => Err(Error::dtype("EmuGpu::gemm", other, "GEMM operands are F32 or BF16")),
    }
}

impl Gpu for EmuGpu {
    fn name(&self) -> String {
        "emu".to_string()
    }

    fn ordinal(&self) -> usize {
        self.ordinal
    }

    fn alloc(&self, bytes: usize) -> Result<DevicePtr> {
        let layout = Layout::from_size_align(bytes.max(1), ALIGN)
            .map_err(|e| Error::gpu("EmuGpu::alloc", format!("{bytes} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err(Error::gpu(
                "EmuGpu::alloc",
                format!("out of host memory for {bytes} bytes"),
            ));
        }
        // SAFETY: p is a fresh allocation of layout.size() bytes. The poison makes unwritten
        // outputs NaN.
        unsafe { std::ptr::write_bytes(p, 0xFF, layout.size()) };
        let ptr = p as usize as DevicePtr;
        self.state().allocs.insert(ptr, layout);
        Ok(ptr)
    }

    unsafe fn free(&self, ptr: DevicePtr) {
        if let Some(layout) = self.state().allocs.remove(&ptr) {
            // SAFETY: allocated by `alloc` with this layout; launches are synchronous, so no
            // queued work can still use it.
            unsafe { std::alloc::dealloc(ptr as usize as *mut u8, layout) };
        }
    }

    unsafe fn upload(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        self.check_range("EmuGpu::upload", dst, src.len())?;
        // SAFETY: the range was checked to lie in a live allocation; host slices never alias it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as usize as *mut u8, src.len()) };
        Ok(())
    }

    unsafe fn download(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        self.check_range("EmuGpu::download", src, dst.len())?;
        // SAFETY: as in upload.
        unsafe {
            std::ptr::copy_nonoverlapping(src as usize as *const u8, dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    unsafe fn copy(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()> {
        self.check_range("EmuGpu::copy", dst, bytes)?;
        self.check_range("EmuGpu::copy", src, bytes)?;
        // SAFETY: both ranges are live; `copy` tolerates overlap.
        unsafe { std::ptr::copy(src as usize as *const u8, dst as usize as *mut u8, bytes) };
        Ok(())
    }

    unsafe fn memset(&self, dst: DevicePtr, value: Fill, count: usize) -> Result<()> {
        self.check_range("EmuGpu::memset", dst, count * value.width())?;
        let p = dst as usize;
        // SAFETY: the range is live; alignment to the width is the caller's contract.
        unsafe {
            match value {
                Fill::U8(v) => std::ptr::write_bytes(p as *mut u8, v, count),
                Fill::U16(v) => std::slice::from_raw_parts_mut(p as *mut u16, count).fill(v),
                Fill::U32(v) => std::slice::from_raw_parts_mut(p as *mut u32, count).fill(v),
            }
        }
        Ok(())
    }

    unsafe fn launch(&self, symbol: &'static str, cfg: LaunchConfig, params: &[u8]) -> Result<()> {
        let nvtx = {
            let mut s = self.state();
            let nvtx = s.nvtx_stack.join("/");
            s.launches.push(LaunchRecord {
                symbol,
                grid: cfg.grid,
                block: cfg.block,
                shared_bytes: cfg.shared_bytes,
                nvtx: nvtx.clone(),
            });
            nvtx
        };
        let d = |d: Dim3| [d.x, d.y, d.z];
        // SAFETY: the caller guarantees the parameter struct and the memory it points to.
        unsafe {
            steel_kernels::emu_launch(
                symbol,
                d(cfg.grid),
                d(cfg.block),
                cfg.shared_bytes as usize,
                params,
            )
        }
        .map_err(|msg| {
            let at = if nvtx.is_empty() { String::new() } else { format!(" (in {nvtx})") };
            Error::gpu("EmuGpu::launch", format!("{msg}{at}"))
        })
    }

    unsafe fn gemm(&self, g: &GemmDesc, a: DevicePtr, b: DevicePtr, c: DevicePtr) -> Result<()> {
        let (m, n, k) = (g.m, g.n, g.k);
        // SAFETY: the caller guarantees m·k, k·n and m·n elements.
        let (av, bv) = unsafe { (operand(a, m * k, g.ab_dtype)?, operand(b, k * n, g.ab_dtype)?) };
        let ar = match g.op_a {
            Op::N => MatRef { ptr: av.ptr(), rs: k as isize, cs: 1 },
            Op::T => MatRef { ptr: av.ptr(), rs: 1, cs: m as isize },
        };
        let br = match g.op_b {
            Op::N => MatRef { ptr: bv.ptr(), rs: n as isize, cs: 1 },
            Op::T => MatRef { ptr: bv.ptr(), rs: 1, cs: k as isize },
        };
        let cm = MatMut { ptr: c as usize as *mut f32, rs: n as isize, cs: 1 };
        // SAFETY: operand views cover m·k and k·n f32 values, c covers m·n and does not overlap
        // them (the caller's contract; widened copies are fresh).
        unsafe { gemm_batched(1, m, n, k, g.alpha, ar, 0, br, 0, g.beta, cm, 0) };
        Ok(())
    }

    unsafe fn gemm_ex(
        &self,
        s: &crate::cuda::gemm::GemmShape,
        p: crate::cuda::gemm::GemmPtrs,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        use crate::backend::Transpose;
        const OP: &str = "EmuGpu::gemm_ex";
        let (m, n, k) = (s.m, s.n, s.k);
        let (ie, oe) = (s.input.size_in_bytes() as u64, s.output.size_in_bytes() as u64);
        if !matches!(s.output, DType::F32 | DType::BF16) {
            return Err(Error::dtype(OP, s.output, "the output is F32 or BF16"));
        }
        let bias: Option<Vec<f32>> = match (s.bias, p.bias) {
            (true, Some(b)) => {
                // SAFETY: the bias holds n elements of the output dtype.
                Some(unsafe { operand(b, n, s.output)? }.as_slice().to_vec())
            }
            (true, None) => return Err(Error::invalid(OP, "the shape has a bias but no pointer")),
            _ => None,
        };
        for i in 0..s.batch.max(1) as u64 {
            let (a, b) =
                (p.a + i * s.a_batch_stride as u64 * ie, p.b + i * s.b_batch_stride as u64 * ie);
            let out = p.out + i * s.out_batch_stride as u64 * oe;
            // SAFETY: the caller guarantees every batch item's range.
            let (av, bv) = unsafe { (operand(a, m * k, s.input)?, operand(b, k * n, s.input)?) };
            let ar = match s.trans_a {
                Transpose::No => MatRef { ptr: av.ptr(), rs: k as isize, cs: 1 },
                Transpose::Yes => MatRef { ptr: av.ptr(), rs: 1, cs: m as isize },
            };
            let br = match s.trans_b {
                Transpose::No => MatRef { ptr: bv.ptr(), rs: n as isize, cs: 1 },
                Transpose::Yes => MatRef { ptr: bv.ptr(), rs: 1, cs: k as isize },
            };
            // out (as f32) = beta · out, then += alpha · a · b, then + bias
            let mut c: Vec<f32> = if beta == 0.0 {
                vec![0.0; m * n]
            } else {
                // SAFETY: out holds m·n elements of the output dtype.
                unsafe { operand(out, m * n, s.output)? }
                    .as_slice()
                    .iter()
                    .map(|x| x * beta)
                    .collect()
            };
            let cm = MatMut { ptr: c.as_mut_ptr(), rs: n as isize, cs: 1 };
            // SAFETY: the views cover m·k and k·n values and c holds m·n.
            unsafe { gemm_batched(1, m, n, k, alpha, ar, 0, br, 0, 1.0, cm, 0) };
            if let Some(bias) = &bias {
                c.chunks_mut(n.max(1))
                    .for_each(|row| row.iter_mut().zip(bias).for_each(|(x, b)| *x += b));
            }
            match s.output {
                // SAFETY: out holds m·n elements of the output dtype and overlaps no input.
                DType::F32 => unsafe {
                    std::ptr::copy_nonoverlapping(c.as_ptr(), out as usize as *mut f32, m * n)
                },
                _ => {
                    let h: Vec<bf16> = c.iter().map(|&x| bf16::from_f32(x)).collect();
                    // SAFETY: as above.
                    unsafe {
                        std::ptr::copy_nonoverlapping(h.as_ptr(), out as usize as *mut bf16, m * n)
                    }
                }
            }
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn nvtx_push(&self, name: &str) {
        let mut s = self.state();
        s.nvtx_stack.push(name.to_string());
        let path = s.nvtx_stack.join("/");
        s.nvtx_log.push(path);
    }

    fn nvtx_pop(&self) {
        self.state().nvtx_stack.pop();
    }
}

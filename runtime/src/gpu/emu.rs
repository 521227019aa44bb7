//! `EmuGpu`: the [`Gpu`] of CI. Host memory, every launch run by the kernels-cu emulator (the
//! same `.cu` sources compiled for the host), the CPU GEMM in place of cuBLASLt.
//!
//! Conventions:
//! - Launches are synchronous (the "stream" is the calling thread, and one lock orders every
//!   operation of one `EmuGpu` as a stream would); `synchronize` reports a sticky error.
//! - Memory comes from the emulator's allocator (`steel_kernels::emu_alloc`): every allocation is
//!   poisoned with `0xFF` bytes (NaN for f32 and bf16), so an output a kernel forgets to write
//!   fails its test instead of reading as zero; it ends against a guard page with canaries around
//!   it, checked after every launch and at free.
//! - Every launch runs under a [`Schedule`] and the memory checker ([`Check`]): the defaults come
//!   from `STEEL_EMU_SCHEDULE` and `STEEL_EMU_CHECK` (round-robin, full), and
//!   [`EmuGpu::with_schedule`] / [`EmuGpu::with_check`] set them per device.
//! - Dynamic shared memory above 48 KiB needs [`Gpu::opt_in_dynamic_shared`] first, as the driver
//!   does.
//! - GEMMs run the CPU GEMM, but only what cuBLASLt would run: the same plan (its type table),
//!   the alignment the plan declares from the real pointers, checked for every batch item.
//! - A launch log (symbol, grid, block, shared bytes, the NVTX path at launch) and an NVTX log
//!   (every range's full path, in order) let tests prove the kernels ran, with which
//!   configuration, and under which names. Logging is per `EmuGpu`.
//! - Memory is counted as a device would report it ([`Gpu::memory`]): live bytes and their peak,
//!   and, when the device is given a capacity (`STEEL_EMU_MEMORY=2GiB`, or
//!   [`EmuGpu::with_memory`]), its free and total bytes; an allocation beyond the capacity fails
//!   as out of memory. Without a capacity the free memory is unknown (host memory is the limit).
//! - The collective of an `EmuGpu` is the in-process one (`crate::comm::InProcessComm`); it
//!   needs no hook here because emulated device memory is host memory.

use super::{DevicePtr, Dim3, Fill, GemmDesc, Gpu, LaunchConfig, Op};
use crate::cpu::gemm::{gemm_batched, MatMut, MatRef};
use crate::cuda::gemm::{self, GemmPtrs, GemmShape};
use crate::{DType, Error, Result};
use half::bf16;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
pub use steel_kernels::{Check, Schedule};

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

#[derive(Default)]
struct State {
    allocs: HashMap<DevicePtr, usize>,
    launches: Vec<LaunchRecord>,
    nvtx_stack: Vec<String>,
    nvtx_log: Vec<String>,
    /// The largest dynamic shared memory opted in per kernel.
    opt_in: HashMap<&'static str, u32>,
    /// An error found outside a launch (damaged canaries at free), reported by the next launch
    /// or synchronize, as a device reports an asynchronous fault.
    sticky: Option<String>,
    /// Σ allocs and its peak since creation or `reset_peak`.
    allocated: usize,
    peak: usize,
}

/// `STEEL_EMU_MEMORY` as bytes: a number with an optional `KiB`/`MiB`/`GiB` (or `KB`/`MB`/`GB`,
/// powers of 1000) suffix; unset or empty: no capacity.
pub fn emu_memory_from_env() -> std::result::Result<Option<usize>, String> {
    match std::env::var("STEEL_EMU_MEMORY") {
        Err(_) => Ok(None),
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => parse_bytes(&v).map(Some).ok_or_else(|| {
            format!("STEEL_EMU_MEMORY={v:?}: expected bytes such as 512MiB or 2GiB")
        }),
    }
}

/// `512MiB`, `2GiB`, `1.5GB`, `1048576`: bytes.
pub fn parse_bytes(text: &str) -> Option<usize> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        _ => return None,
    };
    let bytes = n * mult;
    (1.0..1e19).contains(&bytes).then_some(bytes as usize)
}

/// Distinguishes the allocations of each `EmuGpu` (their canaries are checked after its launches).
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// The emulated GPU (device ordinal 0 unless built with [`EmuGpu::with_ordinal`]).
pub struct EmuGpu {
    ordinal: usize,
    owner: u64,
    schedule: std::result::Result<Schedule, String>,
    check: std::result::Result<Check, String>,
    state: Mutex<State>,
    /// The device's capacity in bytes (`None`: unlimited), or the error of `STEEL_EMU_MEMORY`.
    capacity: std::result::Result<Option<usize>, String>,
    /// Held for the whole of every operation: this device's one stream.
    stream: Mutex<()>,
    counters: super::Counters,
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
        EmuGpu {
            ordinal,
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            schedule: Schedule::from_env(),
            check: Check::from_env(),
            state: Mutex::new(State::default()),
            capacity: emu_memory_from_env(),
            stream: Mutex::new(()),
            counters: super::Counters::default(),
        }
    }

    /// A device of `bytes` of memory (instead of `STEEL_EMU_MEMORY`'s).
    pub fn with_memory(mut self, bytes: usize) -> EmuGpu {
        self.capacity = Ok(Some(bytes));
        self
    }

    /// Runs every launch under `schedule` (instead of `STEEL_EMU_SCHEDULE`'s).
    pub fn with_schedule(mut self, schedule: Schedule) -> EmuGpu {
        self.schedule = Ok(schedule);
        self
    }

    /// Runs every launch with `check` (instead of `STEEL_EMU_CHECK`'s).
    pub fn with_check(mut self, check: Check) -> EmuGpu {
        self.check = Ok(check);
        self
    }

    /// The schedule every launch runs under (an invalid `STEEL_EMU_SCHEDULE` is an error).
    pub fn schedule(&self) -> Result<Schedule> {
        self.schedule.clone().map_err(|e| Error::invalid("EmuGpu", e))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stream(&self) -> MutexGuard<'_, ()> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner())
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
        self.state().allocs.values().sum()
    }

    fn take_sticky(&self, op: &'static str) -> Result<()> {
        match self.state().sticky.take() {
            Some(e) => Err(Error::gpu(op, e)),
            None => Ok(()),
        }
    }

    fn check_range(&self, op: &'static str, ptr: DevicePtr, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let s = self.state();
        let inside = s.allocs.iter().any(|(&base, &size)| {
            ptr >= base
                && ptr.checked_add(bytes as u64).is_some_and(|end| end <= base + size as u64)
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
        for (ptr, _) in s.allocs.drain() {
            // SAFETY: every entry came from `emu_alloc`; nothing runs on a device being dropped.
            // Damage would have been reported by the launch that caused it.
            let _ = unsafe { steel_kernels::emu_free(ptr) };
        }
    }
}

/// What cuBLASLt would refuse, refused the same way: the same `plan` (its type table), the
/// alignments `CudaGpu` would declare from these pointers (refusing an operand aligned to less
/// than its element), and every batch item's pointers checked against what was declared — a
/// device would run an algorithm that assumes them.
fn cublaslt_model(s: &GemmShape, p: &GemmPtrs) -> Result<()> {
    gemm::plan(s)?;
    let al = gemm::alignments(s, p);
    gemm::check_alignment(s, &al)?;
    let (ie, oe) = (s.input.size_in_bytes() as u64, s.output.size_in_bytes() as u64);
    for i in 0..s.batch.max(1) as u64 {
        for (what, ptr, declared) in [
            ("a", p.a + i * (s.a_batch_stride as u64) * ie, al.b),
            ("b", p.b + i * (s.b_batch_stride as u64) * ie, al.a),
            ("the output", p.out + i * (s.out_batch_stride as u64) * oe, al.d),
        ] {
            if ptr % u64::from(declared) != 0 {
                return Err(Error::gpu(
                    "EmuGpu::gemm_ex",
                    format!(
                        "batch item {i} of operand {what} at {ptr:#x} is not {declared}-byte \
                         aligned as the plan declared to cuBLASLt (MIN_ALIGNMENT): a device would \
                         run an algorithm that assumes it"
                    ),
                ));
            }
        }
    }
    Ok(())
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
        const OP: &str = "EmuGpu::alloc";
        let capacity = self.capacity.clone().map_err(|e| Error::invalid(OP, e))?;
        if let Some(cap) = capacity {
            let used = self.state().allocated;
            if used.saturating_add(bytes) > cap {
                return Err(Error::gpu(
                    OP,
                    format!(
                        "out of memory: {bytes} bytes requested, {used} of the emulated device's                          {cap} bytes in use (STEEL_EMU_MEMORY)"
                    ),
                ));
            }
        }
        let ptr = steel_kernels::emu_alloc(bytes, self.owner)
            .map_err(|e| Error::gpu(OP, format!("{bytes} bytes: {e}")))?;
        let mut s = self.state();
        s.allocs.insert(ptr, bytes);
        s.allocated += bytes;
        s.peak = s.peak.max(s.allocated);
        Ok(ptr)
    }

    unsafe fn free(&self, ptr: DevicePtr) {
        let _stream = self.stream();
        let removed = {
            let mut s = self.state();
            let r = s.allocs.remove(&ptr);
            if let Some(b) = r {
                s.allocated -= b;
            }
            r
        };
        if removed.is_some() {
            // SAFETY: allocated by `alloc`; the stream lock is held, so no launch uses it now.
            if let Err(e) = unsafe { steel_kernels::emu_free(ptr) } {
                self.state().sticky.get_or_insert(e);
            }
        }
    }

    unsafe fn upload(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        let _stream = self.stream();
        self.check_range("EmuGpu::upload", dst, src.len())?;
        // SAFETY: the range was checked to lie in a live allocation; host slices never alias it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as usize as *mut u8, src.len()) };
        Ok(())
    }

    unsafe fn download(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        let _stream = self.stream();
        self.counters.host_sync();
        self.check_range("EmuGpu::download", src, dst.len())?;
        // SAFETY: as in upload.
        unsafe {
            std::ptr::copy_nonoverlapping(src as usize as *const u8, dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    unsafe fn copy(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()> {
        let _stream = self.stream();
        self.check_range("EmuGpu::copy", dst, bytes)?;
        self.check_range("EmuGpu::copy", src, bytes)?;
        // SAFETY: both ranges are live; `copy` tolerates overlap.
        unsafe { std::ptr::copy(src as usize as *const u8, dst as usize as *mut u8, bytes) };
        Ok(())
    }

    unsafe fn memset(&self, dst: DevicePtr, value: Fill, count: usize) -> Result<()> {
        let _stream = self.stream();
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
        let _stream = self.stream();
        self.take_sticky("EmuGpu::launch")?;
        self.counters.kernel();
        let (nvtx, dyn_shared_optin) = {
            let mut s = self.state();
            let nvtx = s.nvtx_stack.join("/");
            s.launches.push(LaunchRecord {
                symbol,
                grid: cfg.grid,
                block: cfg.block,
                shared_bytes: cfg.shared_bytes,
                nvtx: nvtx.clone(),
            });
            (nvtx, s.opt_in.get(symbol).copied().unwrap_or(0))
        };
        let opt = steel_kernels::EmuOptions {
            schedule: self.schedule()?,
            check: self.check.clone().map_err(|e| Error::invalid("EmuGpu", e))?,
            owner: self.owner,
            dyn_shared_optin,
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
                &opt,
            )
        }
        .map_err(|msg| {
            let at = if nvtx.is_empty() { String::new() } else { format!(" (in {nvtx})") };
            Error::gpu("EmuGpu::launch", format!("{msg}{at}"))
        })
    }

    fn opt_in_dynamic_shared(&self, symbol: &'static str, bytes: u32) -> Result<()> {
        const LIMIT: u32 = 227 * 1024;
        if bytes > LIMIT {
            return Err(Error::gpu(
                "EmuGpu::opt_in_dynamic_shared",
                format!("kernel {symbol}: {bytes} bytes exceed the {LIMIT} bytes of a block"),
            ));
        }
        let mut s = self.state();
        let v = s.opt_in.entry(symbol).or_insert(0);
        *v = (*v).max(bytes);
        Ok(())
    }

    unsafe fn gemm(&self, g: &GemmDesc, a: DevicePtr, b: DevicePtr, c: DevicePtr) -> Result<()> {
        let _stream = self.stream();
        self.counters.gemm();
        let (m, n, k) = (g.m, g.n, g.k);
        let tr = |op| if op == Op::T { crate::Transpose::Yes } else { crate::Transpose::No };
        let shape = GemmShape::contiguous(
            m,
            n,
            k,
            1,
            tr(g.op_a),
            tr(g.op_b),
            false,
            false,
            g.ab_dtype,
            DType::F32,
            false,
        );
        cublaslt_model(&shape, &GemmPtrs { a, b, out: c, bias: None })?;
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

    unsafe fn gemm_ex(&self, s: &GemmShape, p: GemmPtrs, alpha: f32, beta: f32) -> Result<()> {
        use crate::backend::Transpose;
        const OP: &str = "EmuGpu::gemm_ex";
        let _stream = self.stream();
        self.counters.gemm();
        cublaslt_model(s, &p)?;
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
        let _stream = self.stream();
        self.counters.host_sync();
        self.take_sticky("EmuGpu::synchronize")
    }

    fn counts(&self) -> super::LaunchCounts {
        self.counters.get()
    }

    fn memory(&self) -> super::MemoryInfo {
        let s = self.state();
        let cap = self.capacity.clone().ok().flatten();
        super::MemoryInfo {
            allocated: s.allocated as u64,
            peak_allocated: s.peak as u64,
            free: cap.map(|c| c.saturating_sub(s.allocated) as u64),
            total: cap.map(|c| c as u64),
        }
    }

    fn reset_peak(&self) {
        let mut s = self.state();
        s.peak = s.allocated;
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

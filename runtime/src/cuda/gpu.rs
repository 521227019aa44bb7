//! `CudaGpu`: the [`Gpu`] of a real device — the driver's primary context, one compute stream,
//! the caching allocator, kernels-cu's cubins loaded as modules, and cuBLASLt for GEMMs.
//!
//! Kernels come from a pre-compiled bundle when `STEEL_CUBINS` names one (gpu-check: no NVRTC
//! needed, every cubin checked against the sources embedded in this binary), else from NVRTC for
//! the device's architecture through the disk cache. Every `__global__` function of the sources
//! must resolve in the loaded modules, or construction fails naming it.

use super::alloc::{Block, CachingAllocator, MemStats};
use super::cache::{self, CubinCache};
use super::gemm::{self, GemmPtrs, GemmShape, LtGemm};
use super::nvrtc::{Compiler, Source};
use super::{bundle, profile, CudaContext, CudaError, DriverMemory, Function, Stream};
use crate::gpu::{DevicePtr, Fill, GemmDesc, Gpu, LaunchConfig, Op};
use crate::{DType, Result, Transpose};
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

struct Memory {
    alloc: CachingAllocator<DriverMemory>,
    /// Live blocks by pointer (the `Gpu` trait frees by pointer).
    live: HashMap<u64, Block>,
}

/// A CUDA device behind the [`Gpu`] trait.
pub struct CudaGpu {
    ctx: Arc<CudaContext>,
    stream: Stream,
    memory: Mutex<Memory>,
    kernels: HashMap<String, Function>,
    /// The dynamic shared memory each kernel was opted in to (`opt_in_dynamic_shared`).
    dyn_shared: Mutex<HashMap<&'static str, u32>>,
    lt: Mutex<LtGemm>,
    /// cuBLASLt's workspace (`gemm::WORKSPACE_BYTES`), held for the life of the device.
    workspace: u64,
    name: String,
    counters: crate::gpu::Counters,
}

/// The cubins of every kernels-cu source for `ctx`'s architecture: `(source file, cubin)`.
fn cubins(ctx: &CudaContext) -> Result<Vec<(String, Vec<u8>)>> {
    let arch = ctx.arch();
    let headers: Vec<(&str, &str)> = steel_kernels::headers().collect();
    let sources: Vec<(&str, &str)> = steel_kernels::cu_sources().collect();
    if let Some(dir) = std::env::var_os("STEEL_CUBINS").filter(|d| !d.is_empty()) {
        return Ok(bundle::load(&PathBuf::from(dir), arch.as_str(), &sources, &headers)?);
    }
    let compiler = Compiler::new(cache::default_dir().map(CubinCache::new))?;
    sources
        .iter()
        .map(|&(name, text)| {
            let c = compiler.compile(Source { name, text }, &headers, &arch, &[])?;
            Ok((name.to_string(), c.cubin))
        })
        .collect()
}

impl CudaGpu {
    /// Device `ordinal` with every kernel loaded. Without a driver: "no CUDA driver found; use
    /// --device cpu"; without NVRTC (and no bundle) or cuBLASLt: an error naming the library.
    pub fn new(ordinal: usize) -> Result<CudaGpu> {
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.new_stream()?;
        let mut kernels = HashMap::new();
        let mut modules = Vec::new();
        for (_, cubin) in cubins(&ctx)? {
            modules.push(ctx.load_module(&cubin)?);
        }
        for (file, symbol) in steel_kernels::kernel_symbols() {
            let f = modules.iter().find_map(|m| m.function(&symbol).ok()).ok_or_else(|| {
                CudaError::invalid("CudaGpu", format!("kernel {symbol} of {file} is in no cubin"))
            })?;
            kernels.insert(symbol, f);
        }
        let lt = LtGemm::new()?;
        let mut alloc = CachingAllocator::new(ctx.memory());
        let ws = alloc.alloc(gemm::WORKSPACE_BYTES)?;
        let workspace = ws.ptr;
        let mut live = HashMap::new();
        live.insert(ws.ptr, ws);
        let info = ctx.info();
        let name = format!("cuda:{ordinal} ({}, {})", info.name, ctx.arch());
        Ok(CudaGpu {
            ctx,
            stream,
            memory: Mutex::new(Memory { alloc, live }),
            kernels,
            dyn_shared: Mutex::new(HashMap::new()),
            lt: Mutex::new(lt),
            workspace,
            name,
            counters: crate::gpu::Counters::default(),
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The compute stream.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// The allocator's statistics.
    pub fn mem_stats(&self) -> MemStats {
        self.mem_lock().alloc.stats()
    }

    /// Returns the allocator's cached blocks to the device.
    pub fn empty_cache(&self) -> Result<()> {
        self.synchronize()?;
        Ok(self.mem_lock().alloc.empty_cache()?)
    }

    /// A general cuBLASLt GEMM: strided batches (a stride of 0 broadcasts an operand), a bias
    /// epilogue, bf16 or fp32 output, fp32 accumulation, queued on the compute stream with the
    /// device's workspace. The `Gpu` trait's `gemm` is its unbatched, fp32-output case.
    ///
    /// # Safety
    /// Every pointer of `ptrs` addresses live device memory covering its layout of
    /// `gemm::plan(shape)` (see `gemm::span`) in the shape's dtypes (the bias: `n` elements of
    /// the output dtype); the output does not overlap the inputs.
    unsafe fn lt_matmul(
        &self,
        shape: &GemmShape,
        ptrs: GemmPtrs,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.counters.gemm();
        let plan = gemm::plan(shape)?;
        let align = gemm::alignments(shape, &ptrs);
        gemm::check_alignment(shape, &align)?;
        let mut lt = self.lt.lock().unwrap_or_else(|p| p.into_inner());
        self.ctx.bind()?;
        Ok(lt.matmul(
            &plan,
            &align,
            ptrs,
            alpha,
            beta,
            self.workspace,
            gemm::WORKSPACE_BYTES,
            self.stream.raw(),
        )?)
    }

    fn mem_lock(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn transpose(op: Op) -> Transpose {
    match op {
        Op::N => Transpose::No,
        Op::T => Transpose::Yes,
    }
}

impl Gpu for CudaGpu {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn ordinal(&self) -> usize {
        self.ctx.info().ordinal
    }

    fn alloc(&self, bytes: usize) -> Result<DevicePtr> {
        let mut m = self.mem_lock();
        // A zero-byte request still gets a real (smallest) block: a unique address.
        let block = m.alloc.alloc(bytes.max(1))?;
        let ptr = block.ptr;
        m.live.insert(ptr, block);
        Ok(ptr)
    }

    unsafe fn free(&self, ptr: DevicePtr) {
        let mut m = self.mem_lock();
        if let Some(block) = m.live.remove(&ptr) {
            m.alloc.free(block);
        }
    }

    unsafe fn upload(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        Ok(self.stream.htod(dst, src)?)
    }

    unsafe fn download(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        self.counters.host_sync();
        Ok(self.stream.dtoh(dst, src)?)
    }

    unsafe fn copy(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()> {
        Ok(self.stream.dtod(dst, src, bytes)?)
    }

    unsafe fn memset(&self, dst: DevicePtr, value: Fill, count: usize) -> Result<()> {
        Ok(self.stream.memset(dst, value, count)?)
    }

    unsafe fn launch(&self, symbol: &'static str, cfg: LaunchConfig, params: &[u8]) -> Result<()> {
        self.counters.kernel();
        let f = self.kernels.get(symbol).ok_or_else(|| {
            CudaError::invalid("launch", format!("no kernel {symbol} in kernels-cu"))
        })?;
        // The one parameter struct, copied to 8-byte aligned storage; the driver reads it during
        // cuLaunchKernel (before the call returns).
        let mut aligned = vec![0u64; params.len().div_ceil(8)];
        // SAFETY: `aligned` has at least `params.len()` bytes; the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                params.as_ptr(),
                aligned.as_mut_ptr().cast(),
                params.len(),
            )
        };
        let mut args: [*mut c_void; 1] = [aligned.as_mut_ptr().cast()];
        let (g, b) = (cfg.grid, cfg.block);
        // SAFETY: the caller guarantees `params` mirrors the kernel's one parameter struct and
        // that its pointers address live device memory (the trait's contract).
        unsafe {
            Ok(self.stream.launch(
                f,
                (g.x, g.y, g.z),
                (b.x, b.y, b.z),
                cfg.shared_bytes,
                &mut args,
            )?)
        }
    }

    fn opt_in_dynamic_shared(&self, symbol: &'static str, bytes: u32) -> Result<()> {
        let f = self.kernels.get(symbol).ok_or_else(|| {
            CudaError::invalid("opt_in_dynamic_shared", format!("no kernel {symbol} in kernels-cu"))
        })?;
        // Once per kernel, to the largest size asked for: the attribute is the kernel's, shared
        // by every launch, so lowering it would break a concurrent larger launch.
        let mut set = self.dyn_shared.lock().unwrap_or_else(|p| p.into_inner());
        let cur = set.entry(symbol).or_insert(0);
        if bytes > *cur {
            f.set_max_dynamic_shared(bytes)?;
            *cur = bytes;
        }
        Ok(())
    }

    unsafe fn gemm(&self, desc: &GemmDesc, a: DevicePtr, b: DevicePtr, c: DevicePtr) -> Result<()> {
        self.counters.gemm();
        let shape = GemmShape::contiguous(
            desc.m,
            desc.n,
            desc.k,
            1,
            transpose(desc.op_a),
            transpose(desc.op_b),
            false,
            false,
            desc.ab_dtype,
            DType::F32,
            false,
        );
        // SAFETY: the trait's contract: a, b and c cover m·k, k·n and m·n elements.
        unsafe {
            self.lt_matmul(&shape, GemmPtrs { a, b, out: c, bias: None }, desc.alpha, desc.beta)
        }
    }

    unsafe fn gemm_ex(
        &self,
        shape: &GemmShape,
        ptrs: GemmPtrs,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.lt_matmul(shape, ptrs, alpha, beta) }
    }

    fn synchronize(&self) -> Result<()> {
        self.counters.host_sync();
        Ok(self.stream.synchronize()?)
    }

    fn counts(&self) -> crate::gpu::LaunchCounts {
        self.counters.get()
    }

    fn memory(&self) -> crate::gpu::MemoryInfo {
        let stats = self.mem_stats();
        let device = self.ctx.mem_info().ok();
        crate::gpu::MemoryInfo {
            allocated: stats.allocated as u64,
            peak_allocated: stats.peak_allocated as u64,
            free: device.map(|(f, _)| f as u64),
            total: device.map(|(_, t)| t as u64),
        }
    }

    fn reset_peak(&self) {
        self.mem_lock().alloc.reset_peak();
    }

    fn nvtx_push(&self, name: &str) {
        profile::push(name);
    }

    fn nvtx_pop(&self) {
        profile::pop();
    }
}

impl Drop for CudaGpu {
    fn drop(&mut self) {
        // Queued work may still use cached blocks; wait before the allocator returns them.
        let _ = self.stream.synchronize();
        let mut m = self.mem_lock();
        let blocks: Vec<Block> = m.live.drain().map(|(_, b)| b).collect();
        for b in blocks {
            m.alloc.free(b);
        }
    }
}

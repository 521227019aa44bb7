//! The device layer: a device's primary context, streams, events, modules, launches, copies, and
//! the driver-backed [`DeviceMemory`] of the caching allocator.
//!
//! Every call that needs a current context makes it current first ([`CudaContext::bind`]): a
//! context is per thread in the driver, and rayon or test threads may call in. The primary
//! context is used (the one the runtime API and PyTorch share), retained on creation and released
//! on drop.

use super::alloc::DeviceMemory;
use super::libs::{self, CudaLib};
use super::nvrtc::Arch;
use super::{CudaError, Result};
use cudarc::driver::{result as drv, sys};
use std::ffi::{c_void, CString};
use std::sync::Arc;

/// What the device is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// `(major, minor)`: `(9, 0)` on H100/H200.
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub multiprocessors: i32,
    /// The most dynamic shared memory a block may opt into, bytes.
    pub max_shared_per_block_optin: i32,
}

/// A device and its retained primary context.
pub struct CudaContext {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    info: DeviceInfo,
}

// SAFETY: a CUcontext may be made current on any thread; the handles are plain identifiers.
unsafe impl Send for CudaContext {}
// SAFETY: as above; every method binds the context to the calling thread before using it.
unsafe impl Sync for CudaContext {}

impl CudaContext {
    /// Device `ordinal`'s primary context. Without a usable driver this is
    /// [`CudaError::NoDriver`], never a panic.
    pub fn new(ordinal: usize) -> Result<Arc<CudaContext>> {
        let count = libs::require_driver()?;
        if ordinal >= count {
            return Err(CudaError::invalid(
                "device",
                format!("cuda:{ordinal} does not exist ({count} device(s))"),
            ));
        }
        let dev =
            drv::device::get(ordinal as i32).map_err(|e| CudaError::driver("cuDeviceGet", e))?;
        // SAFETY: `dev` is a valid device from cuDeviceGet; the context is released in Drop.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }
            .map_err(|e| CudaError::driver("cuDevicePrimaryCtxRetain", e))?;
        let attr = |a| {
            // SAFETY: `dev` is valid; the attribute is an integer attribute.
            unsafe { drv::device::get_attribute(dev, a) }
                .map_err(|e| CudaError::driver("cuDeviceGetAttribute", e))
        };
        use sys::CUdevice_attribute as A;
        let info = DeviceInfo {
            ordinal,
            name: drv::device::get_name(dev)
                .map_err(|e| CudaError::driver("cuDeviceGetName", e))?,
            compute_capability: (
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ),
            // SAFETY: `dev` is valid.
            total_memory: unsafe { drv::device::total_mem(dev) }
                .map_err(|e| CudaError::driver("cuDeviceTotalMem", e))?,
            multiprocessors: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            max_shared_per_block_optin: attr(
                A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )?,
        };
        let c = Arc::new(CudaContext { dev, ctx, info });
        c.bind()?;
        Ok(c)
    }

    /// Makes the context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: `ctx` is retained for the life of `self`.
        unsafe { drv::ctx::set_current(self.ctx) }
            .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The ptxas architecture of this device (`sm_90`).
    pub fn arch(&self) -> Arch {
        Arch::from_compute_capability(
            self.info.compute_capability.0,
            self.info.compute_capability.1,
        )
    }

    /// `(free, total)` device memory, bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        drv::mem_get_info().map_err(|e| CudaError::driver("cuMemGetInfo", e))
    }

    /// Waits for all work on the device.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        drv::ctx::synchronize().map_err(|e| CudaError::driver("cuCtxSynchronize", e))
    }

    /// A new non-blocking stream.
    pub fn new_stream(self: &Arc<Self>) -> Result<Stream> {
        self.bind()?;
        let raw = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(|e| CudaError::driver("cuStreamCreate", e))?;
        Ok(Stream { raw, ctx: self.clone() })
    }

    /// A new event (timing enabled).
    pub fn new_event(self: &Arc<Self>) -> Result<Event> {
        self.bind()?;
        let raw = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(|e| CudaError::driver("cuEventCreate", e))?;
        Ok(Event { raw, ctx: self.clone() })
    }

    /// Loads a cubin (from [`super::nvrtc::Compiler::compile`]).
    pub fn load_module(self: &Arc<Self>, cubin: &[u8]) -> Result<Arc<Module>> {
        self.bind()?;
        // SAFETY: `cubin` is a complete cubin image that outlives the call (the driver copies it).
        let raw = unsafe { drv::module::load_data(cubin.as_ptr() as *const c_void) }
            .map_err(|e| CudaError::driver("cuModuleLoadData", e))?;
        Ok(Arc::new(Module { raw, ctx: self.clone() }))
    }

    /// The driver-backed memory for a [`super::alloc::CachingAllocator`].
    pub fn memory(self: &Arc<Self>) -> DriverMemory {
        DriverMemory { ctx: self.clone() }
    }
}

impl Drop for CudaContext {
    fn drop(&mut self) {
        // SAFETY: retained once in `new`, released once here.
        unsafe {
            let _ = drv::primary_ctx::release(self.dev);
        }
    }
}

/// A stream on one device.
pub struct Stream {
    raw: sys::CUstream,
    ctx: Arc<CudaContext>,
}

// SAFETY: stream handles may be used from any thread with their context current.
unsafe impl Send for Stream {}
// SAFETY: as above; the driver serialises work submitted to one stream.
unsafe impl Sync for Stream {}

impl Stream {
    pub fn raw(&self) -> sys::CUstream {
        self.raw
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Waits for the stream's queued work (host blocking).
    pub fn synchronize(&self) -> Result<()> {
        self.ctx.bind()?;
        // SAFETY: the stream is live.
        unsafe { drv::stream::synchronize(self.raw) }
            .map_err(|e| CudaError::driver("cuStreamSynchronize", e))
    }

    /// Makes later work on this stream wait for `event` (no host sync).
    pub fn wait(&self, event: &Event) -> Result<()> {
        self.ctx.bind()?;
        // SAFETY: stream and event are live.
        unsafe {
            drv::stream::wait_event(
                self.raw,
                event.raw,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| CudaError::driver("cuStreamWaitEvent", e))
    }

    /// Records `event` after the work queued so far.
    pub fn record(&self, event: &Event) -> Result<()> {
        self.ctx.bind()?;
        // SAFETY: stream and event are live.
        unsafe { drv::event::record(event.raw, self.raw) }
            .map_err(|e| CudaError::driver("cuEventRecord", e))
    }

    /// Copies `src` to device memory at `dst` (which must hold `src.len()` bytes). From pageable
    /// memory the call returns once `src` has been staged, so `src` may be dropped after it.
    pub fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: `dst` is a device allocation of at least `src.len()` bytes (caller's contract,
        // upheld by the buffer types that call this); `src` is pageable host memory.
        unsafe { drv::memcpy_htod_async(dst, src, self.raw) }
            .map_err(|e| CudaError::driver("cuMemcpyHtoDAsync", e))
    }

    /// Copies device memory at `src` into `dst`, waiting for the stream first and for the copy.
    pub fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: `src` holds at least `dst.len()` bytes (caller's contract); the stream is
        // synchronised before `dst` is read, so the copy has landed.
        unsafe { drv::memcpy_dtoh_async(dst, src, self.raw) }
            .map_err(|e| CudaError::driver("cuMemcpyDtoHAsync", e))?;
        self.synchronize()
    }

    /// Copies `bytes` between device allocations, in stream order.
    pub fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: both pointers hold at least `bytes` (caller's contract).
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.raw) }
            .map_err(|e| CudaError::driver("cuMemcpyDtoDAsync", e))
    }

    /// Writes `count` copies of `value` (1, 2 or 4 bytes wide) at `dst`, in stream order.
    pub fn memset(&self, dst: u64, value: crate::gpu::Fill, count: usize) -> Result<()> {
        use crate::gpu::Fill;
        if count == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: `dst` holds at least `count` elements of the pattern's width, aligned to it
        // (caller's contract).
        let rc = unsafe {
            match value {
                Fill::U8(v) => sys::cuMemsetD8Async(dst, v, count, self.raw),
                Fill::U16(v) => sys::cuMemsetD16Async(dst, v, count, self.raw),
                Fill::U32(v) => sys::cuMemsetD32Async(dst, v, count, self.raw),
            }
        };
        rc.result().map_err(|e| CudaError::driver("cuMemsetAsync", e))
    }

    /// Launches `f` with `params` (one pointer per kernel parameter, each pointing at the
    /// argument's value).
    ///
    /// # Safety
    /// `params` must match the kernel's parameter list in number, order and types, every device
    /// pointer passed must stay allocated until the stream passes the kernel, and the kernel must
    /// not access memory outside what it was given.
    pub unsafe fn launch(
        &self,
        f: &Function,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        self.ctx.bind()?;
        drv::launch_kernel(f.raw, grid, block, shared_bytes, self.raw, params)
            .map_err(|e| CudaError::driver("cuLaunchKernel", e))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: created in new_stream, destroyed once; queued work still completes.
        unsafe {
            if self.ctx.bind().is_ok() {
                let _ = drv::stream::destroy(self.raw);
            }
        }
    }
}

/// An event: stream ordering and timing.
pub struct Event {
    raw: sys::CUevent,
    ctx: Arc<CudaContext>,
}

// SAFETY: event handles may be used from any thread with their context current.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Event {
    /// Milliseconds between `self` (recorded first) and `end`; waits for `end`.
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32> {
        end.synchronize()?;
        // SAFETY: both events are live and recorded.
        unsafe { drv::event::elapsed(self.raw, end.raw) }
            .map_err(|e| CudaError::driver("cuEventElapsedTime", e))
    }

    /// Waits for the event (host blocking).
    pub fn synchronize(&self) -> Result<()> {
        self.ctx.bind()?;
        // SAFETY: the event is live.
        unsafe { drv::event::synchronize(self.raw) }
            .map_err(|e| CudaError::driver("cuEventSynchronize", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created in new_event, destroyed once.
        unsafe {
            if self.ctx.bind().is_ok() {
                let _ = drv::event::destroy(self.raw);
            }
        }
    }
}

/// A loaded cubin.
pub struct Module {
    raw: sys::CUmodule,
    ctx: Arc<CudaContext>,
}

// SAFETY: module handles may be used from any thread with their context current.
unsafe impl Send for Module {}
// SAFETY: as above.
unsafe impl Sync for Module {}

impl Module {
    /// The kernel named `name` (an `extern "C"` symbol).
    pub fn function(self: &Arc<Self>, name: &str) -> Result<Function> {
        self.ctx.bind()?;
        let cname = CString::new(name).map_err(|_| {
            CudaError::invalid("cuModuleGetFunction", format!("{name:?} has a NUL"))
        })?;
        // SAFETY: the module is loaded for the life of `self`.
        let raw = unsafe { drv::module::get_function(self.raw, cname) }.map_err(|e| {
            CudaError::Driver { op: "cuModuleGetFunction", code: format!("{name}: {e:?}") }
        })?;
        Ok(Function { raw, _module: self.clone() })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: loaded in load_module, unloaded once (functions hold the module alive).
        unsafe {
            if self.ctx.bind().is_ok() {
                let _ = drv::module::unload(self.raw);
            }
        }
    }
}

/// A kernel of a loaded module.
#[derive(Clone)]
pub struct Function {
    raw: sys::CUfunction,
    _module: Arc<Module>,
}

// SAFETY: function handles are immutable identifiers valid while the module is loaded.
unsafe impl Send for Function {}
// SAFETY: as above.
unsafe impl Sync for Function {}

impl Function {
    /// Allows up to `bytes` of dynamic shared memory (needed above 48 KiB).
    pub fn set_max_dynamic_shared(&self, bytes: u32) -> Result<()> {
        // SAFETY: the function is valid while `_module` is loaded.
        unsafe {
            drv::function::set_function_attribute(
                self.raw,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .map_err(|e| CudaError::driver("cuFuncSetAttribute", e))
    }
}

/// `cuMemAlloc`/`cuMemFree` on one device, for the caching allocator.
pub struct DriverMemory {
    ctx: Arc<CudaContext>,
}

impl DeviceMemory for DriverMemory {
    fn alloc(&mut self, bytes: usize) -> Result<Option<u64>> {
        libs::require(CudaLib::Driver)?;
        self.ctx.bind()?;
        // SAFETY: a plain allocation on the current context.
        match unsafe { drv::malloc_sync(bytes) } {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Ok(None),
            Err(e) => Err(CudaError::driver("cuMemAlloc", e)),
        }
    }

    fn free(&mut self, ptr: u64, _bytes: usize) -> Result<()> {
        self.ctx.bind()?;
        // SAFETY: `ptr` came from `alloc` and is freed once (the allocator's bookkeeping).
        unsafe { drv::free_sync(ptr) }.map_err(|e| CudaError::driver("cuMemFree", e))
    }

    fn mem_info(&self) -> Option<(usize, usize)> {
        self.ctx.mem_info().ok()
    }

    fn synchronize(&mut self) -> Result<()> {
        self.ctx.synchronize()
    }
}

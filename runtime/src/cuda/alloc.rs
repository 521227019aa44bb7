//! The caching device allocator.
//!
//! `cuMemAlloc`/`cuMemFree` synchronise the device and cost tens of microseconds; a training step
//! allocates thousands of activations. The allocator keeps freed blocks in per-size-class free
//! lists and hands them out again.
//!
//! Conventions:
//! - Size classes: requests are rounded up to a class, at least [`MIN_BLOCK`] bytes, then to one
//!   of the four quarter steps between consecutive powers of two (`2^k`, `1.25·2^k`, `1.5·2^k`,
//!   `1.75·2^k`), so a block wastes less than 25% and a class is reused by every request that
//!   rounds to it.
//! - Stream order: every block belongs to the one compute stream. A block freed by the host may
//!   still be read by queued kernels, but any later user of the block is queued on the same
//!   stream after them, so reusing it at once is safe. (Work on another stream must hold its
//!   blocks until an event orders it with the compute stream.)
//! - Out of memory: when the device refuses, the cache is released (the device synchronised, then
//!   blocks returned to it) and the request retried once; if the device still refuses, the error prints the
//!   statistics (requested, allocated, reserved, cached, peaks, device free/total).
//! - The backing memory is a [`DeviceMemory`]: the driver on a GPU, a fake in tests.

use super::{CudaError, Result};
use std::collections::HashMap;
use std::fmt;

/// The smallest block (and the alignment of every class): 512 bytes.
pub const MIN_BLOCK: usize = 512;

/// Where blocks come from: `cuMemAlloc`/`cuMemFree` on a GPU, a counter in tests.
pub trait DeviceMemory {
    /// A new allocation of exactly `bytes`, or `None` when the device is out of memory. Other
    /// failures are errors.
    fn alloc(&mut self, bytes: usize) -> Result<Option<u64>>;
    /// Returns an allocation made by `alloc`.
    fn free(&mut self, ptr: u64, bytes: usize) -> Result<()>;
    /// `(free, total)` bytes of the device, for the out-of-memory message.
    fn mem_info(&self) -> Option<(usize, usize)>;
    /// Waits for all work queued on the device: cached blocks may still be in use by it.
    fn synchronize(&mut self) -> Result<()>;
}

/// The size class of a request of `bytes` (see the module header). `0` stays `0`.
pub fn size_class(bytes: usize) -> usize {
    if bytes == 0 {
        return 0;
    }
    if bytes <= MIN_BLOCK {
        return MIN_BLOCK;
    }
    // The power of two at or below `bytes`, then a quarter of it as the step.
    let pow = 1usize << (usize::BITS - 1 - bytes.leading_zeros());
    let step = (pow / 4).max(MIN_BLOCK);
    bytes.div_ceil(step).saturating_mul(step)
}

/// A block of device memory from the allocator. It owns the memory until passed back to
/// [`CachingAllocator::free`].
#[derive(Debug, PartialEq, Eq)]
pub struct Block {
    /// Device pointer (`CUdeviceptr`); 0 for an empty block.
    pub ptr: u64,
    /// The requested size in bytes.
    pub bytes: usize,
    /// The size class (the block's real size).
    pub class: usize,
}

/// What the allocator holds, in bytes, and how it got there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    /// Bytes of live blocks (size classes).
    pub allocated: usize,
    /// Bytes obtained from the device: live blocks plus the cache.
    pub reserved: usize,
    /// Highest `allocated` so far.
    pub peak_allocated: usize,
    /// Highest `reserved` so far.
    pub peak_reserved: usize,
    /// Bytes requested by live blocks (before rounding to a class).
    pub requested: usize,
    /// Allocations served.
    pub allocs: u64,
    /// Allocations served from the cache.
    pub cache_hits: u64,
    /// Allocations that went to the device.
    pub device_allocs: u64,
    /// Times the cache was released to satisfy a request.
    pub cache_flushes: u64,
}

impl MemStats {
    /// Bytes held in the cache (reserved but not allocated).
    pub fn cached(&self) -> usize {
        self.reserved - self.allocated
    }
}

fn mib(b: usize) -> String {
    format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
}

impl fmt::Display for MemStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "allocated {} (requested {}), reserved {} ({} cached), peak allocated {}, peak \
             reserved {}; {} allocations, {} from the cache",
            mib(self.allocated),
            mib(self.requested),
            mib(self.reserved),
            mib(self.cached()),
            mib(self.peak_allocated),
            mib(self.peak_reserved),
            self.allocs,
            self.cache_hits
        )
    }
}

/// The caching allocator over a [`DeviceMemory`].
pub struct CachingAllocator<M: DeviceMemory> {
    mem: M,
    /// Free blocks by size class.
    free: HashMap<usize, Vec<u64>>,
    stats: MemStats,
}

impl<M: DeviceMemory> CachingAllocator<M> {
    pub fn new(mem: M) -> Self {
        CachingAllocator { mem, free: HashMap::new(), stats: MemStats::default() }
    }

    /// The statistics now.
    pub fn stats(&self) -> MemStats {
        self.stats
    }

    /// Starts a new peak of `allocated` (and of `reserved`) from now.
    pub fn reset_peak(&mut self) {
        self.stats.peak_allocated = self.stats.allocated;
        self.stats.peak_reserved = self.stats.reserved;
    }

    /// The backing memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// A block of at least `bytes` bytes.
    pub fn alloc(&mut self, bytes: usize) -> Result<Block> {
        let class = size_class(bytes);
        if class == 0 {
            return Ok(Block { ptr: 0, bytes: 0, class: 0 });
        }
        let cached = self.free.get_mut(&class).and_then(Vec::pop);
        let ptr = match cached {
            Some(ptr) => {
                self.stats.cache_hits += 1;
                ptr
            }
            None => {
                let ptr = match self.mem.alloc(class)? {
                    Some(p) => p,
                    None => {
                        // The device is full: give the cache back and try once more.
                        self.empty_cache()?;
                        self.stats.cache_flushes += 1;
                        match self.mem.alloc(class)? {
                            Some(p) => p,
                            None => return Err(self.oom(bytes, class)),
                        }
                    }
                };
                self.stats.device_allocs += 1;
                self.stats.reserved += class;
                self.stats.peak_reserved = self.stats.peak_reserved.max(self.stats.reserved);
                ptr
            }
        };
        self.stats.allocs += 1;
        self.stats.allocated += class;
        self.stats.requested += bytes;
        self.stats.peak_allocated = self.stats.peak_allocated.max(self.stats.allocated);
        Ok(Block { ptr, bytes, class })
    }

    /// Returns a block to the cache (see the module header on stream order).
    pub fn free(&mut self, block: Block) {
        if block.class == 0 {
            return;
        }
        self.stats.allocated -= block.class;
        self.stats.requested -= block.bytes;
        self.free.entry(block.class).or_default().push(block.ptr);
    }

    /// Returns every cached block to the device, after the device has finished the work
    /// queued so far (a cached block may have been freed by the host while kernels queued
    /// before still read it; stream order protects reuse, not a return to the driver).
    pub fn empty_cache(&mut self) -> Result<()> {
        if self.free.values().all(Vec::is_empty) {
            return Ok(());
        }
        self.mem.synchronize()?;
        let mut classes: Vec<usize> = self.free.keys().copied().collect();
        classes.sort_unstable();
        for class in classes {
            while let Some(ptr) = self.free.get_mut(&class).and_then(Vec::pop) {
                self.mem.free(ptr, class)?;
                self.stats.reserved -= class;
            }
        }
        self.free.clear();
        Ok(())
    }

    fn oom(&self, bytes: usize, class: usize) -> CudaError {
        let device = match self.mem.mem_info() {
            Some((free, total)) => format!("; device: {} free of {}", mib(free), mib(total)),
            None => String::new(),
        };
        CudaError::OutOfMemory(format!(
            "tried to allocate {} (size class {}); {}{device}",
            mib(bytes),
            mib(class),
            self.stats
        ))
    }
}

impl<M: DeviceMemory> Drop for CachingAllocator<M> {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; the context is being torn down anyway.
        let _ = self.empty_cache();
    }
}

//! `runtime::cuda` without a GPU: the allocator's bookkeeping over a fake device, ptxas report
//! parsing, the cubin cache, header discovery, architecture names, the cuBLASLt plans against a
//! CPU interpretation of their column-major layouts, profiling helpers, and the behaviour of
//! every entry point when the driver is absent (errors, never panics). With NVRTC on
//! `LD_LIBRARY_PATH` (scripts/test.sh puts it there) a small kernel is compiled to an sm_90
//! cubin; with `CI=true` a missing NVRTC fails that test instead of skipping it.

use proptest::prelude::*;
use std::path::{Path, PathBuf};
use steel_runtime::cuda::alloc::{size_class, CachingAllocator, DeviceMemory, MIN_BLOCK};
use steel_runtime::cuda::cache::{CacheKey, CubinCache, Entry};
use steel_runtime::cuda::gemm::{
    alignments, check_alignment, interpret, plan, span, GemmPtrs, GemmShape, LtAlign, LtOp,
};
use steel_runtime::cuda::headers;
use steel_runtime::cuda::libs::{self, CudaLib};
use steel_runtime::cuda::nvrtc::{Arch, Compiler, Source};
use steel_runtime::cuda::profile::{ProfileAction, ProfileWindow};
use steel_runtime::cuda::{ptxas, CudaError};
use steel_runtime::{DType, DriverProbe, Transpose};

// ---- allocator -------------------------------------------------------------------------------

/// A fake device of `capacity` bytes that hands out increasing addresses.
struct FakeMemory {
    capacity: usize,
    used: usize,
    next: u64,
    live: Vec<(u64, usize)>,
    allocs: usize,
    frees: usize,
    /// Every call, in order ("alloc", "free", "sync").
    log: Vec<&'static str>,
}

impl FakeMemory {
    fn new(capacity: usize) -> Self {
        FakeMemory {
            capacity,
            used: 0,
            next: 1 << 20,
            live: Vec::new(),
            allocs: 0,
            frees: 0,
            log: Vec::new(),
        }
    }
}

impl DeviceMemory for FakeMemory {
    fn alloc(&mut self, bytes: usize) -> steel_runtime::cuda::Result<Option<u64>> {
        if self.used + bytes > self.capacity {
            return Ok(None);
        }
        let p = self.next;
        self.next += bytes as u64;
        self.used += bytes;
        self.live.push((p, bytes));
        self.allocs += 1;
        self.log.push("alloc");
        Ok(Some(p))
    }
    fn free(&mut self, ptr: u64, bytes: usize) -> steel_runtime::cuda::Result<()> {
        let i = self.live.iter().position(|&(p, _)| p == ptr).expect("double free or foreign ptr");
        assert_eq!(self.live[i].1, bytes, "freed with a different size than allocated");
        self.live.swap_remove(i);
        self.used -= bytes;
        self.frees += 1;
        self.log.push("free");
        Ok(())
    }
    fn mem_info(&self) -> Option<(usize, usize)> {
        Some((self.capacity - self.used, self.capacity))
    }
    fn synchronize(&mut self) -> steel_runtime::cuda::Result<()> {
        self.log.push("sync");
        Ok(())
    }
}

#[test]
fn size_classes_round_up_by_at_most_a_quarter() {
    assert_eq!(size_class(0), 0);
    assert_eq!(size_class(1), MIN_BLOCK);
    assert_eq!(size_class(512), 512);
    assert_eq!(size_class(513), 1024);
    assert_eq!(size_class(4096), 4096);
    assert_eq!(size_class(4097), 5120);
    assert_eq!(size_class(1 << 20), 1 << 20);
    assert_eq!(size_class((1 << 20) + 1), (1 << 20) + (1 << 18));
    let mut prev = 0;
    for bytes in (1..200_000usize).step_by(97).chain([3 << 30, (5 << 30) + 7]) {
        let c = size_class(bytes);
        assert!(c >= bytes, "{bytes} -> {c}");
        assert_eq!(c % MIN_BLOCK, 0, "{bytes} -> {c} is not {MIN_BLOCK}-aligned");
        assert!(c < bytes + bytes / 4 + MIN_BLOCK, "{bytes} -> {c} wastes more than a quarter");
        assert!(c >= prev, "classes are monotone");
        prev = c;
    }
}

#[test]
fn allocator_reuses_blocks_and_keeps_statistics() {
    let mut a = CachingAllocator::new(FakeMemory::new(1 << 30));
    let b1 = a.alloc(1000).unwrap();
    let b2 = a.alloc(3000).unwrap();
    assert_eq!((b1.class, b2.class), (1024, 3072));
    let s = a.stats();
    assert_eq!((s.allocated, s.reserved, s.requested), (4096, 4096, 4000));
    assert_eq!((s.allocs, s.device_allocs, s.cache_hits), (2, 2, 0));
    let p1 = b1.ptr;
    a.free(b1);
    assert_eq!(a.stats().allocated, 3072);
    assert_eq!(a.stats().reserved, 4096, "freed blocks stay reserved");
    assert_eq!(a.stats().cached(), 1024);
    // A request of the same class gets the cached block back without touching the device.
    let b3 = a.alloc(1024).unwrap();
    assert_eq!(b3.ptr, p1);
    assert_eq!(a.stats().cache_hits, 1);
    assert_eq!(a.memory().allocs, 2);
    a.free(b2);
    a.free(b3);
    let s = a.stats();
    assert_eq!((s.allocated, s.requested, s.peak_allocated, s.peak_reserved), (0, 0, 4096, 4096));
    a.empty_cache().unwrap();
    assert_eq!(a.stats().reserved, 0);
    assert_eq!(a.memory().used, 0);
    assert_eq!(a.memory().frees, 2);
    // Zero-size requests never reach the device.
    let z = a.alloc(0).unwrap();
    assert_eq!((z.ptr, z.class), (0, 0));
    a.free(z);
    assert_eq!(a.memory().allocs, 2);
}

#[test]
fn allocator_releases_its_cache_before_reporting_out_of_memory() {
    let mut a = CachingAllocator::new(FakeMemory::new(8 << 20));
    let x = a.alloc(4 << 20).unwrap();
    a.free(x); // 4 MiB cached
               // 6 MiB does not fit next to the cached 4 MiB: the cache is released, then it fits.
    let y = a.alloc(6 << 20).unwrap();
    assert_eq!(a.stats().cache_flushes, 1);
    // The device finished its queued work before the cached block went back to it.
    assert_eq!(a.memory().log, ["alloc", "sync", "free", "alloc"]);
    assert_eq!(a.stats().reserved, 6 << 20);
    // Now nothing can make room for another 4 MiB.
    let err = a.alloc(4 << 20).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CudaError::OutOfMemory(_)), "{msg}");
    for needle in [
        "CUDA out of memory",
        "tried to allocate 4.00 MiB",
        "allocated 6.00 MiB",
        "reserved 6.00 MiB",
        "peak allocated 6.00 MiB",
        "device: 2.00 MiB free of 8.00 MiB",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
    a.free(y);
}

proptest! {
    #[test]
    fn allocator_bookkeeping_matches_a_model(ops in prop::collection::vec((0usize..3, 1usize..70_000), 1..60)) {
        let mut a = CachingAllocator::new(FakeMemory::new(usize::MAX / 2));
        let mut live = Vec::new();
        let mut peak = 0;
        for (op, bytes) in ops {
            if op == 0 && !live.is_empty() {
                let b = live.swap_remove(bytes % live.len());
                a.free(b);
            } else {
                let b = a.alloc(bytes).unwrap();
                prop_assert!(b.class >= bytes);
                live.push(b);
            }
            let allocated: usize = live.iter().map(|b| b.class).sum();
            let requested: usize = live.iter().map(|b| b.bytes).sum();
            peak = peak.max(allocated);
            let s = a.stats();
            prop_assert_eq!(s.allocated, allocated);
            prop_assert_eq!(s.requested, requested);
            prop_assert_eq!(s.peak_allocated, peak);
            prop_assert_eq!(s.reserved, a.memory().used);
            prop_assert!(s.reserved >= s.allocated);
            // Live blocks never overlap.
            let mut spans: Vec<(u64, u64)> = live.iter().map(|b| (b.ptr, b.ptr + b.class as u64)).collect();
            spans.sort();
            for w in spans.windows(2) {
                prop_assert!(w[0].1 <= w[1].0, "overlap {:?}", w);
            }
        }
        for b in live {
            a.free(b);
        }
        a.empty_cache().unwrap();
        prop_assert_eq!(a.memory().used, 0);
    }
}

// ---- ptxas report ----------------------------------------------------------------------------

/// NVRTC 13.0's log for two kernels (`-arch=sm_90 --ptxas-options=-v`), verbatim.
const PTXAS_LOG: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'big' for 'sm_90'
ptxas info    : Function properties for big
ptxas         .     256 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 256 bytes cumulative stack size
ptxas info    : Compile time = 35.334 ms
ptxas info    : Compiling entry function 'add_one' for 'sm_90'
ptxas info    : Function properties for add_one
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]
ptxas info    : Compile time = 3.434 ms
";

#[test]
fn ptxas_report_is_parsed_per_kernel() {
    let k = ptxas::parse(PTXAS_LOG);
    assert_eq!(k.len(), 2);
    assert_eq!((k[0].name.as_str(), k[0].arch.as_str()), ("big", "sm_90"));
    assert_eq!(
        (k[0].registers, k[0].stack_frame_bytes, k[0].spill_store_bytes, k[0].spill_load_bytes),
        (32, 256, 8, 12)
    );
    assert!(k[0].spills());
    assert_eq!(k[1].name, "add_one");
    assert_eq!(
        (k[1].registers, k[1].barriers, k[1].shared_bytes, k[1].cmem0_bytes),
        (10, 1, 1024, 360)
    );
    assert!(!k[1].spills());
    // ptxas's own lines, without the run-to-run compile time.
    assert_eq!(
        k[1].lines,
        [
            "ptxas info    : Function properties for add_one",
            "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
            "ptxas info    : Used 10 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]",
        ]
    );
    assert!(ptxas::warnings(PTXAS_LOG).is_empty());
    let warned = "k.cu(3): warning #177-D: variable \"x\" was declared but never referenced\n\
                  ptxas warning : Registers are spilled to local memory\n";
    assert_eq!(ptxas::warnings(warned).len(), 2);
}

// ---- cubin cache -----------------------------------------------------------------------------

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("steel-cuda-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn cache_key_covers_every_input_and_entries_round_trip() {
    let opts = vec!["-std=c++17".to_string()];
    let other_opts = vec!["-std=c++20".to_string()];
    let base = CacheKey {
        nvrtc_version: (13, 0),
        arch: "sm_90",
        options: &opts,
        source_name: "a.cu",
        source: "x",
        headers: &[("h.cuh", "1")],
    };
    let variants = [
        CacheKey { nvrtc_version: (13, 1), ..base },
        CacheKey { arch: "sm_100", ..base },
        CacheKey { options: &other_opts, ..base },
        CacheKey { source_name: "b.cu", ..base },
        CacheKey { source: "y", ..base },
        CacheKey { headers: &[("h.cuh", "2")], ..base },
        CacheKey { headers: &[], ..base },
    ];
    let d0 = base.digest();
    assert_eq!(d0.len(), 64);
    assert_eq!(d0, base.digest(), "deterministic");
    for v in &variants {
        assert_ne!(v.digest(), d0, "{v:?} must change the key");
    }
    let dir = temp_dir("cache");
    let cache = CubinCache::new(&dir);
    assert_eq!(cache.get(&base).unwrap(), None);
    let e = Entry { cubin: vec![0x7f, b'E', b'L', b'F', 1, 2, 3], log: PTXAS_LOG.to_string() };
    cache.put(&base, &e).unwrap();
    assert_eq!(cache.get(&base).unwrap(), Some(e));
    assert_eq!(cache.get(&variants[1]).unwrap(), None);
    assert!(dir.join(format!("{d0}.cubin")).is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- headers ---------------------------------------------------------------------------------

#[test]
fn header_discovery_finds_pip_layouts_and_cccl() {
    let root = temp_dir("headers");
    let venv = root.join("venv");
    let cu13 = venv.join("lib/python3.11/site-packages/nvidia/cu13");
    std::fs::create_dir_all(cu13.join("include/cccl/cuda/std")).unwrap();
    std::fs::create_dir_all(cu13.join("lib")).unwrap();
    std::fs::write(cu13.join("include/cuda_bf16.h"), "").unwrap();
    let home = root.join("toolkit");
    std::fs::create_dir_all(home.join("include")).unwrap(); // no cuda_bf16.h: not selected
    let lib = cu13.join("lib");
    let vars = |k: &str| match k {
        "CUDA_HOME" => Some(home.display().to_string()),
        "LD_LIBRARY_PATH" => Some(format!("/nonexistent/lib:{}", lib.display())),
        "VIRTUAL_ENV" => Some(venv.display().to_string()),
        _ => None,
    };
    let cands = headers::candidates(&vars, &[lib.join("libnvrtc.so.13")]);
    assert_eq!(cands[0], cu13.join("include"), "the loaded NVRTC's own headers come first");
    assert_eq!(cands[1], home.join("include"), "then CUDA_HOME");
    let found = headers::select(&cands).unwrap();
    let inc = cu13.join("include").canonicalize().unwrap();
    assert_eq!(found.dirs, vec![inc.clone(), inc.join("cccl")]);
    assert_eq!(
        found.options(),
        vec![format!("-I{}", inc.display()), format!("-I{}", inc.join("cccl").display())]
    );

    // The headers' CUDA_VERSION must be NVRTC's release.
    assert!(headers::check_version(&found, (13, 0)).is_ok(), "no cuda.h: nothing to compare");
    std::fs::write(cu13.join("include/cuda.h"), "#pragma once\n#define CUDA_VERSION 12040\n")
        .unwrap();
    assert_eq!(headers::cuda_version(&inc), Some((12, 4)));
    let msg = headers::check_version(&found, (13, 0)).unwrap_err().to_string();
    assert!(
        msg.contains("CUDA 12.4") && msg.contains("NVRTC is 13.0") && msg.contains("CUDA_HOME"),
        "{msg}"
    );
    std::fs::write(cu13.join("include/cuda.h"), "#define CUDA_VERSION 13000\n").unwrap();
    assert!(headers::check_version(&found, (13, 0)).is_ok());

    let none = |_: &str| None;
    let err = headers::select(&headers::candidates(&none, &[]))
        .err()
        .filter(|_| !Path::new("/usr/local/cuda/include/cuda_bf16.h").exists());
    if let Some(err) = err {
        let msg = err.to_string();
        assert!(msg.contains("/usr/local/cuda/include") && msg.contains("CUDA_HOME"), "{msg}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn arch_names_parse() {
    for (s, want) in [
        ("sm_90", "sm_90"),
        ("SM_90a", "sm_90a"),
        ("90", "sm_90"),
        ("9.0", "sm_90"),
        ("sm_100", "sm_100"),
    ] {
        assert_eq!(s.parse::<Arch>().unwrap().as_str(), want, "{s}");
    }
    for bad in ["", "sm_", "sm_9", "compute_90", "h100"] {
        assert!(bad.parse::<Arch>().is_err(), "{bad:?} must be rejected");
    }
    assert_eq!(Arch::from_compute_capability(9, 0).as_str(), "sm_90");
}

// ---- cuBLASLt plans --------------------------------------------------------------------------

/// Row-major reference: `out[b] = alpha·op(a[b])·op(b[b]) + beta·out[b] + bias`.
#[allow(clippy::too_many_arguments)]
fn row_major_gemm(
    s: &GemmShape,
    a: &[f32],
    b: &[f32],
    out0: &[f32],
    bias: Option<&[f32]>,
    alpha: f32,
    beta: f32,
) -> Vec<f32> {
    let mut out = out0.to_vec();
    for t in 0..s.batch {
        let (ao, bo, oo) = (t * s.a_batch_stride, t * s.b_batch_stride, t * s.out_batch_stride);
        for i in 0..s.m {
            for j in 0..s.n {
                let mut acc = 0f32;
                for p in 0..s.k {
                    let av = match s.trans_a {
                        Transpose::No => a[ao + i * s.k + p],
                        Transpose::Yes => a[ao + p * s.m + i],
                    };
                    let bv = match s.trans_b {
                        Transpose::No => b[bo + p * s.n + j],
                        Transpose::Yes => b[bo + j * s.k + p],
                    };
                    acc += av * bv;
                }
                let o = &mut out[oo + i * s.n + j];
                *o = alpha * acc + beta * *o + bias.map(|b| b[j]).unwrap_or(0.0);
            }
        }
    }
    out
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    // Small integers (never zero) keep f32 sums exact, so the comparison can be exact.
    (0..n as u64).map(|i| (((i * 7919 + seed * 104729) % 9) as f32) - 4.5).collect()
}

fn trans(t: bool) -> Transpose {
    if t {
        Transpose::Yes
    } else {
        Transpose::No
    }
}

proptest! {
    #[test]
    fn lt_plans_compute_the_row_major_product(
        m in 1usize..9, n in 1usize..9, k in 1usize..9, batch in 1usize..4,
        ta in any::<bool>(), tb in any::<bool>(), bca in any::<bool>(), bcb in any::<bool>(),
        bias in any::<bool>(), accumulate in any::<bool>(), bf16_out in any::<bool>(),
    ) {
        let out_dtype = if bf16_out { DType::BF16 } else { DType::F32 };
        let s = GemmShape::contiguous(
            m, n, k, batch, trans(ta), trans(tb), bca && batch > 1, bcb && batch > 1,
            DType::BF16, out_dtype, bias,
        );
        let p = plan(&s).unwrap();
        prop_assert_eq!((p.m, p.n, p.k), (n as u64, m as u64, k as u64));
        prop_assert_eq!(p.a.dtype, DType::BF16);
        prop_assert_eq!(p.d.dtype, out_dtype);
        prop_assert_eq!(p.op_a, if tb { LtOp::T } else { LtOp::N });
        prop_assert_eq!(p.op_b, if ta { LtOp::T } else { LtOp::N });
        let a_len = if s.a_batch_stride == 0 { m * k } else { batch * m * k };
        let b_len = if s.b_batch_stride == 0 { k * n } else { batch * k * n };
        prop_assert!(span(&p.b) <= a_len && span(&p.a) <= b_len);
        prop_assert_eq!(span(&p.d), batch * m * n);
        let a = values(a_len, 1);
        let b = values(b_len, 2);
        let out0 = values(batch * m * n, 3);
        let bias_v = values(n, 4);
        let (alpha, beta) = (1.5f32, if accumulate { 1.0 } else { 0.0 });
        let want = row_major_gemm(&s, &a, &b, &out0, bias.then_some(&bias_v[..]), alpha, beta);
        // cuBLASLt's A is our b, its B our a.
        let got = interpret(&p, &b, &a, &out0, bias.then_some(&bias_v[..]), alpha, beta);
        prop_assert_eq!(got, want);
    }
}

#[test]
fn lt_plan_rejects_what_cublaslt_cannot_do() {
    let ok = GemmShape::contiguous(
        4,
        4,
        4,
        2,
        Transpose::No,
        Transpose::No,
        false,
        false,
        DType::BF16,
        DType::F32,
        false,
    );
    assert!(plan(&ok).is_ok());
    assert!(plan(&GemmShape { input: DType::F64, ..ok }).is_err());
    assert!(plan(&GemmShape { m: 0, ..ok }).is_err());
    let summed = GemmShape { out_batch_stride: 0, ..ok };
    let msg = plan(&summed).unwrap_err().to_string();
    assert!(msg.contains("overlaps"), "{msg}");
    // cuBLASLt's type table: fp32 inputs go with an fp32 output only.
    let msg = plan(&GemmShape { input: DType::F32, output: DType::BF16, ..ok }).unwrap_err();
    let msg = msg.to_string();
    assert!(
        msg.contains("CUBLAS_STATUS_NOT_SUPPORTED")
            && msg.contains("fp32 inputs with a bf16 output"),
        "{msg}"
    );
    assert!(plan(&GemmShape { input: DType::F32, output: DType::F32, ..ok }).is_ok());
    assert!(plan(&GemmShape { input: DType::BF16, output: DType::BF16, ..ok }).is_ok());
}

/// The alignments declared to cuBLASLt hold for every batch item: the base address and, when
/// batched, the stride in bytes; capped at cuBLASLt's default of 256.
#[test]
fn lt_alignments_follow_pointers_and_batch_strides() {
    let s = GemmShape::contiguous(
        3,
        4,
        5,
        2,
        Transpose::No,
        Transpose::No,
        false,
        true,
        DType::BF16,
        DType::F32,
        false,
    );
    let base = 1u64 << 20;
    let p = GemmPtrs { a: base, b: base + 64, out: base + 4096, bias: None };
    // a: 3·5 bf16 = 30 bytes between batch items → 2; b broadcast → its base (64); out 3·4 f32 =
    // 48 bytes → 16.
    assert_eq!(alignments(&s, &p), LtAlign { a: 64, b: 2, c: 16, d: 16 });
    let single = GemmShape { batch: 1, ..s };
    assert_eq!(alignments(&single, &p), LtAlign { a: 64, b: 256, c: 256, d: 256 });
    assert!(check_alignment(&s, &alignments(&s, &p)).is_ok());
    let odd = GemmPtrs { a: base + 1, ..p };
    let e = check_alignment(&single, &alignments(&single, &odd)).unwrap_err().to_string();
    assert!(
        e.contains("CUBLAS_STATUS_NOT_SUPPORTED") && e.contains("operand a is only 1-byte aligned"),
        "{e}"
    );
}

// ---- profiling -------------------------------------------------------------------------------

#[test]
fn profile_windows_parse_and_fire_once() {
    let w: ProfileWindow = "10..12".parse().unwrap();
    assert_eq!(w, ProfileWindow { first: 10, last: 12 });
    assert_eq!("7".parse::<ProfileWindow>().unwrap(), ProfileWindow { first: 7, last: 7 });
    assert_eq!("3..=4".parse::<ProfileWindow>().unwrap(), ProfileWindow { first: 3, last: 4 });
    assert_eq!("10:12".parse::<ProfileWindow>().unwrap(), ProfileWindow { first: 10, last: 12 });
    assert!("0:3".parse::<ProfileWindow>().is_err());
    assert!("12..10".parse::<ProfileWindow>().is_err());
    assert!("x".parse::<ProfileWindow>().is_err());
    let fired: Vec<(u64, ProfileAction)> = (0..20)
        .flat_map(|s| w.before(s).map(|a| (s, a)).into_iter().chain(w.after(s).map(|a| (s, a))))
        .collect();
    assert_eq!(fired, vec![(10, ProfileAction::Start), (12, ProfileAction::Stop)]);
    // Without libnvToolsExt a range is a no-op; with it, a real range. Never a panic.
    let r = steel_runtime::cuda::profile::range("test range\0tail");
    assert_eq!(
        r.is_recording(),
        CudaLib::Nvtx.is_present() && std::env::var("STEEL_NVTX").as_deref() != Ok("0")
    );
}

// ---- without a driver ------------------------------------------------------------------------

#[test]
fn no_driver_means_errors_not_panics() {
    if let DriverProbe::Missing(why) = libs::probe_driver() {
        let e =
            steel_runtime::cuda::CudaContext::new(0).err().expect("no context without a driver");
        let msg = e.to_string();
        assert!(msg.starts_with("no CUDA driver found; use --device cpu"), "{msg} ({why})");
        let e = steel_runtime::cuda::CudaGpu::new(0).err().expect("no CudaGpu without a driver");
        assert!(e.to_string().contains("no CUDA driver found; use --device cpu"), "{e}");
        let e = steel_runtime::choose_device(steel_runtime::DeviceRequest::Cuda, true).unwrap_err();
        assert!(e.to_string().contains("no CUDA driver found; use --device cpu"), "{e}");
        assert!(matches!(libs::require(CudaLib::Driver), Err(CudaError::LibraryMissing { .. })));
        assert!(steel_runtime::cuda::profile::profiler_start().is_err());
        let nvml =
            steel_runtime::cuda::nvml::NvmlReader::new(0).err().expect("no NVML without a driver");
        assert!(nvml.to_string().starts_with("NVML: "), "{nvml}");
    }
    if !CudaLib::CublasLt.is_present() {
        let e = steel_runtime::cuda::gemm::LtGemm::new().err().expect("no handle without cuBLASLt");
        assert!(e.to_string().contains("libcublasLt"), "{e}");
    }
}

// ---- NVRTC -----------------------------------------------------------------------------------

/// NVRTC is present, or this test is skipped (and fails under `CI=true`).
fn nvrtc_or_skip(test: &str) -> bool {
    if CudaLib::Nvrtc.is_present() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: NVRTC is missing under CI=true (scripts/test.sh installs it and sets LD_LIBRARY_PATH)"
    );
    eprintln!("{test}: skipped, libnvrtc is not on LD_LIBRARY_PATH");
    false
}

const TEST_KERNEL: &str = r#"
#include <cuda_bf16.h>
#include "scale.cuh"
extern "C" __global__ void scale_bf16(__nv_bfloat16* x, int n) {
    __shared__ float tile[128];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = i < n ? __bfloat162float(x[i]) : 0.f;
    __syncthreads(); // why: every thread reads its neighbour's element below
    float v = tile[threadIdx.x] + tile[(threadIdx.x + 1) % blockDim.x];
    if (i < n) x[i] = __float2bfloat16(SCALE * v);
}
"#;

#[test]
fn nvrtc_compiles_a_cubin_with_the_ptxas_report_and_caches_it() {
    if !nvrtc_or_skip("nvrtc_compiles_a_cubin") {
        return;
    }
    let dir = temp_dir("nvrtc");
    let compiler = Compiler::new(Some(CubinCache::new(&dir))).unwrap();
    assert!(compiler.version().0 >= 12, "NVRTC {:?}", compiler.version());
    let arch: Arch = "sm_90".parse().unwrap();
    let src = Source { name: "scale.cu", text: TEST_KERNEL };
    let headers = [("scale.cuh", "#define SCALE 0.5f\n")];
    let first = compiler.compile(src, &headers, &arch, &[]).unwrap();
    assert!(!first.cached);
    assert_eq!(&first.cubin[..4], b"\x7fELF", "a cubin is an ELF image");
    let k = first.kernels();
    assert_eq!(k.len(), 1, "{}", first.log);
    assert_eq!((k[0].name.as_str(), k[0].arch.as_str()), ("scale_bf16", "sm_90"));
    assert!(k[0].registers > 0 && k[0].shared_bytes == 512 && k[0].barriers == 1, "{:?}", k[0]);
    assert!(!k[0].spills());
    assert!(first.warnings().is_empty(), "{}", first.log);
    let again = compiler.compile(src, &headers, &arch, &[]).unwrap();
    assert!(again.cached);
    assert_eq!((again.kernels(), again.cubin), (k, first.cubin.clone()));
    // A changed header is a different program.
    let changed =
        compiler.compile(src, &[("scale.cuh", "#define SCALE 2.0f\n")], &arch, &[]).unwrap();
    assert!(!changed.cached);
    // Errors come back with NVRTC's log, naming the file.
    let bad = compiler
        .compile(
            Source {
                name: "bad.cu",
                text: "extern \"C\" __global__ void f() { undefined_thing(); }",
            },
            &[],
            &arch,
            &[],
        )
        .unwrap_err();
    let msg = bad.to_string();
    assert!(msg.contains("bad.cu") && msg.contains("undefined_thing"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

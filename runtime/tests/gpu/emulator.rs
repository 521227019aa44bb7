use super::*;

// ---- emulator semantics -------------------------------------------------------------------------

/// Launches a test kernel of `test_emu.cu` with raw parameter words.
pub(crate) fn launch_raw(
    gpu: &EmuGpu,
    symbol: &'static str,
    cfg: LaunchConfig,
    words: &[u64],
) -> steel_runtime::Result<()> {
    // SAFETY: each caller passes the kernel's exact parameter struct (pointer and size words)
    // addressing live allocations of `gpu` that cover what the kernel touches when it is correct.
    unsafe { gpu.launch(symbol, cfg, bytemuck::cast_slice(words)) }
}

fn download_i32(gpu: &EmuGpu, ptr: u64, n: usize) -> Vec<i32> {
    let mut bytes = vec![0u8; n * 4];
    // SAFETY: the caller's allocation holds n values.
    unsafe { gpu.download(ptr, &mut bytes).unwrap() };
    bytemuck::cast_slice(&bytes).to_vec()
}

#[test]
fn emu_warp_collectives_atomics_and_shared_memory() {
    let gpu = EmuGpu::new();
    let (blocks, threads) = (3usize, 64usize);
    let out = gpu.alloc(blocks * threads * 8 * 4).unwrap();
    let counter = gpu.alloc(4).unwrap();
    let sums = gpu.alloc(blocks * 4).unwrap();
    // SAFETY: one u32 in a live allocation.
    unsafe { gpu.upload(counter, &0u32.to_le_bytes()).unwrap() };
    let cfg = LaunchConfig {
        grid: Dim3::x(blocks as u32),
        block: Dim3::x(threads as u32),
        shared_bytes: (threads * 4) as u32,
    };
    launch_raw(&gpu, "emu_test_warp_ops", cfg, &[out, counter, sums]).unwrap();
    let o = download_i32(&gpu, out, blocks * threads * 8);
    for b in 0..blocks {
        let v = |t: usize| (t * 10 + b) as i32;
        for t in 0..threads {
            let (lane, warp0) = (t % 32, t - t % 32);
            let got = &o[(b * threads + t) * 8..][..8];
            let down = if lane + 3 < 32 { v(t + 3) } else { v(t) };
            let up = if lane >= 5 { v(t - 5) } else { v(t) };
            let idx16 = v(warp0 + (lane & !15) + 7);
            let ballot = (0..32).filter(|l| l % 3 == 0).fold(0u32, |a, l| a | (1 << l)) as i32;
            let any = i32::from(warp0 == 32);
            let want = [v(t ^ 1), down, up, idx16, ballot, any, 0, v(threads - 1 - t)];
            assert_eq!(got, want, "block {b} thread {t}");
        }
    }
    assert_eq!(download_i32(&gpu, counter, 1)[0] as usize, blocks * threads, "atomicAdd count");
    let s: Vec<f32> =
        download_i32(&gpu, sums, blocks).into_iter().map(|x| f32::from_bits(x as u32)).collect();
    let want = (0..threads).sum::<usize>() as f32;
    assert_eq!(s, vec![want; blocks], "block_sum of threadIdx.x");
}

#[test]
fn emu_ldmatrix_fragment_layout() {
    let gpu = EmuGpu::new();
    // 32 rows of 8 bf16: element (row, col) holds the integer row · 8 + col (exact in bf16).
    let src: Vec<bf16> = (0..256).map(|i| bf16::from_f32(i as f32)).collect();
    let sp = gpu.alloc(512).unwrap();
    let op = gpu.alloc(32 * 8 * 4).unwrap();
    // SAFETY: 512 bytes in a live allocation.
    unsafe { gpu.upload(sp, bytemuck::cast_slice(&src)).unwrap() };
    let cfg = LaunchConfig { grid: Dim3::x(1), block: Dim3::x(32), shared_bytes: 0 };
    launch_raw(&gpu, "emu_test_ldmatrix", cfg, &[sp, op]).unwrap();
    let out = download_i32(&gpu, op, 32 * 8);
    let pair = |r: u32| {
        let lo = bf16::from_bits(r as u16).to_f32() as usize;
        let hi = bf16::from_bits((r >> 16) as u16).to_f32() as usize;
        (lo, hi)
    };
    for lane in 0..32 {
        for j in 0..4 {
            let at = |row: usize, col: usize| (j * 8 + row) * 8 + col;
            // Plain: (row lane/4, cols 2(lane%4) + {0,1}) of matrix j.
            let want = (at(lane / 4, 2 * (lane % 4)), at(lane / 4, 2 * (lane % 4) + 1));
            assert_eq!(pair(out[lane * 8 + j] as u32), want, "ldmatrix lane {lane} matrix {j}");
            // Transposed: (rows 2(lane%4) + {0,1}, col lane/4).
            let want_t = (at(2 * (lane % 4), lane / 4), at(2 * (lane % 4) + 1, lane / 4));
            assert_eq!(
                pair(out[lane * 8 + 4 + j] as u32),
                want_t,
                "ldmatrix.trans lane {lane} matrix {j}"
            );
        }
    }
}

#[test]
fn emu_barrier_divergence_reports_kernel() {
    let gpu = EmuGpu::new();
    let out = gpu.alloc(64 * 4).unwrap();
    let cfg = LaunchConfig { grid: Dim3::x(2), block: Dim3::x(64), shared_bytes: 0 };
    gpu.nvtx_push("test");
    let err = launch_raw(&gpu, "emu_test_divergent_barrier", cfg, &[out]).unwrap_err().to_string();
    gpu.nvtx_pop();
    for needle in [
        "emu_test_divergent_barrier",
        "__syncthreads",
        "16 of 64 threads",
        "48 threads exited",
        "(in test)",
    ] {
        assert!(err.contains(needle), "the error should mention {needle:?}: {err}");
    }
}

#[test]
fn emu_launch_rejects_bad_parameters_and_configurations() {
    let gpu = EmuGpu::new();
    let out = gpu.alloc(64 * 4).unwrap();
    let ok = LaunchConfig { grid: Dim3::x(1), block: Dim3::x(32), shared_bytes: 0 };
    let e =
        launch_raw(&gpu, "emu_test_divergent_barrier", ok, &[out, out]).unwrap_err().to_string();
    assert!(e.contains("8 bytes") && e.contains("16 were passed"), "{e}");
    let e = launch_raw(&gpu, "no_such_kernel", ok, &[out]).unwrap_err().to_string();
    assert!(e.contains("no_such_kernel"), "{e}");
    let big = LaunchConfig { block: Dim3::x(2048), ..ok };
    let e = launch_raw(&gpu, "emu_test_divergent_barrier", big, &[out]).unwrap_err().to_string();
    assert!(e.contains("invalid launch configuration"), "{e}");
}

#[test]
fn emu_nvtx_names_are_hierarchical_and_workspaces_are_freed() {
    let g = emu();
    let (x, r, w) = (f32_rand(&[3, 40], 1), f32_rand(&[3, 40], 2), f32_rand(&[40], 3));
    let (gx, gr, gw) = (g.upload(&x).unwrap(), g.upload(&r).unwrap(), g.upload(&w).unwrap());
    let before = g.gpu().allocated_bytes();
    g.gpu().nvtx_push("fwd");
    g.gpu().nvtx_push("layer.3");
    let (sum, _y, rstd) = g.add_rms_norm_fwd(&gx, &gr, &gw, 1e-6).unwrap();
    g.gpu().nvtx_pop();
    g.gpu().nvtx_push("bwd");
    let zeros = |shape: &[usize]| g.zeros(shape, DType::F32).unwrap();
    let (dx, dr, dw) = (zeros(&[3, 40]), zeros(&[3, 40]), zeros(&[40]));
    let before_bwd = g.gpu().allocated_bytes();
    g.add_rms_norm_bwd(&sum, &gw, &rstd, &gx, None, &dx, &dr, &dw).unwrap();
    assert_eq!(g.gpu().allocated_bytes(), before_bwd, "the dw workspace is returned");
    g.gpu().nvtx_pop();
    g.gpu().nvtx_pop();
    let log = g.gpu().launches();
    assert_eq!(log[0].nvtx, "fwd/layer.3/add_rms_norm_fwd");
    assert!(log[1..].iter().all(|l| l.nvtx == "fwd/bwd/add_rms_norm_bwd"), "{log:?}");
    assert_eq!(
        g.gpu().nvtx_ranges(),
        [
            "fwd",
            "fwd/layer.3",
            "fwd/layer.3/add_rms_norm_fwd",
            "fwd/bwd",
            "fwd/bwd/add_rms_norm_bwd"
        ]
    );
    drop((sum, _y, rstd, dx, dr, dw));
    assert_eq!(g.gpu().allocated_bytes(), before, "every buffer is freed when its tensor drops");
}

#[test]
fn emu_tensors_stay_on_the_device() {
    let g = emu();
    let t = g.upload(&f32_rand(&[4], 9)).unwrap();
    assert_eq!(t.device(), steel_runtime::Device::Cuda(0));
    assert!(t.to_vec::<f32>().is_err(), "a device tensor is not readable as host memory");
    let host = f32_rand(&[4], 9);
    assert!(
        g.add_rms_norm_fwd(&host, &host, &f32_rand(&[4], 1), 1e-6).is_err(),
        "CPU tensors are refused"
    );
}

/// The collective of `EmuGpu`: three ranks, each with its own emulated device, reduce, gather,
/// scatter and broadcast device tensors; results equal the direct computation on every rank.
#[test]
fn emu_staged_collectives_match_direct_computation() {
    use steel_runtime::comm::{Communicator, InProcessComm, ReduceOp};
    use steel_runtime::gpu::StagedComm;
    let (world, n) = (3usize, 37usize);
    let data = move |rank: usize| rand_vals(n, 100 + rank as u64);
    let handles: Vec<_> = InProcessComm::group(world)
        .unwrap()
        .into_iter()
        .map(|c| {
            std::thread::spawn(move || {
                let r = c.rank();
                let mut comm = StagedComm::new(c);
                let g = GpuBackend::new(Arc::new(EmuGpu::with_ordinal(r)));
                let host = Tensor::from_f64(&data(r), &[n], DType::F32).unwrap();
                let t = g.upload(&host).unwrap();
                comm.all_reduce(&t, ReduceOp::Sum).unwrap();
                let gathered = g.empty(&[world * n], DType::F32).unwrap();
                comm.all_gather(&g.upload(&host).unwrap(), &gathered).unwrap();
                let big = Tensor::from_f64(&rand_vals(world * n, 7), &[world * n], DType::F32);
                let scattered = g.empty(&[n], DType::F32).unwrap();
                comm.reduce_scatter(&g.upload(&big.unwrap()).unwrap(), &scattered, ReduceOp::Avg)
                    .unwrap();
                let b = g.upload(&host).unwrap();
                comm.broadcast(&b, 1).unwrap();
                [&t, &gathered, &scattered, &b].map(|x| vals(&g.download(x).unwrap()))
            })
        })
        .collect();
    let outs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32 as f64).collect::<Vec<_>>();
    let inputs: Vec<Vec<f64>> = (0..world).map(|r| f32s(data(r))).collect();
    let sum: Vec<f64> =
        (0..n).map(|i| inputs.iter().fold(0f32, |a, x| a + x[i] as f32) as f64).collect();
    let gathered: Vec<f64> = inputs.concat();
    let big = f32s(rand_vals(world * n, 7));
    for (r, [t, g, s, b]) in outs.iter().enumerate() {
        assert_eq!(t, &sum, "all_reduce on rank {r}");
        assert_eq!(g, &gathered, "all_gather on rank {r}");
        // Every rank contributed the same `big`, so the average is `big` itself (up to rounding).
        assert_rel_norm(&format!("reduce_scatter on rank {r}"), s, &big[r * n..][..n], F32_TOL);
        assert_eq!(b, &inputs[1], "broadcast on rank {r}");
    }
}

/// A barrier-bound kernel gives the right result; with `--ignored --nocapture` it reports the
/// emulator's cost per fiber switch (`cargo test --release emu_sync_loop -- --ignored`).
fn run_sync_loop(blocks: usize, threads: usize, iterations: usize) -> std::time::Duration {
    let gpu = EmuGpu::new();
    let out = gpu.alloc(blocks * threads * 4).unwrap();
    let cfg = LaunchConfig {
        grid: Dim3::x(blocks as u32),
        block: Dim3::x(threads as u32),
        shared_bytes: 0,
    };
    let t0 = std::time::Instant::now();
    launch_raw(&gpu, "emu_test_sync_loop", cfg, &[out, iterations as u64]).unwrap();
    let elapsed = t0.elapsed();
    let got = download_i32(&gpu, out, blocks * threads);
    for t in 0..threads {
        let want: f32 = (0..iterations)
            .map(|i| ((t + 1) % threads + i) as f32 + (t ^ 1) as f32)
            .fold(0.0, |a, x| a + x);
        for b in 0..blocks {
            assert_eq!(f32::from_bits(got[b * threads + t] as u32), want, "block {b} thread {t}");
        }
    }
    elapsed
}

#[test]
fn emu_sync_loop_is_exact() {
    run_sync_loop(3, 96, 5);
}

#[test]
#[ignore = "timing report, run with --ignored --nocapture"]
fn emu_sync_loop_switch_cost() {
    let (blocks, threads, iterations) = (8, 256, 200);
    let d = run_sync_loop(blocks, threads, iterations);
    // Per thread and iteration: two block barriers and one shuffle = 3 switches out and back.
    let switches = (blocks * threads * iterations * 3) as f64;
    println!(
        "emu_test_sync_loop: {blocks} blocks × {threads} threads × {iterations} rounds in {:.1} ms, \
         {:.0} ns per fiber switch (incl. scheduling)",
        d.as_secs_f64() * 1e3,
        d.as_secs_f64() * 1e9 / switches
    );
}

/// A fiber that overflows its stack is reported with the kernel's name (in a child process,
/// since the report aborts), and the same kernel runs with a larger `STEEL_EMU_STACK_KB`.
#[test]
fn emu_stack_overflow_is_reported() {
    if std::env::var_os("STEEL_EMU_STACK_CHILD").is_some() {
        let gpu = EmuGpu::new();
        let out = gpu.alloc(2 * 4).unwrap();
        let cfg = LaunchConfig { grid: Dim3::x(2), block: Dim3::x(32), shared_bytes: 0 };
        launch_raw(&gpu, "emu_test_stack", cfg, &[out, 3]).unwrap();
        return;
    }
    let run = |stack_kb: &str| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "gpu::emulator::emu_stack_overflow_is_reported", "--test-threads=1"])
            .env("STEEL_EMU_STACK_CHILD", "1")
            .env("STEEL_EMU_STACK_KB", stack_kb)
            .output()
            .unwrap()
    };
    let small = run("64");
    let err = String::from_utf8_lossy(&small.stderr);
    assert!(!small.status.success(), "a 128 KiB frame on a 64 KiB stack must not pass");
    for needle in ["emu_test_stack", "overflowed its 64 KiB fiber stack", "STEEL_EMU_STACK_KB"] {
        assert!(err.contains(needle), "the report should mention {needle:?}: {err}");
    }
    let big = run("512");
    assert!(big.status.success(), "{}", String::from_utf8_lossy(&big.stderr));
}

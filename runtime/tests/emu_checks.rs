//! The emulator's detectors, each against a kernel of `test_emu.cu` broken on purpose (one bug
//! per mode of `emu_test_broken`, plus kernels for launch bounds, dynamic shared memory, cp.async
//! and warp-synchronous code): every broken kernel fails with the detector's message naming the
//! kernel, and every correct kernel passes with the same bits under every schedule. All names
//! start with `emu_` (`cargo test emu`).

use crate::common::*;
use crate::gpu::launch_raw;
use steel_runtime::gpu::{Check, Dim3, EmuGpu, Gpu, LaunchConfig, Schedule};

/// Mirrors the `EMU_BROKEN_*` modes of test_emu.cu.
#[derive(Clone, Copy, Debug)]
enum Broken {
    Raw = 0,
    War = 1,
    CrossBlock = 2,
    Uninit = 3,
    OobGlobal = 4,
    Collective = 5,
    Masks = 6,
    OobShared = 7,
    Ldmatrix = 8,
    ShflOrder = 9,
    None = 10,
    OobFar = 11,
    Exit = 12,
}

fn cfg(blocks: u32, threads: u32, shared: u32) -> LaunchConfig {
    LaunchConfig { grid: Dim3::x(blocks), block: Dim3::x(threads), shared_bytes: shared }
}

fn upload_f32(gpu: &EmuGpu, v: &[f32]) -> u64 {
    let p = gpu.alloc(v.len() * 4).unwrap();
    // SAFETY: the allocation holds v.len() floats.
    unsafe { gpu.upload(p, bytemuck::cast_slice(v)).unwrap() };
    p
}

fn download_f32(gpu: &EmuGpu, p: u64, n: usize) -> Vec<f32> {
    let mut b = vec![0u8; n * 4];
    // SAFETY: the caller's allocation holds n floats.
    unsafe { gpu.download(p, &mut b).unwrap() };
    bytemuck::cast_slice(&b).to_vec()
}

/// Runs `emu_test_broken` in `mode` over `blocks` × `threads` (out and src of `threads` floats).
fn run_broken(
    gpu: &EmuGpu,
    mode: Broken,
    blocks: u32,
    threads: u32,
) -> (steel_runtime::Result<()>, Vec<f32>) {
    let n = threads as usize;
    let src: Vec<f32> = rand_vals(n, 5).into_iter().map(|v| v as f32).collect();
    let out = gpu.alloc(n * 4).unwrap();
    let src_p = upload_f32(gpu, &src);
    let r = launch_raw(
        gpu,
        "emu_test_broken",
        cfg(blocks, threads, 0),
        &[out, src_p, n as u64, mode as u64],
    );
    let got = if r.is_ok() { download_f32(gpu, out, n) } else { Vec::new() };
    (r, got)
}

fn err_of(r: steel_runtime::Result<()>) -> String {
    r.expect_err("the broken kernel must fail").to_string()
}

fn assert_mentions(e: &str, needles: &[&str]) {
    for n in needles {
        assert!(e.contains(n), "the report should mention {n:?}:\n{e}");
    }
}

fn rr() -> EmuGpu {
    EmuGpu::new().with_schedule(Schedule::RoundRobin).with_check(Check::Full)
}

#[test]
fn emu_reports_shared_memory_races_read_after_write_and_write_after_read() {
    // After the barrier, round-robin runs its last arrival (thread 63) on, then threads 0, 1, …:
    // thread 63 writes buf[63] and reads buf[62] or buf[0]; thread 0 then reads buf[63] (RAW) in
    // the first kernel, and in the second overwrites buf[0], which thread 63 has read (WAR).
    let (r, _) = run_broken(&rr(), Broken::Raw, 1, 64);
    assert_mentions(
        &err_of(r),
        &[
            "kernel emu_test_broken, block (0,0,0)",
            "data race (read-after-write)",
            "offset 252 of shared `buf` (4096 bytes, test_emu.cu:",
            "thread (0,0,0) reads 4 bytes",
            "thread (63,0,0) wrote them",
            "with no barrier between them",
        ],
    );
    let (r, _) = run_broken(&rr(), Broken::War, 1, 64);
    assert_mentions(
        &err_of(r),
        &[
            "data race (write-after-read)",
            "offset 0 of shared `buf`",
            "thread (0,0,0) writes 4 bytes",
            "thread (63,0,0) read them",
        ],
    );
    // Every schedule sees a race in both (which kind depends on the order).
    for s in Schedule::all(3) {
        for mode in [Broken::Raw, Broken::War] {
            let (r, _) = run_broken(&EmuGpu::new().with_schedule(s), mode, 2, 96);
            assert_mentions(&err_of(r), &["emu_test_broken", "data race"]);
        }
    }
}

#[test]
fn emu_race_reports_name_source_lines_when_the_objects_are_here() {
    let (r, _) = run_broken(&rr(), Broken::Raw, 1, 64);
    // Both accesses, resolved by addr2line from the kernel object's line tables.
    let e = err_of(r);
    assert_eq!(e.matches("(at test_emu.cu:").count(), 2, "{e}");
    assert!(e.contains("in emu_test_broken"), "{e}");
}

#[test]
fn emu_shuffles_do_not_order_shared_memory() {
    let (r, _) = run_broken(&rr(), Broken::ShflOrder, 1, 32);
    assert_mentions(&err_of(r), &["data race (read-after-write)", "thread (0,0,0) wrote them"]);
}

#[test]
fn emu_reports_cross_block_global_races() {
    let (r, _) = run_broken(&rr(), Broken::CrossBlock, 3, 32);
    assert_mentions(
        &err_of(r),
        &[
            "kernel emu_test_broken",
            "data race (write-after-write)",
            "of device allocation #",
            "blocks are never ordered within a launch",
        ],
    );
    // Shared-only checking does not look at global memory races.
    let (r, out) = run_broken(&EmuGpu::new().with_check(Check::Shared), Broken::CrossBlock, 3, 32);
    r.unwrap();
    assert!(out.iter().all(|&v| (0.0..3.0).contains(&v)), "{out:?}");
}

#[test]
fn emu_reports_uninitialised_shared_reads() {
    let (r, _) = run_broken(&rr(), Broken::Uninit, 1, 32);
    assert_mentions(
        &err_of(r),
        &["thread (0,0,0) reads 4 bytes of uninitialised shared memory at offset 0 of shared `buf`"],
    );
}

#[test]
fn emu_reports_out_of_bounds_global_and_shared_accesses() {
    let (r, _) = run_broken(&rr(), Broken::OobGlobal, 1, 64);
    assert_mentions(
        &err_of(r),
        &[
            "out-of-bounds global memory access",
            "writes 4 bytes at offset 256 of device allocation #",
            "(256 bytes)",
        ],
    );
    let (r, _) = run_broken(&rr(), Broken::OobShared, 1, 64);
    assert_mentions(
        &err_of(r),
        &[
            "out-of-bounds shared memory access",
            "writes 4 bytes at offset 4096 of shared `buf` (4096 bytes",
        ],
    );
    // With the checker off, the canary after the allocation still catches the write (60 floats:
    // 240 bytes, rounded up to 256 with a canary; at 256 bytes the write would hit the guard page).
    let (r, _) = run_broken(&EmuGpu::new().with_check(Check::Off), Broken::OobGlobal, 1, 60);
    assert_mentions(
        &err_of(r),
        &["emu_test_broken wrote outside its allocations", "1 bytes past its end"],
    );
}

/// Far past the end, with the checker off, the access hits the allocation's guard page; the fault
/// handler names the kernel (in a child process: the report aborts).
#[test]
fn emu_guard_pages_catch_what_the_checker_does_not_see() {
    if std::env::var_os("STEEL_EMU_GUARD_CHILD").is_some() {
        let _ = run_broken(&EmuGpu::new().with_check(Check::Off), Broken::OobFar, 1, 64);
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "emu_checks::emu_guard_pages_catch_what_the_checker_does_not_see"])
        .env("STEEL_EMU_GUARD_CHILD", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_mentions(&err, &["kernel emu_test_broken", "out-of-bounds access", "guard page"]);
    // With the checker on, the same access is an ordinary launch error.
    let (r, _) = run_broken(&rr(), Broken::OobFar, 1, 64);
    assert_mentions(
        &err_of(r),
        &["out-of-bounds global memory access", "offset 512 of device allocation"],
    );
}

#[test]
fn emu_reports_mismatched_collectives() {
    let (r, _) = run_broken(&rr(), Broken::Collective, 1, 32);
    assert_mentions(
        &err_of(r),
        &[
            "kernel emu_test_broken",
            "thread (16,0,0)",
            "reaches __ballot_sync/__any_sync/__all_sync with mask 0xffffffff",
            "while lanes 0xffff wait for it at __shfl_*_sync with the same mask",
        ],
    );
    // Reversed, lanes 16..31 open a full-mask shuffle; lanes 0..15 shuffle among themselves and
    // exit, leaving the full mask waiting for them.
    let (r, _) = run_broken(&EmuGpu::new().with_schedule(Schedule::Reverse), Broken::Masks, 1, 32);
    assert_mentions(
        &err_of(r),
        &["exits while lanes 0xffff0000 of its warp wait for it at __shfl_*_sync (mask 0xffffffff"],
    );
    // Round-robin: lane 15 completes the half-mask shuffle and exits before lanes 16..31 reach
    // the full mask, which then names an exited lane.
    let (r, _) = run_broken(&rr(), Broken::Masks, 1, 32);
    assert_mentions(&err_of(r), &["with mask 0xffffffff names lanes 0x8000 that have exited"]);
    let (r, _) = run_broken(&rr(), Broken::Exit, 1, 32);
    assert_mentions(&err_of(r), &["thread (1,0,0)", "names lanes 0x1 that have exited"]);
}

#[test]
fn emu_ldmatrix_reads_only_shared_memory() {
    let (r, _) = run_broken(&rr(), Broken::Ldmatrix, 1, 32);
    assert_mentions(&err_of(r), &["ldmatrix address", "is not in the block's shared memory"]);
}

#[test]
fn emu_refuses_a_block_wider_than_the_kernels_launch_bounds() {
    let gpu = rr();
    let out = gpu.alloc(128 * 4).unwrap();
    launch_raw(&gpu, "emu_test_bounds", cfg(1, 64, 0), &[out]).unwrap();
    let e = launch_raw(&gpu, "emu_test_bounds", cfg(1, 65, 0), &[out]).unwrap_err().to_string();
    assert_mentions(
        &e,
        &["kernel emu_test_bounds", "65 threads exceeds its __launch_bounds__(64)"],
    );
    let tall =
        LaunchConfig { grid: Dim3::x(1), block: Dim3 { x: 1, y: 1, z: 65 }, shared_bytes: 0 };
    let e = launch_raw(&gpu, "emu_test_bounds", tall, &[out]).unwrap_err().to_string();
    assert_mentions(&e, &["invalid launch configuration"]);
}

#[test]
fn emu_dynamic_shared_memory_above_48_kib_needs_the_opt_in() {
    let gpu = rr();
    let (threads, floats) = (256usize, 16 * 1024usize); // 64 KiB
    let out = gpu.alloc(threads * 4).unwrap();
    let c = cfg(1, threads as u32, (floats * 4) as u32);
    let e = launch_raw(&gpu, "emu_test_dyn_shared", c, &[out, floats as u64]).unwrap_err();
    assert_mentions(
        &e.to_string(),
        &[
            "kernel emu_test_dyn_shared",
            "65536 bytes of dynamic shared memory exceed 48 KiB without the per-kernel opt-in",
        ],
    );
    gpu.opt_in_dynamic_shared("emu_test_dyn_shared", (floats * 4) as u32).unwrap();
    launch_raw(&gpu, "emu_test_dyn_shared", c, &[out, floats as u64]).unwrap();
    let got = download_f32(&gpu, out, threads);
    for (t, &g) in got.iter().enumerate() {
        let want: f32 = ((t + 1) % threads..floats).step_by(threads).map(|i| (i % 7) as f32).sum();
        assert_eq!(g, want, "thread {t}");
    }
    // More than a block can have is refused at the opt-in.
    let e = gpu.opt_in_dynamic_shared("emu_test_dyn_shared", 228 * 1024).unwrap_err();
    assert!(e.to_string().contains("exceed"), "{e}");
}

#[test]
fn emu_cp_async_lands_at_its_wait() {
    let threads = 128usize;
    let src: Vec<f32> = rand_vals(threads * 4, 9).into_iter().map(|v| v as f32).collect();
    for s in Schedule::all(5) {
        let gpu = EmuGpu::new().with_schedule(s);
        let (sp, out) = (upload_f32(&gpu, &src), gpu.alloc(2 * threads * 16).unwrap());
        launch_raw(&gpu, "emu_test_cp_async", cfg(2, threads as u32, 0), &[sp, out, 0]).unwrap();
        let got = download_f32(&gpu, out, 2 * threads * 4);
        for t in 0..2 * threads {
            let o = (t + 1) % threads;
            assert_eq!(&got[t * 4..t * 4 + 4], &src[o * 4..o * 4 + 4], "thread {t} under {s}");
        }
        // Without the wait, the neighbour's row has not landed when it is read after the
        // barrier; without the barrier, it has not even been issued, or has not landed, or lands
        // unordered with the read — whichever the schedule shows, a detector reports it.
        let run = |mode: u64| {
            launch_raw(&gpu, "emu_test_cp_async", cfg(1, threads as u32, 0), &[sp, out, mode])
                .unwrap_err()
                .to_string()
        };
        assert_mentions(
            &run(1),
            &["emu_test_cp_async", "which a cp.async of thread", "has not yet written"],
        );
        let e = run(2);
        assert!(
            ["has not yet written", "uninitialised shared memory", "data race"]
                .iter()
                .any(|m| e.contains(m)),
            "{e}"
        );
    }
}

/// Lanes 0..15 shuffle twice with a half mask while lanes 16..31 shuffle once with the other
/// half, then the whole warp shuffles: each exchange is its own, so the last one reads the
/// values of that exchange (per-lane slot parity would read stale ones).
#[test]
fn emu_exchanges_are_numbered_per_collective_not_per_lane() {
    for s in Schedule::all(1) {
        let gpu = EmuGpu::new().with_schedule(s);
        let out = gpu.alloc(64 * 4).unwrap();
        launch_raw(&gpu, "emu_test_partial_masks", cfg(1, 64, 0), &[out]).unwrap();
        let got = download_f32(&gpu, out, 64);
        let before = |t: usize| -> f32 {
            let (lane, base) = (t % 32, t - t % 32);
            let v = |l: usize| (base + l) as f32;
            if lane < 16 {
                let a = |l: usize| v(l) + v(l ^ 1);
                a(lane) + a(lane ^ 2)
            } else {
                v(lane) + v(lane ^ 1)
            }
        };
        for (t, &g) in got.iter().enumerate() {
            assert_eq!(g, before(t ^ 16), "thread {t} under {s}");
        }
    }
}

/// The correct kernels: the same bits under every schedule, and the right values.
#[test]
fn emu_correct_kernels_pass_under_every_schedule() {
    let (threads, blocks) = (96usize, 3usize);
    let x: Vec<f32> = rand_vals(threads * blocks, 21).into_iter().map(|v| v as f32).collect();
    let mut runs = Vec::new();
    for s in Schedule::all(77) {
        let gpu = EmuGpu::new().with_schedule(s).with_check(Check::Full);
        // every thread's own slot, one barrier
        let (r, none) = run_broken(&gpu, Broken::None, 1, threads as u32);
        r.unwrap();
        // each shared helper twice on the same scratch
        let (xp, o1, o2) =
            (upload_f32(&gpu, &x), gpu.alloc(blocks * 16).unwrap(), gpu.alloc(blocks * 8).unwrap());
        let c = cfg(blocks as u32, threads as u32, 0);
        launch_raw(&gpu, "emu_test_helpers_twice", c, &[xp, o1, o2]).unwrap();
        let helpers = download_f32(&gpu, o1, blocks * 4);
        let neg = download_f32(&gpu, o2, blocks * 2);
        // warp-synchronous exchange through shared memory, __syncwarp only
        let out = gpu.alloc(threads * 4).unwrap();
        launch_raw(&gpu, "emu_test_syncwarp_exchange", cfg(1, threads as u32, 0), &[out, 3])
            .unwrap();
        let warp = download_f32(&gpu, out, threads);
        runs.push((s, none, helpers, neg, warp));
    }
    let (_, none, helpers, neg, warp) = &runs[0];
    for (s, n2, h2, neg2, w2) in &runs[1..] {
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same(none, n2) && same(helpers, h2) && same(neg, neg2) && same(warp, w2), "{s}");
    }
    let src: Vec<f32> = rand_vals(threads, 5).into_iter().map(|v| v as f32).collect();
    assert_eq!(none, &src.iter().rev().copied().collect::<Vec<_>>());
    for b in 0..blocks {
        let xs = &x[b * threads..(b + 1) * threads];
        let sum: f64 = xs.iter().map(|&v| v as f64).sum();
        let tol = 1e-5 * xs.iter().map(|v| v.abs() as f64).sum::<f64>();
        let h = &helpers[b * 4..b * 4 + 4];
        assert!((h[0] as f64 - sum).abs() <= tol, "block_sum {} vs {sum}", h[0]);
        assert!((h[1] as f64 - 2.0 * sum).abs() <= 2.0 * tol, "second block_sum {}", h[1]);
        let stats = |sign: f32| {
            let m = xs.iter().map(|&v| sign * v).fold(f32::NEG_INFINITY, f32::max);
            (m, xs.iter().map(|&v| ((sign * v - m) as f64).exp()).sum::<f64>())
        };
        for ((m, e), (gm, ge)) in
            [(stats(1.0), (h[2], h[3])), (stats(-1.0), (neg[b * 2], neg[b * 2 + 1]))]
        {
            assert_eq!(gm, m, "block softmax max");
            assert!((ge as f64 - e).abs() <= 1e-5 * e, "block softmax sum {ge} vs {e}");
        }
    }
    for (t, &w) in warp.iter().enumerate() {
        let (lane, base) = (t % 32, t - t % 32);
        let want: f32 = (0..3).map(|r| ((base + (lane + 1) % 32) * 3 + r) as f32).sum();
        assert_eq!(w, want, "warp exchange thread {t}");
    }
}

#[test]
fn emu_rejects_invalid_schedule_settings() {
    assert!("random:x".parse::<Schedule>().is_err());
    assert_eq!("random:42".parse::<Schedule>(), Ok(Schedule::Random(42)));
    assert_eq!("warp".parse::<Schedule>(), Ok(Schedule::WarpMajor));
    for s in Schedule::all(9) {
        assert_eq!(s.to_string().parse::<Schedule>(), Ok(s));
    }
}

/// The distance of `got` from the exact `e` in units in the last place of `e` (as an f32).
fn ulps(got: f32, e: f64) -> f64 {
    let f = (e as f32).abs();
    let ulp = (f.next_up() - f) as f64;
    (got as f64 - e).abs() / ulp
}

/// The emulator's math follows the device's documented accuracy (CUDA Math API): within its
/// error bound of the exact value, but not bit-identical to exact rounding; multiply-adds
/// contract as NVRTC's `--fmad=true` makes them.
#[test]
fn emu_device_math_follows_the_documented_accuracy() {
    let n = 4096usize;
    let x: Vec<f32> = rand_vals(n, 31).into_iter().map(|v| (v * 10.0) as f32).collect();
    let y: Vec<f32> =
        rand_vals(n, 32).into_iter().map(|v| (v.abs() * 50.0 + 0.01) as f32).collect();
    let gpu = rr();
    let (xp, yp, out) = (upload_f32(&gpu, &x), upload_f32(&gpu, &y), gpu.alloc(n * 48).unwrap());
    launch_raw(
        &gpu,
        "emu_test_math",
        cfg(n.div_ceil(256) as u32, 256, 0),
        &[xp, yp, out, n as u64],
    )
    .unwrap();
    let o = download_f32(&gpu, out, n * 12);
    let (mut inexact_exp, mut fast_differs, mut contracted) = (0usize, 0usize, 0usize);
    for i in 0..n {
        let (xv, yv, r) = (x[i] as f64, y[i] as f64, &o[i * 12..i * 12 + 12]);
        let check = |what: &str, got: f32, e: f64, bound: f64| {
            let u = ulps(got, e);
            assert!(
                u <= bound,
                "{what}({}, {}) = {got:e}: {u:.2} ulp from {e:e} (bound {bound})",
                x[i],
                y[i]
            );
        };
        check("expf", r[0], xv.exp(), 2.0);
        check("__expf", r[1], xv.exp(), 2.0 + (1.173 * xv.abs()).floor());
        check("logf", r[2], yv.ln(), 1.0);
        if (0.5..=2.0).contains(&yv) {
            assert!((r[3] as f64 - yv.ln()).abs() <= 2f64.powf(-21.41), "__logf({yv})");
        } else {
            check("__logf", r[3], yv.ln(), 3.0);
        }
        check("rsqrtf", r[4], 1.0 / yv.sqrt(), 2.0);
        check("__fdividef", r[5], xv / yv, 2.0);
        assert_eq!(r[6], y[i].sqrt(), "sqrtf is correctly rounded");
        assert_eq!(r[7], (1.0 / yv) as f32, "__frcp_rn is correctly rounded");
        check("tanhf", r[8], xv.tanh(), 2.0);
        assert_eq!(r[9], x[i] / y[i], "division is IEEE");
        assert_eq!(r[10].to_bits(), x[i].mul_add(y[i], 1.0).to_bits(), "x·y + 1 contracts");
        assert_eq!(r[11].to_bits(), (x[i] * y[i] + 1.0).to_bits(), "__fadd_rn(__fmul_rn) does not");
        inexact_exp += usize::from(r[0] != xv.exp() as f32);
        fast_differs += usize::from(r[1] != r[0]);
        contracted += usize::from(r[10] != r[11]);
    }
    // Not the exact functions: a CPU reference that rounds exactly is not matched bit for bit.
    assert!(inexact_exp > n / 4, "expf is exactly rounded in {} of {n}", n - inexact_exp);
    assert!(fast_differs > n / 4, "__expf equals expf in {} of {n}", n - fast_differs);
    assert!(contracted > 0, "the fused multiply-add never differed from the rounded one");
}

/// Where the device would differ from the CPU reference (contracted multiply-adds in AdamW's
/// update), the emulator does too — within the fp32 tolerance.
#[test]
fn emu_kernels_are_not_bit_identical_to_the_reference_where_a_device_is_not() {
    use steel_runtime::{AdamW, AdamWParam, Backend, DType, Tensor};
    let g = steel_runtime::gpu::GpuBackend::new(std::sync::Arc::new(rr()));
    let c = steel_runtime::cpu::CpuBackend::new();
    let n = 5000;
    let t = |s: u64| Tensor::from_f64(&rand_vals(n, s), &[n], DType::F32).unwrap();
    let v = Tensor::from_f64(
        &rand_vals(n, 4).iter().map(|x| x * x).collect::<Vec<_>>(),
        &[n],
        DType::F32,
    )
    .unwrap();
    let mk = |be: &dyn Backend, up: bool| {
        let u = |x: Tensor| if up { be.upload(&x).unwrap() } else { x };
        vec![AdamWParam {
            param: u(t(1)),
            grad: u(t(2)),
            m: u(t(3)),
            v: u(v.deep_copy().unwrap()),
            weight_decay: 0.05,
            copy: None,
        }]
    };
    let (cp, gp) = (mk(&c, false), mk(&g, true));
    let hp = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, step: 3, grad_scale: 0.5 };
    c.adamw_step(&cp, hp).unwrap();
    g.adamw_step(&gp, hp).unwrap();
    let (want, got) = (vals(&cp[0].m), vals(&g.download(&gp[0].m).unwrap()));
    assert_rel_norm("adamw m", &got, &want, 1e-5);
    let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert!(differ > 0, "the emulated AdamW moment is bit-identical to the CPU reference");
}

/// `EmuGpu`'s GEMM refuses what cuBLASLt refuses, with the status cuBLASLt would give: the
/// fp32 → bf16 type combination, and an operand aligned to less than its element.
#[test]
fn emu_gemm_refuses_what_cublaslt_refuses() {
    use steel_runtime::cuda::gemm::{GemmPtrs, GemmShape};
    use steel_runtime::{DType, Transpose};
    let gpu = rr();
    let (m, n, k) = (4usize, 4usize, 4usize);
    let vals: Vec<f32> = rand_vals(m * k + 4, 3).into_iter().map(|v| v as f32).collect();
    let (a, b) = (upload_f32(&gpu, &vals), upload_f32(&gpu, &vals));
    let out = gpu.alloc(m * n * 4 + 8).unwrap();
    let shape = |input, output| {
        GemmShape::contiguous(
            m,
            n,
            k,
            1,
            Transpose::No,
            Transpose::No,
            false,
            false,
            input,
            output,
            false,
        )
    };
    let run = |s: &GemmShape, p: GemmPtrs| {
        // SAFETY: every pointer addresses at least the elements the shape reaches.
        unsafe { gpu.gemm_ex(s, p, 1.0, 0.0) }
    };
    let ok = GemmPtrs { a, b, out, bias: None };
    run(&shape(DType::F32, DType::F32), ok).unwrap();
    let e = run(&shape(DType::F32, DType::BF16), ok).unwrap_err().to_string();
    assert_mentions(
        &e,
        &[
            "cublasLtMatmulAlgoGetHeuristic",
            "CUBLAS_STATUS_NOT_SUPPORTED",
            "fp32 inputs with a bf16 output",
        ],
    );
    let e =
        run(&shape(DType::F32, DType::F32), GemmPtrs { a: a + 2, ..ok }).unwrap_err().to_string();
    assert_mentions(
        &e,
        &["CUBLAS_STATUS_NOT_SUPPORTED", "operand a is only 2-byte aligned; its elements need 4"],
    );
    // Less aligned than 256 but aligned to the element: a smaller declared alignment, accepted.
    run(&shape(DType::F32, DType::F32), GemmPtrs { a: a + 4, out: out + 8, ..ok }).unwrap();
}

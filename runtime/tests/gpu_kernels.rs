//! The kernels of kernels-cu on the emulated GPU (`EmuGpu`), against the CPU reference, through
//! the production launchers and `GpuBackend`. Every test name starts with `emu_`, so
//! `cargo test emu` selects them. The same test bodies run on the real device as `cuda_*` tests
//! when `STEEL_DEVICE=cuda` (they return at once otherwise); only the launch-log assertions are
//! emulator-only.
//!
//! - Property tests: ragged shapes (not multiples of 8, 32 or 64), values in ±[0.1, 1] (never
//!   zero), outputs poisoned beforehand (every emulated allocation starts as NaN bytes, and
//!   accumulated gradients start from random non-zero values), and the launch log checked so
//!   nothing can route around the kernel. Each emulated case runs twice, under round-robin and
//!   under a second schedule drawn from its seed (reversed, warp-major or seeded random), with
//!   the memory checker on, and the two runs must agree bit for bit (`on_two_schedules`).
//! - Tolerances (DESIGN §4, ‖out − ref‖ / ‖ref‖): fp32 outputs ≤ 1e-5; bf16 outputs ≤ 1e-2 (the
//!   mma GEMM's inputs are bf16 but exactly representable in f32 and its output is fp32, so it
//!   is held to 1e-5).
//! - Emulator semantics: warp shuffles/ballot/any/all, atomics, block reductions, dynamic shared
//!   memory and ldmatrix against hand-computed values; a barrier not every thread reaches is an
//!   error naming the kernel.

use crate::common::*;
use proptest::prelude::*;
use std::sync::Arc;
use steel_runtime::cpu::CpuBackend;
use steel_runtime::cuda::CudaGpu;
use steel_runtime::gpu::{
    launch, Dim3, EmuGpu, Gpu, GpuBackend, LaunchConfig, LaunchRecord, Schedule,
};
use steel_runtime::{bf16, AdamW, AdamWParam, Backend, CrossEntropy, DType, Tensor};

const F32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1e-2;

/// A device under test: a `Gpu`, and its launch/NVTX logs when it keeps them.
trait TestGpu: Gpu {
    fn launch_log(&self) -> Option<Vec<LaunchRecord>>;
    fn nvtx_log(&self) -> Option<Vec<String>>;
}

impl TestGpu for EmuGpu {
    fn launch_log(&self) -> Option<Vec<LaunchRecord>> {
        Some(self.launches())
    }
    fn nvtx_log(&self) -> Option<Vec<String>> {
        Some(self.nvtx_ranges())
    }
}

impl TestGpu for CudaGpu {
    fn launch_log(&self) -> Option<Vec<LaunchRecord>> {
        None
    }
    fn nvtx_log(&self) -> Option<Vec<String>> {
        None
    }
}

fn emu() -> GpuBackend<EmuGpu> {
    GpuBackend::new(Arc::new(EmuGpu::new()))
}

fn emu_with(schedule: Schedule) -> GpuBackend<EmuGpu> {
    GpuBackend::new(Arc::new(EmuGpu::new().with_schedule(schedule)))
}

/// What a check produced: every output tensor's values, as bits.
type Outputs = Vec<Vec<u64>>;

/// Runs `check` on the emulator under round-robin and under a second schedule chosen by `seed`,
/// and requires bit-identical outputs: our kernels are deterministic, so no legal order of a
/// block's threads may change a bit.
fn on_two_schedules(seed: u64, check: impl Fn(&GpuBackend<EmuGpu>) -> Outputs) {
    let second = match seed % 3 {
        0 => Schedule::Reverse,
        1 => Schedule::WarpMajor,
        _ => Schedule::Random(seed),
    };
    let a = check(&emu_with(Schedule::RoundRobin));
    let b = check(&emu_with(second));
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let diff = x.iter().zip(y).position(|(p, q)| p != q);
        assert!(diff.is_none(), "output {i} differs between schedules rr and {second} at {diff:?}");
    }
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The real device when `STEEL_DEVICE=cuda` (outputs poisoned), else `None`.
fn cuda() -> Option<GpuBackend<CudaGpu>> {
    if std::env::var("STEEL_DEVICE").ok().as_deref() != Some("cuda") {
        return None;
    }
    let gpu = CudaGpu::new(0).unwrap_or_else(|e| panic!("STEEL_DEVICE=cuda but: {e}"));
    Some(GpuBackend::with_poisoned_outputs(Arc::new(gpu)))
}

fn cpu() -> CpuBackend {
    CpuBackend::new()
}

fn f32_rand(shape: &[usize], seed: u64) -> Tensor {
    rand_tensor_dt(shape, DType::F32, seed)
}

fn down<G: TestGpu>(g: &GpuBackend<G>, t: &Tensor) -> Vec<f64> {
    vals(&g.download(t).unwrap())
}

fn symbols(log: &[LaunchRecord]) -> Vec<&'static str> {
    log.iter().map(|r| r.symbol).collect()
}

// ---- add_rms_norm -------------------------------------------------------------------------------

fn check_add_rms_norm<G: TestGpu>(
    g: &GpuBackend<G>,
    rows: usize,
    h: usize,
    with_dsum: bool,
    seed: u64,
) -> Outputs {
    let c = cpu();
    let shape = [rows, h];
    let (x, r, w) = (f32_rand(&shape, seed), f32_rand(&shape, seed ^ 1), f32_rand(&[h], seed ^ 2));
    let eps = 1e-6;
    let (gx, gr, gw) = (g.upload(&x).unwrap(), g.upload(&r).unwrap(), g.upload(&w).unwrap());

    // Forward, fused and plain.
    let (sum, y, rstd) = c.add_rms_norm_fwd(&x, &r, &w, eps).unwrap();
    let (gsum, gy, grstd) = g.add_rms_norm_fwd(&gx, &gr, &gw, eps).unwrap();
    assert_rel_norm("add_rms_norm_fwd sum", &down(g, &gsum), &vals(&sum), F32_TOL);
    assert_rel_norm("add_rms_norm_fwd y", &down(g, &gy), &vals(&y), F32_TOL);
    assert_rel_norm("add_rms_norm_fwd rstd", &down(g, &grstd), &vals(&rstd), F32_TOL);
    let (py, prstd) = c.rms_norm_fwd(&x, &w, eps).unwrap();
    let (gpy, gprstd) = g.rms_norm_fwd(&gx, &gw, eps).unwrap();
    assert_rel_norm("rms_norm_fwd y", &down(g, &gpy), &vals(&py), F32_TOL);
    assert_rel_norm("rms_norm_fwd rstd", &down(g, &gprstd), &vals(&prstd), F32_TOL);

    // Backward from the reference's saved tensors, into random non-zero gradients (+=).
    let dy = f32_rand(&shape, seed ^ 3);
    let dsum = with_dsum.then(|| f32_rand(&shape, seed ^ 4));
    let (dx, dr, dw) =
        (f32_rand(&shape, seed ^ 5), f32_rand(&shape, seed ^ 6), f32_rand(&[h], seed ^ 7));
    let up = |t: &Tensor| g.upload(t).unwrap();
    let (gdx, gdr, gdw) = (up(&dx), up(&dr), up(&dw));
    let (gsum_ref, grstd_ref, gdy) = (up(&sum), up(&rstd), up(&dy));
    let gdsum = dsum.as_ref().map(up);
    c.add_rms_norm_bwd(&sum, &w, &rstd, &dy, dsum.as_ref(), &dx, &dr, &dw).unwrap();
    g.add_rms_norm_bwd(&gsum_ref, &gw, &grstd_ref, &gdy, gdsum.as_ref(), &gdx, &gdr, &gdw).unwrap();
    assert_rel_norm("add_rms_norm_bwd dx", &down(g, &gdx), &vals(&dx), F32_TOL);
    assert_rel_norm("add_rms_norm_bwd dr", &down(g, &gdr), &vals(&dr), F32_TOL);
    assert_rel_norm("add_rms_norm_bwd dw", &down(g, &gdw), &vals(&dw), F32_TOL);
    let outs: Outputs =
        [&gsum, &gy, &grstd, &gpy, &gdx, &gdr, &gdw].iter().map(|t| bits(&down(g, t))).collect();

    // The launch log: the kernels ran, with the launchers' configurations.
    let block = Dim3::x(launch::row_block(h));
    let (Some(log), Some(ranges)) = (g.gpu().launch_log(), g.gpu().nvtx_log()) else { return outs };
    assert_eq!(
        symbols(&log),
        [
            "add_rms_norm_fwd_f32",
            "add_rms_norm_fwd_f32",
            "add_rms_norm_bwd_f32",
            "add_rms_norm_bwd_dw_f32",
            "add_rms_norm_bwd_dw_reduce_f32"
        ]
    );
    assert_eq!((log[0].grid, log[0].block), (Dim3::x(rows as u32), block));
    assert_eq!((log[2].grid, log[2].block), (Dim3::x(rows as u32), block));
    let chunks = rows.div_ceil(launch::DW_ROWS_PER_CHUNK) as u32;
    let cols = h.div_ceil(launch::COLUMN_BLOCK as usize) as u32;
    assert_eq!(log[3].grid, Dim3::xy(cols, chunks));
    assert_eq!(log[0].nvtx, "add_rms_norm_fwd");
    assert_eq!(ranges.last().map(String::as_str), Some("add_rms_norm_bwd"));
    outs
}

proptest! {
    #![proptest_config(proptest_config(32))]

    #[test]
    fn emu_add_rms_norm_fwd_bwd_matches_cpu(rows in 1..=70usize, h in 1..=600usize, with_dsum in any::<bool>(), seed in any::<u64>()) {
        on_two_schedules(seed, |g| check_add_rms_norm(g, rows, h, with_dsum, seed));
    }

    #[test]
    fn cuda_add_rms_norm_fwd_bwd_matches_cpu(rows in 1..=70usize, h in 1..=600usize, with_dsum in any::<bool>(), seed in any::<u64>()) {
        if let Some(g) = cuda() {
            check_add_rms_norm(&g, rows, h, with_dsum, seed);
        }
    }
}

// ---- AdamW --------------------------------------------------------------------------------------

fn check_adamw<G: TestGpu>(g: &GpuBackend<G>, sizes: &[(usize, bool)], seed: u64) -> Outputs {
    let c = cpu();
    let mk = |be: &dyn Backend, i: usize, n: usize, copy: bool| -> AdamWParam {
        let s = seed ^ (i as u64 * 16);
        let t = |t: Tensor| {
            if be.device() == steel_runtime::Device::Cpu {
                t
            } else {
                be.upload(&t).unwrap()
            }
        };
        let v_init = Tensor::from_f64(
            &rand_vals(n, s ^ 3).iter().map(|v| v * v).collect::<Vec<_>>(),
            &[n],
            DType::F32,
        )
        .unwrap();
        AdamWParam {
            param: t(f32_rand(&[n], s)),
            grad: t(f32_rand(&[n], s ^ 1)),
            m: t(f32_rand(&[n], s ^ 2)),
            v: t(v_init),
            weight_decay: if i.is_multiple_of(2) { 0.05 } else { 0.0 },
            copy: copy.then(|| t(Tensor::from_f64(&vec![7.0; n], &[n], DType::BF16).unwrap())),
        }
    };
    let cps: Vec<AdamWParam> =
        sizes.iter().enumerate().map(|(i, &(n, cp))| mk(&c, i, n, cp)).collect();
    let gps: Vec<AdamWParam> =
        sizes.iter().enumerate().map(|(i, &(n, cp))| mk(g, i, n, cp)).collect();
    for step in 1..=2u64 {
        let hp = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, step, grad_scale: 0.5 };
        c.adamw_step(&cps, hp).unwrap();
        g.adamw_step(&gps, hp).unwrap();
    }
    for (i, (cp, gp)) in cps.iter().zip(&gps).enumerate() {
        assert_rel_norm(
            &format!("adamw param {i}"),
            &down(g, &gp.param),
            &vals(&cp.param),
            F32_TOL,
        );
        assert_rel_norm(&format!("adamw m {i}"), &down(g, &gp.m), &vals(&cp.m), F32_TOL);
        assert_rel_norm(&format!("adamw v {i}"), &down(g, &gp.v), &vals(&cp.v), F32_TOL);
        if let (Some(cc), Some(gc)) = (&cp.copy, &gp.copy) {
            assert_rel_norm(&format!("adamw bf16 copy {i}"), &down(g, gc), &vals(cc), 1e-2);
            // The copy is the round-to-nearest-even of the kernel's own fp32 weights, bit for
            // bit. (From f32: half's `bf16::from_f64` drops the low 32 bits of the f64 before
            // rounding, which mis-rounds f32 values just above a bf16 tie.)
            let (params, copies) = (down(g, &gp.param), down(g, gc));
            for (j, (&p, &got)) in params.iter().zip(&copies).enumerate() {
                let want = bf16::from_f32(p as f32).to_f64();
                assert!(
                    got == want,
                    "adamw bf16 copy {i}[{j}] = {got:e}, bf16(param {p:e}) = {want:e}"
                );
            }
        }
    }
    let outs: Outputs = gps
        .iter()
        .flat_map(|p| [Some(&p.param), Some(&p.m), Some(&p.v), p.copy.as_ref()])
        .flatten()
        .map(|t| bits(&down(g, t)))
        .collect();
    // One launch per step for all parameters.
    let Some(log) = g.gpu().launch_log() else { return outs };
    let blocks: usize = sizes.iter().map(|&(n, _)| n.div_ceil(launch::ADAMW_ELEMS_PER_BLOCK)).sum();
    assert_eq!(symbols(&log), ["adamw_step_f32", "adamw_step_f32"]);
    assert_eq!((log[0].grid, log[0].block), (Dim3::x(blocks as u32), Dim3::x(launch::ADAMW_BLOCK)));
    outs
}

proptest! {
    #![proptest_config(proptest_config(32))]

    #[test]
    fn emu_adamw_step_matches_cpu(sizes in prop::collection::vec((1..=5000usize, any::<bool>()), 1..=4), seed in any::<u64>()) {
        on_two_schedules(seed, |g| check_adamw(g, &sizes, seed));
    }

    #[test]
    fn cuda_adamw_step_matches_cpu(sizes in prop::collection::vec((1..=5000usize, any::<bool>()), 1..=4), seed in any::<u64>()) {
        if let Some(g) = cuda() {
            check_adamw(&g, &sizes, seed);
        }
    }
}

// ---- lm_head + softmax cross entropy ------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn check_lm_head_ce<G: TestGpu>(
    g: &GpuBackend<G>,
    n: usize,
    h: usize,
    v: usize,
    chunk: usize,
    ignore_every: usize,
    seed: u64,
) -> Outputs {
    let c = cpu();
    let spec = CrossEntropy { ignore_index: -100, chunk_tokens: chunk };
    let (x, w) = (f32_rand(&[n, h], seed), f32_rand(&[v, h], seed ^ 1));
    let ids: Vec<i32> = rand_ids(n, v, seed ^ 2)
        .into_iter()
        .enumerate()
        .map(|(i, t)| if ignore_every > 0 && i.is_multiple_of(ignore_every) { -100 } else { t })
        .collect();
    let targets = ids_tensor(&ids, &[n]);
    let (gx, gw, gt) = (g.upload(&x).unwrap(), g.upload(&w).unwrap(), g.upload(&targets).unwrap());
    let want = c.lm_head_ce_fwd(&x, &w, &targets, spec).unwrap();
    let got = g.lm_head_ce_fwd(&gx, &gw, &gt, spec).unwrap();
    assert_eq!(got.count, want.count);
    assert_rel_norm("lm_head_ce_fwd lse", &down(g, &got.lse), &vals(&want.lse), F32_TOL);
    let (gl, wl) = (down(g, &got.loss_sum)[0], vals(&want.loss_sum)[0]);
    assert!((gl - wl).abs() <= F32_TOL * wl.abs().max(1e-30), "loss sum {gl} vs {wl}");

    let dloss = Tensor::from_f64(&[1.5], &[1], DType::F32).unwrap();
    let (dx, dw) = (f32_rand(&[n, h], seed ^ 3), f32_rand(&[v, h], seed ^ 4));
    let (gdx, gdw) = (g.upload(&dx).unwrap(), g.upload(&dw).unwrap());
    let scale = 1.0 / want.count.max(1) as f64;
    c.lm_head_ce_bwd(&x, &w, &targets, &want.lse, &dloss, scale, spec, &dx, &dw).unwrap();
    let (glse, gdloss) = (g.upload(&want.lse).unwrap(), g.upload(&dloss).unwrap());
    g.lm_head_ce_bwd(&gx, &gw, &gt, &glse, &gdloss, scale, spec, &gdx, &gdw).unwrap();
    assert_rel_norm("lm_head_ce_bwd dx", &down(g, &gdx), &vals(&dx), F32_TOL);
    assert_rel_norm("lm_head_ce_bwd dw", &down(g, &gdw), &vals(&dw), F32_TOL);
    let outs: Outputs =
        [&got.lse, &got.loss_sum, &gdx, &gdw].iter().map(|t| bits(&down(g, t))).collect();

    let (Some(log), Some(ranges)) = (g.gpu().launch_log(), g.gpu().nvtx_log()) else { return outs };
    let chunks = n.div_ceil(chunk.min(n));
    let fwd = log.iter().filter(|r| r.symbol == "softmax_ce_fwd_f32").count();
    let bwd = log.iter().filter(|r| r.symbol == "softmax_ce_bwd_f32").count();
    assert_eq!((fwd, bwd), (chunks, chunks));
    let first = log.iter().find(|r| r.symbol == "softmax_ce_fwd_f32").unwrap();
    assert_eq!(first.block, Dim3::x(launch::vocab_block(v)));
    assert_eq!(first.grid, Dim3::x(chunk.min(n) as u32));
    assert_eq!(first.nvtx, "lm_head_ce_fwd/softmax_ce_fwd");
    assert!(log
        .iter()
        .any(|r| r.symbol == "softmax_ce_bwd_f32" && r.nvtx == "lm_head_ce_bwd/softmax_ce_bwd"));
    assert!(ranges.iter().any(|r| r == "lm_head_ce_bwd/dw"));
    outs
}

proptest! {
    #![proptest_config(proptest_config(32))]

    #[test]
    fn emu_lm_head_ce_fwd_bwd_matches_cpu(n in 1..=20usize, h in 1..=40usize, v in 2..=700usize, chunk in 1..=8usize,
                                          ignore_every in 0..=4usize, seed in any::<u64>()) {
        on_two_schedules(seed, |g| check_lm_head_ce(g, n, h, v, chunk, ignore_every, seed));
    }

    #[test]
    fn cuda_lm_head_ce_fwd_bwd_matches_cpu(n in 1..=20usize, h in 1..=40usize, v in 2..=700usize, chunk in 1..=8usize,
                                           ignore_every in 0..=4usize, seed in any::<u64>()) {
        if let Some(g) = cuda() {
            check_lm_head_ce(&g, n, h, v, chunk, ignore_every, seed);
        }
    }
}

// ---- the mma tile GEMM --------------------------------------------------------------------------

fn check_mma_gemm<G: TestGpu>(
    g: &GpuBackend<G>,
    m: usize,
    n: usize,
    k: usize,
    seed: u64,
) -> Outputs {
    let (a, b) = (
        rand_tensor_dt(&[m, k], DType::BF16, seed),
        rand_tensor_dt(&[n, k], DType::BF16, seed ^ 1),
    );
    // The reference: the same bf16 values in f32, a · bᵀ on the CPU.
    let widen = |t: &Tensor| Tensor::from_f64(&vals(t), t.shape(), DType::F32).unwrap();
    let want = cpu().matmul(&widen(&a), &widen(&b), None, steel_runtime::Matmul::NT, None).unwrap();
    let (ga, gb) = (g.upload(&a).unwrap(), g.upload(&b).unwrap());
    let gc = g.empty(&[m, n], DType::F32).unwrap();
    launch::mma_tile_gemm(g.gpu(), &ga, &gb, &gc).unwrap();
    assert_rel_norm("mma_tile_gemm", &down(g, &gc), &vals(&want), F32_TOL);
    let outs = vec![bits(&down(g, &gc))];
    let Some(log) = g.gpu().launch_log() else { return outs };
    assert_eq!(symbols(&log), ["mma_tile_gemm_bf16"]);
    assert_eq!(log[0].grid, Dim3::xy(n.div_ceil(64) as u32, m.div_ceil(64) as u32));
    assert_eq!(log[0].block, Dim3::x(launch::MMA_BLOCK));
    outs
}

proptest! {
    #![proptest_config(proptest_config(32))]

    #[test]
    fn emu_mma_tile_gemm_matches_cpu(m in 1..=150usize, n in 1..=150usize, k in 1..=70usize, seed in any::<u64>()) {
        on_two_schedules(seed, |g| check_mma_gemm(g, m, n, k, seed));
    }

    #[test]
    fn cuda_mma_tile_gemm_matches_cpu(m in 1..=150usize, n in 1..=150usize, k in 1..=70usize, seed in any::<u64>()) {
        if let Some(g) = cuda() {
            check_mma_gemm(&g, m, n, k, seed);
        }
    }
}

// ---- matmul through Gpu::gemm_ex (cuBLASLt on a device) ----------------------------------------

/// `matmul` (batched, broadcast, transposed, with bias, f32 or bf16 out) and `matmul_into`
/// (accumulating, batch-summed) against the CPU backend. bf16 outputs are compared at the bf16
/// tolerance; the emulator launches no kernel for a GEMM and records its NVTX range.
#[allow(clippy::too_many_arguments)]
fn check_matmul<G: TestGpu>(
    g: &GpuBackend<G>,
    (ba, bb): (usize, usize),
    (m, n, k): (usize, usize, usize),
    (ta, tb): (bool, bool),
    with_bias: bool,
    bf16_out: bool,
    seed: u64,
) {
    use steel_runtime::{Matmul, Transpose};
    let c = cpu();
    let tr = |t: bool| if t { Transpose::Yes } else { Transpose::No };
    let spec = Matmul { trans_a: tr(ta), trans_b: tr(tb), alpha: 0.75, beta: 0.5 };
    let shape = |batch: usize, r: usize, cols: usize| -> Vec<usize> {
        if batch == 1 {
            vec![r, cols]
        } else {
            vec![batch, r, cols]
        }
    };
    // cuBLASLt's type table: a bf16 output needs bf16 inputs (fp32 → bf16 is refused, below).
    let input = if bf16_out { DType::BF16 } else { DType::F32 };
    let a = rand_tensor_dt(&if ta { shape(ba, k, m) } else { shape(ba, m, k) }, input, seed);
    let b = rand_tensor_dt(&if tb { shape(bb, n, k) } else { shape(bb, k, n) }, input, seed ^ 1);
    let out = if bf16_out { DType::BF16 } else { DType::F32 };
    // The reference: the same (bf16-rounded) values in f32.
    let widen = |t: &Tensor| c.cast(t, DType::F32).unwrap();
    let (a32, b32) = (widen(&a), widen(&b));
    // The bias has the output dtype; the reference adds the same (rounded) values in f32, so
    // only the output's own rounding separates the two (a bias cancelling the product would
    // otherwise turn the bias's rounding into a large relative error).
    let bias = with_bias.then(|| {
        let t = f32_rand(&[n], seed ^ 2);
        if bf16_out {
            c.cast(&c.cast(&t, DType::BF16).unwrap(), DType::F32).unwrap()
        } else {
            t
        }
    });
    let want = c.matmul(&a32, &b32, bias.as_ref(), spec, None).unwrap();
    let (ga, gb) = (g.upload(&a).unwrap(), g.upload(&b).unwrap());
    if !bf16_out {
        let e = g.matmul(&ga, &gb, None, spec, Some(DType::BF16)).unwrap_err().to_string();
        assert!(e.contains("cuBLASLt has no fp32-inputs → bf16-output GEMM"), "{e}");
    }
    let gbias = bias.as_ref().map(|t| g.upload(&c.cast(t, out).unwrap()).unwrap());
    let got = g.matmul(&ga, &gb, gbias.as_ref(), spec, Some(out)).unwrap();
    assert_eq!(got.shape(), want.shape());
    assert_eq!(got.dtype(), out);
    let tol = if bf16_out { BF16_TOL } else { F32_TOL };
    assert_rel_norm("matmul", &down(g, &got), &vals(&want), tol);
    if let (Some(log), Some(nvtx)) = (g.gpu().launch_log(), g.gpu().nvtx_log()) {
        assert!(log.is_empty(), "a GEMM is not a kernel launch: {:?}", symbols(&log));
        assert!(nvtx.iter().any(|r| r.ends_with("matmul")), "{nvtx:?}");
    }
    // accumulate into an existing output; batched products into one matrix are summed
    let prev = f32_rand(&[m, n], seed ^ 3);
    let want_into = prev.deep_copy().unwrap();
    c.matmul_into(&a32, &b32, spec, &want_into).unwrap();
    let got_into = g.upload(&prev).unwrap();
    g.matmul_into(&ga, &gb, spec, &got_into).unwrap();
    assert_rel_norm("matmul_into", &down(g, &got_into), &vals(&want_into), F32_TOL);
}

proptest! {
    #![proptest_config(proptest_config(32))]

    #[test]
    fn emu_matmul_through_gemm_ex_matches_cpu(
        batch in prop::sample::select(vec![(1usize, 1usize), (3, 3), (3, 1), (1, 2)]),
        m in 1..=40usize, n in 1..=40usize, k in 1..=40usize,
        ta in any::<bool>(), tb in any::<bool>(), bias in any::<bool>(), bf in any::<bool>(),
        seed in any::<u64>(),
    ) {
        check_matmul(&emu(), batch, (m, n, k), (ta, tb), bias, bf, seed);
    }

    #[test]
    fn cuda_matmul_through_gemm_ex_matches_cpu(
        batch in prop::sample::select(vec![(1usize, 1usize), (3, 3), (3, 1), (1, 2)]),
        m in 1..=40usize, n in 1..=40usize, k in 1..=40usize,
        ta in any::<bool>(), tb in any::<bool>(), bias in any::<bool>(), bf in any::<bool>(),
        seed in any::<u64>(),
    ) {
        if let Some(g) = cuda() {
            check_matmul(&g, batch, (m, n, k), (ta, tb), bias, bf, seed);
        }
    }
}

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
    let e = g.global_norm(&[&t]).unwrap_err().to_string();
    assert!(e.contains("not yet implemented on the GPU backend"), "{e}");
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
            .args(["--exact", "gpu_kernels::emu_stack_overflow_is_reported", "--test-threads=1"])
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

/// The same at the model's widths on the device (`STEEL_DEVICE=cuda`): the softmax-CE kernels at
/// their declared `__launch_bounds__(1024)`.
#[test]
fn cuda_kernels_at_model_widths() {
    if let Some(g) = cuda() {
        check_lm_head_ce(&g, 3, 8, 151_936, 2, 3, 11);
        check_add_rms_norm(&g, 3, 1792, true, 12);
    }
}

/// The model's real widths once per run: the 151,936-class vocabulary (1024-thread rows, many
/// elements per thread) and hidden 1792 (7-warp rows).
#[test]
fn emu_kernels_at_model_widths() {
    on_two_schedules(11, |g| check_lm_head_ce(g, 3, 8, 151_936, 2, 3, 11));
    on_two_schedules(12, |g| check_add_rms_norm(g, 3, 1792, true, 12));
    assert_eq!(launch::vocab_block(151_936), 1024);
    assert_eq!(launch::row_block(1792), 224);
}

use super::*;
use steel_runtime::gpu::adamw::{ADAMW_BLOCK, ADAMW_ELEMS_PER_BLOCK};

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
    let blocks: usize = sizes.iter().map(|&(n, _)| n.div_ceil(ADAMW_ELEMS_PER_BLOCK)).sum();
    assert_eq!(symbols(&log), ["adamw_step_f32", "adamw_step_f32"]);
    assert_eq!((log[0].grid, log[0].block), (Dim3::x(blocks as u32), Dim3::x(ADAMW_BLOCK)));
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

// ---- the guarded step (adamw_guard_f64 + adamw_step_f32 reading its verdict) -------------------

/// The step's loss in the guarded tests: finite, or a NaN / ±inf that must skip the step.
#[derive(Clone, Copy, Debug)]
enum LossKind {
    Finite,
    Nan,
    Inf,
}

fn check_adamw_guarded<G: TestGpu>(
    g: &GpuBackend<G>,
    sizes: &[usize],
    seed: u64,
    loss_kind: LossKind,
    clip: Option<f64>,
) -> Outputs {
    let c = cpu();
    let host = |i: usize, n: usize| -> [Tensor; 4] {
        let s = seed ^ (i as u64 * 16);
        let v = Tensor::from_f64(
            &rand_vals(n, s ^ 3).iter().map(|v| v * v).collect::<Vec<_>>(),
            &[n],
            DType::F32,
        )
        .unwrap();
        [f32_rand(&[n], s), f32_rand(&[n], s ^ 1), f32_rand(&[n], s ^ 2), v]
    };
    let mk = |be: &dyn Backend, i: usize, n: usize| -> AdamWParam {
        let on = |t: &Tensor| {
            if be.device() == steel_runtime::Device::Cpu {
                t.clone()
            } else {
                be.upload(t).unwrap()
            }
        };
        let [p, gr, m, v] = host(i, n);
        AdamWParam {
            param: on(&p),
            grad: on(&gr),
            m: on(&m),
            v: on(&v),
            weight_decay: if i.is_multiple_of(2) { 0.05 } else { 0.0 },
            copy: Some(on(&Tensor::from_f64(&vec![7.0; n], &[n], DType::BF16).unwrap())),
        }
    };
    let loss_value = match loss_kind {
        LossKind::Finite => 2.5 + (seed % 7) as f64 * 0.125,
        LossKind::Nan => f64::NAN,
        LossKind::Inf => f64::INFINITY,
    };
    let loss = Tensor::from_f64(&[loss_value], &[1], DType::F32).unwrap();
    let cps: Vec<AdamWParam> = sizes.iter().enumerate().map(|(i, &n)| mk(&c, i, n)).collect();
    let gps: Vec<AdamWParam> = sizes.iter().enumerate().map(|(i, &n)| mk(g, i, n)).collect();
    let hp = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, step: 3, grad_scale: 1.0 };
    let want = c.adamw_step_guarded(&cps, hp, &loss, clip).unwrap().to_f64_vec().unwrap();
    let syncs0 = g.gpu().counts().host_syncs;
    let launches0 = g.gpu().launch_log().map_or(0, |l| l.len());
    let status = g.adamw_step_guarded(&gps, hp, &g.upload(&loss).unwrap(), clip).unwrap();
    assert_eq!(g.gpu().counts().host_syncs, syncs0, "the guarded step reads nothing back");
    let got = down(g, &status);
    // [loss, norm, factor, skipped]: the loss and the verdict exactly; the norm (f64 sums in two
    // fixed orders, stored as f32) and the factor to f32 rounding.
    assert_eq!(got[0].to_bits(), (want[0] as f32 as f64).to_bits(), "loss {got:?} vs {want:?}");
    assert_eq!(got[3], want[3], "skipped: {got:?} vs {want:?}");
    for k in [1, 2] {
        assert!(
            (got[k] - want[k]).abs() <= 2.0 * f32::EPSILON as f64 * want[k].abs(),
            "status[{k}]: {got:?} vs {want:?}"
        );
    }
    let skipped = !matches!(loss_kind, LossKind::Finite);
    assert_eq!(got[3] != 0.0, skipped, "a non-finite loss skips the step: {got:?}");
    if let (Some(cl), false) = (clip, skipped) {
        let norm = want[1];
        let expect = if cl > 0.0 && norm > cl { cl / norm } else { 1.0 };
        // Both stored as f32: equal to f32 rounding.
        assert!(
            (want[2] - expect).abs() <= 4.0 * f32::EPSILON as f64 * expect,
            "factor {want:?} for clip {cl}"
        );
    }
    for (i, (cp, gp)) in cps.iter().zip(&gps).enumerate() {
        for (what, ct, gt) in
            [("param", &cp.param, &gp.param), ("m", &cp.m, &gp.m), ("v", &cp.v, &gp.v)]
        {
            assert_rel_norm(&format!("guarded {what} {i}"), &down(g, gt), &vals(ct), F32_TOL);
        }
        if skipped {
            // Nothing written: the state is the initial one, bit for bit.
            let [p, _, m, v] = host(i, sizes[i]);
            for (what, init, gt) in [("param", &p, &gp.param), ("m", &m, &gp.m), ("v", &v, &gp.v)] {
                assert_eq!(bits(&down(g, gt)), bits(&vals(init)), "skipped step wrote {what} {i}");
            }
            assert!(down(g, gp.copy.as_ref().unwrap()).iter().all(|&x| x == 7.0));
        }
    }
    if let Some(log) = g.gpu().launch_log() {
        let syms: Vec<&str> = log[launches0..].iter().map(|r| r.symbol).collect();
        assert_eq!(syms, ["global_norm_partial_f64", "adamw_guard_f64", "adamw_step_f32"]);
    }
    let mut outs: Outputs = vec![bits(&got)];
    outs.extend(gps.iter().flat_map(|p| [&p.param, &p.m, &p.v]).map(|t| bits(&down(g, t))));
    outs
}

fn loss_kind() -> impl Strategy<Value = LossKind> {
    prop_oneof![
        6 => Just(LossKind::Finite),
        1 => Just(LossKind::Nan),
        1 => Just(LossKind::Inf),
    ]
}

proptest! {
    #![proptest_config(proptest_config(24))]

    #[test]
    fn emu_adamw_step_guarded_matches_cpu(sizes in prop::collection::vec(1..=5000usize, 1..=4), seed in any::<u64>(), kind in loss_kind(), clip in prop_oneof![Just(None), (0.05f64..40.0).prop_map(Some)]) {
        on_two_schedules(seed, |g| check_adamw_guarded(g, &sizes, seed, kind, clip));
    }

    #[test]
    fn cuda_adamw_step_guarded_matches_cpu(sizes in prop::collection::vec(1..=5000usize, 1..=4), seed in any::<u64>(), kind in loss_kind(), clip in prop_oneof![Just(None), (0.05f64..40.0).prop_map(Some)]) {
        if let Some(g) = cuda() {
            check_adamw_guarded(&g, &sizes, seed, kind, clip);
        }
    }
}

#[test]
fn emu_adamw_step_guarded_clips_skips_and_applies() {
    // Clipped (the norm of these gradients is far above 0.1), unclipped, and a NaN gradient
    // (a finite loss, a NaN norm: skipped).
    on_two_schedules(5, |g| {
        check_adamw_guarded(g, &[3000, 17, 2048], 5, LossKind::Finite, Some(0.1))
    });
    on_two_schedules(6, |g| check_adamw_guarded(g, &[3000, 17], 6, LossKind::Finite, Some(1e6)));
    on_two_schedules(7, |g| check_adamw_guarded(g, &[100, 9], 7, LossKind::Nan, Some(1.0)));
    on_two_schedules(8, |g| check_adamw_guarded(g, &[100], 8, LossKind::Inf, None));
    let g = emu();
    let c = cpu();
    let n = 40;
    let mut grad = f32_rand(&[n], 9).to_f64_vec().unwrap();
    grad[7] = f64::NAN;
    for be in [&c as &dyn Backend, &g] {
        let on = |t: Tensor| {
            if be.device() == steel_runtime::Device::Cpu {
                t
            } else {
                be.upload(&t).unwrap()
            }
        };
        let p = AdamWParam {
            param: on(f32_rand(&[n], 1)),
            grad: on(Tensor::from_f64(&grad, &[n], DType::F32).unwrap()),
            m: on(f32_rand(&[n], 2)),
            v: on(Tensor::from_f64(&[0.5; 40], &[n], DType::F32).unwrap()),
            weight_decay: 0.05,
            copy: None,
        };
        let before = be.download(&p.param).unwrap().to_f64_vec().unwrap();
        let hp = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, step: 1, grad_scale: 1.0 };
        let loss = on(Tensor::from_f64(&[1.5], &[1], DType::F32).unwrap());
        let st = be.adamw_step_guarded(std::slice::from_ref(&p), hp, &loss, Some(1.0)).unwrap();
        let st = be.download(&st).unwrap().to_f64_vec().unwrap();
        assert_eq!(st[0], 1.5);
        assert!(st[1].is_nan() && st[2] == 0.0 && st[3] == 1.0, "{} {st:?}", be.name());
        assert_eq!(be.download(&p.param).unwrap().to_f64_vec().unwrap(), before);
    }
}

// ---- global_norm ----------------------------------------------------------------------------------

fn check_global_norm<G: TestGpu>(g: &GpuBackend<G>, sizes: &[usize], seed: u64) -> Outputs {
    let c = cpu();
    let ts: Vec<Tensor> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let dt = if i % 3 == 2 { DType::BF16 } else { DType::F32 };
            rand_tensor_dt(&[n], dt, seed ^ i as u64)
        })
        .collect();
    let gs: Vec<Tensor> = ts.iter().map(|t| g.upload(t).unwrap()).collect();
    let want = c.global_norm(&ts.iter().collect::<Vec<_>>()).unwrap();
    let got = g.global_norm(&gs.iter().collect::<Vec<_>>()).unwrap();
    // f64 sums in two fixed orders: equal to f64 rounding.
    assert!((got - want).abs() <= 1e-12 * want.max(1e-300), "global_norm {got} vs {want}");
    if let Some(log) = g.gpu().launch_log() {
        assert_eq!(symbols(&log), ["global_norm_partial_f64", "global_norm_reduce_f64"]);
        let blocks: usize =
            sizes.iter().map(|n| n.div_ceil(steel_runtime::gpu::adamw::NORM_ELEMS_PER_BLOCK)).sum();
        assert_eq!(log[0].grid, Dim3::x(blocks as u32));
    }
    vec![vec![got.to_bits()]]
}

proptest! {
    #![proptest_config(proptest_config(24))]

    #[test]
    fn emu_global_norm_matches_cpu(sizes in prop::collection::vec(1..=9000usize, 1..=5), seed in any::<u64>()) {
        on_two_schedules(seed, |g| check_global_norm(g, &sizes, seed));
    }

    #[test]
    fn cuda_global_norm_matches_cpu(sizes in prop::collection::vec(1..=9000usize, 1..=5), seed in any::<u64>()) {
        if let Some(g) = cuda() {
            check_global_norm(&g, &sizes, seed);
        }
    }
}

#[test]
fn emu_global_norm_of_nothing_and_of_the_model_widths() {
    let g = emu();
    assert_eq!(g.global_norm(&[]).unwrap(), 0.0);
    on_two_schedules(60, |g| check_global_norm(g, &[1792 * 3, 448, 151_936 / 16], 60));
}

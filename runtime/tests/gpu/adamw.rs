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

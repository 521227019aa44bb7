use super::softmax::scaled_rand;
use super::*;
use steel_runtime::gpu::experts::{flat_grid, fwd_grid, wgrad_grid, OUT_CHUNK};
use steel_runtime::{Error, ExpertWeights, ExpertsOut};

// ---- the double-SwiGLU experts ----------------------------------------------------------------------

/// The increments `after − before` of an accumulated gradient.
fn increments(after: &[f64], before: &Tensor) -> Vec<f64> {
    after.iter().zip(vals(before)).map(|(a, b)| a - b).collect()
}

/// E experts' `[gate_up, up, gate_down, down]` of `dt`, values ±[0.1, 1] · 2/√fan_in (so the
/// pre-activations are O(1) and both SwiGLUs are far from linear).
fn weights(e: usize, d: usize, f: usize, dt: DType, seed: u64) -> [Vec<Tensor>; 4] {
    std::array::from_fn(|k| {
        let (shape, fan_in) = if k < 2 { ([f, d], d) } else { ([d, f], f) };
        (0..e)
            .map(|i| {
                scaled_rand(
                    &shape,
                    dt,
                    2.0 / (fan_in as f64).sqrt(),
                    0.0,
                    seed ^ (16 * k + i) as u64,
                )
            })
            .collect()
    })
}

fn as_weights(w: &[Vec<Tensor>; 4]) -> ExpertWeights<'_> {
    ExpertWeights { gate_up: &w[0], up: &w[1], gate_down: &w[2], down: &w[3] }
}

fn upload_all<G: TestGpu>(g: &GpuBackend<G>, w: &[Vec<Tensor>; 4]) -> [Vec<Tensor>; 4] {
    std::array::from_fn(|k| w[k].iter().map(|t| g.upload(t).unwrap()).collect())
}

/// `experts_fwd` on `x [e, r, d]` (values of `dt`) against the CPU given the same (rounded)
/// values, then `experts_bwd` from the CPU's saved activations with a random f32 `dy` into
/// random non-zero gradients (compared as increments).
///
/// Tolerances, ‖gpu − cpu‖ / ‖cpu‖: outputs 1e-5 in f32, 1e-2 in bf16 (each bf16 output is
/// rounded once; `u` is rounded before stage 2 on both sides, so a rounding that flips there
/// moves y by one bf16 step); the gradients 1e-5 (f32 arithmetic from identical bf16 inputs).
pub(super) fn check_experts<G: TestGpu>(
    g: &GpuBackend<G>,
    [e, r, d, f]: [usize; 4],
    dt: DType,
    seed: u64,
) -> Outputs {
    let c = cpu();
    let what = format!("experts e{e} r{r} d{d} f{f} {dt}");
    let x = scaled_rand(&[e, r, d], dt, 1.0, 0.0, seed);
    let w = weights(e, d, f, dt, seed ^ 1);
    let wg = upload_all(g, &w);
    let up = |t: &Tensor| g.upload(t).unwrap();
    let gx = up(&x);
    let want = c.experts_fwd(&x, as_weights(&w)).unwrap();
    let got = g.experts_fwd(&gx, as_weights(&wg)).unwrap();
    let tol = if dt == DType::BF16 { BF16_TOL } else { F32_TOL };
    let mut outs = Vec::new();
    for (name, a, b) in [
        ("y", &got.y, &want.y),
        ("a1", &got.a1, &want.a1),
        ("b1", &got.b1, &want.b1),
        ("u", &got.u, &want.u),
        ("a2", &got.a2, &want.a2),
        ("b2", &got.b2, &want.b2),
    ] {
        assert_eq!((a.shape(), a.dtype()), (b.shape(), dt), "{what}: {name}");
        let v = down(g, a);
        assert_rel_norm(&format!("{what}: {name}"), &v, &vals(b), tol);
        outs.push(bits(&v));
    }

    let fl = DType::F32;
    let dy = f32_rand(&[e, r, d], seed ^ 2);
    let small = |t: &Tensor, k: u64| scaled_rand(t.shape(), fl, 1e-2, 0.0, seed ^ k);
    let dx0 = small(&x, 3);
    let dw0: [Vec<Tensor>; 4] = std::array::from_fn(|k| {
        w[k].iter().enumerate().map(|(i, t)| small(t, 100 + (16 * k + i) as u64)).collect()
    });
    let copy = |ts: &[Vec<Tensor>; 4]| -> [Vec<Tensor>; 4] {
        std::array::from_fn(|k| ts[k].iter().map(|t| t.deep_copy().unwrap()).collect())
    };
    let cdw = copy(&dw0);
    let cdx = dx0.deep_copy().unwrap();
    c.experts_bwd(&x, as_weights(&w), &want, &dy, &cdx, as_weights(&cdw)).unwrap();
    let saved = ExpertsOut {
        y: up(&want.y),
        a1: up(&want.a1),
        b1: up(&want.b1),
        u: up(&want.u),
        a2: up(&want.a2),
        b2: up(&want.b2),
    };
    let gdw = upload_all(g, &dw0);
    let gdx = up(&dx0);
    g.experts_bwd(&gx, as_weights(&wg), &saved, &up(&dy), &gdx, as_weights(&gdw)).unwrap();
    let v = down(g, &gdx);
    assert_rel_norm(
        &format!("{what}: dx"),
        &increments(&v, &dx0),
        &increments(&vals(&cdx), &dx0),
        F32_TOL,
    );
    outs.push(bits(&v));
    let names = ["gate_up", "up", "gate_down", "down"];
    for k in 0..4 {
        for i in 0..e {
            let v = down(g, &gdw[k][i]);
            assert_rel_norm(
                &format!("{what}: d{}[{i}]", names[k]),
                &increments(&v, &dw0[k][i]),
                &increments(&vals(&cdw[k][i]), &dw0[k][i]),
                F32_TOL,
            );
            outs.push(bits(&v));
        }
    }

    let Some(log) = g.gpu().launch_log() else { return outs };
    let t = if dt == DType::BF16 { "bf16" } else { "f32" };
    let (ni, no) = (e * r * f, e * r * d);
    let grid = |cfg: steel_runtime::Result<LaunchConfig>| cfg.unwrap().grid;
    let expect: Vec<(String, Dim3, Dim3)> = vec![
        (format!("experts_fwd_{t}"), grid(fwd_grid("", f, e)), Dim3::x(256)),
        (format!("experts_fwd_{t}"), grid(fwd_grid("", d, e)), Dim3::x(256)),
        (format!("experts_gate_grad_{t}"), grid(flat_grid("", no)), Dim3::x(256)),
        (format!("experts_wgrad_{t}"), grid(wgrad_grid("", d, f, e)), Dim3::x(128)),
        (format!("experts_gate_grad_{t}"), grid(flat_grid("", ni)), Dim3::x(256)),
        (format!("experts_wgrad_{t}"), grid(wgrad_grid("", f, d, e)), Dim3::x(128)),
        ("experts_reduce".to_string(), grid(flat_grid("", no)), Dim3::x(256)),
    ];
    let got: Vec<_> = log.iter().map(|r| (r.symbol.to_string(), r.grid, r.block)).collect();
    assert_eq!(got, expect, "{what}: the launches");
    outs
}

/// The model's expert (d = 1,792 → f = 448, 8 rows: micro-batch 8 × 1 slot) on two experts,
/// and the edges: 9 and 17 rows (more than one 8-row group), one row, widths that are not
/// multiples of 8 (the scalar path) or of the 32-row gradient chunk, bf16 and f32.
const FIXED: &[([usize; 4], DType)] = &[
    ([2, 8, 1792, 448], DType::BF16),
    ([6, 2, 64, 16], DType::F32),
    ([3, 9, 40, 12], DType::BF16),
    ([2, 17, 37, 11], DType::F32),
    ([1, 1, 5, 3], DType::F32),
    ([4, 3, 72, 33], DType::BF16),
];

#[test]
fn emu_experts_fixed_cases() {
    assert_eq!(OUT_CHUNK, 32);
    for (i, &(dims, dt)) in FIXED.iter().enumerate() {
        on_two_schedules(60 + i as u64, |g| check_experts(g, dims, dt, 60 + i as u64));
    }
}

#[test]
fn cuda_experts_fixed_cases() {
    if let Some(g) = cuda() {
        for (i, &(dims, dt)) in FIXED.iter().enumerate() {
            check_experts(&g, dims, dt, 60 + i as u64);
        }
        check_experts(&g, [6, 8, 1792, 448], DType::BF16, 98);
        check_experts(&g, [6, 8, 1792, 448], DType::F32, 97);
    }
}

proptest! {
    #![proptest_config(proptest_config(6))]

    #[test]
    fn emu_experts_random_shapes(e in 1..=4usize, r in 1..=12usize, d in 1..=70usize, f in 1..=40usize,
                                 bf16 in any::<bool>(), seed in any::<u64>()) {
        let dt = if bf16 { DType::BF16 } else { DType::F32 };
        on_two_schedules(seed, |g| check_experts(g, [e, r, d, f], dt, seed));
    }
}

/// Mixed dtypes, misshaped weights and more experts than the pointer tables hold are errors.
#[test]
fn emu_experts_refuses_bad_operands() {
    let g = emu();
    let x = g.upload(&f32_rand(&[2, 3, 8], 1)).unwrap();
    let w = upload_all(&g, &weights(2, 8, 4, DType::F32, 2));
    let mut mixed = w.clone();
    mixed[1][1] = g.upload(&rand_tensor_dt(&[4, 8], DType::BF16, 3)).unwrap();
    let err = g.experts_fwd(&x, as_weights(&mixed)).unwrap_err();
    assert!(matches!(err, Error::DType { op: "experts_fwd", .. }), "{err}");
    let mut bad = w.clone();
    bad[2][0] = g.upload(&f32_rand(&[8, 5], 4)).unwrap();
    let err = g.experts_fwd(&x, as_weights(&bad)).unwrap_err();
    assert!(err.to_string().contains("gate_down[0]"), "{err}");
    let many = g.upload(&f32_rand(&[33, 1, 8], 5)).unwrap();
    let w33 = upload_all(&g, &weights(33, 8, 4, DType::F32, 6));
    let err = g.experts_fwd(&many, as_weights(&w33)).unwrap_err();
    assert!(err.to_string().contains("33 experts"), "{err}");
}

use super::*;
use steel_runtime::gpu::elementwise::{EW_BLOCK, EW_CHUNK};

// ---- elementwise: add, add_assign, scale, scale_by, swiglu, cast ---------------------------------

/// The tolerance of an output of `dtype` (DESIGN §4).
fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        BF16_TOL
    } else {
        F32_TOL
    }
}

/// Every elementwise op once on `shape` with values of `dtype`, against the CPU backend given the
/// same (bf16-rounded) inputs; gradients accumulate into random non-zero buffers.
fn check_elementwise<G: TestGpu>(
    g: &GpuBackend<G>,
    shape: &[usize],
    dtype: DType,
    seed: u64,
) -> Outputs {
    let c = cpu();
    let (a, b) = (rand_tensor_dt(shape, dtype, seed), rand_tensor_dt(shape, dtype, seed ^ 1));
    let s = f32_rand(&[1], seed ^ 2);
    let up = |t: &Tensor| g.upload(t).unwrap();
    let (ga, gb, gs) = (up(&a), up(&b), up(&s));
    let t = tol(dtype);
    let mut outs = Outputs::new();
    let mut cmp = |what: &str, got: &Tensor, want: &Tensor, tol: f64| {
        assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
        assert_eq!(got.shape(), want.shape(), "{what}: shape");
        let v = down(g, got);
        assert_rel_norm(what, &v, &vals(want), tol);
        outs.push(bits(&v));
    };

    cmp("add", &g.add(&ga, &gb).unwrap(), &c.add(&a, &b).unwrap(), t);
    cmp("scale", &g.scale(&ga, -0.37).unwrap(), &c.scale(&a, -0.37).unwrap(), t);
    cmp("scale_by_fwd", &g.scale_by_fwd(&ga, &gs).unwrap(), &c.scale_by_fwd(&a, &s).unwrap(), t);
    cmp("swiglu_fwd", &g.swiglu_fwd(&ga, &gb).unwrap(), &c.swiglu_fwd(&a, &b).unwrap(), t);

    // add_assign into a copy of b (values of the same dtype).
    let (dst, gdst) = (b.deep_copy().unwrap(), up(&b));
    c.add_assign(&dst, &a).unwrap();
    g.add_assign(&gdst, &ga).unwrap();
    cmp("add_assign", &gdst, &dst, t);

    // Backward ops: F32 gradients, saved values of `dtype`.
    let dy = f32_rand(shape, seed ^ 3);
    let (dx, ds) = (f32_rand(shape, seed ^ 4), f32_rand(&[1], seed ^ 5));
    let (gdy, gdx, gds) = (up(&dy), up(&dx), up(&ds));
    c.scale_by_bwd(&a, &s, &dy, &dx, &ds).unwrap();
    g.scale_by_bwd(&ga, &gs, &gdy, &gdx, &gds).unwrap();
    cmp("scale_by_bwd dx", &gdx, &dx, F32_TOL);
    cmp("scale_by_bwd ds", &gds, &ds, F32_TOL);
    let (da, db) = (f32_rand(shape, seed ^ 6), f32_rand(shape, seed ^ 7));
    let (gda, gdb) = (up(&da), up(&db));
    c.swiglu_bwd(&a, &b, &dy, &da, &db).unwrap();
    g.swiglu_bwd(&ga, &gb, &gdy, &gda, &gdb).unwrap();
    cmp("swiglu_bwd da", &gda, &da, F32_TOL);
    cmp("swiglu_bwd db", &gdb, &db, F32_TOL);

    // Casts are exact: f32 → bf16 rounds to nearest even bit for bit, bf16 → f32 widens.
    let x = f32_rand(shape, seed ^ 8);
    let (cx, gx) = (c.cast(&x, DType::BF16).unwrap(), g.cast(&up(&x), DType::BF16).unwrap());
    assert_eq!(down(g, &gx), vals(&cx), "cast f32 → bf16 must round to nearest even exactly");
    let back = g.cast(&gx, DType::F32).unwrap();
    assert_eq!(down(g, &back), vals(&cx), "cast bf16 → f32 must be exact");
    outs.push(bits(&down(g, &gx)));

    // The launch log: one flat kernel per op, the chunked grid.
    let Some(log) = g.gpu().launch_log() else { return outs };
    let sfx = if dtype == DType::BF16 { "bf16" } else { "f32" };
    let n = a.numel();
    let want: Vec<String> =
        ["add_fwd", "scale_fwd", "scale_fwd", "swiglu_fwd", "add_assign", "scale_by_bwd"]
            .iter()
            .map(|k| format!("{k}_{sfx}"))
            .chain(["sum_f64_into_f32".to_string(), format!("swiglu_bwd_{sfx}")])
            .chain(["cast_f32_bf16".to_string(), "cast_bf16_f32".to_string()])
            .collect();
    assert_eq!(symbols(&log), want, "kernels launched");
    let grid = Dim3::x(n.div_ceil(EW_CHUNK) as u32);
    assert!(log
        .iter()
        .filter(|r| r.symbol != "sum_f64_into_f32")
        .all(|r| r.grid == grid && r.block == Dim3::x(EW_BLOCK)));
    outs
}

proptest! {
    #![proptest_config(proptest_config(24))]

    #[test]
    fn emu_elementwise_matches_cpu(rows in 1..=9usize, cols in 1..=700usize, bf16 in any::<bool>(), seed in any::<u64>()) {
        let dtype = if bf16 { DType::BF16 } else { DType::F32 };
        on_two_schedules(seed, |g| check_elementwise(g, &[rows, cols], dtype, seed));
    }

    #[test]
    fn cuda_elementwise_matches_cpu(rows in 1..=9usize, cols in 1..=700usize, bf16 in any::<bool>(), seed in any::<u64>()) {
        if let Some(g) = cuda() {
            let dtype = if bf16 { DType::BF16 } else { DType::F32 };
            check_elementwise(&g, &[rows, cols], dtype, seed);
        }
    }
}

/// The model's widths, and more than one block (several chunks, a ragged last one).
#[test]
fn emu_elementwise_at_model_widths() {
    for (i, dtype) in [DType::F32, DType::BF16].into_iter().enumerate() {
        on_two_schedules(20 + i as u64, |g| check_elementwise(g, &[3, 1792], dtype, 20));
        on_two_schedules(22 + i as u64, |g| check_elementwise(g, &[5, 448], dtype, 21));
    }
}

#[test]
fn emu_elementwise_rejects_bad_dtypes() {
    let g = emu();
    let a = g.upload(&f32_rand(&[4], 1)).unwrap();
    let b = g.upload(&rand_tensor_dt(&[4], DType::BF16, 2)).unwrap();
    let msg = |e: steel_runtime::Error| e.to_string();
    assert!(msg(g.add(&a, &b).unwrap_err()).contains("add"));
    let s16 = g.upload(&rand_tensor_dt(&[1], DType::BF16, 3)).unwrap();
    assert!(msg(g.scale_by_fwd(&a, &s16).unwrap_err()).contains("F32"));
    let ids = g.upload(&ids_tensor(&[1, 2, 3, 4], &[4])).unwrap();
    assert!(msg(g.cast(&ids, DType::F32).unwrap_err()).contains("F32 ↔ BF16"));
    // BF16 gradients are refused: activation gradients are F32.
    let (d16, x) = (g.upload(&rand_tensor_dt(&[4], DType::BF16, 4)).unwrap(), b.clone());
    let e = g.swiglu_bwd(
        &x,
        &x,
        &d16,
        &g.zeros(&[4], DType::F32).unwrap(),
        &g.zeros(&[4], DType::F32).unwrap(),
    );
    assert!(msg(e.unwrap_err()).contains("dy must be F32"));
}

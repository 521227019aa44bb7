use super::*;

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

// ---- sum_rows_into and the empty product --------------------------------------------------------

fn check_sum_rows<G: TestGpu>(
    g: &GpuBackend<G>,
    rows: usize,
    cols: usize,
    dtype: DType,
    seed: u64,
) -> Outputs {
    let c = cpu();
    let x = rand_tensor_dt(&[rows, cols], dtype, seed);
    let out = f32_rand(&[cols], seed ^ 1);
    let gout = g.upload(&out).unwrap();
    c.sum_rows_into(&x, &out).unwrap();
    g.sum_rows_into(&g.upload(&x).unwrap(), &gout).unwrap();
    let got = down(g, &gout);
    // The CPU's order of adds (64-row chunks, then the chunks in order): bit-identical.
    assert_eq!(bits(&got), bits(&vals(&out)), "sum_rows_into must add in the CPU's order");
    if let Some(log) = g.gpu().launch_log() {
        let sfx = if dtype == DType::BF16 { "bf16" } else { "f32" };
        assert_eq!(
            symbols(&log),
            [format!("sum_rows_partial_{sfx}").as_str(), "sum_rows_reduce_f32"]
        );
    }
    vec![bits(&got)]
}

proptest! {
    #![proptest_config(proptest_config(24))]

    #[test]
    fn emu_sum_rows_into_matches_cpu(rows in 1..=200usize, cols in 1..=300usize, bf16 in any::<bool>(), seed in any::<u64>()) {
        let dtype = if bf16 { DType::BF16 } else { DType::F32 };
        on_two_schedules(seed, |g| check_sum_rows(g, rows, cols, dtype, seed));
    }

    #[test]
    fn cuda_sum_rows_into_matches_cpu(rows in 1..=200usize, cols in 1..=300usize, bf16 in any::<bool>(), seed in any::<u64>()) {
        if let Some(g) = cuda() {
            let dtype = if bf16 { DType::BF16 } else { DType::F32 };
            check_sum_rows(&g, rows, cols, dtype, seed);
        }
    }
}

#[test]
fn emu_sum_rows_into_at_model_widths() {
    on_two_schedules(40, |g| check_sum_rows(g, 130, 1792, DType::F32, 40));
    on_two_schedules(41, |g| check_sum_rows(g, 70, 448, DType::BF16, 41));
}

/// k = 0: the product is empty, so `matmul` gives the bias in every row (or zeros), and
/// `matmul_into` gives `beta · out` — as the CPU backend, for f32 and bf16 outputs.
#[test]
fn emu_matmul_with_an_empty_product() {
    use steel_runtime::Matmul;
    let (g, c) = (emu(), cpu());
    for (dtype, batch) in [(DType::F32, 1usize), (DType::BF16, 3)] {
        let a_shape: Vec<usize> = if batch == 1 { vec![5, 0] } else { vec![batch, 5, 0] };
        let (a, b) = (Tensor::zeros(&a_shape, dtype), Tensor::zeros(&[0, 7], dtype));
        let bias = rand_tensor_dt(&[7], dtype, 50);
        let (ga, gb, gbias) =
            (g.upload(&a).unwrap(), g.upload(&b).unwrap(), g.upload(&bias).unwrap());
        let want = c
            .matmul(
                &c.cast(&a, DType::F32).unwrap(),
                &c.cast(&b, DType::F32).unwrap(),
                Some(&c.cast(&bias, DType::F32).unwrap()),
                Matmul::NN,
                None,
            )
            .unwrap();
        let got = g.matmul(&ga, &gb, Some(&gbias), Matmul::NN, None).unwrap();
        assert_eq!((got.shape(), got.dtype()), (want.shape(), dtype));
        assert_eq!(down(&g, &got), vals(&want), "k = 0 with a bias: every row is the bias");
        let zeros = g.matmul(&ga, &gb, None, Matmul::NN, None).unwrap();
        assert!(down(&g, &zeros).iter().all(|&v| v == 0.0));
        for beta in [0.0f32, 1.0, -0.5] {
            let spec = Matmul { beta, ..Matmul::NN };
            let prev = f32_rand(&[5, 7], 51);
            let want = prev.deep_copy().unwrap();
            c.matmul_into(
                &c.cast(&a, DType::F32).unwrap(),
                &c.cast(&b, DType::F32).unwrap(),
                spec,
                &want,
            )
            .unwrap();
            let got = g.upload(&prev).unwrap();
            g.matmul_into(&ga, &gb, spec, &got).unwrap();
            assert_eq!(down(&g, &got), vals(&want), "matmul_into with k = 0, beta {beta}");
        }
    }
}

/// `matmul_into` of a `[1, m, n]` product into an `[m, n]` output (the soft-MoE's weight
/// gradient at batch 1), accepted as the CPU accepts it: the product's numel, ending in n.
#[test]
fn emu_matmul_into_a_batch_of_one() {
    let (c, g) = (cpu(), emu());
    let (a, b) = (f32_rand(&[1, 5, 3], 1), f32_rand(&[3, 4], 2));
    let prev = f32_rand(&[5, 4], 3);
    let spec = steel_runtime::Matmul::NN;
    let want = prev.deep_copy().unwrap();
    c.matmul_into(&a, &b, spec, &want).unwrap();
    let got = g.upload(&prev).unwrap();
    g.matmul_into(&g.upload(&a).unwrap(), &g.upload(&b).unwrap(), spec, &got).unwrap();
    assert_rel_norm("matmul_into [1,5,4] → [5,4]", &down(&g, &got), &vals(&want), F32_TOL);
    let wrong = g.upload(&f32_rand(&[4, 5], 4)).unwrap();
    let r = g.matmul_into(&g.upload(&a).unwrap(), &g.upload(&b).unwrap(), spec, &wrong);
    assert!(r.is_err(), "an output of the right numel but the wrong last axis is refused");
}

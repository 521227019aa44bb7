use super::*;
use steel_runtime::gpu::lm_head_ce::vocab_block;

// ---- lm_head + softmax cross entropy ------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
pub(super) fn check_lm_head_ce<G: TestGpu>(
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
    assert_eq!(first.block, Dim3::x(vocab_block(v)));
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

/// bf16 `x`/`w` (the GPU's mixed precision): bf16 GEMMs with f32 outputs, f32 statistics, the
/// chunk's dlogits rounded to bf16 for the dx/dw GEMMs; against the CPU given the same bf16
/// inputs (≤ 1e-2; the loss and lse come from f32 logits of exact products and hold 1e-5).
fn check_lm_head_ce_bf16<G: TestGpu>(
    g: &GpuBackend<G>,
    n: usize,
    h: usize,
    v: usize,
    chunk: usize,
    seed: u64,
) -> Outputs {
    let c = cpu();
    let spec = CrossEntropy { ignore_index: -100, chunk_tokens: chunk };
    let (x, w) = (
        rand_tensor_dt(&[n, h], DType::BF16, seed),
        rand_tensor_dt(&[v, h], DType::BF16, seed ^ 1),
    );
    let ids: Vec<i32> = rand_ids(n, v, seed ^ 2)
        .into_iter()
        .enumerate()
        .map(|(i, t)| if i % 3 == 1 { -100 } else { t })
        .collect();
    let targets = ids_tensor(&ids, &[n]);
    let (gx, gw, gt) = (g.upload(&x).unwrap(), g.upload(&w).unwrap(), g.upload(&targets).unwrap());
    let want = c.lm_head_ce_fwd(&x, &w, &targets, spec).unwrap();
    let got = g.lm_head_ce_fwd(&gx, &gw, &gt, spec).unwrap();
    assert_eq!(got.count, want.count, "the count comes from the device");
    assert_eq!(got.lse.dtype(), DType::F32);
    assert_rel_norm("lm_head_ce_fwd bf16 lse", &down(g, &got.lse), &vals(&want.lse), F32_TOL);
    assert_rel_norm(
        "lm_head_ce_fwd bf16 loss",
        &down(g, &got.loss_sum),
        &vals(&want.loss_sum),
        F32_TOL,
    );
    let dloss = Tensor::from_f64(&[0.75], &[1], DType::F32).unwrap();
    let (dx, dw) = (f32_rand(&[n, h], seed ^ 3), f32_rand(&[v, h], seed ^ 4));
    let (gdx, gdw) = (g.upload(&dx).unwrap(), g.upload(&dw).unwrap());
    let scale = 1.0 / want.count.max(1) as f64;
    c.lm_head_ce_bwd(&x, &w, &targets, &want.lse, &dloss, scale, spec, &dx, &dw).unwrap();
    let (glse, gdloss) = (g.upload(&want.lse).unwrap(), g.upload(&dloss).unwrap());
    g.lm_head_ce_bwd(&gx, &gw, &gt, &glse, &gdloss, scale, spec, &gdx, &gdw).unwrap();
    // dx, dw are accumulated onto random values; compare the increments, which carry the error.
    let (gdx_v, gdw_v) = (down(g, &gdx), down(g, &gdw));
    let inc = |after: &[f64], before: &Tensor| -> Vec<f64> {
        after.iter().zip(vals(before)).map(|(a, b)| a - b).collect()
    };
    let (dx0, dw0) = (f32_rand(&[n, h], seed ^ 3), f32_rand(&[v, h], seed ^ 4));
    assert_rel_norm("lm_head_ce_bwd bf16 dx", &inc(&gdx_v, &dx0), &inc(&vals(&dx), &dx0), BF16_TOL);
    assert_rel_norm("lm_head_ce_bwd bf16 dw", &inc(&gdw_v, &dw0), &inc(&vals(&dw), &dw0), BF16_TOL);
    if let Some(log) = g.gpu().launch_log() {
        let syms = symbols(&log);
        assert_eq!(syms.iter().filter(|s| **s == "ce_count_targets").count(), 1, "{syms:?}");
        let chunks = n.div_ceil(chunk.min(n));
        assert_eq!(syms.iter().filter(|s| **s == "cast_f32_bf16").count(), chunks, "{syms:?}");
    }
    vec![bits(&down(g, &got.lse)), bits(&gdx_v), bits(&gdw_v)]
}

proptest! {
    #![proptest_config(proptest_config(16))]

    #[test]
    fn emu_lm_head_ce_bf16_matches_cpu(n in 1..=20usize, h in 1..=40usize, v in 2..=500usize, chunk in 1..=8usize, seed in any::<u64>()) {
        on_two_schedules(seed, |g| check_lm_head_ce_bf16(g, n, h, v, chunk, seed));
    }

    #[test]
    fn cuda_lm_head_ce_bf16_matches_cpu(n in 1..=20usize, h in 1..=40usize, v in 2..=500usize, chunk in 1..=8usize, seed in any::<u64>()) {
        if let Some(g) = cuda() {
            check_lm_head_ce_bf16(&g, n, h, v, chunk, seed);
        }
    }
}

/// The vocabulary 151,936 at hidden 448 in bf16 (two tokens); an invalid target is an error that
/// names its position and value, found on the device.
#[test]
fn emu_lm_head_ce_bf16_at_the_vocabulary_and_bad_targets() {
    on_two_schedules(70, |g| check_lm_head_ce_bf16(g, 2, 448, 151_936, 2, 70));
    let g = emu();
    let spec = CrossEntropy { ignore_index: -100, chunk_tokens: 4 };
    let (x, w) =
        (g.upload(&f32_rand(&[3, 4], 1)).unwrap(), g.upload(&f32_rand(&[5, 4], 2)).unwrap());
    for (bad, pos) in [(5, 1), (-3, 2)] {
        let mut ids = vec![0, 4, -100];
        ids[pos] = bad;
        let t = g.upload(&ids_tensor(&ids, &[3])).unwrap();
        let e = g.lm_head_ce_fwd(&x, &w, &t, spec).unwrap_err().to_string();
        assert!(e.contains(&format!("target {bad} at position {pos}")), "{e}");
    }
}

/// The caller's count: the GPU launches no count kernel and downloads nothing (the loss and lse
/// are those of `lm_head_ce_fwd`); the CPU default checks the count.
#[test]
fn emu_lm_head_ce_fwd_counted_takes_the_callers_count() {
    let (g, c) = (emu(), cpu());
    let spec = CrossEntropy { ignore_index: -100, chunk_tokens: 2 };
    let (x, w) = (rand_tensor_dt(&[5, 6], DType::BF16, 1), rand_tensor_dt(&[9, 6], DType::BF16, 2));
    let targets = ids_tensor(&[3, -100, 8, 0, -100], &[5]);
    let (gx, gw, gt) = (g.upload(&x).unwrap(), g.upload(&w).unwrap(), g.upload(&targets).unwrap());
    let want = c.lm_head_ce_fwd(&x, &w, &targets, spec).unwrap();
    let before = g.gpu().launches().len();
    let got = g.lm_head_ce_fwd_counted(&gx, &gw, &gt, spec, 3).unwrap();
    assert_eq!(got.count, 3);
    let syms: Vec<&str> = g.gpu().launches()[before..].iter().map(|r| r.symbol).collect();
    assert!(!syms.contains(&"ce_count_targets"), "{syms:?}");
    assert_rel_norm("counted lse", &down(&g, &got.lse), &vals(&want.lse), F32_TOL);
    assert_rel_norm("counted loss", &down(&g, &got.loss_sum), &vals(&want.loss_sum), F32_TOL);
    let e = c.lm_head_ce_fwd_counted(&x, &w, &targets, spec, 4).unwrap_err().to_string();
    assert!(e.contains("count 4 is not the 3 counted targets"), "{e}");
    let e = g.lm_head_ce_fwd_counted(&gx, &gw, &gt, spec, 6).unwrap_err().to_string();
    assert!(e.contains("exceeds the 5 targets"), "{e}");
}

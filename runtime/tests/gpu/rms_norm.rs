use super::*;
use steel_runtime::gpu::rms_norm::{row_block, COLUMN_BLOCK, DW_ROWS_PER_CHUNK};

// ---- add_rms_norm -------------------------------------------------------------------------------

pub(super) fn check_add_rms_norm<G: TestGpu>(
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
    let block = Dim3::x(row_block(h));
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
    let chunks = rows.div_ceil(DW_ROWS_PER_CHUNK) as u32;
    let cols = h.div_ceil(COLUMN_BLOCK as usize) as u32;
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

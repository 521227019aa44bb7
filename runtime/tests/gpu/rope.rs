use super::*;
use steel_runtime::gpu::rope::{rope_grid, ROPE_BLOCK};
use steel_runtime::Error;

// ---- rope -----------------------------------------------------------------------------------------

/// The forward on F32 and on BF16 inputs, and the backward into a random non-zero dx, against the
/// CPU. The bf16 reference is the CPU's f32 rotation of the same bf16-rounded input.
pub(super) fn check_rope<G: TestGpu>(
    g: &GpuBackend<G>,
    shape: [usize; 4],
    theta: f64,
    offset: usize,
    seed: u64,
) -> Outputs {
    let c = cpu();
    let x = f32_rand(&shape, seed);
    let want = c.rope_fwd(&x, theta, offset).unwrap();
    let y = g.rope_fwd(&g.upload(&x).unwrap(), theta, offset).unwrap();
    assert_eq!((y.shape(), y.dtype()), (x.shape(), DType::F32));
    assert_rel_norm("rope_fwd f32", &down(g, &y), &vals(&want), F32_TOL);

    let x16 = rand_tensor_dt(&shape, DType::BF16, seed ^ 1);
    let want16 = c.rope_fwd(&c.cast(&x16, DType::F32).unwrap(), theta, offset).unwrap();
    let y16 = g.rope_fwd(&g.upload(&x16).unwrap(), theta, offset).unwrap();
    assert_eq!((y16.shape(), y16.dtype()), (x.shape(), DType::BF16));
    assert_rel_norm("rope_fwd bf16", &down(g, &y16), &vals(&want16), BF16_TOL);

    let dy = f32_rand(&shape, seed ^ 2);
    let dx = f32_rand(&shape, seed ^ 3);
    let gdx = g.upload(&dx).unwrap();
    c.rope_bwd(&dy, theta, offset, &dx).unwrap();
    g.rope_bwd(&g.upload(&dy).unwrap(), theta, offset, &gdx).unwrap();
    assert_rel_norm("rope_bwd dx", &down(g, &gdx), &vals(&dx), F32_TOL);
    let outs: Outputs = [&y, &y16, &gdx].iter().map(|t| bits(&down(g, t))).collect();

    let Some(log) = g.gpu().launch_log() else { return outs };
    assert_eq!(symbols(&log), ["rope_fwd_f32", "rope_fwd_bf16", "rope_bwd_f32"]);
    let [b, t, h, d] = shape;
    for (r, dt) in log.iter().zip([DType::F32, DType::BF16, DType::F32]) {
        let grid = rope_grid(b * t * h, d / 2, dt) as u32;
        assert_eq!((r.grid, r.block), (Dim3::x(grid), Dim3::x(ROPE_BLOCK)), "{}", r.symbol);
    }
    assert_eq!((log[0].nvtx.as_str(), log[2].nvtx.as_str()), ("rope_fwd", "rope_bwd"));
    outs
}

/// Refusals: an odd head_dim or a 3-D input (shape), an F32 x/dx mix or BF16 gradients (dtype).
fn check_rope_errors<G: TestGpu>(g: &GpuBackend<G>) {
    let up = |t: Tensor| g.upload(&t).unwrap();
    let r = g.rope_fwd(&up(f32_rand(&[1, 2, 1, 5], 1)), 1e6, 0);
    assert!(matches!(r, Err(Error::Shape { op: "rope_fwd", .. })), "{r:?}");
    let r = g.rope_fwd(&up(f32_rand(&[2, 1, 4], 1)), 1e6, 0);
    assert!(matches!(r, Err(Error::Shape { op: "rope_fwd", .. })), "{r:?}");
    let r = g.rope_fwd(&up(ids_tensor(&[1; 4], &[1, 1, 1, 4])), 1e6, 0);
    assert!(matches!(r, Err(Error::DType { op: "rope_fwd", .. })), "{r:?}");
    let (dy, dy16) =
        (up(f32_rand(&[1, 2, 1, 4], 2)), up(rand_tensor_dt(&[1, 2, 1, 4], DType::BF16, 3)));
    let r = g.rope_bwd(&dy16, 1e6, 0, &up(f32_rand(&[1, 2, 1, 4], 4)));
    assert!(matches!(r, Err(Error::DType { op: "rope_bwd", .. })), "{r:?}");
    let r = g.rope_bwd(&dy, 1e6, 0, &up(f32_rand(&[1, 2, 2, 4], 4)));
    assert!(matches!(r, Err(Error::Shape { op: "rope_bwd", .. })), "{r:?}");
}

/// The model's head_dim 56 (32 heads: f32 rows take the vector path, bf16 rows of 28 pairs the
/// scalar one), 64 (bf16 vectors), and the smallest 2 and 6, at decoding offsets too.
const FIXED: [([usize; 4], f64, usize); 5] = [
    ([1, 3, 32, 56], 1e6, 0),
    ([2, 5, 3, 64], 1e6, 2041),
    ([1, 7, 3, 2], 1e4, 3),
    ([3, 4, 5, 6], 1e6, 0),
    ([1, 1, 32, 56], 1e6, 2047),
];

#[test]
fn emu_rope_fixed_cases() {
    for (i, (shape, theta, offset)) in FIXED.into_iter().enumerate() {
        on_two_schedules(i as u64, |g| check_rope(g, shape, theta, offset, 50 + i as u64));
    }
    check_rope_errors(&emu());
}

#[test]
fn cuda_rope_fixed_cases() {
    if let Some(g) = cuda() {
        for (i, (shape, theta, offset)) in FIXED.into_iter().enumerate() {
            check_rope(&g, shape, theta, offset, 50 + i as u64);
        }
        check_rope_errors(&g);
    }
}

proptest! {
    #![proptest_config(proptest_config(32))]

    #[test]
    fn emu_rope_fwd_bwd_matches_cpu(b in 1..=2usize, t in 1..=9usize, h in 1..=5usize, half in 1..=40usize, big_theta in any::<bool>(), offset in 0..=3000usize, seed in any::<u64>()) {
        let theta = if big_theta { 1e6 } else { 1e4 };
        on_two_schedules(seed, |g| check_rope(g, [b, t, h, 2 * half], theta, offset, seed));
    }

    #[test]
    fn cuda_rope_fwd_bwd_matches_cpu(b in 1..=2usize, t in 1..=9usize, h in 1..=5usize, half in 1..=40usize, big_theta in any::<bool>(), offset in 0..=3000usize, seed in any::<u64>()) {
        if let Some(g) = cuda() {
            let theta = if big_theta { 1e6 } else { 1e4 };
            check_rope(&g, [b, t, h, 2 * half], theta, offset, seed);
        }
    }
}

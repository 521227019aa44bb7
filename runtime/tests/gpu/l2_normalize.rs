use super::softmax::{axis_shape, expect_axis_launch, split, tol};
use super::*;
use steel_runtime::Error;

const EPS: f64 = 1e-3;

/// `‖got − want‖/‖want‖` separately over the elements where `tiny` holds and where it does not
/// (the divisor-eps columns have much larger gradients, which would hide errors elsewhere).
fn assert_split(what: &str, got: &[f64], want: &[f64], tiny: &[bool], tol: f64) {
    for (part, sel) in [("norm > eps", false), ("norm ≤ eps", true)] {
        let pick = |v: &[f64]| -> Vec<f64> {
            v.iter().zip(tiny).filter(|(_, &t)| t == sel).map(|(x, _)| *x).collect()
        };
        let (g, w) = (pick(got), pick(want));
        if !w.is_empty() {
            assert_rel_norm(&format!("{what} ({part})"), &g, &w, tol);
        }
    }
}

/// l2_normalize of `x` (values ±[0.1, 1] stored as `dt`; with `tiny`, every third [outer, inner]
/// column scaled by 1e-5 so that its norm is below eps) along `axis`, against the CPU in f32 from
/// the same rounded inputs; the backward from the reference's y (stored as `dt`) and norm, into
/// a random non-zero dx.
pub(super) fn check_l2_normalize<G: TestGpu>(
    g: &GpuBackend<G>,
    shape: &[usize],
    axis: usize,
    dt: DType,
    tiny: bool,
    seed: u64,
) -> Outputs {
    let c = cpu();
    let what = format!("{shape:?} axis {axis} {dt}");
    let (_, n, inner) = split(shape, axis);
    let numel: usize = shape.iter().product();
    // Column (outer · inner index) of every element, and whether it is a tiny one.
    let col = |k: usize| (k / (n * inner)) * inner + k % inner;
    let is_tiny = |column: usize| tiny && column % 3 == 1;
    let tiny_el: Vec<bool> = (0..numel).map(|k| is_tiny(col(k))).collect();
    let cols = numel / n.max(1);
    let tiny_col: Vec<bool> = (0..cols).map(is_tiny).collect();
    let v: Vec<f64> = rand_vals(numel, seed)
        .iter()
        .zip(&tiny_el)
        .map(|(v, &t)| if t { v * 1e-5 } else { *v })
        .collect();
    let x = Tensor::from_f64(&v, shape, dt).unwrap();
    let (y_ref, norm_ref) =
        c.l2_normalize_fwd(&c.cast(&x, DType::F32).unwrap(), axis, EPS).unwrap();
    let (gy, gnorm) = g.l2_normalize_fwd(&g.upload(&x).unwrap(), axis, EPS).unwrap();
    assert_eq!((gy.dtype(), gy.shape()), (dt, shape));
    assert_eq!((gnorm.dtype(), gnorm.shape()), (DType::F32, norm_ref.shape()));
    assert_split(
        &format!("l2_normalize_fwd y {what}"),
        &down(g, &gy),
        &vals(&y_ref),
        &tiny_el,
        tol(dt),
    );
    assert_split(
        &format!("l2_normalize_fwd norm {what}"),
        &down(g, &gnorm),
        &vals(&norm_ref),
        &tiny_col,
        F32_TOL,
    );

    let y_saved = c.cast(&y_ref, dt).unwrap();
    let dy = f32_rand(shape, seed ^ 1);
    let dx = super::softmax::scaled_rand(shape, DType::F32, 1e-3, 0.0, seed ^ 2);
    let up = |t: &Tensor| g.upload(t).unwrap();
    let (gys, gn, gdy, gdx) = (up(&y_saved), up(&norm_ref), up(&dy), up(&dx));
    c.l2_normalize_bwd(&c.cast(&y_saved, DType::F32).unwrap(), &norm_ref, &dy, axis, EPS, &dx)
        .unwrap();
    g.l2_normalize_bwd(&gys, &gn, &gdy, axis, EPS, &gdx).unwrap();
    assert_split(
        &format!("l2_normalize_bwd dx {what}"),
        &down(g, &gdx),
        &vals(&dx),
        &tiny_el,
        F32_TOL,
    );
    let outs = vec![bits(&down(g, &gy)), bits(&down(g, &gnorm)), bits(&down(g, &gdx))];

    let Some(log) = g.gpu().launch_log() else { return outs };
    assert_eq!(log.len(), 2, "{what}: {:?}", symbols(&log));
    expect_axis_launch(&log[0], "l2_normalize", "fwd", dt, shape, axis);
    expect_axis_launch(&log[1], "l2_normalize", "bwd", dt, shape, axis);
    outs
}

/// The fixed cases: the model's widths (hidden 1792 per token, 448), `phi`'s slot columns over
/// the hidden axis (axis 0), [B, T, slots] over the token axis, n = 1 on both layouts, rows
/// longer than a block's vector sweep, narrow and wide column tiles, ragged bf16 rows; each with
/// and without columns whose norm is below eps.
const FIXED: &[(&[usize], usize)] = &[
    (&[3, 1792], 1),
    (&[5, 448], 1),
    (&[448, 24], 0),
    (&[2, 300, 17], 1),
    (&[6, 1], 1),
    (&[1, 5], 0),
    (&[7], 0),
    (&[2, 5003], 1),
    (&[2, 9, 3], 1),
    (&[9, 13], 1),
];

#[test]
fn emu_l2_normalize_fixed_shapes_match_cpu() {
    for (i, &(shape, axis)) in FIXED.iter().enumerate() {
        for dt in [DType::F32, DType::BF16] {
            for tiny in [false, true] {
                let seed = 60 + i as u64;
                on_two_schedules(seed, |g| check_l2_normalize(g, shape, axis, dt, tiny, seed));
            }
        }
    }
}

#[test]
fn cuda_l2_normalize_fixed_shapes_match_cpu() {
    let Some(g) = cuda() else { return };
    for (i, &(shape, axis)) in FIXED.iter().enumerate() {
        for dt in [DType::F32, DType::BF16] {
            for tiny in [false, true] {
                check_l2_normalize(&g, shape, axis, dt, tiny, 60 + i as u64);
            }
        }
    }
}

/// Empty tensors: nothing launched, zero norms for an empty axis. Bad operands are errors
/// naming the op.
#[test]
fn emu_l2_normalize_empty_and_rejected_operands() {
    let g = emu();
    let x = g.upload(&f32_rand(&[3, 0, 2], 1)).unwrap();
    let (y, norm) = g.l2_normalize_fwd(&x, 1, EPS).unwrap();
    assert_eq!((y.shape(), norm.shape()), (&[3, 0, 2][..], &[3, 2][..]));
    assert_eq!(down(&g, &norm), vec![0.0; 6]);
    let dx = g.zeros(&[3, 0, 2], DType::F32).unwrap();
    g.l2_normalize_bwd(&y, &norm, &x, 1, EPS, &dx).unwrap();
    let x = g.upload(&f32_rand(&[0, 4], 1)).unwrap();
    let (y, norm) = g.l2_normalize_fwd(&x, 1, EPS).unwrap();
    assert_eq!((y.shape(), norm.shape()), (&[0, 4][..], &[0][..]));
    assert!(g.gpu().launches().is_empty(), "empty tensors launch no kernel");

    let up = |shape: &[usize], dt: DType| g.upload(&rand_tensor_dt(shape, dt, 2)).unwrap();
    let dtype_op = |e: Error| match e {
        Error::DType { op, .. } => op,
        other => panic!("expected a dtype error, got {other}"),
    };
    let ids = g.upload(&Tensor::from_slice(&[1i32; 24], &[4, 6]).unwrap()).unwrap();
    assert_eq!(dtype_op(g.l2_normalize_fwd(&ids, 1, EPS).unwrap_err()), "l2_normalize_fwd");
    let (x, y, dx) = (up(&[4, 6], DType::F32), up(&[4, 6], DType::BF16), up(&[4, 6], DType::F32));
    assert!(matches!(
        g.l2_normalize_fwd(&x, 2, EPS),
        Err(Error::Shape { op: "l2_normalize_fwd", .. })
    ));
    let (norm, norm_bf) = (up(&[4], DType::F32), up(&[4], DType::BF16));
    let dybf = up(&[4, 6], DType::BF16);
    assert_eq!(
        dtype_op(g.l2_normalize_bwd(&ids, &norm, &x, 1, EPS, &dx).unwrap_err()),
        "l2_normalize_bwd"
    );
    assert_eq!(
        dtype_op(g.l2_normalize_bwd(&y, &norm_bf, &x, 1, EPS, &dx).unwrap_err()),
        "l2_normalize_bwd"
    );
    assert_eq!(
        dtype_op(g.l2_normalize_bwd(&y, &norm, &dybf, 1, EPS, &dx).unwrap_err()),
        "l2_normalize_bwd"
    );
    let norm6 = up(&[6], DType::F32);
    assert!(matches!(g.l2_normalize_bwd(&y, &norm6, &x, 1, EPS, &dx), Err(Error::Shape { .. })));
    assert!(matches!(g.l2_normalize_bwd(&y, &norm, &dx, 1, EPS, &dx), Err(Error::Invalid { .. })));
    assert!(g.gpu().launches().is_empty(), "rejected operands launch nothing");
    // Both valid: y BF16 with F32 norm, dy and dx.
    g.l2_normalize_bwd(&y, &norm, &x, 1, EPS, &dx).unwrap();
    assert_eq!(symbols(&g.gpu().launches()), ["l2_normalize_bwd_bf16"]);
}

proptest! {
    #![proptest_config(proptest_config(24))]

    #[test]
    fn emu_l2_normalize_matches_cpu(others in prop::collection::vec(1..=9usize, 0..=3), axis_pick in any::<usize>(), n_raw in any::<usize>(), bf16 in any::<bool>(), tiny in any::<bool>(), seed in any::<u64>()) {
        let (shape, axis) = axis_shape(&others, axis_pick, n_raw, 20_000, 700);
        let dt = if bf16 { DType::BF16 } else { DType::F32 };
        on_two_schedules(seed, |g| check_l2_normalize(g, &shape, axis, dt, tiny, seed));
    }

    #[test]
    fn cuda_l2_normalize_matches_cpu(others in prop::collection::vec(1..=9usize, 0..=3), axis_pick in any::<usize>(), n_raw in any::<usize>(), bf16 in any::<bool>(), tiny in any::<bool>(), seed in any::<u64>()) {
        if let Some(g) = cuda() {
            let (shape, axis) = axis_shape(&others, axis_pick, n_raw, 20_000, 700);
            let dt = if bf16 { DType::BF16 } else { DType::F32 };
            check_l2_normalize(&g, &shape, axis, dt, tiny, seed);
        }
    }
}

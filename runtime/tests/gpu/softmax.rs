use super::*;
use steel_runtime::gpu::softmax::{row_block, strided_block};
use steel_runtime::Error;

// ---- shared with l2_normalize.rs: shapes, tolerances, the launch of an axis kernel ------------

/// A shape of `others.len() + 1` dims with an axis of `n` (1 ..= max_n, and ≤ max_numel
/// elements in all) at `axis_pick % dims`: the other dims stay small, the reduced one can be long.
pub(super) fn axis_shape(
    others: &[usize],
    axis_pick: usize,
    n_raw: usize,
    max_numel: usize,
    max_n: usize,
) -> (Vec<usize>, usize) {
    let axis = axis_pick % (others.len() + 1);
    let rest: usize = others.iter().product();
    let n = 1 + n_raw % (max_numel / rest).clamp(1, max_n);
    let mut shape = others.to_vec();
    shape.insert(axis, n);
    (shape, axis)
}

/// `(outer, n, inner)` around `axis`.
pub(super) fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

/// The tolerance of an output stored as `dt` (DESIGN §4).
pub(super) fn tol(dt: DType) -> f64 {
    if dt == DType::BF16 {
        BF16_TOL
    } else {
        F32_TOL
    }
}

pub(super) fn dt_name(dt: DType) -> &'static str {
    if dt == DType::BF16 {
        "bf16"
    } else {
        "f32"
    }
}

/// Random values `scale · v + offset` (v in ±[0.1, 1]) rounded to `dt`.
pub(super) fn scaled_rand(
    shape: &[usize],
    dt: DType,
    scale: f64,
    offset: f64,
    seed: u64,
) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f64> = rand_vals(n, seed).iter().map(|v| scale * v + offset).collect();
    Tensor::from_f64(&v, shape, dt).unwrap()
}

/// The kernel and launch configuration an axis op must use: `<op>_<dir>_<dt>` on the last axis
/// (one block of `row_block(n)` per row), `<op>_strided_<dir>_<dt>` elsewhere (tiles of
/// `strided_block(n, inner)`, one per outer index and column tile).
pub(super) fn expect_axis_launch(
    rec: &LaunchRecord,
    op: &str,
    dir: &str,
    dt: DType,
    shape: &[usize],
    axis: usize,
) {
    let (outer, n, inner) = split(shape, axis);
    let (symbol, grid, block) = if inner == 1 {
        (format!("{op}_{dir}_{}", dt_name(dt)), Dim3::x(outer as u32), Dim3::x(row_block(n)))
    } else {
        let (bx, by) = strided_block(n, inner);
        let blocks = outer * inner.div_ceil(bx as usize);
        (format!("{op}_strided_{dir}_{}", dt_name(dt)), Dim3::x(blocks as u32), Dim3::xy(bx, by))
    };
    assert_eq!(rec.symbol, symbol, "{shape:?} axis {axis}");
    assert_eq!((rec.grid, rec.block), (grid, block), "{symbol} on {shape:?} axis {axis}");
    assert_eq!(rec.nvtx, format!("{op}_{dir}"));
}

// ---- softmax ------------------------------------------------------------------------------------

/// Softmax of `x` (values 4·v + offset, stored as `dt`) along `axis` against the CPU in f32 from
/// the same rounded inputs; the backward from the reference's output stored as `dt`, into a
/// random non-zero dx (scaled like the increments, so that both count).
pub(super) fn check_softmax<G: TestGpu>(
    g: &GpuBackend<G>,
    shape: &[usize],
    axis: usize,
    dt: DType,
    offset: f64,
    seed: u64,
) -> Outputs {
    let c = cpu();
    let what = format!("{shape:?} axis {axis} {dt}");
    let x = scaled_rand(shape, dt, 4.0, offset, seed);
    let y_ref = c.softmax_fwd(&c.cast(&x, DType::F32).unwrap(), axis).unwrap();
    let gy = g.softmax_fwd(&g.upload(&x).unwrap(), axis).unwrap();
    assert_eq!((gy.dtype(), gy.shape()), (dt, shape));
    assert_rel_norm(&format!("softmax_fwd y {what}"), &down(g, &gy), &vals(&y_ref), tol(dt));

    let y_saved = c.cast(&y_ref, dt).unwrap();
    let dy = f32_rand(shape, seed ^ 1);
    let dx = scaled_rand(shape, DType::F32, 1e-3, 0.0, seed ^ 2);
    let (gys, gdy, gdx) =
        (g.upload(&y_saved).unwrap(), g.upload(&dy).unwrap(), g.upload(&dx).unwrap());
    c.softmax_bwd(&c.cast(&y_saved, DType::F32).unwrap(), &dy, axis, &dx).unwrap();
    g.softmax_bwd(&gys, &gdy, axis, &gdx).unwrap();
    assert_rel_norm(&format!("softmax_bwd dx {what}"), &down(g, &gdx), &vals(&dx), F32_TOL);
    let outs = vec![bits(&down(g, &gy)), bits(&down(g, &gdx))];

    let Some(log) = g.gpu().launch_log() else { return outs };
    assert_eq!(log.len(), 2, "{what}: {:?}", symbols(&log));
    expect_axis_launch(&log[0], "softmax", "fwd", dt, shape, axis);
    expect_axis_launch(&log[1], "softmax", "bwd", dt, shape, axis);
    outs
}

/// The fixed cases: the model's widths (rows of 1792 and 448, aligned for bf16), the soft-MoE
/// dispatch over the token axis of [B, T, slots], n = 1 on both layouts, rows longer than a
/// block's vector sweep, column tiles narrower and wider than a warp, ragged bf16 rows (most
/// rows not 16-byte aligned), and inputs near 100 (exp overflows without the max subtraction).
const FIXED: &[(&[usize], usize, f64)] = &[
    (&[3, 1792], 1, 0.0),
    (&[5, 448], 1, 0.0),
    (&[2, 300, 17], 1, 0.0),
    (&[1, 2048, 16], 1, 0.0),
    (&[6, 1], 1, 0.0),
    (&[1, 5], 0, 0.0),
    (&[7], 0, 0.0),
    (&[2, 5003], 1, 0.0),
    (&[3, 40], 0, 0.0),
    (&[2, 9, 3], 1, 0.0),
    (&[9, 13], 1, 0.0),
    (&[4, 333], 1, 100.0),
    (&[3, 50, 5], 1, 100.0),
];

#[test]
fn emu_softmax_fixed_shapes_match_cpu() {
    assert_eq!(row_block(1792), 224);
    assert_eq!(row_block(448), 64);
    assert_eq!(row_block(1), 32);
    assert_eq!(row_block(100_000), 256);
    assert_eq!(strided_block(300, 17), (32, 8));
    assert_eq!(strided_block(9, 3), (4, 16));
    assert_eq!(strided_block(1, 5), (8, 1));
    for (i, &(shape, axis, offset)) in FIXED.iter().enumerate() {
        for dt in [DType::F32, DType::BF16] {
            let seed = 40 + i as u64;
            on_two_schedules(seed, |g| check_softmax(g, shape, axis, dt, offset, seed));
        }
    }
}

#[test]
fn cuda_softmax_fixed_shapes_match_cpu() {
    let Some(g) = cuda() else { return };
    for (i, &(shape, axis, offset)) in FIXED.iter().enumerate() {
        for dt in [DType::F32, DType::BF16] {
            check_softmax(&g, shape, axis, dt, offset, 40 + i as u64);
        }
    }
}

/// Empty tensors launch nothing and give empty outputs; bad operands are errors naming the op.
#[test]
fn emu_softmax_empty_and_rejected_operands() {
    let g = emu();
    for (shape, axis) in [(&[0usize, 5][..], 1), (&[3, 0], 1), (&[0], 0)] {
        let x = g.upload(&f32_rand(shape, 1)).unwrap();
        let y = g.softmax_fwd(&x, axis).unwrap();
        assert_eq!(y.shape(), shape);
        let dx = g.zeros(shape, DType::F32).unwrap();
        g.softmax_bwd(&y, &x, axis, &dx).unwrap();
    }
    assert!(g.gpu().launches().is_empty(), "empty tensors launch nothing");

    let up = |shape: &[usize], dt: DType| g.upload(&rand_tensor_dt(shape, dt, 2)).unwrap();
    let x = up(&[4, 6], DType::F32);
    let ids = g.upload(&Tensor::from_slice(&[1i32; 24], &[4, 6]).unwrap()).unwrap();
    let dtype_op = |e: Error| match e {
        Error::DType { op, .. } => op,
        other => panic!("expected a dtype error, got {other}"),
    };
    assert_eq!(dtype_op(g.softmax_fwd(&ids, 1).unwrap_err()), "softmax_fwd");
    assert!(matches!(g.softmax_fwd(&x, 2), Err(Error::Shape { op: "softmax_fwd", .. })));
    let dx = up(&[4, 6], DType::F32);
    let (ybf, dybf, dxbf) =
        (up(&[4, 6], DType::BF16), up(&[4, 6], DType::BF16), up(&[4, 6], DType::BF16));
    assert_eq!(dtype_op(g.softmax_bwd(&ids, &x, 1, &dx).unwrap_err()), "softmax_bwd");
    assert_eq!(dtype_op(g.softmax_bwd(&ybf, &dybf, 1, &dx).unwrap_err()), "softmax_bwd");
    assert_eq!(dtype_op(g.softmax_bwd(&ybf, &x, 1, &dxbf).unwrap_err()), "softmax_bwd");
    let dy_short = up(&[4, 5], DType::F32);
    assert!(matches!(g.softmax_bwd(&x, &dy_short, 1, &dx), Err(Error::Shape { .. })));
    assert!(matches!(g.softmax_bwd(&x, &dx, 1, &dx), Err(Error::Invalid { .. })));
    assert!(matches!(g.softmax_bwd(&x, &ybf, 3, &dx), Err(Error::Shape { .. })));
    let host = f32_rand(&[4, 6], 3);
    assert!(matches!(g.softmax_fwd(&host, 1), Err(Error::Device { .. })));
    assert!(g.gpu().launches().is_empty(), "rejected operands launch nothing");
}

proptest! {
    #![proptest_config(proptest_config(24))]

    #[test]
    fn emu_softmax_matches_cpu(others in prop::collection::vec(1..=9usize, 0..=3), axis_pick in any::<usize>(), n_raw in any::<usize>(), bf16 in any::<bool>(), seed in any::<u64>()) {
        let (shape, axis) = axis_shape(&others, axis_pick, n_raw, 20_000, 700);
        let dt = if bf16 { DType::BF16 } else { DType::F32 };
        on_two_schedules(seed, |g| check_softmax(g, &shape, axis, dt, 0.0, seed));
    }

    #[test]
    fn cuda_softmax_matches_cpu(others in prop::collection::vec(1..=9usize, 0..=3), axis_pick in any::<usize>(), n_raw in any::<usize>(), bf16 in any::<bool>(), seed in any::<u64>()) {
        if let Some(g) = cuda() {
            let (shape, axis) = axis_shape(&others, axis_pick, n_raw, 20_000, 700);
            let dt = if bf16 { DType::BF16 } else { DType::F32 };
            check_softmax(&g, &shape, axis, dt, 0.0, seed);
        }
    }
}

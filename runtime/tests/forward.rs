//! Forward ops against direct scalar formulas written here in plain f64 loops (never calling the
//! backend), on small cases.
//!
//! Tolerances (elementwise `|got − want| ≤ tol · max(1, |want|)`): F64 1e-12 (only rounding
//! differs); F32 1e-5 against the f64 formula on the f32-rounded inputs; rope against f64
//! angles 2e-5 (the op computes its angles in f32 as HF does: an angle of ~20 rad carries an
//! error of ~2e-6).

use crate::common::*;
use proptest::prelude::*;
use proptest::sample::select;
use steel_runtime::{bf16, Backend, CrossEntropy, DType, Matmul, Tensor, Transpose};

const F64_TOL: f64 = 1e-12;
const F32_TOL: f64 = 1e-5;

// ---- matmul ---------------------------------------------------------------------------------

/// `alpha · op(a) · op(b) + bias` by the definition, with broadcasting of a batch of one.
#[allow(clippy::too_many_arguments)]
fn naive_matmul(
    a: &[f64],
    a_shape: &[usize],
    b: &[f64],
    b_shape: &[usize],
    ta: bool,
    tb: bool,
    alpha: f64,
    bias: Option<&[f64]>,
) -> Vec<f64> {
    let (ar, ac) = (a_shape[a_shape.len() - 2], a_shape[a_shape.len() - 1]);
    let (br, bc) = (b_shape[b_shape.len() - 2], b_shape[b_shape.len() - 1]);
    let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
    let n = if tb { br } else { bc };
    let ba: usize = a_shape[..a_shape.len() - 2].iter().product();
    let bb: usize = b_shape[..b_shape.len() - 2].iter().product();
    let batch = ba.max(bb);
    let mut out = vec![0.0; batch * m * n];
    for bi in 0..batch {
        let ao = if ba == 1 { 0 } else { bi * m * k };
        let bo = if bb == 1 { 0 } else { bi * k * n };
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for l in 0..k {
                    let av = if ta { a[ao + l * m + i] } else { a[ao + i * k + l] };
                    let bv = if tb { b[bo + j * k + l] } else { b[bo + l * n + j] };
                    s += av * bv;
                }
                out[(bi * m + i) * n + j] = alpha * s + bias.map_or(0.0, |bias| bias[j]);
            }
        }
    }
    out
}

fn spec(ta: bool, tb: bool, alpha: f32) -> Matmul {
    let t = |x| if x { Transpose::Yes } else { Transpose::No };
    Matmul { trans_a: t(ta), trans_b: t(tb), alpha, beta: 0.0 }
}

/// `[batch…, r, c]` shapes of a and b for batch layout `mode` (0: none, 1: both, 2: b shared,
/// 3: a batch of one, 4: b batch of one).
fn batch_shapes(
    mode: usize,
    bsz: usize,
    a_mat: [usize; 2],
    b_mat: [usize; 2],
) -> (Vec<usize>, Vec<usize>) {
    let lead = |l: &[usize], m: [usize; 2]| -> Vec<usize> { l.iter().copied().chain(m).collect() };
    match mode {
        0 => (a_mat.to_vec(), b_mat.to_vec()),
        1 => (lead(&[bsz], a_mat), lead(&[bsz], b_mat)),
        2 => (lead(&[bsz], a_mat), b_mat.to_vec()),
        3 => (lead(&[1], a_mat), lead(&[bsz], b_mat)),
        _ => (lead(&[bsz], a_mat), lead(&[1], b_mat)),
    }
}

proptest! {
    #![proptest_config(proptest_config(24))]

    #[test]
    fn matmul_matches_formula(ta in any::<bool>(), tb in any::<bool>(), mode in 0..5usize, bsz in 2..=3usize,
                              m in 1..=9usize, k in 1..=9usize, n in 1..=9usize, with_bias in any::<bool>(),
                              alpha in select(vec![1.0f32, 0.5, -1.25]), seed in any::<u64>()) {
        let a_mat = if ta { [k, m] } else { [m, k] };
        let b_mat = if tb { [n, k] } else { [k, n] };
        let (a_shape, b_shape) = batch_shapes(mode, bsz, a_mat, b_mat);
        for dt in [DType::F64, DType::F32] {
            let a = rand_tensor_dt(&a_shape, dt, seed);
            let b = rand_tensor_dt(&b_shape, dt, seed ^ 1);
            let bias = rand_tensor_dt(&[n], dt, seed ^ 2);
            let bias = with_bias.then_some(&bias);
            let got = be().matmul(&a, &b, bias, spec(ta, tb, alpha), None).unwrap();
            let want = naive_matmul(&vals(&a), &a_shape, &vals(&b), &b_shape, ta, tb, alpha as f64, bias.map(vals).as_deref());
            let out_batch = if mode == 0 { vec![] } else { vec![bsz] };
            prop_assert_eq!(got.shape(), &out_batch.into_iter().chain([m, n]).collect::<Vec<_>>()[..]);
            prop_assert_eq!(got.dtype(), dt);
            let tol = if dt == DType::F64 { F64_TOL } else { F32_TOL };
            assert_close(&format!("matmul {dt} a{a_shape:?} b{b_shape:?} ta {ta} tb {tb}"), &vals(&got), &want, tol);
        }
    }
}

/// A product large enough to be tiled (more than one 256×1024 tile) equals the formula.
#[test]
fn matmul_tiled_matches_formula() {
    let (a_shape, b_shape) = ([300, 70], [1100, 70]);
    let a = rand_tensor_dt(&a_shape, DType::F32, 1);
    let b = rand_tensor_dt(&b_shape, DType::F32, 2);
    let got = be().matmul(&a, &b, None, Matmul::NT, None).unwrap();
    let want = naive_matmul(&vals(&a), &a_shape, &vals(&b), &b_shape, false, true, 1.0, None);
    assert_close("tiled matmul F32", &vals(&got), &want, F32_TOL);
}

/// BF16 operands are widened and multiplied in f32; a BF16 output is the F32 result rounded.
#[test]
fn matmul_bf16() {
    let be = be();
    let a = rand_tensor_dt(&[2, 5, 13], DType::BF16, 1);
    let b = rand_tensor_dt(&[7, 13], DType::BF16, 2);
    let bias = rand_tensor_dt(&[7], DType::BF16, 3);
    let f32_out = be.matmul(&a, &b, Some(&bias), Matmul::NT, Some(DType::F32)).unwrap();
    let want = naive_matmul(
        &vals(&a),
        &[2, 5, 13],
        &vals(&b),
        &[7, 13],
        false,
        true,
        1.0,
        Some(&vals(&bias)),
    );
    assert_close("bf16 matmul, F32 out", &vals(&f32_out), &want, F32_TOL);
    let bf16_out = be.matmul(&a, &b, Some(&bias), Matmul::NT, None).unwrap();
    assert_eq!(bf16_out.dtype(), DType::BF16);
    assert_bits_eq(
        "bf16 matmul output = cast of the f32 result",
        &bf16_out,
        &be.cast(&f32_out, DType::BF16).unwrap(),
    );
}

/// `out = alpha · op(a) op(b) + beta · out`, and the batch-summed form for an `out` without a
/// batch axis.
#[test]
fn matmul_into_beta_and_batch_sum() {
    let be = be();
    let (a, b) = (rand_tensor(&[3, 4, 5], 1), rand_tensor(&[3, 6, 5], 2));
    let old = rand_tensor(&[3, 4, 6], 3);
    let out = old.deep_copy().unwrap();
    let s = Matmul { trans_a: Transpose::No, trans_b: Transpose::Yes, alpha: 0.75, beta: 0.5 };
    be.matmul_into(&a, &b, s, &out).unwrap();
    let prod = naive_matmul(&vals(&a), &[3, 4, 5], &vals(&b), &[3, 6, 5], false, true, 0.75, None);
    let want: Vec<f64> = prod.iter().zip(vals(&old)).map(|(p, o)| p + 0.5 * o).collect();
    assert_close("matmul_into beta 0.5", &vals(&out), &want, F64_TOL);

    // beta = 0 ignores the old contents, even NaN.
    let nan = Tensor::from_f64(&[f64::NAN; 72], &[3, 4, 6], DType::F64).unwrap();
    be.matmul_into(&a, &b, Matmul { beta: 0.0, ..s }, &nan).unwrap();
    assert_close("matmul_into beta 0 over NaN", &vals(&nan), &prod, F64_TOL);

    // Batched product into a [4, 6] out: Σ over the batch, beta applied once.
    let sum_out = rand_tensor(&[4, 6], 4);
    let old = vals(&sum_out);
    be.matmul_into(&a, &b, s, &sum_out).unwrap();
    let want: Vec<f64> =
        (0..24).map(|i| (0..3).map(|bi| prod[bi * 24 + i]).sum::<f64>() + 0.5 * old[i]).collect();
    assert_close("matmul_into summed over the batch", &vals(&sum_out), &want, F64_TOL);

    // b shared by a's batch, out without batch: Σ_i a_i · b.
    let b2 = rand_tensor(&[6, 5], 5);
    let out2 = Tensor::zeros(&[4, 6], DType::F64);
    be.matmul_into(&a, &b2, Matmul::NT.accumulate(), &out2).unwrap();
    let p2 = naive_matmul(&vals(&a), &[3, 4, 5], &vals(&b2), &[6, 5], false, true, 1.0, None);
    let want: Vec<f64> = (0..24).map(|i| (0..3).map(|bi| p2[bi * 24 + i]).sum()).collect();
    assert_close("matmul_into, shared b, summed", &vals(&out2), &want, F64_TOL);
}

#[test]
fn sum_rows_into_matches_formula() {
    let x = rand_tensor(&[3, 50, 7], 1);
    let out = rand_tensor(&[7], 2);
    let old = vals(&out);
    be().sum_rows_into(&x, &out).unwrap();
    let xv = vals(&x);
    let want: Vec<f64> =
        (0..7).map(|c| old[c] + (0..150).map(|r| xv[r * 7 + c]).sum::<f64>()).collect();
    assert_close("sum_rows_into", &vals(&out), &want, F64_TOL);
}

// ---- elementwise and layout -------------------------------------------------------------------

#[test]
fn elementwise_match_formulas() {
    let be = be();
    let (a, b) = (rand_tensor(&[3, 7, 5], 1), rand_tensor(&[3, 7, 5], 2));
    let (av, bv) = (vals(&a), vals(&b));
    let sum: Vec<f64> = av.iter().zip(&bv).map(|(x, y)| x + y).collect();
    assert_close("add", &vals(&be.add(&a, &b).unwrap()), &sum, F64_TOL);
    let acc = a.deep_copy().unwrap();
    be.add_assign(&acc, &b).unwrap();
    assert_close("add_assign", &vals(&acc), &sum, F64_TOL);
    let scaled: Vec<f64> = av.iter().map(|x| -1.5 * x).collect();
    assert_close("scale", &vals(&be.scale(&a, -1.5).unwrap()), &scaled, F64_TOL);
    let s = Tensor::from_slice(&[-1.5f64], &[1]).unwrap();
    assert_close("scale_by", &vals(&be.scale_by_fwd(&a, &s).unwrap()), &scaled, F64_TOL);
    let swiglu: Vec<f64> = av.iter().zip(&bv).map(|(&x, &y)| x / (1.0 + (-x).exp()) * y).collect();
    assert_close("swiglu", &vals(&be.swiglu_fwd(&a, &b).unwrap()), &swiglu, F64_TOL);
    let (a32, b32) = (be.cast(&a, DType::F32).unwrap(), be.cast(&b, DType::F32).unwrap());
    let want32: Vec<f64> =
        vals(&a32).iter().zip(vals(&b32)).map(|(&x, y)| x / (1.0 + (-x).exp()) * y).collect();
    assert_close("swiglu F32", &vals(&be.swiglu_fwd(&a32, &b32).unwrap()), &want32, F32_TOL);
    let t = be.copy(&a).unwrap();
    be.fill(&t, 2.5).unwrap();
    assert!(vals(&t).iter().all(|&v| v == 2.5), "fill");
    assert_eq!(vals(&a), av, "fill of a copy changed the original");
}

#[test]
fn layout_ops_match_formulas() {
    let be = be();
    let x = rand_tensor(&[3, 4, 5], 1);
    let xv = vals(&x);
    let t = be.transpose01(&x).unwrap();
    assert_eq!(t.shape(), &[4, 3, 5]);
    let tv = vals(&t);
    for i in 0..3 {
        for j in 0..4 {
            for c in 0..5 {
                assert_eq!(
                    tv[(j * 3 + i) * 5 + c],
                    xv[(i * 4 + j) * 5 + c],
                    "transpose01 at ({i}, {j}, {c})"
                );
            }
        }
    }
    let x2 = rand_tensor(&[3, 7], 2);
    let t2 = vals(&be.transpose01(&x2).unwrap());
    let x2v = vals(&x2);
    for i in 0..3 {
        for j in 0..7 {
            assert_eq!(t2[j * 3 + i], x2v[i * 7 + j], "2-D transpose01 at ({i}, {j})");
        }
    }
    let s = be.slice0(&x, 1, 2).unwrap();
    assert_eq!(s.shape(), &[2, 4, 5]);
    assert_eq!(vals(&s), xv[20..60].to_vec());
    let c = be.concat0(&[&x, &s]).unwrap();
    assert_eq!(c.shape(), &[5, 4, 5]);
    assert_eq!(vals(&c), [xv.clone(), xv[20..60].to_vec()].concat());
    let dx = rand_tensor(&[3, 4, 5], 3);
    let old = vals(&dx);
    be.slice0_bwd(&s, &dx, 1).unwrap();
    let want: Vec<f64> =
        (0..60).map(|i| old[i] + if (20..60).contains(&i) { xv[i] } else { 0.0 }).collect();
    assert_eq!(vals(&dx), want, "slice0_bwd adds into rows 1..3");
}

// ---- normalisation ----------------------------------------------------------------------------

/// `y = w ⊙ (x · rstd)`, `rstd = 1 / sqrt(mean(x²) + eps)`: eps inside the root, weight last.
fn naive_rms_norm(x: &[f64], w: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>) {
    let h = w.len();
    let mut y = vec![0.0; x.len()];
    let mut rstd = vec![];
    for (row, yr) in x.chunks(h).zip(y.chunks_mut(h)) {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / h as f64;
        let r = 1.0 / (ms + eps).sqrt();
        for j in 0..h {
            yr[j] = w[j] * (row[j] * r);
        }
        rstd.push(r);
    }
    (y, rstd)
}

#[test]
fn rms_norm_matches_formula() {
    let be = be();
    // eps 0.5 makes "inside the root" visible; 1e-6 is the model's value.
    for (eps, h) in [(0.5, 13), (1e-6, 21), (1e-6, 1)] {
        let (x, w) = (rand_tensor(&[2, 7, h], 1), rand_tensor(&[h], 2));
        let (y, rstd) = be.rms_norm_fwd(&x, &w, eps).unwrap();
        assert_eq!(rstd.shape(), &[2, 7]);
        let (wy, wr) = naive_rms_norm(&vals(&x), &vals(&w), eps);
        assert_close(&format!("rms_norm y eps {eps}"), &vals(&y), &wy, F64_TOL);
        assert_close(&format!("rms_norm rstd eps {eps}"), &vals(&rstd), &wr, F64_TOL);
        let (x32, w32) = (be.cast(&x, DType::F32).unwrap(), be.cast(&w, DType::F32).unwrap());
        let (y32, _) = be.rms_norm_fwd(&x32, &w32, eps).unwrap();
        assert_close(
            "rms_norm F32",
            &vals(&y32),
            &naive_rms_norm(&vals(&x32), &vals(&w32), eps).0,
            F32_TOL,
        );

        let r = rand_tensor(&[2, 7, h], 3);
        let (sum, y2, rstd2) = be.add_rms_norm_fwd(&x, &r, &w, eps).unwrap();
        let s: Vec<f64> = vals(&x).iter().zip(vals(&r)).map(|(a, b)| a + b).collect();
        assert_eq!(vals(&sum), s, "add_rms_norm sum");
        let (wy, wr) = naive_rms_norm(&s, &vals(&w), eps);
        assert_close("add_rms_norm y", &vals(&y2), &wy, F64_TOL);
        assert_close("add_rms_norm rstd", &vals(&rstd2), &wr, F64_TOL);
    }
}

/// `[outer, n, inner]` of `shape` around `axis`.
fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

fn naive_softmax(x: &[f64], shape: &[usize], axis: usize) -> Vec<f64> {
    let (outer, n, inner) = around(shape, axis);
    let mut y = vec![0.0; x.len()];
    for o in 0..outer {
        for c in 0..inner {
            let at = |i: usize| (o * n + i) * inner + c;
            let z: f64 = (0..n).map(|i| x[at(i)].exp()).sum();
            for i in 0..n {
                y[at(i)] = x[at(i)].exp() / z;
            }
        }
    }
    y
}

#[test]
fn softmax_matches_formula() {
    let be = be();
    let shape = [2, 7, 5];
    let x = be.scale(&rand_tensor(&shape, 1), 4.0).unwrap();
    for axis in 0..3 {
        let y = be.softmax_fwd(&x, axis).unwrap();
        assert_close(
            &format!("softmax axis {axis}"),
            &vals(&y),
            &naive_softmax(&vals(&x), &shape, axis),
            F64_TOL,
        );
        let x32 = be.cast(&x, DType::F32).unwrap();
        let y32 = be.softmax_fwd(&x32, axis).unwrap();
        assert_close(
            &format!("softmax F32 axis {axis}"),
            &vals(&y32),
            &naive_softmax(&vals(&x32), &shape, axis),
            F32_TOL,
        );
    }
    // Max subtraction: large logits do not overflow.
    let big = be.scale(&x, 300.0).unwrap();
    let y = be.softmax_fwd(&be.cast(&big, DType::F32).unwrap(), 2).unwrap();
    assert!(vals(&y).iter().all(|v| v.is_finite()), "softmax of large logits overflowed");
}

fn naive_l2(x: &[f64], shape: &[usize], axis: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let (outer, n, inner) = around(shape, axis);
    let mut y = vec![0.0; x.len()];
    let mut norms = vec![0.0; outer * inner];
    for o in 0..outer {
        for c in 0..inner {
            let at = |i: usize| (o * n + i) * inner + c;
            let norm = (0..n).map(|i| x[at(i)] * x[at(i)]).sum::<f64>().sqrt();
            norms[o * inner + c] = norm;
            for i in 0..n {
                y[at(i)] = x[at(i)] / norm.max(eps);
            }
        }
    }
    (y, norms)
}

#[test]
fn l2_normalize_matches_formula() {
    let be = be();
    let shape = [3, 4, 5];
    let x = rand_tensor(&shape, 1);
    for axis in 0..3 {
        let (y, norm) = be.l2_normalize_fwd(&x, axis, 1e-12).unwrap();
        let mut ns = shape.to_vec();
        ns.remove(axis);
        assert_eq!(norm.shape(), &ns[..]);
        let (wy, wn) = naive_l2(&vals(&x), &shape, axis, 1e-12);
        assert_close(&format!("l2_normalize axis {axis}"), &vals(&y), &wy, F64_TOL);
        assert_close(&format!("l2_normalize norm axis {axis}"), &vals(&norm), &wn, F64_TOL);
    }
    // eps clamp: with eps between the smallest and the largest norm, the vectors of norm < eps
    // are divided by eps, the others by their norm.
    let (_, norms) = naive_l2(&vals(&x), &shape, 2, 1e-12);
    let eps = 0.5
        * (norms.iter().copied().fold(f64::INFINITY, f64::min)
            + norms.iter().copied().fold(0.0, f64::max));
    let (y, _) = be.l2_normalize_fwd(&x, 2, eps).unwrap();
    let (wy, wn) = naive_l2(&vals(&x), &shape, 2, eps);
    assert!(
        wn.iter().any(|&n| n < eps) && wn.iter().any(|&n| n > eps),
        "the clamp case should mix both regimes"
    );
    assert_close("l2_normalize eps clamp", &vals(&y), &wy, F64_TOL);
}

/// An all-zero vector normalises to zero (no NaN), and its gradient is `dy / eps`.
#[test]
fn l2_normalize_zero_vector() {
    let be = be();
    for dt in [DType::F64, DType::F32] {
        let mut xv = rand_vals(12, 1);
        xv[4..8].iter_mut().for_each(|v| *v = 0.0);
        let x = Tensor::from_f64(&xv, &[3, 4], dt).unwrap();
        let (y, norm) = be.l2_normalize_fwd(&x, 1, 1e-12).unwrap();
        let (yv, nv) = (vals(&y), vals(&norm));
        assert!(yv.iter().all(|v| v.is_finite()), "{dt}: NaN or inf in {yv:?}");
        assert_eq!(&yv[4..8], &[0.0; 4], "{dt}: the zero row must stay zero");
        assert_eq!(nv[1], 0.0);
        let dy = rand_tensor_dt(&[3, 4], dt, 2);
        let dx = Tensor::zeros(&[3, 4], dt);
        be.l2_normalize_bwd(&y, &norm, &dy, 1, 1e-12, &dx).unwrap();
        let dxv = vals(&dx);
        assert!(dxv.iter().all(|v| v.is_finite()), "{dt}: NaN in the gradient");
        let want: Vec<f64> = vals(&dy)[4..8].iter().map(|g| g / 1e-12).collect();
        assert_close(&format!("{dt}: gradient of the zero row"), &dxv[4..8], &want, F32_TOL);
    }
}

// ---- rope ---------------------------------------------------------------------------------------

/// rotate_half: j pairs with j + D/2; `angle = (t + offset) · theta^(−2j/D)`, here in f64.
fn naive_rope(x: &[f64], shape: [usize; 4], theta: f64, offset: usize) -> Vec<f64> {
    let [b, t, h, d] = shape;
    let half = d / 2;
    let mut y = vec![0.0; x.len()];
    for bi in 0..b {
        for ti in 0..t {
            for hi in 0..h {
                let base = ((bi * t + ti) * h + hi) * d;
                for j in 0..half {
                    let angle = (ti + offset) as f64 * theta.powf(-2.0 * j as f64 / d as f64);
                    let (c, s) = (angle.cos(), angle.sin());
                    let (x1, x2) = (x[base + j], x[base + j + half]);
                    y[base + j] = x1 * c - x2 * s;
                    y[base + j + half] = x2 * c + x1 * s;
                }
            }
        }
    }
    y
}

#[test]
fn rope_matches_formula() {
    let be = be();
    for (shape, theta, offset) in
        [([2, 7, 3, 56], 1e6, 0), ([1, 5, 2, 8], 1e4, 5), ([1, 3, 1, 2], 1e6, 13)]
    {
        let x = rand_tensor(&shape, 1);
        let y = be.rope_fwd(&x, theta, offset).unwrap();
        let want = naive_rope(&vals(&x), shape, theta, offset);
        // Angles in f32 (as HF): ~1e-7 relative error of an angle of up to ~20 rad.
        assert_close(
            &format!("rope {shape:?} theta {theta} offset {offset}"),
            &vals(&y),
            &want,
            2e-5,
        );
        // Offsets shift positions: rope(x[:, 1..], offset + 1) = rope(x, offset)[:, 1..].
        if shape[0] == 1 && shape[1] > 1 {
            let rest = be.slice0(&x.reshape(&shape[1..]).unwrap(), 1, shape[1] - 1).unwrap();
            let rest = rest.reshape(&[1, shape[1] - 1, shape[2], shape[3]]).unwrap();
            let shifted = be.rope_fwd(&rest, theta, offset + 1).unwrap();
            let tail = vals(&y)[shape[2] * shape[3]..].to_vec();
            assert_close("rope offset shift", &vals(&shifted), &tail, F64_TOL);
        }
    }
    // Position 0 is the identity.
    let x = rand_tensor(&[1, 1, 2, 8], 2);
    assert_eq!(vals(&be.rope_fwd(&x, 1e6, 0).unwrap()), vals(&x));
}

// ---- attention -----------------------------------------------------------------------------------

/// `softmax(scale · Q Kᵀ) V` with the causal mask of `Tq ≤ Tk` (query i sees keys
/// `0 ..= Tk − Tq + i`), query head h reading KV head `h / (Hq / Hkv)`; also the lse of the
/// visible scaled scores, `[B, Hq, Tq]`.
fn naive_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    qs: [usize; 4],
    ks: [usize; 4],
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let ([b, tq, hq, d], [_, tk, hkv, _]) = (qs, ks);
    let rep = hq / hkv;
    let mut o = vec![0.0; q.len()];
    let mut lse = vec![0.0; b * hq * tq];
    for bi in 0..b {
        for h in 0..hq {
            let g = h / rep;
            for i in 0..tq {
                let qi = |c: usize| q[((bi * tq + i) * hq + h) * d + c];
                let kv = |t: &[f64], j: usize, c: usize| t[((bi * tk + j) * hkv + g) * d + c];
                let visible = tk - tq + i + 1;
                let scores: Vec<f64> = (0..visible)
                    .map(|j| scale * (0..d).map(|c| qi(c) * kv(k, j, c)).sum::<f64>())
                    .collect();
                let z: f64 = scores.iter().map(|s| s.exp()).sum();
                lse[(bi * hq + h) * tq + i] = z.ln();
                for c in 0..d {
                    o[((bi * tq + i) * hq + h) * d + c] =
                        (0..visible).map(|j| scores[j].exp() / z * kv(v, j, c)).sum();
                }
            }
        }
    }
    (o, lse)
}

proptest! {
    #![proptest_config(proptest_config(24))]

    /// MHA and GQA, `Tq == Tk` and `Tq < Tk` (KV-cache decoding), head_dim 56 among the shapes.
    #[test]
    fn attention_matches_formula(b in 1..=2usize, tk in 1..=9usize, shorter in 0..=8usize, hkv in 1..=2usize, rep in 1..=3usize,
                                 d in select(vec![1usize, 5, 8, 56]), seed in any::<u64>()) {
        let tq = tk.saturating_sub(shorter).max(1);
        let (qs, ks) = ([b, tq, hkv * rep, d], [b, tk, hkv, d]);
        let scale = 1.0 / (d as f64).sqrt();
        for dt in [DType::F64, DType::F32] {
            let (q, k, v) = (rand_tensor_dt(&qs, dt, seed), rand_tensor_dt(&ks, dt, seed ^ 1), rand_tensor_dt(&ks, dt, seed ^ 2));
            let (o, lse) = be().attention_fwd(&q, &k, &v, scale).unwrap();
            prop_assert_eq!(lse.shape(), &[b, hkv * rep, tq][..]);
            let (wo, wl) = naive_attention(&vals(&q), &vals(&k), &vals(&v), qs, ks, scale);
            let tol = if dt == DType::F64 { F64_TOL } else { F32_TOL };
            assert_close(&format!("attention o {dt} q {qs:?} kv {ks:?}"), &vals(&o), &wo, tol);
            assert_close(&format!("attention lse {dt} q {qs:?} kv {ks:?}"), &vals(&lse), &wl, tol);
        }
    }
}

/// The mask matters: changing a key the last query cannot see leaves the output unchanged, and
/// a decoding step (Tq = 1) equals the last row of the full attention.
#[test]
fn attention_is_causal() {
    let be = be();
    let (q, k, v) = (
        rand_tensor(&[1, 7, 4, 8], 1),
        rand_tensor(&[1, 7, 2, 8], 2),
        rand_tensor(&[1, 7, 2, 8], 3),
    );
    let (full, _) = be.attention_fwd(&q, &k, &v, 0.3).unwrap();
    let q_last =
        be.slice0(&q.reshape(&[7, 4, 8]).unwrap(), 6, 1).unwrap().reshape(&[1, 1, 4, 8]).unwrap();
    let (step, _) = be.attention_fwd(&q_last, &k, &v, 0.3).unwrap();
    assert_close("decode step = last row", &vals(&step), &vals(&full)[6 * 32..], F64_TOL);
    let q3 =
        be.slice0(&q.reshape(&[7, 4, 8]).unwrap(), 0, 3).unwrap().reshape(&[1, 3, 4, 8]).unwrap();
    let (k3, v3) = (
        be.slice0(&k.reshape(&[7, 2, 8]).unwrap(), 0, 3).unwrap().reshape(&[1, 3, 2, 8]).unwrap(),
        be.slice0(&v.reshape(&[7, 2, 8]).unwrap(), 0, 3).unwrap().reshape(&[1, 3, 2, 8]).unwrap(),
    );
    let (prefix, _) = be.attention_fwd(&q3, &k3, &v3, 0.3).unwrap();
    assert_close(
        "the first 3 queries ignore later keys",
        &vals(&prefix),
        &vals(&full)[..3 * 32],
        F64_TOL,
    );
}

// ---- embedding ----------------------------------------------------------------------------------

#[test]
fn embedding_matches_formula() {
    let be = be();
    let ids = rand_ids(14, 6, 1);
    let table = rand_tensor(&[6, 5], 2);
    let tv = vals(&table);
    let want: Vec<f64> =
        ids.iter().flat_map(|&i| tv[i as usize * 5..(i as usize + 1) * 5].to_vec()).collect();
    let id_tensors = [
        ids_tensor(&ids, &[2, 7]),
        Tensor::from_vec(ids.iter().map(|&i| i as u16).collect::<Vec<_>>(), &[2, 7]).unwrap(),
        Tensor::from_vec(ids.iter().map(|&i| i as u32).collect::<Vec<_>>(), &[2, 7]).unwrap(),
    ];
    for it in &id_tensors {
        let out = be.embedding_fwd(it, &table).unwrap();
        assert_eq!(out.shape(), &[2, 7, 5]);
        assert_eq!(vals(&out), want, "embedding with {} ids", it.dtype());
    }
    let t16 = be.cast(&table, DType::BF16).unwrap();
    let out16 = be.embedding_fwd(&id_tensors[0], &t16).unwrap();
    assert_eq!(out16.dtype(), DType::BF16);
    let t16v = vals(&t16);
    let want16: Vec<f64> =
        ids.iter().flat_map(|&i| t16v[i as usize * 5..(i as usize + 1) * 5].to_vec()).collect();
    assert_eq!(vals(&out16), want16, "bf16 table rows are copied exactly");

    // Backward: dtable[v] += Σ_{ids[i] = v} dy[i].
    let dy = rand_tensor(&[2, 7, 5], 3);
    let dt = rand_tensor(&[6, 5], 4);
    let mut want = vals(&dt);
    be.embedding_bwd(&id_tensors[0], &dy, &dt).unwrap();
    let dyv = vals(&dy);
    for (t, &i) in ids.iter().enumerate() {
        for c in 0..5 {
            want[i as usize * 5 + c] += dyv[t * 5 + c];
        }
    }
    assert_close("embedding_bwd", &vals(&dt), &want, F64_TOL);
}

// ---- lm_head + cross entropy ----------------------------------------------------------------------

/// The loss sum, count, per-row lse (0 when ignored), dx and dw (for `g = dloss · scale`) from
/// the explicit full logits `x wᵀ`.
struct NaiveCe {
    loss: f64,
    count: usize,
    lse: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
}

fn naive_ce(x: &[f64], w: &[f64], targets: &[i32], h: usize, ignore: i64, g: f64) -> NaiveCe {
    let (n, v) = (targets.len(), w.len() / h);
    let mut out = NaiveCe {
        loss: 0.0,
        count: 0,
        lse: vec![0.0; n],
        dx: vec![0.0; n * h],
        dw: vec![0.0; v * h],
    };
    for i in 0..n {
        if targets[i] as i64 == ignore {
            continue;
        }
        let logits: Vec<f64> =
            (0..v).map(|j| (0..h).map(|c| x[i * h + c] * w[j * h + c]).sum()).collect();
        let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
        let t = targets[i] as usize;
        out.loss += lse - logits[t];
        out.count += 1;
        out.lse[i] = lse;
        for j in 0..v {
            let dl = g * ((logits[j] - lse).exp() - if j == t { 1.0 } else { 0.0 });
            for c in 0..h {
                out.dx[i * h + c] += dl * w[j * h + c];
                out.dw[j * h + c] += dl * x[i * h + c];
            }
        }
    }
    out
}

struct CeRun {
    loss: f64,
    count: usize,
    lse: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
}

fn run_ce(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    ignore: i64,
    chunk: usize,
    scale: f64,
) -> CeRun {
    let be = be();
    let spec = CrossEntropy { ignore_index: ignore, chunk_tokens: chunk };
    let out = be.lm_head_ce_fwd(x, w, targets, spec).unwrap();
    let cd = if x.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    assert_eq!(out.loss_sum.shape(), &[1]);
    assert_eq!(out.lse.dtype(), cd);
    let dloss = Tensor::from_f64(&[1.0], &[1], cd).unwrap();
    let (dx, dw) = (Tensor::zeros(x.shape(), cd), Tensor::zeros(w.shape(), cd));
    be.lm_head_ce_bwd(x, w, targets, &out.lse, &dloss, scale, spec, &dx, &dw).unwrap();
    CeRun {
        loss: out.loss_sum.scalar().unwrap(),
        count: out.count,
        lse: vals(&out.lse),
        dx: vals(&dx),
        dw: vals(&dw),
    }
}

fn targets_with_ignored(n: usize, v: usize, ignore: i64, seed: u64) -> Vec<i32> {
    let mut t = rand_ids(n, v, seed);
    for i in (1..n).step_by(3) {
        t[i] = ignore as i32;
    }
    t
}

#[test]
fn lm_head_ce_matches_formula() {
    let (n, h, v) = (7, 13, 11);
    for ignore in [-100i64, 3] {
        let tg = targets_with_ignored(n, v, ignore, 1);
        let targets = ids_tensor(&tg, &[n]);
        let (x, w) = (rand_tensor(&[n, h], 2), be().scale(&rand_tensor(&[v, h], 3), 2.0).unwrap());
        let want = naive_ce(&vals(&x), &vals(&w), &tg, h, ignore, 0.2);
        let got = run_ce(&x, &w, &targets, ignore, 3, 0.2);
        let what = format!("lm_head_ce ignore {ignore}");
        assert_eq!(got.count, want.count, "{what}: count");
        assert_eq!(got.count, tg.iter().filter(|&&t| t as i64 != ignore).count());
        assert_close(&format!("{what}: loss_sum"), &[got.loss], &[want.loss], F64_TOL);
        assert_close(&format!("{what}: lse"), &got.lse, &want.lse, F64_TOL);
        assert_close(&format!("{what}: dx"), &got.dx, &want.dx, F64_TOL);
        assert_close(&format!("{what}: dw"), &got.dw, &want.dw, F64_TOL);
        // The rows with an ignored target get no gradient at all.
        for i in (0..n).filter(|&i| tg[i] as i64 == ignore) {
            assert!(
                got.dx[i * h..(i + 1) * h].iter().all(|&d| d == 0.0),
                "{what}: ignored row {i} has a gradient"
            );
            assert_eq!(got.lse[i], 0.0, "{what}: ignored row {i} has an lse");
        }
        // F32, and BF16 inputs (computed in f32).
        for dt in [DType::F32, DType::BF16] {
            let (xd, wd) = (be().cast(&x, dt).unwrap(), be().cast(&w, dt).unwrap());
            let want = naive_ce(&vals(&xd), &vals(&wd), &tg, h, ignore, 0.2);
            let got = run_ce(&xd, &wd, &targets, ignore, 3, 0.2);
            assert_close(&format!("{what} {dt}: loss_sum"), &[got.loss], &[want.loss], F32_TOL);
            assert_close(&format!("{what} {dt}: lse"), &got.lse, &want.lse, F32_TOL);
            assert_close(&format!("{what} {dt}: dx"), &got.dx, &want.dx, F32_TOL);
            assert_close(&format!("{what} {dt}: dw"), &got.dw, &want.dw, F32_TOL);
        }
    }
}

/// Chunking changes nothing: chunk_tokens 3 and 1 equal one chunk of all N tokens (1e-12 in
/// F64, 1e-5 in F32, relative).
#[test]
fn lm_head_ce_chunked_equals_unchunked() {
    let (n, h, v) = (10, 21, 37);
    let tg = targets_with_ignored(n, v, -100, 1);
    let targets = ids_tensor(&tg, &[n]);
    for (dt, tol) in [(DType::F64, F64_TOL), (DType::F32, F32_TOL)] {
        let (x, w) = (rand_tensor_dt(&[n, h], dt, 2), rand_tensor_dt(&[v, h], dt, 3));
        let whole = run_ce(&x, &w, &targets, -100, 64, 0.125);
        let other = run_ce(&x, &w, &targets, -100, n, 0.125);
        assert_bits_eq_f64("chunk = N vs chunk > N", &whole.dx, &other.dx);
        for chunk in [3, 1] {
            let c = run_ce(&x, &w, &targets, -100, chunk, 0.125);
            let what = format!("{dt} chunk {chunk} vs unchunked");
            assert_eq!(c.count, whole.count);
            assert_close(&format!("{what}: loss"), &[c.loss], &[whole.loss], tol);
            assert_close(&format!("{what}: lse"), &c.lse, &whole.lse, tol);
            assert_close(&format!("{what}: dx"), &c.dx, &whole.dx, tol);
            assert_close(&format!("{what}: dw"), &c.dw, &whole.dw, tol);
        }
    }
}

fn assert_bits_eq_f64(what: &str, a: &[f64], b: &[f64]) {
    assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: not bit-identical");
}

/// Every target ignored: loss 0, count 0, and all-zero gradients, with no NaN anywhere.
#[test]
fn lm_head_ce_all_ignored() {
    for dt in [DType::F64, DType::F32] {
        for ignore in [-100i64, 3] {
            let targets = ids_tensor(&[ignore as i32; 5], &[5]);
            let (x, w) = (rand_tensor_dt(&[5, 4], dt, 1), rand_tensor_dt(&[6, 4], dt, 2));
            let got = run_ce(&x, &w, &targets, ignore, 2, 1.0);
            assert_eq!(got.count, 0);
            assert_eq!(got.loss.to_bits(), 0f64.to_bits(), "{dt}: loss_sum must be exactly +0");
            assert!(got.lse.iter().all(|&l| l == 0.0), "{dt}: lse {:?}", got.lse);
            assert!(got.dx.iter().all(|&d| d.to_bits() == 0), "{dt}: dx {:?}", got.dx);
            assert!(got.dw.iter().all(|&d| d.to_bits() == 0), "{dt}: dw {:?}", got.dw);
        }
    }
}

// ---- casts and norms -------------------------------------------------------------------------------

/// F32 → BF16 rounds to nearest, ties to even; F32 → I32 truncates toward zero.
#[test]
fn cast_rounding() {
    let be = be();
    let one_ulp = 2f32.powi(-7); // bf16 spacing in [1, 2)
    let cases: [(f32, u16); 8] = [
        (1.0, 0x3F80),
        (1.0 + one_ulp / 2.0, 0x3F80), // tie, 1.0 is even
        (1.0 + 1.5 * one_ulp, 0x3F82), // tie, rounds up to even
        (1.0 + one_ulp / 2.0 + 2f32.powi(-20), 0x3F81), // just above the tie
        (1.0 + one_ulp / 2.0 - 2f32.powi(-20), 0x3F80), // just below
        (-2.5, 0xC020),
        (3.140625, 0x4049),                             // exactly representable
        (f32::from_bits(0x3F80_8000 | 0x0001), 0x3F81), // tie + 1 ulp of f32
    ];
    let src =
        Tensor::from_vec(cases.iter().map(|c| c.0).collect::<Vec<_>>(), &[cases.len()]).unwrap();
    let out = be.cast(&src, DType::BF16).unwrap().to_vec::<bf16>().unwrap();
    for ((x, bits), got) in cases.iter().zip(&out) {
        assert_eq!(
            got.to_bits(),
            *bits,
            "bf16({x}) = {got} ({:#06x}), expected {bits:#06x}",
            got.to_bits()
        );
    }
    // BF16 → F32 is exact.
    let back =
        be.cast(&be.cast(&src, DType::BF16).unwrap(), DType::F32).unwrap().to_vec::<f32>().unwrap();
    for (b, got) in back.iter().zip(&out) {
        assert_eq!(*b, got.to_f32());
    }
    let f = Tensor::from_slice(&[2.7f32, -2.7, -0.5, 0.99, 7.0, -123456.9], &[6]).unwrap();
    assert_eq!(
        be.cast(&f, DType::I32).unwrap().to_vec::<i32>().unwrap(),
        vec![2, -2, 0, 0, 7, -123456]
    );
    let d = Tensor::from_slice(&[0.1f64, -1e-3], &[2]).unwrap();
    assert_eq!(be.cast(&d, DType::F32).unwrap().to_vec::<f32>().unwrap(), vec![0.1f32, -1e-3]);
    let i = Tensor::from_slice(&[3i32, -4], &[2]).unwrap();
    assert_eq!(be.cast(&i, DType::F32).unwrap().to_vec::<f32>().unwrap(), vec![3.0, -4.0]);
}

#[test]
fn global_norm_matches_formula() {
    let be = be();
    let ts = [
        rand_tensor_dt(&[70_000], DType::F32, 1),
        rand_tensor_dt(&[3, 5], DType::F32, 2),
        rand_tensor(&[7], 3),
    ];
    let want = ts.iter().flat_map(vals).map(|v| v * v).sum::<f64>().sqrt();
    let got = be.global_norm(&ts.iter().collect::<Vec<_>>()).unwrap();
    assert_close("global_norm", &[got], &[want], F64_TOL);
    assert_eq!(be.global_norm(&[]).unwrap(), 0.0);
}

//! Finite-difference gradient checks, in F64, of every backward op of the CPU backend.
//!
//! Method: a scalar `L = Σ_i r_i · out_i` with fixed random weights `r` (for multi-output ops a
//! weighted sum of every output; for lm_head_ce `L = loss_sum · scale`). The analytic gradient
//! is the backward op called with `dy = r` into ZERO-initialised buffers; the numeric one is a
//! central difference with h = 1e-6 on every input element. Tolerance (see `common::GRAD_TOL`):
//! `max |analytic − numeric| / max(1, |numeric|) ≤ 1e-6`.
//!
//! Shapes are drawn by proptest: odd token counts (7), hidden sizes that are not multiples of 8
//! (5, 13, 21), head_dim 56, batch 1–2, kept small (a few hundred elements) so the whole file
//! runs in seconds.
//!
//! The second half checks that every backward ACCUMULATES: two calls into one zeroed buffer
//! give 2× one call.

use crate::common::*;
use proptest::prelude::*;
use proptest::sample::select;
use steel_runtime::{Backend, CrossEntropy, Matmul, Tensor, Transpose};

fn tr(t: bool) -> Transpose {
    if t {
        Transpose::Yes
    } else {
        Transpose::No
    }
}

fn flip(t: Transpose) -> Transpose {
    match t {
        Transpose::No => Transpose::Yes,
        Transpose::Yes => Transpose::No,
    }
}

/// How the batch axes of a matmul are laid out.
#[derive(Clone, Copy, Debug)]
enum BatchMode {
    /// `a [m, k]`, `b [k, n]`.
    None,
    /// `a [B, m, k]`, `b [B, k, n]`.
    Both,
    /// `a [B, m, k]`, `b [k, n]` (a weight broadcast over the batch).
    BBroadcast,
    /// `a [1, m, k]`, `b [B, k, n]` (a batch of one broadcast).
    AOne,
}

/// The matmul gradient check for one transpose combination and batch layout, with an optional
/// bias: `da`, `db` through `matmul_into` with `accumulate()` (summing over the batch when the
/// operand was broadcast), `dbias` through `sum_rows_into`.
#[allow(clippy::too_many_arguments)]
fn check_matmul(
    ta: bool,
    tb: bool,
    mode: BatchMode,
    bsz: usize,
    m: usize,
    k: usize,
    n: usize,
    with_bias: bool,
    alpha: f32,
    seed: u64,
) {
    let be = be();
    let (ta, tb) = (tr(ta), tr(tb));
    let a_mat = if ta == Transpose::Yes { [k, m] } else { [m, k] };
    let b_mat = if tb == Transpose::Yes { [n, k] } else { [k, n] };
    let with_batch = |lead: &[usize], mat: [usize; 2]| -> Vec<usize> {
        lead.iter().copied().chain(mat).collect()
    };
    let (a_shape, b_shape, out_shape) = match mode {
        BatchMode::None => (a_mat.to_vec(), b_mat.to_vec(), vec![m, n]),
        BatchMode::Both => (with_batch(&[bsz], a_mat), with_batch(&[bsz], b_mat), vec![bsz, m, n]),
        BatchMode::BBroadcast => (with_batch(&[bsz], a_mat), b_mat.to_vec(), vec![bsz, m, n]),
        BatchMode::AOne => (with_batch(&[1], a_mat), with_batch(&[bsz], b_mat), vec![bsz, m, n]),
    };
    let spec = Matmul { trans_a: ta, trans_b: tb, alpha, beta: 0.0 };
    let mut inputs = vec![rand_tensor(&a_shape, seed), rand_tensor(&b_shape, seed ^ 1)];
    if with_bias {
        inputs.push(rand_tensor(&[n], seed ^ 2));
    }
    let r = rand_tensor(&out_shape, seed ^ 3);
    let loss = |xs: &[Tensor]| {
        weighted_sum(&be.matmul(&xs[0], &xs[1], xs.get(2), spec, None).unwrap(), &r)
    };
    let (a, b) = (&inputs[0], &inputs[1]);
    let (da, db, dbias) =
        (zeros_like(a), zeros_like(b), Tensor::zeros(&[n], steel_runtime::DType::F64));
    let grad = |ta, tb| Matmul { trans_a: ta, trans_b: tb, alpha, beta: 0.0 }.accumulate();
    // dA (as stored) = alpha · r · op(B)ᵀ, or its transpose op(B) · rᵀ.
    if ta == Transpose::No {
        be.matmul_into(&r, b, grad(Transpose::No, flip(tb)), &da).unwrap();
    } else {
        be.matmul_into(b, &r, grad(tb, Transpose::Yes), &da).unwrap();
    }
    // dB (as stored) = alpha · op(A)ᵀ · r, or rᵀ · op(A).
    if tb == Transpose::No {
        be.matmul_into(a, &r, grad(flip(ta), Transpose::No), &db).unwrap();
    } else {
        be.matmul_into(&r, a, grad(Transpose::Yes, ta), &db).unwrap();
    }
    let mut grads = vec![(0, &da), (1, &db)];
    if with_bias {
        be.sum_rows_into(&r, &dbias).unwrap();
        grads.push((2, &dbias));
    }
    check_grads(
        &format!(
            "matmul {ta:?}{tb:?} {mode:?} a{a_shape:?} b{b_shape:?} bias {with_bias} alpha {alpha}"
        ),
        &inputs,
        &grads,
        &loss,
    );
}

fn check_rms_norm(b: usize, t: usize, h: usize, seed: u64) {
    let be = be();
    let eps = 1e-6;
    let inputs = [rand_tensor(&[b, t, h], seed), rand_tensor(&[h], seed ^ 1)];
    let r = rand_tensor(&[b, t, h], seed ^ 2);
    let (_, rstd) = be.rms_norm_fwd(&inputs[0], &inputs[1], eps).unwrap();
    let (dx, dw) = (zeros_like(&inputs[0]), zeros_like(&inputs[1]));
    be.rms_norm_bwd(&inputs[0], &inputs[1], &rstd, &r, &dx, &dw).unwrap();
    let loss = |xs: &[Tensor]| weighted_sum(&be.rms_norm_fwd(&xs[0], &xs[1], eps).unwrap().0, &r);
    check_grads(&format!("rms_norm [{b}, {t}, {h}]"), &inputs, &[(0, &dx), (1, &dw)], &loss);
}

/// With `with_dsum`, `L = Σ r_y · y + Σ r_s · sum` and `dsum = r_s`; otherwise only `y` counts.
fn check_add_rms_norm(b: usize, t: usize, h: usize, with_dsum: bool, seed: u64) {
    let be = be();
    let eps = 1e-6;
    let inputs = [
        rand_tensor(&[b, t, h], seed),
        rand_tensor(&[b, t, h], seed ^ 1),
        rand_tensor(&[h], seed ^ 2),
    ];
    let ry = rand_tensor(&[b, t, h], seed ^ 3);
    let rs = rand_tensor(&[b, t, h], seed ^ 4);
    let (sum, _, rstd) = be.add_rms_norm_fwd(&inputs[0], &inputs[1], &inputs[2], eps).unwrap();
    let (dx, dr, dw) = (zeros_like(&inputs[0]), zeros_like(&inputs[1]), zeros_like(&inputs[2]));
    let dsum = with_dsum.then_some(&rs);
    be.add_rms_norm_bwd(&sum, &inputs[2], &rstd, &ry, dsum, &dx, &dr, &dw).unwrap();
    let loss = |xs: &[Tensor]| {
        let (s, y, _) = be.add_rms_norm_fwd(&xs[0], &xs[1], &xs[2], eps).unwrap();
        weighted_sum(&y, &ry) + if with_dsum { weighted_sum(&s, &rs) } else { 0.0 }
    };
    check_grads(
        &format!("add_rms_norm [{b}, {t}, {h}] dsum {with_dsum}"),
        &inputs,
        &[(0, &dx), (1, &dr), (2, &dw)],
        &loss,
    );
}

fn check_l2_normalize(shape: &[usize], axis: usize, eps: f64, seed: u64) {
    let be = be();
    let inputs = [rand_tensor(shape, seed)];
    let r = rand_tensor(shape, seed ^ 1);
    let (y, norm) = be.l2_normalize_fwd(&inputs[0], axis, eps).unwrap();
    let dx = zeros_like(&inputs[0]);
    be.l2_normalize_bwd(&y, &norm, &r, axis, eps, &dx).unwrap();
    let loss = |xs: &[Tensor]| weighted_sum(&be.l2_normalize_fwd(&xs[0], axis, eps).unwrap().0, &r);
    check_grads(
        &format!("l2_normalize {shape:?} axis {axis} eps {eps}"),
        &inputs,
        &[(0, &dx)],
        &loss,
    );
}

fn check_softmax(shape: &[usize], axis: usize, seed: u64) {
    let be = be();
    let inputs = [rand_tensor(shape, seed)];
    let r = rand_tensor(shape, seed ^ 1);
    let y = be.softmax_fwd(&inputs[0], axis).unwrap();
    let dx = zeros_like(&inputs[0]);
    be.softmax_bwd(&y, &r, axis, &dx).unwrap();
    let loss = |xs: &[Tensor]| weighted_sum(&be.softmax_fwd(&xs[0], axis).unwrap(), &r);
    check_grads(&format!("softmax {shape:?} axis {axis}"), &inputs, &[(0, &dx)], &loss);
}

fn check_rope(shape: [usize; 4], theta: f64, offset: usize, seed: u64) {
    let be = be();
    let inputs = [rand_tensor(&shape, seed)];
    let r = rand_tensor(&shape, seed ^ 1);
    let dx = zeros_like(&inputs[0]);
    be.rope_bwd(&r, theta, offset, &dx).unwrap();
    let loss = |xs: &[Tensor]| weighted_sum(&be.rope_fwd(&xs[0], theta, offset).unwrap(), &r);
    check_grads(
        &format!("rope {shape:?} theta {theta} offset {offset}"),
        &inputs,
        &[(0, &dx)],
        &loss,
    );
}

#[allow(clippy::too_many_arguments)]
fn check_attention(b: usize, tq: usize, tk: usize, hq: usize, hkv: usize, d: usize, seed: u64) {
    let be = be();
    let scale = 1.0 / (d as f64).sqrt();
    let inputs = [
        rand_tensor(&[b, tq, hq, d], seed),
        rand_tensor(&[b, tk, hkv, d], seed ^ 1),
        rand_tensor(&[b, tk, hkv, d], seed ^ 2),
    ];
    let r = rand_tensor(&[b, tq, hq, d], seed ^ 3);
    let (o, lse) = be.attention_fwd(&inputs[0], &inputs[1], &inputs[2], scale).unwrap();
    let (dq, dk, dv) = (zeros_like(&inputs[0]), zeros_like(&inputs[1]), zeros_like(&inputs[2]));
    be.attention_bwd(&inputs[0], &inputs[1], &inputs[2], &o, &lse, &r, scale, &dq, &dk, &dv)
        .unwrap();
    let loss = |xs: &[Tensor]| {
        weighted_sum(&be.attention_fwd(&xs[0], &xs[1], &xs[2], scale).unwrap().0, &r)
    };
    check_grads(
        &format!("attention q [{b}, {tq}, {hq}, {d}] kv [{b}, {tk}, {hkv}, {d}]"),
        &inputs,
        &[(0, &dq), (1, &dk), (2, &dv)],
        &loss,
    );
}

/// Random targets in `0..v` with about a third replaced by `ignore` (and the first one always
/// counted).
fn ce_targets(n: usize, v: usize, ignore: i64, seed: u64) -> Vec<i32> {
    let mut t = rand_ids(n, v, seed);
    let coin = rand_ids(n, 3, seed ^ 7);
    for i in 0..n {
        if coin[i] == 0 {
            t[i] = ignore as i32;
        }
    }
    // A counted first target (ignore may be a valid class such as 3).
    t[0] = if ignore == 0 { 1 } else { 0 };
    t
}

fn check_lm_head_ce(n: usize, h: usize, v: usize, ignore: i64, chunk: usize, seed: u64) {
    let be = be();
    let spec = CrossEntropy { ignore_index: ignore, chunk_tokens: chunk };
    let inputs = [rand_tensor(&[n, h], seed), rand_tensor(&[v, h], seed ^ 1)];
    let targets = ids_tensor(&ce_targets(n, v, ignore, seed ^ 2), &[n]);
    let out = be.lm_head_ce_fwd(&inputs[0], &inputs[1], &targets, spec).unwrap();
    assert!(out.count >= 1);
    let scale = 1.0 / out.count as f64;
    let dloss = Tensor::from_slice(&[1.0f64], &[1]).unwrap();
    let (dx, dw) = (zeros_like(&inputs[0]), zeros_like(&inputs[1]));
    be.lm_head_ce_bwd(&inputs[0], &inputs[1], &targets, &out.lse, &dloss, scale, spec, &dx, &dw)
        .unwrap();
    let loss = |xs: &[Tensor]| {
        be.lm_head_ce_fwd(&xs[0], &xs[1], &targets, spec).unwrap().loss_sum.scalar().unwrap()
            * scale
    };
    check_grads(
        &format!("lm_head_ce N {n} H {h} V {v} ignore {ignore} chunk {chunk}"),
        &inputs,
        &[(0, &dx), (1, &dw)],
        &loss,
    );
}

fn check_embedding(v: usize, h: usize, ids_shape: &[usize], seed: u64) {
    let be = be();
    let n: usize = ids_shape.iter().product();
    let ids = ids_tensor(&rand_ids(n, v, seed), ids_shape);
    let inputs = [rand_tensor(&[v, h], seed ^ 1)];
    let out_shape: Vec<usize> = ids_shape.iter().copied().chain([h]).collect();
    let r = rand_tensor(&out_shape, seed ^ 2);
    let dt = zeros_like(&inputs[0]);
    be.embedding_bwd(&ids, &r, &dt).unwrap();
    let loss = |xs: &[Tensor]| weighted_sum(&be.embedding_fwd(&ids, &xs[0]).unwrap(), &r);
    check_grads(&format!("embedding V {v} H {h} ids {ids_shape:?}"), &inputs, &[(0, &dt)], &loss);
}

proptest! {
    #![proptest_config(proptest_config(32))]

    /// Every transpose combination and batch layout, with and without bias.
    #[test]
    fn grad_matmul(bsz in 2..=3usize, m in 1..=5usize, k in 1..=5usize, n in 1..=5usize,
                   with_bias in any::<bool>(), alpha in select(vec![1.0f32, 0.75]), seed in any::<u64>()) {
        for mode in [BatchMode::None, BatchMode::Both, BatchMode::BBroadcast, BatchMode::AOne] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                check_matmul(ta, tb, mode, bsz, m, k, n, with_bias, alpha, seed);
            }
        }
    }

    #[test]
    fn grad_scale_by(shape in prop::collection::vec(1..=7usize, 1..=3), seed in any::<u64>()) {
        let be = be();
        let inputs = [rand_tensor(&shape, seed), rand_tensor(&[1], seed ^ 1)];
        let r = rand_tensor(&shape, seed ^ 2);
        let (dx, ds) = (zeros_like(&inputs[0]), zeros_like(&inputs[1]));
        be.scale_by_bwd(&inputs[0], &inputs[1], &r, &dx, &ds).unwrap();
        let loss = |xs: &[Tensor]| weighted_sum(&be.scale_by_fwd(&xs[0], &xs[1]).unwrap(), &r);
        check_grads(&format!("scale_by {shape:?}"), &inputs, &[(0, &dx), (1, &ds)], &loss);
    }

    #[test]
    fn grad_swiglu(shape in prop::collection::vec(1..=7usize, 1..=3), seed in any::<u64>()) {
        let be = be();
        let inputs = [rand_tensor(&shape, seed), rand_tensor(&shape, seed ^ 1)];
        let r = rand_tensor(&shape, seed ^ 2);
        let (da, db) = (zeros_like(&inputs[0]), zeros_like(&inputs[1]));
        be.swiglu_bwd(&inputs[0], &inputs[1], &r, &da, &db).unwrap();
        let loss = |xs: &[Tensor]| weighted_sum(&be.swiglu_fwd(&xs[0], &xs[1]).unwrap(), &r);
        check_grads(&format!("swiglu {shape:?}"), &inputs, &[(0, &da), (1, &db)], &loss);
    }

    /// `transpose01` is its own backward: `dx += transpose01(dy)`.
    #[test]
    fn grad_transpose01(a in 1..=7usize, b in 1..=7usize, c in 0..=5usize, seed in any::<u64>()) {
        let be = be();
        let shape = if c == 0 { vec![a, b] } else { vec![a, b, c] };
        let out_shape = if c == 0 { vec![b, a] } else { vec![b, a, c] };
        let inputs = [rand_tensor(&shape, seed)];
        let r = rand_tensor(&out_shape, seed ^ 1);
        let dx = zeros_like(&inputs[0]);
        be.add_assign(&dx, &be.transpose01(&r).unwrap()).unwrap();
        let loss = |xs: &[Tensor]| weighted_sum(&be.transpose01(&xs[0]).unwrap(), &r);
        check_grads(&format!("transpose01 {shape:?}"), &inputs, &[(0, &dx)], &loss);
    }

    #[test]
    fn grad_slice0(rows in 1..=7usize, inner in prop::collection::vec(1..=5usize, 0..=2), a in 0..=7usize, b in 1..=7usize, seed in any::<u64>()) {
        let be = be();
        let start = a % rows;
        let len = 1 + (b - 1) % (rows - start);
        let end = start + len;
        let shape: Vec<usize> = [rows].into_iter().chain(inner.iter().copied()).collect();
        let out_shape: Vec<usize> = [len].into_iter().chain(inner.iter().copied()).collect();
        let inputs = [rand_tensor(&shape, seed)];
        let r = rand_tensor(&out_shape, seed ^ 1);
        let dx = zeros_like(&inputs[0]);
        be.slice0_bwd(&r, &dx, start).unwrap();
        let loss = |xs: &[Tensor]| weighted_sum(&be.slice0(&xs[0], start, len).unwrap(), &r);
        check_grads(&format!("slice0 {shape:?} rows {start}..{end}"), &inputs, &[(0, &dx)], &loss);
    }

    /// The backward of `concat0` slices `dy` per part and adds it with `slice0_bwd`.
    #[test]
    fn grad_concat0(rows in prop::collection::vec(1..=4usize, 1..=3), inner in prop::collection::vec(1..=5usize, 0..=2), seed in any::<u64>()) {
        let be = be();
        let inputs: Vec<Tensor> = rows.iter().enumerate().map(|(i, &r)| {
            let s: Vec<usize> = [r].into_iter().chain(inner.iter().copied()).collect();
            rand_tensor(&s, seed ^ (i as u64 + 1))
        }).collect();
        let total: usize = rows.iter().sum();
        let out_shape: Vec<usize> = [total].into_iter().chain(inner.iter().copied()).collect();
        let r = rand_tensor(&out_shape, seed);
        let grads: Vec<Tensor> = inputs.iter().map(zeros_like).collect();
        let mut off = 0;
        for (g, &len) in grads.iter().zip(&rows) {
            be.slice0_bwd(&be.slice0(&r, off, len).unwrap(), g, 0).unwrap();
            off += len;
        }
        let loss = |xs: &[Tensor]| weighted_sum(&be.concat0(&xs.iter().collect::<Vec<_>>()).unwrap(), &r);
        let pairs: Vec<(usize, &Tensor)> = grads.iter().enumerate().collect();
        check_grads(&format!("concat0 rows {rows:?} inner {inner:?}"), &inputs, &pairs, &loss);
    }

    /// Ids repeat (more tokens than rows) and some rows are never used.
    #[test]
    fn grad_embedding(v in 2..=6usize, h in select(vec![1usize, 5, 13]), ids_shape in select(vec![vec![7], vec![2, 7], vec![3, 3]]), seed in any::<u64>()) {
        check_embedding(v, h, &ids_shape, seed);
    }

    #[test]
    fn grad_rms_norm(b in 1..=2usize, t in select(vec![1usize, 3, 7]), h in select(vec![1usize, 5, 13, 21]), seed in any::<u64>()) {
        check_rms_norm(b, t, h, seed);
    }

    #[test]
    fn grad_add_rms_norm(b in 1..=2usize, t in select(vec![1usize, 3, 7]), h in select(vec![1usize, 5, 13, 21]), seed in any::<u64>()) {
        check_add_rms_norm(b, t, h, true, seed);
        check_add_rms_norm(b, t, h, false, seed ^ 99);
    }

    /// Every axis of a 3-D tensor (last, middle, first), with eps 1e-12 (no clamping).
    #[test]
    fn grad_l2_normalize(shape in prop::collection::vec(1..=5usize, 3), seed in any::<u64>()) {
        for axis in 0..3 {
            check_l2_normalize(&shape, axis, 1e-12, seed ^ axis as u64);
        }
    }

    /// An eps between two of the vectors' norms, so some vectors are clamped (divisor eps) and
    /// some are not. The eps is a midpoint between distinct norms, far from every norm compared
    /// with the finite-difference step.
    #[test]
    fn grad_l2_normalize_clamped(cols in 2..=6usize, n in 1..=3usize, axis in 0..=1usize, seed in any::<u64>()) {
        let shape = if axis == 0 { vec![n, cols] } else { vec![cols, n] };
        let x = rand_tensor(&shape, seed);
        let (_, norm) = be().l2_normalize_fwd(&x, axis, 1e-12).unwrap();
        let mut norms = vals(&norm);
        norms.sort_by(f64::total_cmp);
        let mid = norms.len() / 2;
        prop_assume!(norms[mid] - norms[mid - 1] > 1e-4);
        check_l2_normalize(&shape, axis, 0.5 * (norms[mid] + norms[mid - 1]), seed);
    }

    /// The last axis and the token (middle) axis of `[B, T, S]`, and the first.
    #[test]
    fn grad_softmax(b in 1..=2usize, t in select(vec![1usize, 4, 7]), s in select(vec![1usize, 3, 5]), seed in any::<u64>()) {
        for axis in 0..3 {
            check_softmax(&[b, t, s], axis, seed ^ axis as u64);
        }
    }

    #[test]
    fn grad_rope(b in 1..=2usize, t in select(vec![1usize, 3, 7]), h in 1..=2usize, d in select(vec![2usize, 4, 6, 56]),
                 theta in select(vec![1e6f64, 1e4]), offset in 0..=9usize, seed in any::<u64>()) {
        // head_dim 56 with a single head and sequence to stay at a few hundred elements.
        let (b, h) = if d == 56 { (1, 1) } else { (b, h) };
        check_rope([b, t, h, d], theta, offset, seed);
    }

    /// MHA and GQA, `Tq == Tk` and `Tq < Tk`, head_dim 56 among the shapes.
    #[test]
    fn grad_attention(b in 1..=2usize, tk in select(vec![1usize, 4, 7]), shorter in 0..=3usize, hkv in 1..=2usize, rep in 1..=2usize,
                      d in select(vec![3usize, 5, 8, 56]), seed in any::<u64>()) {
        let (b, hkv) = if d == 56 { (1, 1) } else { (b, hkv) };
        let tq = tk.saturating_sub(shorter).max(1);
        check_attention(b, tq, tk, hkv * rep, hkv, d, seed);
    }

    /// Some targets ignored (ignore index -100, or 3 which is also a valid class), chunks
    /// smaller than N, `dloss = [1]` and `scale = 1 / count`.
    #[test]
    fn grad_lm_head_ce(n in 2..=7usize, h in select(vec![1usize, 5, 13]), v in select(vec![5usize, 7, 11]),
                       ignore in select(vec![-100i64, 3]), chunk in 1..=6usize, seed in any::<u64>()) {
        check_lm_head_ce(n, h, v, ignore, 1 + (chunk - 1) % (n - 1), seed);
    }
}

/// Fixed shapes that the brief requires every run to see, whatever proptest draws: 7 tokens,
/// head_dim 56, GQA with `Tq == Tk` and `Tq < Tk`, hidden 21, both ignore indices.
#[test]
fn grad_fixed_shapes() {
    check_attention(1, 7, 7, 2, 1, 56, 11);
    check_attention(2, 3, 7, 4, 2, 5, 12);
    check_attention(1, 1, 7, 2, 2, 8, 13);
    check_rope([1, 7, 1, 56], 1e6, 5, 14);
    check_rope([2, 7, 2, 6], 1e4, 3, 15);
    check_rms_norm(2, 7, 21, 16);
    check_add_rms_norm(1, 7, 13, true, 17);
    check_lm_head_ce(7, 5, 11, -100, 3, 18);
    check_lm_head_ce(7, 13, 7, 3, 2, 19);
    check_l2_normalize(&[3, 4, 5], 1, 1e-12, 20);
    check_softmax(&[2, 7, 3], 1, 21);
    check_embedding(4, 5, &[2, 7], 22);
    for mode in [BatchMode::None, BatchMode::Both, BatchMode::BBroadcast, BatchMode::AOne] {
        check_matmul(true, true, mode, 2, 3, 7, 5, true, 0.75, 23);
    }
}

// ---- accumulation: two backward calls into one buffer give 2× one call ----------------------

/// Runs `bwd` into fresh zeroed copies of `bufs` once and twice, and compares. `exact[i]` says
/// whether gradient i is one value added per element (so doubling is exact) or the sum of
/// several additions into the buffer (GQA heads into dk/dv, repeated ids, row blocks of dw,
/// token chunks of lm_head's dw, batch entries, and any GEMM with `beta = 1`, which the `gemm`
/// crate may add into the output in steps along k), where 2× holds to 1e-12 relative.
fn check_doubles(op: &str, bufs: &[&Tensor], exact: &[bool], bwd: &dyn Fn(&[Tensor])) {
    assert_eq!(bufs.len(), exact.len());
    let once: Vec<Tensor> = bufs.iter().map(|t| zeros_like(t)).collect();
    bwd(&once);
    let twice: Vec<Tensor> = bufs.iter().map(|t| zeros_like(t)).collect();
    bwd(&twice);
    bwd(&twice);
    for (i, (o, t)) in once.iter().zip(&twice).enumerate() {
        assert_doubled(&format!("{op}: gradient {i}"), o, t, exact[i]);
    }
}

#[test]
fn backward_accumulates_rms_norm() {
    let be = be();
    // 70 rows: dw sums two row blocks.
    let (x, w, dy) =
        (rand_tensor(&[2, 35, 13], 1), rand_tensor(&[13], 2), rand_tensor(&[2, 35, 13], 3));
    let (_, rstd) = be.rms_norm_fwd(&x, &w, 1e-6).unwrap();
    check_doubles("rms_norm_bwd", &[&x, &w], &[true, false], &|g| {
        be.rms_norm_bwd(&x, &w, &rstd, &dy, &g[0], &g[1]).unwrap()
    });
    let r = rand_tensor(&[2, 35, 13], 4);
    let (sum, _, rstd) = be.add_rms_norm_fwd(&x, &r, &w, 1e-6).unwrap();
    check_doubles("add_rms_norm_bwd", &[&x, &r, &w], &[true, true, false], &|g| {
        be.add_rms_norm_bwd(&sum, &w, &rstd, &dy, Some(&r), &g[0], &g[1], &g[2]).unwrap()
    });
}

#[test]
fn backward_accumulates_attention() {
    let be = be();
    let (q, k, v) = (
        rand_tensor(&[2, 5, 4, 8], 1),
        rand_tensor(&[2, 7, 2, 8], 2),
        rand_tensor(&[2, 7, 2, 8], 3),
    );
    let d_o = rand_tensor(&[2, 5, 4, 8], 4);
    let (o, lse) = be.attention_fwd(&q, &k, &v, 0.35).unwrap();
    check_doubles("attention_bwd", &[&q, &k, &v], &[false, false, false], &|g| {
        be.attention_bwd(&q, &k, &v, &o, &lse, &d_o, 0.35, &g[0], &g[1], &g[2]).unwrap()
    });
}

#[test]
fn backward_accumulates_lm_head_ce() {
    let be = be();
    let spec = CrossEntropy { ignore_index: -100, chunk_tokens: 3 };
    let (x, w) = (rand_tensor(&[7, 5], 1), rand_tensor(&[11, 5], 2));
    let targets = ids_tensor(&ce_targets(7, 11, -100, 3), &[7]);
    let out = be.lm_head_ce_fwd(&x, &w, &targets, spec).unwrap();
    let dloss = Tensor::from_slice(&[1.0f64], &[1]).unwrap();
    check_doubles("lm_head_ce_bwd", &[&x, &w], &[false, false], &|g| {
        be.lm_head_ce_bwd(&x, &w, &targets, &out.lse, &dloss, 0.25, spec, &g[0], &g[1]).unwrap()
    });
}

#[test]
fn backward_accumulates_embedding() {
    let be = be();
    let ids = ids_tensor(&rand_ids(14, 4, 1), &[2, 7]);
    let (table, dy) = (rand_tensor(&[4, 5], 2), rand_tensor(&[2, 7, 5], 3));
    check_doubles("embedding_bwd", &[&table], &[false], &|g| {
        be.embedding_bwd(&ids, &dy, &g[0]).unwrap()
    });
}

#[test]
fn backward_accumulates_matmul_into_and_sum_rows() {
    let be = be();
    let (a, dy) = (rand_tensor(&[2, 7, 5], 1), rand_tensor(&[2, 7, 3], 2));
    let w = rand_tensor(&[3, 5], 3);
    // dW = Σ_batch dyᵀ a (the weight of a Linear layer, broadcast over the batch).
    check_doubles("matmul_into (batch-summed)", &[&w], &[false], &|g| {
        be.matmul_into(&dy, &a, Matmul::TN.accumulate(), &g[0]).unwrap()
    });
    let (a2, dy2) = (a.reshape(&[14, 5]).unwrap(), dy.reshape(&[14, 3]).unwrap());
    check_doubles("matmul_into", &[&w], &[false], &|g| {
        be.matmul_into(&dy2, &a2, Matmul::TN.accumulate(), &g[0]).unwrap()
    });
    let bias = rand_tensor(&[3], 4);
    check_doubles("sum_rows_into", &[&bias], &[false], &|g| be.sum_rows_into(&dy, &g[0]).unwrap());
}

/// The elementwise-style backwards add one computed value per element, so doubling is exact.
#[test]
fn backward_accumulates_elementwise() {
    let be = be();
    let (x, y, dy) =
        (rand_tensor(&[3, 7, 6], 1), rand_tensor(&[3, 7, 6], 2), rand_tensor(&[3, 7, 6], 3));
    let s = rand_tensor(&[1], 4);
    check_doubles("scale_by_bwd", &[&x, &s], &[true, true], &|g| {
        be.scale_by_bwd(&x, &s, &dy, &g[0], &g[1]).unwrap()
    });
    check_doubles("swiglu_bwd", &[&x, &y], &[true, true], &|g| {
        be.swiglu_bwd(&x, &y, &dy, &g[0], &g[1]).unwrap()
    });
    check_doubles("rope_bwd", &[&x], &[true], &|g| {
        be.rope_bwd(
            &dy.reshape(&[3, 7, 1, 6]).unwrap(),
            1e4,
            2,
            &g[0].reshape(&[3, 7, 1, 6]).unwrap(),
        )
        .unwrap()
    });
    for axis in 0..3 {
        let p = be.softmax_fwd(&x, axis).unwrap();
        check_doubles("softmax_bwd", &[&x], &[true], &|g| {
            be.softmax_bwd(&p, &dy, axis, &g[0]).unwrap()
        });
        let (n, norm) = be.l2_normalize_fwd(&x, axis, 1e-12).unwrap();
        check_doubles("l2_normalize_bwd", &[&x], &[true], &|g| {
            be.l2_normalize_bwd(&n, &norm, &dy, axis, 1e-12, &g[0]).unwrap()
        });
    }
    let big = rand_tensor(&[5, 7, 6], 5);
    check_doubles("slice0_bwd", &[&big], &[true], &|g| be.slice0_bwd(&dy, &g[0], 1).unwrap());
}

// ---- the soft MoE and the experts (issue 15) ----------------------------------------------------

/// The routing's three outputs against one weighted sum `Σ r₁ ⊙ xn + r₂ ⊙ D + r₃ ⊙ C`, through
/// x, phi and scale. `small` scales token 0 and slot column 0 by 0.05, so with `eps = 0.5` their
/// norms fall below eps and the constant-divisor branch is checked too.
fn check_soft_moe_route(b: usize, t: usize, d: usize, s: usize, eps: f64, small: bool, seed: u64) {
    let be = be();
    let shrink = |t: Tensor, pick: &dyn Fn(usize) -> bool| {
        let v: Vec<f64> =
            vals(&t).iter().enumerate().map(|(i, &x)| if pick(i) { 0.05 * x } else { x }).collect();
        Tensor::from_vec(v, t.shape()).unwrap()
    };
    let mut x = rand_tensor(&[b, t, d], seed);
    let mut phi = rand_tensor(&[d, s], seed ^ 1);
    if small {
        x = shrink(x, &|i| i < d);
        phi = shrink(phi, &|i| i % s == 0);
    }
    let inputs = [x, phi, Tensor::from_vec(vec![1.7f64], &[1]).unwrap()];
    let (r1, r2, r3) = (
        rand_tensor(&[b, t, d], seed ^ 2),
        rand_tensor(&[b, t, s], seed ^ 3),
        rand_tensor(&[b, t, s], seed ^ 4),
    );
    let route = be.soft_moe_route_fwd(&inputs[0], &inputs[1], &inputs[2], eps).unwrap();
    let (dx, dphi, ds) = (zeros_like(&inputs[0]), zeros_like(&inputs[1]), zeros_like(&inputs[2]));
    be.soft_moe_route_bwd(&route, &inputs[1], &inputs[2], &r1, &r2, &r3, eps, &dx, &dphi, &ds)
        .unwrap();
    let loss = |xs: &[Tensor]| {
        let r = be.soft_moe_route_fwd(&xs[0], &xs[1], &xs[2], eps).unwrap();
        weighted_sum(&r.xn, &r1) + weighted_sum(&r.dispatch, &r2) + weighted_sum(&r.combine, &r3)
    };
    check_grads(
        &format!("soft_moe_route b{b} t{t} d{d} s{s} eps {eps} small {small}"),
        &inputs,
        &[(0, &dx), (1, &dphi), (2, &ds)],
        &loss,
    );
}

/// Both mixes with free (not softmax-normalised) weights.
fn check_soft_moe_mixes(b: usize, t: usize, d: usize, s: usize, seed: u64) {
    let be = be();
    let inputs = [rand_tensor(&[b, t, s], seed), rand_tensor(&[b, t, d], seed ^ 1)];
    let r = rand_tensor(&[b, s, d], seed ^ 2);
    let (dw, dx) = (zeros_like(&inputs[0]), zeros_like(&inputs[1]));
    be.soft_moe_dispatch_bwd(&inputs[0], &inputs[1], &r, &dw, &dx).unwrap();
    let loss = |xs: &[Tensor]| weighted_sum(&be.soft_moe_dispatch_fwd(&xs[0], &xs[1]).unwrap(), &r);
    check_grads(
        &format!("soft_moe_dispatch b{b} t{t} d{d} s{s}"),
        &inputs,
        &[(0, &dw), (1, &dx)],
        &loss,
    );

    let inputs = [rand_tensor(&[b, t, s], seed ^ 3), rand_tensor(&[b, s, d], seed ^ 4)];
    let r = rand_tensor(&[b, t, d], seed ^ 5);
    let (dw, dys) = (zeros_like(&inputs[0]), zeros_like(&inputs[1]));
    be.soft_moe_combine_bwd(&inputs[0], &inputs[1], &r, &dw, &dys).unwrap();
    let loss = |xs: &[Tensor]| weighted_sum(&be.soft_moe_combine_fwd(&xs[0], &xs[1]).unwrap(), &r);
    check_grads(
        &format!("soft_moe_combine b{b} t{t} d{d} s{s}"),
        &inputs,
        &[(0, &dw), (1, &dys)],
        &loss,
    );
}

/// The experts' inputs: x `[E, R, d]`, then gate_up, up (`[f, d]`), gate_down, down (`[d, f]`),
/// E tensors each, drawn large (±[0.2, 2]) so both SwiGLUs leave their near-linear range.
fn expert_inputs(e: usize, r: usize, d: usize, f: usize, seed: u64) -> Vec<Tensor> {
    let big = |shape: &[usize], s: u64| {
        let v: Vec<f64> = rand_vals(shape.iter().product(), s).iter().map(|x| 2.0 * x).collect();
        Tensor::from_vec(v, shape).unwrap()
    };
    let mut v = vec![big(&[e, r, d], seed)];
    for (k, shape) in [[f, d], [f, d], [d, f], [d, f]].iter().enumerate() {
        for i in 0..e {
            v.push(big(shape, seed ^ (100 * k as u64 + i as u64 + 1)));
        }
    }
    v
}

fn expert_weights(ts: &[Tensor], e: usize) -> [Vec<Tensor>; 4] {
    std::array::from_fn(|k| ts[1 + k * e..1 + (k + 1) * e].to_vec())
}

fn check_experts(e: usize, r: usize, d: usize, f: usize, seed: u64) {
    use steel_runtime::ExpertWeights;
    let be = be();
    let inputs = expert_inputs(e, r, d, f, seed);
    let ry = rand_tensor(&[e, r, d], seed ^ 7);
    let as_w = |w: &[Vec<Tensor>; 4]| -> (Vec<Tensor>, Vec<Tensor>, Vec<Tensor>, Vec<Tensor>) {
        (w[0].clone(), w[1].clone(), w[2].clone(), w[3].clone())
    };
    let (gu, up, gd, dn) = as_w(&expert_weights(&inputs, e));
    let w = ExpertWeights { gate_up: &gu, up: &up, gate_down: &gd, down: &dn };
    let saved = be.experts_fwd(&inputs[0], w).unwrap();
    let grads: Vec<Tensor> = inputs.iter().map(zeros_like).collect();
    let (dgu, dup, dgd, ddn) = as_w(&expert_weights(&grads, e));
    let dw = ExpertWeights { gate_up: &dgu, up: &dup, gate_down: &dgd, down: &ddn };
    be.experts_bwd(&inputs[0], w, &saved, &ry, &grads[0], dw).unwrap();
    let loss = |xs: &[Tensor]| {
        let (gu, up, gd, dn) = as_w(&expert_weights(xs, e));
        let w = ExpertWeights { gate_up: &gu, up: &up, gate_down: &gd, down: &dn };
        weighted_sum(&be.experts_fwd(&xs[0], w).unwrap().y, &ry)
    };
    let pairs: Vec<(usize, &Tensor)> = grads.iter().enumerate().collect();
    // Inputs at twice the usual scale through four weight layers: |L| reaches 1e4, beyond what
    // plain central differences resolve to GRAD_TOL.
    check_grads_large_loss(&format!("experts e{e} r{r} d{d} f{f}"), &inputs, &pairs, &loss);
}

proptest! {
    #![proptest_config(proptest_config(16))]

    #[test]
    fn grad_soft_moe_route(b in 1..=2usize, t in 1..=6usize, d in 1..=6usize, s in 1..=5usize,
                           small in any::<bool>(), seed in any::<u64>()) {
        check_soft_moe_route(b, t, d, s, if small { 0.5 } else { 1e-12 }, small, seed);
    }

    #[test]
    fn grad_soft_moe_mixes(b in 1..=2usize, t in 1..=6usize, d in 1..=6usize, s in 1..=5usize, seed in any::<u64>()) {
        check_soft_moe_mixes(b, t, d, s, seed);
    }

    #[test]
    fn grad_experts(e in 1..=3usize, r in 1..=3usize, d in 1..=5usize, f in 1..=4usize, seed in any::<u64>()) {
        check_experts(e, r, d, f, seed);
    }
}

/// The case plain central differences could not resolve (|L| ≈ 1e4; found by CI).
#[test]
fn grad_experts_at_a_large_loss() {
    check_experts(2, 2, 5, 1, 5197361724860542916);
    check_experts(3, 2, 5, 1, 5197361724860542916);
}

/// The soft-MoE shapes every run sees: 7 tokens, 6 slots (the reference model's n·p), an odd
/// width; the experts with more rows than one kernel row group (9 > 8).
#[test]
fn grad_soft_moe_fixed_shapes() {
    check_soft_moe_route(2, 7, 5, 6, 1e-12, false, 31);
    check_soft_moe_route(1, 7, 5, 6, 0.5, true, 32);
    check_soft_moe_mixes(2, 7, 5, 6, 33);
    check_experts(3, 9, 5, 2, 34);
}

#[test]
fn backward_accumulates_soft_moe_and_experts() {
    use steel_runtime::ExpertWeights;
    let be = be();
    let (b, t, d, s) = (2, 7, 5, 6);
    let (x, phi, sc) = (rand_tensor(&[b, t, d], 1), rand_tensor(&[d, s], 2), rand_tensor(&[1], 3));
    let route = be.soft_moe_route_fwd(&x, &phi, &sc, 1e-12).unwrap();
    let (gxn, gd, gc) =
        (rand_tensor(&[b, t, d], 4), rand_tensor(&[b, t, s], 5), rand_tensor(&[b, t, s], 6));
    check_doubles("soft_moe_route_bwd", &[&x, &phi, &sc], &[true, true, true], &|g| {
        be.soft_moe_route_bwd(&route, &phi, &sc, &gxn, &gd, &gc, 1e-12, &g[0], &g[1], &g[2])
            .unwrap()
    });
    let (w, ys, dy) =
        (rand_tensor(&[b, t, s], 7), rand_tensor(&[b, s, d], 8), rand_tensor(&[b, t, d], 9));
    check_doubles("soft_moe_dispatch_bwd", &[&w, &x], &[true, true], &|g| {
        be.soft_moe_dispatch_bwd(&w, &x, &ys, &g[0], &g[1]).unwrap()
    });
    check_doubles("soft_moe_combine_bwd", &[&w, &ys], &[true, true], &|g| {
        be.soft_moe_combine_bwd(&w, &ys, &dy, &g[0], &g[1]).unwrap()
    });
    let (e, r, f) = (2, 3, 4);
    let inputs = expert_inputs(e, r, d, f, 10);
    let [gu, up, gdn, dn] = expert_weights(&inputs, e);
    let wts = ExpertWeights { gate_up: &gu, up: &up, gate_down: &gdn, down: &dn };
    let saved = be.experts_fwd(&inputs[0], wts).unwrap();
    let dy = rand_tensor(&[e, r, d], 11);
    let refs: Vec<&Tensor> = inputs.iter().collect();
    check_doubles("experts_bwd", &refs, &vec![true; refs.len()], &|g| {
        let [dgu, dup, dgd, ddn] = expert_weights(g, e);
        let dw = ExpertWeights { gate_up: &dgu, up: &dup, gate_down: &dgd, down: &ddn };
        be.experts_bwd(&inputs[0], wts, &saved, &dy, &g[0], dw).unwrap()
    });
}

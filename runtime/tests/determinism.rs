//! The CPU backend is bit-identical at any thread count: each op runs in a dedicated rayon pool
//! of 1, 2 and 3 threads and the results are compared byte for byte (`to_bytes()`), in F32.
//! Shapes are large enough to be split across tasks (GEMMs above the single-tile threshold,
//! reductions over more than one block of 64 rows or 16384 elements).

use crate::common::*;
use steel_runtime::{Backend, CrossEntropy, DType, Matmul, Tensor};

const THREADS: [usize; 3] = [1, 2, 3];

fn t32(shape: &[usize], seed: u64) -> Tensor {
    rand_tensor_dt(shape, DType::F32, seed)
}

/// Runs `f` with 1, 2 and 3 threads and asserts every output tensor is bit-identical.
fn assert_deterministic(what: &str, f: &(dyn Fn() -> Vec<Tensor> + Sync)) {
    let runs: Vec<Vec<Tensor>> = THREADS.iter().map(|&n| with_threads(n, f)).collect();
    for (n, run) in THREADS.iter().zip(&runs).skip(1) {
        assert_eq!(run.len(), runs[0].len());
        for (i, (a, b)) in runs[0].iter().zip(run).enumerate() {
            assert_bits_eq(&format!("{what}: output {i}, 1 vs {n} threads"), a, b);
        }
    }
}

#[test]
fn matmul_is_deterministic() {
    let be = be();
    let (a, b, bias) = (t32(&[300, 70], 1), t32(&[1100, 70], 2), t32(&[1100], 3));
    assert_deterministic("matmul 300×1100×70", &|| {
        vec![be.matmul(&a, &b, Some(&bias), Matmul::NT, None).unwrap()]
    });
    let (ab, bb) = (t32(&[3, 130, 90], 4), t32(&[90, 1030], 5));
    assert_deterministic("batched matmul", &|| {
        vec![be.matmul(&ab, &bb, None, Matmul::NN, None).unwrap()]
    });
    // Weight gradient with accumulation, plain and summed over a batch.
    let (x, dy) = (t32(&[3, 130, 90], 6), t32(&[3, 130, 1030], 7));
    assert_deterministic("matmul_into", &|| {
        let dw = t32(&[90, 1030], 8);
        be.matmul_into(
            &x.reshape(&[390, 90]).unwrap(),
            &dy.reshape(&[390, 1030]).unwrap(),
            Matmul::TN.accumulate(),
            &dw,
        )
        .unwrap();
        let dws = t32(&[90, 1030], 9);
        be.matmul_into(&x, &dy, Matmul::TN.accumulate(), &dws).unwrap();
        vec![dw, dws]
    });
}

#[test]
fn attention_is_deterministic() {
    let be = be();
    let (q, k, v) = (t32(&[2, 33, 4, 56], 1), t32(&[2, 33, 2, 56], 2), t32(&[2, 33, 2, 56], 3));
    let d_o = t32(&[2, 33, 4, 56], 4);
    let scale = 1.0 / 56f64.sqrt();
    assert_deterministic("attention fwd+bwd", &|| {
        let (o, lse) = be.attention_fwd(&q, &k, &v, scale).unwrap();
        let (dq, dk, dv) = (
            Tensor::zeros(q.shape(), DType::F32),
            Tensor::zeros(k.shape(), DType::F32),
            Tensor::zeros(v.shape(), DType::F32),
        );
        be.attention_bwd(&q, &k, &v, &o, &lse, &d_o, scale, &dq, &dk, &dv).unwrap();
        vec![o, lse, dq, dk, dv]
    });
}

#[test]
fn rms_norm_is_deterministic() {
    let be = be();
    // 300 rows: the dw reduction spans five blocks of 64 rows.
    let (x, r, w, dy) =
        (t32(&[3, 100, 77], 1), t32(&[3, 100, 77], 2), t32(&[77], 3), t32(&[3, 100, 77], 4));
    assert_deterministic("rms_norm fwd+bwd", &|| {
        let (y, rstd) = be.rms_norm_fwd(&x, &w, 1e-6).unwrap();
        let (dx, dw) = (Tensor::zeros(x.shape(), DType::F32), Tensor::zeros(&[77], DType::F32));
        be.rms_norm_bwd(&x, &w, &rstd, &dy, &dx, &dw).unwrap();
        let (sum, y2, rstd2) = be.add_rms_norm_fwd(&x, &r, &w, 1e-6).unwrap();
        let (dx2, dr2, dw2) = (
            Tensor::zeros(x.shape(), DType::F32),
            Tensor::zeros(x.shape(), DType::F32),
            Tensor::zeros(&[77], DType::F32),
        );
        be.add_rms_norm_bwd(&sum, &w, &rstd2, &dy, Some(&r), &dx2, &dr2, &dw2).unwrap();
        vec![y, rstd, dx, dw, y2, dx2, dr2, dw2]
    });
}

#[test]
fn embedding_bwd_is_deterministic() {
    let be = be();
    // 2000 tokens over 50 rows: every row gathers ~40 tokens.
    let ids = ids_tensor(&rand_ids(2000, 50, 1), &[4, 500]);
    let dy = t32(&[4, 500, 33], 2);
    assert_deterministic("embedding_bwd", &|| {
        let dt = Tensor::zeros(&[50, 33], DType::F32);
        be.embedding_bwd(&ids, &dy, &dt).unwrap();
        vec![dt]
    });
}

#[test]
fn lm_head_ce_is_deterministic() {
    let be = be();
    let (x, w) = (t32(&[70, 40], 1), t32(&[3000, 40], 2));
    let mut tg = rand_ids(70, 3000, 3);
    tg[5] = -100;
    tg[44] = -100;
    let targets = ids_tensor(&tg, &[70]);
    let spec = CrossEntropy { ignore_index: -100, chunk_tokens: 16 };
    assert_deterministic("lm_head_ce fwd+bwd", &|| {
        let out = be.lm_head_ce_fwd(&x, &w, &targets, spec).unwrap();
        let dloss = Tensor::from_slice(&[1.0f32], &[1]).unwrap();
        let (dx, dw) = (Tensor::zeros(x.shape(), DType::F32), Tensor::zeros(w.shape(), DType::F32));
        be.lm_head_ce_bwd(
            &x,
            &w,
            &targets,
            &out.lse,
            &dloss,
            1.0 / out.count as f64,
            spec,
            &dx,
            &dw,
        )
        .unwrap();
        vec![out.loss_sum, out.lse, dx, dw]
    });
}

/// The one-pass training variant equals the forward followed by the backward, bit for bit (the
/// same expressions in the same order), accumulating into non-zero gradients.
#[test]
fn lm_head_ce_fwd_bwd_equals_fwd_then_bwd() {
    let be = be();
    let (x, w) = (t32(&[70, 40], 4), t32(&[3000, 40], 5));
    let mut tg = rand_ids(70, 3000, 6);
    tg[3] = -100;
    tg[69] = -100;
    let targets = ids_tensor(&tg, &[70]);
    let spec = CrossEntropy { ignore_index: -100, chunk_tokens: 16 };
    let scale = 1.0 / 97.0;
    let (dx1, dw1) = (t32(&[70, 40], 7), t32(&[3000, 40], 8));
    let (dx2, dw2) = (dx1.deep_copy().unwrap(), dw1.deep_copy().unwrap());
    let out = be.lm_head_ce_fwd(&x, &w, &targets, spec).unwrap();
    let dloss = Tensor::from_slice(&[1.0f32], &[1]).unwrap();
    be.lm_head_ce_bwd(&x, &w, &targets, &out.lse, &dloss, scale, spec, &dx1, &dw1).unwrap();
    let fused = be.lm_head_ce_fwd_bwd(&x, &w, &targets, scale, spec, None, &dx2, &dw2).unwrap();
    assert_eq!(out.count, 68);
    assert_eq!(fused.count, 68);
    assert_eq!(out.loss_sum.to_vec::<f32>().unwrap(), fused.loss_sum.to_vec::<f32>().unwrap());
    assert_eq!(out.lse.to_vec::<f32>().unwrap(), fused.lse.to_vec::<f32>().unwrap());
    assert_eq!(dx1.to_vec::<f32>().unwrap(), dx2.to_vec::<f32>().unwrap());
    assert_eq!(dw1.to_vec::<f32>().unwrap(), dw2.to_vec::<f32>().unwrap());
    assert!(dx2.to_vec::<f32>().unwrap().iter().any(|v| *v != 0.0));
}

#[test]
fn reductions_are_deterministic() {
    let be = be();
    let big = [t32(&[100_003], 1), t32(&[70_001], 2), t32(&[3, 5], 3)];
    assert_deterministic("global_norm", &|| {
        let n = be.global_norm(&big.iter().collect::<Vec<_>>()).unwrap();
        vec![Tensor::from_slice(&[n], &[1]).unwrap()]
    });
    let x = t32(&[7, 300, 37], 4);
    assert_deterministic("sum_rows_into", &|| {
        let out = Tensor::zeros(&[37], DType::F32);
        be.sum_rows_into(&x, &out).unwrap();
        vec![out]
    });
    let (xs, dy, s) = (t32(&[70_001], 5), t32(&[70_001], 6), t32(&[1], 7));
    assert_deterministic("scale_by_bwd", &|| {
        let (dx, ds) = (Tensor::zeros(&[70_001], DType::F32), Tensor::zeros(&[1], DType::F32));
        be.scale_by_bwd(&xs, &s, &dy, &dx, &ds).unwrap();
        vec![dx, ds]
    });
    let (sx, sdy) = (t32(&[4, 300, 50], 8), t32(&[4, 300, 50], 9));
    for axis in [1, 2] {
        assert_deterministic(&format!("softmax axis {axis}"), &|| {
            let y = be.softmax_fwd(&sx, axis).unwrap();
            let dx = Tensor::zeros(sx.shape(), DType::F32);
            be.softmax_bwd(&y, &sdy, axis, &dx).unwrap();
            vec![y, dx]
        });
    }
}

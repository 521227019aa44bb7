//! Invalid arguments return `Err` (never panic), with messages that name what is wrong.

use crate::common::*;
use steel_runtime::{AdamW, AdamWParam, Backend, CrossEntropy, DType, Error, Matmul, Tensor};

fn expect_err<T: std::fmt::Debug>(what: &str, r: steel_runtime::Result<T>) -> Error {
    match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e,
    }
}

fn expect_shape_err<T: std::fmt::Debug>(what: &str, r: steel_runtime::Result<T>) {
    let e = expect_err(what, r);
    assert!(matches!(e, Error::Shape { .. }), "{what}: expected a shape error, got {e}");
}

#[test]
fn mismatched_shapes_are_errors() {
    let be = be();
    let (a, b) = (rand_tensor(&[3, 4], 1), rand_tensor(&[4, 3], 2));
    expect_shape_err("add", be.add(&a, &b));
    expect_shape_err("add_assign", be.add_assign(&a, &rand_tensor(&[5], 3)));
    expect_shape_err("swiglu", be.swiglu_fwd(&a, &b));
    expect_shape_err("matmul inner", be.matmul(&a, &a, None, Matmul::NN, None));
    expect_shape_err(
        "matmul batch",
        be.matmul(&rand_tensor(&[2, 3, 4], 1), &rand_tensor(&[3, 4, 5], 2), None, Matmul::NN, None),
    );
    expect_shape_err(
        "matmul bias",
        be.matmul(&a, &b, Some(&rand_tensor(&[4], 3)), Matmul::NN, None),
    );
    expect_shape_err("matmul 1-D", be.matmul(&rand_tensor(&[4], 3), &b, None, Matmul::NN, None));
    expect_shape_err(
        "matmul_into out",
        be.matmul_into(&a, &b, Matmul::NN, &Tensor::zeros(&[3, 4], DType::F64)),
    );
    expect_shape_err("sum_rows_into", be.sum_rows_into(&a, &Tensor::zeros(&[3], DType::F64)));
    expect_shape_err("rms_norm weight", be.rms_norm_fwd(&a, &rand_tensor(&[3], 4), 1e-6));
    let (_, rstd) = be.rms_norm_fwd(&a, &rand_tensor(&[4], 4), 1e-6).unwrap();
    expect_shape_err(
        "rms_norm_bwd dx",
        be.rms_norm_bwd(
            &a,
            &rand_tensor(&[4], 4),
            &rstd,
            &a,
            &Tensor::zeros(&[4, 3], DType::F64),
            &Tensor::zeros(&[4], DType::F64),
        ),
    );
    expect_shape_err("add_rms_norm", be.add_rms_norm_fwd(&a, &b, &rand_tensor(&[4], 4), 1e-6));
    expect_shape_err("softmax axis", be.softmax_fwd(&a, 2));
    expect_shape_err("l2_normalize axis", be.l2_normalize_fwd(&a, 5, 1e-12));
    expect_shape_err("rope odd head_dim", be.rope_fwd(&rand_tensor(&[1, 2, 1, 5], 1), 1e6, 0));
    expect_shape_err("rope 3-D", be.rope_fwd(&rand_tensor(&[2, 1, 4], 1), 1e6, 0));
    let (q, kv) = (rand_tensor(&[1, 3, 3, 4], 1), rand_tensor(&[1, 3, 2, 4], 2));
    expect_shape_err("attention heads", be.attention_fwd(&q, &kv, &kv, 0.5));
    let (q, kv) = (rand_tensor(&[1, 4, 2, 4], 1), rand_tensor(&[1, 3, 2, 4], 2));
    expect_shape_err("attention Tq > Tk", be.attention_fwd(&q, &kv, &kv, 0.5));
    let (q, kv) = (rand_tensor(&[1, 3, 2, 4], 1), rand_tensor(&[1, 3, 2, 5], 2));
    expect_shape_err("attention head_dim", be.attention_fwd(&q, &kv, &kv, 0.5));
    expect_shape_err("slice0 range", be.slice0(&a, 2, 2));
    expect_shape_err("slice0_bwd range", be.slice0_bwd(&a, &Tensor::zeros(&[4, 4], DType::F64), 2));
    expect_shape_err("concat0", be.concat0(&[&a, &b]));
    expect_err("concat0 of nothing", be.concat0(&[]));
    expect_shape_err("transpose01 4-D", be.transpose01(&rand_tensor(&[1, 2, 3, 4], 1)));
    expect_shape_err("scale_by scalar", be.scale_by_fwd(&a, &rand_tensor(&[2], 1)));
    expect_shape_err("from_vec", Tensor::from_vec(vec![1.0f32; 5], &[2, 3]));
    expect_shape_err("reshape", a.reshape(&[5, 2]));
    let (x, w) = (rand_tensor(&[3, 4], 1), rand_tensor(&[6, 5], 2));
    let ce = CrossEntropy { ignore_index: -100, chunk_tokens: 2 };
    expect_shape_err(
        "lm_head_ce hidden",
        be.lm_head_ce_fwd(&x, &w, &ids_tensor(&[0, 1, 2], &[3]), ce),
    );
    let w = rand_tensor(&[6, 4], 2);
    expect_shape_err(
        "lm_head_ce targets",
        be.lm_head_ce_fwd(&x, &w, &ids_tensor(&[0, 1], &[2]), ce),
    );
    let bad_chunk = CrossEntropy { chunk_tokens: 0, ..ce };
    expect_err(
        "lm_head_ce chunk 0",
        be.lm_head_ce_fwd(&x, &w, &ids_tensor(&[0, 1, 2], &[3]), bad_chunk),
    );
}

#[test]
fn dtype_and_aliasing_errors() {
    let be = be();
    let a = rand_tensor(&[3, 4], 1);
    let a32 = rand_tensor_dt(&[3, 4], DType::F32, 1);
    let e = expect_err("add F64 + F32", be.add(&a, &a32));
    assert!(matches!(e, Error::DType { .. }), "{e}");
    // BF16 values compute in f32 and round once (the dtype policy); mixing dtypes is an error.
    let a16 = be.cast(&a, DType::BF16).unwrap();
    assert_eq!(be.add(&a16, &a16).unwrap().dtype(), DType::BF16);
    let e = expect_err("add BF16 + F32", be.add(&a16, &a32));
    assert!(matches!(e, Error::DType { .. }), "{e}");
    expect_err("add_assign into itself", be.add_assign(&a, &a));
    expect_err(
        "matmul F64 × F32",
        be.matmul(&a, &rand_tensor_dt(&[4, 2], DType::F32, 2), None, Matmul::NN, None),
    );
    let dy = rand_tensor(&[3, 4], 3);
    expect_err("swiglu_bwd da = db", be.swiglu_bwd(&a, &a, &dy, &dy, &dy));
}

#[test]
fn embedding_id_out_of_range_names_the_id() {
    let be = be();
    let table = rand_tensor(&[6, 4], 1);
    for bad in [9, 6, -1] {
        let ids = ids_tensor(&[0, 5, bad, 2], &[4]);
        let msg = expect_err("embedding_fwd", be.embedding_fwd(&ids, &table)).to_string();
        assert!(msg.contains(&format!("id {bad}")), "the message should name the id {bad}: {msg}");
        let dy = rand_tensor(&[4, 4], 2);
        let dt = Tensor::zeros(&[6, 4], DType::F64);
        let msg = expect_err("embedding_bwd", be.embedding_bwd(&ids, &dy, &dt)).to_string();
        assert!(msg.contains(&format!("id {bad}")), "the message should name the id {bad}: {msg}");
        assert!(vals(&dt).iter().all(|&v| v == 0.0), "a failed embedding_bwd wrote into dtable");
    }
    let float_ids = rand_tensor(&[4], 3);
    expect_err("float ids", be.embedding_fwd(&float_ids, &table));
}

#[test]
fn target_out_of_range_names_the_target() {
    let be = be();
    let (x, w) = (rand_tensor(&[4, 3], 1), rand_tensor(&[6, 3], 2));
    for (bad, ignore) in [(6, -100i64), (17, 3), (-5, -100), (-100, 3)] {
        let spec = CrossEntropy { ignore_index: ignore, chunk_tokens: 2 };
        let targets = ids_tensor(&[0, 1, bad, 2], &[4]);
        let msg =
            expect_err("lm_head_ce_fwd", be.lm_head_ce_fwd(&x, &w, &targets, spec)).to_string();
        assert!(
            msg.contains(&format!("target {bad}")),
            "the message should name the target {bad}: {msg}"
        );
        let (lse, dloss) =
            (Tensor::zeros(&[4], DType::F64), Tensor::from_slice(&[1.0f64], &[1]).unwrap());
        let (dx, dw) = (Tensor::zeros(&[4, 3], DType::F64), Tensor::zeros(&[6, 3], DType::F64));
        let msg = expect_err(
            "lm_head_ce_bwd",
            be.lm_head_ce_bwd(&x, &w, &targets, &lse, &dloss, 1.0, spec, &dx, &dw),
        )
        .to_string();
        assert!(
            msg.contains(&format!("target {bad}")),
            "the message should name the target {bad}: {msg}"
        );
    }
}

/// A backward with one badly shaped gradient buffer fails before writing any other buffer.
#[test]
fn failed_backward_writes_nothing() {
    let be = be();
    let (x, dy) = (rand_tensor(&[3, 4], 1), rand_tensor(&[3, 4], 2));
    let s = rand_tensor(&[1], 3);
    let (dx, ds) = (Tensor::zeros(&[3, 4], DType::F64), Tensor::zeros(&[2], DType::F64));
    expect_shape_err("scale_by_bwd ds", be.scale_by_bwd(&x, &s, &dy, &dx, &ds));
    assert!(vals(&dx).iter().all(|&v| v == 0.0), "scale_by_bwd wrote dx before failing on ds");
    let (q, kv) = (rand_tensor(&[1, 3, 2, 4], 1), rand_tensor(&[1, 3, 1, 4], 2));
    let (o, lse) = be.attention_fwd(&q, &kv, &kv, 0.5).unwrap();
    let (dq, dk, dv) = (
        Tensor::zeros(&[1, 3, 2, 4], DType::F64),
        Tensor::zeros(&[1, 3, 1, 4], DType::F64),
        Tensor::zeros(&[1, 3, 2, 4], DType::F64),
    );
    expect_shape_err(
        "attention_bwd dv",
        be.attention_bwd(&q, &kv, &kv, &o, &lse, &q, 0.5, &dq, &dk, &dv),
    );
    assert!(vals(&dq).iter().chain(&vals(&dk)).all(|&v| v == 0.0));
}

#[test]
fn adamw_rejects_bad_arguments() {
    let be = be();
    let p = |seed| rand_tensor_dt(&[5], DType::F32, seed);
    let hp = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, step: 0, grad_scale: 1.0 };
    let param =
        AdamWParam { param: p(1), grad: p(2), m: p(3), v: p(4), weight_decay: 0.0, copy: None };
    expect_err("adamw step 0", be.adamw_step(std::slice::from_ref(&param), hp));
    let hp = AdamW { step: 1, ..hp };
    let bad = AdamWParam { grad: rand_tensor_dt(&[4], DType::F32, 2), ..param.clone() };
    expect_shape_err("adamw grad shape", be.adamw_step(&[bad], hp));
    let bad = AdamWParam { copy: Some(Tensor::zeros(&[5], DType::F32)), ..param.clone() };
    expect_err("adamw copy dtype", be.adamw_step(&[bad], hp));
    let before = vals(&param.param);
    let aliased = AdamWParam { m: param.param.clone(), ..param.clone() };
    expect_err("adamw m aliases param", be.adamw_step(&[aliased], hp));
    assert_eq!(vals(&param.param), before, "a rejected step changed the parameter");
}

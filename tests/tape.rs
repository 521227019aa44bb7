//! Gradient checks through the tape (f64, central differences) and tape mechanics.

use crate::common::{cpu, tiny_cfg};
use steel_autograd::fixtures::{random_tensor, SplitMix, TinyBlock};
use steel_autograd::{check_gradients, GradCheck, LossOptions, ParamStore, Tape};
use steel_runtime::{CrossEntropy, DType, Matmul, Tensor};

/// Tolerance of every check here: |analytic − numeric| / max(1, |numeric|) ≤ 1e-6 with h = 1e-6.
const CHECK: GradCheck = GradCheck { step: 1e-6, tolerance: 1e-6, seed: 7 };

#[test]
fn transformer_block_gradients_match_finite_differences() {
    let be = cpu();
    let cfg = tiny_cfg();
    let mut store = ParamStore::new(be.clone());
    let block = TinyBlock::new(&mut store, "blk", cfg, DType::F64, 11).unwrap();
    let mut inputs =
        vec![random_tensor(be.as_ref(), &[2, 5, cfg.hidden], DType::F64, 1.0, 3).unwrap()];
    inputs.extend(block.param_ids().iter().map(|&id| store.get(id).value.clone()));
    let report = check_gradients(
        be,
        &inputs,
        |tape, v| TinyBlock::forward_with(cfg, tape, &v[1..], v[0]),
        CHECK,
    )
    .unwrap();
    assert!(report.elements_checked > 700, "checked {}", report.elements_checked);
}

/// A soft-MoE-shaped composition: normalised tokens and slot columns, a learned scale, the
/// dispatch softmax over tokens and the combine softmax over slots, batched transposed
/// products, and per-expert slices concatenated back.
#[test]
fn soft_moe_shaped_composition_gradients_match() {
    let be = cpu();
    let (b, t, d, slots) = (2, 7, 5, 3);
    let inputs = vec![
        random_tensor(be.as_ref(), &[b, t, d], DType::F64, 1.0, 1).unwrap(),
        random_tensor(be.as_ref(), &[d, slots], DType::F64, 1.0, 2).unwrap(),
        Tensor::from_vec(vec![1.3f64], &[1]).unwrap(),
        random_tensor(be.as_ref(), &[4, d], DType::F64, 2.0, 4).unwrap(),
        random_tensor(be.as_ref(), &[4, d], DType::F64, 2.0, 5).unwrap(),
    ];
    check_gradients(
        be,
        &inputs,
        |tape, v| {
            let xn = tape.l2_normalize(v[0], 2, 1e-12)?;
            let phin = tape.l2_normalize(v[1], 0, 1e-12)?;
            let phis = tape.scale_by(phin, v[2])?;
            let logits = tape.matmul(xn, phis, None, Matmul::NN)?; // [b, t, slots], broadcast b
            let dispatch = tape.softmax(logits, 1)?;
            let combine = tape.softmax(logits, 2)?;
            let slot_in = tape.matmul(dispatch, xn, None, Matmul::TN)?; // [b, slots, d]
            let per_slot = tape.transpose01(slot_in)?; // [slots, b, d]
            let mut outs = Vec::new();
            for s in 0..slots {
                let xs = tape.slice0(per_slot, s, 1)?;
                let xs = tape.reshape(xs, &[b, d])?;
                let w = if s == 1 { v[4] } else { v[3] };
                let g = tape.linear(xs, w, None)?;
                let u = tape.linear(xs, v[4], None)?;
                let y = tape.swiglu(g, u)?;
                let y = tape.matmul(y, v[3], None, Matmul::NN)?; // [b, d]
                outs.push(tape.reshape(y, &[1, b, d])?);
            }
            let ys = tape.concat0(&outs)?; // [slots, b, d]
            let ys = tape.transpose01(ys)?; // [b, slots, d]
            tape.matmul(combine, ys, None, Matmul::NN)
        },
        CHECK,
    )
    .unwrap();
}

#[test]
fn embedding_loss_and_repeated_inputs_gradients_match() {
    let be = cpu();
    let ids = Tensor::from_vec(vec![3i32, 1, 3, 0, 2, 3], &[2, 3]).unwrap();
    let targets = Tensor::from_vec(vec![1i32, -100, 0, 2, 3, 1], &[6]).unwrap();
    let inputs = vec![
        random_tensor(be.as_ref(), &[4, 6], DType::F64, 1.0, 9).unwrap(),
        random_tensor(be.as_ref(), &[5, 6], DType::F64, 1.0, 10).unwrap(),
        random_tensor(be.as_ref(), &[6], DType::F64, 0.5, 12).unwrap(),
    ];
    let opts = LossOptions {
        ce: CrossEntropy { ignore_index: -100, chunk_tokens: 4 },
        normalizer: None,
        count: None,
    };
    check_gradients(
        be,
        &inputs,
        |tape, v| {
            let e = tape.embedding(&ids, v[0])?;
            let twice = tape.add(e, e)?; // the same variable twice in one op
            let n = tape.rms_norm(twice, v[2], 1e-6)?;
            let n = tape.scale(n, 0.7)?;
            let flat = tape.reshape(n, &[6, 6])?;
            let (loss, count) = tape.lm_head_ce(flat, v[1], &targets, opts)?;
            assert_eq!(count, 5);
            Ok(loss)
        },
        CHECK,
    )
    .unwrap();
}

/// The one-pass (training) path of `lm_head_ce`, taken when the normalizer is given, followed by
/// more ops so that its upstream gradient is not 1.
#[test]
fn fused_loss_with_a_normalizer_and_a_scaled_upstream_gradient_matches() {
    let be = cpu();
    let targets = Tensor::from_vec(vec![1i32, -100, 0, 4, 3, 1, 2], &[7]).unwrap();
    let inputs = vec![
        random_tensor(be.as_ref(), &[7, 6], DType::F64, 1.0, 21).unwrap(),
        random_tensor(be.as_ref(), &[5, 6], DType::F64, 1.0, 22).unwrap(),
    ];
    let opts = LossOptions {
        ce: CrossEntropy { ignore_index: -100, chunk_tokens: 3 },
        normalizer: Some(11.0),
        count: None,
    };
    check_gradients(
        be,
        &inputs,
        |tape, v| {
            let (loss, count) = tape.lm_head_ce(v[0], v[1], &targets, opts)?;
            assert_eq!(count, 6);
            let l2 = tape.scale(loss, -2.5)?;
            tape.add(l2, loss)
        },
        CHECK,
    )
    .unwrap();
}

#[test]
fn backward_frees_consumed_values_and_no_grad_records_nothing() {
    let be = cpu();
    let x = random_tensor(be.as_ref(), &[3, 4], DType::F32, 1.0, 1).unwrap();
    let w = random_tensor(be.as_ref(), &[5, 4], DType::F32, 1.0, 2).unwrap();

    let mut tape = Tape::new(be.clone());
    let (xv, wv) = (tape.leaf(x.clone(), false), tape.leaf(w.clone(), true));
    let h = tape.linear(xv, wv, None).unwrap();
    let y = tape.swiglu(h, h).unwrap();
    let y = tape.reshape(y, &[15]).unwrap();
    let s = tape.reshape(y, &[15, 1]).unwrap();
    let ones = tape.leaf(Tensor::from_vec(vec![1f32; 15], &[1, 15]).unwrap(), false);
    let l = tape.matmul(ones, s, None, Matmul::NN).unwrap();
    let expected = tape.value(l).unwrap().scalar().unwrap();
    assert_eq!(tape.num_records(), 6);
    tape.backward(l).unwrap();
    assert_eq!(tape.num_records(), 0);
    assert!(tape.value(h).is_err(), "an intermediate value must be freed after backward");
    let gw = tape.grad(wv).unwrap().expect("w gets a gradient");
    assert!(gw.to_vec::<f32>().unwrap().iter().all(|g| g.is_finite() && *g != 0.0));
    assert!(tape.grad(xv).unwrap().is_none(), "x does not require a gradient");

    let mut infer = Tape::no_grad(be);
    let (xv, wv) = (infer.leaf(x, false), infer.leaf(w, true));
    let h = infer.linear(xv, wv, None).unwrap();
    let y = infer.swiglu(h, h).unwrap();
    let s = infer.reshape(y, &[15, 1]).unwrap();
    let ones = infer.leaf(Tensor::from_vec(vec![1f32; 15], &[1, 15]).unwrap(), false);
    let l = infer.matmul(ones, s, None, Matmul::NN).unwrap();
    assert_eq!(infer.num_records(), 0);
    assert_eq!(infer.value(l).unwrap().scalar().unwrap(), expected);
    assert!(infer.backward(l).is_err());
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    let be = cpu();
    let cfg = tiny_cfg();
    let mut store = ParamStore::new(be.clone());
    let block = TinyBlock::new(&mut store, "blk", cfg, DType::F32, 5).unwrap();
    let mut tape = Tape::new(be.clone());
    let x = tape
        .leaf(random_tensor(be.as_ref(), &[2, 7, cfg.hidden], DType::F32, 1.0, 8).unwrap(), false);
    let y = block.forward(&mut tape, &store, x).unwrap();
    let y = tape.reshape(y, &[14, cfg.hidden]).unwrap();
    let mut rng = SplitMix::new(4);
    let head = tape.leaf(
        Tensor::from_f64(&rng.vec(9 * cfg.hidden, 0.5), &[9, cfg.hidden], DType::F32).unwrap(),
        false,
    );
    let targets = Tensor::from_vec((0..14i32).map(|i| i * 5 % 9).collect(), &[14]).unwrap();
    let opts = LossOptions {
        ce: CrossEntropy { ignore_index: -100, chunk_tokens: 5 },
        normalizer: None,
        count: None,
    };
    let (loss, _) = tape.lm_head_ce(y, head, &targets, opts).unwrap();
    tape.backward(loss).unwrap();
    for (_, p) in store.iter() {
        let g = p
            .grad()
            .unwrap_or_else(|| panic!("{} has no gradient", p.name))
            .to_vec::<f32>()
            .unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{}: non-finite gradient", p.name);
        assert!(g.iter().any(|&v| v != 0.0), "{}: all-zero gradient", p.name);
    }
}

/// Products where either operand is broadcast over the other's batch, every transpose combination.
#[test]
fn broadcast_matmul_gradients_match() {
    use steel_runtime::Transpose::{No, Yes};
    let be = cpu();
    for ta in [No, Yes] {
        for tb in [No, Yes] {
            let spec = Matmul { trans_a: ta, trans_b: tb, alpha: 0.7, beta: 0.0 };
            let (m, k, n, batch) = (3, 4, 5, 2);
            let a_shape = if ta == No { [m, k] } else { [k, m] };
            let b_shape = if tb == No { [k, n] } else { [n, k] };
            // A broadcast over B's batch, then B broadcast over A's batch.
            for a_batched in [false, true] {
                let a =
                    if a_batched { vec![batch, a_shape[0], a_shape[1]] } else { a_shape.to_vec() };
                let b =
                    if a_batched { b_shape.to_vec() } else { vec![batch, b_shape[0], b_shape[1]] };
                let inputs = vec![
                    random_tensor(be.as_ref(), &a, DType::F64, 1.0, 31).unwrap(),
                    random_tensor(be.as_ref(), &b, DType::F64, 1.0, 32).unwrap(),
                ];
                check_gradients(
                    be.clone(),
                    &inputs,
                    |tape, v| tape.matmul(v[0], v[1], None, spec),
                    CHECK,
                )
                .unwrap_or_else(|e| panic!("{ta:?}/{tb:?}, a batched {a_batched}: {e}"));
            }
        }
    }
}

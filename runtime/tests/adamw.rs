//! `adamw_step` against a direct scalar implementation of PyTorch's AdamW in f32.
//!
//! Tolerance: EXACT equality of every f32 value (parameters, both moments) after each step: the
//! reference below performs the same f32 operations in the same order as the documented
//! formula, so any difference is a change of semantics. The bf16 copy must equal
//! `bf16::from_f32(p)` bit for bit.

use crate::common::*;
use steel_runtime::{bf16, AdamW, AdamWParam, Backend, DType, Tensor};

/// One AdamW step of PyTorch (`torch.optim.AdamW`, foreach=False), in f32:
/// `p *= 1 − lr·wd; m += (1 − β₁)(g − m); v = β₂ v + (1 − β₂) g²;`
/// `denom = sqrt(v) / sqrt(1 − β₂ᵗ) + eps; p −= (lr / (1 − β₁ᵗ)) · m / denom`, `g = grad · scale`.
#[allow(clippy::too_many_arguments)]
fn reference_step(p: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32], wd: f32, hp: &AdamW) {
    let t = hp.step as i32;
    let bias1 = 1.0 - hp.beta1.powi(t);
    let bias2_sqrt = (1.0 - hp.beta2.powi(t)).sqrt();
    let step_size = hp.lr / bias1;
    for i in 0..p.len() {
        let g = grad[i] * hp.grad_scale;
        p[i] *= 1.0 - hp.lr * wd;
        m[i] += (1.0 - hp.beta1) * (g - m[i]);
        v[i] = v[i] * hp.beta2 + (1.0 - hp.beta2) * g * g;
        let denom = v[i].sqrt() / bias2_sqrt + hp.eps;
        p[i] -= step_size * (m[i] / denom);
    }
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

fn assert_f32_eq(what: &str, got: &[f32], want: &[f32]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{what}: element {i} is {g:e}, the reference gives {w:e} (exact equality expected)"
        );
    }
}

#[test]
fn adamw_matches_pytorch_formula() {
    let be = be();
    // Two parameters: weight decay 0.05 with a bf16 copy (37 elements: not a multiple of 8),
    // and no weight decay without a copy.
    let specs = [(37usize, 0.05f32, true), (13, 0.0, false)];
    let params: Vec<AdamWParam> = specs
        .iter()
        .enumerate()
        .map(|(i, &(n, wd, copy))| AdamWParam {
            param: rand_tensor_dt(&[n], DType::F32, 10 + i as u64),
            grad: Tensor::zeros(&[n], DType::F32),
            m: Tensor::zeros(&[n], DType::F32),
            v: Tensor::zeros(&[n], DType::F32),
            weight_decay: wd,
            copy: copy.then(|| Tensor::zeros(&[n], DType::BF16)),
        })
        .collect();
    let mut reference: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = params
        .iter()
        .map(|p| (f32s(&p.param), vec![0.0; p.param.numel()], vec![0.0; p.param.numel()]))
        .collect();
    for step in 1..=3u64 {
        let hp = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, step, grad_scale: 0.5 };
        for (i, p) in params.iter().enumerate() {
            // A fresh random gradient every step.
            let g = rand_tensor_dt(p.grad.shape(), DType::F32, 100 * step + i as u64);
            be.fill(&p.grad, 0.0).unwrap();
            be.add_assign(&p.grad, &g).unwrap();
        }
        be.adamw_step(&params, hp).unwrap();
        for (i, (p, (rp, rm, rv))) in params.iter().zip(reference.iter_mut()).enumerate() {
            reference_step(rp, rm, rv, &f32s(&p.grad), p.weight_decay, &hp);
            let what = format!("step {step}, param {i}");
            assert_f32_eq(&format!("{what}: param"), &f32s(&p.param), rp);
            assert_f32_eq(&format!("{what}: m"), &f32s(&p.m), rm);
            assert_f32_eq(&format!("{what}: v"), &f32s(&p.v), rv);
            if let Some(c) = &p.copy {
                let want: Vec<u16> = rp.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
                let got: Vec<u16> =
                    c.to_vec::<bf16>().unwrap().iter().map(|b| b.to_bits()).collect();
                assert_eq!(got, want, "{what}: the bf16 copy is not bf16::from_f32(param)");
            }
        }
    }
    // The update moved the parameters (the comparison is not between two untouched buffers).
    assert!(f32s(&params[0].param) != reference_initial(37, 10), "adamw did not change param 0");
}

fn reference_initial(n: usize, seed: u64) -> Vec<f32> {
    f32s(&rand_tensor_dt(&[n], DType::F32, seed))
}

/// With a zero gradient, one step only decays: `p · (1 − lr · wd)` (Adam's term is 0/eps = 0).
#[test]
fn adamw_zero_grad_only_decays() {
    let be = be();
    let p0 = rand_tensor_dt(&[9], DType::F32, 1);
    let param = AdamWParam {
        param: p0.deep_copy().unwrap(),
        grad: Tensor::zeros(&[9], DType::F32),
        m: Tensor::zeros(&[9], DType::F32),
        v: Tensor::zeros(&[9], DType::F32),
        weight_decay: 0.1,
        copy: None,
    };
    let hp = AdamW { lr: 0.5, beta1: 0.9, beta2: 0.95, eps: 1e-8, step: 1, grad_scale: 1.0 };
    be.adamw_step(std::slice::from_ref(&param), hp).unwrap();
    let want: Vec<f32> = f32s(&p0).iter().map(|x| x * (1.0 - 0.5 * 0.1)).collect();
    assert_f32_eq("decay only", &f32s(&param.param), &want);
}

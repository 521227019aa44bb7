//! The LR schedule at the spec's check points and the optimizer's clipping and NaN skipping.

use crate::common::cpu;
use steel_autograd::{ParamOptions, ParamStore};
use steel_runtime::Tensor;
use steel_train::{AdamWConfig, LrSchedule, Optimizer};

#[test]
fn lr_schedule_matches_the_reference_check_points() {
    // spec §5.3, in the reference's micro-iteration units: warmup 8000, decay 8,640,000.
    let s = LrSchedule::new(3e-4, 0.0, 8000, 8_640_000).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-12);
    assert_eq!(s.lr(0), 0.0);
    assert!(close(s.lr(1), 3.75e-8), "{}", s.lr(1));
    assert!(close(s.lr(8000), 3e-4));
    assert!(close(s.lr(4_324_000), 1.5e-4), "{}", s.lr(4_324_000));
    assert!(s.lr(8_640_000).abs() < 1e-18);
    assert_eq!(s.lr(9_000_000), 0.0);
    let mut prev = f64::INFINITY;
    for step in (8000..=8_640_000).step_by(100_000) {
        assert!(s.lr(step) <= prev, "the cosine decays monotonically");
        prev = s.lr(step);
    }
    assert!(LrSchedule::new(1e-3, 1e-2, 10, 100).is_err());
    assert!(LrSchedule::new(1e-3, 0.0, 100, 10).is_err());
}

fn store_with_grads(grads: [f32; 4]) -> ParamStore {
    let mut store = ParamStore::new(cpu());
    let a = store
        .insert(
            "a",
            Tensor::from_vec(vec![0.5f32, -1.0], &[2]).unwrap(),
            ParamOptions { weight_decay: true },
        )
        .unwrap();
    let b = store
        .insert(
            "b",
            Tensor::from_vec(vec![2.0f32, 0.25], &[2]).unwrap(),
            ParamOptions { weight_decay: false },
        )
        .unwrap();
    *store.grad_buffer(a).unwrap().cpu_write().unwrap() =
        steel_runtime::CpuStorage::F32(grads[..2].to_vec());
    *store.grad_buffer(b).unwrap().cpu_write().unwrap() =
        steel_runtime::CpuStorage::F32(grads[2..].to_vec());
    store
}

#[test]
fn optimizer_clips_to_the_global_norm_and_applies_decay_per_parameter() {
    let grads = [3.0f32, 0.0, 0.0, 4.0]; // global norm 5
    let store = store_with_grads(grads);
    let mut opt = Optimizer::new(&store, AdamWConfig::default()).unwrap();
    let r = opt.step(&store, 1e-2).unwrap();
    assert!(!r.skipped);
    assert!((r.grad_norm - 5.0).abs() < 1e-12);
    assert!((r.clip_scale - 0.2).abs() < 1e-12);
    // First AdamW step by hand: m = 0.1 g', v = 0.05 g'²; m̂ = g', v̂ = g'², so the update is
    // lr · g' / (|g'| + eps) after the decoupled decay p·(1 − lr·wd).
    let init = [0.5f32, -1.0, 2.0, 0.25];
    let decay = [0.05f32, 0.05, 0.0, 0.0];
    let got: Vec<f32> = store.iter().flat_map(|(_, p)| p.value.to_vec::<f32>().unwrap()).collect();
    for i in 0..4 {
        let g = grads[i] * 0.2;
        let p = init[i] * (1.0 - 1e-2 * decay[i]);
        let m = 0.1 * g;
        let v = 0.05 * g * g;
        let denom = v.sqrt() / 0.05f32.sqrt() + 1e-8;
        let want = p - (1e-2 / 0.1) * (m / denom);
        assert!((got[i] - want).abs() <= 1e-6, "param {i}: {} vs {want}", got[i]);
    }
    assert_eq!(opt.step, 1);
    assert_eq!(store.grad_norm().unwrap(), 0.0, "gradients are zeroed after the step");
}

#[test]
fn a_non_finite_step_is_skipped_and_reported() {
    let store = store_with_grads([1.0, f32::NAN, 0.5, 0.5]);
    let before: Vec<f32> =
        store.iter().flat_map(|(_, p)| p.value.to_vec::<f32>().unwrap()).collect();
    let mut opt = Optimizer::new(&store, AdamWConfig::default()).unwrap();
    let r = opt.step(&store, 1e-2).unwrap();
    assert!(r.skipped && r.grad_norm.is_nan());
    let after: Vec<f32> =
        store.iter().flat_map(|(_, p)| p.value.to_vec::<f32>().unwrap()).collect();
    assert_eq!(before, after, "nothing is applied");
    assert_eq!(opt.step, 0);
    assert_eq!(store.grad_norm().unwrap(), 0.0, "the bad gradients are dropped");
}

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

mod checkpoints {
    use std::path::{Path, PathBuf};
    use steel_train::checkpoint::{latest_valid, list, verify, write_checkpoint};
    use steel_train::run_dir::prune_valid;
    use steel_train::{Result, TrainError};

    fn root(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("steel-ckpt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn write_bytes(bytes: Vec<u8>) -> impl Fn(&Path) -> Result<()> {
        move |p: &Path| std::fs::write(p, &bytes).map_err(|e| TrainError::Invalid(e.to_string()))
    }

    /// A checkpoint of the files every checkpoint must list (small stand-in contents).
    fn save(root: &Path, step: u64) -> PathBuf {
        let weights = write_bytes(vec![step as u8; 1000]);
        let moments = write_bytes(vec![step as u8 ^ 0x5a; 300]);
        let state = write_bytes(format!("{{\"step\": {step}}}").into_bytes());
        let config = write_bytes(b"{}".to_vec());
        let data = write_bytes(vec![7; 40]);
        write_checkpoint(
            root,
            step,
            &[
                ("model.safetensors", &weights),
                ("optimizer.safetensors", &moments),
                ("trainer.json", &state),
                ("config.json", &config),
                ("data.safetensors", &data),
            ],
            serde_json::json!({ "step": step }),
        )
        .unwrap()
    }

    #[test]
    fn newest_valid_checkpoint_is_found_and_damage_is_named() {
        let r = root("latest");
        save(&r, 10);
        let newest = save(&r, 20);
        let (found, warnings) = latest_valid(&r).unwrap();
        assert_eq!(found.unwrap().1.step, 20);
        assert!(warnings.is_empty());
        // Truncate a file of the newest: it is detected by checksum and skipped with a warning.
        let f = newest.join("model.safetensors");
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..500]).unwrap();
        let err = verify(&newest).unwrap_err().to_string();
        assert!(err.contains("model.safetensors") && err.contains("checksum"), "{err}");
        let (found, warnings) = latest_valid(&r).unwrap();
        assert_eq!(found.unwrap().1.step, 10);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("step-000020"), "{}", warnings[0]);
        // A flipped byte (same size) is caught too.
        let mut bytes = bytes.clone();
        bytes[3] ^= 0xff;
        std::fs::write(&f, &bytes).unwrap();
        assert!(verify(&newest).is_err());
    }

    #[test]
    fn a_crash_while_writing_leaves_the_previous_checkpoint_loadable() {
        let r = root("crash");
        save(&r, 5);
        let ok = write_bytes(vec![1; 64]);
        let crash = |_: &Path| -> Result<()> { Err(TrainError::Invalid("killed".into())) };
        assert!(write_checkpoint(
            &r,
            6,
            &[("model.safetensors", &ok), ("optimizer.safetensors", &crash)],
            serde_json::json!({})
        )
        .is_err());
        assert!(
            !r.join(".tmp-step-000006").exists(),
            "a failed write removes its half-written temporary"
        );
        assert_eq!(list(&r).unwrap().len(), 1);
        let (found, warnings) = latest_valid(&r).unwrap();
        assert_eq!(found.unwrap().1.step, 5);
        assert!(warnings.is_empty());
    }

    #[test]
    fn prune_keeps_the_newest_k() {
        let r = root("prune");
        for s in [1, 2, 3, 4] {
            save(&r, s);
        }
        std::fs::create_dir_all(r.join(".tmp-step-000005")).unwrap();
        let removed = prune_valid(&r, 2, &mut Default::default()).unwrap();
        assert_eq!(removed.len(), 3);
        let left: Vec<u64> = list(&r).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, vec![4, 3]);
        assert!(!r.join(".tmp-step-000005").exists());
    }

    /// Damaged checkpoints are not counted: newer damaged ones never push out the last valid
    /// one, and with none valid nothing is deleted.
    #[test]
    fn prune_counts_only_valid_checkpoints() {
        let r = root("prune-valid");
        for s in [1, 2, 3, 4, 5] {
            save(&r, s);
        }
        let flip = |step: u64| {
            let p = r.join(format!("step-{step:06}")).join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            b[0] ^= 0xFF;
            std::fs::write(&p, b).unwrap();
        };
        flip(5);
        flip(4);
        let removed = prune_valid(&r, 1, &mut Default::default()).unwrap();
        let left: Vec<u64> = list(&r).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, vec![5, 4, 3], "the newest valid one (3) stays; {removed:?}");
        let r2 = root("prune-none");
        for s in [1, 2] {
            save(&r2, s);
        }
        for s in [1, 2] {
            let p = r2.join(format!("step-{s:06}")).join("model.safetensors");
            std::fs::write(&p, b"damaged").unwrap();
        }
        assert!(prune_valid(&r2, 1, &mut Default::default()).unwrap().is_empty());
        assert_eq!(list(&r2).unwrap().len(), 2);
    }
}

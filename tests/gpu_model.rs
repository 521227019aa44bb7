//! Whole Steel models on the emulated GPU (`GpuBackend<EmuGpu>`) against the same models on the
//! CPU: every variant (soft-MoE or dense FFN × double-SwiGLU or SwiGLU MLPs, GQA and MQA, tied and
//! untied heads) through forward, backward and one AdamW step; and the soft-MoE block on its own
//! at large expert weights (DESIGN §1's testing trap), forward and backward.
//!
//! Tolerance: ‖gpu − cpu‖ / ‖cpu‖ ≤ 1e-2 for the loss, every parameter gradient and every
//! parameter after the step — the dtype policy's bf16 bound, because flash attention rounds q, k,
//! v (and P, dO, dS) to bf16 for the tensor cores while every other op of the model is fp32 on
//! both backends. The soft-MoE block alone has no attention and is held to 1e-5.

use std::collections::HashMap;
use std::sync::Arc;
use steel_autograd::Tape;
use steel_model::{FfnType, MlpType, Precision, SteelConfig, SteelModel, TrainingBatch};
use steel_runtime::gpu::{EmuGpu, GpuBackend};
use steel_runtime::{Backend, DType, Tensor};
use steel_train::{AdamWConfig, Optimizer};

use crate::common::{cpu, rel_err};
use crate::model::{blocks, random_tensors, tiny};

/// `tests/model.rs`'s tiny config widened to hidden 64: head_dim 16 (the smallest the flash
/// attention kernels are compiled for), 3 experts × 2 slots, expert width 16.
fn gpu_tiny(ffn: FfnType, mlp: MlpType, tied: bool, kv: usize) -> SteelConfig {
    let mut c = tiny(ffn, mlp, tied, kv);
    c.hidden_size = 64;
    c.intermediate_size = 64;
    c.validate().unwrap();
    c
}

/// Every model variant: soft-MoE or dense FFN × double-SwiGLU or SwiGLU MLPs, tied or untied
/// head, KV heads (GQA, MQA, MHA).
const VARIANTS: [(FfnType, MlpType, bool, usize); 4] = [
    (FfnType::SoftMoeV3, MlpType::Senet, false, 2),
    (FfnType::SoftMoeV3, MlpType::Raw, true, 1),
    (FfnType::Raw, MlpType::Senet, true, 4),
    (FfnType::Raw, MlpType::Raw, false, 2),
];

/// The learning rate of the AdamW step.
const LR: f64 = 1e-2;

/// What one training step produced on a backend: the loss, then each parameter's gradient and
/// its value after AdamW, by name.
struct Step {
    loss: f64,
    grads: Vec<(String, Vec<f64>)>,
    after: Vec<(String, Vec<f64>)>,
}

fn train_step(be: Arc<dyn Backend>, cfg: &SteelConfig, tensors: &HashMap<String, Tensor>) -> Step {
    train_step_in(be, cfg, tensors, Precision::Fp32)
}

fn train_step_in(
    be: Arc<dyn Backend>,
    cfg: &SteelConfig,
    tensors: &HashMap<String, Tensor>,
    precision: Precision,
) -> Step {
    // Copies: on the CPU the model would adopt these very buffers, and AdamW updates in place.
    let own = tensors.iter().map(|(k, t)| (k.clone(), t.deep_copy().unwrap())).collect();
    let mut model = SteelModel::from_tensors(cfg.clone(), be.clone(), own).unwrap();
    model.set_precision(precision).unwrap();
    let mut batch = TrainingBatch::new(blocks(2, 10, cfg.vocab_size, 4));
    batch.ignore_index = 0;
    let mut tape = Tape::new(be.clone());
    let (loss, count) = model.loss(&mut tape, &batch).unwrap();
    assert!(count > 0);
    let loss_v = be.download(tape.value(loss).unwrap()).unwrap().scalar().unwrap();
    tape.backward(loss).unwrap();
    let host = |t: &Tensor| be.download(t).unwrap().to_f64_vec().unwrap();
    let grads = model
        .params
        .iter()
        .map(|(_, p)| (p.name.clone(), host(&p.grad().expect("every parameter has a gradient"))))
        .collect();
    // eps ≪ every |g|: the first step is exactly ±lr per element (plus weight decay), whatever
    // the (slightly different) global-norm clipping factor; see the comparison below.
    let config = AdamWConfig { eps: 1e-30, ..AdamWConfig::default() };
    let mut opt = Optimizer::new(&model.params, config).unwrap();
    opt.step(&model.params, LR).unwrap();
    let after = model.params.iter().map(|(_, p)| (p.name.clone(), host(&p.value))).collect();
    // The fused AdamW rewrote every working copy as bf16 of its new master, bit for bit.
    for (_, p) in model.params.iter() {
        if let Some(w) = p.working() {
            let (w, m) = (host(w), host(&p.value));
            for (i, (x, y)) in w.iter().zip(&m).enumerate() {
                let want = steel_runtime::bf16::from_f32(*y as f32).to_f64();
                assert!(*x == want, "{}[{i}]: working copy {x:e} vs bf16(master {y:e})", p.name);
            }
        }
    }
    Step { loss: loss_v, grads, after }
}

/// Every variant: loss, gradients and the updated parameters agree; the GPU ran the fused
/// soft-MoE and experts kernels (and flash attention) once per layer and direction.
#[test]
fn every_model_variant_trains_on_the_emulated_gpu_like_the_cpu() {
    for (ffn, mlp, tied, kv) in VARIANTS {
        let cfg = gpu_tiny(ffn, mlp, tied, kv);
        let what = format!("{ffn:?}/{mlp:?} tied {tied} kv {kv}");
        let tensors = random_tensors(&cfg, DType::F32, 1.0, 9);
        let emu = Arc::new(EmuGpu::new());
        let want = train_step(cpu(), &cfg, &tensors);
        let got = train_step(Arc::new(GpuBackend::new(emu.clone())), &cfg, &tensors);
        let e = ((got.loss - want.loss) / want.loss).abs();
        assert!(e <= 1e-2, "{what}: loss {} vs {} (rel {e:.2e})", got.loss, want.loss);
        assert_eq!(got.grads.len(), want.grads.len());
        for ((name, a), (_, b)) in got.grads.iter().zip(&want.grads) {
            assert!(b.iter().any(|v| *v != 0.0), "{what}: the gradient of {name} is all zeros");
            if name.ends_with("k_proj.bias") {
                // Σ_t dk_t nearly cancels (a bias shared by every key of a query would not move
                // the softmax at all; only RoPE's rotation keeps it alive), so its error is
                // relative to the summands dk, not to the small sum: held to 1e-2 of
                // max(‖cpu‖, ‖dk‖), with ‖dk‖ ≈ ‖d k_proj.weight‖ / √hidden (dW = dkᵀ n and
                // the normalised inputs n have rms ≈ 1).
                let weight = &want
                    .grads
                    .iter()
                    .find(|(n, _)| *n == name.replace(".bias", ".weight"))
                    .unwrap()
                    .1;
                let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
                let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
                let scale = norm(b).max(norm(weight) / (cfg.hidden_size as f64).sqrt());
                assert!(
                    norm(&diff) <= 1e-2 * scale,
                    "{what}: {name}: ‖gpu − cpu‖ = {:.3e} > 1e-2 · {scale:.3e}",
                    norm(&diff)
                );
                continue;
            }
            let err = rel_err(a, b);
            assert!(err <= 1e-2, "{what}: the gradient of {name}: ‖gpu − cpu‖/‖cpu‖ = {err:.3e}");
        }
        // AdamW's first step moves each element by lr · g / (|g| + eps) (+ weight decay): with
        // eps = 1e-30 a function of the gradient's sign only (clipping scales every g alike),
        // the same on both backends up to rounding (1e-6 relative). Only where the two gradients differ in sign may the updates
        // differ, by at most 2 · lr: that is allowed within the bf16 noise of the gradient
        // (|g| ≤ 5e-2 of its tensor's rms: elementwise, 5× the 1e-2 norm bound), for at most
        // 1% of the elements.
        let (mut flips, mut total) = (0, 0);
        for (((name, a), (_, b)), ((_, ga), (_, gb))) in
            got.after.iter().zip(&want.after).zip(got.grads.iter().zip(&want.grads))
        {
            for i in 0..a.len() {
                total += 1;
                let gap = (a[i] - b[i]).abs();
                if (ga[i] > 0.0) != (gb[i] > 0.0) {
                    flips += 1;
                    let rms = (gb.iter().map(|x| x * x).sum::<f64>() / gb.len() as f64).sqrt();
                    assert!(gb[i].abs() <= 5e-2 * rms, "{what}: {name}[{i}]: the gradient's sign differs at {} ({:.2e} of the tensor's rms)", gb[i], gb[i].abs() / rms);
                    assert!(
                        gap <= 2.0 * LR * 1.01,
                        "{what}: {name}[{i}] after AdamW: {} vs {}",
                        a[i],
                        b[i]
                    );
                } else {
                    assert!(
                        gap <= 1e-6 * b[i].abs().max(1.0),
                        "{what}: {name}[{i}] after AdamW: {} vs {} (gradients {} / {})",
                        a[i],
                        b[i],
                        ga[i],
                        gb[i]
                    );
                }
            }
        }
        assert!(flips * 100 <= total, "{what}: {flips} of {total} gradient signs differ");
        let log = emu.launches();
        let count = |prefix: &str| log.iter().filter(|r| r.symbol.starts_with(prefix)).count();
        let layers = cfg.num_hidden_layers;
        assert_eq!(count("attention_fwd_d16"), layers, "{what}");
        assert_eq!(count("attention_bwd_dq_d16"), layers, "{what}");
        let moe = ffn == FfnType::SoftMoeV3;
        let senet_experts = moe && mlp == MlpType::Senet;
        assert_eq!(count("soft_moe_logits_s8"), if moe { layers } else { 0 }, "{what}");
        assert_eq!(count("soft_moe_route_bwd_s8"), if moe { layers } else { 0 }, "{what}");
        assert_eq!(count("soft_moe_phi_bwd"), if moe { layers } else { 0 }, "{what}");
        // Two stages forward; two weight-gradient passes backward.
        assert_eq!(count("experts_fwd_f32"), if senet_experts { 2 * layers } else { 0 }, "{what}");
        assert_eq!(
            count("experts_wgrad_f32"),
            if senet_experts { 2 * layers } else { 0 },
            "{what}"
        );
        assert_eq!(count("adamw_step_f32"), 1, "{what}");
        let counts = steel_runtime::gpu::Gpu::counts(emu.as_ref());
        assert!(counts.kernels as usize == log.len() && counts.gemms > 0, "{what}: {counts}");
    }
}

/// The soft-MoE block alone at large expert weights (its output is O(1), not the ~1e-9 of the
/// training init), forward and every gradient (the block's input, phi, scale and each expert
/// weight), GPU vs CPU, for double-SwiGLU and SwiGLU experts.
#[test]
fn soft_moe_block_on_the_emulated_gpu_matches_the_cpu_at_large_expert_weights() {
    for mlp in [MlpType::Senet, MlpType::Raw] {
        let cfg = gpu_tiny(FfnType::SoftMoeV3, mlp, false, 2);
        let tensors = random_tensors(&cfg, DType::F32, 8.0, 21);
        let m: Vec<f64> = steel_autograd::fixtures::SplitMix::new(5).vec(2 * 7 * 64, 1.0);
        let input = Tensor::from_f64(&m, &[2, 7, 64], DType::F32).unwrap();
        let run = |be: Arc<dyn Backend>| -> Vec<(String, Vec<f64>)> {
            let model = SteelModel::from_tensors(cfg.clone(), be.clone(), tensors.clone()).unwrap();
            let mut tape = Tape::new(be.clone());
            let x = tape.leaf(be.upload(&input).unwrap(), true);
            let y = model.layer_ffn(&mut tape, 1, x).unwrap();
            // A random projection of the output, so the seed gradient is not a constant.
            let r = Tensor::from_f64(
                &steel_autograd::fixtures::SplitMix::new(6).vec(3 * 64, 1.0),
                &[3, 64],
                DType::F32,
            )
            .unwrap();
            let w = tape.leaf(be.upload(&r).unwrap(), false);
            let loss = tape.linear(y, w, None).unwrap();
            let host = |t: &Tensor| be.download(t).unwrap().to_f64_vec().unwrap();
            let mut out = vec![("y".to_string(), host(tape.value(y).unwrap()))];
            tape.backward(loss).unwrap();
            out.push(("dx".into(), host(&tape.grad(x).unwrap().unwrap())));
            for (_, p) in
                model.params.iter().filter(|(_, p)| p.name.starts_with("model.layers.1.mlp."))
            {
                out.push((
                    format!("d {}", p.name),
                    host(&p.grad().expect("the block's parameters get gradients")),
                ));
            }
            out
        };
        let want = run(cpu());
        let got = run(Arc::new(GpuBackend::new(Arc::new(EmuGpu::new()))));
        let y = &want[0].1;
        let rms = (y.iter().map(|v| v * v).sum::<f64>() / y.len() as f64).sqrt();
        assert!(rms > 0.1, "{mlp:?}: large expert weights must give an O(1) branch, rms {rms}");
        assert_eq!(got.len(), want.len());
        assert!(want.len() > 3, "{mlp:?}: the block's parameters are checked");
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            let err = rel_err(g, w);
            assert!(err <= 1e-5, "{mlp:?}: {name}: ‖gpu − cpu‖/‖cpu‖ = {err:.3e} > 1e-5");
            assert!(w.iter().any(|v| *v != 0.0), "{mlp:?}: {name} is all zeros");
        }
    }
}

/// bf16 mixed precision (the GPU trainer's default) on every variant: bf16 working copies of the
/// GEMM weights and bf16 GEMM/attention operands, against the fp32 CPU. The loss agrees to 2e-2;
/// every parameter gets a finite, non-zero gradient within 0.1 of the fp32 one (‖·‖ relative:
/// bf16 rounding of activations, weights and the gradients fed to the dgrad/wgrad GEMMs, each
/// ~4e-3, through the whole model; the k_proj bias's gradient is a near-cancelling sum and is
/// checked for being finite and non-zero only); and AdamW rewrote every working copy (checked
/// in `train_step_in`). The model's precision changed the computation: its loss is not the fp32
/// emulated loss bit for bit.
#[test]
fn every_model_variant_trains_in_bf16_mixed_on_the_emulated_gpu() {
    for (ffn, mlp, tied, kv) in VARIANTS {
        let cfg = gpu_tiny(ffn, mlp, tied, kv);
        let what = format!("bf16-mixed {ffn:?}/{mlp:?} tied {tied} kv {kv}");
        let tensors = random_tensors(&cfg, DType::F32, 1.0, 19);
        let want = train_step(cpu(), &cfg, &tensors);
        let gpu = || -> Arc<dyn Backend> { Arc::new(GpuBackend::new(Arc::new(EmuGpu::new()))) };
        let got = train_step_in(gpu(), &cfg, &tensors, Precision::Bf16Mixed);
        let fp32 = train_step_in(gpu(), &cfg, &tensors, Precision::Fp32);
        assert!(got.loss != fp32.loss, "{what}: bf16-mixed computed exactly the fp32 loss");
        let e = ((got.loss - want.loss) / want.loss).abs();
        assert!(e <= 2e-2, "{what}: loss {} vs {} (rel {e:.2e})", got.loss, want.loss);
        for ((name, a), (_, b)) in got.grads.iter().zip(&want.grads) {
            assert!(a.iter().all(|v| v.is_finite()), "{what}: {name} has a non-finite gradient");
            assert!(a.iter().any(|v| *v != 0.0), "{what}: the gradient of {name} is all zeros");
            if name.ends_with("k_proj.bias") {
                continue;
            }
            let err = rel_err(a, b);
            assert!(err <= 0.1, "{what}: the gradient of {name}: ‖bf16 − fp32‖/‖fp32‖ = {err:.3e}");
        }
    }
}

/// The fused loss's backward when the loss is not the root (here `3 · loss`, and the sum of two
/// losses): the upstream gradient is applied on the device (`scale_by_fwd`, nothing read back);
/// when it is the root, by nothing at all. Both agree with the CPU (fp32: 1e-5).
#[test]
fn the_fused_loss_scales_by_a_device_upstream_gradient() {
    use steel_autograd::LossOptions;
    use steel_runtime::CrossEntropy;
    let run = |be: Arc<dyn Backend>, root: usize| -> Vec<Vec<f64>> {
        let host = |t: &Tensor| be.download(t).unwrap().to_f64_vec().unwrap();
        let mut tape = Tape::new(be.clone());
        let rand = |shape: &[usize], seed| {
            steel_autograd::fixtures::random_tensor(be.as_ref(), shape, DType::F32, 1.0, seed)
                .unwrap()
        };
        let x = tape.leaf(rand(&[6, 8], 1), true);
        let w = tape.leaf(rand(&[11, 8], 2), true);
        let t = be.upload(&Tensor::from_vec(vec![1i32, 4, -100, 7, 10, 0], &[6]).unwrap()).unwrap();
        let opts = LossOptions {
            ce: CrossEntropy { ignore_index: -100, chunk_tokens: 4 },
            normalizer: Some(9.0),
            count: Some(5),
        };
        let (loss, count) = tape.lm_head_ce(x, w, &t, opts).unwrap();
        assert_eq!(count, 5);
        let top = match root {
            0 => loss,
            1 => tape.scale(loss, 3.0).unwrap(),
            _ => {
                let (again, _) = tape.lm_head_ce(x, w, &t, opts).unwrap();
                tape.add(loss, again).unwrap()
            }
        };
        tape.backward(top).unwrap();
        [x, w].iter().map(|v| host(&tape.grad(*v).unwrap().unwrap())).collect()
    };
    let gpu = || -> Arc<dyn Backend> { Arc::new(GpuBackend::new(Arc::new(EmuGpu::new()))) };
    let unit = run(cpu(), 0);
    for root in 0..3 {
        let (want, got) = (run(cpu(), root), run(gpu(), root));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let e = rel_err(a, b);
            assert!(e <= 1e-5, "root {root}, input {i}: ‖gpu − cpu‖/‖cpu‖ = {e:.2e}");
        }
        // 3 · loss and loss + loss: three and two times the unit gradients.
        let k = [1.0, 3.0, 2.0][root];
        for (a, b) in want.iter().zip(&unit) {
            let scaled: Vec<f64> = b.iter().map(|v| v * k).collect();
            assert!(rel_err(a, &scaled) <= 1e-6, "root {root}: not {k} × the unit gradient");
        }
    }
}

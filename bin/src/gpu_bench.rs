//! `steel-bench kernels` on a GPU (and `scripts/gpu-check.sh`): every GPU op checked against the
//! CPU reference, then timed against its memory-bandwidth roofline.
//!
//! The roofline is the measured device-to-device copy bandwidth (bytes read + written per
//! second over a 1 GiB copy), not the datasheet figure. An op's bytes moved are the bytes its
//! kernels must read and write at least once (formula per case below); a memory-bound kernel's
//! figure of merit is `bytes ÷ time ÷ copy bandwidth`. GEMM-bound ops report TFLOP/s instead.
//! Timings are medians of `repeats` synchronised runs after a warm-up, on problems (hundreds of
//! MB) far larger than the 50 MB L2, so caches do not flatter them.
//! Tolerances (‖gpu − cpu‖/‖cpu‖) are DESIGN §4's: fp32 ≤ 1e-5, bf16 ≤ 1e-2.

use anyhow::{bail, Context, Result};
use std::sync::Arc;
use std::time::Instant;
use steel_autograd::fixtures::random_tensor;
use steel_runtime::cpu::CpuBackend;
use steel_runtime::cuda::nvml::NvmlReader;
use steel_runtime::cuda::CudaGpu;
use steel_runtime::gpu::{GemmDesc, Gpu, GpuBackend, Op};
use steel_runtime::{
    AdamW, AdamWParam, Backend, CrossEntropy, DType, ExpertWeights, ExpertsOut, Matmul,
    SoftMoeRoute, Tensor,
};

/// Inputs of one case, built on a backend.
type Build = fn(&dyn Backend, bool) -> Result<Vec<Tensor>>;
/// Runs the op; returns the tensors to compare.
type Exec = fn(&dyn Backend, &[Tensor]) -> Result<Vec<Tensor>>;

struct Case {
    name: &'static str,
    /// The timed problem, in words.
    shape: &'static str,
    build: Build,
    exec: Exec,
    /// Bytes moved by the timed problem (0: compute-bound, see `flops`).
    bytes: f64,
    /// FLOPs of the timed problem (GEMM-bound ops).
    flops: f64,
    tol: f64,
}

const EPS: f64 = 1e-6;
// Timed sizes: 32768 tokens of the 1792-wide model; checked sizes: ragged and small.
const ROWS: usize = 32768;
const H: usize = 1792;
const CHECK_ROWS: usize = 67;
const CHECK_H: usize = 1000;
const ADAMW_N: usize = 64 << 20;

fn rows_h(big: bool) -> (usize, usize) {
    if big {
        (ROWS, H)
    } else {
        (CHECK_ROWS, CHECK_H)
    }
}

/// param, grad, m, v `[n]` for the AdamW rows (the second moment non-negative).
fn adamw_inputs(be: &dyn Backend, big: bool, seed: u64) -> Result<Vec<Tensor>> {
    let n = if big { ADAMW_N } else { 10_007 };
    Ok(vec![
        rnd(be, &[n], DType::F32, seed)?,
        rnd(be, &[n], DType::F32, seed + 1)?,
        rnd(be, &[n], DType::F32, seed + 2)?,
        be.upload(&Tensor::from_vec(
            (0..n).map(|i| ((i * 37) % 101) as f32 * 1e-4).collect::<Vec<f32>>(),
            &[n],
        )?)?,
    ])
}

/// The AdamW rows' parameter over `adamw_inputs` and their hyper-parameters.
fn adamw_param(t: &[Tensor], copy: Option<Tensor>) -> (AdamWParam, AdamW) {
    let p = AdamWParam {
        param: t[0].clone(),
        grad: t[1].clone(),
        m: t[2].clone(),
        v: t[3].clone(),
        weight_decay: 0.1,
        copy,
    };
    let hp = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, step: 3, grad_scale: 1.0 };
    (p, hp)
}

/// The embedding cases' inputs: ids `[n]` (I32, a fixed scatter over the vocabulary with every
/// 16th token the same hot id) and the table `[V, h]` of `dtype` (zeros when timed: the values do
/// not change the time, and 272M random values would take the host seconds).
fn embedding_inputs(be: &dyn Backend, big: bool, dtype: DType) -> Result<Vec<Tensor>> {
    let (n, v, h) = if big { (ROWS, 151_936, H) } else { (CHECK_ROWS * 5, 3001, CHECK_H) };
    let ids: Vec<i32> = (0..n as i64)
        .map(|i| if i % 16 == 0 { 11 } else { ((i * 7919) % v as i64) as i32 })
        .collect();
    let ids = be.upload(&Tensor::from_vec(ids, &[n])?)?;
    let table = if big { be.zeros(&[v, h], dtype)? } else { rnd(be, &[v, h], dtype, 17)? };
    Ok(vec![ids, table])
}

/// Elements of the timed rope problem: [8, 2048, 32, 56].
const ROPE_NUMEL: f64 = 8.0 * 2048.0 * 32.0 * 56.0;

fn rope_shape(big: bool) -> [usize; 4] {
    if big {
        [8, 2048, 32, 56]
    } else {
        [2, 37, 3, 56]
    }
}

/// The timed attention problem: the model's B = 8 sequences of 2,048 tokens, 32 heads of 56.
const ATTENTION: [usize; 4] = [8, 2048, 32, 56];
/// The standard causal count of the forward, 2·B·H·T²·D (the backward is 2.5× that): what
/// FlashAttention's and PyTorch's benchmarks report, not the FLOPs as executed.
const ATTENTION_FWD_FLOPS: f64 = 2.0 * 8.0 * 32.0 * 2048.0 * 2048.0 * 56.0;

fn attention_scale() -> f64 {
    1.0 / (ATTENTION[3] as f64).sqrt()
}

/// q, k, v: bf16 at the timed size (what training feeds the kernels); f32 on the small, ragged
/// check (GQA 4/2, 70 tokens: two tiles, the second ragged), so the CPU reference runs in f32
/// and the GPU rounds the same values to bf16.
fn attention_inputs(be: &dyn Backend, big: bool) -> Result<Vec<Tensor>> {
    let ([b, t, h, d], hkv, dtype) =
        if big { (ATTENTION, ATTENTION[2], DType::BF16) } else { ([2, 70, 4, 56], 2, DType::F32) };
    Ok(vec![
        rnd(be, &[b, t, h, d], dtype, 31)?,
        rnd(be, &[b, t, hkv, d], dtype, 32)?,
        rnd(be, &[b, t, hkv, d], dtype, 33)?,
    ])
}

/// PyTorch's numbers for the attention rows (a line of bench/attention_torch.py).
pub struct Peer {
    pub name: String,
    pub fwd_ms: f64,
    pub bwd_ms: f64,
}

impl Peer {
    pub fn read(path: &std::path::Path) -> Result<Peer> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the PyTorch peer timings {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(text.trim()).with_context(|| {
            format!("{} is not a JSON line of attention_torch.py", path.display())
        })?;
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            bail!("the PyTorch peer did not run: {e}");
        }
        let ms = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_f64())
                .with_context(|| format!("{}: no number {k:?}", path.display()))
        };
        let name = v.get("peer").and_then(|x| x.as_str()).unwrap_or("PyTorch").to_string();
        Ok(Peer { name, fwd_ms: ms("fwd_ms")?, bwd_ms: ms("bwd_ms")? })
    }
}

/// The soft-MoE cases: `[B, T, d]` with `s` slots (timed: the reference model's training
/// micro-batch of 8 × 2,048 tokens, hidden 1,792, 6 slots).
fn moe_dims(big: bool) -> (usize, usize, usize, usize) {
    if big {
        (8, 2048, H, 6)
    } else {
        (2, CHECK_ROWS, CHECK_H, 6)
    }
}

/// The routing's inputs: x `[B, T, d]`, phi `[d, S]`, scale `[1]`.
fn moe_inputs(be: &dyn Backend, big: bool) -> Result<Vec<Tensor>> {
    let (b, t, d, s) = moe_dims(big);
    Ok(vec![
        rnd(be, &[b, t, d], DType::F32, 50)?,
        rnd(be, &[d, s], DType::F32, 51)?,
        rnd(be, &[1], DType::F32, 52)?,
    ])
}

/// The experts cases: E experts of R rows, d → f → d (timed: the model's 6 experts, micro-batch
/// 8 × 1 slot each, 1,792 → 448 → 1,792, bf16 weights).
fn expert_dims(big: bool) -> (usize, usize, usize, usize) {
    if big {
        (6, 8, H, H / 4)
    } else {
        (3, 9, 200, 50)
    }
}

/// x `[E, R, d]` then the E gate_up, up, gate_down, down weights, bf16, values ±1/√fan_in.
fn expert_inputs(be: &dyn Backend, big: bool) -> Result<Vec<Tensor>> {
    let (e, r, d, f) = expert_dims(big);
    let mut t = vec![rnd(be, &[e, r, d], DType::BF16, 60)?];
    for k in 0..4u64 {
        let (shape, fan_in) = if k < 2 { ([f, d], d) } else { ([d, f], f) };
        for i in 0..e as u64 {
            let w = random_tensor(
                be,
                &shape,
                DType::BF16,
                1.0 / (fan_in as f64).sqrt(),
                61 + 16 * k + i,
            )?;
            t.push(w);
        }
    }
    Ok(t)
}

/// The four weight lists of `t[1..]` (E tensors each).
fn expert_lists(t: &[Tensor], e: usize) -> [Vec<Tensor>; 4] {
    std::array::from_fn(|k| t[1 + k * e..1 + (k + 1) * e].to_vec())
}

/// Weight bytes of the experts (bf16), and their f32 gradients.
const EXPERT_WEIGHTS: f64 = 6.0 * 4.0 * (H * H / 4) as f64;

fn rnd(be: &dyn Backend, shape: &[usize], dtype: DType, seed: u64) -> Result<Tensor> {
    Ok(random_tensor(be, shape, dtype, 1.0, seed)?)
}

fn cases() -> Vec<Case> {
    let f4 = 4.0;
    let (r, h) = (ROWS as f64, H as f64);
    vec![
        Case {
            name: "attention_fwd (flash)",
            shape: "[8,2048,32,56] bf16, causal",
            build: attention_inputs,
            exec: |be, t| {
                let (o, lse) = be.attention_fwd(&t[0], &t[1], &t[2], attention_scale())?;
                Ok(vec![o, lse])
            },
            bytes: 0.0,
            flops: ATTENTION_FWD_FLOPS,
            tol: 1e-2,
        },
        Case {
            name: "attention_bwd (flash)",
            shape: "[8,2048,32,56] bf16, causal",
            build: |be, big| {
                let mut t = attention_inputs(be, big)?;
                let (o, lse) = be.attention_fwd(&t[0], &t[1], &t[2], attention_scale())?;
                let shape = t[0].shape().to_vec();
                let d_o = rnd(be, &shape, DType::F32, 34)?;
                // Zeros, so the check compares the gradients themselves.
                let dq = be.zeros(&shape, DType::F32)?;
                let dk = be.zeros(t[1].shape(), DType::F32)?;
                let dv = be.zeros(t[2].shape(), DType::F32)?;
                t.extend([o, lse, d_o, dq, dk, dv]);
                Ok(t)
            },
            exec: |be, t| {
                let s = attention_scale();
                be.attention_bwd(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], s, &t[6], &t[7], &t[8])?;
                Ok(vec![t[6].clone(), t[7].clone(), t[8].clone()])
            },
            bytes: 0.0,
            flops: 2.5 * ATTENTION_FWD_FLOPS,
            tol: 1e-2,
        },
        Case {
            name: "soft_moe_route_fwd",
            shape: "x [8,2048,1792] f32, 6 slots",
            build: moe_inputs,
            exec: |be, t| {
                let r = be.soft_moe_route_fwd(&t[0], &t[1], &t[2], 1e-12)?;
                Ok(vec![r.xn, r.x_norm, r.phi_norm, r.dispatch, r.combine])
            },
            // read x, write xn (the logits and weights are 16384 × 6)
            bytes: f4 * 2.0 * (8 * 2048 * H) as f64,
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "soft_moe_route_bwd",
            shape: "x [8,2048,1792] f32, 6 slots",
            build: |be, big| {
                let mut t = moe_inputs(be, big)?;
                let r = be.soft_moe_route_fwd(&t[0], &t[1], &t[2], 1e-12)?;
                let (b, tt, d, s) = moe_dims(big);
                let g = [
                    rnd(be, &[b, tt, d], DType::F32, 53)?,
                    rnd(be, &[b, tt, s], DType::F32, 54)?,
                    rnd(be, &[b, tt, s], DType::F32, 55)?,
                ];
                let zeros = [
                    be.zeros(&[b, tt, d], DType::F32)?,
                    be.zeros(&[d, s], DType::F32)?,
                    be.zeros(&[1], DType::F32)?,
                ];
                t.extend([r.xn, r.x_norm, r.phi_norm, r.dispatch, r.combine]);
                t.extend(g);
                t.extend(zeros);
                Ok(t)
            },
            exec: |be, t| {
                let r = SoftMoeRoute {
                    xn: t[3].clone(),
                    x_norm: t[4].clone(),
                    phi_norm: t[5].clone(),
                    dispatch: t[6].clone(),
                    combine: t[7].clone(),
                };
                be.soft_moe_route_bwd(
                    &r, &t[1], &t[2], &t[8], &t[9], &t[10], 1e-12, &t[11], &t[12], &t[13],
                )?;
                Ok(vec![t[11].clone(), t[12].clone(), t[13].clone()])
            },
            // read xn twice and d_xn, read and write dx
            bytes: f4 * 4.0 * (8 * 2048 * H) as f64,
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "soft_moe_dispatch_fwd",
            shape: "xn [8,2048,1792] f32 → [8,6,1792]",
            build: |be, big| {
                let (b, t, d, s) = moe_dims(big);
                Ok(vec![rnd(be, &[b, t, s], DType::F32, 56)?, rnd(be, &[b, t, d], DType::F32, 57)?])
            },
            exec: |be, t| Ok(vec![be.soft_moe_dispatch_fwd(&t[0], &t[1])?]),
            bytes: f4 * (8 * 2048 * H) as f64,
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "soft_moe_combine_fwd",
            shape: "[8,6,1792] → y [8,2048,1792] f32",
            build: |be, big| {
                let (b, t, d, s) = moe_dims(big);
                Ok(vec![rnd(be, &[b, t, s], DType::F32, 58)?, rnd(be, &[b, s, d], DType::F32, 59)?])
            },
            exec: |be, t| Ok(vec![be.soft_moe_combine_fwd(&t[0], &t[1])?]),
            bytes: f4 * (8 * 2048 * H) as f64,
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "experts_fwd",
            shape: "6 × [8,1792→448→1792] bf16",
            build: expert_inputs,
            exec: |be, t| {
                let e = t[0].shape()[0];
                let w = expert_lists(t, e);
                let ws = ExpertWeights { gate_up: &w[0], up: &w[1], gate_down: &w[2], down: &w[3] };
                let o = be.experts_fwd(&t[0], ws)?;
                Ok(vec![o.y, o.a1, o.b1, o.u, o.a2, o.b2])
            },
            // every weight read once (the activations are 48 rows)
            bytes: 2.0 * EXPERT_WEIGHTS,
            flops: 0.0,
            tol: 1e-2,
        },
        Case {
            name: "experts_bwd",
            shape: "6 × [8,1792→448→1792] bf16",
            build: |be, big| {
                let mut t = expert_inputs(be, big)?;
                let (e, r, d, _) = expert_dims(big);
                let w = expert_lists(&t, e);
                let ws = ExpertWeights { gate_up: &w[0], up: &w[1], gate_down: &w[2], down: &w[3] };
                let o = be.experts_fwd(&t[0], ws)?;
                let grads: Vec<Tensor> = std::iter::once(Ok(be.zeros(&[e, r, d], DType::F32)?))
                    .chain(t[1..].iter().map(|w| be.zeros(w.shape(), DType::F32)))
                    .collect::<Result<_, _>>()?;
                t.extend([o.y, o.a1, o.b1, o.u, o.a2, o.b2, rnd(be, &[e, r, d], DType::F32, 70)?]);
                t.extend(grads);
                Ok(t)
            },
            exec: |be, t| {
                let e = t[0].shape()[0];
                let n = 1 + 4 * e;
                let w = expert_lists(&t[..n], e);
                let ws = ExpertWeights { gate_up: &w[0], up: &w[1], gate_down: &w[2], down: &w[3] };
                let s = &t[n..n + 6];
                let saved = ExpertsOut {
                    y: s[0].clone(),
                    a1: s[1].clone(),
                    b1: s[2].clone(),
                    u: s[3].clone(),
                    a2: s[4].clone(),
                    b2: s[5].clone(),
                };
                let g = &t[n + 7..];
                let dw = expert_lists(g, e);
                let ds =
                    ExpertWeights { gate_up: &dw[0], up: &dw[1], gate_down: &dw[2], down: &dw[3] };
                be.experts_bwd(&t[0], ws, &saved, &t[n + 6], &g[0], ds)?;
                Ok(g.to_vec())
            },
            // every weight read once, every f32 weight gradient read and written once
            bytes: (2.0 + 8.0) * EXPERT_WEIGHTS,
            flops: 0.0,
            tol: 1e-2,
        },
        Case {
            name: "rms_norm_fwd",
            shape: "x [32768,1792] f32",
            build: |be, big| {
                let (r, h) = rows_h(big);
                Ok(vec![rnd(be, &[r, h], DType::F32, 1)?, rnd(be, &[h], DType::F32, 2)?])
            },
            exec: |be, t| {
                let (y, rstd) = be.rms_norm_fwd(&t[0], &t[1], EPS)?;
                Ok(vec![y, rstd])
            },
            // read x, w; write y, rstd
            bytes: f4 * (2.0 * r * h + h + r),
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "add_rms_norm_fwd",
            shape: "x, r [32768,1792] f32",
            build: |be, big| {
                let (r, h) = rows_h(big);
                Ok(vec![
                    rnd(be, &[r, h], DType::F32, 3)?,
                    rnd(be, &[r, h], DType::F32, 4)?,
                    rnd(be, &[h], DType::F32, 5)?,
                ])
            },
            exec: |be, t| {
                let (sum, y, rstd) = be.add_rms_norm_fwd(&t[0], &t[1], &t[2], EPS)?;
                Ok(vec![sum, y, rstd])
            },
            // read x, r, w; write sum, y, rstd
            bytes: f4 * (4.0 * r * h + h + r),
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "rms_norm_bwd",
            shape: "x, dy [32768,1792] f32",
            build: |be, big| {
                let (r, h) = rows_h(big);
                let x = rnd(be, &[r, h], DType::F32, 6)?;
                let w = rnd(be, &[h], DType::F32, 7)?;
                let (_, rstd) = be.rms_norm_fwd(&x, &w, EPS)?;
                let dy = rnd(be, &[r, h], DType::F32, 8)?;
                let dx = be.zeros(&[r, h], DType::F32)?;
                let dw = be.zeros(&[h], DType::F32)?;
                Ok(vec![x, w, rstd, dy, dx, dw])
            },
            exec: |be, t| {
                be.rms_norm_bwd(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5])?;
                Ok(vec![t[4].clone(), t[5].clone()])
            },
            // read x, dy, rstd, w, dx (accumulated); write dx, dw
            bytes: f4 * (4.0 * r * h + r + 2.0 * h),
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "softmax_fwd (last axis)",
            shape: "x [32768,1792] f32",
            build: |be, big| {
                let (r, h) = rows_h(big);
                Ok(vec![rnd(be, &[r, h], DType::F32, 30)?])
            },
            exec: |be, t| Ok(vec![be.softmax_fwd(&t[0], 1)?]),
            // read x; write y
            bytes: f4 * 2.0 * r * h,
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "softmax_fwd (token axis)",
            shape: "x [16,2048,64] f32, axis 1",
            build: |be, big| {
                let shape: &[usize] = if big { &[16, 2048, 64] } else { &[3, 300, 17] };
                Ok(vec![rnd(be, shape, DType::F32, 31)?])
            },
            exec: |be, t| Ok(vec![be.softmax_fwd(&t[0], 1)?]),
            // read x; write y
            bytes: f4 * 2.0 * (16 * 2048 * 64) as f64,
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "softmax_bwd (last axis)",
            shape: "y, dy [32768,1792] f32",
            build: |be, big| {
                let (r, h) = rows_h(big);
                let y = be.softmax_fwd(&rnd(be, &[r, h], DType::F32, 32)?, 1)?;
                let dy = rnd(be, &[r, h], DType::F32, 33)?;
                Ok(vec![y, dy, be.zeros(&[r, h], DType::F32)?])
            },
            exec: |be, t| {
                be.softmax_bwd(&t[0], &t[1], 1, &t[2])?;
                Ok(vec![t[2].clone()])
            },
            // read y, dy, dx (accumulated); write dx
            bytes: f4 * 4.0 * r * h,
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "l2_normalize_fwd (last axis)",
            shape: "x [32768,1792] f32",
            build: |be, big| {
                let (r, h) = rows_h(big);
                Ok(vec![rnd(be, &[r, h], DType::F32, 34)?])
            },
            exec: |be, t| {
                let (y, norm) = be.l2_normalize_fwd(&t[0], 1, EPS)?;
                Ok(vec![y, norm])
            },
            // read x; write y, norm
            bytes: f4 * (2.0 * r * h + r),
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "l2_normalize_bwd (last axis)",
            shape: "y, dy [32768,1792] f32",
            build: |be, big| {
                let (r, h) = rows_h(big);
                let (y, norm) = be.l2_normalize_fwd(&rnd(be, &[r, h], DType::F32, 35)?, 1, EPS)?;
                let dy = rnd(be, &[r, h], DType::F32, 36)?;
                Ok(vec![y, norm, dy, be.zeros(&[r, h], DType::F32)?])
            },
            exec: |be, t| {
                be.l2_normalize_bwd(&t[0], &t[1], &t[2], 1, EPS, &t[3])?;
                Ok(vec![t[3].clone()])
            },
            // read y, norm, dy, dx (accumulated); write dx
            bytes: f4 * (4.0 * r * h + r),
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "adamw_step",
            shape: "64M params f32",
            build: |be, big| adamw_inputs(be, big, 9),
            exec: |be, t| {
                let (p, hp) = adamw_param(t, None);
                be.adamw_step(&[p], hp)?;
                Ok(vec![t[0].clone(), t[2].clone(), t[3].clone()])
            },
            // read param, grad, m, v; write param, m, v
            bytes: f4 * 7.0 * ADAMW_N as f64,
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "adamw_step_guarded",
            shape: "64M params f32 + bf16 copies, clip 1.0",
            build: |be, big| {
                let mut t = adamw_inputs(be, big, 12)?;
                let n = t[0].numel();
                t.push(be.zeros(&[n], DType::BF16)?);
                t.push(be.upload(&Tensor::from_vec(vec![2.5f32], &[1])?)?);
                Ok(t)
            },
            exec: |be, t| {
                let (p, hp) = adamw_param(t, Some(t[4].clone()));
                be.adamw_step_guarded(&[p], hp, &t[5], Some(1.0))?;
                Ok(vec![t[0].clone(), t[2].clone(), t[3].clone()])
            },
            // the norm reads grad; the update reads param, grad, m, v and writes param, m, v and
            // the bf16 copy
            bytes: (f4 * 8.0 + 2.0) * ADAMW_N as f64,
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "embedding_fwd bf16",
            shape: "32768 ids, table [151936,1792]",
            build: |be, big| embedding_inputs(be, big, DType::BF16),
            exec: |be, t| Ok(vec![be.embedding_fwd(&t[0], &t[1])?]),
            // read ids and one table row per token; write the rows
            bytes: 4.0 * r + 2.0 * 2.0 * r * h,
            flops: 0.0,
            tol: 0.0,
        },
        Case {
            name: "embedding_bwd",
            shape: "dy [32768,1792] f32, V 151936",
            build: |be, big| {
                let mut t = embedding_inputs(be, big, DType::F32)?;
                let (n, h) = (t[0].numel(), t[1].shape()[1]);
                t.push(rnd(be, &[n, h], DType::F32, 18)?);
                Ok(t)
            },
            exec: |be, t| {
                be.embedding_bwd(&t[0], &t[2], &t[1])?;
                Ok(vec![t[1].clone()])
            },
            // read dy; read and write the touched dtable rows (≤ one per token); the sort's
            // passes over the 4-byte ids and positions are negligible
            bytes: f4 * 3.0 * r * h,
            flops: 0.0,
            tol: 0.0,
        },
        Case {
            name: "rope_fwd",
            shape: "x [8,2048,32,56] f32",
            build: |be, big| Ok(vec![rnd(be, &rope_shape(big), DType::F32, 19)?]),
            exec: |be, t| Ok(vec![be.rope_fwd(&t[0], 1e6, 0)?]),
            // read x, write y (the [2048, 28] cos/sin tables are negligible)
            bytes: f4 * 2.0 * ROPE_NUMEL,
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "rope_bwd",
            shape: "dy, dx [8,2048,32,56] f32",
            build: |be, big| {
                let s = rope_shape(big);
                Ok(vec![rnd(be, &s, DType::F32, 20)?, rnd(be, &s, DType::F32, 21)?])
            },
            exec: |be, t| {
                be.rope_bwd(&t[0], 1e6, 0, &t[1])?;
                Ok(vec![t[1].clone()])
            },
            // read dy and dx (accumulated), write dx
            bytes: f4 * 3.0 * ROPE_NUMEL,
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "matmul (cuBLASLt) bf16 x·Wᵀ",
            shape: "[32768,1792]x[1792,1792]ᵀ",
            build: |be, big| {
                let (r, h) = rows_h(big);
                Ok(vec![rnd(be, &[r, h], DType::BF16, 13)?, rnd(be, &[h, h], DType::BF16, 14)?])
            },
            exec: |be, t| Ok(vec![be.matmul(&t[0], &t[1], None, Matmul::NT, Some(DType::F32))?]),
            bytes: 0.0,
            flops: 2.0 * r * h * h,
            tol: 1e-2,
        },
        Case {
            name: "lm_head_ce_fwd",
            shape: "x [8192,1792] w [65536,1792] f32",
            build: |be, big| {
                let (n, h, v) = if big { (8192, H, 65536) } else { (37, 96, 1000) };
                let x = rnd(be, &[n, h], DType::F32, 15)?;
                let w = rnd(be, &[v, h], DType::F32, 16)?;
                let ids: Vec<i32> =
                    (0..n as i32).map(|i| ((i as i64 * 7919) % v as i64) as i32).collect();
                let t = be.upload(&Tensor::from_vec(ids, &[n])?)?;
                Ok(vec![x, w, t])
            },
            exec: |be, t| {
                let spec = CrossEntropy { ignore_index: -100, chunk_tokens: 4096 };
                let out = be.lm_head_ce_fwd(&t[0], &t[1], &t[2], spec)?;
                Ok(vec![out.loss_sum, out.lse])
            },
            bytes: 0.0,
            flops: 2.0 * 8192.0 * h * 65536.0,
            tol: 1e-5,
        },
        Case {
            name: "lm_head_ce_fwd bf16",
            shape: "x [8192,1792] w [151936,1792] bf16",
            build: |be, big| {
                let (n, h, v) = if big { (8192, H, 151_936) } else { (37, 96, 1000) };
                let x = rnd(be, &[n, h], DType::BF16, 17)?;
                let w = rnd(be, &[v, h], DType::BF16, 18)?;
                let ids: Vec<i32> =
                    (0..n as i32).map(|i| ((i as i64 * 7919) % v as i64) as i32).collect();
                let t = be.upload(&Tensor::from_vec(ids, &[n])?)?;
                Ok(vec![x, w, t])
            },
            exec: |be, t| {
                let spec = CrossEntropy { ignore_index: -100, chunk_tokens: 4096 };
                let out = be.lm_head_ce_fwd(&t[0], &t[1], &t[2], spec)?;
                Ok(vec![out.loss_sum, out.lse])
            },
            bytes: 0.0,
            flops: 2.0 * 8192.0 * h * 151_936.0,
            tol: 1e-5,
        },
        Case {
            name: "add bf16",
            shape: "a, b [32768,1792] bf16",
            build: |be, big| {
                let (r, h) = rows_h(big);
                Ok(vec![rnd(be, &[r, h], DType::BF16, 19)?, rnd(be, &[r, h], DType::BF16, 20)?])
            },
            exec: |be, t| Ok(vec![be.add(&t[0], &t[1])?]),
            // read a, b; write out
            bytes: 2.0 * 3.0 * r * h,
            flops: 0.0,
            tol: 1e-2,
        },
        Case {
            name: "add_assign f32",
            shape: "dst, src [32768,1792] f32",
            build: |be, big| {
                let (r, h) = rows_h(big);
                Ok(vec![rnd(be, &[r, h], DType::F32, 21)?, rnd(be, &[r, h], DType::F32, 22)?])
            },
            exec: |be, t| {
                be.add_assign(&t[0], &t[1])?;
                Ok(vec![t[0].clone()])
            },
            // read dst, src; write dst (the check's inputs are fresh, so one call is compared)
            bytes: f4 * 3.0 * r * h,
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "swiglu_fwd bf16",
            shape: "a, b [32768,1792] bf16",
            build: |be, big| {
                let (r, h) = rows_h(big);
                Ok(vec![rnd(be, &[r, h], DType::BF16, 23)?, rnd(be, &[r, h], DType::BF16, 24)?])
            },
            exec: |be, t| Ok(vec![be.swiglu_fwd(&t[0], &t[1])?]),
            bytes: 2.0 * 3.0 * r * h,
            flops: 0.0,
            tol: 1e-2,
        },
        Case {
            name: "swiglu_bwd bf16",
            shape: "a, b bf16, dy f32 [32768,1792]",
            build: |be, big| {
                let (r, h) = rows_h(big);
                Ok(vec![
                    rnd(be, &[r, h], DType::BF16, 25)?,
                    rnd(be, &[r, h], DType::BF16, 26)?,
                    rnd(be, &[r, h], DType::F32, 27)?,
                    be.zeros(&[r, h], DType::F32)?,
                    be.zeros(&[r, h], DType::F32)?,
                ])
            },
            exec: |be, t| {
                be.swiglu_bwd(&t[0], &t[1], &t[2], &t[3], &t[4])?;
                Ok(vec![t[3].clone(), t[4].clone()])
            },
            // read a, b (bf16), dy, da, db; write da, db
            bytes: 2.0 * 2.0 * r * h + f4 * 5.0 * r * h,
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "cast f32 → bf16",
            shape: "x [32768,1792]",
            build: |be, big| {
                let (r, h) = rows_h(big);
                Ok(vec![rnd(be, &[r, h], DType::F32, 28)?])
            },
            exec: |be, t| Ok(vec![be.cast(&t[0], DType::BF16)?]),
            bytes: (4.0 + 2.0) * r * h,
            flops: 0.0,
            tol: 0.0,
        },
        Case {
            name: "transpose01 bf16",
            shape: "[2048,16,1792] → [16,2048,1792]",
            build: |be, big| {
                let (a, b, c) = if big { (2048, 16, H) } else { (7, 5, 24) };
                Ok(vec![rnd(be, &[a, b, c], DType::BF16, 29)?])
            },
            exec: |be, t| Ok(vec![be.transpose01(&t[0])?]),
            bytes: 2.0 * 2.0 * 2048.0 * 16.0 * h,
            flops: 0.0,
            tol: 0.0,
        },
        Case {
            name: "sum_rows_into (bias grad) f32",
            shape: "x [32768,1792] → [1792]",
            build: |be, big| {
                let (r, h) = rows_h(big);
                Ok(vec![rnd(be, &[r, h], DType::F32, 30)?, be.zeros(&[h], DType::F32)?])
            },
            exec: |be, t| {
                be.sum_rows_into(&t[0], &t[1])?;
                Ok(vec![t[1].clone()])
            },
            bytes: f4 * r * h,
            flops: 0.0,
            tol: 1e-5,
        },
        Case {
            name: "global_norm (f64)",
            shape: "64M params f32",
            build: |be, big| {
                let n = if big { ADAMW_N } else { 10_007 };
                Ok(vec![rnd(be, &[n], DType::F32, 31)?, rnd(be, &[n / 3 + 1], DType::F32, 32)?])
            },
            exec: |be, t| {
                let norm = be.global_norm(&[&t[0], &t[1]])?;
                // The f64 result as two f32 (high part, remainder): compared to ~1e-14.
                let hi = norm as f32;
                let lo = (norm - f64::from(hi)) as f32;
                Ok(vec![be.upload(&Tensor::from_vec(vec![hi, lo], &[2])?)?])
            },
            bytes: f4 * (ADAMW_N + ADAMW_N / 3) as f64,
            flops: 0.0,
            tol: 1e-12,
        },
    ]
}

/// The relative error of case `c` on `be` against the CPU, on its small, ragged problem (the
/// same inputs on both backends).
fn check_case(c: &Case, cpu: &CpuBackend, be: &dyn Backend) -> Result<f64> {
    let host = (c.build)(cpu, false)?;
    let dev: Vec<Tensor> = host.iter().map(|t| be.upload(t)).collect::<Result<_, _>>()?;
    let want = (c.exec)(cpu, &host)?;
    let got = (c.exec)(be, &dev)?;
    let got: Vec<Tensor> = got.iter().map(|t| be.download(t)).collect::<Result<_, _>>()?;
    rel_err(&got, &want)
}

/// ‖a − b‖ / ‖b‖ over all compared tensors.
fn rel_err(got: &[Tensor], want: &[Tensor]) -> Result<f64> {
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        let (g, w) = (g.to_f64_vec()?, w.to_f64_vec()?);
        if g.len() != w.len() {
            bail!("output sizes differ: {} vs {}", g.len(), w.len());
        }
        for (a, b) in g.iter().zip(&w) {
            num += (a - b) * (a - b);
            den += b * b;
        }
    }
    Ok((num / den.max(f64::MIN_POSITIVE)).sqrt())
}

/// cuBLASLt through `Gpu::gemm` directly (bf16 in, fp32 out, `x·Wᵀ`): checked on a ragged
/// problem against the CPU backend, timed at the model's width. Returns the table cells.
fn direct_gemm(
    gpu: &Arc<CudaGpu>,
    cpu: &CpuBackend,
    repeats: usize,
) -> (&'static str, String, String, String) {
    let run = |m: usize, n: usize, k: usize, timed: bool| -> Result<(f64, f64)> {
        let a = rnd(cpu, &[m, k], DType::BF16, 21)?;
        let b = rnd(cpu, &[n, k], DType::BF16, 22)?;
        let desc = GemmDesc {
            m,
            n,
            k,
            op_a: Op::N,
            op_b: Op::T,
            ab_dtype: DType::BF16,
            alpha: 1.0,
            beta: 0.0,
        };
        let (da, db) = (gpu.alloc(a.size_in_bytes())?, gpu.alloc(b.size_in_bytes())?);
        let dc = gpu.alloc(m * n * 4)?;
        let result = (|| -> Result<(f64, f64)> {
            // SAFETY: each allocation holds exactly the bytes copied or computed into it.
            unsafe {
                gpu.upload(da, &a.to_bytes()?)?;
                gpu.upload(db, &b.to_bytes()?)?;
                gpu.gemm(&desc, da, db, dc)?;
            }
            gpu.synchronize()?;
            let mut secs = 0.0;
            if timed {
                let mut times = Vec::new();
                for _ in 0..repeats.max(1) {
                    let t = Instant::now();
                    // SAFETY: as above.
                    unsafe { gpu.gemm(&desc, da, db, dc)? };
                    gpu.synchronize()?;
                    times.push(t.elapsed().as_secs_f64());
                }
                times.sort_by(f64::total_cmp);
                secs = times[times.len() / 2];
            }
            let mut out = vec![0u8; m * n * 4];
            // SAFETY: `dc` holds m·n f32.
            unsafe { gpu.download(dc, &mut out)? };
            let got = Tensor::from_bytes(&out, DType::F32, &[m, n])?;
            let err = if timed {
                0.0
            } else {
                let want = cpu.matmul(&a, &b, None, Matmul::NT, Some(DType::F32))?;
                rel_err(&[got], &[want])?
            };
            Ok((err, secs))
        })();
        // SAFETY: allocated above, freed once, after the stream was synchronised.
        unsafe {
            gpu.free(da);
            gpu.free(db);
            gpu.free(dc);
        }
        result
    };
    let check = run(67, 131, 1000, false);
    let timed = run(ROWS, H, H, true);
    let (mut verdict, err) = match &check {
        Ok((e, _)) if *e <= 1e-2 => ("pass", format!("{e:.1e}")),
        Ok((e, _)) => ("FAIL", format!("{e:.1e}")),
        Err(e) => {
            println!("    gemm check: {e:#}");
            ("ERROR", "-".into())
        }
    };
    // A timing that fails is a failure too: the op broke at the model's size.
    if timed.is_err() && verdict == "pass" {
        verdict = "ERROR";
    }
    let (ms, rate) = match &timed {
        Ok((_, s)) => (
            format!("{:.3}", s * 1e3),
            format!("{:.0} TF/s", 2.0 * (ROWS * H * H) as f64 / s / 1e12),
        ),
        Err(e) => {
            println!("    gemm timing: {e:#}");
            ("-".into(), "-".into())
        }
    };
    (verdict, err, ms, rate)
}

/// Device-to-device copy bandwidth (bytes read + written per second) over 1 GiB.
fn copy_bandwidth(gpu: &CudaGpu, repeats: usize) -> Result<f64> {
    let bytes = 1usize << 30;
    let src = gpu.alloc(bytes)?;
    let dst = gpu.alloc(bytes)?;
    let stream = gpu.stream();
    let (start, end) = (gpu.context().new_event()?, gpu.context().new_event()?);
    let result = (|| -> Result<f64> {
        // SAFETY: both allocations hold `bytes`; they are distinct.
        unsafe { gpu.copy(dst, src, bytes)? };
        stream.record(&start)?;
        for _ in 0..repeats {
            // SAFETY: as above.
            unsafe { gpu.copy(dst, src, bytes)? };
        }
        stream.record(&end)?;
        let ms = start.elapsed_ms(&end)? as f64 / repeats as f64;
        Ok(2.0 * bytes as f64 / (ms * 1e-3))
    })();
    // SAFETY: allocated above, freed once; stream order protects the queued copies.
    unsafe {
        gpu.free(src);
        gpu.free(dst);
    }
    result
}

fn median_secs(be: &dyn Backend, repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    be.synchronize()?;
    let mut times = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        be.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The check-and-time table on CUDA device `ordinal`.
pub fn run(
    ordinal: usize,
    repeats: usize,
    arch: Option<&str>,
    profile: bool,
    peer: Option<&Peer>,
) -> Result<()> {
    let t0 = Instant::now();
    if let Some(a) = arch {
        eprintln!("note: --arch {a} is ignored on a GPU (kernels are built for the device)");
    }
    let gpu = Arc::new(CudaGpu::new(ordinal).context("setting up the CUDA device")?);
    let info = gpu.context().info().clone();
    println!(
        "{}: {} SMs, {:.1} GiB; kernels loaded in {:.1} s",
        gpu.name(),
        info.multiprocessors,
        info.total_memory as f64 / (1u64 << 30) as f64,
        t0.elapsed().as_secs_f64()
    );
    for l in crate::kernels::library_lines() {
        println!("{l}");
    }
    if profile {
        steel_runtime::cuda::profile::profiler_start()?;
    }
    let copy = copy_bandwidth(&gpu, repeats)?;
    println!("device copy (1 GiB, read+write): {:.0} GB/s = the roofline below", copy / 1e9);
    println!();
    let be = GpuBackend::new(gpu.clone());
    let cpu = CpuBackend::new();
    println!(
        "{:<30} {:<34} {:>8} {:>9} {:>10} {:>9} {:>11}",
        "op", "timed problem", "check", "rel err", "ms", "GB/s", "of roofline"
    );
    let (mut passed, mut failed) = (0usize, 0usize);
    {
        let (verdict, err, ms, rate) = direct_gemm(&gpu, &cpu, repeats);
        match verdict {
            "pass" => passed += 1,
            _ => failed += 1,
        }
        println!(
            "{:<30} {:<34} {:>8} {:>9} {:>10} {:>9} {:>11}",
            "gemm (Gpu::gemm, cuBLASLt) bf16",
            "[32768,1792]x[1792,1792]ᵀ → f32",
            verdict,
            err,
            ms,
            rate,
            "-"
        );
    }
    for c in cases() {
        // Check on the small, ragged problem: same inputs on both backends.
        let check = check_case(&c, &cpu, &be);
        let timed = (|| -> Result<f64> {
            let inputs = (c.build)(&be, true)?;
            median_secs(&be, repeats, || (c.exec)(&be, &inputs).map(drop))
        })();
        // A check that passes on the small problem but errs on the timed, model-sized one is a
        // failure as well.
        let timing_failed = timed.is_err();
        let (verdict, err) = match &check {
            Ok(e) if *e <= c.tol && !timing_failed => {
                passed += 1;
                ("pass", format!("{e:.1e}"))
            }
            Ok(e) if *e <= c.tol => {
                failed += 1;
                ("ERROR", format!("{e:.1e}"))
            }
            Ok(e) => {
                failed += 1;
                ("FAIL", format!("{e:.1e}"))
            }
            Err(_) => {
                failed += 1;
                ("ERROR", "-".to_string())
            }
        };
        let (ms, rate, frac) = match &timed {
            Ok(s) if c.bytes > 0.0 => (
                format!("{:.3}", s * 1e3),
                format!("{:.0}", c.bytes / s / 1e9),
                format!("{:.0}%", 100.0 * c.bytes / s / copy),
            ),
            Ok(s) => (
                format!("{:.3}", s * 1e3),
                format!("{:.0} TF/s", c.flops / s / 1e12),
                "-".to_string(),
            ),
            Err(_) => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<30} {:<34} {:>8} {:>9} {:>10} {:>9} {:>11}",
            c.name, c.shape, verdict, err, ms, rate, frac
        );
        for e in [check.as_ref().err(), timed.as_ref().err()].into_iter().flatten() {
            println!("    {e:#}");
        }
        if let (Some(p), Ok(s)) = (peer, &timed) {
            let theirs = match c.name {
                "attention_fwd (flash)" => Some(p.fwd_ms),
                "attention_bwd (flash)" => Some(p.bwd_ms),
                _ => None,
            };
            if let Some(ms) = theirs {
                println!(
                    "    vs {}: {ms:.3} ms ({:.0} TF/s); Steel is {:.2}x its speed",
                    p.name,
                    c.flops / (ms * 1e-3) / 1e12,
                    ms * 1e-3 / s
                );
            }
        }
    }
    println!();
    if profile {
        gpu.synchronize()?;
        steel_runtime::cuda::profile::profiler_stop()?;
    }
    match NvmlReader::new(ordinal as u32).and_then(|r| r.read()) {
        Ok(r) => println!("nvml: {} {r}", r.name),
        Err(e) => println!("nvml: {e}"),
    }
    let s = gpu.mem_stats();
    println!("allocator: {s}");
    println!("{passed} passed, {failed} failed");
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
    if failed > 0 {
        bail!("{failed} GPU check(s) failed");
    }
    Ok(())
}

/// The checks of the table on the emulator (`steel-bench kernels --device emu`): every case on
/// its small, ragged problem against the CPU backend, no timings (the emulator's speed says
/// nothing about a GPU's).
pub fn run_emu() -> Result<()> {
    let t0 = Instant::now();
    let gpu = Arc::new(steel_runtime::gpu::EmuGpu::new());
    let be = GpuBackend::new(gpu.clone());
    let cpu = CpuBackend::new();
    println!("{:<30} {:<34} {:>8} {:>9}", "op (emulated)", "checked problem", "check", "rel err");
    let (mut passed, mut failed) = (0usize, 0usize);
    for c in cases() {
        let check = check_case(&c, &cpu, &be);
        let (verdict, err) = match &check {
            Ok(e) if *e <= c.tol => {
                passed += 1;
                ("pass", format!("{e:.1e}"))
            }
            Ok(e) => {
                failed += 1;
                ("FAIL", format!("{e:.1e}"))
            }
            Err(_) => {
                failed += 1;
                ("ERROR", "-".to_string())
            }
        };
        println!("{:<30} {:<34} {:>8} {:>9}", c.name, "(small, ragged)", verdict, err);
        if let Err(e) = &check {
            println!("    {e:#}");
        }
    }
    let counts = gpu.counts();
    println!("{passed} passed, {failed} failed; emu: {counts}");
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
    if failed > 0 {
        bail!("{failed} emulated check(s) failed");
    }
    Ok(())
}

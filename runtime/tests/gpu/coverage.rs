use super::*;
use steel_runtime::{ExpertWeights, Matmul, Transpose};

// ---- every op of the Backend trait on GpuBackend<EmuGpu> -------------------------------------------

/// Ops whose f32 results carry bf16 error by the dtype policy (the tensor cores round f32
/// inputs to bf16): held to the bf16 tolerance.
const BF16_COMPUTE: &[&str] = &["attention_fwd", "attention_bwd"];

type Run = fn(&dyn Backend) -> steel_runtime::Result<Vec<Tensor>>;

fn up(be: &dyn Backend, t: Tensor) -> Tensor {
    be.upload(&t).unwrap()
}
fn f(be: &dyn Backend, shape: &[usize], seed: u64) -> Tensor {
    up(be, f32_rand(shape, seed))
}

/// One call of every `Backend` method with valid inputs (gradient buffers start non-zero), and
/// the tensors it produced or updated.
fn calls() -> Vec<(&'static str, Run)> {
    vec![
        ("device", |be| {
            // The backend's device is where its tensors live.
            assert_eq!(be.zeros(&[1], DType::F32)?.device(), be.device());
            assert_eq!(f(be, &[2], 99).device(), be.device());
            Ok(vec![])
        }),
        ("name", |be| {
            assert!(!be.name().is_empty());
            Ok(vec![])
        }),
        ("zeros", |be| Ok(vec![be.zeros(&[3, 5], DType::F32)?])),
        ("fill", |be| {
            let t = f(be, &[7], 1);
            be.fill(&t, -1.25)?;
            Ok(vec![t])
        }),
        ("upload", |be| Ok(vec![f(be, &[4, 3], 2)])),
        ("download", |be| Ok(vec![up(be, be.download(&f(be, &[5], 3))?)])),
        ("copy", |be| Ok(vec![be.copy(&f(be, &[6], 4))?])),
        ("cast", |be| Ok(vec![be.cast(&f(be, &[9], 5), DType::BF16)?])),
        ("synchronize", |be| {
            be.synchronize()?;
            Ok(vec![])
        }),
        ("add", |be| Ok(vec![be.add(&f(be, &[3, 7], 6), &f(be, &[3, 7], 7))?])),
        ("add_assign", |be| {
            let d = f(be, &[11], 8);
            be.add_assign(&d, &f(be, &[11], 9))?;
            Ok(vec![d])
        }),
        ("scale", |be| Ok(vec![be.scale(&f(be, &[13], 10), 0.3)?])),
        ("scale_by_fwd", |be| Ok(vec![be.scale_by_fwd(&f(be, &[13], 11), &f(be, &[1], 12))?])),
        ("scale_by_bwd", |be| {
            let (dx, ds) = (f(be, &[13], 13), f(be, &[1], 14));
            be.scale_by_bwd(&f(be, &[13], 15), &f(be, &[1], 16), &f(be, &[13], 17), &dx, &ds)?;
            Ok(vec![dx, ds])
        }),
        ("swiglu_fwd", |be| Ok(vec![be.swiglu_fwd(&f(be, &[2, 9], 18), &f(be, &[2, 9], 19))?])),
        ("swiglu_bwd", |be| {
            let (da, db) = (f(be, &[2, 9], 20), f(be, &[2, 9], 21));
            be.swiglu_bwd(&f(be, &[2, 9], 22), &f(be, &[2, 9], 23), &f(be, &[2, 9], 24), &da, &db)?;
            Ok(vec![da, db])
        }),
        ("transpose01", |be| Ok(vec![be.transpose01(&f(be, &[3, 4, 5], 25))?])),
        ("slice0", |be| Ok(vec![be.slice0(&f(be, &[5, 3], 26), 1, 3)?])),
        ("slice0_bwd", |be| {
            let dx = f(be, &[5, 3], 27);
            be.slice0_bwd(&f(be, &[2, 3], 28), &dx, 2)?;
            Ok(vec![dx])
        }),
        ("concat0", |be| Ok(vec![be.concat0(&[&f(be, &[2, 3], 29), &f(be, &[1, 3], 30)])?])),
        ("matmul", |be| {
            let bias = f(be, &[5], 31);
            Ok(vec![be.matmul(
                &f(be, &[4, 6], 32),
                &f(be, &[5, 6], 33),
                Some(&bias),
                Matmul::NT,
                None,
            )?])
        }),
        ("matmul_into", |be| {
            let out = f(be, &[6, 5], 34);
            let spec =
                Matmul { trans_a: Transpose::Yes, trans_b: Transpose::No, alpha: 1.0, beta: 1.0 };
            be.matmul_into(&f(be, &[4, 6], 35), &f(be, &[4, 5], 36), spec, &out)?;
            Ok(vec![out])
        }),
        ("sum_rows_into", |be| {
            let out = f(be, &[7], 37);
            be.sum_rows_into(&f(be, &[3, 7], 38), &out)?;
            Ok(vec![out])
        }),
        ("embedding_fwd", |be| {
            let ids = up(be, ids_tensor(&[3, 0, 3, 5], &[2, 2]));
            Ok(vec![be.embedding_fwd(&ids, &f(be, &[6, 4], 39))?])
        }),
        ("embedding_bwd", |be| {
            let ids = up(be, ids_tensor(&[3, 0, 3, 5], &[4]));
            let dt = f(be, &[6, 4], 40);
            be.embedding_bwd(&ids, &f(be, &[4, 4], 41), &dt)?;
            Ok(vec![dt])
        }),
        ("embedding_fwd_prechecked", |be| {
            let ids = up(be, ids_tensor(&[4, 1, 4, 5], &[2, 2]));
            Ok(vec![be.embedding_fwd_prechecked(&ids, &f(be, &[6, 4], 139))?])
        }),
        ("embedding_bwd_prechecked", |be| {
            let ids = up(be, ids_tensor(&[2, 0, 2, 5], &[4]));
            let dt = f(be, &[6, 4], 140);
            be.embedding_bwd_prechecked(&ids, &f(be, &[4, 4], 141), &dt)?;
            Ok(vec![dt])
        }),
        ("rms_norm_fwd", |be| {
            let (y, r) = be.rms_norm_fwd(&f(be, &[3, 8], 42), &f(be, &[8], 43), 1e-6)?;
            Ok(vec![y, r])
        }),
        ("rms_norm_bwd", |be| {
            let (x, w) = (f(be, &[3, 8], 44), f(be, &[8], 45));
            let (_, rstd) = be.rms_norm_fwd(&x, &w, 1e-6)?;
            let (dx, dw) = (f(be, &[3, 8], 46), f(be, &[8], 47));
            be.rms_norm_bwd(&x, &w, &rstd, &f(be, &[3, 8], 48), &dx, &dw)?;
            Ok(vec![dx, dw])
        }),
        ("add_rms_norm_fwd", |be| {
            let (s, y, r) = be.add_rms_norm_fwd(
                &f(be, &[3, 8], 49),
                &f(be, &[3, 8], 50),
                &f(be, &[8], 51),
                1e-6,
            )?;
            Ok(vec![s, y, r])
        }),
        ("add_rms_norm_bwd", |be| {
            let w = f(be, &[8], 52);
            let (sum, _, rstd) =
                be.add_rms_norm_fwd(&f(be, &[3, 8], 53), &f(be, &[3, 8], 54), &w, 1e-6)?;
            let (dx, dr, dw) = (f(be, &[3, 8], 55), f(be, &[3, 8], 56), f(be, &[8], 57));
            be.add_rms_norm_bwd(
                &sum,
                &w,
                &rstd,
                &f(be, &[3, 8], 58),
                Some(&f(be, &[3, 8], 59)),
                &dx,
                &dr,
                &dw,
            )?;
            Ok(vec![dx, dr, dw])
        }),
        ("l2_normalize_fwd", |be| {
            let (y, n) = be.l2_normalize_fwd(&f(be, &[3, 5, 4], 60), 1, 1e-12)?;
            Ok(vec![y, n])
        }),
        ("l2_normalize_bwd", |be| {
            let (y, n) = be.l2_normalize_fwd(&f(be, &[3, 5, 4], 61), 1, 1e-12)?;
            let dx = f(be, &[3, 5, 4], 62);
            be.l2_normalize_bwd(&y, &n, &f(be, &[3, 5, 4], 63), 1, 1e-12, &dx)?;
            Ok(vec![dx])
        }),
        ("softmax_fwd", |be| Ok(vec![be.softmax_fwd(&f(be, &[2, 6, 3], 64), 1)?])),
        ("softmax_bwd", |be| {
            let y = be.softmax_fwd(&f(be, &[2, 6, 3], 65), 2)?;
            let dx = f(be, &[2, 6, 3], 66);
            be.softmax_bwd(&y, &f(be, &[2, 6, 3], 67), 2, &dx)?;
            Ok(vec![dx])
        }),
        ("rope_fwd", |be| Ok(vec![be.rope_fwd(&f(be, &[1, 5, 2, 8], 68), 10_000.0, 3)?])),
        ("rope_bwd", |be| {
            let dx = f(be, &[1, 5, 2, 8], 69);
            be.rope_bwd(&f(be, &[1, 5, 2, 8], 70), 10_000.0, 3, &dx)?;
            Ok(vec![dx])
        }),
        ("soft_moe_route_fwd", |be| {
            let r = be.soft_moe_route_fwd(
                &f(be, &[2, 5, 7], 120),
                &f(be, &[7, 3], 121),
                &f(be, &[1], 122),
                1e-12,
            )?;
            Ok(vec![r.xn, r.x_norm, r.phi_norm, r.dispatch, r.combine])
        }),
        ("soft_moe_route_bwd", |be| {
            let (phi, sc) = (f(be, &[7, 3], 124), f(be, &[1], 125));
            let r = be.soft_moe_route_fwd(&f(be, &[2, 5, 7], 123), &phi, &sc, 1e-12)?;
            let (dx, dphi, ds) = (f(be, &[2, 5, 7], 126), f(be, &[7, 3], 127), f(be, &[1], 128));
            let (gx, gd, gc) =
                (f(be, &[2, 5, 7], 129), f(be, &[2, 5, 3], 130), f(be, &[2, 5, 3], 131));
            be.soft_moe_route_bwd(&r, &phi, &sc, &gx, &gd, &gc, 1e-12, &dx, &dphi, &ds)?;
            Ok(vec![dx, dphi, ds])
        }),
        ("soft_moe_dispatch_fwd", |be| {
            Ok(vec![be.soft_moe_dispatch_fwd(&f(be, &[2, 5, 3], 132), &f(be, &[2, 5, 7], 133))?])
        }),
        ("soft_moe_dispatch_bwd", |be| {
            let (dw, dx) = (f(be, &[2, 5, 3], 134), f(be, &[2, 5, 7], 135));
            be.soft_moe_dispatch_bwd(
                &f(be, &[2, 5, 3], 136),
                &f(be, &[2, 5, 7], 137),
                &f(be, &[2, 3, 7], 138),
                &dw,
                &dx,
            )?;
            Ok(vec![dw, dx])
        }),
        ("soft_moe_combine_fwd", |be| {
            Ok(vec![be.soft_moe_combine_fwd(&f(be, &[2, 5, 3], 139), &f(be, &[2, 3, 7], 140))?])
        }),
        ("soft_moe_combine_bwd", |be| {
            let (dw, dys) = (f(be, &[2, 5, 3], 141), f(be, &[2, 3, 7], 142));
            be.soft_moe_combine_bwd(
                &f(be, &[2, 5, 3], 143),
                &f(be, &[2, 3, 7], 144),
                &f(be, &[2, 5, 7], 145),
                &dw,
                &dys,
            )?;
            Ok(vec![dw, dys])
        }),
        ("experts_fwd", |be| {
            let w: Vec<Vec<Tensor>> = (0..4)
                .map(|k| {
                    (0..2)
                        .map(|i| f(be, if k < 2 { &[3, 8] } else { &[8, 3] }, 150 + 2 * k + i))
                        .collect()
                })
                .collect();
            let ws = ExpertWeights { gate_up: &w[0], up: &w[1], gate_down: &w[2], down: &w[3] };
            let o = be.experts_fwd(&f(be, &[2, 4, 8], 146), ws)?;
            Ok(vec![o.y, o.a1, o.b1, o.u, o.a2, o.b2])
        }),
        ("experts_bwd", |be| {
            let mk = |base: u64| -> Vec<Vec<Tensor>> {
                (0..4)
                    .map(|k| {
                        (0..2)
                            .map(|i| f(be, if k < 2 { &[3, 8] } else { &[8, 3] }, base + 2 * k + i))
                            .collect()
                    })
                    .collect()
            };
            let (w, g) = (mk(160), mk(170));
            let ws = ExpertWeights { gate_up: &w[0], up: &w[1], gate_down: &w[2], down: &w[3] };
            let gs = ExpertWeights { gate_up: &g[0], up: &g[1], gate_down: &g[2], down: &g[3] };
            let x = f(be, &[2, 4, 8], 147);
            let saved = be.experts_fwd(&x, ws)?;
            let dx = f(be, &[2, 4, 8], 148);
            be.experts_bwd(&x, ws, &saved, &f(be, &[2, 4, 8], 149), &dx, gs)?;
            let mut out = vec![dx];
            out.extend(g.into_iter().flatten());
            Ok(out)
        }),
        ("attention_fwd", |be| {
            let (o, lse) = be.attention_fwd(
                &f(be, &[1, 4, 2, 8], 71),
                &f(be, &[1, 4, 1, 8], 72),
                &f(be, &[1, 4, 1, 8], 73),
                0.35,
            )?;
            Ok(vec![o, lse])
        }),
        ("attention_bwd", |be| {
            let (q, k, v) =
                (f(be, &[1, 4, 2, 8], 74), f(be, &[1, 4, 1, 8], 75), f(be, &[1, 4, 1, 8], 76));
            let (o, lse) = be.attention_fwd(&q, &k, &v, 0.35)?;
            let (dq, dk, dv) =
                (f(be, &[1, 4, 2, 8], 77), f(be, &[1, 4, 1, 8], 78), f(be, &[1, 4, 1, 8], 79));
            be.attention_bwd(&q, &k, &v, &o, &lse, &f(be, &[1, 4, 2, 8], 80), 0.35, &dq, &dk, &dv)?;
            Ok(vec![dq, dk, dv])
        }),
        ("lm_head_ce_fwd", |be| {
            let t = up(be, ids_tensor(&[1, -100, 6, 0], &[4]));
            let spec = CrossEntropy { ignore_index: -100, chunk_tokens: 3 };
            let out = be.lm_head_ce_fwd(&f(be, &[4, 5], 81), &f(be, &[7, 5], 82), &t, spec)?;
            Ok(vec![out.loss_sum, out.lse])
        }),
        ("lm_head_ce_fwd_counted", |be| {
            let t = up(be, ids_tensor(&[1, -100, 6, 0], &[4]));
            let spec = CrossEntropy { ignore_index: -100, chunk_tokens: 3 };
            let out =
                be.lm_head_ce_fwd_counted(&f(be, &[4, 5], 97), &f(be, &[7, 5], 98), &t, spec, 3)?;
            Ok(vec![out.loss_sum, out.lse])
        }),
        ("lm_head_ce_bwd", |be| {
            let (x, w) = (f(be, &[4, 5], 83), f(be, &[7, 5], 84));
            let t = up(be, ids_tensor(&[1, -100, 6, 0], &[4]));
            let spec = CrossEntropy { ignore_index: -100, chunk_tokens: 3 };
            let out = be.lm_head_ce_fwd(&x, &w, &t, spec)?;
            let (dx, dw) = (f(be, &[4, 5], 85), f(be, &[7, 5], 86));
            be.lm_head_ce_bwd(&x, &w, &t, &out.lse, &f(be, &[1], 87), 0.5, spec, &dx, &dw)?;
            Ok(vec![dx, dw])
        }),
        ("lm_head_ce_fwd_bwd", |be| {
            let t = up(be, ids_tensor(&[1, -100, 6, 0], &[4]));
            let spec = CrossEntropy { ignore_index: -100, chunk_tokens: 3 };
            let (dx, dw) = (f(be, &[4, 5], 88), f(be, &[7, 5], 89));
            let out = be.lm_head_ce_fwd_bwd(
                &f(be, &[4, 5], 90),
                &f(be, &[7, 5], 91),
                &t,
                0.25,
                spec,
                Some(3),
                &dx,
                &dw,
            )?;
            Ok(vec![out.loss_sum, out.lse, dx, dw])
        }),
        ("adamw_step", |be| {
            let p = AdamWParam {
                param: f(be, &[9], 92),
                grad: f(be, &[9], 93),
                m: f(be, &[9], 94),
                v: up(be, Tensor::from_f64(&[0.5; 9], &[9], DType::F32)?),
                weight_decay: 0.1,
                copy: Some(be.zeros(&[9], DType::BF16)?),
            };
            let hp =
                AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, step: 2, grad_scale: 1.0 };
            be.adamw_step(std::slice::from_ref(&p), hp)?;
            Ok(vec![p.param, p.m, p.v, p.copy.unwrap_or_else(|| unreachable!())])
        }),
        ("adamw_step_guarded", |be| {
            let p = AdamWParam {
                param: f(be, &[9], 192),
                grad: f(be, &[9], 193),
                m: f(be, &[9], 194),
                v: up(be, Tensor::from_f64(&[0.5; 9], &[9], DType::F32)?),
                weight_decay: 0.1,
                copy: Some(be.zeros(&[9], DType::BF16)?),
            };
            let hp =
                AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, step: 2, grad_scale: 1.0 };
            let loss = f(be, &[1], 195);
            // A clip below the norm, so the factor is not 1.
            let status = be.adamw_step_guarded(std::slice::from_ref(&p), hp, &loss, Some(0.5))?;
            // F32 on a GPU, F64 on the CPU: compared as f32.
            let s = be.download(&status)?.to_f64_vec()?;
            let status = up(be, Tensor::from_f64(&s, &[4], DType::F32)?);
            Ok(vec![p.param, p.m, p.v, p.copy.unwrap_or_else(|| unreachable!()), status])
        }),
        ("global_norm", |be| {
            let n = be.global_norm(&[&f(be, &[9], 95), &f(be, &[4, 4], 96)])?;
            Ok(vec![up(be, Tensor::from_f64(&[n], &[1], DType::F32)?)])
        }),
    ]
}

/// The `fn` names of the `Backend` trait, read from its source: the table above must list each.
fn trait_ops() -> Vec<String> {
    let src = include_str!("../../src/backend.rs");
    let body = &src[src.find("pub trait Backend").unwrap()..];
    body.lines()
        .filter_map(|l| l.trim_start().strip_prefix("fn "))
        .map(|l| l[..l.find(['(', '<']).unwrap()].to_string())
        .collect()
}

#[test]
fn emu_every_backend_op_runs_on_the_gpu_backend_and_matches_the_cpu() {
    let table = calls();
    let mut listed: Vec<String> = table.iter().map(|(n, _)| n.to_string()).collect();
    let mut ops = trait_ops();
    listed.sort();
    ops.sort();
    assert_eq!(listed, ops, "every Backend op is called once here");
    let (c, g) = (cpu(), emu());
    for (name, run) in &table {
        let got = run(&g).unwrap_or_else(|e| panic!("{name} on GpuBackend<EmuGpu>: {e}"));
        let want = run(&c).unwrap_or_else(|e| panic!("{name} on the CPU: {e}"));
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!((a.shape(), a.dtype()), (b.shape(), b.dtype()), "{name} output {i}");
            assert_eq!(a.device(), g.device(), "{name} output {i} stays on the device");
            let bf16 = a.dtype() == DType::BF16 || BF16_COMPUTE.contains(name);
            let tol = if bf16 { BF16_TOL } else { F32_TOL };
            assert_rel_norm(&format!("{name} output {i}"), &down(&g, a), &vals(b), tol);
        }
    }
}

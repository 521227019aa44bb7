use super::*;
use steel_runtime::gpu::attention::{
    attention_kernels, delta_grid, dkdv_shared_bytes, dq_shared_bytes, fwd_shared_bytes, kv_grid,
    query_grid, ATTENTION_BLOCK, DELTA_BLOCK,
};
use steel_runtime::Error;

// ---- flash attention ----------------------------------------------------------------------------

/// One attention problem: `q [b, tq, hq, d]`, `k, v [b, tk, hkv, d]`.
#[derive(Clone, Copy, Debug)]
struct Problem {
    b: usize,
    tq: usize,
    tk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
}

/// Tolerances, ‖gpu − cpu‖ / ‖cpu‖ against the CPU's f32 attention of the same bf16 inputs:
/// - o and each gradient ≤ 1e-2 (DESIGN §4's bf16 bound: P and dS are rounded to bf16 for the
///   tensor cores, and so are o and dO where the backward reads them);
/// - lse ≤ 1e-5: the scores are exact products of bf16 values summed in f32, so only the order
///   of the sums and exp2f's last bits differ.
const LSE_TOL: f64 = 1e-5;

/// The increments `after − before` of an accumulated gradient.
fn increments(after: &[f64], before: &Tensor) -> Vec<f64> {
    after.iter().zip(vals(before)).map(|(a, b)| a - b).collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// `‖got − want‖ ≤ tol · max(‖want‖, floor)`: the relative norm, except that a gradient which
/// is zero in exact arithmetic (dq and dk when every query sees a single key: dS = P(dP − δ) = 0)
/// is held to `floor`, a fraction of a gradient that never vanishes.
fn assert_grad(what: &str, got: &[f64], want: &[f64], floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    let diff = norm(&got.iter().zip(want).map(|(g, w)| g - w).collect::<Vec<_>>());
    let scale = norm(want).max(floor);
    assert!(!diff.is_nan(), "{what}: NaN in the result");
    assert!(
        diff <= BF16_TOL * scale,
        "{what}: ‖got − want‖ / max(‖want‖, {floor:.2e}) = {:.3e} > {BF16_TOL:.1e}",
        diff / scale
    );
}

/// Forward on bf16 inputs and backward with an f32 `d_o` into random non-zero f32 gradients
/// (compared as increments, so an overwrite instead of `+=` fails),
/// against the CPU reference computed in f32 from the same bf16-rounded inputs (the CPU's own o
/// and lse). With `f32_inputs` the same problem also runs from f32 q/k/v/o: the kernels round
/// them to the same bf16 values, so o is the bf16 result before its rounding and the gradients
/// are bit-identical.
fn check_attention<G: TestGpu>(
    g: &GpuBackend<G>,
    pb: Problem,
    scale: f64,
    f32_inputs: bool,
    seed: u64,
) -> Outputs {
    let Problem { b, tq, tk, hq, hkv, d } = pb;
    let c = cpu();
    let (qs, ks) = ([b, tq, hq, d], [b, tk, hkv, d]);
    let q16 = rand_tensor_dt(&qs, DType::BF16, seed);
    let k16 = rand_tensor_dt(&ks, DType::BF16, seed ^ 1);
    let v16 = rand_tensor_dt(&ks, DType::BF16, seed ^ 2);
    let wide = |t: &Tensor| c.cast(t, DType::F32).unwrap();
    let (qf, kf, vf) = (wide(&q16), wide(&k16), wide(&v16));
    let (o_ref, lse_ref) = c.attention_fwd(&qf, &kf, &vf, scale).unwrap();

    let up = |t: &Tensor| g.upload(t).unwrap();
    let (gq, gk, gv) = (up(&q16), up(&k16), up(&v16));
    let (o, lse) = g.attention_fwd(&gq, &gk, &gv, scale).unwrap();
    assert_eq!((o.shape(), o.dtype()), (&qs[..], DType::BF16));
    assert_eq!((lse.shape(), lse.dtype()), (&[b, hq, tq][..], DType::F32));
    let what = format!("{pb:?}");
    assert_rel_norm(&format!("attention_fwd o {what}"), &down(g, &o), &vals(&o_ref), BF16_TOL);
    assert_rel_norm(&format!("attention_fwd lse {what}"), &down(g, &lse), &vals(&lse_ref), LSE_TOL);

    let d_o = f32_rand(&qs, seed ^ 3);
    let (dq0, dk0, dv0) =
        (f32_rand(&qs, seed ^ 4), f32_rand(&ks, seed ^ 5), f32_rand(&ks, seed ^ 6));
    let (cdq, cdk, cdv) = (c.copy(&dq0).unwrap(), c.copy(&dk0).unwrap(), c.copy(&dv0).unwrap());
    c.attention_bwd(&qf, &kf, &vf, &o_ref, &lse_ref, &d_o, scale, &cdq, &cdk, &cdv).unwrap();
    let (gdq, gdk, gdv) = (up(&dq0), up(&dk0), up(&dv0));
    let gd_o = up(&d_o);
    g.attention_bwd(&gq, &gk, &gv, &o, &lse, &gd_o, scale, &gdq, &gdk, &gdv).unwrap();
    // dV = Pᵀ dO never vanishes: 1e-4 of its norm is the floor of the others.
    let floor = 1e-4 * norm(&increments(&vals(&cdv), &dv0));
    for (name, got, want, before) in
        [("dq", &gdq, &cdq, &dq0), ("dk", &gdk, &cdk, &dk0), ("dv", &gdv, &cdv, &dv0)]
    {
        assert_grad(
            &format!("attention_bwd {name} {what}"),
            &increments(&down(g, got), before),
            &increments(&vals(want), before),
            floor,
        );
    }
    let mut outs: Outputs =
        [&o, &lse, &gdq, &gdk, &gdv].iter().map(|t| bits(&down(g, t))).collect();

    let ks = attention_kernels(d);
    let mut expected = vec![ks.fwd, "cast_f32_bf16", "attention_bwd_delta"];
    expected.extend(ks.kv);
    expected.push(ks.dq);
    if f32_inputs {
        // The same problem from f32 tensors: o is f32, and rounding it gives the bf16 o exactly.
        let (o32, lse32) = g.attention_fwd(&up(&qf), &up(&kf), &up(&vf), scale).unwrap();
        assert_eq!(o32.dtype(), DType::F32);
        let o32_16 = c.cast(&g.download(&o32).unwrap(), DType::BF16).unwrap();
        assert_eq!(bits(&vals(&o32_16)), bits(&down(g, &o)), "f32 inputs: o rounds to the bf16 o");
        assert_eq!(bits(&down(g, &lse32)), bits(&down(g, &lse)), "f32 inputs: the same lse");
        let (dq2, dk2, dv2) = (up(&dq0), up(&dk0), up(&dv0));
        let o_wide = up(&c.cast(&g.download(&o).unwrap(), DType::F32).unwrap());
        let (q2, k2, v2) = (up(&qf), up(&kf), up(&vf));
        g.attention_bwd(&q2, &k2, &v2, &o_wide, &lse, &gd_o, scale, &dq2, &dk2, &dv2).unwrap();
        for (name, a, b) in [("dq", &dq2, &gdq), ("dk", &dk2, &gdk), ("dv", &dv2, &gdv)] {
            assert_eq!(bits(&down(g, a)), bits(&down(g, b)), "f32 inputs: the same {name}");
        }
        outs.push(bits(&down(g, &o32)));
        expected.extend(["cast_f32_bf16"; 3]);
        expected.push(ks.fwd);
        expected.extend(["cast_f32_bf16"; 5]);
        expected.push("attention_bwd_delta");
        expected.extend(ks.kv);
        expected.push(ks.dq);
    }

    let Some(log) = g.gpu().launch_log() else { return outs };
    assert_eq!(symbols(&log), expected);
    let block = Dim3::x(ATTENTION_BLOCK);
    let n_kv = ks.kv.len();
    let (fwd, delta, dkdv, dq) = (&log[0], &log[2], &log[3], &log[3 + n_kv]);
    assert_eq!((fwd.grid, fwd.block), (query_grid(b, tq, hq).unwrap(), block));
    assert_eq!(fwd.shared_bytes as usize, fwd_shared_bytes(d));
    assert_eq!((delta.grid, delta.block), (Dim3::x(delta_grid(b * tq * hq)), Dim3::x(DELTA_BLOCK)));
    assert_eq!((dkdv.grid, dkdv.block), (kv_grid(b, tk, hkv).unwrap(), block));
    assert_eq!(dkdv.shared_bytes as usize, dkdv_shared_bytes(d));
    assert_eq!((dq.grid, dq.block), (query_grid(b, tq, hq).unwrap(), block));
    assert_eq!(dq.shared_bytes as usize, dq_shared_bytes(d));
    assert_eq!((fwd.nvtx.as_str(), dq.nvtx.as_str()), ("attention_fwd", "attention_bwd"));
    outs
}

/// Refusals: a head_dim the kernels do not take (not a multiple of 8, above 128), mixed q/k
/// dtypes, bf16 gradients, a wrong lse.
fn check_attention_errors<G: TestGpu>(g: &GpuBackend<G>) {
    let up = |t: Tensor| g.upload(&t).unwrap();
    let r16 = |shape: &[usize], seed| up(rand_tensor_dt(shape, DType::BF16, seed));
    for d in [12, 136] {
        let (q, k) = (r16(&[1, 2, 2, d], 1), r16(&[1, 2, 1, d], 2));
        let r = g.attention_fwd(&q, &k, &k, 0.3);
        assert!(matches!(&r, Err(Error::Shape { op: "attention_fwd", .. })), "{r:?}");
        assert!(r.unwrap_err().to_string().contains("multiple of 8"));
    }
    let (q, k, v) = (r16(&[1, 3, 2, 8], 3), r16(&[1, 3, 1, 8], 4), r16(&[1, 3, 1, 8], 5));
    let r = g.attention_fwd(&q, &up(f32_rand(&[1, 3, 1, 8], 6)), &v, 0.3);
    assert!(matches!(r, Err(Error::DType { op: "attention_fwd", .. })), "{r:?}");
    let r = g.attention_fwd(&q, &r16(&[1, 2, 1, 8], 7), &r16(&[1, 2, 1, 8], 8), 0.3);
    assert!(matches!(r, Err(Error::Shape { op: "attention_fwd", .. })), "Tq > Tk: {r:?}");
    let (o, lse) = g.attention_fwd(&q, &k, &v, 0.3).unwrap();
    let d_o = up(f32_rand(&[1, 3, 2, 8], 9));
    let (dq, dk, dv) = (
        up(f32_rand(&[1, 3, 2, 8], 10)),
        up(f32_rand(&[1, 3, 1, 8], 11)),
        up(f32_rand(&[1, 3, 1, 8], 12)),
    );
    let r = g.attention_bwd(&q, &k, &v, &o, &lse, &d_o, 0.3, &r16(&[1, 3, 2, 8], 13), &dk, &dv);
    assert!(matches!(r, Err(Error::DType { op: "attention_bwd", .. })), "bf16 dq: {r:?}");
    let r =
        g.attention_bwd(&q, &k, &v, &o, &up(f32_rand(&[1, 2, 2], 14)), &d_o, 0.3, &dq, &dk, &dv);
    assert!(matches!(r, Err(Error::Shape { op: "attention_bwd", .. })), "lse shape: {r:?}");
    let r = g.attention_bwd(&q, &k, &v, &o, &lse, &d_o, 0.3, &dq, &dk, &dk);
    assert!(r.is_err(), "dk and dv are the same buffer: {r:?}");
}

/// The shapes: T = 1, 7, 63, 65, 200; Tq < Tk (decoding); GQA 32/8 and MQA; head_dim
/// 56 (the model's), 64, 8, 128 and 24 (padded by 8).
const FIXED: [(Problem, f64); 9] = [
    (Problem { b: 1, tq: 1, tk: 1, hq: 2, hkv: 1, d: 8 }, 0.35),
    (Problem { b: 2, tq: 7, tk: 7, hq: 4, hkv: 4, d: 64 }, 0.125),
    (Problem { b: 2, tq: 63, tk: 63, hq: 3, hkv: 1, d: 56 }, 0.1336),
    (Problem { b: 1, tq: 65, tk: 65, hq: 4, hkv: 2, d: 56 }, 0.1336),
    (Problem { b: 1, tq: 200, tk: 200, hq: 32, hkv: 8, d: 56 }, 0.1336),
    (Problem { b: 1, tq: 5, tk: 70, hq: 4, hkv: 1, d: 56 }, 0.1336),
    (Problem { b: 1, tq: 1, tk: 129, hq: 2, hkv: 2, d: 128 }, 0.0884),
    (Problem { b: 1, tq: 33, tk: 100, hq: 3, hkv: 3, d: 24 }, 0.2),
    (Problem { b: 1, tq: 70, tk: 70, hq: 2, hkv: 1, d: 56 }, -0.3),
];

#[test]
fn emu_attention_fixed_cases() {
    for (i, (pb, scale)) in FIXED.into_iter().enumerate() {
        on_two_schedules(i as u64, |g| check_attention(g, pb, scale, i % 2 == 0, 90 + i as u64));
    }
    check_attention_errors(&emu());
}

#[test]
fn cuda_attention_fixed_cases() {
    if let Some(g) = cuda() {
        for (i, (pb, scale)) in FIXED.into_iter().enumerate() {
            check_attention(&g, pb, scale, i % 2 == 0, 90 + i as u64);
        }
        check_attention_errors(&g);
    }
}

fn problem(b: usize, tk: usize, tq_frac: f64, hkv: usize, rep: usize, d8: usize) -> Problem {
    let tq = ((tk as f64 * tq_frac).ceil() as usize).clamp(1, tk);
    Problem { b, tq, tk, hq: hkv * rep, hkv, d: 8 * d8 }
}

proptest! {
    #![proptest_config(proptest_config(16))]

    #[test]
    fn emu_attention_fwd_bwd_matches_cpu(b in 1..=2usize, tk in 1..=140usize, tq_frac in 0.0..=1.0f64, full in any::<bool>(), hkv in 1..=2usize, rep in 1..=3usize, d8 in 1..=16usize, seed in any::<u64>()) {
        let pb = problem(b, tk, if full { 1.0 } else { tq_frac }, hkv, rep, d8);
        let scale = 1.0 / (pb.d as f64).sqrt();
        on_two_schedules(seed, |g| check_attention(g, pb, scale, false, seed));
    }

    #[test]
    fn cuda_attention_fwd_bwd_matches_cpu(b in 1..=2usize, tk in 1..=140usize, tq_frac in 0.0..=1.0f64, full in any::<bool>(), hkv in 1..=2usize, rep in 1..=3usize, d8 in 1..=16usize, seed in any::<u64>()) {
        if let Some(g) = cuda() {
            let pb = problem(b, tk, if full { 1.0 } else { tq_frac }, hkv, rep, d8);
            check_attention(&g, pb, 1.0 / (pb.d as f64).sqrt(), true, seed);
        }
    }
}

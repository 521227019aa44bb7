use super::softmax::scaled_rand;
use super::*;
use steel_runtime::gpu::soft_moe::{per_row, slot_symbol, tok2slot_grid, token_warps};
use steel_runtime::{Error, SoftMoeRoute};

// ---- the soft-MoE routing and mixes -----------------------------------------------------------------

/// The increments `after − before` of an accumulated gradient.
fn increments(after: &[f64], before: &Tensor) -> Vec<f64> {
    after.iter().zip(vals(before)).map(|(a, b)| a - b).collect()
}

/// The kernel of a slot-templated stem for `s` slots.
fn sym(stem: &str, s: usize) -> String {
    format!("{stem}_s{}", if s <= 8 { 8 } else { 32 })
}

/// The whole soft-MoE op set at `[b, t, d]` with `s` slots, f32, against the CPU:
/// - the routing forward from x (values ±[0.1, 1] scaled by `xscale`: large values make the
///   dispatch softmax over the tokens peaked), phi and a scale of 1.3; every output compared;
/// - each mix forward and backward from the CPU's routing (the same inputs on both sides), the
///   routing backward from random output gradients, every accumulated gradient starting from
///   random non-zero values and compared as increments (an overwrite fails).
///
/// Tolerance: ‖gpu − cpu‖ / ‖cpu‖ ≤ 1e-5 (F32_TOL) for every output and gradient; dscale (one
/// cancelling sum) to 1e-5 of the larger of itself and the sum of its terms' magnitudes.
pub(super) fn check_soft_moe<G: TestGpu>(
    g: &GpuBackend<G>,
    [b, t, d, s]: [usize; 4],
    xscale: f64,
    seed: u64,
) -> Outputs {
    let c = cpu();
    let what = format!("soft-MoE b{b} t{t} d{d} s{s}");
    let f = DType::F32;
    let up = |t: &Tensor| g.upload(t).unwrap();
    let x = scaled_rand(&[b, t, d], f, xscale, 0.0, seed);
    let phi = f32_rand(&[d, s], seed ^ 1);
    let scale = Tensor::from_f64(&[1.3], &[1], f).unwrap();
    let rc = c.soft_moe_route_fwd(&x, &phi, &scale, 1e-12).unwrap();
    let rg = g.soft_moe_route_fwd(&up(&x), &up(&phi), &up(&scale), 1e-12).unwrap();
    let mut outs = Vec::new();
    for (name, got, want) in [
        ("xn", &rg.xn, &rc.xn),
        ("x_norm", &rg.x_norm, &rc.x_norm),
        ("phi_norm", &rg.phi_norm, &rc.phi_norm),
        ("dispatch", &rg.dispatch, &rc.dispatch),
        ("combine", &rg.combine, &rc.combine),
    ] {
        assert_eq!((got.shape(), got.dtype()), (want.shape(), f), "{what}: {name}");
        let v = down(g, got);
        assert_rel_norm(&format!("{what}: route {name}"), &v, &vals(want), F32_TOL);
        outs.push(bits(&v));
    }

    // The mixes, forward, from the CPU's routing.
    let (gxn, gdisp, gcomb) = (up(&rc.xn), up(&rc.dispatch), up(&rc.combine));
    let slots = g.soft_moe_dispatch_fwd(&gdisp, &gxn).unwrap();
    let slots_ref = c.soft_moe_dispatch_fwd(&rc.dispatch, &rc.xn).unwrap();
    assert_eq!(slots.shape(), [b, s, d]);
    let v = down(g, &slots);
    assert_rel_norm(&format!("{what}: dispatch_fwd"), &v, &vals(&slots_ref), F32_TOL);
    outs.push(bits(&v));
    let ys = f32_rand(&[b, s, d], seed ^ 2);
    let y = g.soft_moe_combine_fwd(&gcomb, &up(&ys)).unwrap();
    let y_ref = c.soft_moe_combine_fwd(&rc.combine, &ys).unwrap();
    assert_eq!(y.shape(), [b, t, d]);
    let v = down(g, &y);
    assert_rel_norm(&format!("{what}: combine_fwd"), &v, &vals(&y_ref), F32_TOL);
    outs.push(bits(&v));

    // The backward ops into random non-zero gradients.
    let small = |shape: &[usize], k: u64| scaled_rand(shape, f, 1e-2, 0.0, seed ^ k);
    let dy = f32_rand(&[b, t, d], seed ^ 3);
    let (dcomb0, dys0) = (small(&[b, t, s], 4), small(&[b, s, d], 5));
    let (gdc, gdys) = (up(&dcomb0), up(&dys0));
    g.soft_moe_combine_bwd(&gcomb, &up(&ys), &up(&dy), &gdc, &gdys).unwrap();
    let (cdc, cdys) = (dcomb0.deep_copy().unwrap(), dys0.deep_copy().unwrap());
    c.soft_moe_combine_bwd(&rc.combine, &ys, &dy, &cdc, &cdys).unwrap();
    let d_slots = f32_rand(&[b, s, d], seed ^ 6);
    let (ddisp0, dxn0) = (small(&[b, t, s], 7), small(&[b, t, d], 8));
    let (gdd, gdxn) = (up(&ddisp0), up(&dxn0));
    g.soft_moe_dispatch_bwd(&gdisp, &gxn, &up(&d_slots), &gdd, &gdxn).unwrap();
    let (cdd, cdxn) = (ddisp0.deep_copy().unwrap(), dxn0.deep_copy().unwrap());
    c.soft_moe_dispatch_bwd(&rc.dispatch, &rc.xn, &d_slots, &cdd, &cdxn).unwrap();
    // The routing backward from the CPU's saved routing and random output gradients.
    let (g_xn, g_d, g_c) = (
        f32_rand(&[b, t, d], seed ^ 9),
        f32_rand(&[b, t, s], seed ^ 10),
        f32_rand(&[b, t, s], seed ^ 11),
    );
    let (dx0, dphi0, ds0) = (small(&[b, t, d], 12), small(&[d, s], 13), small(&[1], 14));
    let route_g = SoftMoeRoute {
        xn: gxn.clone(),
        x_norm: up(&rc.x_norm),
        phi_norm: up(&rc.phi_norm),
        dispatch: gdisp.clone(),
        combine: gcomb.clone(),
    };
    let (gdx, gdphi, gds) = (up(&dx0), up(&dphi0), up(&ds0));
    g.soft_moe_route_bwd(
        &route_g,
        &up(&phi),
        &up(&scale),
        &up(&g_xn),
        &up(&g_d),
        &up(&g_c),
        1e-12,
        &gdx,
        &gdphi,
        &gds,
    )
    .unwrap();
    let (cdx, cdphi, cds) =
        (dx0.deep_copy().unwrap(), dphi0.deep_copy().unwrap(), ds0.deep_copy().unwrap());
    c.soft_moe_route_bwd(&rc, &phi, &scale, &g_xn, &g_d, &g_c, 1e-12, &cdx, &cdphi, &cds).unwrap();
    // dscale is one sum over every token and slot that cancels (Σ_{t,s} dL L / scale): its f32
    // error is relative to the sum of its terms' magnitudes, not to the small result.
    let (gds_v, cds_v) = (down(g, &gds)[0] - vals(&ds0)[0], vals(&cds)[0] - vals(&ds0)[0]);
    let mag = dscale_magnitude([b, t, d, s], &rc, &phi, &g_d, &g_c);
    assert!(
        (gds_v - cds_v).abs() <= F32_TOL * cds_v.abs().max(mag),
        "{what}: route_bwd dscale {gds_v} vs {cds_v} (Σ|terms| {mag:.3e})"
    );
    outs.push(bits(&down(g, &gds)));
    for (name, got, want, before) in [
        ("combine_bwd d_combine", &gdc, &cdc, &dcomb0),
        ("combine_bwd d_ys", &gdys, &cdys, &dys0),
        ("dispatch_bwd d_dispatch", &gdd, &cdd, &ddisp0),
        ("dispatch_bwd d_xn", &gdxn, &cdxn, &dxn0),
        ("route_bwd dx", &gdx, &cdx, &dx0),
        ("route_bwd dphi", &gdphi, &cdphi, &dphi0),
    ] {
        let v = down(g, got);
        assert_rel_norm(
            &format!("{what}: {name}"),
            &increments(&v, before),
            &increments(&vals(want), before),
            F32_TOL,
        );
        outs.push(bits(&v));
    }

    let Some(log) = g.gpu().launch_log() else { return outs };
    let n = b * t;
    let expect = [
        ("soft_moe_phi_norm".to_string(), (Dim3::x(1), Dim3::x(256))),
        (sym("soft_moe_logits", s), (token_warps("", n).unwrap().grid, Dim3::x(256))),
        (sym("soft_moe_softmax", s), (per_row("", b).unwrap().grid, Dim3::x(256))),
        (sym("soft_moe_tok2slot", s), (tok2slot_grid("", d, b).unwrap().grid, Dim3::xy(32, 8))),
        (sym("soft_moe_mix_tokens", s), (token_warps("", n).unwrap().grid, Dim3::x(256))),
        (sym("soft_moe_mix_tokens", s), (token_warps("", n).unwrap().grid, Dim3::x(256))),
        (sym("soft_moe_tok2slot", s), (tok2slot_grid("", d, b).unwrap().grid, Dim3::xy(32, 8))),
        (sym("soft_moe_mix_tokens", s), (token_warps("", n).unwrap().grid, Dim3::x(256))),
        (sym("soft_moe_route_colsum", s), (per_row("", b).unwrap().grid, Dim3::x(256))),
        (sym("soft_moe_route_bwd", s), (token_warps("", n).unwrap().grid, Dim3::x(256))),
        (sym("soft_moe_tok2slot", s), (tok2slot_grid("", d, b).unwrap().grid, Dim3::xy(32, 8))),
        ("soft_moe_phi_bwd".to_string(), (Dim3::x(1), Dim3::x(256))),
    ];
    let got: Vec<_> = log.iter().map(|r| (r.symbol.to_string(), (r.grid, r.block))).collect();
    assert_eq!(got, expect, "{what}: the launches");
    outs
}

/// `Σ_{t,s} |dL[t,s] · L[t,s] / scale|` in f64 from the CPU's routing: the terms of dscale
/// (`dL = D ⊙ (dD − Σ_t D ⊙ dD) + C ⊙ (dC − Σ_s C ⊙ dC)`, `L / scale = X̂ · Φ / ‖Φ‖`).
fn dscale_magnitude(
    [b, t, d, s]: [usize; 4],
    r: &SoftMoeRoute,
    phi: &Tensor,
    gd: &Tensor,
    gc: &Tensor,
) -> f64 {
    let (xn, ph, dd, cc, gd, gc) =
        (vals(&r.xn), vals(phi), vals(&r.dispatch), vals(&r.combine), vals(gd), vals(gc));
    let pn: Vec<f64> =
        (0..s).map(|j| (0..d).map(|c| ph[c * s + j].powi(2)).sum::<f64>().sqrt()).collect();
    let mut mag = 0.0;
    for bi in 0..b {
        let cs: Vec<f64> = (0..s)
            .map(|j| (0..t).map(|i| dd[(bi * t + i) * s + j] * gd[(bi * t + i) * s + j]).sum())
            .collect();
        for i in 0..t {
            let o = (bi * t + i) * s;
            let rs: f64 = (0..s).map(|j| cc[o + j] * gc[o + j]).sum();
            for j in 0..s {
                let dl = dd[o + j] * (gd[o + j] - cs[j]) + cc[o + j] * (gc[o + j] - rs);
                let l: f64 =
                    (0..d).map(|c| xn[(bi * t + i) * d + c] * ph[c * s + j]).sum::<f64>() / pn[j];
                mag += (dl * l).abs();
            }
        }
    }
    mag
}

/// The model's widths and lengths, and the edges: d = 1,792 (7 columns per lane), T = 2,048
/// tokens per row (the dispatch softmax over a long column), 6 slots (the reference's n·p), one
/// token, one slot, 13 slots (the `_s32` kernels), ragged sizes (not multiples of 8 or 32),
/// large inputs (peaked dispatch weights).
const FIXED: &[([usize; 4], f64)] = &[
    ([2, 9, 1792, 6], 1.0),
    ([1, 2048, 24, 6], 1.0),
    ([3, 37, 45, 5], 1.0),
    ([2, 1, 33, 6], 1.0),
    ([1, 11, 7, 1], 1.0),
    ([2, 19, 40, 13], 1.0),
    ([2, 50, 29, 6], 30.0),
];

#[test]
fn emu_soft_moe_fixed_cases() {
    for (i, &(dims, xscale)) in FIXED.iter().enumerate() {
        on_two_schedules(40 + i as u64, |g| check_soft_moe(g, dims, xscale, 40 + i as u64));
    }
}

#[test]
fn cuda_soft_moe_fixed_cases() {
    if let Some(g) = cuda() {
        for (i, &(dims, xscale)) in FIXED.iter().enumerate() {
            check_soft_moe(&g, dims, xscale, 40 + i as u64);
        }
        check_soft_moe(&g, [8, 2048, 1792, 6], 1.0, 99);
    }
}

proptest! {
    #![proptest_config(proptest_config(6))]

    #[test]
    fn emu_soft_moe_random_shapes(b in 1..=3usize, t in 1..=70usize, d in 1..=80usize,
                                  s in 1..=20usize, seed in any::<u64>()) {
        on_two_schedules(seed, |g| check_soft_moe(g, [b, t, d, s], 1.0, seed));
    }
}

/// Shapes that do not fit, dtypes the GPU routing does not take, and more slots than the kernels
/// hold are errors naming the op.
#[test]
fn emu_soft_moe_refuses_bad_operands() {
    let g = emu();
    let up = |t: Tensor| g.upload(&t).unwrap();
    let x = up(f32_rand(&[2, 5, 8], 1));
    let sc = up(f32_rand(&[1], 2));
    let bad_phi = up(f32_rand(&[7, 3], 3));
    let err = g.soft_moe_route_fwd(&x, &bad_phi, &sc, 1e-12).unwrap_err();
    assert!(matches!(err, Error::Shape { op: "soft_moe_route_fwd", .. }), "{err}");
    let wide = up(f32_rand(&[8, 33], 4));
    let err = g.soft_moe_route_fwd(&x, &wide, &sc, 1e-12).unwrap_err();
    assert!(err.to_string().contains("33 slots"), "{err}");
    let x16 = up(rand_tensor_dt(&[2, 5, 8], DType::BF16, 5));
    let err = g.soft_moe_route_fwd(&x16, &up(f32_rand(&[8, 3], 6)), &sc, 1e-12).unwrap_err();
    assert!(matches!(err, Error::DType { op: "soft_moe_route_fwd", .. }), "{err}");
    let w = up(f32_rand(&[2, 5, 3], 7));
    let err = g.soft_moe_combine_fwd(&w, &up(f32_rand(&[2, 4, 8], 8))).unwrap_err();
    assert!(matches!(err, Error::Shape { op: "soft_moe_combine_fwd", .. }), "{err}");
    assert_eq!(slot_symbol("t", ["a", "b"], 8).unwrap(), "a");
    assert_eq!(slot_symbol("t", ["a", "b"], 9).unwrap(), "b");
    assert!(slot_symbol("t", ["a", "b"], 0).is_err());
}

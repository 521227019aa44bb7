//! The soft-MoE routing and mixes on the GPU (`kernels-cu/soft_moe.cu`; reference
//! `cpu/soft_moe.rs`): the parameter structs, launch configurations, launchers and the
//! `GpuBackend` ops. Every value is F32 (the routing stays fp32 under bf16 mixed precision).
//!
//! Launches: the routing forward is `soft_moe_phi_norm` (one block), `soft_moe_logits` (a warp
//! per token) and `soft_moe_softmax` (a block per row); each mix is one kernel forward
//! (`soft_moe_tok2slot` for the dispatch, `soft_moe_mix_tokens` for the combine); the dispatch
//! backward is one `mix_tokens`, the combine backward a `mix_tokens` and a `tok2slot`; the routing
//! backward is `soft_moe_route_colsum`, `soft_moe_route_bwd`, a `tok2slot` for `X̂ᵀ dL` per row and
//! `soft_moe_phi_bwd` (one block). The slot-templated kernels come in two bounds, `_s8` (S ≤ 8,
//! the reference model's 6) and `_s32`; more than 32 slots is refused.

use super::backend::{distinct, GpuBackend};
use super::launch::{dptr, grid_x, grid_y, launch, workspace};
use super::{DevicePtr, Dim3, Gpu, LaunchConfig, NvtxRange};
use crate::backend::SoftMoeRoute;
use crate::cpu::soft_moe::{mix_dims, route_bwd_dims, route_bwd_inputs, route_dims, MoeDims};
use crate::{DType, Error, Result, Tensor};
use bytemuck::{Pod, Zeroable};
use std::sync::Arc;

/// `MOE_THREADS`: threads per block of every soft-MoE kernel (8 warps).
pub const THREADS: u32 = 256;
/// `MOE_WARPS`: tokens per block of the warp-per-token kernels, and token phases of `tok2slot`.
pub const WARPS: usize = 8;
/// `MOE_TILE`: columns per block of `tok2slot`.
pub const TILE: usize = 32;
/// The largest slot count the kernels take.
pub const MAX_SLOTS: usize = 32;

// ---- parameter structs (mirrors of soft_moe.cu) --------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MoePhiNormParams {
    phi: DevicePtr,
    phi_norm: DevicePtr,
    d: u64,
    slots: u64,
}
const _: () = assert!(std::mem::size_of::<MoePhiNormParams>() == 32);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MoeLogitsParams {
    x: DevicePtr,
    phi: DevicePtr,
    scale: DevicePtr,
    phi_norm: DevicePtr,
    xn: DevicePtr,
    x_norm: DevicePtr,
    logits: DevicePtr,
    tokens: u64,
    d: u64,
    slots: u64,
    eps: f32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<MoeLogitsParams>() == 88);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MoeSoftmaxParams {
    logits: DevicePtr,
    dispatch: DevicePtr,
    combine: DevicePtr,
    t: u64,
    slots: u64,
}
const _: () = assert!(std::mem::size_of::<MoeSoftmaxParams>() == 40);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MoeTok2SlotParams {
    w: DevicePtr,
    x: DevicePtr,
    out: DevicePtr,
    t: u64,
    d: u64,
    slots: u64,
    accumulate: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<MoeTok2SlotParams>() == 56);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MoeMixTokensParams {
    w: DevicePtr,
    y: DevicePtr,
    a: DevicePtr,
    out: DevicePtr,
    dw: DevicePtr,
    tokens: u64,
    t: u64,
    d: u64,
    slots: u64,
    accumulate: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<MoeMixTokensParams>() == 80);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MoeColsumParams {
    a: DevicePtr,
    b: DevicePtr,
    out: DevicePtr,
    t: u64,
    slots: u64,
}
const _: () = assert!(std::mem::size_of::<MoeColsumParams>() == 40);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MoeRouteBwdParams {
    xn: DevicePtr,
    x_norm: DevicePtr,
    phi: DevicePtr,
    phi_norm: DevicePtr,
    scale: DevicePtr,
    dispatch: DevicePtr,
    combine: DevicePtr,
    d_xn: DevicePtr,
    d_dispatch: DevicePtr,
    d_combine: DevicePtr,
    colsum: DevicePtr,
    dl: DevicePtr,
    dx: DevicePtr,
    tokens: u64,
    t: u64,
    d: u64,
    slots: u64,
    eps: f32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<MoeRouteBwdParams>() == 144);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MoePhiBwdParams {
    part: DevicePtr,
    phi: DevicePtr,
    phi_norm: DevicePtr,
    scale: DevicePtr,
    dphi: DevicePtr,
    dscale: DevicePtr,
    rows: u64,
    d: u64,
    slots: u64,
    eps: f32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<MoePhiBwdParams>() == 80);

// ---- launch configurations ------------------------------------------------------------------------

/// The kernel of `stem` compiled for `s` slots: `<stem>_s8` or `<stem>_s32`.
pub fn slot_symbol(op: &'static str, stems: [&'static str; 2], s: usize) -> Result<&'static str> {
    match s {
        1..=8 => Ok(stems[0]),
        9..=MAX_SLOTS => Ok(stems[1]),
        _ => Err(Error::invalid(
            op,
            format!("{s} slots: the GPU soft-MoE kernels take 1 ..= {MAX_SLOTS}"),
        )),
    }
}

/// Refuses a slot count no kernel is compiled for (before anything is allocated).
fn check_slots(op: &'static str, s: usize) -> Result<()> {
    slot_symbol(op, ["", ""], s).map(drop)
}

/// One warp per token, `WARPS` tokens per block.
pub fn token_warps(op: &'static str, tokens: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid: Dim3::x(grid_x(op, tokens.div_ceil(WARPS))?),
        block: Dim3::x(THREADS),
        shared_bytes: 0,
    })
}

/// One block per row (`groups` of them).
pub fn per_row(op: &'static str, groups: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid: Dim3::x(grid_x(op, groups)?),
        block: Dim3::x(THREADS),
        shared_bytes: 0,
    })
}

/// `tok2slot`: `TILE` columns × `WARPS` token phases per block, grid (⌈d / TILE⌉, groups).
pub fn tok2slot_grid(op: &'static str, d: usize, groups: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid: Dim3::xy(grid_x(op, d.div_ceil(TILE))?, grid_y(op, groups)?),
        block: Dim3::xy(TILE as u32, WARPS as u32),
        shared_bytes: 0,
    })
}

const ONE_BLOCK: LaunchConfig =
    LaunchConfig { grid: Dim3::x(1), block: Dim3::x(THREADS), shared_bytes: 0 };

fn f32_tensor(op: &'static str, name: &str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(Error::dtype(
            op,
            t.dtype(),
            format!("{name}: the soft-MoE routing runs in F32 on the GPU"),
        ));
    }
    Ok(())
}

// ---- launchers ------------------------------------------------------------------------------------

/// `out[g, s, c] (+)= Σ_t w[g, t, s] · x[g, t, c]` for `groups` rows of `t` tokens.
#[allow(clippy::too_many_arguments)]
fn launch_tok2slot<G: Gpu>(
    gpu: &Arc<G>,
    op: &'static str,
    w: DevicePtr,
    x: DevicePtr,
    out: DevicePtr,
    m: MoeDims,
    accumulate: bool,
) -> Result<()> {
    let MoeDims { b, t, d, s } = m;
    let p = MoeTok2SlotParams {
        w,
        x,
        out,
        t: t as u64,
        d: d as u64,
        slots: s as u64,
        accumulate: accumulate as u32,
        pad: 0,
    };
    let sym = slot_symbol(op, ["soft_moe_tok2slot_s8", "soft_moe_tok2slot_s32"], s)?;
    launch(gpu.as_ref(), sym, tok2slot_grid(op, d, b)?, &p)
}

/// `out (+)= w · y` per token and/or `dw += a · yᵀ` per token (pointers 0 where unused).
#[allow(clippy::too_many_arguments)]
fn launch_mix_tokens<G: Gpu>(
    gpu: &Arc<G>,
    op: &'static str,
    w: DevicePtr,
    y: DevicePtr,
    a: DevicePtr,
    out: DevicePtr,
    dw: DevicePtr,
    m: MoeDims,
    accumulate: bool,
) -> Result<()> {
    let MoeDims { b, t, d, s } = m;
    let p = MoeMixTokensParams {
        w,
        y,
        a,
        out,
        dw,
        tokens: (b * t) as u64,
        t: t as u64,
        d: d as u64,
        slots: s as u64,
        accumulate: accumulate as u32,
        pad: 0,
    };
    let sym = slot_symbol(op, ["soft_moe_mix_tokens_s8", "soft_moe_mix_tokens_s32"], s)?;
    launch(gpu.as_ref(), sym, token_warps(op, b * t)?, &p)
}

// ---- the GpuBackend ops -----------------------------------------------------------------------

pub(super) fn soft_moe_route_fwd<G: Gpu>(
    be: &GpuBackend<G>,
    x: &Tensor,
    phi: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> Result<SoftMoeRoute> {
    const OP: &str = "soft_moe_route_fwd";
    be.on_device(OP, &[x, phi, scale])?;
    let m = route_dims(OP, x, phi, scale)?;
    let MoeDims { b, t, d, s } = m;
    for (name, v) in [("x", x), ("phi", phi), ("scale", scale)] {
        f32_tensor(OP, name, v)?;
    }
    check_slots(OP, s)?;
    let gpu = be.gpu();
    let f = DType::F32;
    let n = b * t;
    let route = SoftMoeRoute {
        xn: be.empty(&[b, t, d], f)?,
        x_norm: be.empty(&[b, t], f)?,
        phi_norm: be.empty(&[s], f)?,
        dispatch: be.empty(&[b, t, s], f)?,
        combine: be.empty(&[b, t, s], f)?,
    };
    let logits = workspace(gpu, n * s * 4)?;
    let (xp, pp, sp) =
        (dptr(gpu, OP, x, f, n * d)?, dptr(gpu, OP, phi, f, d * s)?, dptr(gpu, OP, scale, f, 1)?);
    let pn = dptr(gpu, OP, &route.phi_norm, f, s)?;
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let p = MoePhiNormParams { phi: pp, phi_norm: pn, d: d as u64, slots: s as u64 };
    launch(gpu.as_ref(), "soft_moe_phi_norm", ONE_BLOCK, &p)?;
    let p = MoeLogitsParams {
        x: xp,
        phi: pp,
        scale: sp,
        phi_norm: pn,
        xn: dptr(gpu, OP, &route.xn, f, n * d)?,
        x_norm: dptr(gpu, OP, &route.x_norm, f, n)?,
        logits: logits.ptr(),
        tokens: n as u64,
        d: d as u64,
        slots: s as u64,
        eps: eps as f32,
        pad: 0,
    };
    let sym = slot_symbol(OP, ["soft_moe_logits_s8", "soft_moe_logits_s32"], s)?;
    launch(gpu.as_ref(), sym, token_warps(OP, n)?, &p)?;
    let p = MoeSoftmaxParams {
        logits: logits.ptr(),
        dispatch: dptr(gpu, OP, &route.dispatch, f, n * s)?,
        combine: dptr(gpu, OP, &route.combine, f, n * s)?,
        t: t as u64,
        slots: s as u64,
    };
    let sym = slot_symbol(OP, ["soft_moe_softmax_s8", "soft_moe_softmax_s32"], s)?;
    launch(gpu.as_ref(), sym, per_row(OP, b)?, &p)?;
    Ok(route)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn soft_moe_route_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    r: &SoftMoeRoute,
    phi: &Tensor,
    scale: &Tensor,
    d_xn: &Tensor,
    d_dispatch: &Tensor,
    d_combine: &Tensor,
    eps: f64,
    dx: &Tensor,
    dphi: &Tensor,
    dscale: &Tensor,
) -> Result<()> {
    const OP: &str = "soft_moe_route_bwd";
    let ins = route_bwd_inputs(r, phi, scale, d_xn, d_dispatch, d_combine);
    be.on_device(OP, &ins)?;
    be.on_device(OP, &[dx, dphi, dscale])?;
    let m = route_bwd_dims(OP, r, phi, scale, d_xn, d_dispatch, d_combine, dx, dphi, dscale)?;
    let MoeDims { b, t, d, s } = m;
    let gpu = be.gpu();
    let f = DType::F32;
    let n = b * t;
    let p = |t: &Tensor, numel: usize| dptr(gpu, OP, t, f, numel);
    let (xn, dd, cc) = (p(&r.xn, n * d)?, p(&r.dispatch, n * s)?, p(&r.combine, n * s)?);
    let (pp, pn, sp) = (p(phi, d * s)?, p(&r.phi_norm, s)?, p(scale, 1)?);
    let (gd, gc) = (p(d_dispatch, n * s)?, p(d_combine, n * s)?);
    let colsum = workspace(gpu, b * s * 4)?;
    let dl = workspace(gpu, n * s * 4)?;
    let part = workspace(gpu, b * s * d * 4)?;
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let c = MoeColsumParams { a: dd, b: gd, out: colsum.ptr(), t: t as u64, slots: s as u64 };
    let sym = slot_symbol(OP, ["soft_moe_route_colsum_s8", "soft_moe_route_colsum_s32"], s)?;
    launch(gpu.as_ref(), sym, per_row(OP, b)?, &c)?;
    let q = MoeRouteBwdParams {
        xn,
        x_norm: p(&r.x_norm, n)?,
        phi: pp,
        phi_norm: pn,
        scale: sp,
        dispatch: dd,
        combine: cc,
        d_xn: p(d_xn, n * d)?,
        d_dispatch: gd,
        d_combine: gc,
        colsum: colsum.ptr(),
        dl: dl.ptr(),
        dx: p(dx, n * d)?,
        tokens: n as u64,
        t: t as u64,
        d: d as u64,
        slots: s as u64,
        eps: eps as f32,
        pad: 0,
    };
    let sym = slot_symbol(OP, ["soft_moe_route_bwd_s8", "soft_moe_route_bwd_s32"], s)?;
    launch(gpu.as_ref(), sym, token_warps(OP, n)?, &q)?;
    launch_tok2slot(gpu, OP, dl.ptr(), xn, part.ptr(), m, false)?;
    let q = MoePhiBwdParams {
        part: part.ptr(),
        phi: pp,
        phi_norm: pn,
        scale: sp,
        dphi: p(dphi, d * s)?,
        dscale: p(dscale, 1)?,
        rows: b as u64,
        d: d as u64,
        slots: s as u64,
        eps: eps as f32,
        pad: 0,
    };
    launch(gpu.as_ref(), "soft_moe_phi_bwd", ONE_BLOCK, &q)
}

pub(super) fn soft_moe_dispatch_fwd<G: Gpu>(
    be: &GpuBackend<G>,
    dispatch: &Tensor,
    xn: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "soft_moe_dispatch_fwd";
    be.on_device(OP, &[dispatch, xn])?;
    let m = mix_dims(OP, dispatch, xn, true)?;
    let MoeDims { b, t, d, s } = m;
    let gpu = be.gpu();
    let f = DType::F32;
    let out = be.empty(&[b, s, d], f)?;
    let (w, x, o) = (
        dptr(gpu, OP, dispatch, f, b * t * s)?,
        dptr(gpu, OP, xn, f, b * t * d)?,
        dptr(gpu, OP, &out, f, b * s * d)?,
    );
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    launch_tok2slot(gpu, OP, w, x, o, m, false)?;
    Ok(out)
}

pub(super) fn soft_moe_dispatch_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    dispatch: &Tensor,
    xn: &Tensor,
    d_slots: &Tensor,
    d_dispatch: &Tensor,
    d_xn: &Tensor,
) -> Result<()> {
    const OP: &str = "soft_moe_dispatch_bwd";
    be.on_device(OP, &[dispatch, xn, d_slots, d_dispatch, d_xn])?;
    distinct(OP, &[d_dispatch, d_xn], &[dispatch, xn, d_slots])?;
    let m = mix_dims(OP, dispatch, xn, true)?;
    mix_dims(OP, dispatch, d_slots, false)?;
    let MoeDims { b, t, d, s } = m;
    let gpu = be.gpu();
    let f = DType::F32;
    let w = dptr(gpu, OP, dispatch, f, b * t * s)?;
    let y = dptr(gpu, OP, d_slots, f, b * s * d)?;
    let a = dptr(gpu, OP, xn, f, b * t * d)?;
    let out = dptr(gpu, OP, d_xn, f, b * t * d)?;
    let dw = dptr(gpu, OP, d_dispatch, f, b * t * s)?;
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    launch_mix_tokens(gpu, OP, w, y, a, out, dw, m, true)
}

pub(super) fn soft_moe_combine_fwd<G: Gpu>(
    be: &GpuBackend<G>,
    combine: &Tensor,
    ys: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "soft_moe_combine_fwd";
    be.on_device(OP, &[combine, ys])?;
    let m = mix_dims(OP, combine, ys, false)?;
    let MoeDims { b, t, d, s } = m;
    let gpu = be.gpu();
    let f = DType::F32;
    let out = be.empty(&[b, t, d], f)?;
    let w = dptr(gpu, OP, combine, f, b * t * s)?;
    let y = dptr(gpu, OP, ys, f, b * s * d)?;
    let o = dptr(gpu, OP, &out, f, b * t * d)?;
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    launch_mix_tokens(gpu, OP, w, y, 0, o, 0, m, false)?;
    Ok(out)
}

pub(super) fn soft_moe_combine_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    combine: &Tensor,
    ys: &Tensor,
    dy: &Tensor,
    d_combine: &Tensor,
    d_ys: &Tensor,
) -> Result<()> {
    const OP: &str = "soft_moe_combine_bwd";
    be.on_device(OP, &[combine, ys, dy, d_combine, d_ys])?;
    distinct(OP, &[d_combine, d_ys], &[combine, ys, dy])?;
    let m = mix_dims(OP, combine, ys, false)?;
    mix_dims(OP, combine, dy, true)?;
    let MoeDims { b, t, d, s } = m;
    let gpu = be.gpu();
    let f = DType::F32;
    let w = dptr(gpu, OP, combine, f, b * t * s)?;
    let y = dptr(gpu, OP, ys, f, b * s * d)?;
    let g = dptr(gpu, OP, dy, f, b * t * d)?;
    let dw = dptr(gpu, OP, d_combine, f, b * t * s)?;
    let dys = dptr(gpu, OP, d_ys, f, b * s * d)?;
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    launch_mix_tokens(gpu, OP, w, y, g, 0, dw, m, false)?;
    launch_tok2slot(gpu, OP, w, g, dys, m, true)
}

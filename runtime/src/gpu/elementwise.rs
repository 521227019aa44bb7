//! Elementwise ops on the GPU (`kernels-cu/elementwise.cu`; reference `cpu/elementwise.rs`):
//! `add`, `add_assign`, `scale`, `scale_by` (fwd/bwd), `swiglu` (fwd/bwd) and `cast`.
//!
//! Dtypes (docs/ARCHITECTURE.md, "dtype policy"): values are F32 or BF16 and computed in f32;
//! a forward output has its inputs' dtype; gradients (`dy`, `dx`, `da`, `db`, `ds`) and the
//! learned scale `s` are F32. Each block owns a fixed chunk of [`EW_CHUNK`] elements (the
//! partition depends on `n` only), moved as 128-bit vectors when every operand is 16-byte aligned.

use super::backend::{distinct, ptr, same_shape, GpuBackend};
use super::launch::{grid_x, launch, workspace};
use super::{DevicePtr, Dim3, Gpu, LaunchConfig, NvtxRange};
use crate::backend::Backend;
use crate::{DType, Error, Result, Tensor};
use bytemuck::{Pod, Zeroable};
use std::sync::Arc;

// ---- parameter structs (mirrors of elementwise.cu) --------------------------------------------

/// `BinaryParams` of `elementwise.cu` (add, swiglu).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct BinaryParams {
    a: DevicePtr,   // (n)
    b: DevicePtr,   // (n)
    out: DevicePtr, // (n)
    n: u64,
}
const _: () = assert!(std::mem::size_of::<BinaryParams>() == 32);

/// `AddAssignParams` of `elementwise.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AddAssignParams {
    dst: DevicePtr, // (n), +=
    src: DevicePtr, // (n)
    n: u64,
}
const _: () = assert!(std::mem::size_of::<AddAssignParams>() == 24);

/// `ScaleParams` of `elementwise.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ScaleParams {
    x: DevicePtr,   // (n)
    s: DevicePtr,   // (1) f32, or 0: alpha
    out: DevicePtr, // (n)
    n: u64,
    alpha: f32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<ScaleParams>() == 40);

/// `ScaleByBwdParams` of `elementwise.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ScaleByBwdParams {
    x: DevicePtr,       // (n)
    s: DevicePtr,       // (1) f32
    dy: DevicePtr,      // (n) f32
    dx: DevicePtr,      // (n) f32, +=
    partial: DevicePtr, // (blocks) f64
    n: u64,
}
const _: () = assert!(std::mem::size_of::<ScaleByBwdParams>() == 48);

/// `SumF64IntoF32Params` of `elementwise.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SumF64IntoF32Params {
    partial: DevicePtr, // (count) f64
    out: DevicePtr,     // (1) f32, +=
    count: u64,
}
const _: () = assert!(std::mem::size_of::<SumF64IntoF32Params>() == 24);

/// `SwigluBwdParams` of `elementwise.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SwigluBwdParams {
    a: DevicePtr,  // (n)
    b: DevicePtr,  // (n)
    dy: DevicePtr, // (n) f32
    da: DevicePtr, // (n) f32, +=
    db: DevicePtr, // (n) f32, +=
    n: u64,
}
const _: () = assert!(std::mem::size_of::<SwigluBwdParams>() == 48);

/// `CastParams` of `elementwise.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct CastParams {
    x: DevicePtr,   // (n)
    out: DevicePtr, // (n)
    n: u64,
}
const _: () = assert!(std::mem::size_of::<CastParams>() == 24);

// ---- launch configuration ---------------------------------------------------------------------

/// Elements per block of every flat kernel (256 threads × 8).
pub const EW_CHUNK: usize = 2048;
/// Threads per block of the flat kernels.
pub const EW_BLOCK: u32 = 256;

/// The launch of a flat kernel over `n > 0` elements.
pub fn flat_config(op: &'static str, n: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid: Dim3::x(grid_x(op, n.div_ceil(EW_CHUNK))?),
        block: Dim3::x(EW_BLOCK),
        shared_bytes: 0,
    })
}

/// The storage of a value operand: F32 or BF16, as the kernel symbol's suffix.
pub(crate) fn value_suffix(op: &'static str, dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => Err(Error::dtype(op, other, "the GPU computes this op on F32 or BF16 values")),
    }
}

fn require_f32(op: &'static str, what: &str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(Error::dtype(
            op,
            t.dtype(),
            format!("{what} must be F32 (gradients and learned scales are f32 on the GPU)"),
        ));
    }
    Ok(())
}

// ---- launchers (raw device ranges; the ops below check the tensors) ----------------------------

/// `out = a + b` over `n` elements of `dtype`.
///
/// # Safety
/// `a`, `b` and `out` address `n` live elements of `dtype` on `gpu`.
pub unsafe fn launch_add_fwd<G: Gpu>(
    gpu: &Arc<G>,
    dtype: DType,
    a: DevicePtr,
    b: DevicePtr,
    out: DevicePtr,
    n: usize,
) -> Result<()> {
    const OP: &str = "add";
    let symbol = if value_suffix(OP, dtype)? == "f32" { "add_fwd_f32" } else { "add_fwd_bf16" };
    let p = BinaryParams { a, b, out, n: n as u64 };
    launch(gpu.as_ref(), symbol, flat_config(OP, n)?, &p)
}

/// `dst += src` over `n` elements of `dtype`.
///
/// # Safety
/// `dst` and `src` address `n` live, non-overlapping elements of `dtype` on `gpu`.
pub unsafe fn launch_add_assign<G: Gpu>(
    gpu: &Arc<G>,
    dtype: DType,
    dst: DevicePtr,
    src: DevicePtr,
    n: usize,
) -> Result<()> {
    const OP: &str = "add_assign";
    let symbol =
        if value_suffix(OP, dtype)? == "f32" { "add_assign_f32" } else { "add_assign_bf16" };
    let p = AddAssignParams { dst, src, n: n as u64 };
    launch(gpu.as_ref(), symbol, flat_config(OP, n)?, &p)
}

/// `out = s[0] · x` (a learned f32 scale at `s`) or `alpha · x` (`s = 0`).
///
/// # Safety
/// `x` and `out` address `n` live elements of `dtype`; `s` is 0 or one live f32.
pub unsafe fn launch_scale_fwd<G: Gpu>(
    gpu: &Arc<G>,
    dtype: DType,
    x: DevicePtr,
    s: DevicePtr,
    alpha: f32,
    out: DevicePtr,
    n: usize,
) -> Result<()> {
    const OP: &str = "scale";
    let symbol = if value_suffix(OP, dtype)? == "f32" { "scale_fwd_f32" } else { "scale_fwd_bf16" };
    let p = ScaleParams { x, s, out, n: n as u64, alpha, pad: 0 };
    launch(gpu.as_ref(), symbol, flat_config(OP, n)?, &p)
}

/// `out (bf16) = x (f32)` rounded to nearest even, over `n` elements.
///
/// # Safety
/// `x` addresses `n` live f32 and `out` `n` live bf16 of `gpu`, not overlapping.
pub unsafe fn launch_cast_f32_bf16<G: Gpu>(
    gpu: &Arc<G>,
    x: DevicePtr,
    out: DevicePtr,
    n: usize,
) -> Result<()> {
    let p = CastParams { x, out, n: n as u64 };
    launch(gpu.as_ref(), "cast_f32_bf16", flat_config("cast", n)?, &p)
}

// ---- the GpuBackend ops -----------------------------------------------------------------------

fn fresh_like<G: Gpu>(be: &GpuBackend<G>, t: &Tensor) -> Result<Tensor> {
    be.empty(t.shape(), t.dtype())
}

pub(super) fn add<G: Gpu>(be: &GpuBackend<G>, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "add";
    be.on_device(OP, &[a, b])?;
    same_shape(OP, a, b)?;
    if a.dtype() != b.dtype() {
        return Err(Error::dtype(OP, b.dtype(), format!("a is {}: both must match", a.dtype())));
    }
    value_suffix(OP, a.dtype())?;
    let out = fresh_like(be, a)?;
    if a.numel() > 0 {
        let _range = NvtxRange::new(be.gpu().as_ref(), OP);
        // SAFETY: a, b and out are live device tensors of the same shape and dtype.
        unsafe { launch_add_fwd(be.gpu(), a.dtype(), ptr(a), ptr(b), ptr(&out), a.numel())? };
    }
    Ok(out)
}

pub(super) fn add_assign<G: Gpu>(be: &GpuBackend<G>, dst: &Tensor, src: &Tensor) -> Result<()> {
    const OP: &str = "add_assign";
    be.on_device(OP, &[dst, src])?;
    distinct(OP, &[dst], &[src])?;
    if dst.numel() != src.numel() {
        return Err(Error::shape(OP, format!("{:?} += {:?}", dst.shape(), src.shape())));
    }
    if dst.dtype() != src.dtype() {
        return Err(Error::dtype(
            OP,
            src.dtype(),
            format!("dst is {}: both must match", dst.dtype()),
        ));
    }
    value_suffix(OP, dst.dtype())?;
    if dst.numel() > 0 {
        let _range = NvtxRange::new(be.gpu().as_ref(), OP);
        // SAFETY: dst and src hold numel elements of the dtype and are distinct tensors.
        unsafe { launch_add_assign(be.gpu(), dst.dtype(), ptr(dst), ptr(src), dst.numel())? };
    }
    Ok(())
}

pub(super) fn scale<G: Gpu>(be: &GpuBackend<G>, x: &Tensor, alpha: f64) -> Result<Tensor> {
    const OP: &str = "scale";
    be.on_device(OP, &[x])?;
    value_suffix(OP, x.dtype())?;
    let out = fresh_like(be, x)?;
    if x.numel() > 0 {
        let _range = NvtxRange::new(be.gpu().as_ref(), OP);
        // SAFETY: x and out hold numel elements of x's dtype.
        unsafe {
            launch_scale_fwd(be.gpu(), x.dtype(), ptr(x), 0, alpha as f32, ptr(&out), x.numel())?
        };
    }
    Ok(out)
}

fn one_element(op: &'static str, what: &str, s: &Tensor) -> Result<()> {
    if s.numel() != 1 {
        return Err(Error::shape(op, format!("{what} must have one element, got {:?}", s.shape())));
    }
    require_f32(op, what, s)
}

pub(super) fn scale_by_fwd<G: Gpu>(be: &GpuBackend<G>, x: &Tensor, s: &Tensor) -> Result<Tensor> {
    const OP: &str = "scale_by_fwd";
    be.on_device(OP, &[x, s])?;
    value_suffix(OP, x.dtype())?;
    one_element(OP, "the scale", s)?;
    let out = fresh_like(be, x)?;
    if x.numel() > 0 {
        let _range = NvtxRange::new(be.gpu().as_ref(), OP);
        // SAFETY: x and out hold numel elements of x's dtype; s one f32.
        unsafe {
            launch_scale_fwd(be.gpu(), x.dtype(), ptr(x), ptr(s), 0.0, ptr(&out), x.numel())?
        };
    }
    Ok(out)
}

pub(super) fn scale_by_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    x: &Tensor,
    s: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
    ds: &Tensor,
) -> Result<()> {
    const OP: &str = "scale_by_bwd";
    be.on_device(OP, &[x, s, dy, dx, ds])?;
    distinct(OP, &[dx, ds], &[x, s, dy])?;
    same_shape(OP, x, dy)?;
    same_shape(OP, x, dx)?;
    let suffix = value_suffix(OP, x.dtype())?;
    one_element(OP, "the scale", s)?;
    one_element(OP, "ds", ds)?;
    require_f32(OP, "dy", dy)?;
    require_f32(OP, "dx", dx)?;
    let n = x.numel();
    if n == 0 {
        return Ok(());
    }
    let gpu = be.gpu();
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let cfg = flat_config(OP, n)?;
    let blocks = cfg.grid.x as usize;
    let partial = workspace(gpu, blocks * 8)?;
    let p = ScaleByBwdParams {
        x: ptr(x),
        s: ptr(s),
        dy: ptr(dy),
        dx: ptr(dx),
        partial: partial.ptr(),
        n: n as u64,
    };
    let symbol = if suffix == "f32" { "scale_by_bwd_f32" } else { "scale_by_bwd_bf16" };
    launch(gpu.as_ref(), symbol, cfg, &p)?;
    let r = SumF64IntoF32Params { partial: partial.ptr(), out: ptr(ds), count: blocks as u64 };
    let one = LaunchConfig { grid: Dim3::x(1), block: Dim3::x(32), shared_bytes: 0 };
    launch(gpu.as_ref(), "sum_f64_into_f32", one, &r)
}

pub(super) fn swiglu_fwd<G: Gpu>(be: &GpuBackend<G>, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "swiglu_fwd";
    be.on_device(OP, &[a, b])?;
    same_shape(OP, a, b)?;
    if a.dtype() != b.dtype() {
        return Err(Error::dtype(OP, b.dtype(), format!("a is {}: both must match", a.dtype())));
    }
    let suffix = value_suffix(OP, a.dtype())?;
    let out = fresh_like(be, a)?;
    let n = a.numel();
    if n > 0 {
        let _range = NvtxRange::new(be.gpu().as_ref(), OP);
        let p = BinaryParams { a: ptr(a), b: ptr(b), out: ptr(&out), n: n as u64 };
        let symbol = if suffix == "f32" { "swiglu_fwd_f32" } else { "swiglu_fwd_bf16" };
        launch(be.gpu().as_ref(), symbol, flat_config(OP, n)?, &p)?;
    }
    Ok(out)
}

pub(super) fn swiglu_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    da: &Tensor,
    db: &Tensor,
) -> Result<()> {
    const OP: &str = "swiglu_bwd";
    be.on_device(OP, &[a, b, dy, da, db])?;
    distinct(OP, &[da, db], &[a, b, dy])?;
    for t in [b, dy, da, db] {
        same_shape(OP, a, t)?;
    }
    if a.dtype() != b.dtype() {
        return Err(Error::dtype(OP, b.dtype(), format!("a is {}: both must match", a.dtype())));
    }
    let suffix = value_suffix(OP, a.dtype())?;
    for (what, t) in [("dy", dy), ("da", da), ("db", db)] {
        require_f32(OP, what, t)?;
    }
    let n = a.numel();
    if n > 0 {
        let _range = NvtxRange::new(be.gpu().as_ref(), OP);
        let p = SwigluBwdParams {
            a: ptr(a),
            b: ptr(b),
            dy: ptr(dy),
            da: ptr(da),
            db: ptr(db),
            n: n as u64,
        };
        let symbol = if suffix == "f32" { "swiglu_bwd_f32" } else { "swiglu_bwd_bf16" };
        launch(be.gpu().as_ref(), symbol, flat_config(OP, n)?, &p)?;
    }
    Ok(())
}

pub(super) fn cast<G: Gpu>(be: &GpuBackend<G>, t: &Tensor, dtype: DType) -> Result<Tensor> {
    const OP: &str = "cast";
    be.on_device(OP, &[t])?;
    if t.dtype() == dtype {
        return be.copy(t);
    }
    let symbol = match (t.dtype(), dtype) {
        (DType::F32, DType::BF16) => "cast_f32_bf16",
        (DType::BF16, DType::F32) => "cast_bf16_f32",
        (from, to) => {
            return Err(Error::dtype(
                OP,
                from,
                format!("the GPU casts F32 ↔ BF16 only (asked {from} → {to}); cast on the CPU"),
            ))
        }
    };
    let out = be.empty(t.shape(), dtype)?;
    let n = t.numel();
    if n > 0 {
        let _range = NvtxRange::new(be.gpu().as_ref(), OP);
        let p = CastParams { x: ptr(t), out: ptr(&out), n: n as u64 };
        launch(be.gpu().as_ref(), symbol, flat_config(OP, n)?, &p)?;
    }
    Ok(out)
}

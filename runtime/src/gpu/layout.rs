//! Layout ops on the GPU (`kernels-cu/layout.cu`; reference `cpu/layout.rs`): `transpose01`
//! (a kernel), `slice0` and `concat0` (device-to-device copies of whole rows), `slice0_bwd`
//! (`add_assign` on the rows). Any dtype of 2 or 4 bytes moves; `slice0_bwd` accumulates F32 or
//! BF16.

use super::backend::{distinct, ptr, GpuBackend};
use super::elementwise::{launch_add_assign, value_suffix};
use super::launch::{grid_x, launch};
use super::{DevicePtr, Dim3, Gpu, LaunchConfig, NvtxRange};
use crate::{Error, Result, Tensor};
use bytemuck::{Pod, Zeroable};

/// `Transpose01Params` of `layout.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Transpose01Params {
    x: DevicePtr,   // (A, B, C) units
    out: DevicePtr, // (B, A, C) units
    a: u64,
    b: u64,
    c: u64,
}
const _: () = assert!(std::mem::size_of::<Transpose01Params>() == 40);

/// Output units per block of the transpose (256 threads × 8).
pub const LAYOUT_CHUNK: usize = 2048;
/// Threads per block of the transpose.
pub const LAYOUT_BLOCK: u32 = 256;

/// The kernel and the unit size (bytes) `transpose01` moves for rows of `c` elements of
/// `elem_bytes`: whole 16-byte vectors when a row is a multiple of 16 bytes (the tensor itself is
/// a fresh, 256-byte aligned allocation), else single elements.
pub fn transpose_unit(
    op: &'static str,
    c: usize,
    elem_bytes: usize,
) -> Result<(&'static str, usize)> {
    match elem_bytes {
        _ if (c * elem_bytes).is_multiple_of(16) && c > 0 => Ok(("transpose01_v16", 16)),
        2 => Ok(("transpose01_u16", 2)),
        4 => Ok(("transpose01_u32", 4)),
        other => Err(Error::invalid(op, format!("{other}-byte elements do not live on the GPU"))),
    }
}

pub(super) fn transpose01<G: Gpu>(be: &GpuBackend<G>, x: &Tensor) -> Result<Tensor> {
    const OP: &str = "transpose01";
    be.on_device(OP, &[x])?;
    let s = x.shape();
    let (a, b, c) = match s.len() {
        2 => (s[0], s[1], 1),
        3 => (s[0], s[1], s[2]),
        _ => return Err(Error::shape(OP, format!("expects 2 or 3 axes, got {s:?}"))),
    };
    let out_shape: Vec<usize> = if s.len() == 2 { vec![b, a] } else { vec![b, a, c] };
    let out = be.empty(&out_shape, x.dtype())?;
    if x.numel() == 0 {
        return Ok(out);
    }
    let es = x.dtype().size_in_bytes();
    let (symbol, unit) = transpose_unit(OP, c, es)?;
    let units_c = c * es / unit;
    let total = a * b * units_c;
    let p = Transpose01Params {
        x: ptr(x),
        out: ptr(&out),
        a: a as u64,
        b: b as u64,
        c: units_c as u64,
    };
    let _range = NvtxRange::new(be.gpu().as_ref(), OP);
    let cfg = LaunchConfig {
        grid: Dim3::x(grid_x(OP, total.div_ceil(LAYOUT_CHUNK))?),
        block: Dim3::x(LAYOUT_BLOCK),
        shared_bytes: 0,
    };
    launch(be.gpu().as_ref(), symbol, cfg, &p)?;
    Ok(out)
}

fn row_len(x: &Tensor) -> usize {
    x.shape()[1..].iter().product()
}

pub(super) fn slice0<G: Gpu>(
    be: &GpuBackend<G>,
    x: &Tensor,
    start: usize,
    len: usize,
) -> Result<Tensor> {
    const OP: &str = "slice0";
    be.on_device(OP, &[x])?;
    if x.dims() == 0 || start.checked_add(len).is_none_or(|end| end > x.shape()[0]) {
        return Err(Error::shape(
            OP,
            format!("rows {start}..{} of {:?}", start.saturating_add(len), x.shape()),
        ));
    }
    let mut shape = x.shape().to_vec();
    shape[0] = len;
    let out = be.empty(&shape, x.dtype())?;
    let row_bytes = row_len(x) * x.dtype().size_in_bytes();
    if len * row_bytes > 0 {
        let _range = NvtxRange::new(be.gpu().as_ref(), OP);
        // SAFETY: rows start..start+len lie inside x (checked); out holds exactly len rows.
        unsafe { be.gpu().copy(ptr(&out), ptr(x) + (start * row_bytes) as u64, len * row_bytes)? };
    }
    Ok(out)
}

pub(super) fn slice0_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    dy: &Tensor,
    dx: &Tensor,
    start: usize,
) -> Result<()> {
    const OP: &str = "slice0_bwd";
    be.on_device(OP, &[dy, dx])?;
    distinct(OP, &[dx], &[dy])?;
    if dx.dims() == 0
        || dy.dims() != dx.dims()
        || dy.shape()[1..] != dx.shape()[1..]
        || start.checked_add(dy.shape()[0]).is_none_or(|end| end > dx.shape()[0])
    {
        return Err(Error::shape(
            OP,
            format!("dy {:?} at row {start} does not fit dx {:?}", dy.shape(), dx.shape()),
        ));
    }
    if dy.dtype() != dx.dtype() {
        return Err(Error::dtype(OP, dy.dtype(), format!("dx is {}: both must match", dx.dtype())));
    }
    value_suffix(OP, dx.dtype())?;
    let n = dy.numel();
    if n == 0 {
        return Ok(());
    }
    let offset = (start * row_len(dx) * dx.dtype().size_in_bytes()) as u64;
    let _range = NvtxRange::new(be.gpu().as_ref(), OP);
    // SAFETY: dx's rows start.. hold dy's n elements (checked); the tensors are distinct. The
    // kernel takes its scalar path when the offset breaks 16-byte alignment.
    unsafe { launch_add_assign(be.gpu(), dx.dtype(), ptr(dx) + offset, ptr(dy), n) }
}

pub(super) fn concat0<G: Gpu>(be: &GpuBackend<G>, parts: &[&Tensor]) -> Result<Tensor> {
    const OP: &str = "concat0";
    let first = parts.first().ok_or_else(|| Error::invalid(OP, "nothing to concatenate"))?;
    be.on_device(OP, parts)?;
    if first.dims() == 0 {
        return Err(Error::shape(OP, "parts must have at least one axis"));
    }
    let mut rows = 0usize;
    for p in parts {
        if p.dims() != first.dims()
            || p.shape()[1..] != first.shape()[1..]
            || p.dtype() != first.dtype()
        {
            return Err(Error::shape(
                OP,
                format!(
                    "part {:?} {} does not match {:?} {} beyond the first axis",
                    p.shape(),
                    p.dtype(),
                    first.shape(),
                    first.dtype()
                ),
            ));
        }
        rows += p.shape()[0];
    }
    let mut shape = first.shape().to_vec();
    shape[0] = rows;
    let out = be.empty(&shape, first.dtype())?;
    let _range = NvtxRange::new(be.gpu().as_ref(), OP);
    let mut offset = 0u64;
    for p in parts {
        let bytes = p.size_in_bytes();
        if bytes > 0 {
            // SAFETY: the parts' bytes add up to out's; each lands after the previous ones.
            unsafe { be.gpu().copy(ptr(&out) + offset, ptr(p), bytes)? };
        }
        offset += bytes as u64;
    }
    Ok(out)
}

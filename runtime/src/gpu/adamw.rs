//! The multi-tensor AdamW step on the GPU (`kernels-cu/adamw.cu`; reference `cpu/adamw.rs`):
//! the parameter structs, the launcher, and the `GpuBackend` op.

use super::backend::{distinct, GpuBackend};
use super::launch::{dptr, grid_x, launch, opt_dptr, workspace};
use super::{DevicePtr, Dim3, Gpu, LaunchConfig, NvtxRange};
use crate::backend::{AdamW, AdamWParam};
use crate::{DType, Error, Result};
use bytemuck::{Pod, Zeroable};
use std::sync::Arc;

// ---- parameter structs (mirrors of adamw.cu) -----------------------------------------------------

/// `AdamWTensor` of `adamw.cu` (one row of the device table).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AdamWTensor {
    param: DevicePtr, // (n)
    grad: DevicePtr,  // (n)
    m: DevicePtr,     // (n)
    v: DevicePtr,     // (n)
    copy: DevicePtr,  // (n) bf16, or 0
    n: u64,
    block_start: u64,
    decay: f32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<AdamWTensor>() == 64);

/// `AdamWParams` of `adamw.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AdamWParams {
    tensors: DevicePtr, // (count) AdamWTensor
    count: u64,
    elems_per_block: u64,
    beta1: f32,
    beta2: f32,
    eps: f32,
    grad_scale: f32,
    step_size: f32,
    bc2_sqrt: f32,
}
const _: () = assert!(std::mem::size_of::<AdamWParams>() == 48);

/// AdamW: threads per block and elements per block.
pub const ADAMW_BLOCK: u32 = 256;
pub const ADAMW_ELEMS_PER_BLOCK: usize = 256 * 8;

// ---- AdamW --------------------------------------------------------------------------------------

/// One multi-tensor AdamW step over every parameter in ONE launch (PyTorch semantics, see
/// `adamw.cu`); the per-tensor table is uploaded to a workspace.
pub fn launch_adamw_step<G: Gpu>(gpu: &Arc<G>, params: &[AdamWParam], hp: AdamW) -> Result<()> {
    const OP: &str = "adamw_step";
    if hp.step == 0 {
        return Err(Error::invalid(OP, "step is 1-based (bias correction divides by 1 − β^step)"));
    }
    let step = i32::try_from(hp.step)
        .map_err(|_| Error::invalid(OP, format!("step {} is out of range", hp.step)))?;
    let f = DType::F32;
    let mut table = Vec::with_capacity(params.len());
    let mut blocks = 0usize;
    for p in params {
        let n = p.param.numel();
        let row = AdamWTensor {
            param: dptr(gpu, OP, &p.param, f, n)?,
            grad: dptr(gpu, OP, &p.grad, f, n)?,
            m: dptr(gpu, OP, &p.m, f, n)?,
            v: dptr(gpu, OP, &p.v, f, n)?,
            copy: opt_dptr(gpu, OP, p.copy.as_ref(), DType::BF16, n)?,
            n: n as u64,
            block_start: blocks as u64,
            decay: 1.0 - hp.lr * p.weight_decay,
            pad: 0,
        };
        for (name, t) in [("grad", &p.grad), ("m", &p.m), ("v", &p.v)] {
            if t.shares_storage(&p.param) {
                return Err(Error::invalid(
                    OP,
                    format!("{name} shares storage with the parameter"),
                ));
            }
        }
        if n > 0 {
            table.push(row);
            blocks += n.div_ceil(ADAMW_ELEMS_PER_BLOCK);
        }
    }
    if table.is_empty() {
        return Ok(());
    }
    // The same f32 arithmetic as the CPU reference.
    let bc1 = 1.0f32 - hp.beta1.powi(step);
    let bc2_sqrt = (1.0f32 - hp.beta2.powi(step)).sqrt();
    let ws = workspace(gpu, std::mem::size_of_val(table.as_slice()))?;
    // SAFETY: the workspace holds exactly the table's bytes.
    unsafe { gpu.upload(ws.ptr(), bytemuck::cast_slice(&table))? };
    let p = AdamWParams {
        tensors: ws.ptr(),
        count: table.len() as u64,
        elems_per_block: ADAMW_ELEMS_PER_BLOCK as u64,
        beta1: hp.beta1,
        beta2: hp.beta2,
        eps: hp.eps,
        grad_scale: hp.grad_scale,
        step_size: hp.lr / bc1,
        bc2_sqrt,
    };
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let cfg = LaunchConfig {
        grid: Dim3::x(grid_x(OP, blocks)?),
        block: Dim3::x(ADAMW_BLOCK),
        shared_bytes: 0,
    };
    launch(gpu.as_ref(), "adamw_step_f32", cfg, &p)
}

// ---- the GpuBackend op -----------------------------------------------------------------------

pub(super) fn adamw_step<G: Gpu>(
    be: &GpuBackend<G>,
    params: &[AdamWParam],
    hp: AdamW,
) -> Result<()> {
    const OP: &str = "adamw_step";
    for p in params {
        let mut all = vec![&p.param, &p.grad, &p.m, &p.v];
        all.extend(p.copy.as_ref());
        be.on_device(OP, &all)?;
        let mut outs = vec![&p.param, &p.m, &p.v];
        outs.extend(p.copy.as_ref());
        distinct(OP, &outs, &[&p.grad])?;
    }
    launch_adamw_step(be.gpu(), params, hp)
}

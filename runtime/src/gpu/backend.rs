//! `GpuBackend<G>`: the `Backend` ops over any [`Gpu`] — the kernels of kernels-cu through the
//! launchers, GEMMs through `Gpu::gemm`. The same code runs on `CudaGpu` and on `EmuGpu`.
//!
//! Every `Backend` op runs on the `Gpu`: nothing falls back to the CPU, silently or otherwise
//! (`runtime/tests/gpu/coverage.rs` calls each op of the trait). The ops live with their family (`elementwise.rs`, `layout.rs`, `rms_norm.rs`, …);
//! this file keeps the struct, the memory ops, the operand checks and one delegating line per
//! op. Outputs are fresh allocations (poisoned under the emulator).

use super::{
    adamw, attention, elementwise, embedding, l2_normalize, layout, lm_head_ce, matmul, rms_norm,
};
use super::{experts, rope, soft_moe, softmax};
use super::{Fill, Gpu, GpuBuffer};
use crate::backend::{
    AdamW, AdamWParam, Backend, CrossEntropy, CrossEntropyOut, ExpertWeights, ExpertsOut, Matmul,
    SoftMoeRoute,
};
use crate::{DType, Device, Error, Result, Tensor};
use std::sync::Arc;

/// The `Backend` of a [`Gpu`].
pub struct GpuBackend<G: Gpu> {
    gpu: Arc<G>,
    poison: bool,
}

impl<G: Gpu> GpuBackend<G> {
    pub fn new(gpu: Arc<G>) -> Self {
        GpuBackend { gpu, poison: false }
    }

    /// A backend whose fresh outputs start as `0xFF` bytes (NaN), so a kernel that forgets to
    /// write an element fails its test (property tests on a real device; the emulator poisons
    /// every allocation anyway).
    pub fn with_poisoned_outputs(gpu: Arc<G>) -> Self {
        GpuBackend { gpu, poison: true }
    }

    /// The device underneath (tests read the emulator's launch log through it).
    pub fn gpu(&self) -> &Arc<G> {
        &self.gpu
    }

    /// A fresh (uninitialised) device tensor.
    pub fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = shape.iter().product::<usize>() * dtype.size_in_bytes();
        let g: Arc<dyn Gpu> = self.gpu.clone();
        let t = Tensor::from_gpu_buffer(GpuBuffer::new(g, bytes)?, shape, dtype)?;
        if self.poison {
            // SAFETY: the buffer holds exactly `bytes` bytes.
            unsafe { self.gpu.memset(ptr(&t), Fill::U8(0xFF), bytes)? };
        }
        Ok(t)
    }

    pub(super) fn on_device(&self, op: &'static str, ts: &[&Tensor]) -> Result<()> {
        let dev = Device::Cuda(self.gpu.ordinal());
        for t in ts {
            if t.device() != dev || t.gpu_buffer().is_none() {
                return Err(Error::Device { op, expected: dev, found: t.device() });
            }
        }
        Ok(())
    }
}

pub(super) fn ptr(t: &Tensor) -> u64 {
    t.gpu_buffer().map_or(0, GpuBuffer::ptr)
}

pub(super) fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(op, format!("{:?} vs {:?}", a.shape(), b.shape())));
    }
    Ok(())
}

pub(super) fn distinct(op: &'static str, outs: &[&Tensor], ins: &[&Tensor]) -> Result<()> {
    for (i, o) in outs.iter().enumerate() {
        if ins.iter().chain(&outs[i + 1..]).any(|t| t.shares_storage(o)) {
            return Err(Error::invalid(op, "an output shares storage with another operand"));
        }
    }
    Ok(())
}

impl<G: Gpu> Backend for GpuBackend<G> {
    fn device(&self) -> Device {
        Device::Cuda(self.gpu.ordinal())
    }

    fn name(&self) -> String {
        self.gpu.name()
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = self.empty(shape, dtype)?;
        // SAFETY: the tensor's buffer holds exactly size_in_bytes bytes.
        unsafe { self.gpu.memset(ptr(&t), Fill::U8(0), t.size_in_bytes())? };
        Ok(t)
    }

    fn fill(&self, t: &Tensor, value: f64) -> Result<()> {
        const OP: &str = "fill";
        self.on_device(OP, &[t])?;
        let n = t.numel();
        let pattern = match t.dtype() {
            DType::F32 => Fill::U32((value as f32).to_bits()),
            DType::BF16 => Fill::U16(half::bf16::from_f64(value).to_bits()),
            DType::I32 => Fill::U32(value as i32 as u32),
            DType::U32 => Fill::U32(value as u32),
            DType::U16 => Fill::U16(value as u16),
            DType::F64 => return Err(Error::dtype(OP, DType::F64, "F64 lives on the CPU only")),
        };
        // SAFETY: n elements of the pattern's width are the tensor's buffer.
        unsafe { self.gpu.memset(ptr(t), pattern, n) }
    }

    fn upload(&self, host: &Tensor) -> Result<Tensor> {
        if host.dtype() == DType::F64 {
            return Err(Error::dtype("upload", DType::F64, "F64 lives on the CPU only"));
        }
        let bytes = host.to_bytes()?;
        let t = self.empty(host.shape(), host.dtype())?;
        // SAFETY: the buffer holds exactly bytes.len() bytes.
        unsafe { self.gpu.upload(ptr(&t), &bytes)? };
        Ok(t)
    }

    fn download(&self, t: &Tensor) -> Result<Tensor> {
        self.on_device("download", &[t])?;
        let mut bytes = vec![0u8; t.size_in_bytes()];
        // SAFETY: the tensor's buffer holds exactly that many bytes.
        unsafe { self.gpu.download(ptr(t), &mut bytes)? };
        Tensor::from_bytes(&bytes, t.dtype(), t.shape())
    }

    fn copy(&self, t: &Tensor) -> Result<Tensor> {
        self.on_device("copy", &[t])?;
        let out = self.empty(t.shape(), t.dtype())?;
        // SAFETY: both buffers hold size_in_bytes bytes and are distinct allocations.
        unsafe { self.gpu.copy(ptr(&out), ptr(t), t.size_in_bytes())? };
        Ok(out)
    }

    fn cast(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        elementwise::cast(self, t, dtype)
    }

    fn synchronize(&self) -> Result<()> {
        self.gpu.synchronize()
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        elementwise::add(self, a, b)
    }
    fn add_assign(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        elementwise::add_assign(self, dst, src)
    }
    fn scale(&self, x: &Tensor, alpha: f64) -> Result<Tensor> {
        elementwise::scale(self, x, alpha)
    }
    fn scale_by_fwd(&self, x: &Tensor, s: &Tensor) -> Result<Tensor> {
        elementwise::scale_by_fwd(self, x, s)
    }
    fn scale_by_bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        dy: &Tensor,
        dx: &Tensor,
        ds: &Tensor,
    ) -> Result<()> {
        elementwise::scale_by_bwd(self, x, s, dy, dx, ds)
    }
    fn swiglu_fwd(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        elementwise::swiglu_fwd(self, a, b)
    }
    fn swiglu_bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
        da: &Tensor,
        db: &Tensor,
    ) -> Result<()> {
        elementwise::swiglu_bwd(self, a, b, dy, da, db)
    }
    fn transpose01(&self, x: &Tensor) -> Result<Tensor> {
        layout::transpose01(self, x)
    }
    fn slice0(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        layout::slice0(self, x, start, len)
    }
    fn slice0_bwd(&self, dy: &Tensor, dx: &Tensor, start: usize) -> Result<()> {
        layout::slice0_bwd(self, dy, dx, start)
    }
    fn concat0(&self, parts: &[&Tensor]) -> Result<Tensor> {
        layout::concat0(self, parts)
    }
    fn matmul(
        &self,
        a: &Tensor,
        b: &Tensor,
        bias: Option<&Tensor>,
        spec: Matmul,
        out: Option<DType>,
    ) -> Result<Tensor> {
        matmul::matmul(self, a, b, bias, spec, out)
    }
    fn matmul_into(&self, a: &Tensor, b: &Tensor, spec: Matmul, out: &Tensor) -> Result<()> {
        matmul::matmul_into(self, a, b, spec, out)
    }
    fn sum_rows_into(&self, x: &Tensor, out: &Tensor) -> Result<()> {
        matmul::sum_rows_into(self, x, out)
    }
    fn embedding_fwd(&self, ids: &Tensor, table: &Tensor) -> Result<Tensor> {
        embedding::embedding_fwd(self, ids, table, false)
    }
    fn embedding_fwd_prechecked(&self, ids: &Tensor, table: &Tensor) -> Result<Tensor> {
        embedding::embedding_fwd(self, ids, table, true)
    }
    fn embedding_bwd(&self, ids: &Tensor, dy: &Tensor, dtable: &Tensor) -> Result<()> {
        embedding::embedding_bwd(self, ids, dy, dtable, false)
    }
    fn embedding_bwd_prechecked(&self, ids: &Tensor, dy: &Tensor, dtable: &Tensor) -> Result<()> {
        embedding::embedding_bwd(self, ids, dy, dtable, true)
    }

    fn rms_norm_fwd(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        rms_norm::rms_norm_fwd(self, x, w, eps)
    }

    fn rms_norm_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        dx: &Tensor,
        dw: &Tensor,
    ) -> Result<()> {
        rms_norm::rms_norm_bwd(self, x, w, rstd, dy, dx, dw)
    }

    fn add_rms_norm_fwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        rms_norm::add_rms_norm_fwd(self, x, r, w, eps)
    }

    fn add_rms_norm_bwd(
        &self,
        sum: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        dsum: Option<&Tensor>,
        dx: &Tensor,
        dr: &Tensor,
        dw: &Tensor,
    ) -> Result<()> {
        rms_norm::add_rms_norm_bwd(self, sum, w, rstd, dy, dsum, dx, dr, dw)
    }

    fn l2_normalize_fwd(&self, x: &Tensor, axis: usize, eps: f64) -> Result<(Tensor, Tensor)> {
        l2_normalize::l2_normalize_fwd(self, x, axis, eps)
    }
    fn l2_normalize_bwd(
        &self,
        y: &Tensor,
        norm: &Tensor,
        dy: &Tensor,
        axis: usize,
        eps: f64,
        dx: &Tensor,
    ) -> Result<()> {
        l2_normalize::l2_normalize_bwd(self, y, norm, dy, axis, eps, dx)
    }
    fn softmax_fwd(&self, x: &Tensor, axis: usize) -> Result<Tensor> {
        softmax::softmax_fwd(self, x, axis)
    }
    fn softmax_bwd(&self, y: &Tensor, dy: &Tensor, axis: usize, dx: &Tensor) -> Result<()> {
        softmax::softmax_bwd(self, y, dy, axis, dx)
    }
    fn rope_fwd(&self, x: &Tensor, theta: f64, pos_offset: usize) -> Result<Tensor> {
        rope::rope_fwd(self, x, theta, pos_offset)
    }
    fn rope_bwd(&self, dy: &Tensor, theta: f64, pos_offset: usize, dx: &Tensor) -> Result<()> {
        rope::rope_bwd(self, dy, theta, pos_offset, dx)
    }
    fn attention_fwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        attention::attention_fwd(self, q, k, v, scale)
    }
    fn attention_bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        lse: &Tensor,
        d_o: &Tensor,
        scale: f64,
        dq: &Tensor,
        dk: &Tensor,
        dv: &Tensor,
    ) -> Result<()> {
        attention::attention_bwd(self, q, k, v, o, lse, d_o, scale, dq, dk, dv)
    }

    fn lm_head_ce_fwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        spec: CrossEntropy,
    ) -> Result<CrossEntropyOut> {
        lm_head_ce::lm_head_ce_fwd(self, x, w, targets, spec)
    }
    fn lm_head_ce_fwd_counted(
        &self,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        spec: CrossEntropy,
        count: usize,
    ) -> Result<CrossEntropyOut> {
        lm_head_ce::lm_head_ce_fwd_counted(self, x, w, targets, spec, count)
    }

    fn lm_head_ce_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        lse: &Tensor,
        dloss: &Tensor,
        scale: f64,
        spec: CrossEntropy,
        dx: &Tensor,
        dw: &Tensor,
    ) -> Result<()> {
        lm_head_ce::lm_head_ce_bwd(self, x, w, targets, lse, dloss, scale, spec, dx, dw)
    }

    fn soft_moe_route_fwd(
        &self,
        x: &Tensor,
        phi: &Tensor,
        scale: &Tensor,
        eps: f64,
    ) -> Result<SoftMoeRoute> {
        soft_moe::soft_moe_route_fwd(self, x, phi, scale, eps)
    }

    fn soft_moe_route_bwd(
        &self,
        route: &SoftMoeRoute,
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
        soft_moe::soft_moe_route_bwd(
            self, route, phi, scale, d_xn, d_dispatch, d_combine, eps, dx, dphi, dscale,
        )
    }

    fn soft_moe_dispatch_fwd(&self, dispatch: &Tensor, xn: &Tensor) -> Result<Tensor> {
        soft_moe::soft_moe_dispatch_fwd(self, dispatch, xn)
    }

    fn soft_moe_dispatch_bwd(
        &self,
        dispatch: &Tensor,
        xn: &Tensor,
        d_slots: &Tensor,
        d_dispatch: &Tensor,
        d_xn: &Tensor,
    ) -> Result<()> {
        soft_moe::soft_moe_dispatch_bwd(self, dispatch, xn, d_slots, d_dispatch, d_xn)
    }

    fn soft_moe_combine_fwd(&self, combine: &Tensor, ys: &Tensor) -> Result<Tensor> {
        soft_moe::soft_moe_combine_fwd(self, combine, ys)
    }

    fn soft_moe_combine_bwd(
        &self,
        combine: &Tensor,
        ys: &Tensor,
        dy: &Tensor,
        d_combine: &Tensor,
        d_ys: &Tensor,
    ) -> Result<()> {
        soft_moe::soft_moe_combine_bwd(self, combine, ys, dy, d_combine, d_ys)
    }

    fn experts_fwd(&self, x: &Tensor, w: ExpertWeights<'_>) -> Result<ExpertsOut> {
        experts::experts_fwd(self, x, w)
    }

    fn experts_bwd(
        &self,
        x: &Tensor,
        w: ExpertWeights<'_>,
        saved: &ExpertsOut,
        dy: &Tensor,
        dx: &Tensor,
        dw: ExpertWeights<'_>,
    ) -> Result<()> {
        experts::experts_bwd(self, x, w, saved, dy, dx, dw)
    }

    fn adamw_step(&self, params: &[AdamWParam], hp: AdamW) -> Result<()> {
        adamw::adamw_step(self, params, hp)
    }

    fn adamw_step_guarded(
        &self,
        params: &[AdamWParam],
        hp: AdamW,
        loss: &Tensor,
        clip: Option<f64>,
    ) -> Result<Tensor> {
        adamw::adamw_step_guarded(self, params, hp, loss, clip)
    }

    fn global_norm(&self, tensors: &[&Tensor]) -> Result<f64> {
        adamw::global_norm(self, tensors)
    }
}

//! `GpuBackend<G>`: the `Backend` ops over any [`Gpu`] — the kernels of kernels-cu through the
//! launchers, GEMMs through `Gpu::gemm`. The same code runs on `CudaGpu` and on `EmuGpu`.
//!
//! Coverage: memory ops (zeros, fill, upload, download, copy, synchronize), `rms_norm` and
//! `add_rms_norm` (fwd/bwd), `lm_head_ce` (fwd/bwd; F32 `x`/`w`), `adamw_step`, and `matmul` /
//! `matmul_into` through `Gpu::gemm_ex` (cuBLASLt on a device, the CPU GEMM under the emulator). Every other op
//! returns `Error::Gpu` "not yet implemented on the GPU backend": nothing falls back to the CPU
//! silently. Outputs are fresh allocations (poisoned under the emulator).

use super::launch::{self, CeChunk, TargetKind};
use super::{Fill, Gpu, GpuBuffer, Op};
use crate::backend::{AdamW, AdamWParam, Backend, CrossEntropy, CrossEntropyOut, Matmul};
use crate::cuda::gemm::{GemmPtrs, GemmShape};
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

    fn on_device(&self, op: &'static str, ts: &[&Tensor]) -> Result<()> {
        let dev = Device::Cuda(self.gpu.ordinal());
        for t in ts {
            if t.device() != dev || t.gpu_buffer().is_none() {
                return Err(Error::Device { op, expected: dev, found: t.device() });
            }
        }
        Ok(())
    }
}

/// The operand dtype of a GPU GEMM: both F32 or both BF16.
fn gemm_input(op: &'static str, a: &Tensor, b: &Tensor) -> Result<DType> {
    match (a.dtype(), b.dtype()) {
        (DType::F32, DType::F32) => Ok(DType::F32),
        (DType::BF16, DType::BF16) => Ok(DType::BF16),
        (x, y) => Err(Error::dtype(
            op,
            y,
            format!("a is {x}: GPU GEMM operands are both F32 or both BF16"),
        )),
    }
}

fn not_yet(op: &'static str) -> Error {
    Error::gpu(op, "not yet implemented on the GPU backend (use --device cpu for this op)")
}

fn ptr(t: &Tensor) -> u64 {
    t.gpu_buffer().map_or(0, GpuBuffer::ptr)
}

fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(op, format!("{:?} vs {:?}", a.shape(), b.shape())));
    }
    Ok(())
}

fn distinct(op: &'static str, outs: &[&Tensor], ins: &[&Tensor]) -> Result<()> {
    for (i, o) in outs.iter().enumerate() {
        if ins.iter().chain(&outs[i + 1..]).any(|t| t.shares_storage(o)) {
            return Err(Error::invalid(op, "an output shares storage with another operand"));
        }
    }
    Ok(())
}

impl<G: Gpu> GpuBackend<G> {
    fn download_targets(
        &self,
        op: &'static str,
        targets: &Tensor,
        v: usize,
        ignore: i64,
    ) -> Result<(TargetKind, usize)> {
        let kind = TargetKind::of(op, targets.dtype())?;
        let host = self.download(targets)?;
        let ids: Vec<i64> = match kind {
            TargetKind::I32 => host.to_vec::<i32>()?.into_iter().map(i64::from).collect(),
            TargetKind::U32 => host.to_vec::<u32>()?.into_iter().map(i64::from).collect(),
        };
        if let Some((i, &bad)) =
            ids.iter().enumerate().find(|(_, &a)| a != ignore && (a < 0 || a as usize >= v))
        {
            return Err(Error::invalid(
                op,
                format!("target {bad} at position {i} is outside 0..{v} and not the ignore index {ignore}"),
            ));
        }
        Ok((kind, ids.iter().filter(|&&t| t != ignore).count()))
    }

    fn ce_dims(
        &self,
        op: &'static str,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        spec: CrossEntropy,
    ) -> Result<(usize, usize, usize)> {
        self.on_device(op, &[x, w, targets])?;
        let crate::cpu::lm_head_ce::Dims { n, h, v } =
            crate::cpu::lm_head_ce::dims(op, x, w, targets, spec)?;
        for t in [x, w] {
            if t.dtype() != DType::F32 {
                return Err(Error::dtype(
                    op,
                    t.dtype(),
                    "the GPU backend takes F32 x and w for now",
                ));
            }
        }
        Ok((n, h, v))
    }
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

    fn cast(&self, _t: &Tensor, _dtype: DType) -> Result<Tensor> {
        Err(not_yet("cast"))
    }

    fn synchronize(&self) -> Result<()> {
        self.gpu.synchronize()
    }

    fn add(&self, _a: &Tensor, _b: &Tensor) -> Result<Tensor> {
        Err(not_yet("add"))
    }
    fn add_assign(&self, _dst: &Tensor, _src: &Tensor) -> Result<()> {
        Err(not_yet("add_assign"))
    }
    fn scale(&self, _x: &Tensor, _alpha: f64) -> Result<Tensor> {
        Err(not_yet("scale"))
    }
    fn scale_by_fwd(&self, _x: &Tensor, _s: &Tensor) -> Result<Tensor> {
        Err(not_yet("scale_by_fwd"))
    }
    fn scale_by_bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<()> {
        Err(not_yet("scale_by_bwd"))
    }
    fn swiglu_fwd(&self, _a: &Tensor, _b: &Tensor) -> Result<Tensor> {
        Err(not_yet("swiglu_fwd"))
    }
    fn swiglu_bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<()> {
        Err(not_yet("swiglu_bwd"))
    }
    fn transpose01(&self, _x: &Tensor) -> Result<Tensor> {
        Err(not_yet("transpose01"))
    }
    fn slice0(&self, _x: &Tensor, _start: usize, _len: usize) -> Result<Tensor> {
        Err(not_yet("slice0"))
    }
    fn slice0_bwd(&self, _dy: &Tensor, _dx: &Tensor, _start: usize) -> Result<()> {
        Err(not_yet("slice0_bwd"))
    }
    fn concat0(&self, _parts: &[&Tensor]) -> Result<Tensor> {
        Err(not_yet("concat0"))
    }
    fn matmul(
        &self,
        a: &Tensor,
        b: &Tensor,
        bias: Option<&Tensor>,
        spec: Matmul,
        out: Option<DType>,
    ) -> Result<Tensor> {
        const OP: &str = "matmul";
        self.on_device(OP, &[a, b])?;
        let g = crate::cpu::matmul::geometry(OP, a, b, spec)?;
        let input = gemm_input(OP, a, b)?;
        let output = out.unwrap_or(a.dtype());
        if !matches!(output, DType::F32 | DType::BF16) {
            return Err(Error::dtype(OP, output, "the GPU GEMM writes F32 or BF16"));
        }
        if input == DType::F32 && output == DType::BF16 {
            return Err(Error::dtype(
                OP,
                output,
                "cuBLASLt has no fp32-inputs → bf16-output GEMM: ask for F32 and cast, or give \
                 BF16 inputs",
            ));
        }
        if let Some(bias) = bias {
            self.on_device(OP, &[bias])?;
            if bias.shape() != [g.n] || bias.dtype() != output {
                return Err(Error::shape(
                    OP,
                    format!(
                        "bias must be [{}] {output} (the output dtype), got {:?} {}",
                        g.n,
                        bias.shape(),
                        bias.dtype()
                    ),
                ));
            }
        }
        let c = self.empty(&g.out_shape, output)?;
        let shape = GemmShape {
            m: g.m,
            n: g.n,
            k: g.k,
            batch: g.batch,
            trans_a: spec.trans_a,
            trans_b: spec.trans_b,
            a_batch_stride: if g.a_batched { g.m * g.k } else { 0 },
            b_batch_stride: if g.b_batched { g.k * g.n } else { 0 },
            out_batch_stride: g.m * g.n,
            input,
            output,
            bias: bias.is_some(),
        };
        let _range = super::NvtxRange::new(self.gpu.as_ref(), OP);
        if g.m * g.n * g.batch == 0 {
            return Ok(c);
        }
        if g.k == 0 {
            // cuBLASLt does not take k = 0; the product is empty: out = bias or 0.
            self.fill(&c, 0.0)?;
            return match bias {
                Some(_) => Err(not_yet("matmul with k = 0 and a bias")),
                None => Ok(c),
            };
        }
        let ptrs = GemmPtrs { a: ptr(a), b: ptr(b), out: ptr(&c), bias: bias.map(ptr) };
        // SAFETY: the geometry checked a, b (and the bias) against the shape; c was allocated
        // for it and is fresh.
        unsafe { self.gpu.gemm_ex(&shape, ptrs, spec.alpha, 0.0)? };
        Ok(c)
    }
    fn matmul_into(&self, a: &Tensor, b: &Tensor, spec: Matmul, out: &Tensor) -> Result<()> {
        const OP: &str = "matmul_into";
        self.on_device(OP, &[a, b, out])?;
        distinct(OP, &[out], &[a, b])?;
        let g = crate::cpu::matmul::geometry(OP, a, b, spec)?;
        let input = gemm_input(OP, a, b)?;
        if !matches!(out.dtype(), DType::F32 | DType::BF16) {
            return Err(Error::dtype(OP, out.dtype(), "the GPU GEMM writes F32 or BF16"));
        }
        let summed = out.shape() == [g.m, g.n] && g.batch > 1;
        if !summed && out.shape() != g.out_shape.as_slice() {
            return Err(Error::shape(
                OP,
                format!(
                    "out is {:?}, the product {:?} (or [{}, {}] summed)",
                    out.shape(),
                    g.out_shape,
                    g.m,
                    g.n
                ),
            ));
        }
        if g.m * g.n == 0 {
            return Ok(());
        }
        if g.k == 0 || g.batch == 0 {
            return if spec.beta == 1.0 {
                Ok(())
            } else {
                Err(not_yet("matmul_into with an empty product and beta ≠ 1"))
            };
        }
        let _range = super::NvtxRange::new(self.gpu.as_ref(), OP);
        let es = input.size_in_bytes() as u64;
        // Summed batches accumulate one product at a time into the same matrix, in batch order
        // (beta applies to the first only), as the CPU reference does.
        let items: Vec<(u64, u64, u64, usize, f32)> = if summed {
            (0..g.batch as u64)
                .map(|i| {
                    let ao = if g.a_batched { i * (g.m * g.k) as u64 * es } else { 0 };
                    let bo = if g.b_batched { i * (g.k * g.n) as u64 * es } else { 0 };
                    (ao, bo, 0, 1, if i == 0 { spec.beta } else { 1.0 })
                })
                .collect()
        } else {
            vec![(0, 0, 0, g.batch, spec.beta)]
        };
        for (ao, bo, oo, batch, beta) in items {
            let shape = GemmShape {
                m: g.m,
                n: g.n,
                k: g.k,
                batch,
                trans_a: spec.trans_a,
                trans_b: spec.trans_b,
                a_batch_stride: if g.a_batched && batch > 1 { g.m * g.k } else { 0 },
                b_batch_stride: if g.b_batched && batch > 1 { g.k * g.n } else { 0 },
                out_batch_stride: g.m * g.n,
                input,
                output: out.dtype(),
                bias: false,
            };
            let ptrs = GemmPtrs { a: ptr(a) + ao, b: ptr(b) + bo, out: ptr(out) + oo, bias: None };
            // SAFETY: the geometry checked a and b against the shape; out holds the product
            // (or one [m, n] matrix when summed) and overlaps neither input.
            unsafe { self.gpu.gemm_ex(&shape, ptrs, spec.alpha, beta)? };
        }
        Ok(())
    }
    fn sum_rows_into(&self, _x: &Tensor, _out: &Tensor) -> Result<()> {
        Err(not_yet("sum_rows_into"))
    }
    fn embedding_fwd(&self, _ids: &Tensor, _table: &Tensor) -> Result<Tensor> {
        Err(not_yet("embedding_fwd"))
    }
    fn embedding_bwd(&self, _ids: &Tensor, _dy: &Tensor, _dtable: &Tensor) -> Result<()> {
        Err(not_yet("embedding_bwd"))
    }

    fn rms_norm_fwd(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        const OP: &str = "rms_norm_fwd";
        self.on_device(OP, &[x, w])?;
        crate::cpu::rms_norm::hidden(OP, x, w)?;
        let y = self.empty(x.shape(), DType::F32)?;
        let rstd = self.empty(&x.shape()[..x.dims() - 1], DType::F32)?;
        launch::add_rms_norm_fwd(&self.gpu, x, None, w, eps as f32, None, &y, &rstd)?;
        Ok((y, rstd))
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
        const OP: &str = "rms_norm_bwd";
        self.on_device(OP, &[x, w, rstd, dy, dx, dw])?;
        crate::cpu::rms_norm::hidden(OP, x, w)?;
        for t in [dy, dx] {
            same_shape(OP, x, t)?;
        }
        same_shape(OP, w, dw)?;
        distinct(OP, &[dx, dw], &[x, w, rstd, dy])?;
        launch::add_rms_norm_bwd(&self.gpu, x, w, rstd, dy, None, dx, None, dw)
    }

    fn add_rms_norm_fwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        const OP: &str = "add_rms_norm_fwd";
        self.on_device(OP, &[x, r, w])?;
        same_shape(OP, x, r)?;
        crate::cpu::rms_norm::hidden(OP, x, w)?;
        let sum = self.empty(x.shape(), DType::F32)?;
        let y = self.empty(x.shape(), DType::F32)?;
        let rstd = self.empty(&x.shape()[..x.dims() - 1], DType::F32)?;
        launch::add_rms_norm_fwd(&self.gpu, x, Some(r), w, eps as f32, Some(&sum), &y, &rstd)?;
        Ok((sum, y, rstd))
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
        const OP: &str = "add_rms_norm_bwd";
        let mut ins = vec![sum, w, rstd, dy];
        ins.extend(dsum);
        self.on_device(OP, &ins)?;
        self.on_device(OP, &[dx, dr, dw])?;
        crate::cpu::rms_norm::hidden(OP, sum, w)?;
        for t in [dy, dx, dr].into_iter().chain(dsum) {
            same_shape(OP, sum, t)?;
        }
        same_shape(OP, w, dw)?;
        distinct(OP, &[dx, dr, dw], &ins)?;
        launch::add_rms_norm_bwd(&self.gpu, sum, w, rstd, dy, dsum, dx, Some(dr), dw)
    }

    fn l2_normalize_fwd(&self, _x: &Tensor, _axis: usize, _eps: f64) -> Result<(Tensor, Tensor)> {
        Err(not_yet("l2_normalize_fwd"))
    }
    fn l2_normalize_bwd(
        &self,
        _y: &Tensor,
        _norm: &Tensor,
        _dy: &Tensor,
        _axis: usize,
        _eps: f64,
        _dx: &Tensor,
    ) -> Result<()> {
        Err(not_yet("l2_normalize_bwd"))
    }
    fn softmax_fwd(&self, _x: &Tensor, _axis: usize) -> Result<Tensor> {
        Err(not_yet("softmax_fwd"))
    }
    fn softmax_bwd(&self, _y: &Tensor, _dy: &Tensor, _axis: usize, _dx: &Tensor) -> Result<()> {
        Err(not_yet("softmax_bwd"))
    }
    fn rope_fwd(&self, _x: &Tensor, _theta: f64, _pos_offset: usize) -> Result<Tensor> {
        Err(not_yet("rope_fwd"))
    }
    fn rope_bwd(&self, _dy: &Tensor, _theta: f64, _pos_offset: usize, _dx: &Tensor) -> Result<()> {
        Err(not_yet("rope_bwd"))
    }
    fn attention_fwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        Err(not_yet("attention_fwd"))
    }
    fn attention_bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _o: &Tensor,
        _lse: &Tensor,
        _d_o: &Tensor,
        _scale: f64,
        _dq: &Tensor,
        _dk: &Tensor,
        _dv: &Tensor,
    ) -> Result<()> {
        Err(not_yet("attention_bwd"))
    }

    fn lm_head_ce_fwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        spec: CrossEntropy,
    ) -> Result<CrossEntropyOut> {
        const OP: &str = "lm_head_ce_fwd";
        let (n, h, v) = self.ce_dims(OP, x, w, targets, spec)?;
        let (kind, count) = self.download_targets(OP, targets, v, spec.ignore_index)?;
        let lse = self.empty(&[n], DType::F32)?;
        let loss_sum = self.empty(&[1], DType::F32)?;
        let _range = super::NvtxRange::new(self.gpu.as_ref(), "lm_head_ce_fwd");
        if n == 0 {
            self.fill(&loss_sum, 0.0)?;
            return Ok(CrossEntropyOut { loss_sum, lse, count });
        }
        let chunk = spec.chunk_tokens.min(n);
        let nll = launch::workspace(&self.gpu, n * 4)?;
        let logits = launch::workspace(&self.gpu, chunk * v * 4)?;
        let tsize = targets.dtype().size_in_bytes() as u64;
        for r0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - r0);
            let desc = launch::gemm_desc(rows, v, h, Op::N, Op::T, DType::F32, 0.0);
            let c = CeChunk {
                logits: logits.ptr(),
                targets: ptr(targets) + r0 as u64 * tsize,
                target_kind: kind,
                lse: ptr(&lse) + r0 as u64 * 4,
                rows,
                v,
                ignore_index: spec.ignore_index,
            };
            // SAFETY: x holds n·h f32 (rows r0.. are inside), w v·h, logits chunk·v ≥ rows·v;
            // targets, lse and nll hold n elements, so the chunk's rows are inside.
            unsafe {
                launch::gemm(
                    &self.gpu,
                    "logits",
                    &desc,
                    ptr(x) + (r0 * h * 4) as u64,
                    ptr(w),
                    logits.ptr(),
                )?;
                launch::softmax_ce_fwd(&self.gpu, &c, nll.ptr() + r0 as u64 * 4)?;
            }
        }
        // SAFETY: nll holds n f32, loss_sum one.
        unsafe { launch::sum_f32(&self.gpu, nll.ptr(), n, ptr(&loss_sum))? };
        Ok(CrossEntropyOut { loss_sum, lse, count })
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
        const OP: &str = "lm_head_ce_bwd";
        let (n, h, v) = self.ce_dims(OP, x, w, targets, spec)?;
        self.on_device(OP, &[lse, dloss, dx, dw])?;
        distinct(OP, &[dx, dw], &[x, w, targets, lse, dloss])?;
        for t in [lse, dloss, dx, dw] {
            if t.dtype() != DType::F32 {
                return Err(Error::dtype(
                    OP,
                    t.dtype(),
                    "lse, dloss and the gradients must be F32",
                ));
            }
        }
        if lse.numel() != n
            || dloss.numel() != 1
            || dx.shape() != x.shape()
            || dw.shape() != w.shape()
        {
            return Err(Error::shape(
                OP,
                format!(
                    "lse {:?}, dloss {:?}, dx {:?} or dw {:?} do not fit",
                    lse.shape(),
                    dloss.shape(),
                    dx.shape(),
                    dw.shape()
                ),
            ));
        }
        let (kind, _) = self.download_targets(OP, targets, v, spec.ignore_index)?;
        if n == 0 {
            return Ok(());
        }
        let _range = super::NvtxRange::new(self.gpu.as_ref(), "lm_head_ce_bwd");
        let chunk = spec.chunk_tokens.min(n);
        let logits = launch::workspace(&self.gpu, chunk * v * 4)?;
        let tsize = targets.dtype().size_in_bytes() as u64;
        for r0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - r0);
            let x_rows = ptr(x) + (r0 * h * 4) as u64;
            let c = CeChunk {
                logits: logits.ptr(),
                targets: ptr(targets) + r0 as u64 * tsize,
                target_kind: kind,
                lse: ptr(lse) + r0 as u64 * 4,
                rows,
                v,
                ignore_index: spec.ignore_index,
            };
            let f = DType::F32;
            // SAFETY: as in the forward; dx rows r0.. lie inside n·h, dw is v·h, and neither
            // overlaps the inputs or the logits workspace (checked / fresh).
            unsafe {
                let logits_desc = launch::gemm_desc(rows, v, h, Op::N, Op::T, f, 0.0);
                launch::gemm(&self.gpu, "logits", &logits_desc, x_rows, ptr(w), logits.ptr())?;
                launch::softmax_ce_bwd(&self.gpu, &c, ptr(dloss), scale as f32)?;
                let dx_desc = launch::gemm_desc(rows, h, v, Op::N, Op::N, f, 1.0);
                launch::gemm(
                    &self.gpu,
                    "dx",
                    &dx_desc,
                    logits.ptr(),
                    ptr(w),
                    ptr(dx) + (r0 * h * 4) as u64,
                )?;
                let dw_desc = launch::gemm_desc(v, h, rows, Op::T, Op::N, f, 1.0);
                launch::gemm(&self.gpu, "dw", &dw_desc, logits.ptr(), x_rows, ptr(dw))?;
            }
        }
        Ok(())
    }

    fn adamw_step(&self, params: &[AdamWParam], hp: AdamW) -> Result<()> {
        const OP: &str = "adamw_step";
        for p in params {
            let mut all = vec![&p.param, &p.grad, &p.m, &p.v];
            all.extend(p.copy.as_ref());
            self.on_device(OP, &all)?;
            let mut outs = vec![&p.param, &p.m, &p.v];
            outs.extend(p.copy.as_ref());
            distinct(OP, &outs, &[&p.grad])?;
        }
        launch::adamw_step(&self.gpu, params, hp)
    }

    fn global_norm(&self, _tensors: &[&Tensor]) -> Result<f64> {
        Err(not_yet("global_norm"))
    }
}

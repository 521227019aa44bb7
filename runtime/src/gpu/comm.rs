//! Collectives over device tensors by staging through the host: `StagedComm` wraps a host
//! communicator (the in-process one in tests) and, for each collective, downloads the device
//! operands, runs the host collective, and uploads the results. It is the "NCCL" of `EmuGpu`
//! (whose device memory is host memory anyway) and works for any `Gpu`; real multi-GPU runs use
//! NCCL on device memory instead.
//!
//! Conventions: those of [`crate::comm`] (same collectives in the same order on every rank,
//! results combined in rank order, so bit-identical on every rank). CPU tensors pass through
//! unchanged, so a group may mix CPU and device ranks.

use crate::comm::{Communicator, ReduceOp};
use crate::{Result, Tensor};

/// A [`Communicator`] for device tensors over a host communicator `C`.
pub struct StagedComm<C: Communicator> {
    inner: C,
}

impl<C: Communicator> StagedComm<C> {
    pub fn new(inner: C) -> Self {
        StagedComm { inner }
    }
}

/// The host image of `t` (the tensor itself when it is already on the CPU).
fn stage_in(t: &Tensor) -> Result<Tensor> {
    let Some(buf) = t.gpu_buffer() else { return Ok(t.clone()) };
    let mut bytes = vec![0u8; t.size_in_bytes()];
    // SAFETY: the tensor's buffer holds exactly size_in_bytes bytes; download waits for queued
    // work (stream order) and for the data.
    unsafe { buf.gpu().download(buf.ptr(), &mut bytes)? };
    Tensor::from_bytes(&bytes, t.dtype(), t.shape())
}

/// Writes the host image `h` back into the device tensor `t` (nothing for a CPU tensor).
fn stage_out(h: &Tensor, t: &Tensor) -> Result<()> {
    let Some(buf) = t.gpu_buffer() else { return Ok(()) };
    let bytes = h.to_bytes()?;
    // SAFETY: `h` has `t`'s shape and dtype, so exactly the buffer's bytes.
    unsafe { buf.gpu().upload(buf.ptr(), &bytes) }
}

impl<C: Communicator> Communicator for StagedComm<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce(&mut self, t: &Tensor, op: ReduceOp) -> Result<()> {
        let h = stage_in(t)?;
        self.inner.all_reduce(&h, op)?;
        stage_out(&h, t)
    }

    fn reduce_scatter(&mut self, input: &Tensor, output: &Tensor, op: ReduceOp) -> Result<()> {
        let (hi, ho) = (stage_in(input)?, stage_in(output)?);
        self.inner.reduce_scatter(&hi, &ho, op)?;
        stage_out(&ho, output)
    }

    fn all_gather(&mut self, input: &Tensor, output: &Tensor) -> Result<()> {
        let (hi, ho) = (stage_in(input)?, stage_in(output)?);
        self.inner.all_gather(&hi, &ho)?;
        stage_out(&ho, output)
    }

    fn broadcast(&mut self, t: &Tensor, root: usize) -> Result<()> {
        let h = stage_in(t)?;
        self.inner.broadcast(&h, root)?;
        stage_out(&h, t)
    }
}

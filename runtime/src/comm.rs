//! Collectives between ranks: the `Communicator` trait (NCCL implements it on GPUs) and
//! `InProcessComm`, its implementation for ranks that are threads of one process (CPU data
//! parallelism and tests).
//!
//! Conventions: every rank calls the same collectives in the same order with tensors of the same
//! shape and dtype. Reductions combine the ranks' contributions in rank order
//! (`((x₀ + x₁) + x₂) + …`), so every rank gets bit-identical results and a run is deterministic.
//! A communicator is used by one thread and handed out by `&mut` (it is deliberately not `Sync`).

use crate::{CpuStorage, DType, Error, Result, Tensor};
use std::marker::PhantomData;
use std::sync::{Arc, Condvar, Mutex};

/// How contributions are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the number of ranks.
    Avg,
}

/// Collective operations over a fixed group of ranks.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// `t ← op over ranks of t`, in place.
    fn all_reduce(&mut self, t: &Tensor, op: ReduceOp) -> Result<()>;
    /// `output ← rank's slice of (op over ranks of input)`; `input` has `world × output.numel()`
    /// elements and rank r receives the r-th contiguous slice.
    fn reduce_scatter(&mut self, input: &Tensor, output: &Tensor, op: ReduceOp) -> Result<()>;
    /// `output ← concat over ranks of input` (rank order); `output` has `world × input.numel()`.
    fn all_gather(&mut self, input: &Tensor, output: &Tensor) -> Result<()>;
    /// `t ← t of rank root`, in place.
    fn broadcast(&mut self, t: &Tensor, root: usize) -> Result<()>;
}

/// A reusable barrier that a failing rank can break, so the others get an error instead of
/// waiting forever.
struct AbortableBarrier {
    /// (threads arrived in this generation, generation, aborted by rank)
    state: Mutex<(usize, u64, Option<usize>)>,
    cv: Condvar,
    n: usize,
}

impl AbortableBarrier {
    fn new(n: usize) -> Self {
        AbortableBarrier { state: Mutex::new((0, 0, None)), cv: Condvar::new(), n }
    }

    fn wait(&self) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let aborted = |r: usize| {
            Error::invalid(
                "InProcessComm",
                format!("rank {r} failed; the collective was abandoned"),
            )
        };
        if let Some(r) = st.2 {
            return Err(aborted(r));
        }
        let gen = st.1;
        st.0 += 1;
        if st.0 == self.n {
            st.0 = 0;
            st.1 += 1;
            self.cv.notify_all();
            return Ok(());
        }
        while st.1 == gen && st.2.is_none() {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        match st.2 {
            Some(r) if st.1 == gen => Err(aborted(r)),
            _ => Ok(()),
        }
    }

    fn abort(&self, rank: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.2.get_or_insert(rank);
        self.cv.notify_all();
    }
}

/// The exchange area of an in-process group.
struct Shared {
    world: usize,
    barrier: AbortableBarrier,
    slots: Mutex<Vec<Option<CpuStorage>>>,
}

/// Breaks an in-process group on behalf of one rank (see [`InProcessComm::abort`]).
#[derive(Clone)]
pub struct AbortHandle {
    rank: usize,
    shared: Arc<Shared>,
}

impl AbortHandle {
    pub fn abort(&self) {
        self.shared.barrier.abort(self.rank);
    }
}

/// One rank of an in-process group (see the module docs).
pub struct InProcessComm {
    rank: usize,
    shared: Arc<Shared>,
    /// Not `Sync`: one thread drives a rank.
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

impl InProcessComm {
    /// A group of `world` ranks; hand one to each thread.
    pub fn group(world: usize) -> Result<Vec<InProcessComm>> {
        if world == 0 {
            return Err(Error::invalid("InProcessComm::group", "a group needs at least one rank"));
        }
        let shared = Arc::new(Shared {
            world,
            barrier: AbortableBarrier::new(world),
            slots: Mutex::new(vec![None; world]),
        });
        Ok((0..world)
            .map(|rank| InProcessComm { rank, shared: shared.clone(), _not_sync: PhantomData })
            .collect())
    }

    /// Breaks the group: every rank waiting in (or later entering) a collective gets an error
    /// naming this rank. A rank that fails calls this so the others do not wait forever.
    pub fn abort(&self) {
        self.shared.barrier.abort(self.rank);
    }

    /// A handle that can break the group from elsewhere (e.g. a guard dropped on error).
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle { rank: self.rank, shared: self.shared.clone() }
    }

    /// Deposits this rank's data, waits for every rank, runs `f` on all contributions (in rank
    /// order), then waits again so nobody overwrites a slot that is still being read.
    fn exchange<R>(&mut self, mine: CpuStorage, f: impl FnOnce(&[CpuStorage]) -> R) -> Result<R> {
        {
            let mut slots = self.shared.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots[self.rank] = Some(mine);
        }
        // Why: every contribution must be deposited before anyone reads them.
        self.shared.barrier.wait()?;
        let result = {
            let slots = self.shared.slots.lock().unwrap_or_else(|p| p.into_inner());
            let all: Option<Vec<CpuStorage>> = slots.iter().cloned().collect();
            all.map(|v| f(&v))
        };
        // Why: the next collective must not overwrite a slot another rank is still reading.
        self.shared.barrier.wait()?;
        result.ok_or_else(|| {
            Error::invalid("InProcessComm", "a rank did not contribute to the collective")
        })
    }
}

fn float_check(op: &'static str, t: &Tensor) -> Result<()> {
    if t.device() != crate::Device::Cpu {
        return Err(Error::Device { op, expected: crate::Device::Cpu, found: t.device() });
    }
    if !matches!(t.dtype(), DType::F32 | DType::F64) {
        return Err(Error::dtype(op, t.dtype(), "collectives reduce F32 or F64 tensors"));
    }
    Ok(())
}

/// `op` over all contributions, summed in the dtype in rank order.
fn reduce(all: &[CpuStorage], op: ReduceOp) -> CpuStorage {
    match &all[0] {
        CpuStorage::F32(first) => {
            let mut acc = first.clone();
            for s in &all[1..] {
                if let CpuStorage::F32(v) = s {
                    acc.iter_mut().zip(v).for_each(|(a, b)| *a += *b);
                }
            }
            if op == ReduceOp::Avg {
                let n = all.len() as f32;
                acc.iter_mut().for_each(|a| *a /= n);
            }
            CpuStorage::F32(acc)
        }
        CpuStorage::F64(first) => {
            let mut acc = first.clone();
            for s in &all[1..] {
                if let CpuStorage::F64(v) = s {
                    acc.iter_mut().zip(v).for_each(|(a, b)| *a += *b);
                }
            }
            if op == ReduceOp::Avg {
                let n = all.len() as f64;
                acc.iter_mut().for_each(|a| *a /= n);
            }
            CpuStorage::F64(acc)
        }
        other => other.clone(),
    }
}

fn consistent(op: &'static str, all: &[CpuStorage]) -> Result<()> {
    let (d, n) = (all[0].dtype(), all[0].len());
    if all.iter().any(|s| s.dtype() != d || s.len() != n) {
        return Err(Error::shape(op, "ranks passed tensors of different sizes or dtypes"));
    }
    Ok(())
}

impl Communicator for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce(&mut self, t: &Tensor, op: ReduceOp) -> Result<()> {
        const OP: &str = "all_reduce";
        float_check(OP, t)?;
        let mine = t.cpu_read()?.clone();
        let out = self.exchange(mine, |all| consistent(OP, all).map(|_| reduce(all, op)))??;
        *t.cpu_write()? = out;
        Ok(())
    }

    fn reduce_scatter(&mut self, input: &Tensor, output: &Tensor, op: ReduceOp) -> Result<()> {
        const OP: &str = "reduce_scatter";
        float_check(OP, input)?;
        if input.dtype() != output.dtype() || input.numel() != output.numel() * self.shared.world {
            return Err(Error::shape(
                OP,
                format!("input {:?} must hold world × output {:?}", input.shape(), output.shape()),
            ));
        }
        let mine = input.cpu_read()?.clone();
        let full = self.exchange(mine, |all| consistent(OP, all).map(|_| reduce(all, op)))??;
        let n = output.numel();
        let part = match full {
            CpuStorage::F32(v) => CpuStorage::F32(v[self.rank * n..(self.rank + 1) * n].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[self.rank * n..(self.rank + 1) * n].to_vec()),
            other => other,
        };
        *output.cpu_write()? = part;
        Ok(())
    }

    fn all_gather(&mut self, input: &Tensor, output: &Tensor) -> Result<()> {
        const OP: &str = "all_gather";
        float_check(OP, input)?;
        if input.dtype() != output.dtype() || output.numel() != input.numel() * self.shared.world {
            return Err(Error::shape(
                OP,
                format!("output {:?} must hold world × input {:?}", output.shape(), input.shape()),
            ));
        }
        let mine = input.cpu_read()?.clone();
        let out = self.exchange(mine, |all| {
            consistent(OP, all)?;
            Ok::<_, Error>(match &all[0] {
                CpuStorage::F32(_) => CpuStorage::F32(
                    all.iter()
                        .flat_map(
                            |s| if let CpuStorage::F32(v) = s { v.clone() } else { Vec::new() },
                        )
                        .collect(),
                ),
                _ => CpuStorage::F64(
                    all.iter()
                        .flat_map(
                            |s| if let CpuStorage::F64(v) = s { v.clone() } else { Vec::new() },
                        )
                        .collect(),
                ),
            })
        })??;
        *output.cpu_write()? = out;
        Ok(())
    }

    fn broadcast(&mut self, t: &Tensor, root: usize) -> Result<()> {
        const OP: &str = "broadcast";
        float_check(OP, t)?;
        if root >= self.shared.world {
            return Err(Error::invalid(
                OP,
                format!("root {root} is not a rank of a world of {}", self.shared.world),
            ));
        }
        let mine = t.cpu_read()?.clone();
        let out = self.exchange(mine, |all| consistent(OP, all).map(|_| all[root].clone()))??;
        *t.cpu_write()? = out;
        Ok(())
    }
}

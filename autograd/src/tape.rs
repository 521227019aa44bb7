//! The tape: nodes (values and their gradients) and records (ops with backward closures).

use crate::params::{grad_dtype, ParamId, ParamStore};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;
use steel_runtime::{Backend, Tensor};

/// A variable on a tape: an index, cheap to copy. Only meaningful with the tape that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub(crate) usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// An input or constant given by the caller; its gradient is kept for `Tape::grad`.
    Leaf,
    /// A parameter: its gradient buffer is the store's, shared across tapes.
    Param,
    /// The output of a recorded op; freed once its producer's backward has run.
    Op,
}

struct Node {
    value: Option<Tensor>,
    grad: Option<Tensor>,
    requires_grad: bool,
    kind: Kind,
}

/// The backward of one op: reads output gradients, accumulates into input gradients.
pub(crate) type BackwardFn = Box<dyn FnOnce(&mut BackwardCtx<'_>) -> Result<()> + Send>;

struct Record {
    name: &'static str,
    /// The trace range the op was recorded in (see `steel_runtime::trace`).
    scope: String,
    inputs: Vec<Var>,
    outputs: Vec<Var>,
    backward: BackwardFn,
}

/// A record of operations for reverse-mode differentiation. See the crate docs.
pub struct Tape {
    backend: Arc<dyn Backend>,
    nodes: Vec<Node>,
    records: Vec<Record>,
    grad_enabled: bool,
    params: HashMap<ParamId, Var>,
}

impl Tape {
    /// A tape that records ops for backward.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Tape {
            backend,
            nodes: Vec::new(),
            records: Vec::new(),
            grad_enabled: true,
            params: HashMap::new(),
        }
    }

    /// A tape that records nothing: ops only compute their outputs (inference).
    pub fn no_grad(backend: Arc<dyn Backend>) -> Self {
        Tape { grad_enabled: false, ..Tape::new(backend) }
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled
    }

    /// Number of ops recorded and not yet consumed by `backward`.
    pub fn num_records(&self) -> usize {
        self.records.len()
    }

    fn push_node(&mut self, value: Tensor, requires_grad: bool, kind: Kind) -> Var {
        self.nodes.push(Node { value: Some(value), grad: None, requires_grad, kind });
        Var(self.nodes.len() - 1)
    }

    /// An input or constant. With `requires_grad`, its gradient is available after backward.
    pub fn leaf(&mut self, value: Tensor, requires_grad: bool) -> Var {
        let rg = requires_grad && self.grad_enabled;
        self.push_node(value, rg, Kind::Leaf)
    }

    /// The variable of a parameter (the same one each time it is asked for on this tape).
    pub fn param(&mut self, store: &ParamStore, id: ParamId) -> Result<Var> {
        if let Some(&v) = self.params.get(&id) {
            return Ok(v);
        }
        let value = store.get(id).compute_value().clone();
        let var = if self.grad_enabled {
            let grad = store.grad_buffer(id)?;
            let v = self.push_node(value, true, Kind::Param);
            self.nodes[v.0].grad = Some(grad);
            v
        } else {
            self.push_node(value, false, Kind::Leaf)
        };
        self.params.insert(id, var);
        Ok(var)
    }

    fn node(&self, v: Var) -> Result<&Node> {
        self.nodes
            .get(v.0)
            .ok_or_else(|| Error::Tape(format!("variable {} does not belong to this tape", v.0)))
    }

    /// The value of a variable (an error once backward has freed it).
    pub fn value(&self, v: Var) -> Result<&Tensor> {
        self.node(v)?.value.as_ref().ok_or_else(|| {
            Error::Tape(format!("the value of variable {} was freed by backward", v.0))
        })
    }

    /// The gradient of a leaf or parameter after backward (None if no gradient reached it).
    pub fn grad(&self, v: Var) -> Result<Option<Tensor>> {
        Ok(self.node(v)?.grad.clone())
    }

    pub fn requires_grad(&self, v: Var) -> bool {
        self.nodes.get(v.0).is_some_and(|n| n.requires_grad)
    }

    /// Records an op: `outputs` are its results, `backward` its gradient rule. Nothing is
    /// recorded when gradients are disabled or no input requires a gradient.
    pub(crate) fn record(
        &mut self,
        name: &'static str,
        inputs: &[Var],
        outputs: Vec<Tensor>,
        backward: impl FnOnce(&mut BackwardCtx<'_>) -> Result<()> + Send + 'static,
    ) -> Result<Vec<Var>> {
        for &v in inputs {
            self.node(v)?;
        }
        let rg = self.grad_enabled && inputs.iter().any(|&v| self.nodes[v.0].requires_grad);
        let outs: Vec<Var> = outputs.into_iter().map(|t| self.push_node(t, rg, Kind::Op)).collect();
        if rg {
            self.records.push(Record {
                name,
                scope: steel_runtime::trace::current(),
                inputs: inputs.to_vec(),
                outputs: outs.clone(),
                backward: Box::new(backward),
            });
        }
        Ok(outs)
    }

    /// Reverse-mode pass from `loss`, seeded with ones (`d loss / d loss = 1`). Consumes the
    /// records; parameter gradients accumulate into the store, leaf gradients stay readable.
    pub fn backward(&mut self, loss: Var) -> Result<()> {
        let node = self.node(loss)?;
        if !node.requires_grad {
            return Err(Error::Tape("backward from a value that does not depend on any parameter or input requiring a gradient".into()));
        }
        let value = self.value(loss)?.clone();
        let seed = self.backend.zeros(value.shape(), grad_dtype(value.dtype()))?;
        self.backend.fill(&seed, 1.0)?;
        // The root's gradient is exactly the seed of ones unless it already held one (nothing
        // recorded after the root can reach it: those ops' outputs get no gradient).
        let unit_root = match &self.nodes[loss.0].grad {
            Some(g) => {
                self.backend.add_assign(g, &seed)?;
                None
            }
            None => {
                self.nodes[loss.0].grad = Some(seed);
                Some(loss)
            }
        };
        while let Some(rec) = self.records.pop() {
            let out_grads: Vec<Option<Tensor>> =
                rec.outputs.iter().map(|o| self.nodes[o.0].grad.clone()).collect();
            if out_grads.iter().any(Option::is_some) {
                // The op's forward scope, replayed as a backward range: fwd/layer.3/attention
                // becomes bwd/layer.3/attention.
                let _range = (!rec.scope.is_empty()).then(|| {
                    let name = match rec.scope.strip_prefix("fwd") {
                        Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                            format!("bwd{rest}")
                        }
                        _ => format!("bwd/{}", rec.scope),
                    };
                    steel_runtime::trace::range_absolute(&name)
                });
                let backend = self.backend.clone();
                let unit: Vec<bool> = rec.outputs.iter().map(|o| Some(*o) == unit_root).collect();
                let mut ctx = BackwardCtx {
                    backend: backend.as_ref(),
                    nodes: &mut self.nodes,
                    inputs: &rec.inputs,
                    out_grads,
                    unit,
                    extra: Vec::new(),
                };
                (rec.backward)(&mut ctx).map_err(|e| match e {
                    Error::Runtime(r) => Error::Tape(format!("backward of {}: {r}", rec.name)),
                    other => other,
                })?;
                let extra = std::mem::take(&mut ctx.extra);
                for (v, t) in extra {
                    let g = self.grad_buffer(v)?;
                    self.backend.add_assign(&g, &t)?;
                }
            }
            // The outputs' values and gradients are not needed any more: every consumer of
            // them was recorded later and has already run.
            for o in &rec.outputs {
                if self.nodes[o.0].kind == Kind::Op && *o != loss {
                    self.nodes[o.0].value = None;
                    self.nodes[o.0].grad = None;
                }
            }
        }
        Ok(())
    }

    fn grad_buffer(&mut self, v: Var) -> Result<Tensor> {
        grad_buffer(self.backend.as_ref(), &mut self.nodes, v)
    }
}

fn grad_buffer(backend: &dyn Backend, nodes: &mut [Node], v: Var) -> Result<Tensor> {
    let n = &mut nodes[v.0];
    if let Some(g) = &n.grad {
        return Ok(g.clone());
    }
    let value =
        n.value.as_ref().ok_or_else(|| Error::Tape(format!("variable {} has no value", v.0)))?;
    let g = backend.zeros(value.shape(), grad_dtype(value.dtype()))?;
    n.grad = Some(g.clone());
    Ok(g)
}

/// What a backward closure sees: the gradients of the op's outputs and gradient buffers for
/// its inputs, into which it must accumulate (`+=`).
pub struct BackwardCtx<'a> {
    backend: &'a dyn Backend,
    nodes: &'a mut Vec<Node>,
    inputs: &'a [Var],
    out_grads: Vec<Option<Tensor>>,
    /// Per output: its gradient is the backward's seed of ones (the output is the root).
    unit: Vec<bool>,
    /// Buffers handed out for the second and later occurrence of one variable among the
    /// inputs; added into its gradient after the closure ran (so no op sees aliased outputs).
    extra: Vec<(Var, Tensor)>,
}

impl BackwardCtx<'_> {
    pub fn backend(&self) -> &dyn Backend {
        self.backend
    }

    /// Whether output `k`'s gradient is exactly ones: the output is the root of this backward
    /// (a loss). Ops use it to skip scaling by an upstream gradient without reading it back.
    pub fn out_grad_is_unit(&self, k: usize) -> bool {
        self.unit.get(k).copied().unwrap_or(false)
    }

    /// The gradient of output `k`, if one reached it.
    pub fn out_grad(&self, k: usize) -> Option<&Tensor> {
        self.out_grads.get(k).and_then(Option::as_ref)
    }

    /// The gradient of output `k`, or zeros shaped like `like` when none reached it.
    pub fn out_grad_or_zeros(&self, k: usize, like: &Tensor) -> Result<Tensor> {
        match self.out_grad(k) {
            Some(g) => Ok(g.clone()),
            None => Ok(self.backend.zeros(like.shape(), grad_dtype(like.dtype()))?),
        }
    }

    /// Whether input `i` needs a gradient (ops may skip work for it when not).
    pub fn needs(&self, i: usize) -> bool {
        self.nodes[self.inputs[i].0].requires_grad
    }

    /// The buffer to accumulate input `i`'s gradient into. For an input that needs no gradient
    /// this is a scratch buffer, so fused backward ops can always write all their outputs.
    pub fn grad(&mut self, i: usize) -> Result<Tensor> {
        let v = self.inputs[i];
        let node = &self.nodes[v.0];
        let value =
            node.value.as_ref().ok_or_else(|| Error::Tape(format!("input {i} has no value")))?;
        if !node.requires_grad || self.inputs[..i].contains(&v) {
            let t = self.backend.zeros(value.shape(), grad_dtype(value.dtype()))?;
            if node.requires_grad {
                self.extra.push((v, t.clone()));
            }
            return Ok(t);
        }
        grad_buffer(self.backend, self.nodes, v)
    }
}

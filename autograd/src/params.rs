//! Named parameters: one store, one iterator over `(name, value, grad, options)` that the
//! optimizer, gradient norms, checkpoints and tests all use.

use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use steel_runtime::{Backend, DType, Tensor};

/// Per-parameter options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamOptions {
    /// Whether AdamW's decoupled weight decay applies (the reference applies it everywhere).
    pub weight_decay: bool,
}

impl Default for ParamOptions {
    fn default() -> Self {
        ParamOptions { weight_decay: true }
    }
}

/// Index of a parameter in its store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);

/// One named parameter. The gradient buffer is allocated on first use by a tape.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    /// The master weights (fp32, or f64 in gradient checks).
    pub value: Tensor,
    pub options: ParamOptions,
    grad: Mutex<Option<Tensor>>,
    /// The bf16 working copy that forward reads under bf16 mixed precision (the fused AdamW
    /// rewrites it in the same pass as the master); `None`: forward reads the master.
    working: Option<Tensor>,
}

impl Param {
    /// The bf16 working copy, if this parameter has one.
    pub fn working(&self) -> Option<&Tensor> {
        self.working.as_ref()
    }

    /// What forward reads: the working copy, else the master.
    pub fn compute_value(&self) -> &Tensor {
        self.working.as_ref().unwrap_or(&self.value)
    }

    /// The gradient accumulated so far, if any backward has reached this parameter.
    pub fn grad(&self) -> Option<Tensor> {
        self.grad.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The dtype gradients of a value of `dtype` are kept in.
pub(crate) fn grad_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// An ordered collection of named parameters on one backend.
pub struct ParamStore {
    backend: Arc<dyn Backend>,
    params: Vec<Param>,
    by_name: HashMap<String, ParamId>,
}

impl ParamStore {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        ParamStore { backend, params: Vec::new(), by_name: HashMap::new() }
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Adds a parameter; names are unique.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        value: Tensor,
        options: ParamOptions,
    ) -> Result<ParamId> {
        let name = name.into();
        if self.by_name.contains_key(&name) {
            return Err(Error::Tape(format!("parameter {name:?} is defined twice")));
        }
        if value.device() != self.backend.device() {
            return Err(Error::Tape(format!(
                "parameter {name:?} is on {} but the store's backend runs on {}",
                value.device(),
                self.backend.device()
            )));
        }
        let id = ParamId(self.params.len());
        self.by_name.insert(name.clone(), id);
        self.params.push(Param { name, value, options, grad: Mutex::new(None), working: None });
        Ok(id)
    }

    pub fn get(&self, id: ParamId) -> &Param {
        &self.params[id.0]
    }

    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.by_name.get(name).copied()
    }

    /// Every parameter in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &Param)> {
        self.params.iter().enumerate().map(|(i, p)| (ParamId(i), p))
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.params.iter().map(|p| p.value.numel()).sum()
    }

    /// The gradient buffer of `id`, allocated (zeros) on first use.
    pub fn grad_buffer(&self, id: ParamId) -> Result<Tensor> {
        let p = &self.params[id.0];
        let mut g = p.grad.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = &*g {
            return Ok(t.clone());
        }
        let t = self.backend.zeros(p.value.shape(), grad_dtype(p.value.dtype()))?;
        *g = Some(t.clone());
        Ok(t)
    }

    /// Gives parameter `id` a working copy in `dtype` (bf16 mixed precision), cast from its
    /// master now; the optimizer keeps it in step with the master from then on.
    pub fn set_working_copy(&mut self, id: ParamId, dtype: DType) -> Result<()> {
        let p = self
            .params
            .get_mut(id.0)
            .ok_or_else(|| Error::Tape(format!("no parameter {}", id.0)))?;
        p.working = Some(self.backend.cast(&p.value, dtype)?);
        Ok(())
    }

    /// Sets every allocated gradient to zero (after an optimizer step).
    pub fn zero_grads(&self) -> Result<()> {
        for p in &self.params {
            if let Some(g) = p.grad() {
                self.backend.fill(&g, 0.0)?;
            }
        }
        Ok(())
    }

    /// Global L2 norm of all allocated gradients (deterministic).
    pub fn grad_norm(&self) -> Result<f64> {
        let grads: Vec<Tensor> = self.params.iter().filter_map(Param::grad).collect();
        let refs: Vec<&Tensor> = grads.iter().collect();
        Ok(self.backend.global_norm(&refs)?)
    }
}

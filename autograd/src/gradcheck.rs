//! Finite-difference gradient checks of any function built on the tape, in f64.
//!
//! The function's output is reduced to a scalar `L = Σ_i r_i · out_i` with fixed pseudo-random
//! weights `r` (so every output element matters); the tape's gradient of L with respect to every
//! input element is compared with the central difference `(L(x + h) − L(x − h)) / 2h`.

use crate::{Error, Result, Tape, Var};
use std::sync::Arc;
use steel_runtime::{Backend, DType, Matmul, Tensor};

/// Options of a gradient check.
#[derive(Clone, Copy, Debug)]
pub struct GradCheck {
    /// Finite-difference step.
    pub step: f64,
    /// Largest accepted `|analytic − numeric| / max(1, |numeric|)`.
    pub tolerance: f64,
    /// Seed of the output weights.
    pub seed: u64,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck { step: 1e-6, tolerance: 1e-6, seed: 0x5eed }
    }
}

/// The worst disagreement found.
#[derive(Clone, Debug)]
pub struct GradCheckReport {
    pub max_error: f64,
    /// `input i, element j: analytic a vs numeric n` for the worst element.
    pub worst: String,
    pub elements_checked: usize,
}

/// Deterministic weights in ±[0.5, 1.5] (never zero).
fn weights(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            let mag = 0.5 + u;
            if s & 1 == 0 {
                mag
            } else {
                -mag
            }
        })
        .collect()
}

fn weighted_sum(tape: &mut Tape, out: Var, seed: u64) -> Result<Var> {
    let n = tape.value(out)?.numel();
    let r = Tensor::from_vec(weights(n, seed), &[n, 1])?;
    let r = tape.leaf(tape.backend().upload(&r)?, false);
    let flat = tape.reshape(out, &[1, n])?;
    tape.matmul(flat, r, None, Matmul::NN)
}

fn eval<F>(backend: &Arc<dyn Backend>, inputs: &[Tensor], f: &F, seed: u64) -> Result<f64>
where
    F: Fn(&mut Tape, &[Var]) -> Result<Var>,
{
    let mut tape = Tape::no_grad(backend.clone());
    let vars: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.clone(), false)).collect();
    let out = f(&mut tape, &vars)?;
    let l = weighted_sum(&mut tape, out, seed)?;
    Ok(backend.download(tape.value(l)?)?.scalar()?)
}

/// Checks the tape's gradients of `f` with respect to every element of every F64 input.
pub fn check_gradients<F>(
    backend: Arc<dyn Backend>,
    inputs: &[Tensor],
    f: F,
    opts: GradCheck,
) -> Result<GradCheckReport>
where
    F: Fn(&mut Tape, &[Var]) -> Result<Var>,
{
    if let Some(t) = inputs.iter().find(|t| t.dtype() != DType::F64) {
        return Err(Error::Tape(format!(
            "gradient checks run in F64, got an input of {}",
            t.dtype()
        )));
    }
    let mut tape = Tape::new(backend.clone());
    let vars: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.clone(), true)).collect();
    let out = f(&mut tape, &vars)?;
    let l = weighted_sum(&mut tape, out, opts.seed)?;
    tape.backward(l)?;
    let mut report = GradCheckReport { max_error: 0.0, worst: String::new(), elements_checked: 0 };
    for (i, (input, &var)) in inputs.iter().zip(&vars).enumerate() {
        let analytic = match tape.grad(var)? {
            Some(g) => backend.download(&g)?.to_vec::<f64>()?,
            None => vec![0.0; input.numel()],
        };
        let base = backend.download(input)?.to_vec::<f64>()?;
        for j in 0..base.len() {
            let probe = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[j] += delta;
                let mut ins = inputs.to_vec();
                ins[i] = backend.upload(&Tensor::from_vec(v, input.shape())?)?;
                eval(&backend, &ins, &f, opts.seed)
            };
            let numeric = (probe(opts.step)? - probe(-opts.step)?) / (2.0 * opts.step);
            let err = (analytic[j] - numeric).abs() / numeric.abs().max(1.0);
            report.elements_checked += 1;
            if err > report.max_error || err.is_nan() {
                report.max_error = if err.is_nan() { f64::INFINITY } else { err };
                report.worst = format!(
                    "input {i}, element {j}: analytic {} vs numeric {numeric}",
                    analytic[j]
                );
            }
        }
    }
    if report.max_error > opts.tolerance {
        return Err(Error::Tape(format!(
            "gradient check failed: error {:.3e} > tolerance {:.1e} at {}",
            report.max_error, opts.tolerance, report.worst
        )));
    }
    Ok(report)
}

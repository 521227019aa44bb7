//! Helpers shared by the runtime's integration tests: seeded random tensors (never zeros),
//! central-difference gradients, tolerance asserts with informative messages, and the proptest
//! configuration.
//!
//! Tolerance convention: an element passes when `|got − want| ≤ tol · max(1, |want|)`
//! (absolute near zero, relative for large values), and the assert reports the worst element.

#![allow(dead_code)]

use proptest::test_runner::Config as ProptestConfig;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use steel_runtime::cpu::CpuBackend;
use steel_runtime::{Backend, DType, Tensor};

/// The backend under test.
pub fn be() -> CpuBackend {
    CpuBackend::new()
}

/// `n` values uniform in ±[0.1, 1] with a random sign: never zero, never tiny.
pub fn rand_vals(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mag = rng.random_range(0.1..1.0f64);
            if rng.random::<bool>() {
                mag
            } else {
                -mag
            }
        })
        .collect()
}

/// An F64 tensor of `shape` filled with `rand_vals`.
pub fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    rand_tensor_dt(shape, DType::F64, seed)
}

/// A tensor of `dtype` filled with `rand_vals` (rounded to the dtype).
pub fn rand_tensor_dt(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f64(&rand_vals(n, seed), shape, dtype).unwrap()
}

/// `n` integer ids in `0..limit` (I32), seeded.
pub fn rand_ids(n: usize, limit: usize, seed: u64) -> Vec<i32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..limit as i32)).collect()
}

/// An I32 tensor from `ids`.
pub fn ids_tensor(ids: &[i32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(ids, shape).unwrap()
}

/// A zero-filled F64 tensor of `t`'s shape (a fresh gradient buffer).
pub fn zeros_like(t: &Tensor) -> Tensor {
    Tensor::zeros(t.shape(), t.dtype())
}

/// The elements of `t` as f64.
pub fn vals(t: &Tensor) -> Vec<f64> {
    t.to_f64_vec().unwrap()
}

/// `Σ_i r_i · t_i` in f64.
pub fn weighted_sum(t: &Tensor, r: &Tensor) -> f64 {
    assert_eq!(t.shape(), r.shape(), "weighted_sum: output and weights differ in shape");
    vals(t).iter().zip(vals(r)).map(|(a, b)| a * b).sum()
}

/// Central-difference step for F64 gradient checks.
pub const FD_STEP: f64 = 1e-6;
/// Tolerance of an F64 gradient check: `max |analytic − numeric| / max(1, |numeric|) ≤ 1e-6`.
/// With h = 1e-6 the truncation error is O(h²) ≈ 1e-12 and the rounding error about
/// ε·|L|/h ≈ 1e-10·|L| for the small losses used here, so 1e-6 leaves ample margin while any
/// wrong formula misses by orders of magnitude.
pub const GRAD_TOL: f64 = 1e-6;

/// `∂f/∂inputs[which]` by central differences with step `FD_STEP`, on every element. The
/// inputs are deep-copied; the perturbed copy is passed to `f` together with the others.
pub fn numeric_grad(inputs: &[Tensor], which: usize, f: &dyn Fn(&[Tensor]) -> f64) -> Vec<f64> {
    differences(inputs, which, f, &|central| central(FD_STEP))
}

/// How `differences` forms one derivative from the central difference at a step.
type Rule<'a> = &'a dyn Fn(&dyn Fn(f64) -> f64) -> f64;

/// Every element's derivative as `rule` combines central differences `central(h)` (the
/// perturbed copy of `inputs[which]` restored after each).
fn differences(
    inputs: &[Tensor],
    which: usize,
    f: &dyn Fn(&[Tensor]) -> f64,
    rule: Rule<'_>,
) -> Vec<f64> {
    let xs: Vec<Tensor> = inputs.iter().map(|t| t.deep_copy().unwrap()).collect();
    let n = xs[which].numel();
    let set = |j: usize, v: f64| {
        let mut g = xs[which].cpu_write().unwrap();
        g.as_mut_slice::<f64>().expect("gradient checks perturb F64 tensors")[j] = v;
    };
    let base = vals(&xs[which]);
    (0..n)
        .map(|j| {
            let central = |h: f64| {
                set(j, base[j] + h);
                let plus = f(&xs);
                set(j, base[j] - h);
                let minus = f(&xs);
                set(j, base[j]);
                (plus - minus) / (2.0 * h)
            };
            rule(&central)
        })
        .collect()
}

/// Step of `numeric_grad_richardson`.
pub const RICHARDSON_STEP: f64 = 1e-3;

/// `∂f/∂inputs[which]` for losses of large magnitude (the experts at large weights, where |L|
/// reaches 1e4 and `numeric_grad`'s rounding error ε·|L|/h would approach `GRAD_TOL`):
/// Richardson extrapolation of central differences at h = `RICHARDSON_STEP` and h/2,
/// `(4·D(h/2) − D(h)) / 3`. Truncation is O(h⁴) ≈ 1e-12·|f⁽⁵⁾| and rounding ≈ ε·|L|/h ≈
/// 2e-13·|L|, so `GRAD_TOL` keeps its margin.
pub fn numeric_grad_richardson(
    inputs: &[Tensor],
    which: usize,
    f: &dyn Fn(&[Tensor]) -> f64,
) -> Vec<f64> {
    let h = RICHARDSON_STEP;
    differences(inputs, which, f, &|central| (4.0 * central(h / 2.0) - central(h)) / 3.0)
}

/// `check_grads` with `numeric_grad_richardson` (losses of large magnitude), same `GRAD_TOL`.
pub fn check_grads_large_loss(
    op: &str,
    inputs: &[Tensor],
    grads: &[(usize, &Tensor)],
    f: &dyn Fn(&[Tensor]) -> f64,
) {
    check_with(op, inputs, grads, f, numeric_grad_richardson);
}

/// Checks every `(input index, analytic gradient)` pair of `grads` against central differences
/// of `f` at `inputs`, with `GRAD_TOL`.
pub fn check_grads(
    op: &str,
    inputs: &[Tensor],
    grads: &[(usize, &Tensor)],
    f: &dyn Fn(&[Tensor]) -> f64,
) {
    check_with(op, inputs, grads, f, numeric_grad);
}

type Numeric = fn(&[Tensor], usize, &dyn Fn(&[Tensor]) -> f64) -> Vec<f64>;

fn check_with(
    op: &str,
    inputs: &[Tensor],
    grads: &[(usize, &Tensor)],
    f: &dyn Fn(&[Tensor]) -> f64,
    numeric: Numeric,
) {
    for &(which, analytic) in grads {
        assert_eq!(
            analytic.shape(),
            inputs[which].shape(),
            "{op}: gradient {which} has the wrong shape"
        );
        let numeric = numeric(inputs, which, f);
        assert_close(
            &format!("{op}: d/d input {which} (shape {:?})", inputs[which].shape()),
            &vals(analytic),
            &numeric,
            GRAD_TOL,
        );
    }
}

/// Asserts `|got − want| ≤ tol · max(1, |want|)` elementwise (and no NaN), reporting the worst
/// element with its index.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: {} values vs {} expected", got.len(), want.len());
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite() == w.is_finite(), "{what}: element {i} is {g}, expected {w}");
        let err = (g - w).abs() / w.abs().max(1.0);
        if err > worst.0 || err.is_nan() {
            worst = (err, i);
        }
    }
    let (err, i) = worst;
    assert!(
        err <= tol,
        "{what}: max error {err:.3e} > tolerance {tol:.1e} at element {i} of {}: got {}, expected {}",
        got.len(),
        got[i],
        want[i]
    );
}

/// Asserts `‖got − want‖ / ‖want‖ ≤ tol` (the DESIGN §4 norm-wise comparison).
pub fn assert_rel_norm(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: {} values vs {} expected", got.len(), want.len());
    let diff: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum::<f64>().sqrt();
    let norm: f64 = want.iter().map(|w| w * w).sum::<f64>().sqrt();
    assert!(!diff.is_nan(), "{what}: NaN in the result");
    assert!(
        diff <= tol * norm.max(f64::MIN_POSITIVE),
        "{what}: ‖got − want‖/‖want‖ = {:.3e} > {tol:.1e}",
        diff / norm
    );
}

/// Asserts that two tensors hold bit-identical bytes (and the same shape and dtype).
pub fn assert_bits_eq(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes differ");
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtypes differ");
    let (x, y) = (a.to_bytes().unwrap(), b.to_bytes().unwrap());
    if x != y {
        let (va, vb) = (vals(a), vals(b));
        let i = va.iter().zip(&vb).position(|(p, q)| p.to_bits() != q.to_bits()).unwrap_or(0);
        panic!("{what}: results differ bitwise, first at element {i}: {} vs {}", va[i], vb[i]);
    }
}

/// A proptest configuration running `default_cases` cases unless the `PROPTEST_CASES`
/// environment variable says otherwise; failures are not persisted to files (the failing
/// input and seed are printed).
pub fn proptest_config(default_cases: u32) -> ProptestConfig {
    let cases =
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Runs `f` on a dedicated rayon pool of `threads` threads.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
}

/// Backward ops accumulate: `twice` (two calls into a zeroed buffer) must be exactly (or, for
/// reductions whose internal summation adds into the buffer in several steps, within 1e-12
/// relative of) `2 · once`. A `=` instead of `+=` gives `once`, 50% off.
pub fn assert_doubled(what: &str, once: &Tensor, twice: &Tensor, exact: bool) {
    let (o, t) = (vals(once), vals(twice));
    assert!(
        o.iter().any(|&x| x != 0.0),
        "{what}: the gradient is all zero; the check would be vacuous"
    );
    let want: Vec<f64> = o.iter().map(|x| 2.0 * x).collect();
    if exact {
        for (i, (&g, &w)) in t.iter().zip(&want).enumerate() {
            assert!(
                g == w,
                "{what}: element {i}: two accumulations gave {g}, expected exactly {w}"
            );
        }
    } else {
        assert_close(what, &t, &want, 1e-12);
    }
}

/// Shorthand for the backend call results in tests.
pub fn matmul(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    spec: steel_runtime::Matmul,
) -> Tensor {
    be().matmul(a, b, bias, spec, None).unwrap()
}

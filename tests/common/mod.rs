//! Shared helpers of the end-to-end tests.

use std::sync::Arc;
use steel_autograd::fixtures::TinyBlockConfig;
use steel_runtime::{cpu::CpuBackend, Backend};

pub fn cpu() -> Arc<dyn Backend> {
    Arc::new(CpuBackend::new())
}

/// A tiny GQA block: hidden 12, 2 query heads of 6, 1 KV head, FFN 10.
pub fn tiny_cfg() -> TinyBlockConfig {
    TinyBlockConfig { hidden: 12, heads: 2, kv_heads: 1, ffn: 10, rope_theta: 1e4, eps: 1e-6 }
}

/// `‖a − b‖ / ‖b‖`.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-300)
}

/// Runs `f` on a rayon pool of exactly `threads` threads.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool").install(f)
}

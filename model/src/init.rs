//! Seeded initialisation as the reference pretraining: every Linear and the embedding
//! N(0, initializer_range), biases 0, norm weights 1, `phi` N(0, 1/√hidden), `scale` 1.
//!
//! Each tensor is drawn in chunks of 2²⁰ elements, each chunk from its own ChaCha stream seeded
//! by (seed, tensor name, chunk index): the result depends only on the seed and the names, and
//! chunks fill in parallel.

use crate::SteelConfig;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

const CHUNK: usize = 1 << 20;

/// How one parameter starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Init {
    Normal(f64),
    Constant(f64),
}

/// The initialiser of the parameter `name` of `cfg`.
pub(crate) fn init_of(cfg: &SteelConfig, name: &str) -> Init {
    if name.ends_with("layernorm.weight")
        || name == "model.norm.weight"
        || name.ends_with("mlp.scale")
    {
        Init::Constant(1.0)
    } else if name.ends_with(".bias") {
        Init::Constant(0.0)
    } else if name.ends_with("mlp.phi") {
        Init::Normal(1.0 / (cfg.hidden_size as f64).sqrt())
    } else {
        Init::Normal(cfg.initializer_range)
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// `n` values of `init` for the tensor `name`.
pub(crate) fn draw(init: Init, name: &str, n: usize, seed: u64) -> Vec<f32> {
    match init {
        Init::Constant(c) => vec![c as f32; n],
        Init::Normal(std) => {
            let mut out = vec![0f32; n];
            let base = seed ^ fnv1a(name);
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(
                    base.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                );
                // std > 0 is validated with the config.
                let normal = Normal::new(0.0f64, std)
                    .unwrap_or_else(|_| Normal::new(0.0, 1.0).expect("unit normal"));
                chunk.iter_mut().for_each(|x| *x = normal.sample(&mut rng) as f32);
            });
            out
        }
    }
}

//! The fuzz targets on the stable toolchain (issue "Nothing lost, nothing followed, nothing
//! hung", fuzzing): every input that once crashed a target (`fuzz/regressions/<target>/`) is
//! replayed, and each target gets a short seeded pass of mutated real inputs. A panic fails the
//! test; so does an input that takes longer than `SLOW` (a hang under libFuzzer's timeout).
//! `scripts/fuzz.sh` runs the same targets coverage-guided, for as long as it is given.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use steel_cli::fuzz::{Seeds, TARGETS};

/// The slowest any single input may be (libFuzzer runs with `-timeout=10`).
const SLOW: Duration = Duration::from_secs(10);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn seeds() -> Seeds {
    Seeds { repo: repo(), shared: repo().join("../shared/data") }
}

/// Runs one input, failing on a slow one; whether the loader accepted it.
fn timed(target: &str, what: &str, run: fn(&[u8]) -> bool, input: &[u8]) -> bool {
    let start = Instant::now();
    let accepted = run(input);
    let took = start.elapsed();
    assert!(took < SLOW, "{target}: {what} took {took:?} (a hang under the fuzzer)");
    accepted
}

/// One test, so the two passes never share this process's scratch files at the same time.
#[test]
fn crashes_stay_fixed_and_a_seeded_pass_finds_nothing() {
    every_crash_found_so_far_stays_fixed();
    a_short_seeded_pass_per_target_finds_nothing();
    steel_cli::fuzz::remove_scratch();
}

fn every_crash_found_so_far_stays_fixed() {
    let root = repo().join("fuzz/regressions");
    let mut replayed = 0;
    for t in TARGETS {
        let dir = root.join(t.name);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files.iter().filter(|f| f.is_file()) {
            let input = std::fs::read(f).unwrap();
            let _ = timed(t.name, &f.display().to_string(), t.run, &input);
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} regression inputs");
}

/// A small deterministic generator (xorshift64*), so a failing case reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that break size arithmetic: written as 1, 2, 4 or 8 little-endian bytes.
const INTERESTING: [u64; 9] =
    [0, 1, 0x7f, 0xff, 0x8000, 0xffff_ffff, 1 << 62, i64::MAX as u64, u64::MAX];

/// One mutation of `input` (bit flip, interesting integer, insert, delete, duplicate, truncate,
/// splice with another seed, or a digit changed in text).
fn mutate(rng: &mut Rng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = v.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let width = [1, 2, 4, 8][rng.below(4)];
                let x = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let at = rng.below(len);
                for (k, b) in x.iter().take(width).enumerate() {
                    if let Some(slot) = v.get_mut(at + k) {
                        *slot = *b;
                    }
                }
            }
            2 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                v.drain(at..at + n);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                let chunk = v[at..at + n].to_vec();
                let to = rng.below(len + 1);
                v.splice(to..to, chunk);
            }
            5 if len > 0 => v.truncate(rng.below(len)),
            6 if !others.is_empty() => {
                let o = &others[rng.below(others.len())];
                let cut = rng.below(v.len() + 1);
                let from = rng.below(o.len() + 1);
                v.truncate(cut);
                v.extend_from_slice(&o[from..]);
            }
            _ => {
                // In text formats a number is where sizes live: replace a digit run.
                if let Some(i) =
                    (0..len).map(|k| (k + rng.below(len)) % len).find(|&i| v[i].is_ascii_digit())
                {
                    let end = (i..len).find(|&k| !v[k].is_ascii_digit()).unwrap_or(len);
                    let x = INTERESTING[rng.below(INTERESTING.len())].to_string();
                    v.splice(i..end, x.into_bytes());
                }
            }
        }
    }
    v
}

/// Mutated seeds per target: a few seconds each on the CI machine.
fn a_short_seeded_pass_per_target_finds_nothing() {
    let cases: usize =
        std::env::var("STEEL_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(150);
    let budget = Duration::from_secs(4);
    for t in TARGETS {
        let seeds = (t.seeds)(&seeds()).unwrap_or_else(|e| panic!("seeds of {}: {e:#}", t.name));
        assert!(!seeds.is_empty(), "{} has seeds", t.name);
        for (i, s) in seeds.iter().enumerate() {
            assert!(timed(t.name, "a seed", t.run, s), "{}: seed {i} is accepted", t.name);
        }
        let mut rng =
            Rng(0x9e37_79b9_7f4a_7c15 ^ t.name.len() as u64 ^ (t.name.as_bytes()[0] as u64) << 32);
        let start = Instant::now();
        let (mut ran, mut accepted) = (0, 0);
        while ran < cases && start.elapsed() < budget {
            let base = &seeds[rng.below(seeds.len())];
            let input = mutate(&mut rng, base, &seeds);
            accepted += usize::from(timed(t.name, &format!("mutation {ran}"), t.run, &input));
            ran += 1;
        }
        eprintln!(
            "{}: {} seeds, {ran} mutations ({accepted} accepted) in {:?}",
            t.name,
            seeds.len(),
            start.elapsed()
        );
    }
}

/// Writes the seed corpus for `scripts/fuzz.sh` (run with `--ignored` and
/// `STEEL_FUZZ_SEEDS_OUT=DIR`).
#[test]
#[ignore]
fn write_seed_corpus() {
    let out = std::env::var("STEEL_FUZZ_SEEDS_OUT").expect("STEEL_FUZZ_SEEDS_OUT=DIR");
    for (name, n) in steel_cli::fuzz::write_seeds(&seeds(), Path::new(&out)).unwrap() {
        eprintln!("{name}: {n} seeds");
    }
    steel_cli::fuzz::remove_scratch();
}

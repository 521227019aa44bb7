//! The machine's measured f32 peak: a register-only FMA loop on every thread at once.
//!
//! A GEMM's "fraction of peak" is only as honest as the peak: a clock read from /proc/cpuinfo
//! and an assumed FMA width miss turbo clocks and the number of FMA ports. This loop keeps
//! `CHAINS` independent accumulator vectors (enough to cover the FMA latency on two ports) in
//! registers and times `threads` threads running it together, so the figure includes whatever
//! the cores sustain when all are busy.

use std::time::Instant;

/// Independent FMA chains per thread: latency 4 × 2 ports, plus slack.
const CHAINS: usize = 12;
/// The recurrence every lane runs: `x ← x·A + B` converges to B / (1 − A) without denormals.
const A: f32 = 0.999_999;
const B: f32 = 1e-6;

/// The instruction set a loop used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeakIsa {
    Avx512,
    Avx2Fma,
    Scalar,
}

impl PeakIsa {
    /// The widest this CPU runs.
    pub fn detect() -> PeakIsa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return PeakIsa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return PeakIsa::Avx2Fma;
            }
        }
        PeakIsa::Scalar
    }

    /// f32 lanes per FMA.
    pub fn lanes(self) -> usize {
        match self {
            PeakIsa::Avx512 => 16,
            PeakIsa::Avx2Fma => 8,
            PeakIsa::Scalar => 1,
        }
    }
}

/// One measurement.
#[derive(Clone, Copy, Debug)]
pub struct Peak {
    /// f32 FLOP/s of all threads together (an FMA counts 2).
    pub flops: f64,
    pub threads: usize,
    pub isa: PeakIsa,
}

/// Runs `iters` FMAs on each of `CHAINS` accumulators of `isa`'s width, every lane starting at
/// `x0`; returns the lanes' final values (all equal), so the work cannot be elided.
fn fma_loop(isa: PeakIsa, iters: u64, x0: f32) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` (or the caller) found the instruction set on this CPU.
        PeakIsa::Avx512 => unsafe { x86::avx512(iters, x0) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        PeakIsa::Avx2Fma => unsafe { x86::avx2(iters, x0) },
        _ => {
            let mut acc = [x0; CHAINS];
            for _ in 0..iters {
                for a in &mut acc {
                    *a = a.mul_add(A, B);
                }
            }
            agree(&acc)
        }
    }
}

/// All lanes of all chains, or NaN when any lane differs from the first.
fn agree(lanes: &[f32]) -> f32 {
    lanes.iter().fold(lanes[0], |m, &v| if v == m { m } else { f32::NAN })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{agree, A, B, CHAINS};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(iters: u64, x0: f32) -> f32 {
        let (a, b) = (_mm512_set1_ps(A), _mm512_set1_ps(B));
        let mut acc = [_mm512_set1_ps(x0); CHAINS];
        for _ in 0..iters {
            for v in &mut acc {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let mut out = [0f32; 16 * CHAINS];
        for (i, v) in acc.iter().enumerate() {
            // SAFETY: `out` holds 16 floats from 16·i on.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * i), *v) };
        }
        agree(&out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(iters: u64, x0: f32) -> f32 {
        let (a, b) = (_mm256_set1_ps(A), _mm256_set1_ps(B));
        let mut acc = [_mm256_set1_ps(x0); CHAINS];
        for _ in 0..iters {
            for v in &mut acc {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut out = [0f32; 8 * CHAINS];
        for (i, v) in acc.iter().enumerate() {
            // SAFETY: `out` holds 8 floats from 8·i on.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), *v) };
        }
        agree(&out)
    }
}

/// Measures the peak of `threads` threads running the FMA loop together (each pinned to nothing:
/// the OS spreads them), best of `repeats` runs of about `seconds` each — a peak is a maximum,
/// not a median.
pub fn measure_peak(threads: usize, repeats: usize, seconds: f64) -> Peak {
    let isa = PeakIsa::detect();
    let threads = threads.max(1);
    // Calibrate one thread's iteration count to the requested duration.
    let mut iters = 1u64 << 16;
    loop {
        let t = Instant::now();
        std::hint::black_box(fma_loop(isa, iters, 1.0));
        let dt = t.elapsed().as_secs_f64();
        if dt > seconds / 4.0 || iters > 1 << 40 {
            iters = ((iters as f64) * seconds / dt.max(1e-9)).max(1.0) as u64;
            break;
        }
        iters *= 4;
    }
    let flop = (2 * CHAINS * isa.lanes()) as f64 * iters as f64 * threads as f64;
    let mut best = 0f64;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        std::thread::scope(|s| {
            for i in 0..threads {
                s.spawn(move || std::hint::black_box(fma_loop(isa, iters, 1.0 + i as f32)));
            }
        });
        best = best.max(flop / t.elapsed().as_secs_f64());
    }
    Peak { flops: best, threads, isa }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector loops compute the recurrence they count: every lane equals the scalar
    /// `mul_add` chain, bit for bit (a skipped or doubled FMA changes the value).
    #[test]
    fn every_isa_computes_the_counted_fmas() {
        let reference = |iters: u64, x0: f32| {
            let mut x = x0;
            for _ in 0..iters {
                x = x.mul_add(A, B);
            }
            x
        };
        let mut isas = vec![PeakIsa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                isas.push(PeakIsa::Avx2Fma);
            }
            if is_x86_feature_detected!("avx512f") {
                isas.push(PeakIsa::Avx512);
            }
        }
        for isa in isas {
            for (iters, x0) in [(1u64, 3.5f32), (777, -2.25), (100_003, 40.0)] {
                let got = fma_loop(isa, iters, x0);
                assert_eq!(got.to_bits(), reference(iters, x0).to_bits(), "{isa:?} {iters}");
                assert_ne!(got, x0, "{isa:?} moved");
            }
        }
    }

    #[test]
    fn the_peak_is_measured_on_every_thread() {
        let p = measure_peak(2, 2, 0.01);
        assert_eq!(p.threads, 2);
        assert_eq!(p.isa, PeakIsa::detect());
        // At least one FLOP per lane per microsecond: far below any CPU, far above zero.
        assert!(p.flops > 1e6 * p.isa.lanes() as f64, "{p:?}");
        assert!(p.flops.is_finite());
    }
}

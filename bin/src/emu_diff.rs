//! `steel-bench emu-diff`: the emulator checked against hardware.
//!
//! The emulator's own test kernels (`kernels-cu/test_emu.cu`: shuffles, votes, ldmatrix register
//! dumps, block reductions, warp-synchronous shared memory, cp.async, the 48 KiB opt-in, the
//! device's math) and the mma tile GEMM run on fixed inputs. `--record DIR` runs them under the
//! emulator here and writes every output; `--against DIR` runs them on a device (`--device
//! cuda`, what `scripts/gpu-check.sh run` does) or on the emulator again, and compares:
//! - bit for bit what must be bit-exact — shuffles, ballots, ldmatrix registers, integer-valued
//!   sums, correctly rounded operations (sqrtf, division, __frcp_rn), contracted multiply-adds;
//! - within the documented error what uses the special-function unit (expf, __expf, logf,
//!   __logf, rsqrtf, __fdividef, tanhf: each value against the exact one, on both sides) or the
//!   tensor cores (relative error ≤ 1e-5 against the recording).
//!
//! A mismatch names the case, the buffer and the first differing element.

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use steel_runtime::cuda::CudaGpu;
use steel_runtime::gpu::{Dim3, EmuGpu, Fill, Gpu, LaunchConfig, Schedule};
use steel_runtime::{choose_device, Device, DeviceRequest};

#[derive(Parser)]
pub struct EmuDiffArgs {
    /// Run the cases under the emulator and write their outputs to this folder.
    #[arg(long, conflicts_with = "against")]
    record: Option<PathBuf>,
    /// Compare the cases' outputs with a recording (from `--record`).
    #[arg(long)]
    against: Option<PathBuf>,
    /// Where `--against` runs the cases: cuda (a GPU), emu (the emulator), or auto.
    #[arg(long, default_value = "auto")]
    device: String,
}

/// How a case's outputs must agree with the recording.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Compare {
    /// Every bit.
    Exact,
    /// ‖got − want‖ / ‖want‖ over the buffer's f32 values (tensor-core accumulation order).
    Rel(f64),
    /// `emu_test_math`: exact columns bit for bit, the others within their documented error.
    Math,
}

/// A device buffer: its initial contents (uploaded), or only a size (poisoned with 0xFF).
enum Buf {
    Init(Vec<u8>),
    Out(usize),
}

struct Case {
    name: &'static str,
    symbol: &'static str,
    grid: u32,
    block: u32,
    shared: u32,
    bufs: Vec<Buf>,
    /// Parameter words after the buffer pointers (sizes, modes).
    extra: Vec<u64>,
    /// Which buffers are compared (indices into `bufs`).
    outputs: Vec<usize>,
    compare: Compare,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `n` values in ±[lo, hi), never zero (or in [lo, hi) when `positive`).
fn values(n: usize, seed: u64, lo: f32, hi: f32, positive: bool) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            let r = splitmix(&mut s);
            let mag = lo + (hi - lo) * ((r >> 40) as f32 / (1u64 << 24) as f32);
            if positive || r & 1 == 0 {
                mag
            } else {
                -mag
            }
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    let h: Vec<steel_runtime::bf16> = v.iter().map(|&x| steel_runtime::bf16::from_f32(x)).collect();
    bytemuck::cast_slice(&h).to_vec()
}

const MATH_N: usize = 2048;

fn math_inputs() -> (Vec<f32>, Vec<f32>) {
    (values(MATH_N, 31, 0.0, 10.0, false), values(MATH_N, 32, 0.01, 50.0, true))
}

/// The cases, each with fixed inputs.
fn cases() -> Vec<Case> {
    let (mx, my) = math_inputs();
    let (m, n, k) = (70usize, 100usize, 40usize);
    vec![
        Case {
            name: "warp_ops",
            symbol: "emu_test_warp_ops",
            grid: 3,
            block: 64,
            shared: 64 * 4,
            bufs: vec![Buf::Out(3 * 64 * 8 * 4), Buf::Init(vec![0; 4]), Buf::Out(3 * 4)],
            extra: vec![],
            outputs: vec![0, 1, 2],
            compare: Compare::Exact,
        },
        Case {
            name: "ldmatrix",
            symbol: "emu_test_ldmatrix",
            grid: 1,
            block: 32,
            shared: 0,
            bufs: vec![
                Buf::Init(bf16_bytes(&(0..256).map(|i| i as f32).collect::<Vec<_>>())),
                Buf::Out(32 * 8 * 4),
            ],
            extra: vec![],
            outputs: vec![1],
            compare: Compare::Exact,
        },
        Case {
            name: "sync_loop",
            symbol: "emu_test_sync_loop",
            grid: 3,
            block: 96,
            shared: 0,
            bufs: vec![Buf::Out(3 * 96 * 4)],
            extra: vec![5],
            outputs: vec![0],
            compare: Compare::Exact,
        },
        Case {
            name: "partial_masks",
            symbol: "emu_test_partial_masks",
            grid: 1,
            block: 64,
            shared: 0,
            bufs: vec![Buf::Out(64 * 4)],
            extra: vec![],
            outputs: vec![0],
            compare: Compare::Exact,
        },
        Case {
            name: "syncwarp_exchange",
            symbol: "emu_test_syncwarp_exchange",
            grid: 1,
            block: 96,
            shared: 0,
            bufs: vec![Buf::Out(96 * 4)],
            extra: vec![3],
            outputs: vec![0],
            compare: Compare::Exact,
        },
        Case {
            // block sums are exact; the softmax statistics use expf
            name: "helpers_twice",
            symbol: "emu_test_helpers_twice",
            grid: 3,
            block: 96,
            shared: 0,
            bufs: vec![
                Buf::Init(f32_bytes(&values(3 * 96, 21, 0.1, 1.0, false))),
                Buf::Out(3 * 4 * 4),
                Buf::Out(3 * 2 * 4),
            ],
            extra: vec![],
            outputs: vec![1, 2],
            compare: Compare::Rel(1e-5),
        },
        Case {
            name: "cp_async",
            symbol: "emu_test_cp_async",
            grid: 2,
            block: 128,
            shared: 0,
            bufs: vec![
                Buf::Init(f32_bytes(&values(128 * 4, 9, 0.1, 1.0, false))),
                Buf::Out(2 * 128 * 16),
            ],
            extra: vec![0],
            outputs: vec![1],
            compare: Compare::Exact,
        },
        Case {
            // 64 KiB of dynamic shared memory: the opt-in on the device
            name: "dyn_shared_64k",
            symbol: "emu_test_dyn_shared",
            grid: 1,
            block: 256,
            shared: 64 * 1024,
            bufs: vec![Buf::Out(256 * 4)],
            extra: vec![16 * 1024],
            outputs: vec![0],
            compare: Compare::Exact,
        },
        Case {
            name: "broken_none",
            symbol: "emu_test_broken",
            grid: 1,
            block: 128,
            shared: 0,
            bufs: vec![Buf::Out(128 * 4), Buf::Init(f32_bytes(&values(128, 5, 0.1, 1.0, false)))],
            extra: vec![128, 10],
            outputs: vec![0],
            compare: Compare::Exact,
        },
        Case {
            name: "math",
            symbol: "emu_test_math",
            grid: (MATH_N / 256) as u32,
            block: 256,
            shared: 0,
            bufs: vec![Buf::Init(f32_bytes(&mx)), Buf::Init(f32_bytes(&my)), Buf::Out(MATH_N * 48)],
            extra: vec![MATH_N as u64],
            outputs: vec![2],
            compare: Compare::Math,
        },
        Case {
            name: "mma_tile_gemm",
            symbol: "mma_tile_gemm_bf16",
            grid: 0, // set below: ceil(n / 64) × ceil(m / 64)
            block: 128,
            shared: 0,
            bufs: vec![
                Buf::Init(bf16_bytes(&values(m * k, 41, 0.1, 1.0, false))),
                Buf::Init(bf16_bytes(&values(n * k, 42, 0.1, 1.0, false))),
                Buf::Out(m * n * 4),
            ],
            extra: vec![m as u64, n as u64, k as u64],
            outputs: vec![2],
            compare: Compare::Rel(1e-5),
        },
    ]
}

fn grid_of(c: &Case) -> Dim3 {
    if c.symbol == "mma_tile_gemm_bf16" {
        let (m, n) = (c.extra[0] as u32, c.extra[1] as u32);
        Dim3::xy(n.div_ceil(64), m.div_ceil(64))
    } else {
        Dim3::x(c.grid)
    }
}

/// Runs `c` on `gpu` and returns its compared buffers.
fn run_case(gpu: &dyn Gpu, c: &Case) -> Result<Vec<Vec<u8>>> {
    let mut ptrs = Vec::new();
    let result = (|| -> Result<Vec<Vec<u8>>> {
        for b in &c.bufs {
            let bytes = match b {
                Buf::Init(v) => v.len(),
                Buf::Out(n) => *n,
            };
            let p = gpu.alloc(bytes)?;
            ptrs.push((p, bytes));
            // SAFETY: the allocation holds `bytes`.
            unsafe {
                match b {
                    Buf::Init(v) => gpu.upload(p, v)?,
                    Buf::Out(n) => gpu.memset(p, Fill::U8(0xFF), *n)?,
                }
            }
        }
        let mut words: Vec<u64> = ptrs.iter().map(|&(p, _)| p).collect();
        words.extend(&c.extra);
        if c.shared > 48 * 1024 {
            gpu.opt_in_dynamic_shared(c.symbol, c.shared)?;
        }
        let cfg =
            LaunchConfig { grid: grid_of(c), block: Dim3::x(c.block), shared_bytes: c.shared };
        // SAFETY: the words are the kernel's parameter struct (test_emu.cu / mma_gemm.cu): buffer
        // pointers in declaration order, then its sizes and modes; each buffer is as large as
        // the kernel touches for this grid and block.
        unsafe { gpu.launch(c.symbol, cfg, bytemuck::cast_slice(&words))? };
        gpu.synchronize()?;
        c.outputs
            .iter()
            .map(|&i| {
                let (p, n) = ptrs[i];
                let mut out = vec![0u8; n];
                // SAFETY: the allocation holds `n` bytes.
                unsafe { gpu.download(p, &mut out)? };
                Ok(out)
            })
            .collect()
    })();
    for (p, _) in ptrs {
        // SAFETY: allocated above; the stream was synchronised (or the launch failed).
        unsafe { gpu.free(p) };
    }
    result
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The distance of `got` from the exact `e` in units in the last place of `e` as an f32.
fn ulps(got: f32, e: f64) -> f64 {
    let f = (e as f32).abs();
    (got as f64 - e).abs() / (f.next_up() - f) as f64
}

/// `emu_test_math`'s columns against their documented accuracy (CUDA Math API).
fn check_math(out: &[f32]) -> Result<()> {
    let (x, y) = math_inputs();
    for i in 0..MATH_N {
        let (xv, yv, r) = (x[i] as f64, y[i] as f64, &out[i * 12..i * 12 + 12]);
        let bounded = [
            ("expf", r[0], xv.exp(), 2.0),
            ("__expf", r[1], xv.exp(), 2.0 + (1.173 * xv.abs()).floor()),
            ("logf", r[2], yv.ln(), 1.0),
            ("rsqrtf", r[4], 1.0 / yv.sqrt(), 2.0),
            ("__fdividef", r[5], xv / yv, 2.0),
            ("tanhf", r[8], xv.tanh(), 2.0),
        ];
        for (what, got, e, bound) in bounded {
            let u = ulps(got, e);
            if u.is_nan() || u > bound {
                bail!(
                    "{what}({}) = {got:e}: {u:.2} ulp from {e:e} (documented bound {bound})",
                    x[i]
                );
            }
        }
        let log_ok = if (0.5..=2.0).contains(&yv) {
            (r[3] as f64 - yv.ln()).abs() <= 2f64.powf(-21.41)
        } else {
            ulps(r[3], yv.ln()) <= 3.0
        };
        if !log_ok {
            bail!("__logf({}) = {:e} is outside its documented error", y[i], r[3]);
        }
        let exact = [
            ("sqrtf", r[6], y[i].sqrt()),
            ("__frcp_rn", r[7], (1.0 / yv) as f32),
            ("x / y", r[9], x[i] / y[i]),
            ("x·y + 1 (contracted)", r[10], x[i].mul_add(y[i], 1.0)),
            ("__fadd_rn(__fmul_rn(x, y), 1)", r[11], x[i] * y[i] + 1.0),
        ];
        for (what, got, want) in exact {
            if got.to_bits() != want.to_bits() {
                bail!(
                    "{what} at x = {}, y = {}: {got:e}, the exact result is {want:e}",
                    x[i],
                    y[i]
                );
            }
        }
    }
    Ok(())
}

/// Compares one case's buffers with the recording; `Err` names the first difference.
fn compare(c: &Case, got: &[Vec<u8>], want: &[Vec<u8>]) -> Result<String> {
    if got.len() != want.len() {
        bail!("{} buffers, the recording has {}", got.len(), want.len());
    }
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g.len() != w.len() {
            bail!("buffer {i} has {} bytes, the recording {}", g.len(), w.len());
        }
        match c.compare {
            Compare::Exact => {
                if let Some(at) = g.iter().zip(w).position(|(a, b)| a != b) {
                    let word = at / 4 * 4;
                    bail!(
                        "buffer {i} differs at byte {at} (word {}: {:02x?}, recorded {:02x?})",
                        at / 4,
                        &g[word..(word + 4).min(g.len())],
                        &w[word..(word + 4).min(w.len())]
                    );
                }
            }
            Compare::Rel(tol) => {
                let (gf, wf) = (f32s(g), f32s(w));
                let num: f64 = gf.iter().zip(&wf).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                let den: f64 = wf.iter().map(|b| (*b as f64).powi(2)).sum();
                let rel = (num / den.max(f64::MIN_POSITIVE)).sqrt();
                if rel.is_nan() || rel > tol {
                    bail!("buffer {i}: relative error {rel:.2e} > {tol:.0e}");
                }
                worst = worst.max(rel);
            }
            Compare::Math => {
                check_math(&f32s(g)).context("the device's math")?;
                check_math(&f32s(w)).context("the recording's math")?;
            }
        }
    }
    Ok(match c.compare {
        Compare::Exact => "bit-exact".to_string(),
        Compare::Rel(_) => format!("rel err {worst:.1e}"),
        Compare::Math => "within documented error".to_string(),
    })
}

fn case_file(dir: &Path, c: &Case, i: usize) -> PathBuf {
    dir.join(format!("{}.{i}.bin", c.name))
}

/// Records every case under the emulator into `dir`.
pub fn record(dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let gpu = EmuGpu::new().with_schedule(Schedule::RoundRobin);
    let all = cases();
    for c in &all {
        let outs = run_case(&gpu, c).with_context(|| format!("case {} on the emulator", c.name))?;
        for (i, o) in outs.iter().enumerate() {
            let f = case_file(dir, c, i);
            std::fs::write(&f, o).with_context(|| format!("writing {}", f.display()))?;
        }
    }
    Ok(all.len())
}

/// Runs every case on `gpu` and compares it with the recording in `dir`; prints one line per
/// case and returns the number of mismatches.
pub fn against(gpu: &dyn Gpu, dir: &Path) -> Result<usize> {
    let mut failed = 0;
    println!("{:<20} {:<28} {:<10} result", "case", "kernel", "compare");
    for c in &cases() {
        let want: Vec<Vec<u8>> = (0..c.outputs.len())
            .map(|i| {
                let f = case_file(dir, c, i);
                std::fs::read(&f).with_context(|| format!("reading the recording {}", f.display()))
            })
            .collect::<Result<_>>()?;
        let kind = match c.compare {
            Compare::Exact => "exact",
            Compare::Rel(_) => "rel ≤1e-5",
            Compare::Math => "math",
        };
        let verdict = run_case(gpu, c).and_then(|got| compare(c, &got, &want));
        match verdict {
            Ok(how) => println!("{:<20} {:<28} {:<10} pass ({how})", c.name, c.symbol, kind),
            Err(e) => {
                failed += 1;
                println!("{:<20} {:<28} {:<10} FAIL: {e:#}", c.name, c.symbol, kind);
            }
        }
    }
    Ok(failed)
}

pub fn run(args: EmuDiffArgs) -> Result<()> {
    if let Some(dir) = &args.record {
        let n = record(dir)?;
        println!("emu-diff: {n} cases recorded under the emulator in {}", dir.display());
        return Ok(());
    }
    let Some(dir) = &args.against else {
        bail!("emu-diff needs --record DIR (here) or --against DIR (on the device)");
    };
    let gpu: Arc<dyn Gpu> = if args.device == "emu" {
        Arc::new(EmuGpu::new())
    } else {
        let req: DeviceRequest = args.device.parse()?;
        let choice = choose_device(req, true)?;
        eprintln!("{}", choice.notice);
        match choice.device {
            Device::Cuda(ordinal) => {
                Arc::new(CudaGpu::new(ordinal).context("setting up the CUDA device")?)
            }
            Device::Cpu => bail!(
                "emu-diff --against compares a device with the emulator: use --device cuda or emu"
            ),
        }
    };
    println!("emu-diff: the emulator's recording in {} against {}", dir.display(), gpu.name());
    let failed = against(gpu.as_ref(), dir)?;
    if failed > 0 {
        bail!("{failed} case(s) differ from the emulator");
    }
    println!("emu-diff: every case agrees");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recording agrees with a second emulator under another schedule; a damaged recording
    /// is a named mismatch.
    #[test]
    fn emu_diff_round_trips_on_the_emulator_and_sees_a_damaged_recording() {
        let dir = std::env::temp_dir().join(format!("steel-emu-diff-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        record(&dir).unwrap();
        let other = EmuGpu::new().with_schedule(Schedule::Random(7));
        assert_eq!(against(&other, &dir).unwrap(), 0);
        // Flip one bit of the ldmatrix dump: exactly that case fails.
        let f = dir.join("ldmatrix.0.bin");
        let mut b = std::fs::read(&f).unwrap();
        b[17] ^= 1;
        std::fs::write(&f, &b).unwrap();
        assert_eq!(against(&other, &dir).unwrap(), 1);
        let c = cases().into_iter().find(|c| c.name == "ldmatrix").unwrap();
        let got = run_case(&other, &c).unwrap();
        let e = compare(&c, &got, &[b]).unwrap_err().to_string();
        assert!(e.contains("differs at byte 17"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

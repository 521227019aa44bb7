//! `steel-train` on the GPU path, emulated (`--device emu`), as users run it: bf16 mixed precision
//! against the CPU, one host synchronisation per step, exact resume across processes, checkpoints
//! that move between the emulator and the CPU, the memory plan against the allocator's peak, and
//! a run refused before step 1 on a device too small for it.
//!
//! The kernels themselves are proven under the full memory checker by the runtime's tests; these
//! runs exercise the trainer, so they run the emulator with `STEEL_EMU_CHECK=off` (same kernels,
//! same results, no race bookkeeping: ~4× faster).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::ok;

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("steel-gpu-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn train_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_steel-train"));
    c.args(args).env("STEEL_EMU_CHECK", "off").env_remove("STEEL_EMU_MEMORY");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn train(args: &[&str]) -> Output {
    train_env(args, &[])
}

fn rows(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `(step, "loss grad_norm")` of every row, exactly as printed.
fn losses(dir: &Path) -> Vec<(u64, String)> {
    rows(dir)
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), format!("{} {}", v["loss"], v["grad_norm"])))
        .collect()
}

fn same_files(a: &Path, b: &Path, step: &str) {
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let x = std::fs::read(a.join("checkpoints").join(step).join(f)).unwrap();
        let y = std::fs::read(b.join("checkpoints").join(step).join(f)).unwrap();
        assert!(x == y, "{f} of {step} differs between {} and {}", a.display(), b.display());
    }
}

/// A smaller demo for the runs that only need the trainer's mechanics (~1 s per emulated step).
const SMALL: [&str; 6] =
    ["--set", "data.seq_len=32", "--set", "train.micro_batch=4", "--set", "train.eval_every=0"];

/// The acceptance run: the demo recipe for 20 steps on the emulator in bf16-mixed, each
/// logged loss within 3% of the fp32 CPU run at the same step; the loss falls; every row carries
/// the device, its launches, one host synchronisation and the allocator's peak within 15% of the
/// memory plan.
#[test]
fn bf16_mixed_on_the_emulator_tracks_the_cpu_for_20_steps() {
    let (emu, cpu) = (out_dir("bf16-emu"), out_dir("bf16-cpu"));
    let common = ["--max-steps", "20", "--log-every", "1", "--set", "train.eval_every=0"];
    let bf16 = ["--set", "train.precision=\"bf16-mixed\""];
    let e = emu.to_str().unwrap();
    let o = train(&[&["--out", e, "--device", "emu"][..], &common, &bf16].concat());
    ok(&o);
    let text = String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("precision: bf16-mixed"), "{text}");
    assert!(text.contains("memory: measured peak"), "{text}");
    ok(&train(&[&["--out", cpu.to_str().unwrap(), "--device", "cpu"][..], &common].concat()));
    let (er, cr) = (rows(&emu), rows(&cpu));
    assert_eq!(er.len(), 20);
    assert_eq!(cr.len(), 20);
    for (a, b) in er.iter().zip(&cr) {
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!(((la - lb) / lb).abs() <= 0.03, "step {}: emu {la} vs cpu {lb}", a["step"]);
        assert_eq!(a["device"], "emu", "{a}");
        assert!(a["kernel_launches"].as_u64().unwrap() > 0, "{a}");
        assert_eq!(a["host_syncs"], 1, "one host synchronisation per step: {a}");
        let (peak, plan) =
            (a["mem_peak_bytes"].as_f64().unwrap(), a["mem_plan_bytes"].as_f64().unwrap());
        assert!((peak - plan).abs() <= 0.15 * peak, "peak {peak} vs plan {plan}: {a}");
        assert_eq!(b["device"], "cpu");
        assert_eq!(b["host_syncs"], 0);
    }
    let first = er[0]["loss"].as_f64().unwrap();
    let last = er[19]["loss"].as_f64().unwrap();
    assert!(last < first - 0.5, "the loss falls: {first} → {last}");
    // bf16-mixed is not fp32: the emulated losses are not the CPU's bit for bit.
    assert!(er.iter().zip(&cr).any(|(a, b)| a["loss"] != b["loss"]));
}

/// Stopped and resumed in separate processes on the emulator: bit-identical losses, gradient
/// norms, validation losses, weights and moments; and the same run twice is bit-identical. Two
/// micro-batches per step (their losses add on the device) and validation every 3 steps.
#[test]
fn exact_resume_and_determinism_on_the_emulator() {
    let (a, b, c) = (out_dir("det-a"), out_dir("det-b"), out_dir("det-c"));
    let common = [
        "--device",
        "emu",
        "--log-every",
        "1",
        "--set",
        "data.seq_len=32",
        "--set",
        "train.micro_batch=2",
        "--set",
        "train.grad_accum=2",
        "--set",
        "train.eval_every=3",
    ];
    let run = |dir: &Path, steps: &str, resume: bool| {
        let mut args = vec!["--out", dir.to_str().unwrap(), "--max-steps", steps];
        args.extend(&common);
        if resume {
            args.extend(["--resume", "auto"]);
        }
        ok(&train(&args));
    };
    run(&a, "6", false);
    run(&b, "3", false);
    run(&b, "6", true);
    run(&c, "6", false);
    assert_eq!(losses(&a), losses(&b), "resumed on the emulator");
    assert_eq!(losses(&a), losses(&c), "the same run twice");
    let val = |d: &Path| -> Vec<String> {
        rows(d)
            .iter()
            .filter(|r| r.get("val_loss").is_some())
            .map(|r| r["val_loss"].to_string())
            .collect()
    };
    assert_eq!(val(&a).len(), 2, "validation at steps 3 and 6");
    assert_eq!(val(&a), val(&b));
    assert_eq!(val(&a), val(&c));
    same_files(&a, &b, "step-000006");
    same_files(&a, &c, "step-000006");
}

/// A checkpoint written on the emulator resumes on the CPU and the reverse (fp32 masters either
/// way): each continues to within bf16-free tolerance of the straight CPU run.
#[test]
fn checkpoints_move_between_the_emulator_and_the_cpu() {
    let (straight, e2c, c2e) = (out_dir("port-cpu"), out_dir("port-e2c"), out_dir("port-c2e"));
    let base = [&["--log-every", "1"][..], &SMALL].concat();
    let run = |dir: &Path, device: &str, steps: &str, resume: bool| {
        let mut args =
            vec!["--out", dir.to_str().unwrap(), "--max-steps", steps, "--device", device];
        args.extend(&base);
        if resume {
            args.extend(["--resume", "auto"]);
        }
        ok(&train(&args));
    };
    run(&straight, "cpu", "6", false);
    run(&e2c, "emu", "3", false);
    run(&e2c, "cpu", "6", true);
    run(&c2e, "cpu", "3", false);
    run(&c2e, "emu", "6", true);
    let want = rows(&straight);
    for dir in [&e2c, &c2e] {
        let got = rows(dir);
        assert_eq!(got.len(), 6, "{}", dir.display());
        for (g, w) in got.iter().zip(&want) {
            let (lg, lw) = (g["loss"].as_f64().unwrap(), w["loss"].as_f64().unwrap());
            // fp32 on both devices; flash attention's bf16 operands on the emulator.
            assert!(
                ((lg - lw) / lw).abs() <= 1e-2,
                "{}: step {}: {lg} vs {lw}",
                dir.display(),
                g["step"]
            );
        }
        let devices: Vec<&str> = got.iter().map(|r| r["device"].as_str().unwrap()).collect();
        assert!(devices.contains(&"emu") && devices.contains(&"cpu"), "{devices:?}");
    }
}

/// A device too small for the plan: exit 2 before step 1, the plan and what to change in the
/// message, nothing trained or checkpointed. `--dry-run` plans without any device.
#[test]
fn a_run_that_cannot_fit_is_refused_before_step_1() {
    let out = out_dir("nofit");
    let o = out.to_str().unwrap();
    let r = train_env(
        &[&["--out", o, "--device", "emu", "--max-steps", "2"][..], &SMALL].concat(),
        &[("STEEL_EMU_MEMORY", "8MiB")],
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("does not fit"), "{err}");
    assert!(err.contains("train.micro_batch") && err.contains("Plan:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.join("checkpoints").exists(), "nothing may be checkpointed");
    assert!(!out.join("metrics.jsonl").exists() || rows(&out).is_empty(), "no step may run");
    // The same run fits a device of 64 MiB.
    ok(&train_env(
        &[&["--out", o, "--device", "emu", "--max-steps", "1"][..], &SMALL].concat(),
        &[("STEEL_EMU_MEMORY", "64MiB")],
    ));
    // A bad capacity is a clear error.
    let fresh = out.join("bad-capacity");
    let r = train_env(
        &["--out", fresh.to_str().unwrap(), "--device", "emu", "--max-steps", "1"],
        &[("STEEL_EMU_MEMORY", "lots")],
    );
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("STEEL_EMU_MEMORY"));
    // The dry run prints the plan for the recipe's device without probing one.
    let r = train(&["--dry-run", "--device", "cuda", "--set", "train.precision=\"bf16-mixed\""]);
    ok(&r);
    let text = String::from_utf8_lossy(&r.stdout);
    for needle in ["memory per device", "working copies", "activations", "bf16-mixed"] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
}

//! The run directory is never lost (issue "Nothing lost, nothing followed, nothing hung", data
//! loss items): `--resume auto` over checkpoints that are all damaged is an error that changes
//! nothing, `--fresh` moves the old run aside instead of deleting it, resuming from an older
//! checkpoint keeps the dropped metrics lines, and one trainer at a time holds `--out`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::ok;

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("steel-run-dir-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A small, fast demo on the CPU.
const SMALL: [&str; 8] = [
    "--device",
    "cpu",
    "--set",
    "data.seq_len=32",
    "--set",
    "train.micro_batch=2",
    "--set",
    "train.eval_every=0",
];

fn train(out: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_steel-train"))
        .args(["--out", out.to_str().unwrap()])
        .args(SMALL)
        .args(args)
        .output()
        .unwrap()
}

/// Every file under `dir` (relative path → bytes), the lock file aside.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != ".lock") {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn steps(metrics: &Path) -> Vec<u64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect()
}

fn damage(file: &Path) {
    let mut b = std::fs::read(file).unwrap();
    let n = b.len();
    for i in [n / 2, n / 2 + 1, n - 9, n - 8] {
        b[i] ^= 0x5A;
    }
    std::fs::write(file, b).unwrap();
}

/// The reproduction, scaled down: every checkpoint damaged, then `--resume auto`.
#[test]
fn resume_auto_over_only_damaged_checkpoints_changes_nothing_and_fresh_moves_the_run_aside() {
    let out = out_dir("all-damaged");
    ok(&train(&out, &["--max-steps", "6", "--checkpoint-every", "2", "--log-every", "1"]));
    let ckpts = out.join("checkpoints");
    let mut damaged = Vec::new();
    for s in [2, 4, 6] {
        let f = ckpts.join(format!("step-{s:06}")).join("optimizer.safetensors");
        damage(&f);
        damaged.push(f);
    }
    let before = snapshot(&out);
    let r = train(&out, &["--resume", "auto", "--max-steps", "10", "--checkpoint-every", "2"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    for f in &damaged {
        assert!(err.contains(&f.display().to_string()), "names {}: {err}", f.display());
    }
    assert!(err.contains("--fresh"), "{err}");
    assert_eq!(snapshot(&out), before, "nothing under --out may change");
    // --fresh: the old run moves to a dated sibling, whole; the new run starts at step 1.
    let r = train(&out, &["--fresh", "--max-steps", "2", "--checkpoint-every", "2"]);
    ok(&r);
    let text = String::from_utf8_lossy(&r.stderr).to_string() + &String::from_utf8_lossy(&r.stdout);
    let parent = out.parent().unwrap();
    let prefix = format!("{}.replaced-", out.file_name().unwrap().to_string_lossy());
    let moved: Vec<PathBuf> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&prefix))
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}: {text}");
    assert!(text.contains(&moved[0].display().to_string()), "says where it went: {text}");
    assert_eq!(snapshot(&moved[0]), before, "the old run is kept whole");
    assert_eq!(steps(&out.join("metrics.jsonl")), vec![2]);
    assert!(out.join("checkpoints/step-000002").is_dir());
    // --fresh with --resume is refused.
    let r = train(&out, &["--fresh", "--resume", "auto"]);
    assert_eq!(r.status.code(), Some(2));
    for d in [out, moved[0].clone()] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Resuming from an older valid checkpoint (the newest is damaged) keeps the metrics lines it
/// drops in `metrics.jsonl.dropped`, and every step is logged once.
#[test]
fn resuming_from_an_older_checkpoint_keeps_the_dropped_metrics_lines() {
    let out = out_dir("older");
    ok(&train(&out, &["--max-steps", "6", "--checkpoint-every", "2", "--log-every", "1"]));
    damage(&out.join("checkpoints/step-000006/model.safetensors"));
    let r = train(&out, &["--resume", "auto", "--max-steps", "6", "--log-every", "1"]);
    ok(&r);
    assert!(String::from_utf8_lossy(&r.stderr).contains("skipping damaged checkpoint"));
    assert_eq!(steps(&out.join("metrics.jsonl")), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(steps(&out.join("metrics.jsonl.dropped")), vec![5, 6]);
    let _ = std::fs::remove_dir_all(out);
}

/// Waits until `cond` holds (or fails after a minute).
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One trainer per `--out`: a second one is refused with the holder's pid, whether it would
/// resume or start; the lock goes with the process, even after kill -9.
#[test]
fn a_second_trainer_on_the_same_out_is_refused() {
    let out = out_dir("lock");
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_steel-train"))
            .args(["--out", out.to_str().unwrap()])
            .args(SMALL)
            .args(["--max-steps", "100000", "--log-every", "1", "--checkpoint-every", "1000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = spawn();
    let metrics = out.join("metrics.jsonl");
    wait_for("the first trainer's first step", || {
        std::fs::read_to_string(&metrics).is_ok_and(|t| !t.is_empty())
    });
    for args in [&["--resume", "auto", "--max-steps", "3"][..], &["--max-steps", "3"][..]] {
        let r = train(&out, args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("in use by another trainer"), "{err}");
        assert!(err.contains(&format!("pid {}", first.id())), "names the holder: {err}");
    }
    first.kill().unwrap(); // SIGKILL: no chance to clean up
    first.wait().unwrap();
    let mut second = spawn();
    wait_for("a trainer after the kill", || {
        std::fs::read_to_string(out.join(".lock"))
            .is_ok_and(|t| t.contains(&format!("pid {}", second.id())))
    });
    second.kill().unwrap();
    second.wait().unwrap();
    let _ = std::fs::remove_dir_all(out);
}

/// `steel-export` never writes over its checkpoint or a run: `--out` equal to the checkpoint,
/// inside it, around it, or a directory with other contents is refused (exit 2, nothing
/// changed); an absent directory, and a previous export, are written (the latter replaced).
#[test]
fn export_never_replaces_its_checkpoint_or_a_run() {
    let out = out_dir("export");
    ok(&train(&out, &["--max-steps", "2", "--checkpoint-every", "2"]));
    let ck = out.join("checkpoints/step-000002");
    let export = |dst: &Path| {
        Command::new(env!("CARGO_BIN_EXE_steel-export"))
            .args(["--checkpoint", ck.to_str().unwrap(), "--out", dst.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let before = snapshot(&out);
    let odd = out.join("notes");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::write(odd.join("todo.txt"), "mine").unwrap();
    let before_odd = snapshot(&odd);
    let dotted = out.join("checkpoints/./step-000002/../step-000002");
    for (dst, needle) in [
        (ck.clone(), "is the checkpoint"),
        (dotted, "is the checkpoint"),
        (ck.join("hf"), "lies inside"),
        (out.clone(), "contains"),
        (odd.clone(), "not a previous export"),
    ] {
        let r = export(&dst);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{}: {err}", dst.display());
        assert!(err.contains(needle), "{}: {err}", dst.display());
    }
    assert_eq!(snapshot(&odd), before_odd);
    std::fs::remove_dir_all(&odd).unwrap();
    assert_eq!(snapshot(&out), before, "the run is untouched");
    // A new directory, then a re-export into it (a previous export: replaced whole).
    let hf = out_dir("export-hf");
    ok(&export(&hf));
    assert!(hf.join("model.safetensors").is_file() && hf.join("config.json").is_file());
    std::fs::write(hf.join("stale.bin"), "old").unwrap();
    ok(&export(&hf));
    assert!(!hf.join("stale.bin").exists(), "a re-export replaces the old export whole");
    assert!(hf.join("model.safetensors").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(hf.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.contains(".tmp-export-") || n.contains(".old-export-")
        })
        .collect();
    assert!(leftovers.is_empty(), "no temporaries left: {leftovers:?}");
    for d in [out, hf] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A shard that appears in a data directory after the run began is not read on resume — and the
/// resume says so, pointing to `--add-data`.
#[test]
fn a_new_shard_in_a_data_directory_is_named_on_resume() {
    let out = out_dir("new-shard");
    ok(&train(&out, &["--max-steps", "2", "--checkpoint-every", "2"]));
    let train_dir = out.join("data/train");
    std::fs::copy(train_dir.join("train_0000000000.bin"), train_dir.join("late_0000000000.bin"))
        .unwrap();
    let r = train(&out, &["--resume", "auto", "--max-steps", "3"]);
    ok(&r);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("appeared after this run began") && err.contains("late_0000000000.bin"),
        "{err}"
    );
    assert!(err.contains(&format!("--add-data {}", train_dir.display())), "{err}");
    let _ = std::fs::remove_dir_all(out);
}

//! The training binaries as users run them: exact resume across processes, SIGINT, exports,
//! plots, `--help`, and one-line errors with exit code 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("steel-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_steel-train")).args(args).output().unwrap()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn losses(metrics: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            // compare the exact printed f64, not a rounded value
            (v["step"].as_u64().unwrap(), format!("{} {}", v["loss"], v["grad_norm"]))
        })
        .collect()
}

#[test]
fn stop_and_resume_in_separate_processes_is_bit_identical() {
    let (a, b) = (out_dir("straight"), out_dir("resumed"));
    let common = ["--log-every", "1", "--set", "train.eval_every=0"];
    let a_s = a.to_str().unwrap();
    let b_s = b.to_str().unwrap();
    ok(&train(&[&["--out", a_s, "--max-steps", "12"][..], &common].concat()));
    ok(&train(&[&["--out", b_s, "--max-steps", "5"][..], &common].concat()));
    ok(&train(&[&["--out", b_s, "--max-steps", "12", "--resume", "auto"][..], &common].concat()));
    assert_eq!(losses(&a.join("metrics.jsonl")), losses(&b.join("metrics.jsonl")));
    // (data.safetensors names each run's own shard paths, so it differs by those)
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let x = std::fs::read(a.join("checkpoints/step-000012").join(f)).unwrap();
        let y = std::fs::read(b.join("checkpoints/step-000012").join(f)).unwrap();
        assert!(x == y, "{f} differs between the straight and the resumed run");
    }
    // export, score, plot
    let export = a.join("export");
    let o = Command::new(env!("CARGO_BIN_EXE_steel-export"))
        .args(["--checkpoint", a.join("checkpoints/step-000012").to_str().unwrap()])
        .args(["--out", export.to_str().unwrap(), "--dtype", "f32"])
        .output()
        .unwrap();
    ok(&o);
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(export.join(f).is_file(), "export lacks {f}");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_steel-eval"))
        .args(["ppl", "--model", export.to_str().unwrap(), "--text", "The river town woke slowly."])
        .output()
        .unwrap();
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["ppl"].as_f64().is_some_and(|p| p > 1.0 && p < 1024.0), "{v}");
    let svg = a.join("loss.svg");
    ok(&Command::new(env!("CARGO_BIN_EXE_steel-plot"))
        .args([a.join("metrics.jsonl").to_str().unwrap(), "--out", svg.to_str().unwrap()])
        .output()
        .unwrap());
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<polyline") || text.contains("<path"), "the SVG has curves");
    for d in [a, b] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn sigint_finishes_the_step_writes_a_checkpoint_and_exits_0() {
    let out = out_dir("sigint");
    let child = Command::new(env!("CARGO_BIN_EXE_steel-train"))
        .args(["--out", out.to_str().unwrap(), "--max-steps", "100000", "--log-every", "1"])
        .args(["--set", "train.eval_every=0", "--checkpoint-every", "100000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count()) < 3 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    ok(&o);
    let steps = losses(&metrics).last().unwrap().0;
    let dir = out.join(format!("checkpoints/step-{steps:06}"));
    assert!(dir.join("manifest.json").is_file(), "checkpoint of the last step {steps}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("stopped by signal"));
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn user_mistakes_exit_2_with_one_line() {
    let out = out_dir("mistakes");
    let o = out.to_str().unwrap();
    for (args, needle) in [
        (vec!["--out", o, "--set", "optim.lrr=1"], "lrr"),
        (vec!["--out", o, "--device", "cuda"], "no CUDA driver found; use --device cpu"),
        (vec!["--config", "/nonexistent/recipe.toml"], "/nonexistent/recipe.toml"),
        (vec!["--out", o, "--profile-steps", "5"], "A:B"),
        (vec!["--out", o, "--resume", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    ] {
        let r = train(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn every_tool_explains_itself() {
    for exe in [
        env!("CARGO_BIN_EXE_steel-train"),
        env!("CARGO_BIN_EXE_steel-export"),
        env!("CARGO_BIN_EXE_steel-plot"),
        env!("CARGO_BIN_EXE_steel-generate"),
        env!("CARGO_BIN_EXE_steel-chat"),
    ] {
        let o = Command::new(exe).arg("--help").output().unwrap();
        ok(&o);
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage"));
    }
    let o = train(&["--dry-run"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("FLOPs per token"));
}

#[test]
fn the_demo_model_generates_and_chats() {
    let out = out_dir("chat");
    let o = out.to_str().unwrap();
    ok(&train(&["--out", o, "--max-steps", "3", "--set", "train.eval_every=0"]));
    let ck = out.join("checkpoints/step-000003");
    let gen = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_steel-generate"))
            .args(["--model", ck.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    };
    let r =
        gen(&["--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--temperature", "0", "--json"]);
    ok(&r);
    let stdout = String::from_utf8(r.stdout.clone()).unwrap();
    assert_eq!(stdout.lines().count(), 1, "--json prints one line: {stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let ids = v["ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 6);
    assert!(v["text"].is_string(), "the checkpoint carries its tokenizer");
    // greedy is reproducible, and --prompt with --chat renders the template
    let again =
        gen(&["--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--temperature", "0", "--json"]);
    assert_eq!(r.stdout, again.stdout);
    ok(&gen(&["--prompt", "Hello", "--chat", "--system", "Be brief.", "--max-new-tokens", "4"]));
    let bad = gen(&["--prompt-ids", "5,x"]);
    assert_eq!(bad.status.code(), Some(2));
    // a conversation over stdin with the REPL's commands
    let mut child = Command::new(env!("CARGO_BIN_EXE_steel-chat"))
        .args(["--model", ck.to_str().unwrap(), "--max-new-tokens", "4", "--temperature", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello there\nAnd again\n/reset\n/system Be brief.\nHi\n/quit\n")
        .unwrap();
    let r = child.wait_with_output().unwrap();
    ok(&r);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("conversation reset"), "{err}");
    assert_eq!(String::from_utf8_lossy(&r.stdout).lines().count(), 3, "three replies");
    let _ = std::fs::remove_dir_all(out);
}

//! The training binaries as users run them: exact resume across processes, SIGINT, exports,
//! plots, `--help`, and one-line errors with exit code 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{newcomer_shell, ok};

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("steel-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_steel-train")).args(args).output().unwrap()
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
    assert!(text.contains("steps 1..12 (12 logged)"), "the title counts steps");
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
        (vec!["--out", o, "--profile-steps", "5:x"], "10:12"),
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
    // three replies, each ended by a newline (a reply may hold newlines of its own)
    assert!(String::from_utf8_lossy(&r.stdout).matches('\n').count() >= 3, "three replies");
    assert_eq!(err.matches("> ").count(), 6, "a prompt before each of the six input lines: {err}");
    let _ = std::fs::remove_dir_all(out);
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[test]
fn multiple_choice_evaluation_on_the_fixtures() {
    use steel_cli::eval_mc::{
        cmmlu_example, cmmlu_prompt, read_questions, Format, Question, LETTERS,
    };
    let out = out_dir("mc");
    let o = out.to_str().unwrap();
    ok(&train(&["--out", o, "--max-steps", "4", "--set", "train.eval_every=0"]));
    let ck = out.join("checkpoints/step-000004");
    // the CSV layouts: C-Eval by column name, CMMLU by position after the index column
    let ce =
        read_questions(&fixtures().join("ceval/val/high_school_physics_val.csv"), Format::Ceval)
            .unwrap();
    assert_eq!(ce.len(), 4);
    assert_eq!((ce[3].options[0].as_str(), ce[3].answer.as_str()), ("桌面对它的支持力", "A"));
    let cm = read_questions(&fixtures().join("cmmlu/test/astronomy.csv"), Format::Cmmlu).unwrap();
    assert_eq!(
        cm[0],
        Question {
            id: "0".into(),
            question: "太阳系中体积最大的行星是".into(),
            options: vec!["地球".into(), "木星".into(), "火星".into(), "金星".into()],
            answer: "B".into(),
        }
    );
    assert_eq!(
        cmmlu_example(&cm[0], true),
        "题目：太阳系中体积最大的行星是\nA. 地球\nB. 木星\nC. 火星\nD. 金星\n答案是：B\n\n"
    );
    for format in ["ceval", "cmmlu"] {
        let json = out.join(format!("{format}.json"));
        let eval = || {
            Command::new(env!("CARGO_BIN_EXE_steel-eval"))
                .args(["mc", "--model", ck.to_str().unwrap(), "--format", format])
                .args(["--data", fixtures().join(format).to_str().unwrap()])
                .args(["--out", json.to_str().unwrap()])
                .output()
                .unwrap()
        };
        ok(&eval());
        let first = std::fs::read_to_string(&json).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let qs = v["questions"].as_array().unwrap();
        assert_eq!(qs.len(), 7, "{format}: every question listed");
        assert!(qs
            .iter()
            .all(|q| ["A", "B", "C", "D"].contains(&q["prediction"].as_str().unwrap())));
        let overall = v["overall"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&overall));
        if format == "cmmlu" {
            // the logits method picks the argmax option of a direct forward of the prompt
            let lm = steel_cli::generation::Loaded::load(
                &ck,
                None,
                true,
                std::sync::Arc::new(steel_runtime::cpu::CpuBackend::new()),
            )
            .unwrap();
            let tok = lm.tokenizer.as_ref().unwrap();
            let ids: Vec<u32> = LETTERS.iter().map(|l| tok.encode(l).unwrap()[0]).collect();
            for q in &cm {
                let prompt = cmmlu_prompt(tok, "天文学", &[], q, 2048).unwrap();
                assert!(prompt.starts_with(
                    "以下是关于天文学的单项选择题，请直接给出正确答案的选项。\n\n题目："
                ));
                let t = tok.encode(&prompt).unwrap();
                let x = steel_runtime::Tensor::from_vec(
                    t.iter().map(|&i| i as i32).collect(),
                    &[1, t.len()],
                )
                .unwrap();
                let logits = lm.model.logits(&x).unwrap().to_vec::<f32>().unwrap();
                let last = &logits[logits.len() - lm.model.config.vocab_size..];
                let best = (0..4)
                    .max_by(|&a, &b| last[ids[a] as usize].total_cmp(&last[ids[b] as usize]))
                    .unwrap();
                let pred = qs
                    .iter()
                    .find(|x| x["subject"] == "astronomy" && x["id"] == q.id.as_str())
                    .unwrap();
                assert_eq!(pred["prediction"], LETTERS[best], "question {}", q.id);
            }
            // the few-shot budget drops all longest examples until the rest fits
            let dev =
                read_questions(&fixtures().join("cmmlu/dev/astronomy.csv"), Format::Cmmlu).unwrap();
            let full = cmmlu_prompt(tok, "天文学", &dev, &cm[0], 2048).unwrap();
            assert!(
                full.contains("答案是：C\n\n题目：太阳是一颗") || full.contains("题目：太阳是一颗")
            );
            let tight =
                cmmlu_prompt(tok, "天文学", &dev, &cm[0], tok.encode(&full).unwrap().len() - 5)
                    .unwrap();
            assert!(tight.len() < full.len());
        }
        // a second run resumes and changes nothing
        let again = eval();
        ok(&again);
        assert!(String::from_utf8_lossy(&again.stderr).contains("resuming"));
        assert_eq!(std::fs::read_to_string(&json).unwrap(), first);
    }
    let _ = std::fs::remove_dir_all(out);
}

/// `--device emu` in every tool: the GPU backend with every kernel emulated. Each tool says
/// `device: emu`, runs the model's ops on the GPU backend only (no `CpuBackend` is constructed
/// once the backend is open: the end-of-run line says so) and reports the kernels and GEMMs it
/// launched; every one finishes (a training step, a checkpoint, an evaluation, generation, chat
/// and the training benchmark), with no CPU fallback.
#[test]
fn every_tool_runs_on_the_emulated_gpu() {
    let out = out_dir("emu");
    let o = out.to_str().unwrap();
    ok(&train(&["--out", o, "--max-steps", "1", "--set", "train.eval_every=0"]));
    let ck = out.join("checkpoints/step-000001");
    let ck = ck.to_str().unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny/config.json");
    let data = fixtures().join("ceval");
    let exe = |name: &str| match name {
        "steel-eval" => env!("CARGO_BIN_EXE_steel-eval"),
        "steel-generate" => env!("CARGO_BIN_EXE_steel-generate"),
        "steel-chat" => env!("CARGO_BIN_EXE_steel-chat"),
        "steel-bench" => env!("CARGO_BIN_EXE_steel-bench"),
        _ => env!("CARGO_BIN_EXE_steel-train"),
    };
    let emu_out = out.join("emu-train");
    let mc_json = out.join("mc.json");
    let runs: Vec<(&str, Vec<&str>)> = vec![
        ("steel-eval", vec!["ppl", "--model", ck, "--ids", "5,6,7,8"]),
        ("steel-eval", vec!["mc", "--model", ck, "--format", "ceval", "--limit", "1"]),
        ("steel-generate", vec!["--model", ck, "--prompt-ids", "5,6", "--max-new-tokens", "2"]),
        ("steel-chat", vec!["--model", ck, "--max-new-tokens", "2"]),
        (
            "steel-bench",
            vec![
                "train",
                "--model-config",
                config.to_str().unwrap(),
                "--seq",
                "8",
                "--batch",
                "1",
                "--steps",
                "1",
                "--warmup",
                "0",
            ],
        ),
        (
            "steel-train",
            vec![
                "--out",
                emu_out.to_str().unwrap(),
                "--max-steps",
                "1",
                "--set",
                "train.eval_every=0",
            ],
        ),
    ];
    for (tool, mut args) in runs {
        if tool == "steel-eval" && args[0] == "mc" {
            args.extend(["--data", data.to_str().unwrap()]);
            args.extend(["--out", mc_json.to_str().unwrap()]);
        }
        args.extend(["--device", "emu"]);
        let mut child = Command::new(exe(tool))
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // steel-chat reads one message (the others ignore stdin).
        use std::io::Write;
        let _ = child.stdin.take().unwrap().write_all(b"Hello\n/quit\n");
        let r = child.wait_with_output().unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
        assert!(text.contains("device: emu"), "{tool} {args:?} must say it runs on emu: {text}");
        assert!(!text.contains("panicked"), "{tool}: {text}");
        let summary = text
            .lines()
            .find(|l| l.contains("emu: ") && l.contains("kernel launches and"))
            .unwrap_or_else(|| panic!("{tool} {args:?}: no launch counts at the end: {text}"));
        assert!(summary.ends_with("no CPU backend constructed"), "{tool}: {summary}");
        // Every op runs on the GPU backend now: each tool finishes on the emulator.
        assert!(r.status.success(), "{tool} {args:?} failed on emu: {text}");
        assert!(!summary.contains(" 0 kernel launches"), "{tool} launched no kernel: {text}");
    }
    // Every metrics row says where its step ran and what it launched there.
    let rows = |dir: &Path| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let emu_rows = rows(&emu_out);
    assert!(!emu_rows.is_empty());
    for row in &emu_rows {
        assert_eq!(row["device"], "emu", "{row}");
        assert!(row["kernel_launches"].as_u64().is_some_and(|n| n > 0), "{row}");
    }
    for row in rows(&out) {
        let device = row["device"].as_str().unwrap().to_string();
        let launches = row["kernel_launches"].as_u64().unwrap();
        // `--device auto`: the CPU here, a GPU where a driver is found.
        assert!(device == "cpu" || device.starts_with("cuda:"), "{row}");
        assert_eq!(launches == 0, device == "cpu", "{row}");
    }
    for tool in ["steel-eval", "steel-generate", "steel-chat", "steel-train"] {
        let args: &[&str] = if tool == "steel-eval" { &["ppl", "--help"] } else { &["--help"] };
        let o = Command::new(exe(tool)).args(args).output().unwrap();
        assert!(String::from_utf8_lossy(&o.stdout).contains("emu"), "{tool} --help lists emu");
    }
    let _ = std::fs::remove_dir_all(out);
}

/// `steel-eval ppl --device emu` equals `--device cpu` on a model whose soft-MoE branch matters
/// (expert weights 8/√fan_in, DESIGN §1's testing trap): within 1e-2 relative, the bf16 bound of
/// flash attention (every other op is fp32 on both). The same model with its experts zeroed
/// scores differently on the CPU, so the comparison does see the soft MoE.
#[test]
fn perplexity_on_the_emulated_gpu_equals_the_cpu() {
    use std::collections::HashMap;
    use std::sync::Arc;
    use steel_autograd::fixtures::SplitMix;
    use steel_model::{save_hf_dir, ExportOptions, SaveDType, SteelConfig, SteelModel};
    use steel_runtime::{cpu::CpuBackend, Tensor};
    let out = out_dir("ppl-emu");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny/config.json");
    let cfg = SteelConfig::from_file(&config).unwrap();
    let write = |dir: &Path, expert_gain: f64| {
        let mut rng = SplitMix::new(17);
        let mut tensors = HashMap::new();
        for (name, shape) in cfg.param_shapes() {
            let n: usize = shape.iter().product();
            let fan_in = *shape.last().unwrap() as f64;
            let v = if name.contains("layernorm") || name == "model.norm.weight" {
                vec![1.0; n]
            } else if name.ends_with("mlp.scale") {
                vec![1.0]
            } else if name.contains(".experts.") {
                rng.vec(n, expert_gain * 3f64.sqrt() / fan_in.sqrt())
            } else {
                rng.vec(n, 3f64.sqrt() / fan_in.sqrt())
            };
            tensors.insert(
                name,
                Tensor::from_vec(v.iter().map(|&x| x as f32).collect(), &shape).unwrap(),
            );
        }
        let model =
            SteelModel::from_tensors(cfg.clone(), Arc::new(CpuBackend::new()), tensors).unwrap();
        let opts = ExportOptions { dtype: SaveDType::F32, ..ExportOptions::default() };
        save_hf_dir(&model, dir, &opts).unwrap();
    };
    let (large, zeroed) = (out.join("large"), out.join("zeroed"));
    write(&large, 8.0);
    write(&zeroed, 0.0);
    let ids = "5,6,7,8,9,10,11,12,200,13,14,300,15,16";
    let loss = |dir: &Path, device: &str| -> f64 {
        let o = Command::new(env!("CARGO_BIN_EXE_steel-eval"))
            .args(["ppl", "--model", dir.to_str().unwrap(), "--ids", ids, "--device", device])
            .output()
            .unwrap();
        ok(&o);
        let line =
            String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or_default().to_string();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        v["loss"].as_f64().unwrap()
    };
    let (cpu, emu) = (loss(&large, "cpu"), loss(&large, "emu"));
    let rel = ((emu - cpu) / cpu).abs();
    assert!(rel <= 1e-2, "ppl loss on emu {emu} vs cpu {cpu}: relative {rel:.2e} > 1e-2");
    let without = loss(&zeroed, "cpu");
    assert!(
        ((without - cpu) / cpu).abs() > 1e-2,
        "the experts do not move the loss: {without} vs {cpu}"
    );
    let _ = std::fs::remove_dir_all(out);
}

/// Every command a non-default run prints under "next:" runs from the checkout as printed, with a
/// PATH holding only the system and `~/.cargo/bin` (no installed Steel tools), and the resume
/// command keeps the run's overrides.
#[test]
fn the_printed_next_commands_run_as_printed() {
    let dir = out_dir("next");
    let run = dir.join("run");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let recipe = repo.join("configs/demo.toml");
    let o = train(&[
        "--config",
        recipe.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--max-steps",
        "2",
        "--set",
        "train.eval_every=0",
        "--set",
        "data.seq_len=16",
        "--device",
        "cpu",
    ]);
    ok(&o);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let next: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("next"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(str::trim)
        .collect();
    assert!(next.len() >= 6, "{stdout}");
    let resume = next.iter().find(|c| c.contains("--resume auto")).expect("a resume command");
    assert!(resume.contains("--set data.seq_len=16"), "keeps the overrides: {resume}");
    assert!(resume.contains("--max-steps 4"), "{resume}");
    for cmd in next {
        let o = newcomer_shell(cmd, &repo).output().unwrap();
        assert!(
            o.status.success(),
            "{cmd}: exit {:?}\n{}",
            o.status.code(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `configs/sft-demo.toml` fine-tunes the demo's export (its config comes from `init_from`),
/// `--max-steps` stops an epoch-counted run early, and the printed resume command continues it.
#[test]
fn the_demo_fine_tunes_and_max_steps_caps_its_epochs() {
    let dir = out_dir("sft-demo");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let base = dir.join("base");
    let quick = ["--max-steps", "1", "--set", "train.eval_every=0", "--device", "cpu"];
    ok(&train(&[&["--out", base.to_str().unwrap()][..], &quick].concat()));
    let export = dir.join("export");
    ok(&Command::new(env!("CARGO_BIN_EXE_steel-export"))
        .args(["--checkpoint", base.join("checkpoints/step-000001").to_str().unwrap()])
        .args(["--out", export.to_str().unwrap()])
        .output()
        .unwrap());
    let sft = dir.join("sft");
    let recipe = repo.join("configs/sft-demo.toml");
    let init = format!("model.init_from={:?}", export.to_str().unwrap());
    let o = train(&[
        "--config",
        recipe.to_str().unwrap(),
        "--out",
        sft.to_str().unwrap(),
        "--set",
        &init,
        "--max-steps",
        "2",
    ]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("steps 1..2"), "--max-steps 2 runs two steps: {err}");
    assert!(err.contains("this run stops at step 2"), "{err}");
    let lines = std::fs::read_to_string(sft.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 2);
    let _ = std::fs::remove_dir_all(dir);
}

/// The first screen of the demo: where the device choice came from, each of the tokenizer and
/// checkpoint lines once, no `0/0` bar before training starts, and a re-run that goes to
/// `runs/demo-2` says so before anything else.
#[test]
fn the_demo_first_screen_says_each_thing_once() {
    let cwd = out_dir("first-screen");
    std::fs::create_dir_all(&cwd).unwrap();
    let demo = |extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_steel-train"))
            .args(["--max-steps", "1", "--set", "train.eval_every=0"])
            .args(extra)
            .current_dir(&cwd)
            .output()
            .unwrap();
        ok(&o);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        (err, String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let count = |s: &str, start: &str| s.lines().filter(|l| l.starts_with(start)).count();
    let (err, out) = demo(&[]);
    let both = format!("{err}{out}");
    assert_eq!(count(&both, "device: cpu (train.device of the demo recipe)"), 1, "{both}");
    assert_eq!(count(&both, "tokenizer:"), 1, "{both}");
    assert_eq!(count(&both, "checkpoint:"), 1, "{both}");
    assert!(!both.contains("0/0"), "no empty bar: {both}");
    assert!(!both.contains("demo-2"), "{both}");
    let (err, _) = demo(&["--device", "cpu"]);
    let first = err.lines().next().unwrap_or_default();
    assert!(first.contains("runs/demo already") && first.contains("runs/demo-2"), "{err}");
    assert_eq!(count(&err, "device: cpu (--device)"), 1, "{err}");
    let (err, out) = demo(&["--set", "train.device=\"cpu\""]);
    assert!(err.lines().next().unwrap_or_default().contains("runs/demo-3"), "{err}");
    assert_eq!(count(&err, "device: cpu (--set train.device)"), 1, "{err}");
    assert!(out.contains("--out runs/demo-3 --resume auto"), "{out}");
    let _ = std::fs::remove_dir_all(cwd);
}

/// `steel-bench train` shows its progress on stderr while it runs; its last stdout line stays the
/// one-line JSON result.
#[test]
fn the_bench_shows_progress_and_ends_with_json() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let o = Command::new(env!("CARGO_BIN_EXE_steel-bench"))
        .args(["train", "--model-config"])
        .arg(repo.join("configs/tiny/config.json"))
        .args(["--seq", "16", "--batch", "1", "--steps", "2", "--device", "cpu"])
        .output()
        .unwrap();
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    let steps = err.lines().filter(|l| l.starts_with("steel-bench train: step ")).count();
    assert!(steps >= 2, "a line per step on stderr: {err}");
    let out = String::from_utf8_lossy(&o.stdout);
    let last = out.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).expect("the last line is JSON");
    assert!(v["tokens_per_s"].as_f64().is_some_and(|t| t > 0.0), "{last}");
    assert_eq!(v["steps"], 2, "{last}");
}

/// `steel-plot` titles a run by its steps (not by its logged points) and puts the step axis's
/// ticks on round numbers.
#[test]
fn the_plot_counts_steps_and_ticks_round_numbers() {
    let dir = out_dir("plot");
    std::fs::create_dir_all(&dir).unwrap();
    let metrics: String = (1..=50)
        .map(|i| {
            let step = 10 * i;
            let loss = 6.0 - 2.0 * (i as f64 / 50.0).sqrt() + 0.01 * ((i * 7) % 5) as f64;
            format!("{{\"step\":{step},\"loss\":{loss},\"lr\":{}}}\n", 3e-3 / i as f64)
        })
        .collect();
    std::fs::write(dir.join("metrics.jsonl"), metrics).unwrap();
    let svg = dir.join("loss.svg");
    ok(&Command::new(env!("CARGO_BIN_EXE_steel-plot"))
        .arg(dir.join("metrics.jsonl"))
        .arg("--out")
        .arg(&svg)
        .output()
        .unwrap());
    let text = std::fs::read_to_string(&svg).unwrap();
    let labels: Vec<&str> = text
        .split("</text>")
        .filter_map(|t| t.rsplit('>').next())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    assert!(labels.iter().any(|l| l.contains("steps 10..500 (50 logged)")), "{labels:?}");
    let numbers: Vec<f64> = labels.iter().filter_map(|l| l.parse::<f64>().ok()).collect();
    for tick in ["100", "200", "300", "400", "500"] {
        assert!(labels.contains(&tick), "a step tick at {tick}: {labels:?}");
    }
    assert!(!numbers.contains(&108.0) && !numbers.contains(&10.0), "{labels:?}");
    let _ = std::fs::remove_dir_all(dir);
}

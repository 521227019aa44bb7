//! The training loop end to end on the embedded demo recipe: the loss falls, N ranks equal one
//! rank with N times the micro-batch, a non-finite step is skipped and reported, damaged or
//! half-written checkpoints are skipped by `--resume auto`, the LR of the 1.1B recipe, and recipe
//! overrides.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use steel_runtime::Tensor;
use steel_train::{train, Event, Recipe, Resume, RunOptions, Summary};

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("steel-trainer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn demo(overrides: &[&str]) -> Recipe {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Recipe::demo(&o).unwrap()
}

fn run(recipe: &Recipe, opts: &RunOptions) -> (Summary, Vec<Event>) {
    let mut events = Vec::new();
    let s = train(recipe, opts, &mut |e| events.push(e.clone())).unwrap();
    (s, events)
}

fn opts(out: &Path) -> RunOptions {
    RunOptions { out: out.to_path_buf(), ..RunOptions::default() }
}

/// Weights of a checkpoint's model.safetensors, by name.
fn weights(dir: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let t = Tensor::from_bytes(v.data(), steel_runtime::DType::F32, v.shape()).unwrap();
            (n, t.to_vec::<f32>().unwrap())
        })
        .collect()
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn demo_loss_falls() {
    let out = out_dir("falls");
    let recipe = demo(&["train.max_steps=60", "train.eval_every=60"]);
    let (s, events) = run(&recipe, &opts(&out));
    assert_eq!(s.losses.len(), 60);
    let first = s.losses[0];
    let last10: f64 = s.losses[50..].iter().sum::<f64>() / 10.0;
    // ln(512) ≈ 6.24 at initialisation; measured ≈ 4.85 after 60 steps.
    assert!(first > 6.0, "initial loss {first}");
    assert!(last10 < first - 1.0, "loss {first} → {last10}: did not fall by 1 nat");
    let val = events.iter().find_map(|e| match e {
        Event::Validation { loss, .. } => Some(*loss),
        _ => None,
    });
    assert!(val.is_some_and(|v| v.is_finite() && v < first), "validation ran: {val:?}");
    // metrics.jsonl: one object per logged step with the promised keys
    let rows = steel_train::metrics::read_metrics(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(rows.len(), 6, "log_every 10 over 60 steps");
    for k in ["step", "loss", "lr", "grad_norm", "tokens_per_s"] {
        assert!(rows.iter().all(|r| r[k].is_number()), "metrics lack {k}");
    }
    assert!(out.join("checkpoints/step-000060/tokenizer.json").is_file());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn two_ranks_equal_one_rank_with_twice_the_micro_batch() {
    let (a, b) = (out_dir("rank1"), out_dir("rank2"));
    let r1 =
        demo(&["train.max_steps=4", "train.micro_batch=8", "train.ranks=1", "train.eval_every=0"]);
    let r2 =
        demo(&["train.max_steps=4", "train.micro_batch=4", "train.ranks=2", "train.eval_every=0"]);
    let (s1, _) = run(&r1, &opts(&a));
    let (s2, _) = run(&r2, &opts(&b));
    for (x, y) in s1.losses.iter().zip(&s2.losses) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "losses {x} vs {y}");
    }
    let (w1, w2) =
        (weights(&a.join("checkpoints/step-000004")), weights(&b.join("checkpoints/step-000004")));
    assert_eq!(w1.len(), w2.len());
    for (name, v) in &w1 {
        // The key bias's exact gradient is zero (a constant added to every key's score leaves
        // the softmax unchanged): its computed gradient is pure rounding noise, which Adam
        // normalises into lr-sized steps, so its values agree only in magnitude.
        if name.ends_with("k_proj.bias") {
            let mag = |x: &[f32]| x.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            assert!((mag(&w2[name]) - mag(v)).abs() <= 4.0 * 3e-3 * 4.0 * 1.1, "{name}");
            continue;
        }
        let d = rel_diff(&w2[name], v);
        assert!(d <= 1e-5, "{name}: relative difference {d}");
    }
    // and the replicas of the 2-rank run did not simply stay at their initialisation
    let init = out_dir("rank0");
    let (_, _) = run(
        &demo(&["train.max_steps=1", "optim.lr=0", "optim.min_lr=0", "train.eval_every=0"]),
        &opts(&init),
    );
    let w0 = weights(&init.join("checkpoints/step-000001"));
    assert!(w0.iter().any(|(n, v)| rel_diff(&w2[n], v) > 1e-4), "training changed the weights");
    for d in [a, b, init] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_nan_gradient_skips_the_step_and_is_reported() {
    let (a, b) = (out_dir("nan-ref"), out_dir("nan"));
    let base = ["train.eval_every=0", "train.log_every=1", "train.checkpoint_every=2"];
    let mut r2 = base.to_vec();
    r2.push("train.max_steps=2");
    let (_, _) = run(&demo(&r2), &opts(&a));
    let mut r3 = base.to_vec();
    r3.push("train.max_steps=3");
    let mut o = opts(&b);
    let hits = Arc::new(Mutex::new(0));
    let h = hits.clone();
    o.hook = Some(Arc::new(move |step, _rank, params: &steel_autograd::ParamStore| {
        if step == 3 {
            let (id, _) = params.iter().nth(5).unwrap();
            let g = params.grad_buffer(id)?;
            let mut w = g.cpu_write()?;
            if let steel_runtime::CpuStorage::F32(v) = &mut *w {
                v[7] = f32::NAN;
            }
            *h.lock().unwrap() += 1;
        }
        Ok(())
    }));
    let (s, events) = run(&demo(&r3), &o);
    assert_eq!(*hits.lock().unwrap(), 1);
    assert!(events.iter().any(|e| matches!(e, Event::Skipped { step: 3, .. })), "skip reported");
    assert!(s.losses[2].is_finite(), "the loss itself was fine");
    let rows = steel_train::metrics::read_metrics(&b.join("metrics.jsonl")).unwrap();
    assert_eq!(rows[2]["skipped"], true);
    assert!(rows[2]["grad_norm"].is_null() || !rows[2]["grad_norm"].as_f64().unwrap().is_finite());
    // Nothing was applied: the weights after step 3 are those after step 2, bit for bit.
    let (w2, w3) =
        (weights(&a.join("checkpoints/step-000002")), weights(&b.join("checkpoints/step-000003")));
    assert_eq!(w2, w3);
    for d in [a, b] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn resume_auto_skips_damaged_and_half_written_checkpoints() {
    let (a, b) = (out_dir("dmg-ref"), out_dir("dmg"));
    let base = ["train.eval_every=0", "train.log_every=1", "train.checkpoint_every=2"];
    let mut full = base.to_vec();
    full.push("train.max_steps=6");
    let (ref_run, _) = run(&demo(&full), &opts(&a));
    let mut part = base.to_vec();
    part.push("train.max_steps=4");
    run(&demo(&part), &opts(&b));
    // step 4 corrupted (one byte flipped), and a crash while writing step 6 left a temporary
    let ck = b.join("checkpoints");
    let f = ck.join("step-000004/optimizer.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(&f, bytes).unwrap();
    let tmp = ck.join(".tmp-step-000006");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors"), b"partial").unwrap();
    let mut o = opts(&b);
    o.resume = Resume::Auto;
    let (s, events) = run(&demo(&full), &o);
    let warned = events.iter().any(|e| {
        matches!(e, Event::Notice(n) if n.contains("step-000004") && n.contains("optimizer.safetensors"))
    });
    assert!(warned, "the damaged file is named in a warning");
    assert_eq!(s.start_step, 2, "resumed from the newest valid checkpoint");
    // exact: steps 3..6 equal the uninterrupted run's, bit for bit
    assert_eq!(&s.losses[..], &ref_run.losses[2..]);
    assert_eq!(weights(&a.join("checkpoints/step-000006")), weights(&ck.join("step-000006")));
    // a damaged checkpoint named explicitly is an error naming the file
    let mut o = opts(&b);
    o.resume = Resume::Dir(ck.join("step-000006"));
    let f = ck.join("step-000006/model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    let err = train(&demo(&full), &o, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("truncated or corrupted"), "{err}");
    for d in [a, b] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn the_1_1b_recipe_reproduces_the_reference_hyper_parameters() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/steel-1.1b.toml");
    let r = Recipe::load(&path, &[]).unwrap();
    assert_eq!(r.tokens_per_step(), 1_048_576);
    assert_eq!(r.global_batch(), 512);
    assert_eq!(
        (r.optim.beta1, r.optim.beta2, r.optim.weight_decay, r.optim.eps),
        (0.9, 0.95, 0.05, 1e-8)
    );
    assert_eq!(r.optim.clip, 1.0);
    let s = steel_train::LrSchedule::new(
        r.optim.lr,
        r.optim.min_lr,
        r.optim.warmup_steps,
        r.optim.decay_steps,
    )
    .unwrap();
    // the reference's check points in micro-iterations (8 per step): it 8000 → step 1000,
    // it 4,324,000 → step 540,500, it 8,640,000 → step 1,080,000
    assert!((s.lr(1000) - 3e-4).abs() < 1e-15);
    assert!((s.lr(540_500) - 1.5e-4).abs() < 1e-12);
    assert_eq!(s.lr(1_080_000), 0.0);
    assert_eq!(r.train.max_steps, 1_080_000);
    let d = steel_train::dry_run(&r).unwrap();
    assert_eq!(d.params, 1_122_922_770);
}

#[test]
fn recipe_overrides_and_mistakes() {
    let r = demo(&["optim.lr=1e-3", "train.micro_batch=2", "data.seq_len=32"]);
    assert_eq!((r.optim.lr, r.train.micro_batch, r.data.seq_len), (1e-3, 2, 32));
    let err = Recipe::demo(&["optim.lrr=1".to_string()]).unwrap_err().to_string();
    assert!(err.contains("lrr"), "{err}");
    let err = Recipe::demo(&["train.micro_batch=0".to_string()]).unwrap_err().to_string();
    assert!(err.contains("train.micro_batch"), "{err}");
    let err = Recipe::demo(&["optim.lr".to_string()]).unwrap_err().to_string();
    assert!(err.contains("key=value"), "{err}");
    let err = Recipe::demo(&["train.device=tpu".to_string()]).unwrap_err().to_string();
    assert!(err.contains("train.device"), "{err}");
    // a fine-tuning recipe cuts examples at 768 tokens unless it says otherwise
    let sft = "[model]\ninit_from = \"m\"\n[data]\nsft = [\"a.jsonl\"]\n[train]\nmicro_batch = 1\nepochs = 1.0\n";
    let r = Recipe::parse(sft, "sft", Path::new("/x"), &[]).unwrap();
    assert_eq!(r.data.seq_len, 768);
    assert_eq!(r.data.sft, vec![PathBuf::from("/x/a.jsonl")]);
    let err =
        Recipe::parse(sft, "sft", Path::new("/x"), &["data.demo_corpus=true".into()]).unwrap_err();
    assert!(err.to_string().contains("exactly one of"), "{err}");
}

/// Paths written in a recipe are relative to its folder; paths given with `--set` (or a flag)
/// to the current directory.
#[test]
fn recipe_paths_are_relative_to_where_they_were_written() {
    let sft = "[model]\ninit_from = \"m\"\n[data]\nsft = [\"a.jsonl\"]\ntokenizer = \"tok\"\n\
               [train]\nmicro_batch = 1\nepochs = 1.0\n";
    let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let r =
        Recipe::parse(sft, "sft", Path::new("/x"), &o(&["model.init_from=\"runs/demo/export\""]))
            .unwrap();
    assert_eq!(r.model.init_from, Some(PathBuf::from("runs/demo/export")), "from the command line");
    assert_eq!(r.data.sft, vec![PathBuf::from("/x/a.jsonl")], "from the file");
    assert_eq!(r.data.tokenizer, Some(PathBuf::from("/x/tok")));
    // A whole table set on the command line: every path in it is the command line's.
    let r = Recipe::parse(sft, "sft", Path::new("/x"), &o(&["data.sft=[\"b.jsonl\"]"])).unwrap();
    assert_eq!(r.data.sft, vec![PathBuf::from("b.jsonl")]);
    assert_eq!(r.model.init_from, Some(PathBuf::from("/x/m")));
    // An absolute path stays as given either way.
    let r = Recipe::parse(sft, "sft", Path::new("/x"), &o(&["data.tokenizer=\"/t\""])).unwrap();
    assert_eq!(r.data.tokenizer, Some(PathBuf::from("/t")));
}

mod sft {
    use super::*;
    use steel_data::tokenizer::Tokenizer;
    use steel_train::sft::{parse_record, render, IGNORE};

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sft/chat.jsonl")
    }

    /// A tokenizer with Qwen's special tokens: the demo's, learned by a 2-step demo run.
    fn pretrained(name: &str) -> PathBuf {
        let out = out_dir(name);
        run(&demo(&["train.max_steps=2", "train.eval_every=0"]), &opts(&out));
        out.join("checkpoints/step-000002")
    }

    #[test]
    fn only_assistant_turns_and_their_im_end_are_trained() {
        let ck = pretrained("sft-mask");
        let tok = Tokenizer::load(&ck).unwrap();
        let line = std::fs::read_to_string(fixture()).unwrap();
        let rec: serde_json::Value = serde_json::from_str(line.lines().nth(2).unwrap()).unwrap();
        let conv = parse_record(&rec).unwrap();
        assert_eq!(conv.turns.len(), 2);
        let ex = render(&tok, &conv, "You are a helpful assistant.", 10_000).unwrap();
        // the rendering is the chat template's text
        let text = tok.decode(&ex.ids, false).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHow long should rice rest after cooking?<|im_end|>\n<|im_start|>assistant\nTen minutes, with the lid on.<|im_end|>\n<|im_start|>user\nAnd before that?<|im_end|>\n<|im_start|>assistant\nFifteen minutes on the lowest heat.<|im_end|>\n"
        );
        // token by token: trained exactly on the two answers and their <|im_end|>
        let trained: Vec<u32> =
            ex.ids.iter().zip(&ex.labels).filter(|(_, &l)| l != IGNORE).map(|(&t, _)| t).collect();
        let mut expect = tok.encode("Ten minutes, with the lid on.<|im_end|>").unwrap();
        expect.extend(tok.encode("Fifteen minutes on the lowest heat.<|im_end|>").unwrap());
        assert_eq!(trained, expect);
        for (&t, &l) in ex.ids.iter().zip(&ex.labels) {
            assert!(l == IGNORE || l == t as i64);
        }
        let im_end = tok.im_end_id();
        let n_im_end_trained =
            ex.ids.iter().zip(&ex.labels).filter(|(&t, &l)| t == im_end && l != IGNORE).count();
        assert_eq!(n_im_end_trained, 2, "system and user <|im_end|> are not trained");
        // cut after N tokens
        assert_eq!(render(&tok, &conv, "x", 12).unwrap().ids.len(), 12);
        let _ = std::fs::remove_dir_all(ck.parent().unwrap().parent().unwrap());
    }

    #[test]
    fn fine_tuning_loss_falls_and_resumes_exactly() {
        let ck = pretrained("sft-run");
        let set = |extra: &[&str]| {
            let mut o: Vec<String> = vec![
                format!("model.init_from={:?}", ck.to_str().unwrap()),
                format!("data.sft=[{:?}]", fixture().to_str().unwrap()),
                "data.seq_len=96".into(),
                "train.micro_batch=2".into(),
                "train.epochs=12.0".into(),
                "train.eval_every=0".into(),
                "train.log_every=1".into(),
                "train.checkpoint_every=5".into(),
                "optim.lr=3e-3".into(),
                "optim.warmup_steps=2".into(),
                "optim.decay_steps=0".into(),
            ];
            o.extend(extra.iter().map(|s| s.to_string()));
            let mut text = steel_train::recipe::DEMO_RECIPE.to_string();
            // the SFT recipe takes its model from init_from
            let start = text.find("[model]").unwrap();
            let end = text.find("[data]").unwrap();
            text.replace_range(start..end, "[model]\n");
            let text = text.replace("demo_corpus = true", "");
            Recipe::parse(&text, "sft test", Path::new("."), &o).unwrap()
        };
        let (a, b) = (out_dir("sft-a"), out_dir("sft-b"));
        let (s, events) = run(&set(&[]), &opts(&a));
        assert!(events.iter().any(|e| matches!(e, Event::Notice(n) if n.contains("6 examples") && n.contains("2 malformed"))));
        // 6 examples × 12 epochs / 2 per step = 36 steps
        assert_eq!(s.losses.len(), 36);
        let first: f64 = s.losses[..3].iter().sum::<f64>() / 3.0;
        let last: f64 = s.losses[33..].iter().sum::<f64>() / 3.0;
        // measured 6.15 → 3.88
        assert!(last < first - 1.0, "SFT loss {first} → {last}");
        // stopped after step 10 (as by SIGINT) and resumed: the same losses
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let mut o = opts(&b);
        o.stop = Some(stop);
        o.hook = Some(Arc::new(move |step, _, _: &steel_autograd::ParamStore| {
            if step == 10 {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(())
        }));
        let (first_part, _) = run(&set(&[]), &o);
        assert!(first_part.stopped && first_part.last_step == 10);
        assert_eq!(&first_part.losses[..], &s.losses[..10]);
        let mut o = opts(&b);
        o.resume = Resume::Auto;
        let (s2, _) = run(&set(&[]), &o);
        assert_eq!(&s2.losses[..], &s.losses[10..]);
        for d in [a, b, ck.parent().unwrap().parent().unwrap().to_path_buf()] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The trainer on the emulated GPU in bf16-mixed (a smaller demo): after step 1's backward every
/// parameter has a finite, non-zero gradient on the device; a NaN put into one gradient on the
/// device skips step 2 there (reported, nothing applied: the weights after step 2 are those after
/// step 1, bit for bit) — the guarded AdamW's verdict, read once with the loss.
#[test]
fn bf16_mixed_on_the_emulator_reaches_every_parameter_and_skips_a_nan_step() {
    let out = out_dir("emu-bf16");
    let recipe = demo(&[
        "train.device=\"emu\"",
        "train.precision=\"bf16-mixed\"",
        "data.seq_len=32",
        "train.micro_batch=4",
        "train.eval_every=0",
        "train.log_every=1",
        "train.checkpoint_every=1",
        "train.max_steps=2",
    ]);
    let mut o = opts(&out);
    let checked = Arc::new(Mutex::new(0usize));
    let c = checked.clone();
    o.hook = Some(Arc::new(move |step, _rank, params: &steel_autograd::ParamStore| {
        let be = params.backend();
        assert_ne!(be.device(), steel_runtime::Device::Cpu, "the gradients live on the device");
        if step == 1 {
            for (id, p) in params.iter() {
                let g = be.download(&params.grad_buffer(id)?)?.to_f64_vec()?;
                assert!(g.iter().all(|v| v.is_finite()), "{}: a non-finite gradient", p.name);
                assert!(g.iter().any(|v| *v != 0.0), "{}: an all-zero gradient", p.name);
                assert!(p.working().is_some() || !p.name.ends_with("_proj.weight"), "{}", p.name);
                *c.lock().unwrap() += 1;
            }
        } else {
            let (id, _) = params.iter().nth(5).unwrap();
            be.fill(&params.grad_buffer(id)?, f64::NAN)?;
        }
        Ok(())
    }));
    let (s, events) = run(&recipe, &o);
    assert!(*checked.lock().unwrap() > 10, "every parameter was checked");
    assert!(events.iter().any(|e| matches!(e, Event::Skipped { step: 2, .. })), "skip reported");
    assert!(s.losses.iter().all(|l| l.is_finite()));
    let rows = steel_train::metrics::read_metrics(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        (rows[0]["skipped"].clone(), rows[1]["skipped"].clone()),
        (false.into(), true.into())
    );
    assert_eq!(rows[1]["host_syncs"], 1);
    let (w1, w2) = (
        weights(&out.join("checkpoints/step-000001")),
        weights(&out.join("checkpoints/step-000002")),
    );
    assert_eq!(w1, w2, "a skipped step applies nothing");
    let _ = std::fs::remove_dir_all(out);
}

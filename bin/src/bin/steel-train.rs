//! `steel-train`: trains a Steel model from a recipe (TOML). Without `--config` it runs the
//! embedded demo (configs/demo.toml): a tiny Steel model learns the text that ships with Steel,
//! on the CPU, in well under a minute.

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use steel_train::{dry_run, train, Event, Recipe, Resume, RunOptions};

#[derive(Parser)]
#[command(
    name = "steel-train",
    version,
    about = "Train a Steel model from a recipe (TOML); without --config, the embedded demo",
    long_about = "Train a Steel model from a recipe (TOML: [model], [data], [optim], [train]).\n\n\
        Without --config this runs the embedded demo (configs/demo.toml): a tiny Steel model \
        learns the English and Chinese text that ships with Steel, on the CPU, in well under a \
        minute (about 11 s on 2 cores, after a first build of 3–4 minutes), with a byte-level BPE \
        tokenizer learned from that text. Each new demo run takes the next free directory: \
        runs/demo, then runs/demo-2, … (it says so).\n\n\
        --out DIR receives metrics.jsonl (one JSON object per logged step) and \
        checkpoints/step-NNNNNN/ (weights, optimizer, data iterator, counters, recipe, \
        tokenizer; each file checksummed). Ctrl-C (SIGINT) or SIGTERM finishes the current \
        step, writes a checkpoint and exits 0; continue with --resume auto.",
    after_help = "Examples (from the clone; after `cargo install --path bin`, bare `steel-train …` too):\n  \
        cargo run --release --bin steel-train                 # the demo\n  \
        cargo run --release --bin steel-train -- --config configs/demo.toml --max-steps 50 --out runs/quick\n  \
        cargo run --release --bin steel-train -- --config configs/demo.toml --out runs/quick --resume auto --max-steps 100\n  \
        cargo run --release --bin steel-train -- --config configs/steel-1.1b.toml --dry-run\n  \
        cargo run --release --bin steel-train -- --config my.toml --set optim.lr=1e-3 --set 'data.train=[{path=\"shards\"}]'"
)]
struct Args {
    /// The recipe (TOML). Default: the embedded demo recipe.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output directory (metrics.jsonl, checkpoints/, prepared data). Default: runs/<recipe name>
    /// (for the demo, the first of runs/demo, runs/demo-2, … without checkpoints).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimizer steps to train (train.max_steps).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Checkpoint cadence in steps (train.checkpoint_every).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Log cadence in steps (train.log_every).
    #[arg(long)]
    log_every: Option<u64>,
    /// `auto`: the newest valid checkpoint under --out (damaged ones are skipped with a warning;
    /// when checkpoints exist but none verifies it is an error that names them, and nothing in
    /// --out is changed); or a checkpoint directory.
    #[arg(long, value_name = "auto|DIR")]
    resume: Option<String>,
    /// Start over in --out: an existing run there is first moved aside to the dated sibling
    /// <out>.replaced-YYYYMMDD-HHMMSS (nothing is deleted). Not with --resume.
    #[arg(long, conflicts_with = "resume")]
    fresh: bool,
    /// Train even when the memory plan exceeds this machine's available memory (checked before
    /// anything is allocated on the CPU).
    #[arg(long)]
    no_memory_check: bool,
    /// Keep the newest K checkpoints (train.keep_checkpoints; default 3).
    #[arg(long)]
    keep_checkpoints: Option<usize>,
    /// On resume, append the shards under DIR to the training data (repeatable).
    #[arg(long, value_name = "DIR")]
    add_data: Vec<PathBuf>,
    /// auto (the GPU when one is usable, else the CPU), cpu, cuda, or emu (the GPU backend with
    /// every kernel run by the CPU emulator: slow, needs no GPU; for debugging kernels and CI)
    /// (train.device).
    #[arg(long)]
    device: Option<String>,
    /// Data-parallel ranks; on the CPU, worker threads with a model replica each (train.ranks).
    #[arg(long)]
    ranks: Option<usize>,
    /// Bracket steps A..=B with cudaProfilerStart/Stop for `nsys profile --capture-range=cudaProfilerApi`.
    #[arg(long, value_name = "A:B")]
    profile_steps: Option<String>,
    /// Device peak in TFLOP/s for MFU (train.peak_tflops).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Override any recipe key, e.g. --set optim.lr=1e-3 (repeatable; TOML values). A relative
    /// path given here is relative to the current directory (paths in the recipe file are
    /// relative to the file).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print parameters, FLOPs per token, memory per device and tokens per step, then exit.
    #[arg(long)]
    dry_run: bool,
}

fn fmt_count(n: f64) -> String {
    if n >= 1e12 {
        format!("{:.2}T", n / 1e12)
    } else if n >= 1e9 {
        format!("{:.2}G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// `s` quoted for a POSIX shell when it needs it.
fn shell_quote(s: &str) -> String {
    let plain =
        !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "._/=:,+-@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The command that continues this run: the same recipe and overrides (flags included, as the
/// keys they set), `--resume auto`, and twice the steps (or, fine-tuning by epochs, twice the
/// epochs).
fn resume_command(args: &Args, overrides: &[String], recipe: &Recipe, out: &Path) -> String {
    let mut cmd = vec!["cargo run --release --bin steel-train --".to_string()];
    if let Some(c) = &args.config {
        cmd.push(format!("--config {}", shell_quote(&c.display().to_string())));
    }
    cmd.push(format!("--out {} --resume auto", shell_quote(&out.display().to_string())));
    let epochs = recipe.train.epochs;
    for o in overrides {
        let key = o.split_once('=').map_or(o.as_str(), |(k, _)| k.trim());
        if key == "train.max_steps" || (epochs.is_some() && key == "train.epochs") {
            continue;
        }
        cmd.push(format!("--set {}", shell_quote(o)));
    }
    match epochs {
        Some(e) => cmd.push(format!("--set train.epochs={:?}", e * 2.0)),
        None => cmd.push(format!("--max-steps {}", recipe.train.max_steps * 2)),
    }
    cmd.join(" ")
}

fn has_checkpoints(out: &Path) -> bool {
    steel_train::checkpoint::list(&steel_train::trainer::checkpoints_dir(out))
        .is_ok_and(|l| !l.is_empty())
}

fn main() -> ExitCode {
    steel_cli::run("steel-train", || {
        let args = Args::parse();
        let mut overrides = Vec::new();
        let mut named = |key: &str, v: Option<String>| {
            if let Some(v) = v {
                overrides.push(format!("{key}={v}"));
            }
        };
        named("train.max_steps", args.max_steps.map(|v| v.to_string()));
        named("train.checkpoint_every", args.checkpoint_every.map(|v| v.to_string()));
        named("train.log_every", args.log_every.map(|v| v.to_string()));
        named("train.keep_checkpoints", args.keep_checkpoints.map(|v| v.to_string()));
        named("train.device", args.device.as_ref().map(|v| format!("{v:?}")));
        named("train.ranks", args.ranks.map(|v| v.to_string()));
        // TOML spells a NaN `nan` (Rust's `NaN` would be a string), so validation sees it.
        named("train.peak_tflops", args.peak_tflops.map(|v| format!("{v:?}").to_lowercase()));
        overrides.extend(args.set.iter().cloned());
        let (recipe, name) = match &args.config {
            Some(p) => (
                Recipe::load(p, &overrides)?,
                p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or("run".into()),
            ),
            None => (Recipe::demo(&overrides)?, "demo".to_string()),
        };
        if args.dry_run {
            let d = dry_run(&recipe)?;
            println!("parameters           {} ({})", d.params, fmt_count(d.params as f64));
            println!(
                "FLOPs per token      {} (training: 6N + attention)",
                fmt_count(d.flops_per_token)
            );
            println!(
                "tokens per step      {} ({} sequences of {} tokens)",
                d.tokens_per_step, d.sequences_per_step, recipe.data.seq_len
            );
            println!("ranks                {}", d.ranks);
            let m = &d.memory;
            let g = |b: u64| steel_cli::gib(b as f64);
            println!(
                "memory per device    {} (plan for --device {}, {}; checked before step 1)",
                g(m.total),
                recipe.train.device,
                d.precision
            );
            println!("  weights            {} (fp32 masters)", g(m.weights));
            println!("  working copies     {} (bf16 GEMM weights)", g(m.working_copies));
            println!("  gradients          {} (fp32)", g(m.gradients));
            println!("  AdamW moments      {} (fp32 m and v)", g(m.moments));
            println!(
                "  activations        {} (one micro-batch of {} × {})",
                g(m.activations),
                recipe.train.micro_batch,
                recipe.data.seq_len
            );
            println!(
                "  workspaces         {} (the loss chunk of {} tokens, or backward's start)",
                g(m.workspaces),
                recipe.train.chunk_tokens
            );
            println!(
                "steps                {} ({} tokens, {:.3e} FLOPs)",
                d.max_steps,
                fmt_count(d.total_tokens as f64),
                d.total_tokens as f64 * d.flops_per_token
            );
            return Ok(());
        }
        let resume = match args.resume.as_deref() {
            None => Resume::No,
            Some("auto") => Resume::Auto,
            Some(dir) => Resume::Dir(PathBuf::from(dir)),
        };
        let out = match (&args.out, &args.config, &resume) {
            (Some(o), _, _) => o.clone(),
            (None, None, Resume::No) => {
                // The demo is run again and again: take a fresh directory each time.
                let mut i = 1;
                loop {
                    let p = if i == 1 {
                        PathBuf::from("runs/demo")
                    } else {
                        PathBuf::from(format!("runs/demo-{i}"))
                    };
                    if !has_checkpoints(&p) {
                        if i > 1 {
                            eprintln!(
                                "steel-train: runs/demo{} already hold(s) a demo run, so this one \
                                 goes to {} (pass --out DIR to choose, or --resume auto to \
                                 continue runs/demo)",
                                if i > 2 {
                                    format!(" … runs/demo-{}", i - 1)
                                } else {
                                    String::new()
                                },
                                p.display()
                            );
                        }
                        break p;
                    }
                    i += 1;
                }
            }
            (None, _, _) => PathBuf::from("runs").join(&name),
        };
        let profile_steps = args
            .profile_steps
            .as_deref()
            .map(str::parse::<steel_runtime::cuda::profile::ProfileWindow>)
            .transpose()?;
        // Phases and layers as NVTX ranges for nsys (a no-op without libnvToolsExt).
        steel_runtime::trace::set_sink(Some(Arc::new(steel_runtime::cuda::profile::NvtxSink)));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let stop = stop.clone();
            ctrlc::set_handler(move || {
                if stop.swap(true, Ordering::SeqCst) {
                    eprintln!("\nsteel-train: second interrupt, exiting without a checkpoint");
                    std::process::exit(130);
                }
                eprintln!("\nsteel-train: stopping after this step (a checkpoint will be written; Ctrl-C again to quit now)");
            })
            .context("installing the SIGINT/SIGTERM handler")?;
        }
        let opts = RunOptions {
            out: out.clone(),
            resume,
            add_data: args.add_data.clone(),
            stop: Some(stop.clone()),
            profile_steps,
            fresh: args.fresh,
            skip_memory_check: args.no_memory_check,
            hook: None,
        };
        eprintln!(
            "steel-train: recipe {} → {}",
            args.config
                .as_ref()
                .map_or("configs/demo.toml (embedded)".into(), |p| p.display().to_string()),
            out.display()
        );
        let tty = std::io::stderr().is_terminal();
        // Hidden until training starts, so it never shows "0/0 ETA 0s" during preparation.
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed_precise}, ETA {eta}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let say = |bar: &ProgressBar, line: String| bar.suspend(|| eprintln!("{line}"));
        let device_from = if args.device.is_some() {
            "--device".to_string()
        } else if args.set.iter().any(|o| o.trim_start().starts_with("train.device")) {
            "--set train.device".to_string()
        } else {
            format!(
                "train.device of {}",
                args.config.as_ref().map_or("the demo recipe".into(), |p| p.display().to_string())
            )
        };
        let mut first_loss: Option<f64> = None;
        // The last checkpoint announced while training (the closing lines do not repeat it).
        let mut announced: Option<PathBuf> = None;
        let summary = train(&recipe, &opts, &mut |e| {
            match e {
            Event::Notice(n) => say(&bar, match n.strip_suffix("(requested)") {
                // Say where the device choice came from.
                Some(head) if n.starts_with("device: ") => format!("{head}({device_from})"),
                _ => n.clone(),
            }),
            Event::Started { start_step, max_steps, params, flops_per_token } => {
                bar.set_length(*max_steps);
                bar.set_position(*start_step);
                bar.reset_eta();
                if tty {
                    bar.set_draw_target(ProgressDrawTarget::stderr());
                }
                say(&bar, format!(
                    "model: {} parameters, {} FLOPs/token; {} tokens/step; steps {}..{}",
                    fmt_count(*params as f64), fmt_count(*flops_per_token), recipe.tokens_per_step(), start_step + 1, max_steps
                ));
            }
            Event::Step { log, logged } => {
                first_loss.get_or_insert(log.loss);
                bar.set_position(log.step);
                let mfu = log.mfu.map(|m| format!(" MFU {:.1}%", 100.0 * m)).unwrap_or_default();
                bar.set_message(format!("loss {:.4} lr {:.2e} {} tok/s{mfu}", log.loss, log.lr, fmt_count(log.tokens_per_s)));
                if *logged {
                    let val = log.val_loss.map(|v| format!(" val_loss {v:.4}")).unwrap_or_default();
                    // On a GPU: the allocator's peak of the step, and NVML's readings.
                    let mut gpu = String::new();
                    if let Some(p) = log.mem_peak_bytes {
                        gpu += &format!(" mem {}", steel_cli::gib(p as f64));
                    }
                    if let Some(u) = log.gpu_util_pct {
                        gpu += &format!(" util {u}%");
                    }
                    if let Some(w) = log.gpu_power_w {
                        gpu += &format!(" {w:.0} W");
                    }
                    say(&bar, format!(
                        "step {:>6} loss {:.4}{val} lr {:.3e} grad_norm {:.3} {} tok/s{mfu}{gpu} ({:.0} ms/step)",
                        log.step, log.loss, log.lr, log.grad_norm, fmt_count(log.tokens_per_s), log.step_ms
                    ));
                }
            }
            Event::Skipped { step, loss, grad_norm } => say(&bar, format!(
                "step {step}: SKIPPED (loss {loss}, grad_norm {grad_norm}): not finite, nothing applied"
            )),
            Event::Validation { .. } => {}
            Event::Checkpoint { dir, .. } => {
                say(&bar, format!("checkpoint: {}", dir.display()));
                announced = Some(dir.clone());
            }
            Event::ProfilerStart { step } => say(&bar, match steel_runtime::cuda::profile::profiler_start() {
                Ok(()) => format!("profile: cudaProfilerStart before step {step}"),
                Err(e) => format!("profile: step {step}: no profiler capture ({e}); NVTX ranges are still emitted"),
            }),
            Event::ProfilerStop { step } => say(&bar, match steel_runtime::cuda::profile::profiler_stop() {
                Ok(()) => format!("profile: cudaProfilerStop after step {step}"),
                Err(e) => format!("profile: step {step}: {e}"),
            }),
        }
        })?;
        bar.finish_and_clear();
        // Printed commands run from the clone as printed (the tools need not be installed).
        let exe = |tool: &str| format!("cargo run --release --bin {tool} --");
        if let (Some(first), Some(last)) = (first_loss, summary.losses.last()) {
            eprintln!(
                "steel-train: steps {}..{}: loss {first:.4} → {last:.4}{}",
                summary.start_step + 1,
                summary.last_step,
                if summary.stopped { " (stopped by signal)" } else { "" }
            );
        } else {
            eprintln!(
                "steel-train: nothing to train (already at step {} of {})",
                summary.last_step, recipe.train.max_steps
            );
        }
        if let Some(ck) = &summary.last_checkpoint {
            let export = out.join("export");
            if announced.as_ref() != Some(ck) {
                println!("checkpoint: {}", ck.display());
            }
            if args.config.is_none() {
                println!(
                    "(a model this small generates fragments of its training text, often mixed \
                     up, rather than answers: what to expect from steel-generate and steel-chat)"
                );
            }
            println!("next:");
            println!(
                "  {} --checkpoint {} --out {}",
                exe("steel-export"),
                ck.display(),
                export.display()
            );
            println!(
                "  {} ppl --model {} --text \"The river town woke slowly.\"",
                exe("steel-eval"),
                export.display()
            );
            println!(
                "  {} --model {} --prompt \"The river town\" --temperature 0.7",
                exe("steel-generate"),
                export.display()
            );
            println!("  {} --model {}", exe("steel-chat"), export.display());
            println!("  {}", resume_command(&args, &overrides, &recipe, &out));
            println!(
                "  {} {} --out {}",
                exe("steel-plot"),
                out.join("metrics.jsonl").display(),
                out.join("loss.svg").display()
            );
        }
        Ok(())
    })
}

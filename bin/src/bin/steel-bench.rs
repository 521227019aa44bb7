//! `steel-bench`: measured performance of Steel's backends on this machine.
//!
//! `steel-bench cpu` times the CPU reference backend: GEMM at the 1792-wide shapes of the
//! Steel-1.1B model against the machine's measured peak (an FMA loop in registers on every
//! thread), attention forward + backward at the model's head geometry, and one forward +
//! backward of a small transformer block. Every figure is the median of several timed repeats
//! after a warm-up.
//!
//! `steel-bench kernels` compiles Steel's CUDA kernels with NVRTC (`--compile-only --arch
//! sm_90`: ptxas's report per kernel, no GPU needed) or, on a GPU, checks every GPU op against
//! the CPU backend and times it against the measured copy bandwidth (see `kernels.rs`).
//!
//! `steel-bench emu-diff` checks the emulator against hardware (see `emu_diff.rs`).

#[path = "../gpu_bench.rs"]
mod gpu_bench;
#[path = "../kernels.rs"]
mod kernels;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use steel_autograd::fixtures::{random_tensor, TinyBlock, TinyBlockConfig};
use steel_autograd::{ParamStore, Tape};
use steel_cli::emu_diff;
use steel_runtime::cpu::CpuBackend;
use steel_runtime::{Backend, DType, Matmul, Tensor};

#[derive(Parser)]
#[command(name = "steel-bench", version, about = "Benchmarks of Steel's backends on this machine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// CPU backend: GEMM GFLOP/s vs the measured peak, attention fwd+bwd, a transformer block.
    Cpu(CpuArgs),
    /// CUDA kernels: NVRTC compile report (--compile-only), or GPU checks and roofline timings.
    Kernels(kernels::KernelsArgs),
    /// The emulator against hardware: its test kernels recorded here (--record DIR) and compared
    /// on a GPU (--against DIR --device cuda), bit for bit where they must be.
    EmuDiff(emu_diff::EmuDiffArgs),
    /// Tokenizer throughput: documents of a jsonl file encoded in parallel, as `steel-data
    /// tokenize` does (compare with bench/tokenize_hf.py, HF tokenizers' encode_batch).
    Tokenize(TokenizeArgs),
    /// Full training steps (forward, backward, AdamW) of a model config on random tokens; prints
    /// one JSON line with the medians (compare with bench/train_torch.py, PyTorch eager).
    Train(TrainArgs),
}

#[derive(Parser)]
struct TrainArgs {
    /// A model config.json (e.g. configs/bench-h512/config.json).
    #[arg(long)]
    model_config: PathBuf,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Timed steps (after `--warmup` untimed ones); the median is reported.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// cpu, cuda, or emu (the GPU backend with every kernel run by the CPU emulator: slow, for
    /// debugging kernels).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// bf16-mixed or fp32 (default: bf16-mixed on a GPU, fp32 on the CPU, which always
    /// computes in f32).
    #[arg(long)]
    precision: Option<String>,
    /// The device's peak TFLOP/s for MFU (default: the GPU's dense bf16 peak from the trainer's
    /// table, or the CPU estimate).
    #[arg(long)]
    peak_tflops: Option<f64>,
}

/// Peak resident memory of this process (VmHWM), in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 =
        s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn train(args: TrainArgs) -> Result<()> {
    let run = steel_cli::DeviceArgs { device: args.device.clone() }.open(true)?;
    if args.seq == 0 || args.batch == 0 || args.steps == 0 {
        anyhow::bail!("--seq, --batch and --steps must be at least 1");
    }
    let config = steel_model::SteelConfig::from_file(&args.model_config)?;
    let (pool, threads) = steel_cli::thread_pool(args.threads)?;
    pool.install(|| -> Result<()> {
        let be: Arc<dyn Backend> = run.backend();
        let on_gpu = be.device() != steel_runtime::Device::Cpu;
        let precision = match (args.precision.as_deref(), on_gpu) {
            (None, true) | (Some("bf16-mixed"), true) => steel_model::Precision::Bf16Mixed,
            (None | Some("bf16-mixed") | Some("fp32"), _) => steel_model::Precision::Fp32,
            (Some(p), _) => anyhow::bail!("--precision {p:?}: expected bf16-mixed or fp32"),
        };
        let mut model = steel_model::SteelModel::init(config.clone(), be.clone(), DType::F32, 1)?;
        model.set_precision(precision)?;
        let mut opt =
            steel_train::Optimizer::new(&model.params, steel_train::AdamWConfig::default())?;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let v = config.vocab_size as u64;
        // Progress on stderr (a step of a large model takes a while); stdout keeps the one JSON
        // line.
        eprintln!(
            "steel-bench train: {} parameters, {} warmup + {} timed steps of {} × {}",
            config.num_params(),
            args.warmup,
            args.steps,
            args.batch,
            args.seq
        );
        let mut times = Vec::with_capacity(args.steps);
        let mut loss = f64::NAN;
        for i in 0..args.warmup + args.steps {
            let blocks: Vec<u32> =
                (0..args.batch * (args.seq + 1)).map(|_| (next() % v) as u32).collect();
            let t0 = Instant::now();
            let mut tape = Tape::new(be.clone());
            let batch = steel_model::TrainingBatch::new(Tensor::from_vec(
                blocks,
                &[args.batch, args.seq + 1],
            )?);
            let (l, _) = model.loss(&mut tape, &batch)?;
            let l_value = tape.value(l)?.clone();
            tape.backward(l)?;
            // The trainer's step: queued on the device, one read of loss, norm and verdict.
            let pending = opt.step_on_device(&model.params, 3e-4, &l_value)?;
            loss = opt.settle(&model.params, pending)?.0;
            let dt = t0.elapsed().as_secs_f64();
            if i >= args.warmup {
                times.push(dt);
            }
            eprintln!(
                "steel-bench train: step {}/{}{} loss {loss:.4} ({:.0} ms)",
                i + 1,
                args.warmup + args.steps,
                if i < args.warmup { " (warmup)" } else { "" },
                dt * 1e3
            );
        }
        times.sort_by(f64::total_cmp);
        let step_s = times[times.len() / 2];
        let tps = (args.batch * args.seq) as f64 / step_s;
        let device_name = match run.compute().gpu() {
            Some(g) => g.name(),
            None => "cpu".to_string(),
        };
        let peak = match (on_gpu, args.peak_tflops) {
            (_, Some(p)) => Some(p * 1e12),
            (true, None) if device_name.starts_with("cuda:") => {
                steel_train::metrics::gpu_peak_flops(&device_name)
            }
            _ => {
                let (ghz, fpc) = steel_train::metrics::cpu_peak_per_core();
                Some(ghz * 1e9 * fpc * threads as f64)
            }
        };
        let mfu = peak.map(|p| tps * config.training_flops_per_token(args.seq) / p);
        println!(
            "{}",
            serde_json::json!({
                "tokens_per_s": tps,
                "step_ms": step_s * 1e3,
                "mfu": mfu,
                "peak_mem_bytes": peak_rss(),
                "device": run.compute().choice().notice.trim_start_matches("device: "),
                "threads": threads,
                "params": config.num_params(),
                "seq": args.seq,
                "batch": args.batch,
                "steps": args.steps,
                "loss": loss,
                "precision": match precision {
                    steel_model::Precision::Bf16Mixed => "bf16-mixed",
                    steel_model::Precision::Fp32 => "fp32",
                },
                "peak_flops_estimate": peak,
            })
        );
        Ok(())
    })
}

#[derive(Parser)]
struct TokenizeArgs {
    /// Tokenizer directory (tokenizer.json).
    #[arg(long)]
    tokenizer: PathBuf,
    /// A jsonl file of {"text": …} documents.
    #[arg(long)]
    input: PathBuf,
    /// Encoding threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed repeats (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

fn tokenize(args: TokenizeArgs) -> Result<()> {
    use rayon::prelude::*;
    let tok = steel_data::tokenizer::Tokenizer::load(&args.tokenizer)?;
    let text = std::fs::read_to_string(&args.input)
        .with_context(|| format!("reading {}", args.input.display()))?;
    let docs: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("text").and_then(|t| t.as_str()).map(str::to_string))
        .collect();
    let (pool, threads) = steel_cli::thread_pool(args.threads)?;
    let mut tokens = 0usize;
    let secs = pool.install(|| {
        median_secs(args.repeats, || {
            let n: Vec<usize> = docs
                .par_iter()
                .map(|d| tok.encode(d).map(|v| v.len()))
                .collect::<Result<_, _>>()?;
            tokens = n.iter().sum();
            Ok(())
        })
    })?;
    let bytes: usize = docs.iter().map(String::len).sum();
    println!(
        "{}",
        serde_json::json!({
            "implementation": "steel (tokenizers crate, rayon over documents)",
            "threads": threads,
            "documents": docs.len(),
            "tokens": tokens,
            "median_s": secs,
            "tokens_per_s": tokens as f64 / secs,
            "mb_per_s": bytes as f64 / secs / 1e6,
        })
    );
    Ok(())
}

#[derive(Parser)]
struct CpuArgs {
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed repeats per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Smaller problem sizes (a smoke run for CI).
    #[arg(long)]
    quick: bool,
}

/// Median wall time in seconds of `repeats` runs of `f`, after one warm-up run.
fn median_secs(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// A named benchmark body.
type Case<'a> = (&'a str, Box<dyn Fn() -> Result<()> + 'a>);

fn rand(be: &dyn Backend, shape: &[usize], seed: u64) -> Result<Tensor> {
    Ok(random_tensor(be, shape, DType::F32, 1.0, seed)?)
}

fn cpu(args: CpuArgs) -> Result<()> {
    let (pool, threads) = steel_cli::thread_pool(args.threads)?;
    pool.install(|| cpu_in_pool(&args, threads))
}

fn cpu_in_pool(args: &CpuArgs, threads: usize) -> Result<()> {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let (ghz, fpc) = steel_train::metrics::cpu_peak_per_core();
    let estimate = ghz * fpc * threads as f64;
    // Measured, not assumed: an FMA loop in registers on every thread at once (best of 5).
    let measured = steel_runtime::cpu::peak::measure_peak(threads, 5, 0.2);
    let peak = measured.flops / 1e9;
    println!(
        "steel-bench cpu: {cores} cores available, {threads} threads; peak {peak:.0} GFLOP/s measured"
    );
    println!(
        "  (a register-only {:?} FMA loop on {threads} threads, best of 5; the clock x width \
         estimate says {estimate:.0}: {ghz:.2} GHz x {fpc} f32 FLOP/cycle x {threads}; timings are \
         medians of {} repeats)",
        measured.isa, args.repeats
    );
    println!();

    let rows = if args.quick { 512 } else { 4096 };
    let h = 1792;
    println!("{:<44} {:>10} {:>11} {:>8}", "GEMM (f32)", "ms", "GFLOP/s", "of peak");
    let x = rand(be.as_ref(), &[rows, h], 1)?;
    let w = rand(be.as_ref(), &[h, h], 2)?;
    let dy = rand(be.as_ref(), &[rows, h], 3)?;
    let dw = Tensor::zeros(&[h, h], DType::F32);
    let flops = 2.0 * rows as f64 * h as f64 * h as f64;
    let fwd_out = Tensor::zeros(&[rows, h], DType::F32);
    let cases: [Case; 4] = [
        (
            "x·Wᵀ   [{r},1792]x[1792,1792]ᵀ (forward)",
            Box::new(|| be.matmul(&x, &w, None, Matmul::NT, None).map(drop).map_err(Into::into)),
        ),
        (
            "dy·W   [{r},1792]x[1792,1792] (input grad)",
            Box::new(|| be.matmul(&dy, &w, None, Matmul::NN, None).map(drop).map_err(Into::into)),
        ),
        (
            "x·Wᵀ into a preallocated output",
            Box::new(|| be.matmul_into(&x, &w, Matmul::NT, &fwd_out).map_err(Into::into)),
        ),
        (
            "dyᵀ·x  [1792,{r}]x[{r},1792] (weight grad)",
            Box::new(|| be.matmul_into(&dy, &x, Matmul::TN.accumulate(), &dw).map_err(Into::into)),
        ),
    ];
    for (name, f) in cases.iter() {
        let s = median_secs(args.repeats, f)?;
        let gf = flops / s / 1e9;
        println!(
            "{:<44} {:>10.2} {:>11.1} {:>7.0}%",
            name.replace("{r}", &rows.to_string()),
            s * 1e3,
            gf,
            100.0 * gf / peak
        );
    }
    println!();

    // Attention at the model's geometry: 32 heads of 56.
    let (b, t, heads, d) = if args.quick { (1, 256, 8, 56) } else { (1, 1024, 32, 56) };
    let q = rand(be.as_ref(), &[b, t, heads, d], 4)?;
    let k = rand(be.as_ref(), &[b, t, heads, d], 5)?;
    let v = rand(be.as_ref(), &[b, t, heads, d], 6)?;
    let scale = 1.0 / (d as f64).sqrt();
    let (o, lse) = be.attention_fwd(&q, &k, &v, scale)?;
    let d_o = rand(be.as_ref(), &[b, t, heads, d], 7)?;
    let grads: Vec<Tensor> = (0..3).map(|_| Tensor::zeros(&[b, t, heads, d], DType::F32)).collect();
    let fwd = median_secs(args.repeats, || {
        be.attention_fwd(&q, &k, &v, scale).map(drop).map_err(Into::into)
    })?;
    let bwd = median_secs(args.repeats, || {
        be.attention_bwd(&q, &k, &v, &o, &lse, &d_o, scale, &grads[0], &grads[1], &grads[2])
            .map_err(Into::into)
    })?;
    // Full (unmasked) score matrices are computed: 4·B·H·T²·D forward, 2.5× that backward.
    let f_flops = 4.0 * (b * heads * t * t * d) as f64;
    println!(
        "{:<44} {:>10} {:>11}",
        format!("attention B={b} T={t} H={heads} D={d}"),
        "ms",
        "GFLOP/s"
    );
    println!("{:<44} {:>10.2} {:>11.1}", "  forward", fwd * 1e3, f_flops / fwd / 1e9);
    println!("{:<44} {:>10.2} {:>11.1}", "  backward", bwd * 1e3, 2.5 * f_flops / bwd / 1e9);
    println!();

    // One transformer block, forward + backward on the tape.
    let cfg = if args.quick {
        TinyBlockConfig { hidden: 128, heads: 4, kv_heads: 4, ffn: 352, rope_theta: 1e6, eps: 1e-6 }
    } else {
        TinyBlockConfig {
            hidden: 512,
            heads: 8,
            kv_heads: 8,
            ffn: 1376,
            rope_theta: 1e6,
            eps: 1e-6,
        }
    };
    let (bb, tt) = if args.quick { (2, 64) } else { (4, 256) };
    let mut store = ParamStore::new(be.clone());
    let block = TinyBlock::new(&mut store, "block", cfg, DType::F32, 9)?;
    let xin = rand(be.as_ref(), &[bb, tt, cfg.hidden], 10)?;
    let step = || -> Result<()> {
        let mut tape = Tape::new(be.clone());
        let x = tape.leaf(xin.clone(), true);
        let y = block.forward(&mut tape, &store, x)?;
        let y = tape.reshape(y, &[bb * tt * cfg.hidden, 1])?;
        let ones = tape.leaf(
            Tensor::from_vec(vec![1f32; bb * tt * cfg.hidden], &[1, bb * tt * cfg.hidden])?,
            false,
        );
        let l = tape.matmul(ones, y, None, Matmul::NN)?;
        tape.backward(l)?;
        Ok(())
    };
    let s = median_secs(args.repeats, step)?;
    let params = store.num_elements() as f64;
    let tokens = (bb * tt) as f64;
    // 6 FLOPs per parameter per token for the matmuls, plus attention (causal counted full).
    let block_flops = 6.0 * params * tokens + 3.5 * 4.0 * (bb * tt * tt * cfg.hidden) as f64;
    println!(
        "{:<44} {:>10} {:>11} {:>10}",
        format!("block fwd+bwd h={} ffn={} B={bb} T={tt}", cfg.hidden, cfg.ffn),
        "ms",
        "GFLOP/s",
        "tokens/s"
    );
    println!("{:<44} {:>10.2} {:>11.1} {:>10.0}", "", s * 1e3, block_flops / s / 1e9, tokens / s);
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    steel_cli::run("steel-bench", || match cli.command {
        Command::Cpu(a) => cpu(a),
        Command::Kernels(a) => kernels::run(a),
        Command::EmuDiff(a) => emu_diff::run(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Train(a) => train(a),
    })
}

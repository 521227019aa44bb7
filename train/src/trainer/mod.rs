//! The training loop (DESIGN §6): data-parallel ranks, token-weighted gradient accumulation,
//! AdamW with clipping and non-finite-step skipping, validation, metrics and exact-resume
//! checkpoints.
//!
//! Every rank (one thread each; rank 0 is the calling thread) holds a full model replica and
//! reads its own blocks (rank r of N gets blocks r, r+N, …, so the global batch does not depend
//! on N). A step:
//! 1. draws all `grad_accum` micro-batches, counts their targets that are not `ignore_index`,
//!    and all-reduces the count, so every micro-batch's loss is `Σ nll / (global count)`;
//! 2. runs forward and backward per micro-batch (gradients accumulate);
//! 3. all-reduces the gradients (sum, rank order: deterministic) and the loss;
//! 4. skips the step if the loss or the gradient norm is not finite (reported, never applied),
//!    else clips and applies AdamW at the step's learning rate.
//!
//! Rank 0 logs, validates and writes checkpoints. Replicas stay bit-identical because they
//! apply identical updates. Stopping (SIGINT/SIGTERM through [`RunOptions::stop`]) is agreed on
//! by all ranks at the end of a step, then a checkpoint is written.

mod rank;
mod state;
mod step;

use crate::checkpoint::{self, Checkpoint, FileWriter};
use crate::memory::{self, memory_plan, MemoryPlan};
use crate::metrics::{self, MetricsLog};
use crate::prepare::{prepare_data, PreparedData};
use crate::recipe::{ConfigSource, Recipe};
use crate::sft::SftOrder;
use crate::{AdamWConfig, LrSchedule, Optimizer, Result, TrainError};
use safetensors::tensor::TensorView;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use steel_autograd::{ParamStore, Tape};
use steel_data::dataset::{Dataset, DatasetOptions};
use steel_model::{Precision, SteelConfig, SteelModel, TrainingBatch};
use steel_runtime::comm::{Communicator, InProcessComm, ReduceOp};
use steel_runtime::cpu::CpuBackend;
use steel_runtime::cuda::profile::ProfileWindow;
use steel_runtime::cuda::CudaGpu;
use steel_runtime::gpu::{EmuGpu, Gpu, GpuBackend};
use steel_runtime::{trace, Backend, DType, DeviceRequest, Tensor};

use rank::{build_rank, Rank, Source};
use state::{load_checkpoint, save_checkpoint, Loaded};
use step::run_rank;

/// Which checkpoint to continue from.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Resume {
    /// Start fresh (an existing checkpoint directory in `--out` is an error, to lose nothing).
    #[default]
    No,
    /// The newest valid checkpoint under `<out>/checkpoints` (fresh when there is none).
    Auto,
    /// This checkpoint directory.
    Dir(PathBuf),
}

/// Called on every rank after backward and the gradient all-reduce, before the optimizer step
/// (tests inject faults here): `(step, rank, params)`.
pub type StepHook = dyn Fn(u64, usize, &ParamStore) -> Result<()> + Send + Sync;

/// How to run a recipe.
#[derive(Clone, Default)]
pub struct RunOptions {
    pub out: PathBuf,
    pub resume: Resume,
    /// Shard directories appended to the data on resume (`--add-data`).
    pub add_data: Vec<PathBuf>,
    /// Set by a signal handler: finish the current step, checkpoint, return.
    pub stop: Option<Arc<AtomicBool>>,
    /// `--profile-steps A:B`: the profiler is started before step A and stopped after step B.
    pub profile_steps: Option<ProfileWindow>,
    /// `--fresh`: start over in `out`, moving an existing run aside to a dated sibling
    /// directory first (never deleting it). Not with a resume.
    pub fresh: bool,
    /// `--no-memory-check`: train even when the CPU run's memory plan exceeds the machine's
    /// available memory.
    pub skip_memory_check: bool,
    pub hook: Option<Arc<StepHook>>,
}

/// One logged step (also one line of `metrics.jsonl`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepLog {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub mfu: Option<f64>,
    /// Targets counted by the loss in this step.
    pub targets: u64,
    /// Tokens trained on so far (all ranks).
    pub tokens: u64,
    pub step_ms: f64,
    pub elapsed_s: f64,
    pub skipped: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_ppl: Option<f64>,
    /// Where the step ran: `cpu`, `emu`, `cuda:0 (NVIDIA H200, sm_90)`, … (rank 0's device).
    #[serde(default)]
    pub device: String,
    /// Kernels and GEMMs rank 0's device launched for this step's forward, backward and
    /// optimizer (validation and checkpoints not included); 0 on the CPU.
    #[serde(default)]
    pub kernel_launches: u64,
    /// Times the host waited for rank 0's device in the step (downloads and synchronisations):
    /// 1 on a GPU (the verdict read with the loss and gradient norm); 0 on the CPU.
    #[serde(default)]
    pub host_syncs: u64,
    /// The allocator's peak of rank 0's device during the step, bytes (GPU devices).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mem_peak_bytes: Option<u64>,
    /// What [`memory_plan`] planned for the device, bytes (GPU devices).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mem_plan_bytes: Option<u64>,
    /// NVML readings of rank 0's GPU at the log line (CUDA devices with NVML).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gpu_mem_used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gpu_util_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gpu_power_w: Option<f64>,
}

/// What the loop tells its caller (the CLI draws the progress bar from these).
// One `Step` per training step: its size is nothing next to the step.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Event {
    /// A line to show.
    Notice(String),
    /// Training is about to start at `start_step` (0: fresh).
    Started {
        start_step: u64,
        max_steps: u64,
        params: usize,
        flops_per_token: f64,
    },
    /// A finished step (every step; `logged` when it was written to metrics.jsonl).
    Step {
        log: StepLog,
        logged: bool,
    },
    /// A step whose loss or gradient norm was not finite: nothing was applied.
    Skipped {
        step: u64,
        loss: f64,
        grad_norm: f64,
    },
    Validation {
        step: u64,
        loss: f64,
        targets: u64,
    },
    Checkpoint {
        step: u64,
        dir: PathBuf,
    },
    ProfilerStart {
        step: u64,
    },
    ProfilerStop {
        step: u64,
    },
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Summary {
    pub start_step: u64,
    pub last_step: u64,
    /// Loss of every step this run trained, in order.
    pub losses: Vec<f64>,
    pub last_checkpoint: Option<PathBuf>,
    /// True when a stop request ended the run early.
    pub stopped: bool,
}

fn inv(msg: impl Into<String>) -> TrainError {
    TrainError::Invalid(msg.into())
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Invalid(format!("{}: {e}", path.display()))
}

/// The model config of a recipe.
pub fn model_config(recipe: &Recipe) -> Result<SteelConfig> {
    let config = match &recipe.model.config {
        None => {
            let dir = recipe
                .model
                .init_from
                .as_ref()
                .ok_or_else(|| inv("model.config or model.init_from must be given"))?;
            SteelConfig::from_file(&dir.join("config.json"))?
        }
        Some(ConfigSource::Path(p)) => SteelConfig::from_file(p)?,
        Some(ConfigSource::Inline(map)) => {
            let text = serde_json::to_string(map).map_err(|e| inv(e.to_string()))?;
            SteelConfig::from_json(&text).map_err(|e| inv(format!("model.config: {e}")))?
        }
    };
    config.validate()?;
    Ok(config)
}

/// Everything shared by the ranks.
struct Shared<'a> {
    recipe: &'a Recipe,
    opts: &'a RunOptions,
    prepared: PreparedData,
    config: SteelConfig,
    schedule: LrSchedule,
    start_step: u64,
    start_tokens: u64,
    start_elapsed: f64,
    loaded: Option<Loaded>,
    stop: Arc<AtomicBool>,
    /// `cpu`, or the GPU backend (`cuda`, `emu`) of every rank.
    device: DeviceRequest,
    /// The ranks' GPUs, for the end-of-run launch counts.
    gpus: std::sync::Mutex<Vec<Arc<dyn Gpu>>>,
    /// How the model computes on this device.
    precision: Precision,
    /// The memory plan of one device (GPU runs).
    plan: Option<MemoryPlan>,
    /// Checkpoints known to verify (written or loaded by this run): pruning does not hash them.
    known_valid: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
}

/// What `--dry-run` prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DryRun {
    pub params: usize,
    pub flops_per_token: f64,
    pub tokens_per_step: usize,
    pub sequences_per_step: usize,
    pub ranks: usize,
    pub max_steps: u64,
    pub total_tokens: u128,
    /// The per-device memory plan for the recipe's device and precision (the CPU: fp32).
    pub memory: MemoryPlan,
    /// The precision the plan assumes.
    pub precision: String,
}

/// Sizes of a run without running it.
pub fn dry_run(recipe: &Recipe) -> Result<DryRun> {
    let config = model_config(recipe)?;
    // Planned for the device the recipe names, never probed: the CPU computes in f32; a GPU
    // (`cuda`, `emu`, `auto`) in the recipe's precision.
    let on_cpu = recipe.train.device.parse::<DeviceRequest>()? == DeviceRequest::Cpu;
    let precision = if !on_cpu && recipe.train.precision == "bf16-mixed" {
        Precision::Bf16Mixed
    } else {
        Precision::Fp32
    };
    let params = config.num_params();
    Ok(DryRun {
        params,
        flops_per_token: config.training_flops_per_token(recipe.data.seq_len),
        tokens_per_step: recipe.tokens_per_step(),
        sequences_per_step: recipe.global_batch(),
        ranks: recipe.train.ranks,
        max_steps: recipe.train.max_steps,
        total_tokens: recipe.tokens_per_step() as u128 * recipe.train.max_steps as u128,
        memory: memory_plan(&config, recipe, precision),
        precision: match precision {
            Precision::Bf16Mixed => "bf16-mixed".into(),
            Precision::Fp32 => "fp32".into(),
        },
    })
}

/// Runs `recipe` (see the module docs). `events` runs on the calling thread.
pub fn train(
    recipe: &Recipe,
    opts: &RunOptions,
    events: &mut dyn FnMut(&Event),
) -> Result<Summary> {
    let request: DeviceRequest = recipe.train.device.parse()?;
    // `auto` takes the GPU when a driver and a device are there; `cuda` without a driver is
    // an error ("no CUDA driver found; use --device cpu"); `emu` runs the GPU path emulated.
    let choice = steel_runtime::choose_device(request, true)?;
    events(&Event::Notice(choice.notice.clone()));
    let device = match (choice.device, choice.emulated) {
        (steel_runtime::Device::Cpu, _) => DeviceRequest::Cpu,
        (_, true) => DeviceRequest::Emu,
        (_, false) => DeviceRequest::Cuda,
    };
    if device != DeviceRequest::Cpu && recipe.train.ranks > 1 {
        return Err(inv(format!(
            "train.ranks = {} on --device {device}: data parallelism across GPUs (--gpus, over \
             NCCL) is not built yet; train on one GPU (--ranks 1) or on the CPU (--device cpu)",
            recipe.train.ranks
        )));
    }
    let precision = match (recipe.train.precision.as_str(), device) {
        ("bf16-mixed", DeviceRequest::Cpu) => {
            events(&Event::Notice(
                "precision: the CPU backend computes in f32 (bf16-mixed applies on a GPU)".into(),
            ));
            Precision::Fp32
        }
        ("bf16-mixed", _) => {
            events(&Event::Notice(
                "precision: bf16-mixed (bf16 working copies and GEMM/attention operands; fp32 \
                 master weights, residual stream, norms, routing, loss, gradients and AdamW)"
                    .into(),
            ));
            Precision::Bf16Mixed
        }
        (_, DeviceRequest::Cpu) => Precision::Fp32,
        _ => {
            events(&Event::Notice(
                "precision: fp32 (true fp32 on the GPU: fp32 GEMMs without TF32)".into(),
            ));
            Precision::Fp32
        }
    };
    let cpu_backends_at_start = CpuBackend::constructed();
    // One trainer per run directory, locked before anything is written there.
    let _lock = lock_run_dir(opts, events)?;
    let config = model_config(recipe)?;
    if device == DeviceRequest::Cpu && !opts.skip_memory_check {
        // Every CPU rank holds a replica: refuse a run the machine cannot hold before any of it
        // is allocated (a GPU rank checks its device's memory instead).
        let per_rank = memory_plan(&config, recipe, Precision::Fp32).total;
        let ranks = recipe.train.ranks as u64;
        memory::check_host_memory(
            per_rank.saturating_mul(ranks),
            &format!(
                "this run ({ranks} rank(s) × {} per rank: {} parameters, micro-batch {} × {})",
                memory::gib(per_rank),
                config.num_params(),
                recipe.train.micro_batch,
                recipe.data.seq_len
            ),
            "--no-memory-check",
        )?;
    }
    if let Some(dir) = &recipe.model.init_from {
        let theirs = SteelConfig::from_file(&dir.join("config.json"))?;
        if theirs.param_shapes() != config.param_shapes() {
            return Err(inv(format!(
                "model.init_from {}: its config.json describes another model than model.config",
                dir.display()
            )));
        }
    }
    let ckpt_root = checkpoints_dir(&opts.out);
    let found = match &opts.resume {
        Resume::No => {
            if !checkpoint::list(&ckpt_root)?.is_empty() {
                return Err(inv(format!(
                    "{} already holds checkpoints: continue with --resume auto, start over with \
                     --fresh (the old run is moved aside, not deleted), or choose another --out",
                    ckpt_root.display()
                )));
            }
            None
        }
        Resume::Auto => {
            let (found, warnings) = checkpoint::latest_valid(&ckpt_root)?;
            if found.is_none() && !warnings.is_empty() {
                // Checkpoints exist but none verifies: never a silent fresh start over them.
                return Err(inv(format!(
                    "--resume auto: no checkpoint under {} verifies, so nothing was changed:\n  \
                     {}\nrepair or restore one, resume from a directory with --resume DIR, or \
                     start over with --fresh (the old run is moved aside, not deleted)",
                    ckpt_root.display(),
                    warnings.join("\n  ")
                )));
            }
            for w in warnings {
                events(&Event::Notice(format!("warning: {w}")));
            }
            if found.is_none() {
                events(&Event::Notice(format!(
                    "resume: no checkpoint under {}, starting fresh",
                    ckpt_root.display()
                )));
            }
            found.map(|(d, _)| d)
        }
        Resume::Dir(d) => Some(d.clone()),
    };
    let loaded = match &found {
        Some(d) => {
            let l = load_checkpoint(d, &config)?;
            events(&Event::Notice(format!("resume: step {} from {}", l.step, d.display())));
            Some(l)
        }
        None => None,
    };
    if loaded.is_none() && !opts.add_data.is_empty() {
        return Err(inv("--add-data appends shards on resume; use --resume"));
    }
    let prepared = prepare_data(recipe, &opts.out, &mut |n| events(&Event::Notice(n)))?;
    if let Some(v) = prepared.vocab {
        if v > config.vocab_size {
            return Err(inv(format!(
                "the tokenizer has {v} tokens but the model's vocab_size is {}",
                config.vocab_size
            )));
        }
    }
    // Fine-tuning counts epochs; a decay of 0 steps means "to the last step".
    let mut adjusted = recipe.clone();
    if let (Some(ep), Some(sft)) = (recipe.train.epochs, &prepared.sft) {
        let per_step = recipe.global_batch() as f64;
        let steps = ((ep * sft.examples.len() as f64) / per_step).ceil().max(1.0) as u64;
        // An explicit max_steps (`--max-steps`) stops the run earlier; the schedule still spans
        // the epochs, so a capped run is the start of the full one.
        let cap = recipe.train.max_steps;
        adjusted.train.max_steps = if cap > 0 { steps.min(cap) } else { steps };
        if adjusted.optim.decay_steps == 0 {
            adjusted.optim.decay_steps = steps;
        }
        events(&Event::Notice(format!(
            "sft: {ep} epochs of {} examples at {} per step = {steps} steps{}",
            sft.examples.len(),
            recipe.global_batch(),
            if cap > 0 && cap < steps {
                format!("; this run stops at step {cap} (train.max_steps)")
            } else {
                String::new()
            }
        )));
    }
    if adjusted.optim.decay_steps == 0 {
        adjusted.optim.decay_steps = adjusted.train.max_steps;
    }
    let recipe = &adjusted;
    // A model trained with its own tokenizer names that tokenizer's special ids (generation
    // stops at its <|im_end|>), unless its config already does.
    let mut config = config;
    if let Some((pad, im_end)) = prepared.special_ids {
        config.bos_token_id.get_or_insert(steel_model::TokenIds::One(pad as i64));
        config.eos_token_id.get_or_insert(steel_model::TokenIds::One(im_end as i64));
    }
    let o = &recipe.optim;
    let schedule = LrSchedule::new(o.lr, o.min_lr, o.warmup_steps, o.decay_steps)?;
    let plan = (device != DeviceRequest::Cpu).then(|| memory_plan(&config, recipe, precision));
    if let Some(p) = &plan {
        events(&Event::Notice(format!("memory plan per device: {p}")));
    }
    let stop = opts.stop.clone().unwrap_or_default();
    let sh = Shared {
        recipe,
        opts,
        prepared,
        start_step: loaded.as_ref().map_or(0, |l| l.step),
        start_tokens: loaded.as_ref().map_or(0, |l| l.tokens),
        start_elapsed: loaded.as_ref().map_or(0.0, |l| l.elapsed_s),
        config,
        schedule,
        loaded,
        stop,
        device,
        gpus: std::sync::Mutex::new(Vec::new()),
        precision,
        plan,
        known_valid: std::sync::Mutex::new(found.iter().cloned().collect()),
    };
    if let Some(tok) = sh.prepared.tokenizer.as_ref().filter(|_| !sh.prepared.tokenizer_learned) {
        events(&Event::Notice(format!("tokenizer: {}", tok.display())));
    }
    events(&Event::Started {
        start_step: sh.start_step,
        max_steps: recipe.train.max_steps,
        params: sh.config.num_params(),
        flops_per_token: sh.config.training_flops_per_token(recipe.data.seq_len),
    });
    let world = recipe.train.ranks;
    let mut comms = InProcessComm::group(world)?.into_iter();
    let comm0 = comms.next().ok_or_else(|| inv("no rank 0"))?;
    let result = std::thread::scope(|scope| {
        let sh = &sh;
        let handles: Vec<_> = comms
            .enumerate()
            .map(|(i, comm)| {
                scope.spawn(move || {
                    let abort = AbortOnDrop(Some(comm.abort_handle()));
                    let out = build_rank(sh, i + 1, comm).and_then(|r| run_rank(sh, r, None));
                    if out.is_ok() {
                        abort.disarm();
                    }
                    out
                })
            })
            .collect();
        let abort = AbortOnDrop(Some(comm0.abort_handle()));
        let out = build_rank(sh, 0, comm0).and_then(|r| run_rank(sh, r, Some(events)));
        if out.is_ok() {
            abort.disarm();
        } else {
            drop(abort);
        }
        let mut first_err = out.as_ref().err().map(|e| e.to_string());
        for (i, h) in handles.into_iter().enumerate() {
            match h.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(format!("rank {}: {e}", i + 1));
                }
                Err(_) => {
                    first_err.get_or_insert(format!("rank {} panicked", i + 1));
                }
            }
        }
        match (out, first_err) {
            (Ok(s), None) => Ok(s),
            (Err(e), _) => Err(e),
            (Ok(_), Some(e)) => Err(inv(e)),
        }
    });
    // The proof that a GPU run ran on the GPU backend: its launches, and no CPU backend.
    if device != DeviceRequest::Cpu {
        let gpus = sh.gpus.lock().unwrap_or_else(|p| p.into_inner());
        let (kernels, gemms) =
            gpus.iter().map(|g| g.counts()).fold((0, 0), |(k, m), c| (k + c.kernels, m + c.gemms));
        let cpu = match CpuBackend::constructed() - cpu_backends_at_start {
            0 => "no CPU backend constructed".to_string(),
            n => format!("{n} CPU backend(s) constructed"),
        };
        events(&Event::Notice(format!(
            "{device}: {kernels} kernel launches and {gemms} GEMMs; {cpu}"
        )));
    }
    result
}

/// Locks `--out` for this run (rank 0 of the process); with `--fresh`, moves an existing run
/// aside first (under its own lock, so no trainer is writing it) and locks the new directory.
fn lock_run_dir(
    opts: &RunOptions,
    events: &mut dyn FnMut(&Event),
) -> Result<Option<crate::run_dir::RunLock>> {
    use crate::run_dir::{move_aside, RunLock};
    if opts.fresh && opts.resume != Resume::No {
        return Err(inv("--fresh starts over: it cannot be combined with --resume"));
    }
    let lock = RunLock::acquire(&opts.out, 0)?;
    if !opts.fresh {
        return Ok(lock);
    }
    match move_aside(&opts.out)? {
        Some(old) => {
            events(&Event::Notice(format!(
                "--fresh: the previous run in {} was moved to {}",
                opts.out.display(),
                old.display()
            )));
            let new = RunLock::acquire(&opts.out, 0)?;
            drop(lock);
            Ok(new)
        }
        None => Ok(lock),
    }
}

/// Breaks the rank group when a rank leaves with an error, so the others stop waiting.
struct AbortOnDrop(Option<steel_runtime::comm::AbortHandle>);

impl AbortOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// Where `steel-train` keeps checkpoints under `--out`.
pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

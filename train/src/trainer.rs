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

use crate::checkpoint::{self, FileWriter};
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
use steel_model::{SteelConfig, SteelModel, TrainingBatch};
use steel_runtime::comm::{Communicator, InProcessComm, ReduceOp};
use steel_runtime::cpu::CpuBackend;
use steel_runtime::cuda::profile::ProfileWindow;
use steel_runtime::cuda::CudaGpu;
use steel_runtime::gpu::{EmuGpu, Gpu, GpuBackend};
use steel_runtime::{trace, Backend, DType, DeviceRequest, Tensor};

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
}

/// What the loop tells its caller (the CLI draws the progress bar from these).
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

/// A loaded checkpoint.
struct Loaded {
    dir: PathBuf,
    step: u64,
    tokens: u64,
    tensors: HashMap<String, Tensor>,
    moments: HashMap<String, (Tensor, Tensor)>,
    opt_step: u64,
    elapsed_s: f64,
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

/// Reads a safetensors file of F32 tensors.
fn read_tensors(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| io(path, e))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(io(path, format!("tensor {name} is {:?}, expected F32", view.dtype())));
        }
        out.insert(name.clone(), Tensor::from_bytes(view.data(), DType::F32, view.shape())?);
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// Writes named tensors (cpu) to a safetensors file.
fn write_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: HashMap<String, String>,
) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>, DType)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_bytes()?, t.shape().to_vec(), t.dtype())))
        .collect::<Result<_>>()?;
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, b, s, dt)| {
            let d = match dt {
                DType::F32 => safetensors::Dtype::F32,
                DType::F64 => safetensors::Dtype::F64,
                other => return Err(inv(format!("cannot checkpoint a {other} tensor ({n})"))),
            };
            TensorView::new(d, s.clone(), b).map(|v| (n.clone(), v)).map_err(|e| io(path, e))
        })
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize_to_file(views, Some(meta), path).map_err(|e| io(path, e))
}

fn load_checkpoint(dir: &Path, config: &SteelConfig) -> Result<Loaded> {
    let manifest = checkpoint::verify(dir)?;
    let saved = SteelConfig::from_file(&dir.join("config.json"))?;
    if saved.param_shapes() != config.param_shapes()
        || saved.ffn_type != config.ffn_type
        || saved.mlp_type != config.mlp_type
    {
        return Err(inv(format!(
            "{}: the checkpoint's model (config.json) differs from the recipe's model config",
            dir.display()
        )));
    }
    let (tensors, _) = read_tensors(&dir.join("model.safetensors"))?;
    let (opt, meta) = read_tensors(&dir.join("optimizer.safetensors"))?;
    let opt_step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io(&dir.join("optimizer.safetensors"), "no step in its metadata"))?;
    let mut moments = HashMap::new();
    for name in tensors.keys() {
        let m = opt.get(&format!("exp_avg.{name}"));
        let v = opt.get(&format!("exp_avg_sq.{name}"));
        match (m, v) {
            (Some(m), Some(v)) => {
                moments.insert(name.clone(), (m.clone(), v.clone()));
            }
            _ => {
                return Err(io(
                    &dir.join("optimizer.safetensors"),
                    format!("no moments for parameter {name}"),
                ))
            }
        }
    }
    let tpath = dir.join("trainer.json");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tpath).map_err(|e| io(&tpath, e))?)
            .map_err(|e| io(&tpath, e))?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        step: manifest.step,
        tokens: state["tokens"].as_u64().unwrap_or(0),
        tensors,
        moments,
        opt_step,
        elapsed_s: state["elapsed_s"].as_f64().unwrap_or(0.0),
    })
}

/// Where a rank's training examples come from.
enum Source {
    /// Packed blocks of shards.
    Packed(Dataset),
    /// Fine-tuning examples, one per sequence.
    Sft(SftOrder),
}

/// One forward/backward unit of a step: `[rows, len + 1]` tokens and, for fine-tuning, the
/// explicit targets `[rows, len]`.
struct Micro {
    blocks: Tensor,
    targets: Option<Tensor>,
    counted: u64,
    tokens: u64,
}

/// Per-rank state.
struct Rank {
    model: SteelModel,
    opt: Optimizer,
    data: Source,
    comm: InProcessComm,
}

impl Rank {
    /// The micro-batches of one step (see the module docs).
    fn next_micros(&mut self, sh: &Shared<'_>) -> Result<Vec<Micro>> {
        let rec = sh.recipe;
        let (b, t1) = (rec.train.micro_batch, rec.data.seq_len + 1);
        let mut out = Vec::new();
        for _ in 0..rec.train.grad_accum {
            match &mut self.data {
                Source::Packed(ds) => {
                    let blocks = ds.next_batch(b).map_err(|e| inv(e.to_string()))?;
                    let c = counted(&blocks, t1, sh.prepared.ignore_index);
                    out.push(Micro {
                        blocks: Tensor::from_vec(blocks, &[b, t1])?,
                        targets: None,
                        counted: c,
                        tokens: (b * (t1 - 1)) as u64,
                    });
                }
                Source::Sft(order) => {
                    let examples = sh
                        .prepared
                        .sft
                        .as_ref()
                        .map(|s| &s.examples)
                        .ok_or_else(|| inv("no fine-tuning data"))?;
                    for _ in 0..b {
                        let ex = &examples[order.next_index()];
                        let n = ex.ids.len();
                        let targets: Vec<i32> = ex.labels[1..].iter().map(|&l| l as i32).collect();
                        let c = targets.iter().filter(|&&t| t as i64 != crate::sft::IGNORE).count()
                            as u64;
                        out.push(Micro {
                            blocks: Tensor::from_vec(ex.ids.clone(), &[1, n])?,
                            targets: Some(Tensor::from_vec(targets, &[1, n - 1])?),
                            counted: c,
                            tokens: (n - 1) as u64,
                        });
                    }
                }
            }
        }
        Ok(out)
    }
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
}

/// The backend of `rank`: the CPU's, or the GPU backend on device `rank` (for `emu`, an emulated
/// device per rank). Nothing of a GPU run computes on a `CpuBackend`.
fn rank_backend(sh: &Shared<'_>, rank: usize) -> Result<Arc<dyn Backend>> {
    let keep = |g: Arc<dyn Gpu>| sh.gpus.lock().unwrap_or_else(|p| p.into_inner()).push(g);
    Ok(match sh.device {
        DeviceRequest::Emu => {
            let g = Arc::new(EmuGpu::with_ordinal(rank));
            keep(g.clone());
            Arc::new(GpuBackend::new(g))
        }
        DeviceRequest::Cuda => {
            let g = Arc::new(CudaGpu::new(rank)?);
            keep(g.clone());
            Arc::new(GpuBackend::new(g))
        }
        DeviceRequest::Cpu | DeviceRequest::Auto => Arc::new(CpuBackend::new()),
    })
}

fn adamw_config(recipe: &Recipe) -> AdamWConfig {
    let o = &recipe.optim;
    AdamWConfig {
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        weight_decay: o.weight_decay,
        clip: (o.clip > 0.0).then_some(o.clip),
    }
}

fn build_rank(sh: &Shared<'_>, rank: usize, comm: InProcessComm) -> Result<Rank> {
    let world = sh.recipe.train.ranks;
    let be = rank_backend(sh, rank)?;
    let (model, opt) = match &sh.loaded {
        Some(l) => {
            let tensors = l.tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let model = SteelModel::from_tensors(sh.config.clone(), be, tensors)?;
            let moments = model
                .params
                .iter()
                .map(|(_, p)| {
                    l.moments.get(&p.name).cloned().ok_or_else(|| {
                        inv(format!("checkpoint has no optimizer state for {}", p.name))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let opt =
                Optimizer::restore(&model.params, adamw_config(sh.recipe), moments, l.opt_step)?;
            (model, opt)
        }
        None => {
            let model = match &sh.recipe.model.init_from {
                Some(dir) => steel_model::load_hf_dir(dir, be, DType::F32)?,
                None => {
                    SteelModel::init(sh.config.clone(), be, DType::F32, sh.recipe.model.init_seed)?
                }
            };
            let opt = Optimizer::new(&model.params, adamw_config(sh.recipe))?;
            (model, opt)
        }
    };
    if let Some(sft) = &sh.prepared.sft {
        let order = match &sh.loaded {
            Some(l) => {
                let p = l.dir.join("data.json");
                let v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&p).map_err(|e| io(&p, e))?)
                        .map_err(|e| io(&p, e))?;
                if v["hashes"] != serde_json::json!(sft.hashes) {
                    return Err(io(&p, "the fine-tuning data files changed since this checkpoint"));
                }
                SftOrder::from_json(&v["order"], rank, world)?
            }
            None => SftOrder::new(sft.examples.len(), sh.recipe.data.seed, rank, world),
        };
        return Ok(Rank { model, opt, data: Source::Sft(order), comm });
    }
    let data_err = |e: steel_data::DataError| inv(e.to_string());
    let mut data = match &sh.loaded {
        Some(l) => {
            Dataset::restore(&l.dir.join("data.safetensors"), rank, world).map_err(data_err)?
        }
        None => Dataset::open(
            &sh.prepared.train,
            DatasetOptions {
                block_size: sh.recipe.data.seq_len + 1,
                seed: sh.recipe.data.seed,
                shuffle: true,
            },
            rank,
            world,
        )
        .map_err(data_err)?,
    };
    if data.block_size() != sh.recipe.data.seq_len + 1 {
        return Err(inv(format!(
            "the checkpoint's data blocks hold {} tokens but data.seq_len + 1 = {}",
            data.block_size(),
            sh.recipe.data.seq_len + 1
        )));
    }
    for dir in &sh.opts.add_data {
        data.append(0, dir).map_err(data_err)?;
    }
    Ok(Rank { model, opt, data: Source::Packed(data), comm })
}

/// Counted targets of `[b, T+1]` blocks.
fn counted(blocks: &[u32], t1: usize, ignore: i64) -> u64 {
    blocks.chunks(t1).map(|r| r[1..].iter().filter(|&&x| x as i64 != ignore).count() as u64).sum()
}

fn scalar(x: f64) -> Result<Tensor> {
    Ok(Tensor::from_vec(vec![x], &[1])?)
}

/// Mean validation loss (token-weighted) over the first `eval_batches` micro-batches of a fresh,
/// unshuffled pass over the held-out shards.
fn validate(sh: &Shared<'_>, model: &SteelModel) -> Result<Option<(f64, u64)>> {
    if sh.prepared.val.is_empty() {
        return Ok(None);
    }
    let t1 = sh.recipe.data.seq_len + 1;
    let mut ds = Dataset::open(
        &sh.prepared.val,
        DatasetOptions { block_size: t1, seed: sh.recipe.data.seed, shuffle: false },
        0,
        1,
    )
    .map_err(|e| inv(e.to_string()))?;
    let total_blocks: u64 = ds.blocks_per_epoch().iter().sum();
    let b = sh.recipe.train.micro_batch;
    let batches = (sh.recipe.train.eval_batches as u64).min(total_blocks.div_ceil(b as u64).max(1));
    let (mut sum, mut count) = (0.0f64, 0u64);
    for i in 0..batches {
        let n = (b as u64).min(total_blocks - (i * b as u64).min(total_blocks)).max(1) as usize;
        let blocks = ds.next_batch(n).map_err(|e| inv(e.to_string()))?;
        let mut tape = Tape::no_grad(model.backend().clone());
        let batch = TrainingBatch {
            blocks: Tensor::from_vec(blocks, &[n, t1])?,
            ignore_index: sh.prepared.ignore_index,
            normalizer: Some(1.0),
            chunk_tokens: sh.recipe.train.chunk_tokens,
            targets: None,
        };
        let (loss, c) = model.loss(&mut tape, &batch)?;
        sum += model.backend().download(tape.value(loss)?)?.scalar()?;
        count += c as u64;
    }
    Ok((count > 0).then(|| (sum / count as f64, count)))
}

/// Writes one checkpoint file by copying.
type Copier = dyn Fn(&Path) -> Result<()>;

fn save_checkpoint(
    sh: &Shared<'_>,
    r: &Rank,
    step: u64,
    tokens: u64,
    elapsed: f64,
) -> Result<PathBuf> {
    let root = checkpoints_dir(&sh.opts.out);
    // Host copies of the parameters and moments (they live on the device on a GPU backend).
    let be = r.model.backend();
    let names: Vec<(String, Tensor)> = r
        .model
        .params
        .iter()
        .map(|(_, p)| Ok((p.name.clone(), be.download(&p.value)?)))
        .collect::<Result<_>>()?;
    let mut moments: Vec<(String, Tensor)> = Vec::new();
    for ((_, p), (m, v)) in r.model.params.iter().zip(r.opt.moments()) {
        moments.push((format!("exp_avg.{}", p.name), be.download(m)?));
        moments.push((format!("exp_avg_sq.{}", p.name), be.download(v)?));
    }
    let recipe_toml = sh.recipe.to_toml()?;
    let config_json = sh.config.to_json()?;
    let trainer = json!({
        "format": "steel-trainer-v1",
        "step": step,
        "tokens": tokens,
        "optimizer_steps_applied": r.opt.step,
        "elapsed_s": elapsed,
        "rng": {
            "init_seed": sh.recipe.model.init_seed,
            "data_seed": sh.recipe.data.seed,
            "note": "training draws no random numbers besides the data order, whose generator state is in data.safetensors"
        },
        "ranks": sh.recipe.train.ranks,
        "ignore_index": sh.prepared.ignore_index,
    });
    let trainer_text = serde_json::to_string_pretty(&trainer).map_err(|e| inv(e.to_string()))?;
    let write_model = |p: &Path| write_tensors(p, &names, HashMap::new());
    let opt_meta: HashMap<String, String> = [("step".to_string(), r.opt.step.to_string())].into();
    let write_opt = |p: &Path| write_tensors(p, &moments, opt_meta.clone());
    let data_name = match &r.data {
        Source::Packed(_) => "data.safetensors",
        Source::Sft(_) => "data.json",
    };
    let write_data = |p: &Path| match &r.data {
        Source::Packed(ds) => ds.save(p).map_err(|e| inv(e.to_string())),
        Source::Sft(order) => {
            let hashes = sh.prepared.sft.as_ref().map(|s| s.hashes.clone()).unwrap_or_default();
            let v =
                json!({"format": "steel-sft-data-v1", "hashes": hashes, "order": order.to_json()});
            std::fs::write(p, v.to_string()).map_err(|e| io(p, e))
        }
    };
    let write_text = |text: String| move |p: &Path| std::fs::write(p, &text).map_err(|e| io(p, e));
    let w_trainer = write_text(trainer_text);
    let w_recipe = write_text(recipe_toml);
    let w_config = write_text(config_json);
    let w_gen = write_text(
        serde_json::to_string_pretty(&steel_model::generation_config(&sh.config))
            .map_err(|e| inv(e.to_string()))?,
    );
    let mut files: Vec<(String, FileWriter<'_>)> = vec![
        ("model.safetensors".into(), &write_model),
        ("config.json".into(), &w_config),
        ("generation_config.json".into(), &w_gen),
        ("optimizer.safetensors".into(), &write_opt),
        (data_name.into(), &write_data),
        ("trainer.json".into(), &w_trainer),
        ("recipe.toml".into(), &w_recipe),
    ];
    let tok_copies: Vec<(String, PathBuf)> = match &sh.prepared.tokenizer {
        Some(dir) => ["tokenizer.json", "tokenizer_config.json"]
            .iter()
            .map(|n| (n.to_string(), dir.join(n)))
            .filter(|(_, p)| p.is_file())
            .collect(),
        None => Vec::new(),
    };
    let copiers: Vec<Box<Copier>> = tok_copies
        .iter()
        .map(|(_, src)| {
            let src = src.clone();
            Box::new(move |p: &Path| std::fs::copy(&src, p).map(|_| ()).map_err(|e| io(&src, e)))
                as Box<Copier>
        })
        .collect();
    for ((name, _), c) in tok_copies.iter().zip(&copiers) {
        files.push((name.clone(), c.as_ref()));
    }
    let refs: Vec<(&str, FileWriter<'_>)> = files.iter().map(|(n, f)| (n.as_str(), *f)).collect();
    let dir =
        checkpoint::write_checkpoint(&root, step, &refs, json!({"step": step, "tokens": tokens}))?;
    checkpoint::prune(&root, sh.recipe.train.keep_checkpoints)?;
    Ok(dir)
}

/// The body of one rank; rank 0 passes `events` and does the logging and checkpoints.
fn run_rank(
    sh: &Shared<'_>,
    mut r: Rank,
    mut events: Option<&mut dyn FnMut(&Event)>,
) -> Result<Summary> {
    let rec = sh.recipe;
    let world = rec.train.ranks;
    let rank = r.comm.rank();
    let flops_per_token = sh.config.training_flops_per_token(rec.data.seq_len);
    let peak = metrics::peak_flops(rec.train.peak_tflops);
    let mut log = match events {
        Some(_) => Some(MetricsLog::open(&sh.opts.out.join("metrics.jsonl"), sh.start_step)?),
        None => None,
    };
    let mut emit = |e: Event| {
        if let Some(f) = events.as_mut() {
            f(&e);
        }
    };
    let mut summary = Summary {
        start_step: sh.start_step,
        last_step: sh.start_step,
        losses: Vec::new(),
        last_checkpoint: sh.loaded.as_ref().map(|l| l.dir.clone()),
        stopped: false,
    };
    let mut tokens = sh.start_tokens;
    let mut elapsed = sh.start_elapsed;
    let mut window = (0u64, 0.0f64); // tokens and seconds since the last log line
    let mut step = sh.start_step;
    while step < rec.train.max_steps {
        step += 1;
        if rank == 0 && sh.opts.profile_steps.and_then(|w| w.before(step)).is_some() {
            emit(Event::ProfilerStart { step });
        }
        let t0 = Instant::now();
        let lr = sh.schedule.lr(step);
        let micro = r.next_micros(sh)?;
        let local: u64 = micro.iter().map(|m| m.counted).sum();
        let local_tokens: u64 = micro.iter().map(|m| m.tokens).sum();
        let count_t = scalar(local as f64)?;
        if world > 1 {
            r.comm.all_reduce(&count_t, ReduceOp::Sum)?;
        }
        let global = count_t.scalar()? as u64;
        let mut loss_sum = 0.0f64;
        for m in micro {
            let mut tape = Tape::new(r.model.backend().clone());
            let batch = TrainingBatch {
                blocks: m.blocks,
                ignore_index: if m.targets.is_some() {
                    crate::sft::IGNORE
                } else {
                    sh.prepared.ignore_index
                },
                normalizer: Some(global.max(1) as f64),
                chunk_tokens: rec.train.chunk_tokens,
                targets: m.targets,
            };
            let loss = {
                let _r = trace::range("fwd");
                r.model.loss(&mut tape, &batch)?.0
            };
            // The loss lives where the backend computes (a device scalar on a GPU).
            loss_sum += r.model.backend().download(tape.value(loss)?)?.scalar()?;
            let _r = trace::range("bwd");
            tape.backward(loss)?;
        }
        let loss_t = scalar(loss_sum)?;
        if world > 1 {
            let _r = trace::range("allreduce");
            r.comm.all_reduce(&loss_t, ReduceOp::Sum)?;
            for (id, _) in r.model.params.iter() {
                r.comm.all_reduce(&r.model.params.grad_buffer(id)?, ReduceOp::Sum)?;
            }
        }
        let loss = loss_t.scalar()?;
        if let Some(hook) = &sh.opts.hook {
            hook(step, rank, &r.model.params)?;
        }
        let report = {
            let _r = trace::range("optim");
            if loss.is_finite() {
                r.opt.step(&r.model.params, lr)?
            } else {
                r.model.params.zero_grads()?;
                crate::StepReport { grad_norm: f64::NAN, clip_scale: 0.0, skipped: true }
            }
        };
        let step_s = t0.elapsed().as_secs_f64();
        let step_tokens = local_tokens * world as u64;
        tokens += step_tokens;
        elapsed += step_s;
        window.0 += step_tokens;
        window.1 += step_s;
        summary.losses.push(loss);
        summary.last_step = step;
        if rank == 0 && sh.opts.profile_steps.and_then(|w| w.after(step)).is_some() {
            emit(Event::ProfilerStop { step });
        }
        if report.skipped {
            emit(Event::Skipped { step, loss, grad_norm: report.grad_norm });
        }
        // Everybody agrees whether to stop (a signal may reach the ranks at different moments).
        let stop_t = scalar(if sh.stop.load(Ordering::SeqCst) { 1.0 } else { 0.0 })?;
        if world > 1 {
            r.comm.all_reduce(&stop_t, ReduceOp::Sum)?;
        }
        let stopping = stop_t.scalar()? > 0.0;
        if rank != 0 {
            if stopping {
                summary.stopped = true;
                break;
            }
            continue;
        }
        let last = step == rec.train.max_steps || stopping;
        let eval_due =
            rec.train.eval_every > 0 && (step.is_multiple_of(rec.train.eval_every) || last);
        let mut val = None;
        if eval_due {
            let _r = trace::range("eval");
            if let Some((vl, count)) = validate(sh, &r.model)? {
                emit(Event::Validation { step, loss: vl, targets: count });
                val = Some(vl);
            }
        }
        let logged =
            step.is_multiple_of(rec.train.log_every) || last || val.is_some() || report.skipped;
        let tps = if window.1 > 0.0 { window.0 as f64 / window.1 } else { 0.0 };
        let entry = StepLog {
            step,
            loss,
            lr,
            grad_norm: report.grad_norm,
            tokens_per_s: tps,
            mfu: peak.map(|p| tps * flops_per_token / p),
            targets: global,
            tokens,
            step_ms: step_s * 1e3,
            elapsed_s: elapsed,
            skipped: report.skipped,
            val_loss: val,
            val_ppl: val.map(f64::exp),
        };
        if logged {
            if let Some(l) = log.as_mut() {
                l.write(&entry)?;
            }
            window = (0, 0.0);
        }
        emit(Event::Step { log: entry, logged });
        if step.is_multiple_of(rec.train.checkpoint_every) || last {
            let _r = trace::range("checkpoint");
            let dir = save_checkpoint(sh, &r, step, tokens, elapsed)?;
            emit(Event::Checkpoint { step, dir: dir.clone() });
            summary.last_checkpoint = Some(dir);
        }
        if stopping {
            summary.stopped = true;
            break;
        }
    }
    Ok(summary)
}

/// What `--dry-run` prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DryRun {
    pub params: usize,
    pub flops_per_token: f64,
    pub tokens_per_step: usize,
    pub sequences_per_step: usize,
    /// Weights, gradients and AdamW moments (fp32), per rank.
    pub state_bytes_per_rank: u64,
    /// Estimated activations kept for backward of one micro-batch.
    pub activation_bytes_per_rank: u64,
    pub ranks: usize,
    pub max_steps: u64,
    pub total_tokens: u128,
}

/// Sizes of a run without running it.
pub fn dry_run(recipe: &Recipe) -> Result<DryRun> {
    let config = model_config(recipe)?;
    let params = config.num_params();
    let t = recipe.data.seq_len as u64;
    let b = recipe.train.micro_batch as u64;
    let h = config.hidden_size as u64;
    let kv = (config.kv_heads() * config.head_dim()) as u64;
    let heads = config.num_attention_heads as u64;
    let layers = config.num_hidden_layers as u64;
    let slots = (config.n_experts * config.slots_per_expert) as u64;
    let ew = config.expert_width() as u64;
    // Per token per layer (f32): norms' outputs and residuals (4h), q/k/v (h + 2kv), attention
    // output (h), the soft-MoE's dispatch/combine weights (2·slots), expert activations (~4·ew
    // per slot, shared over tokens: counted per token as slots·4·ew/T), the FFN output (h).
    let per_tok_layer = 4 * h + h + 2 * kv + h + 2 * slots + h + heads;
    let per_layer_fixed = slots * 6 * ew + slots * 2 * h;
    let act = 4 * (b * t * layers * per_tok_layer + b * layers * per_layer_fixed + b * t * 2 * h);
    Ok(DryRun {
        params,
        flops_per_token: config.training_flops_per_token(recipe.data.seq_len),
        tokens_per_step: recipe.tokens_per_step(),
        sequences_per_step: recipe.global_batch(),
        state_bytes_per_rank: params as u64 * 16,
        activation_bytes_per_rank: act,
        ranks: recipe.train.ranks,
        max_steps: recipe.train.max_steps,
        total_tokens: recipe.tokens_per_step() as u128 * recipe.train.max_steps as u128,
    })
}

/// Runs `recipe` (see the module docs). `events` runs on the calling thread.
pub fn train(
    recipe: &Recipe,
    opts: &RunOptions,
    events: &mut dyn FnMut(&Event),
) -> Result<Summary> {
    let request: DeviceRequest = recipe.train.device.parse()?;
    let choice = steel_runtime::choose_device(request, false)?;
    events(&Event::Notice(choice.notice.clone()));
    // `auto` stays on the CPU until the GPU backend covers the model; `cuda` and `emu` run the
    // GPU backend and fail with the name of an op it does not have yet.
    let device = match (choice.device, choice.emulated) {
        (steel_runtime::Device::Cpu, _) => DeviceRequest::Cpu,
        (_, true) => DeviceRequest::Emu,
        (_, false) => DeviceRequest::Cuda,
    };
    if recipe.train.precision == "bf16-mixed" {
        events(&Event::Notice(match device {
            DeviceRequest::Cpu => {
                "precision: the CPU backend computes in f32 (bf16-mixed applies on a GPU)".into()
            }
            _ => "precision: f32 on the GPU backend for now (bf16-mixed comes with the GPU \
                  trainer)"
                .into(),
        }));
    }
    let cpu_backends_at_start = CpuBackend::constructed();
    std::fs::create_dir_all(&opts.out).map_err(|e| io(&opts.out, e))?;
    let config = model_config(recipe)?;
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
                    "{} already holds checkpoints: continue with --resume auto, or choose another --out",
                    ckpt_root.display()
                )));
            }
            None
        }
        Resume::Auto => {
            let (found, warnings) = checkpoint::latest_valid(&ckpt_root)?;
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
        adjusted.train.max_steps =
            ((ep * sft.examples.len() as f64) / per_step).ceil().max(1.0) as u64;
        events(&Event::Notice(format!(
            "sft: {ep} epochs of {} examples at {} per step = {} steps",
            sft.examples.len(),
            recipe.global_batch(),
            adjusted.train.max_steps
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
    };
    if let Some(tok) = &sh.prepared.tokenizer {
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

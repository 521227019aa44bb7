//! A rank's setup: its backend (CPU, or its own GPU device), its model replica and optimizer
//! (fresh, from `init_from`, or from a checkpoint), its view of the data, and the micro-batches
//! of a step.

use super::*;

/// Where a rank's training examples come from.
pub(super) enum Source {
    /// Packed blocks of shards.
    Packed(Dataset),
    /// Fine-tuning examples, one per sequence.
    Sft(SftOrder),
}

/// One forward/backward unit of a step: `[rows, len + 1]` tokens and, for fine-tuning, the
/// explicit targets `[rows, len]`.
pub(super) struct Micro {
    pub(super) blocks: Tensor,
    pub(super) targets: Option<Tensor>,
    pub(super) counted: u64,
    pub(super) tokens: u64,
}

/// Per-rank state.
pub(super) struct Rank {
    pub(super) model: SteelModel,
    pub(super) opt: Optimizer,
    pub(super) data: Source,
    pub(super) comm: InProcessComm,
    /// The rank's device (`None` on the CPU), for the metrics' device and launch counts.
    pub(super) gpu: Option<Arc<dyn Gpu>>,
    /// NVML on a CUDA device (memory, utilisation, power in the log), when the driver has it.
    pub(super) nvml: Option<steel_runtime::cuda::nvml::NvmlReader>,
}

impl Rank {
    /// The micro-batches of one step (see the module docs).
    pub(super) fn next_micros(&mut self, sh: &Shared<'_>) -> Result<Vec<Micro>> {
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

/// A rank's backend and, on a GPU, its device.
pub(super) type RankDevice = (Arc<dyn Backend>, Option<Arc<dyn Gpu>>);

/// The backend of `rank`: the CPU's, or the GPU backend on device `rank` (for `emu`, an emulated
/// device per rank), with that device for the metrics. Nothing of a GPU run computes on a
/// `CpuBackend`.
pub(super) fn rank_backend(sh: &Shared<'_>, rank: usize) -> Result<RankDevice> {
    let keep = |g: Arc<dyn Gpu>| {
        sh.gpus.lock().unwrap_or_else(|p| p.into_inner()).push(g.clone());
        Some(g)
    };
    Ok(match sh.device {
        DeviceRequest::Emu => {
            let g = Arc::new(EmuGpu::with_ordinal(rank));
            (Arc::new(GpuBackend::new(g.clone())), keep(g))
        }
        DeviceRequest::Cuda => {
            let g = Arc::new(CudaGpu::new(rank)?);
            (Arc::new(GpuBackend::new(g.clone())), keep(g))
        }
        DeviceRequest::Cpu | DeviceRequest::Auto => (Arc::new(CpuBackend::new()), None),
    })
}

pub(super) fn adamw_config(recipe: &Recipe) -> AdamWConfig {
    let o = &recipe.optim;
    AdamWConfig {
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        weight_decay: o.weight_decay,
        clip: (o.clip > 0.0).then_some(o.clip),
    }
}

pub(super) fn build_rank(sh: &Shared<'_>, rank: usize, comm: InProcessComm) -> Result<Rank> {
    let world = sh.recipe.train.ranks;
    let (be, gpu) = rank_backend(sh, rank)?;
    if let (Some(g), Some(plan)) = (&gpu, &sh.plan) {
        fits(g.as_ref(), plan, sh.recipe)?;
    }
    let nvml = match sh.device {
        DeviceRequest::Cuda => steel_runtime::cuda::nvml::NvmlReader::new(rank as u32).ok(),
        _ => None,
    };
    let (mut model, opt) = match &sh.loaded {
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
    // bf16 working copies (cast from the fp32 masters, also on resume) under bf16-mixed.
    model.set_precision(sh.precision)?;
    if let Some(sft) = &sh.prepared.sft {
        let order = match &sh.loaded {
            Some(l) => {
                let p = l.ck.path("data.json");
                let v: serde_json::Value =
                    serde_json::from_str(&l.ck.read_string("data.json")?).map_err(|e| io(&p, e))?;
                if v["hashes"] != serde_json::json!(sft.hashes) {
                    return Err(io(&p, "the fine-tuning data files changed since this checkpoint"));
                }
                SftOrder::from_json(&v["order"], rank, world)?
            }
            None => SftOrder::new(sft.examples.len(), sh.recipe.data.seed, rank, world),
        };
        return Ok(Rank { model, opt, data: Source::Sft(order), comm, gpu, nvml });
    }
    let data_err = |e: steel_data::DataError| inv(e.to_string());
    let mut data = match &sh.loaded {
        Some(l) => {
            let name = "data.safetensors";
            Dataset::restore_bytes(&l.ck.read(name)?, &l.ck.path(name), rank, world)
                .map_err(data_err)?
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
    check_vocabulary(&data, sh.config.vocab_size)?;
    Ok(Rank { model, opt, data: Source::Packed(data), comm, gpu, nvml })
}

/// Counted targets of `[b, T+1]` blocks.
pub(super) fn counted(blocks: &[u32], t1: usize, ignore: i64) -> u64 {
    blocks.chunks(t1).map(|r| r[1..].iter().filter(|&&x| x as i64 != ignore).count() as u64).sum()
}

/// Refuses a run whose memory plan exceeds the device's free memory, before anything is
/// allocated for it, naming the plan and what to change.
fn fits(gpu: &dyn Gpu, plan: &MemoryPlan, recipe: &Recipe) -> Result<()> {
    let Some(free) = gpu.memory().free else { return Ok(()) };
    if plan.total <= free {
        return Ok(());
    }
    Err(inv(format!(
        "the run does not fit {}: it needs {} per device but {} are free. Plan: {plan}. \
         Reduce train.micro_batch (now {}; raise train.grad_accum to keep the global batch), \
         data.seq_len (now {}) or train.chunk_tokens (now {}); train.recompute and ZeRO-1 \
         (train.zero = 1) are not built yet",
        gpu.name(),
        memory::gib(plan.total),
        memory::gib(free),
        recipe.train.micro_batch,
        recipe.data.seq_len,
        recipe.train.chunk_tokens
    )))
}

/// Shards that appeared in a source directory after the run registered its files: a resume reads
/// only the registered ones, so each such directory is named with its new shards (for a notice
/// pointing to `--add-data`). Directories that cannot be listed are skipped.
pub(super) fn unregistered_shards(ds: &Dataset) -> Vec<(PathBuf, Vec<PathBuf>)> {
    let mut out = Vec::new();
    for (dir, files) in ds.source_dirs().into_iter().zip(ds.files()) {
        let known: std::collections::HashSet<&Path> =
            files.iter().map(|f| f.path.as_path()).collect();
        let Ok(found) = steel_data::dataset::find_shards(dir) else { continue };
        let new: Vec<PathBuf> =
            found.into_iter().filter(|p| !known.contains(p.as_path())).collect();
        if !new.is_empty() {
            out.push((dir.to_path_buf(), new));
        }
    }
    out
}

/// Refuses shards whose ids the model's embedding cannot look up, at start and naming both
/// (the ids were read while the shards were hashed), instead of failing at the first step.
fn check_vocabulary(data: &Dataset, vocab: usize) -> Result<()> {
    let Some(((lo, lo_file), (hi, hi_file))) = data.id_extremes() else { return Ok(()) };
    if hi >= vocab as i64 {
        return Err(inv(format!(
            "{}: holds token id {hi}, outside the model's vocabulary of {vocab} ids (model \
             config vocab_size): these shards were tokenized with another tokenizer than the \
             model's (a Qwen-tokenized shard needs a model with vocab_size ≥ {})",
            hi_file.display(),
            hi + 1
        )));
    }
    if lo < 0 {
        return Err(inv(format!(
            "{}: holds token id {lo}: a token id is never negative (the shard is corrupted)",
            lo_file.display()
        )));
    }
    Ok(())
}

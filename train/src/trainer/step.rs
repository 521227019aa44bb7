//! The body of a rank: every step's forward, backward, gradient all-reduce, clipping and AdamW
//! on any backend, plus validation, logging, checkpoints and the agreed stop.

use super::*;

/// Kernels and GEMMs the rank's device has launched so far, and its host waits (0 on the CPU).
fn launches(r: &Rank) -> (u64, u64) {
    r.gpu.as_ref().map_or((0, 0), |g| {
        let c = g.counts();
        (c.kernels + c.gemms, c.host_syncs)
    })
}

pub(super) fn scalar(x: f64) -> Result<Tensor> {
    Ok(Tensor::from_vec(vec![x], &[1])?)
}

/// Mean validation loss (token-weighted) over the first `eval_batches` micro-batches of a fresh,
/// unshuffled pass over the held-out shards.
pub(super) fn validate(sh: &Shared<'_>, model: &SteelModel) -> Result<Option<(f64, u64)>> {
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
    // The batches' loss sums add up on the device: one download at the end.
    let (mut sum, mut count) = (None::<Tensor>, 0u64);
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
        let value = tape.value(loss)?.clone();
        sum = Some(match sum {
            None => value,
            Some(acc) => model.backend().add(&acc, &value)?,
        });
        count += c as u64;
    }
    let sum = match sum {
        Some(t) if t.device() == steel_runtime::Device::Cpu => t.scalar()?,
        Some(t) => model.backend().download(&t)?.scalar()?,
        None => 0.0,
    };
    Ok((count > 0).then(|| (sum / count as f64, count)))
}

/// The body of one rank; rank 0 passes `events` and does the logging and checkpoints.
pub(super) fn run_rank(
    sh: &Shared<'_>,
    mut r: Rank,
    mut events: Option<&mut dyn FnMut(&Event)>,
) -> Result<Summary> {
    let rec = sh.recipe;
    let world = rec.train.ranks;
    let rank = r.comm.rank();
    let flops_per_token = sh.config.training_flops_per_token(rec.data.seq_len);
    let device_name = r.gpu.as_ref().map_or_else(|| "cpu".to_string(), |g| g.name());
    let peak = metrics::peak_flops_for(&device_name, rec.train.peak_tflops);
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
        last_checkpoint: sh.loaded.as_ref().map(|l| l.ck.dir.clone()),
        stopped: false,
    };
    let mut tokens = sh.start_tokens;
    let mut elapsed = sh.start_elapsed;
    let mut window = (0u64, 0.0f64); // tokens and seconds since the last log line
    let mut step = sh.start_step;
    if let (0, Some(_), Source::Packed(ds)) = (rank, &sh.loaded, &r.data) {
        for (dir, new) in super::rank::unregistered_shards(ds) {
            emit(Event::Notice(format!(
                "warning: {} shard(s) under {} appeared after this run began and are not read \
                 (e.g. {}); add them with --add-data {}",
                new.len(),
                dir.display(),
                new[0].display(),
                dir.display()
            )));
        }
    }
    while step < rec.train.max_steps {
        step += 1;
        if rank == 0 && sh.opts.profile_steps.and_then(|w| w.before(step)).is_some() {
            emit(Event::ProfilerStart { step });
        }
        let t0 = Instant::now();
        let launches0 = launches(&r);
        if let Some(g) = &r.gpu {
            g.reset_peak();
        }
        let lr = sh.schedule.lr(step);
        let micro = r.next_micros(sh)?;
        let local: u64 = micro.iter().map(|m| m.counted).sum();
        let local_tokens: u64 = micro.iter().map(|m| m.tokens).sum();
        let count_t = scalar(local as f64)?;
        if world > 1 {
            r.comm.all_reduce(&count_t, ReduceOp::Sum)?;
        }
        let global = count_t.scalar()? as u64;
        // The step's losses add up on the device; nothing is read back until the verdict.
        let mut loss_dev: Option<Tensor> = None;
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
            let value = tape.value(loss)?.clone();
            loss_dev = Some(match loss_dev {
                None => value,
                Some(acc) => r.model.backend().add(&acc, &value)?,
            });
            let _r = trace::range("bwd");
            tape.backward(loss)?;
        }
        let loss_t = match loss_dev {
            Some(t) => t,
            None => r.model.backend().zeros(&[1], DType::F32)?,
        };
        if world > 1 {
            let _r = trace::range("allreduce");
            r.comm.all_reduce(&loss_t, ReduceOp::Sum)?;
            for (id, _) in r.model.params.iter() {
                r.comm.all_reduce(&r.model.params.grad_buffer(id)?, ReduceOp::Sum)?;
            }
        }
        if let Some(hook) = &sh.opts.hook {
            hook(step, rank, &r.model.params)?;
        }
        // The norm, the verdict (skip a non-finite loss or norm), clipping and AdamW, queued
        // on the device; `settle` reads loss, norm and verdict together: the one host wait.
        let (loss, report) = {
            let _r = trace::range("optim");
            let pending = r.opt.step_on_device(&r.model.params, lr, &loss_t)?;
            r.opt.settle(&r.model.params, pending)?
        };
        let launches1 = launches(&r);
        let (kernel_launches, host_syncs) = (launches1.0 - launches0.0, launches1.1 - launches0.1);
        let mem_peak = r.gpu.as_ref().map(|g| g.memory().peak_allocated);
        if let (Some(peak), Some(plan), true) =
            (mem_peak, sh.plan.as_ref(), step == sh.start_step + 1)
        {
            if rank == 0 {
                emit(Event::Notice(format!(
                    "memory: measured peak {} in step {step}, planned {} ({:.0}% of the plan)",
                    memory::gib(peak),
                    memory::gib(plan.total),
                    100.0 * peak as f64 / plan.total.max(1) as f64
                )));
            }
        }
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
            device: device_name.clone(),
            kernel_launches,
            host_syncs,
            mem_peak_bytes: mem_peak,
            mem_plan_bytes: mem_peak.and(sh.plan.as_ref().map(|p| p.total)),
            gpu_mem_used_bytes: None,
            gpu_util_pct: None,
            gpu_power_w: None,
        };
        let mut entry = entry;
        if logged {
            if let Some(reading) = r.nvml.as_ref().and_then(|n| n.read().ok()) {
                entry.gpu_mem_used_bytes = Some(reading.memory_used);
                entry.gpu_util_pct = reading.utilization_gpu;
                entry.gpu_power_w = reading.power_w;
            }
        }
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

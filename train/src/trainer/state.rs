//! The trainer's checkpoint I/O: what a checkpoint directory holds (the parameters, AdamW
//! moments, data position, trainer state, recipe and config) and reading it back. The
//! directory mechanics (atomic write, manifest, verification, pruning) are `crate::checkpoint`'s.

use super::*;

/// A loaded checkpoint.
pub(super) struct Loaded {
    /// The verified checkpoint: its other files (the data state) are read through it.
    pub(super) ck: Checkpoint,
    pub(super) step: u64,
    pub(super) tokens: u64,
    pub(super) tensors: HashMap<String, Tensor>,
    pub(super) moments: HashMap<String, (Tensor, Tensor)>,
    pub(super) opt_step: u64,
    pub(super) elapsed_s: f64,
}

/// Reads a safetensors file of F32 tensors from the checkpoint (`path` names it in messages).
pub(super) fn read_tensors(
    bytes: &[u8],
    path: &Path,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| io(path, e))?;
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
pub(super) fn write_tensors(
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

pub(super) fn load_checkpoint(dir: &Path, config: &SteelConfig) -> Result<Loaded> {
    // Every file is read through the manifest: hashed and parsed from the same bytes.
    let ck = Checkpoint::open(dir)?;
    let saved = SteelConfig::from_json(&ck.read_string("config.json")?)
        .map_err(|e| inv(format!("{}: {e}", ck.path("config.json").display())))?;
    if saved.param_shapes() != config.param_shapes()
        || saved.ffn_type != config.ffn_type
        || saved.mlp_type != config.mlp_type
    {
        return Err(inv(format!(
            "{}: the checkpoint's model (config.json) differs from the recipe's model config",
            dir.display()
        )));
    }
    let (tensors, _) = read_tensors(&ck.read("model.safetensors")?, &ck.path("model.safetensors"))?;
    let (opt, meta) =
        read_tensors(&ck.read("optimizer.safetensors")?, &ck.path("optimizer.safetensors"))?;
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
    let tpath = ck.path("trainer.json");
    let state: serde_json::Value =
        serde_json::from_str(&ck.read_string("trainer.json")?).map_err(|e| io(&tpath, e))?;
    Ok(Loaded {
        step: ck.manifest.step,
        ck,
        tokens: state["tokens"].as_u64().unwrap_or(0),
        tensors,
        moments,
        opt_step,
        elapsed_s: state["elapsed_s"].as_f64().unwrap_or(0.0),
    })
}

/// Writes one checkpoint file by copying.
pub(super) type Copier = dyn Fn(&Path) -> Result<()>;

pub(super) fn save_checkpoint(
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
    let mut known = sh.known_valid.lock().unwrap_or_else(|p| p.into_inner());
    known.insert(dir.clone());
    crate::run_dir::prune_valid(&root, sh.recipe.train.keep_checkpoints, &mut known)?;
    Ok(dir)
}

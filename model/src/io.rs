//! HuggingFace model directories: `config.json` + `model.safetensors` (or shards with
//! `model.safetensors.index.json`) + `generation_config.json`.
//!
//! Loading memory-maps every file, so the checkpoint's bytes stay in the page cache rather than
//! being copied twice; F32, BF16, F16 and F64 tensors are converted to the requested dtype.
//! A missing, extra or mis-shaped tensor is an error naming it. Saving writes bf16 or f32
//! shards of at most `max_shard_bytes` each, with an index when there is more than one.

use crate::{reference_auto_map, ModelError, Result, SteelConfig, SteelModel, TokenIds};
use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView, View};
use safetensors::SafeTensors;
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use steel_runtime::{Backend, CpuStorage, DType, Tensor};

/// The reference's remote-code files HF needs beside the weights (`trust_remote_code`).
pub const REMOTE_CODE_FILES: [&str; 3] =
    ["configuration_steel.py", "modeling_steel.py", "softmoe_v3.py"];

/// Non-persistent buffers some exporters still write; they are not parameters.
fn is_buffer(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

fn st_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::File { path: path.to_path_buf(), msg: format!("not a valid safetensors file: {e}") }
}

/// Converts one stored tensor to `dtype` (F32 or F64), element by element straight from the
/// mapped bytes (no intermediate copy of a whole tensor).
fn convert(name: &str, view: &TensorView<'_>, dtype: DType) -> Result<Tensor> {
    fn decode<T: steel_runtime::Element>(
        data: &[u8],
        width: usize,
        f: impl Fn(&[u8]) -> f64,
    ) -> Vec<T> {
        data.chunks_exact(width).map(|b| T::from_f64(f(b))).collect()
    }
    fn read<T: steel_runtime::Element>(name: &str, view: &TensorView<'_>) -> Result<Vec<T>> {
        let data = view.data();
        Ok(match view.dtype() {
            Dtype::F32 => decode(data, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
            Dtype::BF16 => decode(data, 2, |b| bf16::from_le_bytes([b[0], b[1]]).to_f64()),
            Dtype::F16 => decode(data, 2, |b| f16::from_le_bytes([b[0], b[1]]).to_f64()),
            Dtype::F64 => decode(data, 8, |b| {
                f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            }),
            other => {
                return Err(ModelError::DType {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }
    Ok(match dtype {
        DType::F64 => Tensor::from_vec(read::<f64>(name, view)?, view.shape())?,
        _ => Tensor::from_vec(read::<f32>(name, view)?, view.shape())?,
    })
}

/// Checks that `path` names a regular file, following links (hub snapshots link to blobs): a
/// directory, FIFO or device (`/dev/zero`) is refused before it is opened, so it cannot hang a load.
fn regular_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(ModelError::File {
            path: path.to_path_buf(),
            msg: "is not a regular file (a model directory holds regular files, or links to them)"
                .into(),
        })
    }
}

/// Whether `name` is a plain file name: not empty, `.` or `..`, and without a path separator or
/// NUL, so joining it to a directory never leaves that directory (what a `weight_map` entry and a
/// checkpoint manifest's names must be).
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && Path::new(name).file_name().is_some_and(|n| n == name)
}

/// The safetensors files of a model directory and, per file, the tensor names it should hold.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        regular_file(&index)?;
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::File { path: index.clone(), msg: e.to_string() })?;
        let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| {
            ModelError::File { path: index.clone(), msg: "no \"weight_map\" object".into() }
        })?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (tensor, f) in map {
            let f = f.as_str().filter(|f| is_plain_name(f)).ok_or_else(|| ModelError::File {
                path: index.clone(),
                msg: format!(
                    "weight_map[{tensor:?}] is {f}: values must be plain file names in the \
                     model directory"
                ),
            })?;
            let p = dir.join(f);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::File {
        path: dir.to_path_buf(),
        msg: "no model.safetensors or model.safetensors.index.json".into(),
    })
}

/// The tensor names of a safetensors header that `deserialize` refused, when the header itself
/// still reads (a bounded parse: the 8-byte length, then that much JSON).
fn header_names(bytes: &[u8]) -> Option<Vec<String>> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(n).ok()?)?;
    let header: Map<String, Value> = serde_json::from_slice(bytes.get(8..end)?).ok()?;
    Some(header.into_iter().map(|(k, _)| k).filter(|k| k != "__metadata__").collect())
}

/// Adds the parameters of one safetensors file (`bytes`, named `path` in messages) to
/// `tensors`, checking each name and shape against `config`.
fn add_tensors(
    config: &SteelConfig,
    expected: &HashMap<String, Vec<usize>>,
    bytes: &[u8],
    path: &Path,
    dtype: DType,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<()> {
    let unexpected = |name: &str| {
        let tied_head = name == "lm_head.weight" && config.tie_word_embeddings;
        !(is_buffer(name) || expected.contains_key(name) || tied_head)
    };
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        // A tensor the model does not have is the likelier cause than the offset of whichever
        // tensor the format check tripped on: name it first.
        match header_names(bytes).and_then(|names| names.into_iter().find(|n| unexpected(n))) {
            Some(name) => ModelError::File {
                path: path.to_path_buf(),
                msg: format!(
                    "holds a tensor {name:?} the model config has no parameter for (and is not \
                     a valid safetensors file: {e})"
                ),
            },
            None => st_err(path, e),
        }
    })?;
    let mut names = st.names();
    names.sort();
    for name in names {
        if is_buffer(name) {
            continue;
        }
        let Some(shape) = expected.get(name) else {
            if !unexpected(name) {
                continue; // a tied head may be stored anyway; the embedding is the head
            }
            return Err(ModelError::Extra { name: name.to_string() });
        };
        let view = st.tensor(name).map_err(|e| st_err(path, e))?;
        if view.shape() != shape.as_slice() {
            return Err(ModelError::Shape {
                name: name.to_string(),
                expected: shape.clone(),
                found: view.shape().to_vec(),
            });
        }
        tensors.insert(name.to_string(), convert(name, &view, dtype)?);
    }
    Ok(())
}

fn check_dtype(dtype: DType) -> Result<()> {
    if matches!(dtype, DType::F32 | DType::F64) {
        Ok(())
    } else {
        Err(ModelError::Input(format!("models load as F32 or F64, not {dtype}")))
    }
}

/// Loads a HF model directory onto `backend` with parameters in `dtype` (F32 or F64).
///
/// `config.json`, the index and every weight file must be regular files (links to regular files
/// are followed, as hub snapshots need); `weight_map` values must be plain file names.
pub fn load_hf_dir(dir: &Path, backend: Arc<dyn Backend>, dtype: DType) -> Result<SteelModel> {
    check_dtype(dtype)?;
    let cpath = dir.join("config.json");
    regular_file(&cpath)?;
    let config = SteelConfig::from_file(&cpath)?;
    let expected: HashMap<String, Vec<usize>> = config.param_shapes().into_iter().collect();
    let mut tensors = HashMap::with_capacity(expected.len());
    for path in weight_files(dir)? {
        regular_file(&path)?;
        let file = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        // SAFETY: the file is only read; a concurrent writer could change the bytes under the
        // map, which a checkpoint directory being loaded does not have.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
        add_tensors(&config, &expected, &mmap, &path, dtype, &mut tensors)?;
    }
    SteelModel::from_tensors(config, backend, tensors)
}

/// Loads a model from a config and the bytes of its safetensors files, already read (and
/// verified) by the caller: a training checkpoint's files, read through its manifest. Each file
/// is `(path for messages, bytes)`.
pub fn load_from_bytes(
    config: SteelConfig,
    files: &[(PathBuf, &[u8])],
    backend: Arc<dyn Backend>,
    dtype: DType,
) -> Result<SteelModel> {
    check_dtype(dtype)?;
    let expected: HashMap<String, Vec<usize>> = config.param_shapes().into_iter().collect();
    let mut tensors = HashMap::with_capacity(expected.len());
    for (path, bytes) in files {
        add_tensors(&config, &expected, bytes, path, dtype, &mut tensors)?;
    }
    SteelModel::from_tensors(config, backend, tensors)
}

/// The dtype tensors are saved in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDType {
    BF16,
    F32,
}

impl SaveDType {
    fn bytes(self) -> usize {
        match self {
            SaveDType::BF16 => 2,
            SaveDType::F32 => 4,
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            SaveDType::BF16 => "bfloat16",
            SaveDType::F32 => "float32",
        }
    }
}

/// Options of `save_hf_dir`.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub dtype: SaveDType,
    /// Largest shard in bytes (HF's default 5 GB).
    pub max_shard_bytes: u64,
    /// A directory holding the reference's modeling files, copied beside the weights.
    pub remote_code: Option<PathBuf>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions { dtype: SaveDType::BF16, max_shard_bytes: 5_000_000_000, remote_code: None }
    }
}

/// A tensor converted to the saved dtype when safetensors asks for its bytes.
struct Saved {
    tensor: Tensor,
    dtype: SaveDType,
}

impl View for &Saved {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            SaveDType::BF16 => Dtype::BF16,
            SaveDType::F32 => Dtype::F32,
        }
    }
    fn shape(&self) -> &[usize] {
        self.tensor.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        // The tensor was downloaded to the CPU when the shards were planned; a float tensor is
        // converted element by element (no f64 copy of a whole 272M-element embedding).
        fn encode<T: Copy>(v: &[T], dtype: SaveDType, f: impl Fn(T) -> f64) -> Vec<u8> {
            match dtype {
                SaveDType::BF16 => {
                    v.iter().flat_map(|&x| bf16::from_f64(f(x)).to_le_bytes()).collect()
                }
                SaveDType::F32 => v.iter().flat_map(|&x| (f(x) as f32).to_le_bytes()).collect(),
            }
        }
        let Ok(g) = self.tensor.cpu_read() else { return Cow::Owned(Vec::new()) };
        Cow::Owned(match &*g {
            CpuStorage::F32(v) if self.dtype == SaveDType::F32 => bytemuck_f32(v),
            CpuStorage::F32(v) => encode(v, self.dtype, |x| x as f64),
            CpuStorage::F64(v) => encode(v, self.dtype, |x| x),
            CpuStorage::BF16(v) => encode(v, self.dtype, |x| x.to_f64()),
            other => encode(&other.to_f64_vec(), self.dtype, |x| x),
        })
    }
    fn data_len(&self) -> usize {
        self.tensor.numel() * self.dtype.bytes()
    }
}

/// The safetensors writer creates files readable by the owner only; a model directory is
/// meant to be shared (0644, as HF writes).
fn readable(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| ModelError::io(path, e))?;
    }
    Ok(())
}

fn bytemuck_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| ModelError::File { path: path.to_path_buf(), msg: e.to_string() })?;
    std::fs::write(path, text + "\n").map_err(|e| ModelError::io(path, e))
}

/// The `generation_config.json` of the reference base model (spec §7.1).
pub fn generation_config(config: &SteelConfig) -> Value {
    let first = |ids: &Option<TokenIds>| match ids {
        Some(TokenIds::One(i)) => Some(*i),
        Some(TokenIds::Many(v)) => v.first().copied(),
        None => None,
    };
    // Qwen's ids unless the config names its own (a model with its own tokenizer).
    let bos = first(&config.bos_token_id).unwrap_or(151643);
    let eos = first(&config.eos_token_id).unwrap_or(151645);
    json!({
        "bos_token_id": bos,
        "pad_token_id": bos,
        "eos_token_id": [eos, bos],
        "do_sample": true,
        "top_p": 0.8,
        "repetition_penalty": 1.1
    })
}

/// Writes `model` as a HF directory: config.json (with `torch_dtype`, `architectures` and the
/// reference's `auto_map`), safetensors shards, generation_config.json, and optionally the
/// reference's modeling files.
pub fn save_hf_dir(model: &SteelModel, dir: &Path, opts: &ExportOptions) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut config = model.config.clone();
    config.torch_dtype = Some(opts.dtype.torch_name().to_string());
    config.architectures.get_or_insert_with(|| vec!["SteelForCausalLM".to_string()]);
    config.auto_map.get_or_insert_with(reference_auto_map);
    config.model_type.get_or_insert_with(|| "steel".to_string());
    config.to_file(&dir.join("config.json"))?;
    write_json(&dir.join("generation_config.json"), &generation_config(&model.config))?;

    // Shards in model order, each at most max_shard_bytes (a larger single tensor gets its own).
    let backend = model.backend();
    let mut shards: Vec<Vec<(String, Saved)>> = vec![Vec::new()];
    let mut current = 0u64;
    for (_, p) in model.params.iter() {
        let bytes = (p.value.numel() * opts.dtype.bytes()) as u64;
        if current > 0 && current + bytes > opts.max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += bytes;
        let host = backend.download(&p.value)?;
        if let Some(last) = shards.last_mut() {
            last.push((p.name.clone(), Saved { tensor: host, dtype: opts.dtype }));
        }
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let path = dir.join(&file);
        for (name, saved) in shard {
            weight_map.insert(name.clone(), Value::String(file.clone()));
            total += (&saved).data_len() as u64;
        }
        let views = shard.iter().map(|(name, s)| (name.clone(), s));
        safetensors::tensor::serialize_to_file(views, Some(meta.clone()), &path)
            .map_err(|e| ModelError::File { path: path.clone(), msg: e.to_string() })?;
        readable(&path)?;
    }
    let index = dir.join("model.safetensors.index.json");
    if n > 1 {
        let mut m = Map::new();
        m.insert("metadata".into(), json!({ "total_size": total }));
        m.insert("weight_map".into(), Value::Object(weight_map.into_iter().collect()));
        write_json(&index, &Value::Object(m))?;
    } else if index.exists() {
        std::fs::remove_file(&index).map_err(|e| ModelError::io(&index, e))?;
    }
    if let Some(src) = &opts.remote_code {
        copy_remote_code(src, dir)?;
    }
    Ok(())
}

/// Copies the reference's modeling files (every `.py` of `src`, which must include
/// `REMOTE_CODE_FILES`) into `dst`.
fn copy_remote_code(src: &Path, dst: &Path) -> Result<()> {
    for f in REMOTE_CODE_FILES {
        if !src.join(f).is_file() {
            return Err(ModelError::File {
                path: src.to_path_buf(),
                msg: format!(
                    "{f} is missing: the remote-code directory must hold {}",
                    REMOTE_CODE_FILES.join(", ")
                ),
            });
        }
    }
    let entries = std::fs::read_dir(src).map_err(|e| ModelError::io(src, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ModelError::io(src, e))?;
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "py") {
            let to = dst.join(entry.file_name());
            std::fs::copy(&path, &to).map_err(|e| ModelError::io(&to, e))?;
        }
    }
    Ok(())
}

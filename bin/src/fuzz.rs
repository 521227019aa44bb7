//! Fuzz targets: every loader of untrusted bytes, driven through the entry point the CLI calls
//! (the bytes are written to a scratch file where that entry point takes a path).
//!
//! A target says whether the input was accepted; an error is the loader doing its job; a panic,
//! a hang or an allocation beyond the fuzzer's memory limit is a finding. The same targets run under
//! libFuzzer (`fuzz/`, `scripts/fuzz.sh`) and, on the stable toolchain, in the replay test
//! (`bin/tests/fuzz_replay.rs`: every input in `fuzz/regressions/` plus a short seeded pass).
//!
//! Each process works in its own scratch directory (`$TMPDIR/steel-fuzz/<pid>/<target>`), so
//! fuzzers and seed writers running side by side never touch each other's files. The one
//! exception is the shard directory a data state names by its absolute path: it lives at a fixed
//! place (`$TMPDIR/steel-fuzz/shared/`), holds deterministic contents and is written by atomic
//! renames, so a seed written by one process means the same in every other.

use crate::eval_mc::{self, Format};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use steel_data::chat::{ChatTemplate, Message};
use steel_data::convert::{convert, Source};
use steel_data::dataset::{DataSpec, Dataset, DatasetOptions};
use steel_data::shard::{Shard, ShardWriter, TokenDType};
use steel_data::tokenizer::Tokenizer;
use steel_runtime::cpu::CpuBackend;
use steel_runtime::DType;
use steel_train::checkpoint::{self, Checkpoint, FileWriter};
use steel_train::Recipe;

/// One fuzz target: its name, the function libFuzzer calls, and its seeds.
pub struct Target {
    pub name: &'static str,
    /// What it loads (for `scripts/fuzz.sh list`).
    pub what: &'static str,
    /// Loads one input; true when the loader accepted it (every seed must be accepted).
    pub run: fn(&[u8]) -> bool,
    /// Seed inputs built from real files: the repository's fixtures and configs, and the samples
    /// and tokenizer in `shared` (`../shared/data`).
    pub seeds: fn(&Seeds) -> Result<Vec<Vec<u8>>>,
}

/// Where seeds come from.
pub struct Seeds {
    /// The repository root.
    pub repo: PathBuf,
    /// `../shared/data`.
    pub shared: PathBuf,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "safetensors",
        what: "a HF model's model.safetensors (steel-eval/generate --model, init_from)",
        run: safetensors,
        seeds: seeds_safetensors,
    },
    Target {
        name: "safetensors_index",
        what: "a HF model's model.safetensors.index.json",
        run: safetensors_index,
        seeds: seeds_index,
    },
    Target {
        name: "shard",
        what: "a LITPKDS token shard (steel-data inspect, the training dataset)",
        run: shard,
        seeds: seeds_shard,
    },
    Target {
        name: "data_state",
        what: "a checkpoint's data.safetensors (the data iterator's state, --resume)",
        run: data_state,
        seeds: seeds_data_state,
    },
    Target {
        name: "manifest",
        what: "a checkpoint's manifest.json (--resume, steel-export, steel-eval on a checkpoint)",
        run: manifest,
        seeds: seeds_manifest,
    },
    Target { name: "config", what: "a model config.json", run: config, seeds: seeds_config },
    Target {
        name: "recipe",
        what: "a training recipe (steel-train --config, --dry-run)",
        run: recipe,
        seeds: seeds_recipe,
    },
    Target {
        name: "tokenizer",
        what: "a tokenizer.json (--tokenizer)",
        run: tokenizer,
        seeds: seeds_tokenizer,
    },
    Target {
        name: "tokenizer_config",
        what: "a tokenizer_config.json's chat template (steel-chat, SFT)",
        run: tokenizer_config,
        seeds: seeds_tokenizer_config,
    },
    Target {
        name: "convert_json",
        what: "steel-data convert of the JSON sources (first byte: the source)",
        run: convert_json,
        seeds: seeds_convert_json,
    },
    Target {
        name: "convert_parquet",
        what: "steel-data convert of the Parquet sources (first byte: zhihu or starcode)",
        run: convert_parquet,
        seeds: seeds_convert_parquet,
    },
    Target {
        name: "mc_csv",
        what: "a C-Eval or CMMLU CSV (steel-eval mc; first byte: the format)",
        run: mc_csv,
        seeds: seeds_mc_csv,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// This process's scratch directory for `target` (created).
fn scratch(target: &str) -> PathBuf {
    let d =
        std::env::temp_dir().join("steel-fuzz").join(std::process::id().to_string()).join(target);
    let _ = std::fs::create_dir_all(&d);
    d
}

/// Removes this process's scratch directories (the shared shard directory stays).
pub fn remove_scratch() {
    let d = std::env::temp_dir().join("steel-fuzz").join(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(d);
}

/// Writes `data` to `dir/name` and returns the path (a failed write rejects the input).
fn put(dir: &Path, name: &str, data: &[u8]) -> Option<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, data).ok().map(|_| p)
}

/// The small model the weight targets load (a fixture of the model tests).
const CONFIG: &str = include_str!("../../tests/fixtures/model/softmoe_senet/config.json");
const WEIGHTS: &[u8] = include_bytes!("../../tests/fixtures/model/softmoe_senet/model.safetensors");

fn cpu() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new())
}

fn safetensors(data: &[u8]) -> bool {
    let dir = scratch("safetensors");
    if put(&dir, "config.json", CONFIG.as_bytes()).is_none() {
        return false;
    }
    let Some(path) = put(&dir, "model.safetensors", data) else { return false };
    let from_file = steel_model::load_hf_dir(&dir, cpu(), DType::F32).is_ok();
    // The checkpoint path parses the same bytes from memory.
    let from_bytes = steel_model::SteelConfig::from_json(CONFIG)
        .is_ok_and(|c| steel_model::load_from_bytes(c, &[(path, data)], cpu(), DType::F32).is_ok());
    assert_eq!(from_file, from_bytes, "the two loaders disagree");
    from_file
}

fn seeds_safetensors(_: &Seeds) -> Result<Vec<Vec<u8>>> {
    Ok(vec![WEIGHTS.to_vec()])
}

fn safetensors_index(data: &[u8]) -> bool {
    let dir = scratch("safetensors_index");
    for (name, bytes) in [("config.json", CONFIG.as_bytes()), ("model.safetensors", WEIGHTS)] {
        if !dir.join(name).is_file() && put(&dir, name, bytes).is_none() {
            return false;
        }
    }
    put(&dir, "model.safetensors.index.json", data).is_some()
        && steel_model::load_hf_dir(&dir, cpu(), DType::F32).is_ok()
}

fn seeds_index(_: &Seeds) -> Result<Vec<Vec<u8>>> {
    let n = u64::from_le_bytes(WEIGHTS[..8].try_into()?) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&WEIGHTS[8..8 + n])?;
    let map: serde_json::Map<String, Value> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .map(|k| (k.clone(), Value::from("model.safetensors")))
        .collect();
    Ok(vec![serde_json::to_vec_pretty(
        &json!({"metadata": {"total_size": WEIGHTS.len()}, "weight_map": map}),
    )?])
}

/// Reads what the CLI reads of a shard: its header, blocks of 8 tokens, the last token, and
/// the dataset built over its directory.
fn shard(data: &[u8]) -> bool {
    let dir = scratch("shard").join("shards");
    let _ = std::fs::create_dir_all(&dir);
    let Some(path) = put(&dir, "train-0.bin", data) else { return false };
    let Ok(s) = Shard::open(&path) else { return false };
    let mut ok = true;
    for b in 0..4 {
        ok &= s.tokens(b * 8, 8).is_ok() || (b + 1) * 8 > s.len();
    }
    ok &= s.tokens(s.len().saturating_sub(1), 1).is_ok();
    let _ = s.tokens(s.len(), 1);
    let opts = DatasetOptions { block_size: 8, seed: 1, shuffle: true };
    match Dataset::open(&[DataSpec { dir, weight: 1.0 }], opts, 0, 1) {
        Ok(mut ds) => (0..3).all(|_| ds.next_block().is_ok()) && ok,
        Err(_) => false,
    }
}

/// A shard of `n` ids (`i * 37 % vocab`) in `dtype` with `chunk` tokens per file, under `dir`.
fn write_shard(dir: &Path, dtype: TokenDType, chunk: usize, n: u32, vocab: u32) -> Result<()> {
    let mut w = ShardWriter::new(dir, "train", chunk, dtype, 0)?;
    let ids: Vec<u32> = (0..n).map(|i| i * 37 % vocab).collect();
    w.add(&ids)?;
    w.finish()?;
    Ok(())
}

fn seeds_shard(_: &Seeds) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for (i, (dtype, chunk, vocab)) in
        [(TokenDType::U16, 64, 60_000), (TokenDType::I32, 40, 151_646)].into_iter().enumerate()
    {
        let dir = scratch("shard").join(format!("seed-{i}"));
        let _ = std::fs::remove_dir_all(&dir);
        write_shard(&dir, dtype, chunk, chunk as u32, vocab)?;
        for e in std::fs::read_dir(&dir)? {
            out.push(std::fs::read(e?.path())?);
        }
    }
    Ok(out)
}

/// The shard directory a data state refers to: at a fixed path, with deterministic contents,
/// each file put in place by a rename (so another process never sees a partial one).
fn state_shards() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join("steel-fuzz/shared/data_state");
        let fresh = scratch("data_state").join("shards");
        let _ = std::fs::remove_dir_all(&fresh);
        write_shard(&fresh, TokenDType::U16, 48, 144, 1000).ok()?;
        std::fs::create_dir_all(&dir).ok()?;
        for e in std::fs::read_dir(&fresh).ok()? {
            let e = e.ok()?;
            let to = dir.join(e.file_name());
            let same = std::fs::read(&to).ok() == std::fs::read(e.path()).ok();
            if !same {
                std::fs::rename(e.path(), &to).ok()?;
            }
        }
        Some(dir)
    })
    .as_ref()
}

fn data_state(data: &[u8]) -> bool {
    if state_shards().is_none() {
        return false;
    }
    let path = scratch("data_state").join("data.safetensors");
    match Dataset::restore_bytes(data, &path, 0, 1) {
        Ok(mut ds) => (0..3).all(|_| ds.next_block().is_ok()),
        Err(_) => false,
    }
}

fn seeds_data_state(_: &Seeds) -> Result<Vec<Vec<u8>>> {
    let dir = state_shards().context("making the data state's shards")?;
    let mut out = Vec::new();
    for (shuffle, taken) in [(true, 0), (true, 5), (false, 2)] {
        let opts = DatasetOptions { block_size: 8, seed: 7, shuffle };
        let spec = [DataSpec { dir: dir.clone(), weight: 1.0 }];
        let mut ds = Dataset::open(&spec, opts, 0, 1)?;
        for _ in 0..taken {
            ds.next_block()?;
        }
        let p = scratch("data_state").join("seed.safetensors");
        ds.save(&p)?;
        out.push(std::fs::read(&p)?);
    }
    Ok(out)
}

/// The checkpoint whose manifest the target replaces (its files are small and deterministic).
fn manifest_checkpoint() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = scratch("manifest").join("checkpoints");
        let text = |s: &'static str| {
            move |p: &Path| -> steel_train::Result<()> {
                std::fs::write(p, s).map_err(|e| steel_train::TrainError::Invalid(e.to_string()))
            }
        };
        let (a, b, c, d, e) = (
            text("{\"format\": \"steel-trainer-v1\", \"tokens\": 64}"),
            text(CONFIG),
            text("weights"),
            text("moments"),
            text("state"),
        );
        let files: [(&str, FileWriter<'_>); 5] = [
            ("trainer.json", &a),
            ("config.json", &b),
            ("model.safetensors", &c),
            ("optimizer.safetensors", &d),
            ("data.safetensors", &e),
        ];
        checkpoint::write_checkpoint(&root, 1, &files, json!({"step": 1})).ok()
    })
    .as_ref()
}

fn manifest(data: &[u8]) -> bool {
    let Some(dir) = manifest_checkpoint() else { return false };
    if put(dir, "manifest.json", data).is_none() {
        return false;
    }
    let read = Checkpoint::open(dir)
        .is_ok_and(|ck| ck.manifest.files.iter().all(|f| ck.read(&f.name).is_ok()));
    let found = checkpoint::latest_valid(dir.parent().unwrap_or(dir))
        .is_ok_and(|(found, _)| found.is_some());
    assert_eq!(read, found, "verify and latest_valid disagree");
    read
}

fn seeds_manifest(_: &Seeds) -> Result<Vec<Vec<u8>>> {
    let dir = manifest_checkpoint().context("writing the manifest target's checkpoint")?;
    // The target overwrites the manifest: the seed is the one the checkpoint was written with.
    let text = std::fs::read(dir.join("manifest.json"))?;
    checkpoint::parse_manifest(std::str::from_utf8(&text)?)
        .map_err(|e| anyhow::anyhow!("the seed manifest does not parse: {e}"))?;
    Ok(vec![text])
}

fn config(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let Ok(c) = steel_model::SteelConfig::from_json(text) else { return false };
    assert_eq!(c.num_params() as u128, c.param_count_u128(), "a validated size fits");
    let _ = c.training_flops_per_token(2048);
    true
}

fn read_all(paths: impl IntoIterator<Item = PathBuf>) -> Result<Vec<Vec<u8>>> {
    paths.into_iter().map(|p| std::fs::read(&p).with_context(|| p.display().to_string())).collect()
}

fn seeds_config(s: &Seeds) -> Result<Vec<Vec<u8>>> {
    let mut paths: Vec<PathBuf> = ["tiny", "bench-h512", "steel-1.1b"]
        .iter()
        .map(|c| s.repo.join("configs").join(c).join("config.json"))
        .collect();
    for m in ["raw_raw", "raw_senet", "softmoe_raw", "softmoe_senet"] {
        paths.push(s.repo.join("tests/fixtures/model").join(m).join("config.json"));
    }
    read_all(paths)
}

/// The folder a fuzzed recipe is written to: a copy of the repository's `configs/` model
/// configs, so the shipped recipes' relative `model.config` paths resolve as they do in a clone.
fn recipe_dir() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("recipe").join("configs");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for c in ["tiny", "bench-h512", "steel-1.1b"] {
            std::fs::create_dir_all(dir.join(c)).ok()?;
            std::fs::copy(repo.join(c).join("config.json"), dir.join(c).join("config.json"))
                .ok()?;
        }
        Some(dir)
    })
    .as_ref()
}

fn recipe(data: &[u8]) -> bool {
    let Some(dir) = recipe_dir() else { return false };
    let Some(path) = put(dir, "recipe.toml", data) else { return false };
    let Ok(r) = Recipe::load(&path, &[]) else { return false };
    r.validate().is_ok() && steel_train::dry_run(&r).is_ok()
}

fn seeds_recipe(s: &Seeds) -> Result<Vec<Vec<u8>>> {
    read_all(
        ["demo.toml", "sft-steel.toml", "steel-1.1b.toml"]
            .iter()
            .map(|f| s.repo.join("configs").join(f)),
    )
}

fn tokenizer(data: &[u8]) -> bool {
    let dir = scratch("tokenizer");
    let Some(path) = put(&dir, "tokenizer.json", data) else { return false };
    let Ok(t) = Tokenizer::load(&path) else { return false };
    let _ = (t.vocab_size(), t.im_end_id(), t.pad_id());
    t.encode("你好，Steel! <|im_end|> 123 ").is_ok_and(|ids| t.decode(&ids, false).is_ok())
}

/// A small byte-level BPE trained on a corpus sample's first lines (its tokenizer.json and
/// tokenizer_config.json).
fn small_tokenizer(s: &Seeds) -> Result<(Vec<u8>, Vec<u8>)> {
    let sample = s.shared.join("corpus-samples/firefly/firefly-train-1.1M_sample.jsonl");
    let text = std::fs::read_to_string(&sample).with_context(|| sample.display().to_string())?;
    let lines: Vec<&str> = text.lines().take(40).collect();
    let vocab = steel_data::bpe::train_bpe(&lines, 400)?;
    let dir = scratch("tokenizer").join("seed");
    vocab.save(&dir)?;
    Ok((
        std::fs::read(dir.join("tokenizer.json"))?,
        std::fs::read(dir.join("tokenizer_config.json"))?,
    ))
}

fn seeds_tokenizer(s: &Seeds) -> Result<Vec<Vec<u8>>> {
    Ok(vec![small_tokenizer(s)?.0])
}

fn tokenizer_config(data: &[u8]) -> bool {
    let dir = scratch("tokenizer_config");
    let Some(path) = put(&dir, "tokenizer_config.json", data) else { return false };
    let Ok(Some(t)) = ChatTemplate::from_tokenizer_config(&path) else { return false };
    let msgs = [Message::new("system", "你是助手"), Message::new("user", "你好")];
    t.render(&msgs, true).is_ok()
}

fn seeds_tokenizer_config(s: &Seeds) -> Result<Vec<Vec<u8>>> {
    Ok(vec![
        std::fs::read(s.shared.join("qwen-tokenizer/tokenizer_config.json"))?,
        small_tokenizer(s)?.1,
    ])
}

/// The sources of one layout, in `Source::ALL`'s order: the first input byte selects one.
fn sources(parquet: bool) -> Vec<Source> {
    Source::ALL.into_iter().filter(|s| s.reads_parquet() == parquet).collect()
}

/// Converts `rest` as `source`'s input file named `name`; accepted when it wrote a record.
fn convert_one(target: &str, source: Source, name: &str, rest: &[u8]) -> bool {
    let dir = scratch(target);
    let Some(input) = put(&dir, name, rest) else { return false };
    convert(source, &input, &dir.join("out.jsonl"), |_| {}).is_ok_and(|s| s.written > 0)
}

fn convert_json(data: &[u8]) -> bool {
    let Some((&sel, rest)) = data.split_first() else { return false };
    let json = sources(false);
    let source = json[sel as usize % json.len()];
    convert_one("convert_json", source, "input.jsonl", rest)
}

/// The first records of a sample file: its first lines, or (a JSON array) its first elements.
fn head_records(path: &Path, n: usize) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    if text.trim_start().starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(&text)?;
        return Ok(serde_json::to_vec(&v.into_iter().take(n).collect::<Vec<_>>())?);
    }
    Ok(text.lines().take(n).flat_map(|l| l.bytes().chain([b'\n'])).collect())
}

fn seeds_convert_json(s: &Seeds) -> Result<Vec<Vec<u8>>> {
    let c = s.shared.join("corpus-samples");
    let samples = [
        (0u8, c.join("baidu_baike/563w_baidubaike_sample.json")),
        (1, c.join("baidu_QA/baike_qa_train_sample.json")),
        (2, c.join("BELLE/train_2M_CN_sample.json")),
        (3, c.join("BELLE/train_3.5M_CN_sample.json")),
        (4, c.join("firefly/firefly-train-1.1M_sample.jsonl")),
        (6, c.join("wiki_cn/wikipedia-cn-20230720-filtered_sample.json")),
        (7, c.join("wanjuan/part-010205-a894b46e_sample.jsonl")),
        (8, c.join("sky/2021-31_zh_head_0000_sample.jsonl")),
    ];
    samples
        .iter()
        .map(|(sel, p)| {
            let mut v = vec![*sel];
            v.extend(head_records(p, 3)?);
            Ok(v)
        })
        .collect()
}

fn convert_parquet(data: &[u8]) -> bool {
    let Some((&sel, rest)) = data.split_first() else { return false };
    let parquet = sources(true);
    let source = parquet[sel as usize % parquet.len()];
    convert_one("convert_parquet", source, "input.parquet", rest)
}

/// A small Parquet file of string columns `names` holding `rows` (a `None` is a null).
pub fn write_parquet(path: &Path, names: &[&str], rows: &[Vec<Option<&str>>]) -> Result<()> {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let fields: String = names
        .iter()
        .map(|n| format!("OPTIONAL BYTE_ARRAY {n} (UTF8);"))
        .collect::<Vec<_>>()
        .join(" ");
    let schema = Arc::new(parquet::schema::parser::parse_message_type(&format!(
        "message schema {{ {fields} }}"
    ))?);
    let file = std::fs::File::create(path)?;
    let mut w = SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::default()))?;
    let mut group = w.next_row_group()?;
    for c in 0..names.len() {
        let mut col = group.next_column()?.context("a column per name")?;
        let values: Vec<ByteArray> = rows
            .iter()
            .filter_map(|r| r[c])
            .map(|s| ByteArray::from(s.as_bytes().to_vec()))
            .collect();
        let defs: Vec<i16> = rows.iter().map(|r| i16::from(r[c].is_some())).collect();
        col.typed::<ByteArrayType>().write_batch(&values, Some(&defs), None)?;
        col.close()?;
    }
    group.close()?;
    w.close()?;
    Ok(())
}

fn seeds_convert_parquet(_: &Seeds) -> Result<Vec<Vec<u8>>> {
    let dir = scratch("convert_parquet").join("seed");
    std::fs::create_dir_all(&dir)?;
    let zhihu = dir.join("zhihu.parquet");
    write_parquet(
        &zhihu,
        &["INSTRUCTION", "RESPONSE", "METADATA"],
        &[
            vec![
                Some("为什么天空是蓝色的？"),
                Some("因为瑞利散射使短波长的蓝光散射得更多。"),
                Some("{\"upvotes\": \"赞同 1.2 万\"}"),
            ],
            vec![Some("如何学习编程？"), None, Some("{\"upvotes\": \"赞同 35\"}")],
            vec![Some("问题"), Some("回答内容足够长，可以通过质量门槛的检查。"), None],
        ],
    )?;
    let code = dir.join("starcode.parquet");
    write_parquet(
        &code,
        &["content"],
        &[
            vec![Some("int main() {\n  return 0;\n}\n")],
            vec![None],
            vec![Some("def f(x):\n    return x * 2\n")],
        ],
    )?;
    Ok(vec![
        [vec![0u8], std::fs::read(&zhihu)?].concat(),
        [vec![1u8], std::fs::read(&code)?].concat(),
    ])
}

fn mc_csv(data: &[u8]) -> bool {
    let Some((&sel, rest)) = data.split_first() else { return false };
    let format = if sel % 2 == 0 { Format::Ceval } else { Format::Cmmlu };
    let dir = scratch("mc_csv");
    let Some(path) = put(&dir, "subject_dev.csv", rest) else { return false };
    let Ok(qs) = eval_mc::read_questions(&path, format) else { return false };
    for q in qs.iter().take(2) {
        let _ = (eval_mc::ceval_example(q, true), eval_mc::cmmlu_example(q, true));
        let _ = eval_mc::generation_user_message(q, format);
    }
    !qs.is_empty()
}

fn seeds_mc_csv(s: &Seeds) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for (sel, sub) in [(0u8, "ceval/dev"), (0, "ceval/val"), (1, "cmmlu/dev"), (1, "cmmlu/test")] {
        let dir = s.repo.join("tests/fixtures").join(sub);
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        if let Some(f) = files.first() {
            out.push([vec![sel], std::fs::read(f)?].concat());
        }
    }
    Ok(out)
}

/// Writes every target's seeds to `dir/<target>/seed-N` (the corpus `scripts/fuzz.sh` starts
/// from); returns the count per target.
pub fn write_seeds(seeds: &Seeds, dir: &Path) -> Result<Vec<(&'static str, usize)>> {
    let mut counts = Vec::new();
    for t in TARGETS {
        let d = dir.join(t.name);
        std::fs::create_dir_all(&d)?;
        let list = (t.seeds)(seeds).with_context(|| format!("seeds of {}", t.name))?;
        for (i, s) in list.iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i}")), s)?;
        }
        counts.push((t.name, list.len()));
    }
    Ok(counts)
}

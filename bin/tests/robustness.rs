//! Bad input gets a clear error (exit 2) and never a panic, a hang or a huge allocation (issue
//! "Nothing lost, nothing followed, nothing hung", bounded-resources items).

use std::path::PathBuf;
use std::process::Command;

/// A one-step CPU run of the small demo under `dir/run`: its directory.
fn one_step_run(dir: &std::path::Path) -> PathBuf {
    let run = dir.join("run");
    let r = Command::new(env!("CARGO_BIN_EXE_steel-train"))
        .args(["--out", run.to_str().unwrap(), "--max-steps", "1", "--device", "cpu"])
        .args(["--set", "train.eval_every=0", "--set", "data.seq_len=16"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    run
}

/// `steel-export` of `run`'s step-1 checkpoint to `out` in `dtype`: `out`.
fn export(run: &std::path::Path, out: &std::path::Path, dtype: &str) -> PathBuf {
    let r = Command::new(env!("CARGO_BIN_EXE_steel-export"))
        .args(["--checkpoint", run.join("checkpoints/step-000001").to_str().unwrap()])
        .args(["--out", out.to_str().unwrap(), "--dtype", dtype])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    out.to_path_buf()
}

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("steel-robust-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A LITPKDS header whose chunk size times the item size wraps a u64 to exactly the file's
/// length used to pass validation and then index 2^62 tokens past a 24-byte map.
#[test]
fn a_shard_header_that_overflows_is_rejected() {
    let dir = out_dir("shard");
    for (code, chunk) in
        [(4u8, 1u64 << 62), (5, 1 << 61), (1, u64::MAX - 23), (3, u64::MAX / 2 + 1)]
    {
        let mut h = Vec::new();
        h.extend_from_slice(b"LITPKDS");
        h.extend_from_slice(&1u64.to_le_bytes());
        h.push(code);
        h.extend_from_slice(&chunk.to_le_bytes());
        let f = dir.join(format!("bad-{code}.bin"));
        std::fs::write(&f, &h).unwrap();
        let r = Command::new(env!("CARGO_BIN_EXE_steel-data"))
            .args(["inspect", f.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "dtype {code}, chunk {chunk}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains(f.to_str().unwrap()), "names the file: {err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A model whose weights hold a NaN is refused when loaded (exit 2, the tensor named) by every
/// tool that loads one, instead of printing `"loss": null` or generating garbage.
#[test]
fn non_finite_weights_are_refused_when_loaded() {
    let dir = out_dir("nan-weights");
    let run = one_step_run(&dir);
    let hf = export(&run, &dir.join("hf"), "f32");
    // Put a NaN into model.norm.weight[3] (safetensors: u64 header length, JSON, data).
    let path = hf.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header["model.norm.weight"]["data_offsets"][0].as_u64().unwrap() as usize;
    let at = 8 + n + start + 3 * 4;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let m = hf.to_str().unwrap();
    for (exe, args) in [
        (env!("CARGO_BIN_EXE_steel-eval"), vec!["ppl", "--model", m, "--ids", "5,6,7,8"]),
        (
            env!("CARGO_BIN_EXE_steel-generate"),
            vec!["--model", m, "--prompt-ids", "5,6", "--max-new-tokens", "2"],
        ),
    ] {
        let r = Command::new(exe).args(&args).args(["--device", "cpu"]).output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("model.norm.weight") && err.contains("NaN"), "{err}");
        assert!(!String::from_utf8_lossy(&r.stdout).contains("null"));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A run or a model larger than the machine is refused before it is allocated (exit 2, the
/// estimate and the available memory in the message); absurd config sizes are config errors.
#[test]
fn runs_and_models_beyond_the_machine_are_refused_up_front() {
    let dir = out_dir("huge");
    let out = dir.join("run");
    let o = out.to_str().unwrap();
    for set in ["train.micro_batch=1000000000", "train.ranks=1000000"] {
        let t0 = std::time::Instant::now();
        let r = Command::new(env!("CARGO_BIN_EXE_steel-train"))
            .args(["--out", o, "--device", "cpu", "--max-steps", "1", "--set", set])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{set}: {err}");
        assert!(err.contains("available") && err.contains("--no-memory-check"), "{set}: {err}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "{set}: refused late");
    }
    // A 100B-parameter model (under the 2^40 sanity bound): steel-init refuses to build it.
    let cfg = dir.join("big.json");
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/steel-1.1b/config.json"),
    )
    .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["hidden_size"] = 16384.into();
    v["num_attention_heads"] = 128.into();
    v["num_key_value_heads"] = 8.into();
    v["num_hidden_layers"] = 96.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let r = Command::new(env!("CARGO_BIN_EXE_steel-init"))
        .args(["--config", cfg.to_str().unwrap(), "--out", dir.join("init").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("available"), "{err}");
    // 10^9 layers: a config error at once, not 10 GB of parameter names.
    v["num_hidden_layers"] = 1_000_000_000u64.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let r = Command::new(env!("CARGO_BIN_EXE_steel-init"))
        .args(["--config", cfg.to_str().unwrap(), "--dry-run"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("num_hidden_layers"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `steel-data tokenize` into a directory that already holds shards is refused (old and new
/// shards would be mixed into training); `--overwrite` removes the old ones first.
#[test]
fn tokenizing_over_old_shards_is_refused_unless_overwrite() {
    let dir = out_dir("retokenize");
    let tok =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/qwen-tokenizer");
    let input = dir.join("docs.jsonl");
    let docs: String = (0..40)
        .map(|i| {
            format!(
                "{{\"text\": \"document {i}: the river town woke slowly, 河流小镇慢慢醒来。\"}}\n"
            )
        })
        .collect();
    std::fs::write(&input, docs).unwrap();
    let shards = dir.join("shards");
    let tokenize = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_steel-data"))
            .args(["tokenize", "--tokenizer", tok.to_str().unwrap()])
            .args(["--input", input.to_str().unwrap(), "--output", shards.to_str().unwrap()])
            .args(["--block-size", "17", "--blocks-per-shard", "8"])
            .args(extra)
            .output()
            .unwrap()
    };
    let count = || existing(&shards);
    let r = tokenize(&[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let first = count();
    assert!(first.len() >= 2, "{first:?}");
    // A stray old shard that a new run would not write (another prefix).
    std::fs::copy(&first[0], shards.join("old_0000000099.bin")).unwrap();
    let r = tokenize(&[]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("--overwrite"), "{err}");
    assert_eq!(count().len(), first.len() + 1, "nothing removed without --overwrite");
    let r = tokenize(&["--overwrite"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(count(), first, "exactly the new shards, none of the old ones");
    let _ = std::fs::remove_dir_all(dir);
}

fn existing(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    v.sort();
    v
}

/// Messages name what is wrong: a value from a flag is blamed on the flag, not the recipe; a
/// corrupted checkpoint file of the right size is a hash mismatch, not a size mismatch.
#[test]
fn messages_name_the_real_culprit() {
    let dir = out_dir("messages");
    let run = dir.join("run");
    let r = Command::new(env!("CARGO_BIN_EXE_steel-train"))
        .args(["--out", run.to_str().unwrap(), "--peak-tflops", "nan"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("train.peak_tflops=nan") && !err.contains("demo.toml"), "{err}");
    let r = Command::new(env!("CARGO_BIN_EXE_steel-train"))
        .args(["--out", run.to_str().unwrap(), "--max-steps", "1", "--device", "cpu"])
        .args(["--set", "train.eval_every=0", "--set", "data.seq_len=16"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let ck = run.join("checkpoints/step-000001");
    let f = ck.join("optimizer.safetensors");
    let mut b = std::fs::read(&f).unwrap();
    let n = b.len();
    b[n - 5] ^= 1;
    std::fs::write(&f, b).unwrap();
    let r = Command::new(env!("CARGO_BIN_EXE_steel-export"))
        .args(["--checkpoint", ck.to_str().unwrap(), "--out", dir.join("hf").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("optimizer.safetensors") && err.contains("hash differs"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Generating past the model's `max_position_embeddings` is warned about before it starts.
#[test]
fn generation_past_the_trained_positions_is_warned_about() {
    let dir = out_dir("positions");
    let run = one_step_run(&dir);
    let hf = export(&run, &dir.join("hf"), "bf16");
    let cfg = hf.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["max_position_embeddings"] = 8.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let gen = |n: &str| {
        Command::new(env!("CARGO_BIN_EXE_steel-generate"))
            .args(["--model", hf.to_str().unwrap(), "--prompt-ids", "5,6,7"])
            .args(["--max-new-tokens", n, "--device", "cpu"])
            .output()
            .unwrap()
    };
    let r = gen("6");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("max_position_embeddings (8)"), "{err}");
    let r = gen("5");
    assert!(!String::from_utf8_lossy(&r.stderr).contains("max_position_embeddings"));
    let _ = std::fs::remove_dir_all(dir);
}

/// A wrongly typed value in a recipe file is named by its key (serde's message alone does not).
#[test]
fn a_mistyped_recipe_value_is_named_by_its_key() {
    let dir = out_dir("recipe");
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/demo.toml");
    let text = std::fs::read_to_string(demo).unwrap();
    for (key, bad) in
        [("val", "val = [{ path = \"x\" }]"), ("micro_batch", "micro_batch = \"eight\"")]
    {
        let edited = match key {
            "val" => text.replace("[data]\n", &format!("[data]\n{bad}\n")),
            _ => text.replace("micro_batch = 8", bad),
        };
        assert_ne!(edited, text);
        let f = dir.join(format!("{key}.toml"));
        std::fs::write(&f, edited).unwrap();
        let r = Command::new(env!("CARGO_BIN_EXE_steel-train"))
            .args(["--config", f.to_str().unwrap(), "--dry-run"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{err}");
        // The dotted key where it can be told, and always the line with its snippet.
        if key == "val" {
            assert!(err.contains("data.val"), "{err}");
        }
        assert!(err.contains("line") && err.contains(bad), "{key}: {err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

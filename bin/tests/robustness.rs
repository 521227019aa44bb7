//! Bad input gets a clear error (exit 2) and never a panic, a hang or a huge allocation (issue
//! "Nothing lost, nothing followed, nothing hung", bounded-resources items).

use std::path::PathBuf;
use std::process::Command;

mod common;

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

/// Runs `cmd`, killing it after `secs` seconds (a hang fails the test instead of stalling it).
fn output_within(cmd: &mut Command, secs: u64) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() > secs {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("hung for {secs} s: {}", String::from_utf8_lossy(&o.stderr));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// Edits the manifest of checkpoint `ck` with `f`.
fn edit_manifest(ck: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = ck.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(&p, serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

/// The manifest record of `name` in `m`.
fn record<'a>(m: &'a mut serde_json::Value, name: &str) -> &'a mut serde_json::Value {
    m["files"].as_array_mut().unwrap().iter_mut().find(|f| f["name"] == name).unwrap()
}

/// Checkpoint verification reads only plain-named regular files of the checkpoint, bounded by
/// the manifest's sizes, and every file a checkpoint needs must be listed: `..` and absolute
/// names, links to `/dev/zero` or to another checkpoint's file, and manifests missing entries
/// are refused (exit 2, no hang) by `steel-export`, `steel-eval` and `steel-train --resume`.
#[test]
fn checkpoint_files_are_plain_regular_and_listed() {
    let dir = out_dir("ck-paths");
    let run = one_step_run(&dir);
    let good = run.join("checkpoints/step-000001");
    let other = dir.join("other-model.safetensors");
    std::fs::copy(good.join("model.safetensors"), &other).unwrap();
    let other_len = std::fs::metadata(&other).unwrap().len();
    let other_hash = {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(good.join("manifest.json")).unwrap())
                .unwrap();
        m["files"].as_array().unwrap().iter().find(|f| f["name"] == "model.safetensors").unwrap()
            ["blake3"]
            .clone()
    };
    type Damage = Box<dyn Fn(&std::path::Path)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "dotdot",
            Box::new(|ck| {
                edit_manifest(ck, |m| record(m, "trainer.json")["name"] = "../trainer.json".into())
            }),
            "not a plain file name",
        ),
        (
            "absolute",
            Box::new(|ck| {
                edit_manifest(ck, |m| record(m, "recipe.toml")["name"] = "/dev/zero".into())
            }),
            "not a plain file name",
        ),
        (
            "link-to-dev-zero",
            Box::new(|ck| {
                std::fs::remove_file(ck.join("model.safetensors")).unwrap();
                std::os::unix::fs::symlink("/dev/zero", ck.join("model.safetensors")).unwrap();
            }),
            "symbolic link",
        ),
        (
            "link-to-another-file",
            Box::new(move |ck| {
                // The link's target has the manifest's size and hash: only the link is wrong.
                std::fs::remove_file(ck.join("model.safetensors")).unwrap();
                std::os::unix::fs::symlink(&other, ck.join("model.safetensors")).unwrap();
                edit_manifest(ck, |m| {
                    let r = record(m, "model.safetensors");
                    r["bytes"] = other_len.into();
                    r["blake3"] = other_hash.clone();
                })
            }),
            "symbolic link",
        ),
        (
            "trainer-state-unlisted",
            Box::new(|ck| {
                edit_manifest(ck, |m| {
                    m["files"].as_array_mut().unwrap().retain(|f| f["name"] != "trainer.json")
                })
            }),
            "does not list trainer.json",
        ),
        (
            "data-state-unlisted",
            Box::new(|ck| {
                edit_manifest(ck, |m| {
                    m["files"].as_array_mut().unwrap().retain(|f| f["name"] != "data.safetensors")
                })
            }),
            "lists no data state",
        ),
        (
            "fifo",
            Box::new(|ck| {
                std::fs::remove_file(ck.join("config.json")).unwrap();
                let c = std::ffi::CString::new(ck.join("config.json").to_str().unwrap()).unwrap();
                // SAFETY: mkfifo reads a NUL-terminated path.
                assert_eq!(unsafe { libc_mkfifo(c.as_ptr(), 0o644) }, 0);
            }),
            "not a regular file (a FIFO)",
        ),
    ];
    for (name, damage, expect) in &cases {
        let case = dir.join(name);
        copy_dir(&run, &case);
        let ck = case.join("checkpoints/step-000001");
        damage(&ck);
        let export = output_within(
            Command::new(env!("CARGO_BIN_EXE_steel-export"))
                .args(["--checkpoint", ck.to_str().unwrap()])
                .args(["--out", case.join("export").to_str().unwrap()]),
            60,
        );
        let eval = output_within(
            Command::new(env!("CARGO_BIN_EXE_steel-eval")).args([
                "ppl",
                "--model",
                ck.to_str().unwrap(),
                "--ids",
                "1,2,3,4",
            ]),
            60,
        );
        let resume = output_within(
            Command::new(env!("CARGO_BIN_EXE_steel-train"))
                .args(["--out", case.to_str().unwrap(), "--resume", "auto", "--max-steps", "2"])
                .args(["--device", "cpu", "--set", "train.eval_every=0"])
                .args(["--set", "data.seq_len=16"]),
            60,
        );
        for (tool, o) in [("steel-export", &export), ("steel-eval", &eval), ("resume", &resume)] {
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{name}: {tool}: {err}");
            assert!(err.contains(expect), "{name}: {tool} says {expect:?}: {err}");
            assert!(!err.contains("panicked"), "{name}: {tool}: {err}");
        }
        assert!(!case.join("export").exists(), "{name}: nothing exported");
    }
    // A checkpoint directory that is itself a link (moved elsewhere by a user) stays fine.
    let moved = dir.join("moved");
    copy_dir(&good, &moved);
    let link = dir.join("link-to-moved");
    std::os::unix::fs::symlink(&moved, &link).unwrap();
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_steel-export"))
            .args(["--checkpoint", link.to_str().unwrap()])
            .args(["--out", dir.join("export-of-link").to_str().unwrap()]),
        60,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(dir);
}

extern "C" {
    #[link_name = "mkfifo"]
    fn libc_mkfifo(path: *const std::ffi::c_char, mode: u32) -> i32;
}

/// In a HF model directory, `weight_map` entries are plain names, and links are followed (hub
/// snapshots link to blobs) only to regular files.
#[test]
fn hf_weight_files_are_plain_names_and_regular_files() {
    let dir = out_dir("hf-paths");
    let run = one_step_run(&dir);
    let hf = export(&run, &dir.join("hf"), "f32");
    let eval = |model: &std::path::Path| {
        output_within(
            Command::new(env!("CARGO_BIN_EXE_steel-eval")).args([
                "ppl",
                "--model",
                model.to_str().unwrap(),
                "--ids",
                "1,2,3,4",
            ]),
            60,
        )
    };
    // A hub-style snapshot: every file a link to a blob elsewhere loads.
    let blobs = dir.join("blobs");
    let snap = dir.join("snapshot");
    std::fs::create_dir_all(&snap).unwrap();
    copy_dir(&hf, &blobs);
    for e in std::fs::read_dir(&blobs).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), snap.join(e.file_name())).unwrap();
    }
    let o = eval(&snap);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // An index whose weight_map leaves the directory is refused.
    let sharded = dir.join("sharded");
    copy_dir(&hf, &sharded);
    let names: Vec<String> = {
        let bytes = std::fs::read(sharded.join("model.safetensors")).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let h: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        h.keys().filter(|k| *k != "__metadata__").cloned().collect()
    };
    let index = |target: &str| {
        let map: serde_json::Map<String, serde_json::Value> =
            names.iter().map(|n| (n.clone(), target.into())).collect();
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string()
    };
    std::fs::write(sharded.join("model.safetensors.index.json"), index("model.safetensors"))
        .unwrap();
    let o = eval(&sharded);
    assert!(o.status.success(), "a plain index loads: {}", String::from_utf8_lossy(&o.stderr));
    for bad in ["../hf/model.safetensors", "/dev/zero", ".."] {
        std::fs::write(sharded.join("model.safetensors.index.json"), index(bad)).unwrap();
        let o = eval(&sharded);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("plain file names"), "{bad}: {err}");
    }
    // A link to a device is not followed into a read.
    std::fs::remove_file(sharded.join("model.safetensors.index.json")).unwrap();
    std::fs::remove_file(sharded.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", sharded.join("model.safetensors")).unwrap();
    let o = eval(&sharded);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("is not a regular file"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Where the block size is known (`--block-size`), `inspect` rejects a shard that is not whole
/// blocks; with a tokenizer, ids outside its vocabulary (exit 2, the token named).
#[test]
fn inspect_rejects_partial_blocks_and_foreign_ids() {
    let dir = out_dir("inspect");
    let shard = |name: &str, ids: &[i32]| {
        let mut b = Vec::new();
        b.extend_from_slice(b"LITPKDS");
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(4); // i32
        b.extend_from_slice(&(ids.len() as u64).to_le_bytes());
        for x in ids {
            b.extend_from_slice(&x.to_le_bytes());
        }
        let f = dir.join(name);
        std::fs::write(&f, b).unwrap();
        f
    };
    let inspect = |f: &std::path::Path, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_steel-data"))
            .arg("inspect")
            .arg(f)
            .args(extra)
            .output()
            .unwrap()
    };
    let ids: Vec<i32> = (0..40).map(|i| (i * 7919) % 150_000).collect();
    let whole = shard("whole.bin", &ids);
    common::ok(&inspect(&whole, &["--block-size", "8"]));
    common::ok(&inspect(&whole, &[])); // no block size given: reported, not refused
    let o = inspect(&whole, &["--block-size", "6"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("not a whole number of 6-token blocks (6 blocks and 4 tokens"), "{err}");
    let tok =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/qwen-tokenizer");
    let tok = tok.to_str().unwrap();
    common::ok(&inspect(&whole, &["--block-size", "8", "--tokenizer", tok]));
    let mut foreign = ids.clone();
    foreign[27] = 151_646; // one past Qwen's last added token
    let bad = shard("foreign.bin", &foreign);
    let o = inspect(&bad, &["--block-size", "8", "--tokenizer", tok]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("token 27 holds id 151646, outside"), "{err}");
    foreign[27] = -3;
    let neg = shard("negative.bin", &foreign);
    assert_eq!(inspect(&neg, &["--block-size", "8", "--tokenizer", tok]).status.code(), Some(2));
    let _ = std::fs::remove_dir_all(dir);
}

/// A tensor the model has no parameter for is named as such, whether the file is otherwise
/// well formed (appended with its data) or its header only gained the entry (which the format
/// check alone reports as a bad offset of some other tensor).
#[test]
fn an_extra_tensor_is_named() {
    let dir = out_dir("extra-tensor");
    let run = one_step_run(&dir);
    let hf = export(&run, &dir.join("hf"), "f32");
    let path = hf.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let write = |header: &serde_json::Map<String, serde_json::Value>, data: &[u8]| {
        let h = serde_json::to_vec(header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        std::fs::write(&path, out).unwrap();
    };
    let eval = || {
        Command::new(env!("CARGO_BIN_EXE_steel-eval"))
            .args(["ppl", "--model", hf.to_str().unwrap(), "--ids", "1,2,3,4"])
            .output()
            .unwrap()
    };
    let end = data.len();
    // Well formed: the extra tensor's 16 bytes appended.
    header.insert(
        "model.extra.weight".into(),
        serde_json::json!({"dtype": "F32", "shape": [4], "data_offsets": [end, end + 16]}),
    );
    let mut longer = data.to_vec();
    longer.extend_from_slice(&[0u8; 16]);
    write(&header, &longer);
    let o = eval();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("model.extra.weight"), "{err}");
    // Only the header entry, overlapping the first tensor's bytes.
    header.insert(
        "model.extra.weight".into(),
        serde_json::json!({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}),
    );
    write(&header, data);
    let o = eval();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("holds a tensor \"model.extra.weight\" the model config has no"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Shards whose ids the model's vocabulary does not cover (Qwen-tokenized shards under the demo
/// model's 512 ids) are refused before training starts, naming the shard, the id and the size.
#[test]
fn a_vocabulary_mismatch_is_found_at_start() {
    let dir = out_dir("vocab");
    let shards = dir.join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let mut b = Vec::new();
    b.extend_from_slice(b"LITPKDS");
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(4); // i32, as Qwen-sized vocabularies are stored
    let ids: Vec<i32> = (0..130).map(|i| if i == 77 { 102_316 } else { i * 3 }).collect();
    b.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    for x in &ids {
        b.extend_from_slice(&x.to_le_bytes());
    }
    let shard = shards.join("train-0.bin");
    std::fs::write(&shard, b).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_steel-train"))
        .args(["--out", dir.join("run").to_str().unwrap(), "--max-steps", "1", "--device", "cpu"])
        .args(["--set", "data.demo_corpus=false", "--set", "data.seq_len=12"])
        .arg("--set")
        .arg(format!("data.train=[{{path={:?}}}]", shards.to_str().unwrap()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("train-0.bin"), "names the shard: {err}");
    assert!(err.contains("token id 102316, outside the model's vocabulary of 512 ids"), "{err}");
    assert!(!err.contains("embedding_fwd"), "found before the first step: {err}");
    let _ = std::fs::remove_dir_all(dir);
}

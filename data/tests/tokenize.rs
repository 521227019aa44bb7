//! The tokenizer, the chat template, and packed shards byte for byte.

use std::path::{Path, PathBuf};
use steel_data::chat::{ChatTemplate, Message};
use steel_data::shard::{Shard, ShardHeader, ShardWriter, TokenDType};
use steel_data::tokenize::{tokenize, TokenizeOptions};
use steel_data::tokenizer::{Tokenizer, IM_END_ID, PAD_ID};

pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data")
}

pub fn qwen_dir() -> PathBuf {
    shared().join("qwen-tokenizer")
}

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("steel-data-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn with_threads<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap().install(f)
}

#[test]
fn special_ids_and_encoding_match_the_qwen_tokenizer() {
    let tok = Tokenizer::load(&qwen_dir()).unwrap();
    assert_eq!(tok.vocab_size(), 151_646);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(PAD_ID));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(151_644));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(IM_END_ID));
    // Special-token strings inside text are matched as special tokens; no BOS/EOS is added.
    let ids = tok.encode("你好<|im_end|>").unwrap();
    assert_eq!(ids.last(), Some(&IM_END_ID));
    assert!(!ids[..ids.len() - 1].contains(&IM_END_ID));
    let text = "Steel 训练 1.1B 模型。\nfn main() {}";
    assert_eq!(tok.decode(&tok.encode(text).unwrap(), false).unwrap(), text);
    let missing = Tokenizer::load(Path::new("/nonexistent-dir"))
        .err()
        .expect("missing tokenizer")
        .to_string();
    assert!(missing.contains("tokenizer.json"), "{missing}");
}

#[test]
fn chat_template_renders_the_reference_strings_from_the_config_file() {
    let tok = Tokenizer::load(&qwen_dir()).unwrap();
    let chat = tok.chat_template().expect("the Qwen config has a chat template");
    let q = "什么是钢？";
    let with_system = chat
        .render(
            &[Message::new("system", "You are a helpful assistant."), Message::new("user", q)],
            true,
        )
        .unwrap();
    assert_eq!(
        with_system,
        format!("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
    );
    // Without a system message the template inserts the default one; no generation prompt.
    let plain = chat
        .render(&[Message::new("user", q), Message::new("assistant", "一种合金。")], false)
        .unwrap();
    assert_eq!(
        plain,
        format!("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n一种合金。<|im_end|>\n")
    );
    // A modified template file changes the output accordingly: nothing is hard-coded.
    let dir = tmpdir("template");
    let cfg = std::fs::read_to_string(qwen_dir().join("tokenizer_config.json")).unwrap();
    let changed = cfg.replace("You are a helpful assistant.", "你是钢铁助手。");
    assert_ne!(cfg, changed);
    std::fs::write(dir.join("tokenizer_config.json"), changed).unwrap();
    let t =
        ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json")).unwrap().unwrap();
    let out = t.render(&[Message::new("user", q)], true).unwrap();
    assert_eq!(out, format!("<|im_start|>system\n你是钢铁助手。<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"));
    // A broken template is an error at load time, not a panic.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}"}"#,
    )
    .unwrap();
    assert!(ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json")).is_err());
}

/// Parses a shard by hand, per spec §3.2, independently of `Shard`.
fn parse_shard(path: &Path) -> (Vec<u8>, Vec<i64>) {
    let bytes = std::fs::read(path).unwrap();
    let header = bytes[..24].to_vec();
    let code = bytes[15];
    let n = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let body = &bytes[24..];
    let ids = match code {
        4 => body
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
            .collect::<Vec<_>>(),
        8 => {
            body.chunks_exact(2).map(|b| u16::from_le_bytes(b.try_into().unwrap()) as i64).collect()
        }
        c => panic!("unexpected dtype code {c}"),
    };
    assert_eq!(ids.len(), n, "{}: body length differs from the header", path.display());
    (header, ids)
}

fn sky_sample() -> PathBuf {
    shared().join("corpus-samples/sky/2021-31_zh_head_0000_sample.jsonl")
}

#[test]
fn shards_hold_encode_plus_separator_byte_for_byte_at_one_and_two_threads() {
    // The first 60 documents of the SkyPile sample.
    let dir = tmpdir("shards");
    let input = dir.join("docs.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(sky_sample())
        .unwrap()
        .lines()
        .take(60)
        .map(str::to_string)
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();

    // The expected stream, from HF tokenizers directly.
    let hf = tokenizers::Tokenizer::from_file(qwen_dir().join("tokenizer.json")).unwrap();
    let mut expected: Vec<i64> = Vec::new();
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let enc = hf.encode(v["text"].as_str().unwrap(), true).unwrap();
        expected.extend(enc.get_ids().iter().map(|&x| x as i64));
        expected.push(151_645);
    }

    let tok = Tokenizer::load(&qwen_dir()).unwrap();
    let (block, per_shard) = (129usize, 40usize);
    let chunk = block * per_shard;
    let run = |threads: usize, name: &str| {
        let out = dir.join(name);
        let opts = TokenizeOptions {
            block_size: block,
            blocks_per_shard: per_shard,
            fit_last: false,
            prefix: "sky".into(),
            batch_docs: 7,
        };
        let s = with_threads(threads, || {
            tokenize(&tok, std::slice::from_ref(&input), &out, &opts, &mut |_| {})
        })
        .unwrap();
        (out, s)
    };
    let (out1, s1) = run(1, "t1");
    let (out2, _) = run(2, "t2");

    let full = expected.len() / chunk;
    let rem = expected.len() % chunk;
    let kept = rem as f64 / chunk as f64 > 0.05;
    let n_files = full + usize::from(kept);
    assert_eq!(s1.shards.files.len(), n_files);
    assert_eq!(s1.documents, 60);
    assert_eq!(s1.tokens as usize, expected.len());
    assert_eq!(s1.shards.tokens_dropped as usize, if kept { 0 } else { rem });
    let mut stream = Vec::new();
    for i in 0..n_files {
        let name = format!("sky_{i:010}.bin");
        let (a, b) =
            (std::fs::read(out1.join(&name)).unwrap(), std::fs::read(out2.join(&name)).unwrap());
        assert!(a == b, "{name} differs between 1 and 2 threads");
        let (header, ids) = parse_shard(&out1.join(&name));
        let mut want = vec![0x4c, 0x49, 0x54, 0x50, 0x4b, 0x44, 0x53, 1, 0, 0, 0, 0, 0, 0, 0, 4];
        want.extend((chunk as u64).to_le_bytes());
        assert_eq!(header, want, "header bytes of {name}");
        assert_eq!(a.len(), 24 + 4 * chunk);
        stream.extend(ids);
    }
    assert!(!out1.join(format!("sky_{n_files:010}.bin")).exists(), "the remainder is written once");
    if kept {
        assert_eq!(&stream[..expected.len()], &expected[..]);
        assert!(
            stream[expected.len()..].iter().all(|&t| t == PAD_ID as i64),
            "padding is <|endoftext|>"
        );
    } else {
        assert_eq!(&stream[..], &expected[..full * chunk]);
    }
}

#[test]
fn remainder_is_kept_above_five_percent_and_dropped_otherwise() {
    let dir = tmpdir("remainder");
    for (fill, kept) in [(6usize, true), (5, false)] {
        let out = dir.join(format!("f{fill}"));
        let mut w = ShardWriter::new(&out, "r", 100, TokenDType::I32, PAD_ID).unwrap();
        w.add(&(0..(200 + fill) as u32).collect::<Vec<_>>()).unwrap();
        let s = w.finish().unwrap();
        assert_eq!(s.files.len(), 2 + usize::from(kept));
        assert_eq!(s.tokens_dropped as usize, if kept { 0 } else { fill });
        if kept {
            let (_, ids) = parse_shard(&s.files[2]);
            assert_eq!(&ids[..fill], &(200..200 + fill as i64).collect::<Vec<_>>()[..]);
            assert!(ids[fill..].iter().all(|&t| t == PAD_ID as i64));
        }
    }
}

/// A fitted writer (tokenize without --blocks-per-shard) writes full shards and then a last one
/// of just the blocks the remaining tokens need, however few: padded to whole blocks only.
#[test]
fn a_fitted_last_shard_holds_just_the_blocks_it_needs() {
    let dir = tmpdir("fitted");
    for (n, files, last_len) in [(205usize, 3usize, 10usize), (3, 1, 10), (200, 2, 100)] {
        let out = dir.join(format!("n{n}"));
        let mut w = ShardWriter::fitted(&out, "f", 100, 10, TokenDType::I32, PAD_ID).unwrap();
        w.add(&(0..n as u32).collect::<Vec<_>>()).unwrap();
        let s = w.finish().unwrap();
        assert_eq!(s.files.len(), files, "{n} tokens");
        assert_eq!(s.tokens_dropped, 0);
        let (header, ids) = parse_shard(s.files.last().unwrap());
        assert_eq!(u64::from_le_bytes(header[16..24].try_into().unwrap()), last_len as u64);
        assert_eq!(ids.len(), last_len);
        let tail = n - (files - 1) * 100;
        assert_eq!(&ids[..tail], &((n - tail) as i64..n as i64).collect::<Vec<_>>()[..]);
        assert!(ids[tail..].iter().all(|&t| t == PAD_ID as i64), "padding to a whole block");
        assert_eq!(s.padding_tokens as usize, last_len - tail);
    }
    assert!(ShardWriter::fitted(&dir, "x", 105, 10, TokenDType::I32, PAD_ID).is_err());
}

#[test]
fn malformed_input_lines_are_reported_not_fatal() {
    let dir = tmpdir("malformed");
    let input = dir.join("docs.jsonl");
    std::fs::write(&input, "{\"text\": \"第一篇文档的内容。\"}\nnot json\n[1, 2]\n{\"title\": \"no text\"}\n{\"text\": 5}\n{\"text\": \"第二篇。\"}\n").unwrap();
    let tok = Tokenizer::load(&qwen_dir()).unwrap();
    let opts = TokenizeOptions {
        block_size: 4,
        blocks_per_shard: 2,
        fit_last: false,
        prefix: "m".into(),
        batch_docs: 2,
    };
    let s = tokenize(&tok, &[input], &dir.join("out"), &opts, &mut |_| {}).unwrap();
    assert_eq!(s.documents, 2);
    assert_eq!(s.malformed, 4);
    assert_eq!(s.malformed_lines.iter().map(|b| b.line).collect::<Vec<_>>(), vec![2, 3, 4, 5]);
}

#[test]
fn shard_validation_names_the_problem() {
    let dir = tmpdir("validate");
    let mut w = ShardWriter::new(&dir, "v", 10, TokenDType::U16, PAD_ID).unwrap();
    w.add(&(1..=10).collect::<Vec<u32>>()).unwrap();
    let s = w.finish().unwrap();
    let good = Shard::open(&s.files[0]).unwrap();
    assert_eq!(good.header, ShardHeader { dtype: TokenDType::U16, chunk_size: 10 });
    assert_eq!(good.tokens(2, 3).unwrap(), vec![3, 4, 5]);
    let bytes = std::fs::read(&s.files[0]).unwrap();
    let bad = dir.join("truncated.bin");
    std::fs::write(&bad, &bytes[..bytes.len() - 2]).unwrap();
    assert!(Shard::open(&bad).err().unwrap().to_string().contains("header announces"));
    let mut wrong = bytes.clone();
    wrong[0] = b'X';
    std::fs::write(&bad, &wrong).unwrap();
    assert!(Shard::open(&bad).err().unwrap().to_string().contains("magic"));
    assert_eq!(TokenDType::for_vocab(65_499), TokenDType::U16);
    assert_eq!(TokenDType::for_vocab(151_646), TokenDType::I32);
}

//! `steel-eval mc`: multiple-choice evaluation on C-Eval and CMMLU (specs/reference-pipeline.md
//! §6).
//!
//! - `logits` (default, deterministic): after the prompt, the next-token logits of the option
//!   letters' token ids are compared. CMMLU uses the reference's logit variant (§6.2: a header
//!   with the subject's Chinese name, `题目：`, options, `\n答案是：`, few-shot examples from `dev`
//!   within `--max-length` tokens by the reference's rule), tokenized as plain text. C-Eval uses
//!   the §6.3 example format (5-shot by default) as the user message of the chat template.
//! - `generate`: the reference's generation protocols (§6.2 for CMMLU, §6.4 for C-Eval), greedy,
//!   and their answer extraction without the random fallback: an unparsable answer is wrong and
//!   counted.
//!
//! Results per subject, per category and overall go to the terminal and, with `--out`, to a
//! JSON file that also lists every question; an existing `--out` of the same settings is
//! resumed subject by subject.

pub mod extract;
pub mod subjects;

use crate::generation::Loaded;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use steel_data::chat::Message;
use steel_data::tokenizer::Tokenizer;
use steel_model::GenerationOptions;
use steel_runtime::Tensor;

pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Ceval,
    Cmmlu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    Logits,
    Generate,
}

/// `steel-eval mc` arguments.
#[derive(clap::Args, Debug)]
pub struct McArgs {
    /// A HF model directory or a training checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Tokenizer directory (default: the model folder).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The benchmark's root (C-Eval: val/, dev/; CMMLU: test/, dev/).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, value_enum)]
    pub format: Format,
    /// The split to score (default: the one with answers: C-Eval val, CMMLU test).
    #[arg(long)]
    pub split: Option<String>,
    /// Few-shot examples from dev (default: C-Eval 5, CMMLU 0, as the reference ran them).
    #[arg(long)]
    pub shots: Option<usize>,
    /// Prompt budget in tokens (CMMLU's few-shot rule; C-Eval drops examples to fit).
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    #[arg(long, value_enum, default_value = "logits")]
    pub method: Method,
    /// Questions per subject at most.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub device: crate::DeviceArgs,
    /// Tokens generated per question with --method generate (reference: CMMLU 64, C-Eval 1024).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Results JSON (resumed per subject when it exists with the same settings).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One question.
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    pub id: String,
    pub question: String,
    pub options: Vec<String>,
    pub answer: String,
}

fn read_rows(path: &Path) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_path(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let headers: Vec<String> = r
        .headers()
        .with_context(|| format!("{}: no header row", path.display()))?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').to_string())
        .collect();
    let mut rows = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
        rows.push(rec.iter().map(str::to_string).collect());
    }
    Ok((headers, rows))
}

/// Reads a C-Eval (columns by name) or CMMLU (index column, then positional) CSV.
pub fn read_questions(path: &Path, format: Format) -> Result<Vec<Question>> {
    let (headers, rows) = read_rows(path)?;
    let col = |name: &str| headers.iter().position(|h| h == name);
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let q = match format {
            Format::Ceval => {
                let get = |name: &str| -> Result<String> {
                    let c = col(name).with_context(|| {
                        format!(
                            "{}: no column {name:?} (C-Eval needs question, A, B, C, D, answer)",
                            path.display()
                        )
                    })?;
                    Ok(row.get(c).cloned().unwrap_or_default())
                };
                Question {
                    id: col("id")
                        .and_then(|c| row.get(c).cloned())
                        .unwrap_or_else(|| i.to_string()),
                    question: get("question")?,
                    options: LETTERS.iter().map(|l| get(l)).collect::<Result<_>>()?,
                    answer: get("answer").unwrap_or_default(),
                }
            }
            Format::Cmmlu => {
                if row.len() < 4 {
                    bail!("{}: row {} has {} columns; CMMLU rows are index, question, options…, answer", path.display(), i + 2, row.len());
                }
                let body = &row[1..];
                Question {
                    id: row[0].clone(),
                    question: body[0].clone(),
                    options: body[1..body.len() - 1].to_vec(),
                    answer: body[body.len() - 1].clone(),
                }
            }
        };
        if q.options.len() > LETTERS.len() {
            bail!(
                "{}: row {} has {} options; at most 4 (A–D) are supported",
                path.display(),
                i + 2,
                q.options.len()
            );
        }
        out.push(q);
    }
    Ok(out)
}

/// The subjects of a split, sorted, with their files.
pub fn subjects(data: &Path, format: Format, split: &str) -> Result<Vec<(String, PathBuf)>> {
    let dir = data.join(split);
    let entries = std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
    let suffix = match format {
        Format::Ceval => format!("_{split}.csv"),
        Format::Cmmlu => ".csv".to_string(),
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(&suffix).map(|s| (s.to_string(), e.path()))
        })
        .collect();
    out.sort();
    if out.is_empty() {
        bail!("{}: no *{suffix} files", dir.display());
    }
    Ok(out)
}

fn dev_file(data: &Path, format: Format, subject: &str) -> PathBuf {
    match format {
        Format::Ceval => data.join("dev").join(format!("{subject}_dev.csv")),
        Format::Cmmlu => data.join("dev").join(format!("{subject}.csv")),
    }
}

/// CMMLU's logit-variant example: `题目：q` + `\nL. text` per option + `\n答案是：`.
pub fn cmmlu_example(q: &Question, with_answer: bool) -> String {
    let mut s = format!("题目：{}", q.question);
    for (l, o) in LETTERS.iter().zip(&q.options) {
        s.push_str(&format!("\n{l}. {o}"));
    }
    s.push_str("\n答案是：");
    if with_answer {
        s.push_str(&format!("{}\n\n", q.answer));
    }
    s
}

/// The CMMLU logit-variant prompt with the reference's few-shot budget rule (§6.2).
pub fn cmmlu_prompt(
    tok: &Tokenizer,
    zh: &str,
    dev: &[Question],
    q: &Question,
    max_len: usize,
) -> Result<String> {
    let header = format!("以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\n\n");
    let question = cmmlu_example(q, false);
    let base = tok.encode(&header)?.len() + tok.encode(&question)?.len();
    if base > max_len {
        return Ok(question);
    }
    let mut examples: Vec<(String, usize)> = dev
        .iter()
        .map(|d| {
            let e = cmmlu_example(d, true);
            let n = tok.encode(&e)?.len();
            Ok((e, n))
        })
        .collect::<Result<_>>()?;
    while !examples.is_empty() && examples.iter().map(|e| e.1).sum::<usize>() >= max_len - base {
        let longest = examples.iter().map(|e| e.1).max().unwrap_or(0);
        examples.retain(|e| e.1 != longest);
    }
    Ok(format!("{header}{}{question}", examples.iter().map(|e| e.0.as_str()).collect::<String>()))
}

/// C-Eval's §6.3 example: instruction + question + `\nL. text` per option + `\n答案：`.
pub fn ceval_example(q: &Question, with_answer: bool) -> String {
    let mut s = format!("以下是一道单项选择题，请直接给出答案。{}", q.question);
    for (l, o) in LETTERS.iter().zip(&q.options) {
        s.push_str(&format!("\n{l}. {o}"));
    }
    s.push_str("\n答案：");
    if with_answer {
        s.push_str(&format!("{}\n\n", q.answer));
    }
    s
}

fn chat(tok: &Tokenizer, user: &str) -> Result<String> {
    let t = tok
        .chat_template()
        .context("the tokenizer has no chat_template (tokenizer_config.json)")?;
    Ok(t.render(
        &[Message::new("system", "You are a helpful assistant."), Message::new("user", user)],
        true,
    )?)
}

/// The §6.2/§6.4 generation prompt's user message.
pub fn generation_user_message(q: &Question, format: Format) -> String {
    let mut body = format!("{}\n\n", q.question);
    for (l, o) in LETTERS.iter().zip(&q.options) {
        body.push_str(&format!("{l}. {o}\n"));
    }
    let body = match format {
        Format::Cmmlu => body.replace("____", ""),
        Format::Ceval => body.replace("____。", "( )"),
    };
    format!("以下是一道单选题:\n{body}请给出答案。\n")
}

/// Scores one question; returns the prediction ("" when nothing could be extracted).
fn predict(
    lm: &Loaded,
    tok: &Tokenizer,
    a: &McArgs,
    zh: &str,
    dev: &[Question],
    q: &Question,
    letter_ids: &[u32],
) -> Result<String> {
    let n = q.options.len();
    match a.method {
        Method::Logits => {
            let mut ids = match a.format {
                Format::Cmmlu => tok.encode(&cmmlu_prompt(tok, zh, dev, q, a.max_length)?)?,
                Format::Ceval => {
                    // Drop leading examples until the prompt fits; then keep its end.
                    let mut k = dev.len();
                    loop {
                        let shots: String =
                            dev[dev.len() - k..].iter().map(|d| ceval_example(d, true)).collect();
                        let ids = tok
                            .encode(&chat(tok, &format!("{shots}{}", ceval_example(q, false)))?)?;
                        if ids.len() <= a.max_length || k == 0 {
                            break ids;
                        }
                        k -= 1;
                    }
                }
            };
            if ids.len() > a.max_length {
                ids.drain(..ids.len() - a.max_length);
            }
            let x = Tensor::from_vec(ids.iter().map(|&t| t as i32).collect(), &[1, ids.len()])?;
            let logits = lm.model.logits(&x)?.to_f64_vec()?;
            let v = lm.model.config.vocab_size;
            let last = &logits[logits.len() - v..];
            let best = (0..n).max_by(|&i, &j| {
                last[letter_ids[i] as usize]
                    .total_cmp(&last[letter_ids[j] as usize])
                    .then(j.cmp(&i))
            });
            Ok(best.map(|i| LETTERS[i].to_string()).unwrap_or_default())
        }
        Method::Generate => {
            let user = generation_user_message(q, a.format);
            let ids = tok.encode(&chat(tok, &user)?)?;
            let mut opts = lm.options(&crate::generation::SamplingArgs::default());
            opts = GenerationOptions {
                temperature: 0.0,
                max_new_tokens: a.max_new_tokens.unwrap_or(match a.format {
                    Format::Cmmlu => 64,
                    Format::Ceval => 1024,
                }),
                // §6.4 forces repetition_penalty 1.0; §6.2 keeps the checkpoint's
                repetition_penalty: if a.format == Format::Ceval {
                    1.0
                } else {
                    opts.repetition_penalty
                },
                ..opts
            };
            if !opts.eos.contains(&tok.im_end_id()) {
                opts.eos.push(tok.im_end_id());
            }
            let out = lm.model.generate(&[ids], &opts, &mut |_, _| {})?;
            let response = tok.decode(&out[0], true)?;
            Ok(match a.format {
                Format::Cmmlu => extract::cmmlu_choice(&response),
                Format::Ceval => extract::ceval_choice(&response.replace(&user, ""), q),
            }
            .map(|c| c.to_string())
            .unwrap_or_default())
        }
    }
}

fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Runs `steel-eval mc`.
pub fn run(a: McArgs) -> Result<()> {
    let run = a.device.open(true)?;
    let lm = Loaded::load(&a.model, a.tokenizer.as_deref(), true, run.backend())?;
    let tok = lm.tokenizer.as_ref().context("a tokenizer is needed")?;
    let split = a.split.clone().unwrap_or_else(|| match a.format {
        Format::Ceval => "val".into(),
        Format::Cmmlu => "test".into(),
    });
    let shots = a.shots.unwrap_or(match a.format {
        Format::Ceval => 5,
        Format::Cmmlu => 0,
    });
    let letter_ids: Vec<u32> = LETTERS
        .iter()
        .map(|l| tok.encode(l)?.first().copied().context("a letter encodes to no token"))
        .collect::<Result<_>>()?;
    let settings = json!({
        "format": format!("{:?}", a.format).to_lowercase(),
        "split": split,
        "method": format!("{:?}", a.method).to_lowercase(),
        "shots": shots,
        "max_length": a.max_length,
        "limit": a.limit,
    });
    // Resume: subjects already in --out with the same settings.
    let mut done: BTreeMap<String, Value> = BTreeMap::new();
    let mut questions: Vec<Value> = Vec::new();
    if let Some(out) = a.out.as_ref().filter(|p| p.is_file()) {
        let prev: Value = serde_json::from_str(&std::fs::read_to_string(out)?)
            .with_context(|| format!("{}: not a results file", out.display()))?;
        if prev["settings"] == settings {
            if let Some(s) = prev["subjects"].as_object() {
                done.extend(s.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            if let Some(q) = prev["questions"].as_array() {
                questions.extend(
                    q.iter()
                        .filter(|q| done.contains_key(q["subject"].as_str().unwrap_or("")))
                        .cloned(),
                );
            }
            eprintln!("resuming {}: {} subjects done", out.display(), done.len());
        } else {
            eprintln!("{} holds other settings: starting over", out.display());
        }
    }
    let zh_of = |s: &str| {
        subjects::CMMLU_ZH
            .iter()
            .find(|(e, _)| *e == s)
            .map_or(s.to_string(), |(_, z)| z.to_string())
    };
    for (subject, path) in subjects(&a.data, a.format, &split)? {
        if done.contains_key(&subject) {
            continue;
        }
        let mut qs = read_questions(&path, a.format)?;
        if let Some(l) = a.limit {
            qs.truncate(l);
        }
        let dev = if shots > 0 {
            let p = dev_file(&a.data, a.format, &subject);
            let mut d = read_questions(&p, a.format)
                .with_context(|| format!("few-shot examples of {subject}"))?;
            d.truncate(shots);
            d
        } else {
            Vec::new()
        };
        let (mut correct, mut unparsable) = (0usize, 0usize);
        for q in &qs {
            let pred = predict(&lm, tok, &a, &zh_of(&subject), &dev, q, &letter_ids)?;
            if pred.is_empty() {
                unparsable += 1;
            }
            if pred == q.answer.trim() {
                correct += 1;
            }
            questions.push(
                json!({"subject": subject, "id": q.id, "answer": q.answer, "prediction": pred}),
            );
        }
        let acc = if qs.is_empty() { 0.0 } else { 100.0 * correct as f64 / qs.len() as f64 };
        eprintln!("{subject:<40} {acc:6.2}  ({correct}/{})", qs.len());
        done.insert(
            subject,
            json!({"accuracy": acc, "n": qs.len(), "correct": correct, "unparsable": unparsable}),
        );
        if let Some(out) = &a.out {
            write(out, &settings, &done, &questions, &a.model)?;
        }
    }
    let report = write_report(&settings, &done, &questions, &a.model, a.format);
    print_table(&report);
    if let Some(out) = &a.out {
        write(out, &settings, &done, &questions, &a.model)?;
        eprintln!("results: {}", out.display());
    }
    Ok(())
}

fn write_report(
    settings: &Value,
    done: &BTreeMap<String, Value>,
    questions: &[Value],
    model: &Path,
    format: Format,
) -> Value {
    let acc = |s: &str| done.get(s).and_then(|v| v["accuracy"].as_f64());
    let cats = match format {
        Format::Ceval => subjects::CEVAL_CATEGORIES,
        Format::Cmmlu => subjects::CMMLU_CATEGORIES,
    };
    let mut categories = serde_json::Map::new();
    for (name, members) in cats {
        let xs: Vec<f64> = members.iter().filter_map(|s| acc(s)).collect();
        if let Some(m) = mean(&xs) {
            categories.insert(name.to_string(), json!({"accuracy": m, "subjects": xs.len()}));
        }
    }
    let all: Vec<f64> = done.values().filter_map(|v| v["accuracy"].as_f64()).collect();
    let unparsable: u64 = done.values().filter_map(|v| v["unparsable"].as_u64()).sum();
    json!({
        "model": model.display().to_string(),
        "settings": settings,
        "subjects": done,
        "categories": categories,
        "overall": mean(&all),
        "unparsable": unparsable,
        "questions": questions,
    })
}

fn write(
    out: &Path,
    settings: &Value,
    done: &BTreeMap<String, Value>,
    questions: &[Value],
    model: &Path,
) -> Result<()> {
    let format = if settings["format"] == "ceval" { Format::Ceval } else { Format::Cmmlu };
    let report = write_report(settings, done, questions, model, format);
    let tmp = out.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

fn print_table(r: &Value) {
    println!("{:<40} {:>8} {:>6}", "subject", "accuracy", "n");
    if let Some(s) = r["subjects"].as_object() {
        for (k, v) in s {
            println!("{:<40} {:>8.2} {:>6}", k, v["accuracy"].as_f64().unwrap_or(0.0), v["n"]);
        }
    }
    println!("{}", "-".repeat(56));
    if let Some(c) = r["categories"].as_object() {
        for (k, v) in c {
            println!(
                "{:<40} {:>8.2} {:>6}",
                k,
                v["accuracy"].as_f64().unwrap_or(0.0),
                format!("{} subj", v["subjects"])
            );
        }
    }
    println!("{:<40} {:>8.2}", "overall", r["overall"].as_f64().unwrap_or(0.0));
    if r["unparsable"].as_u64().unwrap_or(0) > 0 {
        println!("unparsable answers (counted wrong): {}", r["unparsable"]);
    }
}

//! Supervised fine-tuning data (specs/reference-pipeline.md §7.3–§7.4): Alpaca-style
//! `{"instruction", "input", "output"}` and ShareGPT-style `{"conversations": [{"from", "value"}]}`
//! (also `{"messages": [{"role", "content"}]}`) records, rendered as the Qwen template does and
//! labelled as LLaMA-Factory's `qwen` template with `train_on_prompt = false`:
//!
//! - `<|im_start|>system\n{system}<|im_end|>\n` — not trained;
//! - per turn `<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n` — not trained;
//! - `{assistant}<|im_end|>` — trained (every assistant turn), then `\n` — not trained.
//!
//! One example per sequence (never packed), cut after `cutoff` tokens; an example left with no
//! trained token is dropped and counted. The order is a seeded permutation per epoch; rank r of N
//! takes positions r, r+N, … of it, and the position and generator are saved for exact resume.

use crate::{Result, TrainError};
use serde_json::Value;
use std::path::PathBuf;
use steel_data::dataset::Pcg64;
use steel_data::tokenizer::Tokenizer;

/// The label of a token that is not trained.
pub const IGNORE: i64 = -100;

/// One rendered example: token ids and, per token, its label (`IGNORE` or the id).
#[derive(Clone, Debug, PartialEq)]
pub struct SftExample {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// A conversation: an optional system message and (user, assistant) turns.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    pub system: Option<String>,
    pub turns: Vec<(String, String)>,
}

fn inv(m: impl Into<String>) -> TrainError {
    TrainError::Invalid(m.into())
}

/// Reads one jsonl record in any of the supported layouts.
pub fn parse_record(v: &Value) -> std::result::Result<Conversation, String> {
    let s = |x: &Value| x.as_str().map(str::to_string);
    if let Some(instr) = v.get("instruction").and_then(Value::as_str) {
        let input = v.get("input").and_then(Value::as_str).unwrap_or("");
        let output = v.get("output").and_then(Value::as_str).ok_or("no string \"output\"")?;
        let user = if input.is_empty() { instr.to_string() } else { format!("{instr}\n{input}") };
        let system = v.get("system").and_then(s);
        return Ok(Conversation { system, turns: vec![(user, output.to_string())] });
    }
    let (list, role_key, text_key) =
        if let Some(c) = v.get("conversations").and_then(Value::as_array) {
            (c, "from", "value")
        } else if let Some(m) = v.get("messages").and_then(Value::as_array) {
            (m, "role", "content")
        } else {
            return Err("neither instruction/output, conversations nor messages".into());
        };
    let mut system = v.get("system").and_then(s);
    let mut turns = Vec::new();
    let mut pending: Option<String> = None;
    for m in list {
        let role = m.get(role_key).and_then(Value::as_str).ok_or("a turn without a role")?;
        let text =
            m.get(text_key).and_then(Value::as_str).ok_or("a turn without text")?.to_string();
        match role {
            "system" => system = Some(text),
            "human" | "user" => {
                if pending.is_some() {
                    return Err("two user turns in a row".into());
                }
                pending = Some(text);
            }
            "gpt" | "assistant" => {
                let u = pending.take().ok_or("an assistant turn without a user turn before it")?;
                turns.push((u, text));
            }
            other => return Err(format!("unknown role {other:?}")),
        }
    }
    if turns.is_empty() {
        return Err("no (user, assistant) turn".into());
    }
    Ok(Conversation { system, turns })
}

/// Renders and labels a conversation (see the module docs), cut after `cutoff` tokens.
pub fn render(
    tok: &Tokenizer,
    c: &Conversation,
    default_system: &str,
    cutoff: usize,
) -> Result<SftExample> {
    let enc = |t: &str| tok.encode(t).map_err(|e| inv(e.to_string()));
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    let push = |piece: Vec<u32>, trained: bool, ids: &mut Vec<u32>, labels: &mut Vec<i64>| {
        labels.extend(piece.iter().map(|&t| if trained { t as i64 } else { IGNORE }));
        ids.extend(piece);
    };
    let system = c.system.as_deref().unwrap_or(default_system);
    push(enc(&format!("<|im_start|>system\n{system}<|im_end|>\n"))?, false, &mut ids, &mut labels);
    for (u, a) in &c.turns {
        push(
            enc(&format!("<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n"))?,
            false,
            &mut ids,
            &mut labels,
        );
        push(enc(&format!("{a}<|im_end|>"))?, true, &mut ids, &mut labels);
        push(enc("\n")?, false, &mut ids, &mut labels);
    }
    ids.truncate(cutoff);
    labels.truncate(cutoff);
    Ok(SftExample { ids, labels })
}

/// What loading found.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub examples: usize,
    pub malformed: usize,
    /// Examples with no trained token left after the cut.
    pub empty: usize,
    pub first_errors: Vec<String>,
}

/// Loads and renders every record of `files`.
pub fn load(
    files: &[PathBuf],
    tok: &Tokenizer,
    default_system: &str,
    cutoff: usize,
) -> Result<(Vec<SftExample>, LoadReport)> {
    let mut out = Vec::new();
    let mut rep = LoadReport::default();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| inv(format!("{}: {e}", f.display())))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let conv = serde_json::from_str::<Value>(line)
                .map_err(|e| e.to_string())
                .and_then(|v| parse_record(&v));
            match conv {
                Ok(c) => {
                    let ex = render(tok, &c, default_system, cutoff)?;
                    if ex.ids.len() < 2 || ex.labels[1..].iter().all(|&l| l == IGNORE) {
                        rep.empty += 1;
                    } else {
                        out.push(ex);
                    }
                }
                Err(e) => {
                    rep.malformed += 1;
                    if rep.first_errors.len() < 10 {
                        rep.first_errors.push(format!("{}:{}: {e}", f.display(), i + 1));
                    }
                }
            }
        }
    }
    rep.examples = out.len();
    if out.is_empty() {
        return Err(inv(format!(
            "no usable fine-tuning examples in {files:?} ({} malformed)",
            rep.malformed
        )));
    }
    Ok((out, rep))
}

/// The resumable, rank-aware order over the examples.
pub struct SftOrder {
    n: u64,
    order: Vec<u64>,
    pub epoch: u64,
    pos: u64,
    rng: Pcg64,
    rank: usize,
    world: usize,
}

impl SftOrder {
    pub fn new(n: usize, seed: u64, rank: usize, world: usize) -> SftOrder {
        let mut rng = Pcg64::seed(seed ^ 0x7366_745f_6f72_6472);
        let order = rng.permutation(n as u64);
        SftOrder { n: n as u64, order, epoch: 0, pos: 0, rng, rank, world }
    }

    /// This rank's next example index (every rank advances the global position by `world`).
    pub fn next_index(&mut self) -> usize {
        let p = self.pos + self.rank as u64;
        let idx = if p < self.n {
            self.order[p as usize]
        } else {
            self.order[(p - self.n) as usize % self.n as usize]
        };
        self.pos += self.world as u64;
        if self.pos >= self.n {
            self.pos -= self.n;
            self.epoch += 1;
            self.order = self.rng.permutation(self.n);
        }
        idx as usize
    }

    pub fn to_json(&self) -> Value {
        serde_json::json!({"n": self.n, "order": self.order, "epoch": self.epoch, "pos": self.pos,
                           "rng": serde_json::to_value(self.rng.to_state()).unwrap_or(Value::Null)})
    }

    pub fn from_json(v: &Value, rank: usize, world: usize) -> Result<SftOrder> {
        let bad = || inv("the fine-tuning data state in the checkpoint is damaged");
        let order: Vec<u64> = serde_json::from_value(v["order"].clone()).map_err(|_| bad())?;
        let rng = serde_json::from_value(v["rng"].clone()).map_err(|_| bad())?;
        Ok(SftOrder {
            n: v["n"].as_u64().ok_or_else(bad)?,
            order,
            epoch: v["epoch"].as_u64().ok_or_else(bad)?,
            pos: v["pos"].as_u64().ok_or_else(bad)?,
            rng: Pcg64::from_state(&rng).map_err(|e| inv(e.to_string()))?,
            rank,
            world,
        })
    }
}

/// BLAKE3 of each data file, to refuse a resume over changed data.
pub fn hash_files(files: &[PathBuf]) -> Result<Vec<String>> {
    files
        .iter()
        .map(|f: &PathBuf| {
            let bytes = std::fs::read(f).map_err(|e| inv(format!("{}: {e}", f.display())))?;
            Ok(blake3::hash(&bytes).to_hex().to_string())
        })
        .collect()
}

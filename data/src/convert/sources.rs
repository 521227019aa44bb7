//! One record of each source → its text, a drop reason, or why it is malformed (spec §1.4,
//! and §3.1 for WanJuan).
//!
//! Conventions: a field the conversion reads must be present; text fields may be a string or
//! `null` (the reference's `zh_process(None)` gives `""`), any other type is malformed. Fields
//! the conversion does not use are never required. Every function returns `Err(why)` for a
//! malformed record; drop reasons are the `DROP_*` constants.

use super::parquet::Row;
use super::text::{chatml_multi, chatml_single, parse_upvotes, passes_quality_gate, zh_process};
use serde_json::{Map, Value};

/// Formatted text shorter than 20 chars (the quality gate, spec §1.2).
pub const DROP_TOO_SHORT: &str = "too short";
/// baidu_baike: title or summary empty or null.
pub const DROP_EMPTY_TITLE_OR_SUMMARY: &str = "empty title or summary";
/// Multi-turn sources: no complete question/answer pair.
pub const DROP_NO_TURNS: &str = "no dialogue turns";
/// zhihu: the `upvotes` metadata is not a vote count.
pub const DROP_UNPARSABLE_UPVOTES: &str = "unparsable upvotes";
/// zhihu: fewer than [`MIN_UPVOTES`] upvotes.
pub const DROP_FEW_UPVOTES: &str = "fewer than 100 upvotes";
/// belle_2m: a line without `instruction` (a BELLE conversation record, spec §1.5).
pub const DROP_NO_INSTRUCTION: &str = "no instruction field";
/// belle_3_5m: a line without `conversations` (a BELLE instruction record, spec §1.5).
pub const DROP_NO_CONVERSATIONS: &str = "no conversations field";

/// Zhihu answers with fewer votes are dropped (spec §1.4).
pub const MIN_UPVOTES: u64 = 100;

/// What became of one well-formed record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Keep(String),
    Drop(&'static str),
}

/// A present field that is a string or null (`None`).
fn text_field<'a>(o: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match o.get(key) {
        None => Err(format!("missing field `{key}`")),
        Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("field `{key}` is not a string")),
    }
}

/// A present field that is a string (null is malformed too).
fn string_field<'a>(o: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match o.get(key) {
        None => Err(format!("missing field `{key}`")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("field `{key}` is not a string")),
    }
}

/// `zh_process` of a string-or-null field.
fn zh_field(o: &Map<String, Value>, key: &str) -> Result<String, String> {
    text_field(o, key).map(zh_process)
}

fn array_field<'a>(o: &'a Map<String, Value>, key: &str) -> Result<&'a [Value], String> {
    match o.get(key) {
        None => Err(format!("missing field `{key}`")),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(format!("field `{key}` is not an array")),
    }
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, String> {
    v.as_object().ok_or_else(|| format!("{what} is not a JSON object"))
}

fn gated(text: String) -> Outcome {
    if passes_quality_gate(&text) {
        Outcome::Keep(text)
    } else {
        Outcome::Drop(DROP_TOO_SHORT)
    }
}

/// baidu_baike: `title：summary` then `title：content` per section, no separator between
/// sections; the full-width colon is added after NFKC, so it stays full-width.
pub(crate) fn baidu_baike(o: &Map<String, Value>) -> Result<Outcome, String> {
    let title = zh_field(o, "title")?;
    let summary = zh_field(o, "summary")?;
    if title.is_empty() || summary.is_empty() {
        return Ok(Outcome::Drop(DROP_EMPTY_TITLE_OR_SUMMARY));
    }
    let mut text = title;
    text.push('：');
    text.push_str(&summary);
    for (k, section) in array_field(o, "sections")?.iter().enumerate() {
        let section = object(section, &format!("sections[{k}]"))?;
        text.push_str(&zh_field(section, "title").map_err(|e| format!("sections[{k}]: {e}"))?);
        text.push('：');
        text.push_str(&zh_field(section, "content").map_err(|e| format!("sections[{k}]: {e}"))?);
    }
    Ok(gated(text))
}

/// baidu_qa: single-turn ChatML of `title` and `answer` (`desc` is not used, as in the
/// reference).
pub(crate) fn baidu_qa(o: &Map<String, Value>) -> Result<Outcome, String> {
    Ok(gated(chatml_single(&zh_field(o, "title")?, &zh_field(o, "answer")?)))
}

/// belle_2m: `instruction⏎output`, plain (no template).
pub(crate) fn belle_2m(o: &Map<String, Value>) -> Result<Outcome, String> {
    if !o.contains_key("instruction") {
        return Ok(Outcome::Drop(DROP_NO_INSTRUCTION));
    }
    let mut text = zh_field(o, "instruction")?;
    text.push('\n');
    text.push_str(&zh_field(o, "output")?);
    Ok(gated(text))
}

/// belle_3_5m: turn k is a question when k is even and from "human", an answer when k is odd
/// and from "assistant"; other turns are ignored, pairs are not re-aligned (spec §1.4).
pub(crate) fn belle_3_5m(o: &Map<String, Value>) -> Result<Outcome, String> {
    if !o.contains_key("conversations") {
        return Ok(Outcome::Drop(DROP_NO_CONVERSATIONS));
    }
    let (mut qs, mut answers) = (Vec::new(), Vec::new());
    for (k, turn) in array_field(o, "conversations")?.iter().enumerate() {
        let turn = object(turn, &format!("conversations[{k}]"))?;
        let from =
            turn.get("from").ok_or_else(|| format!("conversations[{k}]: missing field `from`"))?;
        let value = || zh_field(turn, "value").map_err(|e| format!("conversations[{k}]: {e}"));
        match (k % 2, from.as_str()) {
            (0, Some("human")) => qs.push(value()?),
            (1, Some("assistant")) => answers.push(value()?),
            _ => {}
        }
    }
    Ok(chatml_multi(&qs, &answers).map_or(Outcome::Drop(DROP_NO_TURNS), gated))
}

/// firefly: single-turn ChatML of `input` and `target` (`kind` is not used).
pub(crate) fn firefly(o: &Map<String, Value>) -> Result<Outcome, String> {
    Ok(gated(chatml_single(&zh_field(o, "input")?, &zh_field(o, "target")?)))
}

/// moss: multi-turn ChatML of `conversation[*].human` / `.assistant`.
pub(crate) fn moss(o: &Map<String, Value>) -> Result<Outcome, String> {
    let (mut qs, mut answers) = (Vec::new(), Vec::new());
    for (k, turn) in array_field(o, "conversation")?.iter().enumerate() {
        let turn = object(turn, &format!("conversation[{k}]"))?;
        qs.push(zh_field(turn, "human").map_err(|e| format!("conversation[{k}]: {e}"))?);
        answers.push(zh_field(turn, "assistant").map_err(|e| format!("conversation[{k}]: {e}"))?);
    }
    Ok(chatml_multi(&qs, &answers).map_or(Outcome::Drop(DROP_NO_TURNS), gated))
}

/// wiki_cn: one element of the file's array; `completion` through `zh_process` and the gate.
pub(crate) fn wiki_cn(o: &Map<String, Value>) -> Result<Outcome, String> {
    zh_field(o, "completion").map(gated)
}

/// wanjuan: `content` unchanged, or an exam record's fields concatenated as spec §3.1 does
/// (`q_main`, `option_a`…`option_e`, `标准答案：`, `std_ans`, `解析：`, `answer_detail`, no other
/// separators). A missing or null field of an exam record is malformed (the reference skipped
/// such lines).
pub(crate) fn wanjuan(o: &Map<String, Value>) -> Result<Outcome, String> {
    if o.contains_key("content") {
        return Ok(Outcome::Keep(string_field(o, "content")?.to_owned()));
    }
    if !o.contains_key("q_main") {
        return Err("neither `content` nor `q_main` (not a WanJuan record)".to_string());
    }
    let mut text = String::new();
    for key in ["q_main", "option_a", "option_b", "option_c", "option_d", "option_e"] {
        text.push_str(string_field(o, key)?);
    }
    text.push_str("标准答案：");
    text.push_str(string_field(o, "std_ans")?);
    text.push_str("解析：");
    text.push_str(string_field(o, "answer_detail")?);
    Ok(Outcome::Keep(text))
}

/// skypile: `text` unchanged.
pub(crate) fn skypile(o: &Map<String, Value>) -> Result<Outcome, String> {
    string_field(o, "text").map(|t| Outcome::Keep(t.to_owned()))
}

/// The Parquet columns each Parquet source reads, in the order its row function expects them.
pub(crate) const ZHIHU_COLUMNS: [&str; 3] = ["INSTRUCTION", "RESPONSE", "METADATA"];
pub(crate) const STARCODE_COLUMNS: [&str; 1] = ["content"];

fn utf8<'a>(row: &'a Row, i: usize, name: &str) -> Result<Option<&'a str>, String> {
    match row.get(i).and_then(Option::as_ref) {
        None => Ok(None),
        Some(b) => std::str::from_utf8(b.data())
            .map(Some)
            .map_err(|_| format!("column `{name}` is not valid UTF-8")),
    }
}

/// zhihu: keep answers with at least 100 upvotes (parsed from METADATA's `upvotes`, "万"
/// included), as single-turn ChatML of INSTRUCTION and RESPONSE.
pub(crate) fn zhihu(row: &Row) -> Result<Outcome, String> {
    let meta = utf8(row, 2, "METADATA")?.ok_or("column `METADATA` is null")?;
    let meta: Value =
        serde_json::from_str(meta).map_err(|e| format!("METADATA is not valid JSON: {e}"))?;
    let meta = object(&meta, "METADATA")?;
    let votes = match meta.get("upvotes") {
        None => return Err("METADATA has no field `upvotes`".to_string()),
        Some(Value::String(s)) => parse_upvotes(s),
        Some(Value::Number(n)) => n.as_u64(),
        Some(_) => None,
    };
    match votes {
        None => return Ok(Outcome::Drop(DROP_UNPARSABLE_UPVOTES)),
        Some(v) if v < MIN_UPVOTES => return Ok(Outcome::Drop(DROP_FEW_UPVOTES)),
        Some(_) => {}
    }
    let q = zh_process(utf8(row, 0, "INSTRUCTION")?);
    let a = zh_process(utf8(row, 1, "RESPONSE")?);
    Ok(gated(chatml_single(&q, &a)))
}

/// starcode: `content` raw: no NFKC, no `\r` removal, no length gate.
pub(crate) fn starcode(row: &Row) -> Result<Outcome, String> {
    let content = utf8(row, 0, "content")?.ok_or("column `content` is null")?;
    Ok(Outcome::Keep(content.to_owned()))
}

//! The text transforms of step 1 (spec §1.2, §1.3): `zh_process`, the quality gate, the ChatML
//! layouts, Zhihu vote counts and the `{"text": …}` output line.
//!
//! Conventions: lengths are in chars (Unicode scalar values, Python's `len(str)`); every
//! function is pure and total, so the converters can run them on any thread.

use unicode_normalization::{is_nfkc_quick, IsNormalized, UnicodeNormalization};

/// The system turn that opens every ChatML record (spec §1.3).
pub const CHATML_SYSTEM: &str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n";

/// Shortest text (in chars) the quality gate keeps (spec §1.2: `len(text) < 20` is rejected).
pub const MIN_CHARS: usize = 20;

/// `zh_process` of spec §1.2: `None` → `""`, Unicode NFKC, then every `\r` removed. Nothing
/// else (no trimming, no `\n` collapsing).
pub fn zh_process(s: Option<&str>) -> String {
    let Some(s) = s else { return String::new() };
    let mut out = if is_nfkc_quick(s.chars()) == IsNormalized::Yes {
        s.to_owned()
    } else {
        s.nfkc().collect::<String>()
    };
    if out.contains('\r') {
        out.retain(|c| c != '\r');
    }
    out
}

/// The quality gate of spec §1.2: true when `text` has at least [`MIN_CHARS`] chars.
pub fn passes_quality_gate(text: &str) -> bool {
    text.chars().nth(MIN_CHARS - 1).is_some()
}

/// Single-turn ChatML ("qwen" mode, spec §1.3): system, user `q`, assistant `a`, with no
/// `<|im_end|>` after the answer.
pub fn chatml_single(q: &str, a: &str) -> String {
    let mut s = String::with_capacity(CHATML_SYSTEM.len() + q.len() + a.len() + 64);
    s.push_str(CHATML_SYSTEM);
    s.push_str("<|im_start|>user\n");
    s.push_str(q);
    s.push_str("<|im_end|>\n<|im_start|>assistant\n");
    s.push_str(a);
    s
}

/// Multi-turn ChatML ("qwen" mode, spec §1.3) over the first `min(qs.len(), answers.len())`
/// pairs, ending in the last answer: exactly the final `<|im_end|>\n` is removed, never
/// characters of the answer (the reference's character-set `rstrip` ate them). `None` when
/// there is no complete pair: such a record has no dialogue (the reference emitted the bare
/// system prompt).
pub fn chatml_multi<S: AsRef<str>>(qs: &[S], answers: &[S]) -> Option<String> {
    let n = qs.len().min(answers.len());
    if n == 0 {
        return None;
    }
    let mut s = String::from(CHATML_SYSTEM);
    for (i, (q, a)) in qs.iter().zip(answers).enumerate() {
        s.push_str("<|im_start|>user\n");
        s.push_str(q.as_ref());
        s.push_str("<|im_end|>\n<|im_start|>assistant\n");
        s.push_str(a.as_ref());
        if i + 1 < n {
            s.push_str("<|im_end|>\n");
        }
    }
    Some(s)
}

/// A Zhihu vote count as the `upvotes` metadata shows it: `"赞同 15"` → 15,
/// `"赞同 1.2 万"` → 12000 (万 = 10⁴; also 千/k = 10³, 亿 = 10⁸), `"赞同 1,234"` → 1234, and a
/// bare `"赞同"` (how Zhihu shows an answer nobody has voted for) → 0. The string is NFKC
/// normalised first, so full-width digits count. `None` when it is not a count.
pub fn parse_upvotes(raw: &str) -> Option<u64> {
    let s = zh_process(Some(raw));
    let s = s.trim();
    let s = s.strip_prefix("赞同").unwrap_or(s).trim();
    if s.is_empty() {
        return Some(0);
    }
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ',')).unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim());
    let scale: u64 = match unit {
        "" => 1,
        "千" | "k" | "K" => 1_000,
        "万" | "w" | "W" => 10_000,
        "亿" => 100_000_000,
        _ => return None,
    };
    let number: String = number.chars().filter(|&c| c != ',').collect();
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number.as_str(), ""),
    };
    if int_part.is_empty() || !int_part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac_part.bytes().all(|b| b.is_ascii_digit())
        || (number.contains('.') && frac_part.is_empty())
    {
        return None;
    }
    let whole = int_part.parse::<u64>().ok()?.checked_mul(scale)?;
    if frac_part.is_empty() {
        return Some(whole);
    }
    // The fraction in units of `scale`, truncated: "1.25 万" → 12500. A fraction finer than the
    // unit ("1.5" votes, "1.00005 万") is not a count.
    let denom = 10u64.checked_pow(u32::try_from(frac_part.len()).ok()?)?;
    let frac = frac_part.parse::<u64>().ok()?.checked_mul(scale)?;
    if frac % denom != 0 {
        return None;
    }
    whole.checked_add(frac / denom)
}

/// One output line, `{"text": "…"}` plus `\n`, byte-identical to Python's
/// `json.dumps({"text": text}, ensure_ascii=False) + "\n"`: non-ASCII unescaped, `"` and `\`
/// escaped, `\b \f \n \r \t` by name and the other C0 controls as lower-case `\u00xx`, U+007F
/// and U+2028/U+2029 left raw (serde_json's string escaping is exactly Python's here).
pub fn json_line(text: &str) -> Vec<u8> {
    let mut line = Vec::with_capacity(text.len() + 16);
    line.extend_from_slice(b"{\"text\": ");
    // Serialising a `str` into a `Vec` cannot fail (no I/O, no non-string keys).
    let _ = serde_json::to_writer(&mut line, text);
    line.extend_from_slice(b"}\n");
    line
}

//! The mappers (text → text) of the presets, each a pure function reproducing the data-juicer
//! op of the same name (spec §2.1, §2.2; `docs/data-cleaning.md` gives every definition).
//!
//! Regexes are data-juicer's own patterns; the Rust `regex` crate has Python `re`'s
//! leftmost-first alternation, greedy/lazy repetition and Unicode `\w`, `\b`, `\d`, `\s`, so
//! the same pattern finds the same non-overlapping matches. `fix_unicode_mapper` is in
//! [`super::unicode`] and `clean_html_mapper` in [`super::html`].

use crate::{DataError, Result};
use regex::{Captures, Regex};
use std::sync::OnceLock;

/// data-juicer's `clean_email_mapper` pattern.
pub const EMAIL_PATTERN: &str = r"[A-Za-z0-9.\-+_]+@[a-z0-9.\-+_]+\.[a-z]+";

/// data-juicer's `clean_ip_mapper` pattern: dotted IPv4 with octets 0–255 (no word boundaries,
/// as in the original) or eight colon-separated groups of 1–4 hex digits (full-form IPv6).
pub const IP_PATTERN: &str = concat!(
    r"(?:(?:1[0-9][0-9]\.)|(?:2[0-4][0-9]\.)|(?:25[0-5]\.)|(?:[1-9][0-9]\.)|(?:[0-9]\.)){3}",
    r"(?:(?:1[0-9][0-9])|(?:2[0-4][0-9])|(?:25[0-5])|(?:[1-9][0-9])|(?:[0-9]))",
    r"|([\da-fA-F]{1,4}:){7}[\da-fA-F]{1,4}"
);

/// data-juicer's `clean_links_mapper` pattern (John Gruber's liberal URL regex): a scheme
/// (`word:` then `/`, `//`, `///` or a letter/digit/`%`), `www.`, or a `domain.tld/`, then
/// any run of non-space, non-`()<>` chars or balanced parentheses, not ending in punctuation.
pub const LINKS_PATTERN: &str = concat!(
    r"(?i)\b(",
    r"(?:[a-z][\w-]+:(?:/{1,3}|[a-z0-9%])|www\d{0,3}[.]|[a-z0-9.\-]+[.][a-z]{2,4}/)",
    r"(?:[^\s()<>]+|\(([^\s()<>]+|(\([^\s()<>]+\)))*\))",
    r"+(?:\(([^\s()<>]+|(\([^\s()<>]+\)))*\)",
    r#"|[^\s`!()\[\]{};:'".,<>?«»“”‘’])"#,
    r")"
);

/// The characters `remove_specific_chars_mapper` removes by default in data-juicer (and in the
/// text preset).
pub const DEFAULT_CHARS_TO_REMOVE: &str = "◆●■►▼▲▴∆▻▷❖♡□";

fn compile(pattern: &str, what: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| DataError::Invalid(format!("{what}: invalid regex: {e}")))
}

fn builtin(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("built-in pattern compiles (tested)"))
}

/// A regex-replacement mapper (`clean_email_mapper`, `clean_ip_mapper`, `clean_links_mapper`):
/// every non-overlapping match replaced by the literal `repl`.
#[derive(Clone, Debug)]
pub struct RegexCleaner {
    re: Regex,
    repl: String,
}

impl RegexCleaner {
    pub fn new(pattern: &str, repl: &str, what: &str) -> Result<RegexCleaner> {
        Ok(RegexCleaner { re: compile(pattern, what)?, repl: repl.to_string() })
    }

    pub fn apply(&self, text: &str) -> String {
        self.re.replace_all(text, regex::NoExpand(&self.repl)).into_owned()
    }
}

/// `clean_email_mapper` with the default pattern: e-mail addresses removed.
pub fn clean_email(text: &str) -> String {
    static RE: OnceLock<Regex> = OnceLock::new();
    builtin(&RE, EMAIL_PATTERN).replace_all(text, "").into_owned()
}

/// `clean_ip_mapper` with the default pattern: IPv4 and full-form IPv6 addresses removed.
pub fn clean_ip(text: &str) -> String {
    static RE: OnceLock<Regex> = OnceLock::new();
    builtin(&RE, IP_PATTERN).replace_all(text, "").into_owned()
}

/// `clean_links_mapper` with the default pattern: links removed. Texts with none of `:`, `/`
/// and `.` (every match needs one) skip the regex.
pub fn clean_links(text: &str) -> String {
    static RE: OnceLock<Regex> = OnceLock::new();
    if !text.contains([':', '/', '.']) {
        return text.to_string();
    }
    builtin(&RE, LINKS_PATTERN).replace_all(text, "").into_owned()
}

/// `clean_copyright_mapper`: if the text has a `/* … */` block comment, the first one is cut
/// when it contains "copyright" (any case) and nothing else is done; otherwise the leading
/// lines that start with `//`, `#` or `--`, or are empty, are removed.
pub fn clean_copyright(text: &str) -> String {
    static BLOCK: OnceLock<Regex> = OnceLock::new();
    if text.contains("/*") {
        let block = builtin(&BLOCK, r"/\*[^*]*\*+(?:[^/*][^*]*\*+)*/");
        if let Some(m) = block.find(text) {
            if m.as_str().to_lowercase().contains("copyright") {
                let mut out = String::with_capacity(text.len() - m.len());
                out.push_str(&text[..m.start()]);
                out.push_str(&text[m.end()..]);
                return out;
            }
            return text.to_string();
        }
    }
    let mut skip = 0;
    let mut rest = text;
    loop {
        let (line, tail) = match rest.find('\n') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let comment = line.is_empty()
            || line.starts_with("//")
            || line.starts_with('#')
            || line.starts_with("--");
        if !comment {
            break;
        }
        skip += 1;
        match tail {
            Some(t) => rest = t,
            None => {
                rest = "";
                break;
            }
        }
    }
    if skip == 0 {
        text.to_string()
    } else {
        rest.to_string()
    }
}

/// `expand_macro_mapper`: LaTeX macros without arguments, `\newcommand{\name}{value}`,
/// `\newcommand*{\name}{value}` and `\def\name{value}` (name of ASCII letters and digits, the
/// definition ending its line), are collected in order of appearance (`\newcommand` ones first,
/// a later definition of the same name replacing the value), then each `\name` followed by a
/// char other than an ASCII letter or digit is replaced by the value, in collection order.
/// The definitions themselves are rewritten too, and a macro at the very end of the text is
/// not, exactly as in data-juicer. Macros with arguments are left alone.
pub fn expand_macro(text: &str) -> String {
    static NEWCOMMAND: OnceLock<Regex> = OnceLock::new();
    static DEF: OnceLock<Regex> = OnceLock::new();
    if !text.contains("\\newcommand") && !text.contains("\\def") {
        return text.to_string();
    }
    let nc = builtin(&NEWCOMMAND, r"(?m)\\\bnewcommand\b\*?\{(\\[a-zA-Z0-9]+?)\}\{(.*?)\}$");
    let def = builtin(&DEF, r"(?m)\\def\s*(\\[a-zA-Z0-9]+?)\s*\{(.*?)\}$");
    let mut macros: Vec<(String, String)> = Vec::new();
    for re in [nc, def] {
        for c in re.captures_iter(text) {
            let (name, value) = (c[1].to_string(), c[2].to_string());
            match macros.iter_mut().find(|(n, _)| *n == name) {
                Some(slot) => slot.1 = value,
                None => macros.push((name, value)),
            }
        }
    }
    let mut out = text.to_string();
    for (name, value) in &macros {
        let pattern = format!("({})([^a-zA-Z0-9])", regex::escape(name));
        // The name is `\` plus ASCII letters and digits, so the pattern always compiles.
        let Ok(re) = Regex::new(&pattern) else { continue };
        out = re
            .replace_all(&out, |c: &Captures| {
                let mut s = value.clone();
                s.push_str(&c[2]);
                s
            })
            .into_owned();
    }
    out
}

/// The punctuation table of `punctuation_normalization_mapper` (CCNet's, as used by
/// data-juicer): each char maps to an ASCII replacement. Note that it turns Chinese `。` into
/// `.`, `、` into `,` and the CJK quotes and brackets `「」《》` into `"`, and that `１`
/// (fullwidth one) maps to `"` (a quirk of the original table).
pub const PUNCTUATION_TABLE: &[(char, &str)] = &[
    ('，', ","),
    ('。', "."),
    ('、', ","),
    ('„', "\""),
    ('”', "\""),
    ('“', "\""),
    ('«', "\""),
    ('»', "\""),
    ('１', "\""),
    ('」', "\""),
    ('「', "\""),
    ('《', "\""),
    ('》', "\""),
    ('´', "'"),
    ('∶', ":"),
    ('：', ":"),
    ('？', "?"),
    ('！', "!"),
    ('（', "("),
    ('）', ")"),
    ('；', ";"),
    ('–', "-"),
    ('—', " - "),
    ('．', ". "),
    ('～', "~"),
    ('’', "'"),
    ('…', "..."),
    ('━', "-"),
    ('〈', "<"),
    ('〉', ">"),
    ('【', "["),
    ('】', "]"),
    ('％', "%"),
    ('►', "-"),
];

/// `punctuation_normalization_mapper`: every char of [`PUNCTUATION_TABLE`] replaced.
pub fn punctuation_normalization(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
            continue;
        }
        match PUNCTUATION_TABLE.iter().find(|(k, _)| *k == c) {
            Some((_, r)) => out.push_str(r),
            None => out.push(c),
        }
    }
    out
}

/// data-juicer's `VARIOUS_WHITESPACES`, the characters `whitespace_normalization_mapper` turns
/// into a plain space: tab, space, U+0084, no-break space U+00A0, the typographic spaces
/// U+2000–U+200A, the zero-width space, non-joiner and joiner U+200B–U+200D, U+202F, U+205F,
/// the word joiner U+2060, the ideographic space U+3000 and the object replacement char
/// U+FFFC. Line breaks are kept; tabs are not.
pub fn is_various_whitespace(c: char) -> bool {
    matches!(
        c,
        '\t' | ' ' | '\u{84}' | '\u{a0}' | '\u{2000}'
            ..='\u{200d}' | '\u{202f}' | '\u{205f}' | '\u{2060}' | '\u{3000}' | '\u{fffc}'
    )
}

/// `whitespace_normalization_mapper`: Python `strip()` of both ends, then every
/// [`is_various_whitespace`] char replaced by `' '`.
pub fn whitespace_normalization(text: &str) -> String {
    super::filters::py_strip(text)
        .chars()
        .map(|c| if is_various_whitespace(c) { ' ' } else { c })
        .collect()
}

/// `remove_specific_chars_mapper`: every char of `chars` removed.
pub fn remove_specific_chars(text: &str, chars: &[char]) -> String {
    text.chars().filter(|c| !chars.contains(c)).collect()
}

/// data-juicer's sentence splitter of `remove_repeat_sentences_mapper`: a break is inserted
/// after `.` `。` `！` `!` `？` `?`, after six dots, after two `…`, and after one of those
/// marks followed by a closing quote `’` or `”` — each time only when the next char is not a
/// closing quote — then the line is split at the breaks. The last rule's character class is
/// data-juicer's literally (`[.。!！？\?\.{6}\…{2}]`, so it also holds `{`, `6`, `}`, `2`).
pub fn split_sentences(line: &str) -> Vec<String> {
    static RES: OnceLock<[Regex; 4]> = OnceLock::new();
    let res = RES.get_or_init(|| {
        [
            r"([.。！!？?])([^’”])",
            r"(\.{6})([^’”])",
            r"(…{2})([^’”])",
            r"([.。!！？?\{6\}…2][’”])([^’”])",
        ]
        .map(|p| Regex::new(p).expect("built-in pattern compiles (tested)"))
    });
    let mut s = line.to_string();
    for re in res {
        s = re.replace_all(&s, "${1}\n${2}").into_owned();
    }
    s.split('\n').map(str::to_string).collect()
}

/// `remove_repeat_sentences_mapper`: within each line (split on `\n`), sentences
/// ([`split_sentences`]) whose key was already seen anywhere earlier in the document are
/// dropped. The key is the sentence stripped of surrounding whitespace, lower-cased when
/// `lowercase`, and with every char outside `[a-zA-Z0-9\u4e00-\u9fa5\n\t ]` removed when
/// `ignore_special_character`; sentences whose key is shorter than `min_len` chars are always
/// kept. Kept sentences are rejoined without separator; lines keep their `\n`.
pub fn remove_repeat_sentences(
    text: &str,
    lowercase: bool,
    ignore_special_character: bool,
    min_len: usize,
) -> String {
    static SPECIAL: OnceLock<Regex> = OnceLock::new();
    let special = builtin(&SPECIAL, "[^a-zA-Z0-9\u{4e00}-\u{9fa5}\n\t ]");
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if line.is_empty() {
            continue;
        }
        for sentence in split_sentences(line) {
            let mut key = super::filters::py_strip(&sentence).to_string();
            if lowercase {
                key = key.to_lowercase();
            }
            if ignore_special_character {
                key = special.replace_all(&key, "").into_owned();
            }
            if key.chars().count() < min_len {
                out.push_str(&sentence);
            } else if !seen.contains(&key) {
                out.push_str(&sentence);
                seen.insert(key);
            }
        }
    }
    out
}

/// `chinese_convert_mapper` with mode `t2s`: OpenCC's Traditional → Simplified conversion.
///
/// OpenCC's `t2s` configuration is one conversion step over the dictionary group
/// (`TSPhrases`, `TSCharacters`): at each position the longest key of either dictionary that
/// prefixes the rest of the text is replaced by its first value (a tie goes to `TSPhrases`), and
/// a char that starts no key is copied. The two dictionary files are OpenCC's (Apache-2.0,
/// <https://github.com/BYVoid/OpenCC>), as shipped by the `ferrous-opencc` 0.4 crate, stored in
/// `opencc/` and compiled into the binary.
pub struct T2s {
    map: std::collections::HashMap<&'static str, &'static str>,
    first_chars: std::collections::HashSet<char>,
    max_key_chars: usize,
}

/// OpenCC's `TSCharacters.txt`: single traditional characters.
pub const TS_CHARACTERS: &str = include_str!("opencc/TSCharacters.txt");
/// OpenCC's `TSPhrases.txt`: phrases whose conversion differs from char-by-char.
pub const TS_PHRASES: &str = include_str!("opencc/TSPhrases.txt");

impl T2s {
    /// Parses the embedded dictionaries: `key<TAB>value[ value…]` lines, `#` comments; a later
    /// line for the same key replaces an earlier one.
    pub fn new() -> Result<T2s> {
        let mut map = std::collections::HashMap::new();
        // Characters first, so that a phrase entry for the same key wins the tie.
        for dict in [TS_CHARACTERS, TS_PHRASES] {
            for line in dict.lines() {
                let trimmed = line.trim();
                if trimmed.is_empty() || trimmed.starts_with('#') {
                    continue;
                }
                let mut parts = line.split('\t');
                let (Some(key), Some(values), None) = (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let values: Vec<&str> = values.split(' ').collect();
                if key.is_empty() || values.iter().any(|v| v.is_empty()) {
                    continue;
                }
                map.insert(key, values[0]);
            }
        }
        if map.is_empty() {
            return Err(DataError::Invalid(
                "the embedded OpenCC t2s dictionaries are empty".into(),
            ));
        }
        let first_chars = map.keys().filter_map(|k| k.chars().next()).collect();
        let max_key_chars = map.keys().map(|k| k.chars().count()).max().unwrap_or(1);
        Ok(T2s { map, first_chars, max_key_chars })
    }

    /// The shared converter (built once per process).
    pub fn shared() -> Result<&'static T2s> {
        static CELL: OnceLock<std::result::Result<T2s, String>> = OnceLock::new();
        CELL.get_or_init(|| T2s::new().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| DataError::Invalid(e.clone()))
    }

    /// The text converted.
    pub fn convert(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            if c.is_ascii() || !self.first_chars.contains(&c) {
                out.push(c);
                rest = &rest[c.len_utf8()..];
                continue;
            }
            // Byte ends of the candidate keys, longest first.
            let ends: Vec<usize> = rest
                .char_indices()
                .skip(1)
                .map(|(i, _)| i)
                .chain(std::iter::once(rest.len()))
                .take(self.max_key_chars)
                .collect();
            match ends.iter().rev().find_map(|&e| self.map.get(&rest[..e]).map(|v| (e, *v))) {
                Some((e, v)) => {
                    out.push_str(v);
                    rest = &rest[e..];
                }
                None => {
                    out.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        out
    }
}

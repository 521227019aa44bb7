//! The statistics of the filters (spec §2.4), each a pure function of the text, and the
//! character sets they use.
//!
//! Conventions, matching data-juicer's Python: a "char" is a Unicode scalar value (`len(str)`),
//! lines are Python's `str.splitlines()`, words are the text split on `' '`, `'\n'` and `'\t'`,
//! lower-cased, with [`is_special`] characters stripped from both ends and empty words dropped.
//! A filter keeps a document when `min ≤ stat ≤ max` ([`in_range`]); an absent bound is open.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;

/// A set of chars as sorted, disjoint inclusive ranges, with an ASCII fast path.
#[derive(Clone, Debug)]
pub struct CharSet {
    ascii: [bool; 128],
    ranges: Vec<(u32, u32)>,
}

impl CharSet {
    /// The set of a built-in regex character class (`[\p{L}\p{N}]`). Panics only on a
    /// malformed built-in class, which the tests cover.
    pub(crate) fn from_class(class: &str) -> CharSet {
        let hir = regex_syntax::parse(class).expect("built-in character class parses");
        match hir.kind() {
            regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(c)) => {
                Self::from_ranges(c.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)))
            }
            _ => panic!("built-in pattern {class:?} is not a Unicode character class"),
        }
    }

    /// The set of the union of inclusive code point ranges.
    pub(crate) fn from_ranges(ranges: impl IntoIterator<Item = (u32, u32)>) -> CharSet {
        let mut ranges: Vec<(u32, u32)> = ranges.into_iter().collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        let mut ascii = [false; 128];
        for (i, slot) in ascii.iter_mut().enumerate() {
            *slot = Self::search(&merged, i as u32);
        }
        CharSet { ascii, ranges: merged }
    }

    fn search(ranges: &[(u32, u32)], c: u32) -> bool {
        match ranges.binary_search_by(|&(s, _)| s.cmp(&c)) {
            Ok(_) => true,
            Err(0) => false,
            Err(i) => ranges[i - 1].1 >= c,
        }
    }

    /// Whether `c` is in the set.
    #[inline]
    pub fn contains(&self, c: char) -> bool {
        let u = c as u32;
        if u < 128 {
            self.ascii[u as usize]
        } else {
            Self::search(&self.ranges, u)
        }
    }
}

/// Python's `str.isalnum()` for one char, as the Unicode classes `\p{L}` ∪ `\p{N}` (letters:
/// Lu Ll Lt Lm Lo; numbers: Nd Nl No). Python's definition (alphabetic = category L*, numeric =
/// a Numeric_Type) agrees except for a handful of code points.
pub fn is_alnum(c: char) -> bool {
    static SET: OnceLock<CharSet> = OnceLock::new();
    if c.is_ascii() {
        return c.is_ascii_alphanumeric();
    }
    SET.get_or_init(|| CharSet::from_class(r"[\p{L}\p{N}]")).contains(c)
}

/// data-juicer's `OTHER_SPECIAL_CHARACTERS`, code point for code point (taken from BigScience's
/// filtering code): typographic spaces, C1 controls, quotes, dashes, bullets, arrows, CJK
/// punctuation, a few Devanagari/Bengali vowel signs and frequent noise characters, among them
/// `一`, `上`, `士`, `ン`, `ッ`, `ツ`, `シ` (so `一` counts as special in Chinese text).
pub const OTHER_SPECIAL_CHARACTERS: &str = concat!(
    "\u{92}\u{2009}\u{93}\u{97}\u{200a}\u{9d}\u{99}\u{202f}\u{96}\u{2005}",
    "\u{95}\u{91}\u{9c}\u{3000}\u{2002} \u{2008}\u{98}\u{81}\u{2003}\u{82}",
    "\u{fffc}\u{83}\u{84}’“”–ー一▬…✦�\u{ad}£\u{200b}•€«»°·═×士＾˘⇓↓↑←→（）§″′´¿−±",
    "∈\u{feff}¢ø‚„½¼¾¹²³―⁃，ˌ¸‹›ʺˈʻ¦‐\u{2800}‰\u{85}\u{85}‑≤≥‖◆●■►▼▲▴∆▻¡★☆✱ː",
    "º。¯˜¥ɪ≈†上ン：∼⁄・♡✓⊕․．⋅÷１‟；،、¨\u{93e}\u{9be}\u{940}\u{94d}\u{947}◦˚゜ʼ≖ʼ¤ッ",
    "ツシ℃√！【】‿∞➤～πه۩☛₨➩☻๑٪♥ı\u{97d}《‘©﴿٬？▷Г♫∟™ª₪®「—❖」﴾》",
);

/// The single-code-point keys of the `emoji` package's `EMOJI_DATA` (version 2.16: 1,409 code
/// points), which data-juicer adds to `SPECIAL_CHARACTERS`; inclusive ranges.
pub const EMOJI_RANGES: &[(u32, u32)] = &[
    (0xA9, 0xA9),
    (0xAE, 0xAE),
    (0x203C, 0x203C),
    (0x2049, 0x2049),
    (0x2122, 0x2122),
    (0x2139, 0x2139),
    (0x2194, 0x2199),
    (0x21A9, 0x21AA),
    (0x231A, 0x231B),
    (0x2328, 0x2328),
    (0x23CF, 0x23CF),
    (0x23E9, 0x23F3),
    (0x23F8, 0x23FA),
    (0x24C2, 0x24C2),
    (0x25AA, 0x25AB),
    (0x25B6, 0x25B6),
    (0x25C0, 0x25C0),
    (0x25FB, 0x25FE),
    (0x2600, 0x2604),
    (0x260E, 0x260E),
    (0x2611, 0x2611),
    (0x2614, 0x2615),
    (0x2618, 0x2618),
    (0x261D, 0x261D),
    (0x2620, 0x2620),
    (0x2622, 0x2623),
    (0x2626, 0x2626),
    (0x262A, 0x262A),
    (0x262E, 0x262F),
    (0x2638, 0x263A),
    (0x2640, 0x2640),
    (0x2642, 0x2642),
    (0x2648, 0x2653),
    (0x265F, 0x2660),
    (0x2663, 0x2663),
    (0x2665, 0x2666),
    (0x2668, 0x2668),
    (0x267B, 0x267B),
    (0x267E, 0x267F),
    (0x2692, 0x2697),
    (0x2699, 0x2699),
    (0x269B, 0x269C),
    (0x26A0, 0x26A1),
    (0x26A7, 0x26A7),
    (0x26AA, 0x26AB),
    (0x26B0, 0x26B1),
    (0x26BD, 0x26BE),
    (0x26C4, 0x26C5),
    (0x26C8, 0x26C8),
    (0x26CE, 0x26CF),
    (0x26D1, 0x26D1),
    (0x26D3, 0x26D4),
    (0x26E9, 0x26EA),
    (0x26F0, 0x26F5),
    (0x26F7, 0x26FA),
    (0x26FD, 0x26FD),
    (0x2702, 0x2702),
    (0x2705, 0x2705),
    (0x2708, 0x270D),
    (0x270F, 0x270F),
    (0x2712, 0x2712),
    (0x2714, 0x2714),
    (0x2716, 0x2716),
    (0x271D, 0x271D),
    (0x2721, 0x2721),
    (0x2728, 0x2728),
    (0x2733, 0x2734),
    (0x2744, 0x2744),
    (0x2747, 0x2747),
    (0x274C, 0x274C),
    (0x274E, 0x274E),
    (0x2753, 0x2755),
    (0x2757, 0x2757),
    (0x2763, 0x2764),
    (0x2795, 0x2797),
    (0x27A1, 0x27A1),
    (0x27B0, 0x27B0),
    (0x27BF, 0x27BF),
    (0x2934, 0x2935),
    (0x2B05, 0x2B07),
    (0x2B1B, 0x2B1C),
    (0x2B50, 0x2B50),
    (0x2B55, 0x2B55),
    (0x3030, 0x3030),
    (0x303D, 0x303D),
    (0x3297, 0x3297),
    (0x3299, 0x3299),
    (0x1F004, 0x1F004),
    (0x1F0CF, 0x1F0CF),
    (0x1F170, 0x1F171),
    (0x1F17E, 0x1F17F),
    (0x1F18E, 0x1F18E),
    (0x1F191, 0x1F19A),
    (0x1F201, 0x1F202),
    (0x1F21A, 0x1F21A),
    (0x1F22F, 0x1F22F),
    (0x1F232, 0x1F23A),
    (0x1F250, 0x1F251),
    (0x1F300, 0x1F321),
    (0x1F324, 0x1F393),
    (0x1F396, 0x1F397),
    (0x1F399, 0x1F39B),
    (0x1F39E, 0x1F3F0),
    (0x1F3F3, 0x1F3F5),
    (0x1F3F7, 0x1F4FD),
    (0x1F4FF, 0x1F53D),
    (0x1F549, 0x1F54E),
    (0x1F550, 0x1F567),
    (0x1F56F, 0x1F570),
    (0x1F573, 0x1F57A),
    (0x1F587, 0x1F587),
    (0x1F58A, 0x1F58D),
    (0x1F590, 0x1F590),
    (0x1F595, 0x1F596),
    (0x1F5A4, 0x1F5A5),
    (0x1F5A8, 0x1F5A8),
    (0x1F5B1, 0x1F5B2),
    (0x1F5BC, 0x1F5BC),
    (0x1F5C2, 0x1F5C4),
    (0x1F5D1, 0x1F5D3),
    (0x1F5DC, 0x1F5DE),
    (0x1F5E1, 0x1F5E1),
    (0x1F5E3, 0x1F5E3),
    (0x1F5E8, 0x1F5E8),
    (0x1F5EF, 0x1F5EF),
    (0x1F5F3, 0x1F5F3),
    (0x1F5FA, 0x1F64F),
    (0x1F680, 0x1F6C5),
    (0x1F6CB, 0x1F6D2),
    (0x1F6D5, 0x1F6D9),
    (0x1F6DC, 0x1F6E5),
    (0x1F6E9, 0x1F6E9),
    (0x1F6EB, 0x1F6EC),
    (0x1F6F0, 0x1F6F0),
    (0x1F6F3, 0x1F6FC),
    (0x1F7E0, 0x1F7EB),
    (0x1F7F0, 0x1F7F0),
    (0x1F90C, 0x1F93A),
    (0x1F93C, 0x1F945),
    (0x1F947, 0x1F9FF),
    (0x1FA70, 0x1FA7C),
    (0x1FA80, 0x1FAC6),
    (0x1FAC8, 0x1FAC8),
    (0x1FACC, 0x1FADD),
    (0x1FADF, 0x1FAEB),
    (0x1FAEF, 0x1FAFA),
];

/// data-juicer's `SPECIAL_CHARACTERS`: Python's `string.punctuation + string.digits +
/// string.whitespace` (all 32 ASCII punctuation marks, `0-9`, space `\t \n \r \x0b \x0c`),
/// [`OTHER_SPECIAL_CHARACTERS`] and the emoji of [`EMOJI_RANGES`].
pub fn is_special(c: char) -> bool {
    static SET: OnceLock<CharSet> = OnceLock::new();
    SET.get_or_init(|| {
        let ascii = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~0123456789 \t\n\r\x0b\x0c";
        CharSet::from_ranges(EMOJI_RANGES.iter().copied().chain(
            ascii.chars().chain(OTHER_SPECIAL_CHARACTERS.chars()).map(|c| (c as u32, c as u32)),
        ))
    })
    .contains(c)
}

/// Python's `str.isspace()`: Unicode White_Space plus the separators U+001C–U+001F.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` (no arguments).
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// Python's `str.splitlines()`: splits on `\n`, `\r`, `\r\n`, `\x0b`, `\x0c`, `\x1c`, `\x1d`,
/// `\x1e`, `\x85`, U+2028 and U+2029; a final line break does not start an empty line.
pub fn splitlines(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut it = text.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        let brk = matches!(
            c,
            '\n' | '\r'
                | '\x0b'
                | '\x0c'
                | '\x1c'
                | '\x1d'
                | '\x1e'
                | '\u{85}'
                | '\u{2028}'
                | '\u{2029}'
        );
        if brk {
            lines.push(&text[start..i]);
            let mut end = i + c.len_utf8();
            if c == '\r' {
                if let Some(&(_, '\n')) = it.peek() {
                    it.next();
                    end += 1;
                }
            }
            start = end;
        }
    }
    if start < text.len() {
        lines.push(&text[start..]);
    }
    lines
}

/// Number of chars (`len(text)`).
pub fn text_length(text: &str) -> usize {
    text.chars().count()
}

/// `alphanumeric_filter` with `tokenization=false`: chars with [`is_alnum`] ÷ all chars
/// (0 for an empty text).
pub fn alnum_ratio(text: &str) -> f64 {
    let (mut n, mut alnum) = (0usize, 0usize);
    for c in text.chars() {
        n += 1;
        alnum += usize::from(is_alnum(c));
    }
    if n == 0 {
        0.0
    } else {
        alnum as f64 / n as f64
    }
}

/// `average_line_length_filter`: all chars of the text (line breaks included) ÷ the number of
/// [`splitlines`] lines (0 when there are none).
pub fn average_line_length(text: &str) -> f64 {
    let lines = splitlines(text).len();
    if lines == 0 {
        0.0
    } else {
        text_length(text) as f64 / lines as f64
    }
}

/// `maximum_line_length_filter`: the longest [`splitlines`] line in chars (0 when none).
pub fn maximum_line_length(text: &str) -> usize {
    splitlines(text).iter().map(|l| text_length(l)).max().unwrap_or(0)
}

/// `special_characters_filter`: chars with [`is_special`] ÷ all chars (0 for an empty text).
pub fn special_characters_ratio(text: &str) -> f64 {
    let (mut n, mut special) = (0usize, 0usize);
    for c in text.chars() {
        n += 1;
        special += usize::from(is_special(c));
    }
    if n == 0 {
        0.0
    } else {
        special as f64 / n as f64
    }
}

/// FxHash (rustc's hasher): the n-gram counts hash many short keys and need no DoS resistance.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(buf));
        }
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

pub(crate) type FxBuild = BuildHasherDefault<FxHasher>;

/// The number of occurrences of each distinct `n`-gram (overlapping windows) of `seq`, in no
/// particular order. Windows are keyed by a rolling polynomial hash; every hash hit is checked
/// against the window first seen with that hash, and on a collision the count is redone with
/// the windows themselves as keys, so the result is exact.
fn ngram_counts<T: Copy + Eq + std::hash::Hash>(
    seq: &[T],
    n: usize,
    code: impl Fn(T) -> u64,
) -> Vec<u64> {
    use std::collections::hash_map::Entry;
    const B: u64 = 0x0000_0100_0000_01b3;
    if n == 0 || seq.len() < n {
        return Vec::new();
    }
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let top = B.wrapping_pow((n - 1) as u32);
    let mut h = seq[..n].iter().fold(0u64, |h, &x| h.wrapping_mul(B).wrapping_add(code(x)));
    let mut map: HashMap<u64, (usize, u64), FxBuild> =
        HashMap::with_capacity_and_hasher(seq.len() - n + 1, FxBuild::default());
    for i in 0..=seq.len() - n {
        if i > 0 {
            h = h
                .wrapping_sub(code(seq[i - 1]).wrapping_mul(top))
                .wrapping_mul(B)
                .wrapping_add(code(seq[i + n - 1]));
        }
        match map.entry(mix(h)) {
            Entry::Occupied(mut e) => {
                let (first, count) = e.get_mut();
                if seq[*first..*first + n] != seq[i..i + n] {
                    let mut exact: HashMap<&[T], u64, FxBuild> = HashMap::default();
                    for w in seq.windows(n) {
                        *exact.entry(w).or_insert(0) += 1;
                    }
                    return exact.into_values().collect();
                }
                *count += 1;
            }
            Entry::Vacant(e) => {
                e.insert((i, 1));
            }
        }
    }
    map.into_values().map(|(_, c)| c).collect()
}

/// `character_repetition_filter` with n-gram length `n`: the frequencies of all overlapping
/// char `n`-grams sorted in descending order; `r = min(⌊√distinct⌋, distinct − singletons)`;
/// ratio = sum of the top `r` frequencies ÷ sum of all (0 when the text has fewer than `n` chars).
pub fn character_repetition_ratio(text: &str, n: usize) -> f64 {
    let chars: Vec<char> = text.chars().collect();
    let mut counts = ngram_counts(&chars, n, u64::from);
    if counts.is_empty() {
        return 0.0;
    }
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let distinct = counts.len();
    let singletons = counts.iter().filter(|&&f| f == 1).count();
    let r = (distinct as f64).sqrt().floor() as usize;
    let r = r.min(distinct - singletons);
    let total: u64 = counts.iter().sum();
    counts[..r].iter().sum::<u64>() as f64 / total as f64
}

/// The words of the word filters (tokenization=false): split on `' '`, `'\n'`, `'\t'`, each
/// lower-cased and stripped of [`is_special`] chars at both ends, empty words dropped.
pub fn words(text: &str) -> Vec<String> {
    text.split([' ', '\n', '\t'])
        .filter(|w| !w.is_empty())
        .filter_map(|w| {
            let w = w.to_lowercase();
            let s = w.trim_matches(is_special);
            if s.is_empty() {
                None
            } else if s.len() == w.len() {
                Some(w)
            } else {
                Some(s.to_string())
            }
        })
        .collect()
}

/// `words_num_filter`: the number of [`words`].
pub fn words_num(text: &str) -> usize {
    words(text).len()
}

/// `word_repetition_filter` with n-gram length `n` over [`words`]: the sum of the frequencies
/// of word `n`-grams occurring more than once ÷ the sum of all frequencies (0 when there are
/// fewer than `n` words).
pub fn word_repetition_ratio(text: &str, n: usize) -> f64 {
    let w = words(text);
    let mut ids: HashMap<&str, u32, FxBuild> = HashMap::default();
    let seq: Vec<u32> = w
        .iter()
        .map(|word| {
            let next = ids.len() as u32;
            *ids.entry(word.as_str()).or_insert(next)
        })
        .collect();
    let counts = ngram_counts(&seq, n, u64::from);
    let total: u64 = counts.iter().sum();
    let repeated: u64 = counts.iter().filter(|&&f| f > 1).sum();
    if total == 0 {
        0.0
    } else {
        repeated as f64 / total as f64
    }
}

/// The keep decision of every filter: `min ≤ stat ≤ max`, both inclusive, `None` unbounded.
pub fn in_range(stat: f64, min: Option<f64>, max: Option<f64>) -> bool {
    min.is_none_or(|m| stat >= m) && max.is_none_or(|m| stat <= m)
}

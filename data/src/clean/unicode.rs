//! `fix_unicode_mapper`: a documented subset of `ftfy.fix_text(text, normalization="NFC")`,
//! the function data-juicer calls, with ftfy's steps in ftfy's order:
//!
//! 1. HTML character references ending in `;` are decoded, in the lines before the first line
//!    holding a `<` (ftfy's `unescape_html="auto"`), with the entity subset of [`super::html`];
//! 2. ANSI terminal escapes (`ESC [ digits/; letter`) are removed;
//! 3. mojibake, UTF-8 read as Windows-1252 or Latin-1, is repaired by [`fix_mojibake`]
//!    (a conservative subset of ftfy's `fix_encoding`), then C1 control chars U+0080–U+009F
//!    become their Windows-1252 chars (ftfy's `fix_c1_controls`);
//! 4. Latin ligatures (`ﬁ` → `fi`, `ĳ` → `ij`, …) are expanded;
//! 5. fullwidth and halfwidth forms U+FF01–U+FFEF are replaced by their NFKC form (`Ａ` → `A`,
//!    `，` → `,`, `ｶ` → `カ`) and U+3000 by a space (ftfy's `fix_character_width`);
//! 6. curly quotes become straight: U+02BC and U+2018–U+201B → `'`, U+201C–U+201F → `"`;
//! 7. `\r\n`, `\r`, U+2028 and U+2029 become `\n` (ftfy lists U+0085 too, but step 3 has
//!    already made it `…`);
//! 8. control chars are removed: U+0000–U+0008, U+000B, U+000E–U+001F, U+007F,
//!    U+206A–U+206F, U+FEFF and U+FFF9–U+FFFC (tab, `\n`, form feed and `\r` are kept);
//! 9. Unicode NFC.
//!
//! Not done: ftfy's badness heuristic and its partial repairs inside mixed text, the
//! `restore_byte_a0` and `replace_lossy_sequences` repairs, encodings other than
//! Windows-1252/Latin-1 (e.g. mojibake through MacRoman or cp437), and surrogate fixing
//! (a Rust string cannot hold surrogates).

use super::filters::CharSet;
use std::sync::OnceLock;
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// Windows-1252 bytes 0x80–0x9F as code points (0 where the byte is undefined).
pub const CP1252_80_9F: [u32; 32] = [
    0x20AC, 0, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160, 0x2039,
    0x0152, 0, 0x017D, 0, 0, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014, 0x02DC,
    0x2122, 0x0161, 0x203A, 0x0153, 0, 0x017E, 0x0178,
];

/// The byte a char came from when UTF-8 was decoded as Windows-1252 or Latin-1: U+0080–U+00FF
/// are their own byte, the Windows-1252 punctuation of 0x80–0x9F its byte.
fn mojibake_byte(c: char) -> Option<u8> {
    let u = c as u32;
    if (0x80..=0xFF).contains(&u) {
        return Some(u as u8);
    }
    if u < 0x80 {
        return None;
    }
    CP1252_80_9F.iter().position(|&x| x == u).map(|i| 0x80 + i as u8)
}

/// Letters, numbers, punctuation, symbols and spaces: what a repaired char must be.
fn is_plausible(c: char) -> bool {
    static SET: OnceLock<CharSet> = OnceLock::new();
    SET.get_or_init(|| CharSet::from_class(r"[\p{L}\p{N}\p{P}\p{S}\p{Zs}]")).contains(c)
}

/// Repairs text that was encoded as UTF-8 and decoded as Windows-1252 or Latin-1
/// (`"Ã©"` → `"é"`, `"â€™"` → `"’"`, `"æ–‡å­—"` → `"文字"`, `"ðŸ˜€"` → `"😀"`). Each maximal run
/// of non-ASCII chars that all map back to a byte is replaced by its UTF-8 decoding when
/// (a) the bytes are valid UTF-8, (b) every decoded char is a letter, number, punctuation
/// mark, symbol or space, and (c) the run decodes to two or more chars, or to one char of
/// three or four UTF-8 bytes, or to one char whose lead byte is 0xC2/0xC3 (`Â`/`Ã`). Rule (c)
/// keeps legitimate Latin text such as `«CAFÉ»` (`É»` is valid UTF-8 for `ɻ`) unchanged.
pub fn fix_mojibake(text: &str) -> String {
    if text.is_ascii() {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut run_start: Option<usize> = None;
    let mut run_bytes: Vec<u8> = Vec::new();
    let flush = |out: &mut String, run: &str, bytes: &[u8]| {
        let fixed = std::str::from_utf8(bytes).ok().filter(|d| {
            let n = d.chars().count();
            d.chars().all(is_plausible)
                && (n >= 2 || d.len() >= 3 || matches!(bytes.first(), Some(0xC2 | 0xC3)))
        });
        out.push_str(fixed.unwrap_or(run));
    };
    for (i, c) in text.char_indices() {
        match (c.is_ascii(), mojibake_byte(c)) {
            (false, Some(b)) => {
                run_start.get_or_insert(i);
                run_bytes.push(b);
            }
            _ => {
                if let Some(s) = run_start.take() {
                    flush(&mut out, &text[s..i], &run_bytes);
                    run_bytes.clear();
                }
                out.push(c);
            }
        }
    }
    if let Some(s) = run_start {
        flush(&mut out, &text[s..], &run_bytes);
    }
    out
}

/// Decodes the `&…;` references of ftfy's `HTML_ENTITY_RE` (`&#?[0-9A-Za-z]{1,24};`) that
/// [`super::html::decode_entity`] knows; others stay as written.
fn unescape_semicolon_entities(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let b = rest.as_bytes();
        let body = usize::from(b.get(1) == Some(&b'#'));
        let n = b[1 + body..].iter().take(25).take_while(|c| c.is_ascii_alphanumeric()).count();
        let end = 1 + body + n;
        if (1..=24).contains(&n) && b.get(end) == Some(&b';') {
            if let Some((d, used)) = super::html::decode_entity(&rest[..=end]) {
                if used == end + 1 {
                    out.push_str(&d);
                    rest = &rest[end + 1..];
                    continue;
                }
            }
        }
        out.push('&');
        rest = &rest[1..];
    }
    out.push_str(rest);
    out
}

/// Removes ANSI terminal escapes `ESC [ (digit|;)* letter`.
fn remove_terminal_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("\x1b[") {
        out.push_str(&rest[..i]);
        let b = rest.as_bytes();
        let mut j = i + 2;
        while j < b.len() && (b[j].is_ascii_digit() || b[j] == b';') {
            j += 1;
        }
        if j < b.len() && b[j].is_ascii_alphabetic() {
            rest = &rest[j + 1..];
        } else {
            out.push('\x1b');
            rest = &rest[i + 1..];
        }
    }
    out.push_str(rest);
    out
}

fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

fn is_removed_control(c: char) -> bool {
    matches!(c, '\0'..='\x08' | '\x0b' | '\x0e'..='\x1f' | '\x7f' | '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}')
}

/// Steps 3b–8 of the module docs, one pass over the chars.
fn fix_chars(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let u = c as u32;
        let c = if (0x80..=0x9F).contains(&u) {
            match CP1252_80_9F[(u - 0x80) as usize] {
                0 => c,
                r => char::from_u32(r).unwrap_or(c),
            }
        } else {
            c
        };
        if let Some(l) = ligature(c) {
            out.push_str(l);
            continue;
        }
        match c {
            '\u{3000}' => out.push(' '),
            '\u{ff01}'..='\u{ffef}' => out.extend(std::iter::once(c).nfkc()),
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => out.push('\''),
            '\u{201c}'..='\u{201f}' => out.push('"'),
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push('\n');
            }
            '\u{2028}' | '\u{2029}' => out.push('\n'),
            c if is_removed_control(c) => {}
            c => out.push(c),
        }
    }
    out
}

/// `fix_unicode_mapper` (see the module docs).
pub fn fix_unicode(text: &str) -> String {
    let plain =
        |c: char| c.is_ascii() && !c.is_ascii_control() || matches!(c, '\n' | '\t' | '\x0c');
    if text.chars().all(plain) && !text.contains('&') {
        return text.to_string();
    }
    // ftfy works line by line and stops unescaping from the first line holding a `<` on.
    let mut s = if text.contains('&') {
        let cut = match text.find('<') {
            Some(i) => text[..i].rfind('\n').map_or(0, |j| j + 1),
            None => text.len(),
        };
        let mut s = unescape_semicolon_entities(&text[..cut]);
        s.push_str(&text[cut..]);
        s
    } else {
        text.to_string()
    };
    if s.contains('\x1b') {
        s = remove_terminal_escapes(&s);
    }
    if !s.is_ascii() {
        s = fix_mojibake(&s);
    }
    s = fix_chars(&s);
    if is_nfc_quick(s.chars()) != IsNormalized::Yes {
        s = s.nfc().collect();
    }
    s
}

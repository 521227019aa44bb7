//! `clean_html_mapper`: the text content of a document parsed as HTML.
//!
//! data-juicer replaces `<li>` and `<ol>` by `"\n*"`, deletes `</li>` and `</ol>`, parses the
//! result with selectolax and takes the concatenation of all text nodes. This module is a
//! small HTML5 tokenizer with the same observable result on the documents of a text corpus:
//!
//! - start tags `<name …>` (attributes, quoted values included) and end tags `</name …>` are
//!   removed; `<!-- … -->` comments, `<!…>` (doctype) and `<?…>` are removed; a `<` not
//!   followed by a letter, `/`, `!` or `?` is text;
//! - the contents of `script`, `style`, `xmp`, `iframe`, `noembed`, `noframes` (raw text) and
//!   `title`, `textarea` (escapable raw text) are text up to the matching end tag, as the
//!   parser's text nodes are; after `<plaintext>` everything is text;
//! - character references are decoded: numeric ones (`&#233;`, `&#xE9;`, with or without `;`,
//!   HTML5's replacements for 0, surrogates, out-of-range values and the Windows-1252 range
//!   0x80–0x9F) and the named ones of [`NAMED_ENTITIES`] (with `;`; HTML5's 106 legacy
//!   names such as `&amp` or `&eacute` also without). Other names are left as written;
//! - `\r\n` and `\r` become `\n`, NUL chars are dropped, a line feed right after `<pre>`,
//!   `<listing>` or `<textarea>` is dropped, and whitespace before the first text or start tag
//!   is dropped (the HTML tree builder ignores it).
//!
//! Not reproduced: the tree builder's reordering of misnested markup — text inside a `<table>`
//! but outside its cells is moved before the table by an HTML parser ("foster parenting") and
//! stays in place here —, `<template>` contents (kept here), and the HTML5-only entity names
//! (HTML5 has 2,231; the 259 here are HTML 4's, which is what documents use). On the corpus
//! samples (5,081 documents, code included) the output equals selectolax's except for three
//! code files that build HTML tables in strings.

/// The named character references decoded (with a `;`): HTML 4's 252 names (the Latin-1,
/// symbol and Greek sets, as Python's `html.entities.name2codepoint`), `apos`, and the
/// upper-case `AMP` `COPY` `GT` `LT` `QUOT` `REG`; sorted for binary search.
pub const NAMED_ENTITIES: &[(&str, &str)] = &[
    ("AElig", "Æ"),
    ("AMP", "&"),
    ("Aacute", "Á"),
    ("Acirc", "Â"),
    ("Agrave", "À"),
    ("Alpha", "Α"),
    ("Aring", "Å"),
    ("Atilde", "Ã"),
    ("Auml", "Ä"),
    ("Beta", "Β"),
    ("COPY", "©"),
    ("Ccedil", "Ç"),
    ("Chi", "Χ"),
    ("Dagger", "‡"),
    ("Delta", "Δ"),
    ("ETH", "Ð"),
    ("Eacute", "É"),
    ("Ecirc", "Ê"),
    ("Egrave", "È"),
    ("Epsilon", "Ε"),
    ("Eta", "Η"),
    ("Euml", "Ë"),
    ("GT", ">"),
    ("Gamma", "Γ"),
    ("Iacute", "Í"),
    ("Icirc", "Î"),
    ("Igrave", "Ì"),
    ("Iota", "Ι"),
    ("Iuml", "Ï"),
    ("Kappa", "Κ"),
    ("LT", "<"),
    ("Lambda", "Λ"),
    ("Mu", "Μ"),
    ("Ntilde", "Ñ"),
    ("Nu", "Ν"),
    ("OElig", "Œ"),
    ("Oacute", "Ó"),
    ("Ocirc", "Ô"),
    ("Ograve", "Ò"),
    ("Omega", "Ω"),
    ("Omicron", "Ο"),
    ("Oslash", "Ø"),
    ("Otilde", "Õ"),
    ("Ouml", "Ö"),
    ("Phi", "Φ"),
    ("Pi", "Π"),
    ("Prime", "″"),
    ("Psi", "Ψ"),
    ("QUOT", "\u{22}"),
    ("REG", "®"),
    ("Rho", "Ρ"),
    ("Scaron", "Š"),
    ("Sigma", "Σ"),
    ("THORN", "Þ"),
    ("Tau", "Τ"),
    ("Theta", "Θ"),
    ("Uacute", "Ú"),
    ("Ucirc", "Û"),
    ("Ugrave", "Ù"),
    ("Upsilon", "Υ"),
    ("Uuml", "Ü"),
    ("Xi", "Ξ"),
    ("Yacute", "Ý"),
    ("Yuml", "Ÿ"),
    ("Zeta", "Ζ"),
    ("aacute", "á"),
    ("acirc", "â"),
    ("acute", "´"),
    ("aelig", "æ"),
    ("agrave", "à"),
    ("alefsym", "ℵ"),
    ("alpha", "α"),
    ("amp", "&"),
    ("and", "∧"),
    ("ang", "∠"),
    ("apos", "'"),
    ("aring", "å"),
    ("asymp", "≈"),
    ("atilde", "ã"),
    ("auml", "ä"),
    ("bdquo", "„"),
    ("beta", "β"),
    ("brvbar", "¦"),
    ("bull", "•"),
    ("cap", "∩"),
    ("ccedil", "ç"),
    ("cedil", "¸"),
    ("cent", "¢"),
    ("chi", "χ"),
    ("circ", "ˆ"),
    ("clubs", "♣"),
    ("cong", "≅"),
    ("copy", "©"),
    ("crarr", "↵"),
    ("cup", "∪"),
    ("curren", "¤"),
    ("dArr", "⇓"),
    ("dagger", "†"),
    ("darr", "↓"),
    ("deg", "°"),
    ("delta", "δ"),
    ("diams", "♦"),
    ("divide", "÷"),
    ("eacute", "é"),
    ("ecirc", "ê"),
    ("egrave", "è"),
    ("empty", "∅"),
    ("emsp", "\u{2003}"),
    ("ensp", "\u{2002}"),
    ("epsilon", "ε"),
    ("equiv", "≡"),
    ("eta", "η"),
    ("eth", "ð"),
    ("euml", "ë"),
    ("euro", "€"),
    ("exist", "∃"),
    ("fnof", "ƒ"),
    ("forall", "∀"),
    ("frac12", "½"),
    ("frac14", "¼"),
    ("frac34", "¾"),
    ("frasl", "⁄"),
    ("gamma", "γ"),
    ("ge", "≥"),
    ("gt", ">"),
    ("hArr", "⇔"),
    ("harr", "↔"),
    ("hearts", "♥"),
    ("hellip", "…"),
    ("iacute", "í"),
    ("icirc", "î"),
    ("iexcl", "¡"),
    ("igrave", "ì"),
    ("image", "ℑ"),
    ("infin", "∞"),
    ("int", "∫"),
    ("iota", "ι"),
    ("iquest", "¿"),
    ("isin", "∈"),
    ("iuml", "ï"),
    ("kappa", "κ"),
    ("lArr", "⇐"),
    ("lambda", "λ"),
    ("lang", "〈"),
    ("laquo", "«"),
    ("larr", "←"),
    ("lceil", "⌈"),
    ("ldquo", "“"),
    ("le", "≤"),
    ("lfloor", "⌊"),
    ("lowast", "∗"),
    ("loz", "◊"),
    ("lrm", "\u{200e}"),
    ("lsaquo", "‹"),
    ("lsquo", "‘"),
    ("lt", "<"),
    ("macr", "¯"),
    ("mdash", "—"),
    ("micro", "µ"),
    ("middot", "·"),
    ("minus", "−"),
    ("mu", "μ"),
    ("nabla", "∇"),
    ("nbsp", "\u{a0}"),
    ("ndash", "–"),
    ("ne", "≠"),
    ("ni", "∋"),
    ("not", "¬"),
    ("notin", "∉"),
    ("nsub", "⊄"),
    ("ntilde", "ñ"),
    ("nu", "ν"),
    ("oacute", "ó"),
    ("ocirc", "ô"),
    ("oelig", "œ"),
    ("ograve", "ò"),
    ("oline", "‾"),
    ("omega", "ω"),
    ("omicron", "ο"),
    ("oplus", "⊕"),
    ("or", "∨"),
    ("ordf", "ª"),
    ("ordm", "º"),
    ("oslash", "ø"),
    ("otilde", "õ"),
    ("otimes", "⊗"),
    ("ouml", "ö"),
    ("para", "¶"),
    ("part", "∂"),
    ("permil", "‰"),
    ("perp", "⊥"),
    ("phi", "φ"),
    ("pi", "π"),
    ("piv", "ϖ"),
    ("plusmn", "±"),
    ("pound", "£"),
    ("prime", "′"),
    ("prod", "∏"),
    ("prop", "∝"),
    ("psi", "ψ"),
    ("quot", "\u{22}"),
    ("rArr", "⇒"),
    ("radic", "√"),
    ("rang", "〉"),
    ("raquo", "»"),
    ("rarr", "→"),
    ("rceil", "⌉"),
    ("rdquo", "”"),
    ("real", "ℜ"),
    ("reg", "®"),
    ("rfloor", "⌋"),
    ("rho", "ρ"),
    ("rlm", "\u{200f}"),
    ("rsaquo", "›"),
    ("rsquo", "’"),
    ("sbquo", "‚"),
    ("scaron", "š"),
    ("sdot", "⋅"),
    ("sect", "§"),
    ("shy", "\u{ad}"),
    ("sigma", "σ"),
    ("sigmaf", "ς"),
    ("sim", "∼"),
    ("spades", "♠"),
    ("sub", "⊂"),
    ("sube", "⊆"),
    ("sum", "∑"),
    ("sup", "⊃"),
    ("sup1", "¹"),
    ("sup2", "²"),
    ("sup3", "³"),
    ("supe", "⊇"),
    ("szlig", "ß"),
    ("tau", "τ"),
    ("there4", "∴"),
    ("theta", "θ"),
    ("thetasym", "ϑ"),
    ("thinsp", "\u{2009}"),
    ("thorn", "þ"),
    ("tilde", "˜"),
    ("times", "×"),
    ("trade", "™"),
    ("uArr", "⇑"),
    ("uacute", "ú"),
    ("uarr", "↑"),
    ("ucirc", "û"),
    ("ugrave", "ù"),
    ("uml", "¨"),
    ("upsih", "ϒ"),
    ("upsilon", "υ"),
    ("uuml", "ü"),
    ("weierp", "℘"),
    ("xi", "ξ"),
    ("yacute", "ý"),
    ("yen", "¥"),
    ("yuml", "ÿ"),
    ("zeta", "ζ"),
    ("zwj", "\u{200d}"),
    ("zwnj", "\u{200c}"),
];

/// The names HTML5 also decodes without a `;` (its legacy list, all in [`NAMED_ENTITIES`]).
const LEGACY: &[&str] = &[
    "AElig", "AMP", "Aacute", "Acirc", "Agrave", "Aring", "Atilde", "Auml", "COPY", "Ccedil",
    "ETH", "Eacute", "Ecirc", "Egrave", "Euml", "GT", "Iacute", "Icirc", "Igrave", "Iuml", "LT",
    "Ntilde", "Oacute", "Ocirc", "Ograve", "Oslash", "Otilde", "Ouml", "QUOT", "REG", "THORN",
    "Uacute", "Ucirc", "Ugrave", "Uuml", "Yacute", "aacute", "acirc", "acute", "aelig", "agrave",
    "amp", "aring", "atilde", "auml", "brvbar", "ccedil", "cedil", "cent", "copy", "curren", "deg",
    "divide", "eacute", "ecirc", "egrave", "eth", "euml", "frac12", "frac14", "frac34", "gt",
    "iacute", "icirc", "iexcl", "igrave", "iquest", "iuml", "laquo", "lt", "macr", "micro",
    "middot", "nbsp", "not", "ntilde", "oacute", "ocirc", "ograve", "ordf", "ordm", "oslash",
    "otilde", "ouml", "para", "plusmn", "pound", "quot", "raquo", "reg", "sect", "shy", "sup1",
    "sup2", "sup3", "szlig", "thorn", "times", "uacute", "ucirc", "ugrave", "uml", "uuml",
    "yacute", "yen", "yuml",
];

fn lookup(name: &str) -> Option<&'static str> {
    NAMED_ENTITIES.binary_search_by(|(n, _)| n.cmp(&name)).ok().map(|i| NAMED_ENTITIES[i].1)
}

/// Decodes the character reference at the start of `s` (which starts with `&`): the decoded
/// text and the number of bytes consumed, or `None` when it is not a reference.
pub fn decode_entity(s: &str) -> Option<(String, usize)> {
    let b = s.as_bytes();
    if b.get(1) == Some(&b'#') {
        let (hex, start) = match b.get(2) {
            Some(b'x' | b'X') => (true, 3),
            _ => (false, 2),
        };
        let mut end = start;
        let mut value: u32 = 0;
        while let Some(&d) = b.get(end) {
            let digit = if hex { (d as char).to_digit(16) } else { (d as char).to_digit(10) };
            let Some(digit) = digit else { break };
            value = value.saturating_mul(if hex { 16 } else { 10 }).saturating_add(digit);
            end += 1;
        }
        if end == start {
            return None;
        }
        if b.get(end) == Some(&b';') {
            end += 1;
        }
        let c = match value {
            0 => '\u{fffd}',
            0x80..=0x9f => match super::unicode::CP1252_80_9F[(value - 0x80) as usize] {
                0 => char::from_u32(value).unwrap_or('\u{fffd}'),
                r => char::from_u32(r).unwrap_or('\u{fffd}'),
            },
            v => char::from_u32(v).unwrap_or('\u{fffd}'),
        };
        return Some((c.to_string(), end));
    }
    let name_len = b[1..].iter().take(32).take_while(|c| c.is_ascii_alphanumeric()).count();
    let name = &s[1..1 + name_len];
    if b.get(1 + name_len) == Some(&b';') {
        if let Some(v) = lookup(name) {
            return Some((v.to_string(), name_len + 2));
        }
    }
    LEGACY
        .iter()
        .filter(|l| name.starts_with(**l))
        .max_by_key(|l| l.len())
        .and_then(|l| lookup(l).map(|v| (v.to_string(), l.len() + 1)))
}

/// Decodes every character reference of `text` (see [`decode_entity`]).
pub fn decode_entities(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        match decode_entity(rest) {
            Some((d, n)) => {
                out.push_str(&d);
                rest = &rest[n..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn is_html_space(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\x0c' | '\r' | ' ')
}

/// The position just after the `>` closing the tag that starts at `s[0]` (quoted attribute
/// values may hold `>`), or `s.len()` when it is not closed (the tag is dropped, as at EOF).
fn tag_end(s: &str) -> usize {
    let b = s.as_bytes();
    let mut quote: Option<u8> = None;
    let mut after_eq = false;
    for (i, &c) in b.iter().enumerate().skip(1) {
        if let Some(q) = quote {
            if c == q {
                quote = None;
                after_eq = false;
            }
            continue;
        }
        match c {
            b'>' => return i + 1,
            b'"' | b'\'' if after_eq => quote = Some(c),
            b'=' => after_eq = true,
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => {}
            _ => after_eq = false,
        }
    }
    b.len()
}

/// The lower-cased tag name at `s[start..]` (ASCII letters and digits).
fn tag_name(s: &str, start: usize) -> String {
    s[start..]
        .bytes()
        .take_while(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' | b'/' | b'>'))
        .map(|c| c.to_ascii_lowercase() as char)
        .collect()
}

/// The byte offset in `s` of the end tag `</name` (case-insensitive) followed by whitespace,
/// `/` or `>`, if any.
fn find_end_tag(s: &str, name: &str) -> Option<usize> {
    let b = s.as_bytes();
    let n = name.len();
    let mut from = 0;
    while let Some(i) = s[from..].find("</") {
        let at = from + i;
        let cand = &b[at + 2..];
        if cand.len() >= n
            && cand[..n].eq_ignore_ascii_case(name.as_bytes())
            && matches!(cand.get(n), Some(b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' | b'/' | b'>'))
        {
            return Some(at);
        }
        from = at + 2;
    }
    None
}

struct TextSink {
    out: String,
    leading: bool,
}

impl TextSink {
    fn push(&mut self, text: &str, decode: bool) {
        let text = if decode { decode_entities(text) } else { text.to_string() };
        for c in text.chars() {
            if c == '\0' {
                continue;
            }
            if self.leading {
                if is_html_space(c) {
                    continue;
                }
                self.leading = false;
            }
            self.out.push(c);
        }
    }
}

/// The text content of `html` (see the module docs).
pub fn html_text(html: &str) -> String {
    let normalized;
    let html = if html.contains('\r') {
        normalized = html.replace("\r\n", "\n").replace('\r', "\n");
        normalized.as_str()
    } else {
        html
    };
    let mut sink = TextSink { out: String::with_capacity(html.len()), leading: true };
    let b = html.as_bytes();
    let mut i = 0;
    let mut text_start = 0;
    while i < b.len() {
        if b[i] != b'<' {
            i += 1;
            continue;
        }
        let next = b.get(i + 1).copied();
        let after = b.get(i + 2).copied();
        let consumed = match next {
            Some(c) if c.is_ascii_alphabetic() => {
                sink.push(&html[text_start..i], true);
                let name = tag_name(html, i + 1);
                if name != "html" {
                    sink.leading = false;
                }
                let end = i + tag_end(&html[i..]);
                match name.as_str() {
                    "plaintext" => {
                        sink.push(&html[end..], false);
                        b.len()
                    }
                    // A line feed right after these start tags is not content.
                    "pre" | "listing" if html[end..].starts_with('\n') => end + 1,
                    "script" | "style" | "xmp" | "iframe" | "noembed" | "noframes" | "title"
                    | "textarea" => {
                        let decode = matches!(name.as_str(), "title" | "textarea");
                        let end = if name == "textarea" && html[end..].starts_with('\n') {
                            end + 1
                        } else {
                            end
                        };
                        match find_end_tag(&html[end..], &name) {
                            Some(j) => {
                                sink.push(&html[end..end + j], decode);
                                end + j + tag_end(&html[end + j..])
                            }
                            None => {
                                sink.push(&html[end..], decode);
                                b.len()
                            }
                        }
                    }
                    _ => end,
                }
            }
            Some(b'/') if after.is_some() => {
                sink.push(&html[text_start..i], true);
                match after {
                    Some(b'>') => i + 3,
                    _ => i + tag_end(&html[i..]),
                }
            }
            Some(b'!') => {
                sink.push(&html[text_start..i], true);
                if html[i..].starts_with("<!--") {
                    let body = i + 4;
                    if html[body..].starts_with('>') {
                        body + 1
                    } else if html[body..].starts_with("->") {
                        body + 2
                    } else {
                        match html[body..].find("-->") {
                            Some(j) => body + j + 3,
                            None => b.len(),
                        }
                    }
                } else {
                    match html[i..].find('>') {
                        Some(j) => i + j + 1,
                        None => b.len(),
                    }
                }
            }
            Some(b'?') => {
                sink.push(&html[text_start..i], true);
                match html[i..].find('>') {
                    Some(j) => i + j + 1,
                    None => b.len(),
                }
            }
            _ => {
                i += 1;
                continue;
            }
        };
        i = consumed.min(b.len());
        text_start = i;
    }
    if text_start < b.len() {
        sink.push(&html[text_start..], true);
    }
    sink.out
}

/// `clean_html_mapper`: `<li>` and `<ol>` become `"\n*"`, `</li>` and `</ol>` are removed,
/// then [`html_text`]. Texts without `<`, `&`, `\r` or NUL only lose leading whitespace.
pub fn clean_html(text: &str) -> String {
    if !text.contains(['<', '&', '\r', '\0']) {
        return text.trim_start_matches(is_html_space).to_string();
    }
    let pre = text
        .replace("<li>", "\n*")
        .replace("</li>", "")
        .replace("<ol>", "\n*")
        .replace("</ol>", "");
    html_text(&pre)
}

//! De-duplication: exact (`document_deduplicator`, a content hash) and near-duplicate
//! (`document_simhash_deduplicator`, 64-bit SimHash with LSH banding).
//!
//! Both keep the first document of each group in input order and run after all per-document
//! work, sequentially, so the result does not depend on the thread count.
//!
//! SimHash, as data-juicer's except where `docs/data-cleaning.md` says why: the text is
//! lower-cased (`lowercase`), the matches of `ignore_pattern` are removed, it is split into
//! tokens (`space`: on whitespace; `punctuation`: on `\p{P}`; `character`: chars), the
//! shingles are all runs of `window_size` consecutive tokens joined by a space — one shingle of
//! all tokens when there are fewer than `window_size` (data-juicer: none, so all short texts
//! share the SimHash 0 and collapse into one group) — and each shingle's 64-bit hash (the first
//! 8 bytes of its BLAKE3 hash; a shingle occurring twice votes twice) votes ±1 on every bit; a
//! bit of the SimHash is set when its vote is positive. Two documents are near duplicates when
//! their SimHashes differ in at most `hamming_distance` bits; groups are the connected
//! components of that relation (as data-juicer's clustering).

use super::filters::FxBuild;
use crate::{DataError, Result};
use rayon::prelude::*;
use regex::Regex;
use std::collections::HashMap;

/// How `document_simhash_deduplicator` splits a text into tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tokenization {
    /// Split on whitespace (Unicode White_Space).
    Space,
    /// Split at every punctuation char (`\p{P}`).
    Punctuation,
    /// Every char is a token.
    Character,
}

/// Compiled parameters of the SimHash of a document.
#[derive(Clone, Debug)]
pub struct SimhashSpec {
    pub tokenization: Tokenization,
    pub window_size: usize,
    pub lowercase: bool,
    pub ignore: Option<Regex>,
}

impl SimhashSpec {
    pub fn new(
        tokenization: Tokenization,
        window_size: usize,
        lowercase: bool,
        ignore_pattern: Option<&str>,
    ) -> Result<SimhashSpec> {
        if window_size == 0 {
            return Err(DataError::Invalid(
                "document_simhash_deduplicator: window_size must be at least 1".into(),
            ));
        }
        let ignore = ignore_pattern
            .map(|p| {
                Regex::new(p).map_err(|e| {
                    DataError::Invalid(format!(
                        "document_simhash_deduplicator: ignore_pattern: {e}"
                    ))
                })
            })
            .transpose()?;
        Ok(SimhashSpec { tokenization, window_size, lowercase, ignore })
    }

    /// The text as hashed: lower-cased if asked, `ignore` matches removed.
    fn prepare(&self, text: &str) -> String {
        let t = if self.lowercase { text.to_lowercase() } else { text.to_string() };
        match &self.ignore {
            Some(re) => re.replace_all(&t, "").into_owned(),
            None => t,
        }
    }

    /// The shingles of `text` in order (for tests and inspection).
    pub fn shingles(&self, text: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        self.for_each_shingle(text, &mut |tokens| out.push(tokens.join(" ")));
        out
    }

    fn for_each_shingle(&self, text: &str, f: &mut dyn FnMut(&[&str])) {
        let t = self.prepare(text);
        let tokens: Vec<&str> = match self.tokenization {
            Tokenization::Space => t.split_whitespace().collect(),
            Tokenization::Punctuation => {
                static P: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
                let p = P.get_or_init(|| Regex::new(r"\p{P}").expect("built-in pattern compiles"));
                p.split(&t).collect()
            }
            Tokenization::Character => {
                t.char_indices().map(|(i, c)| &t[i..i + c.len_utf8()]).collect()
            }
        };
        if tokens.is_empty() {
            return;
        }
        if tokens.len() < self.window_size {
            f(&tokens);
        } else {
            for w in tokens.windows(self.window_size) {
                f(w);
            }
        }
    }

    /// The 64-bit SimHash of `text` (0 for a text without tokens).
    pub fn simhash(&self, text: &str) -> u64 {
        let mut hashes: Vec<u64> = Vec::new();
        self.for_each_shingle(text, &mut |tokens| {
            let mut h = blake3::Hasher::new();
            for (i, tok) in tokens.iter().enumerate() {
                if i > 0 {
                    h.update(b" ");
                }
                h.update(tok.as_bytes());
            }
            let d = h.finalize();
            let mut b = [0u8; 8];
            b.copy_from_slice(&d.as_bytes()[..8]);
            hashes.push(u64::from_le_bytes(b));
        });
        simhash_of(&hashes)
    }
}

/// The SimHash of a set of feature hashes: bit `j` is set when more features have bit `j` set
/// than clear.
pub fn simhash_of(features: &[u64]) -> u64 {
    let mut votes = [0i64; 64];
    for &h in features {
        for (j, v) in votes.iter_mut().enumerate() {
            *v += if h >> j & 1 == 1 { 1 } else { -1 };
        }
    }
    votes.iter().enumerate().fold(0u64, |acc, (j, &v)| if v > 0 { acc | 1 << j } else { acc })
}

/// The exact-duplicate key of `document_deduplicator`: the first 16 bytes of the BLAKE3 hash
/// of the text, lower-cased when `lowercase`, without whitespace, digits and ASCII punctuation
/// when `ignore_non_character` (data-juicer's `\s+|\d+|[punctuation]`), stripped of
/// surrounding whitespace (data-juicer hashes `text.strip()`).
pub fn exact_key(text: &str, lowercase: bool, ignore_non_character: bool) -> [u8; 16] {
    let lowered;
    let mut t = text;
    if lowercase {
        lowered = t.to_lowercase();
        t = &lowered;
    }
    let stripped;
    if ignore_non_character {
        let drop = |c: char| {
            super::filters::is_py_space(c)
                || c.is_ascii_digit()
                || c.is_ascii_punctuation()
                || is_unicode_digit(c)
        };
        stripped = t.chars().filter(|&c| !drop(c)).collect::<String>();
        t = &stripped;
    }
    let d = blake3::hash(super::filters::py_strip(t).as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&d.as_bytes()[..16]);
    k
}

/// Python `\d`: Unicode decimal digits (category Nd).
fn is_unicode_digit(c: char) -> bool {
    static ND: std::sync::OnceLock<super::filters::CharSet> = std::sync::OnceLock::new();
    !c.is_ascii() && ND.get_or_init(|| super::filters::CharSet::from_class(r"\p{Nd}")).contains(c)
}

struct UnionFind {
    parent: Vec<u32>,
}

impl UnionFind {
    fn new(n: usize) -> UnionFind {
        UnionFind { parent: (0..n as u32).collect() }
    }

    fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let p = self.parent[x as usize];
            self.parent[x as usize] = self.parent[p as usize];
            x = p;
        }
        x
    }

    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.parent[hi as usize] = lo;
        }
    }
}

/// The bit masks of `num_blocks` contiguous blocks covering 64 bits (the first `64 %
/// num_blocks` blocks one bit wider).
fn block_masks(num_blocks: usize) -> Vec<u64> {
    let (base, extra) = (64 / num_blocks, 64 % num_blocks);
    let mut masks = Vec::with_capacity(num_blocks);
    let mut shift = 0;
    for i in 0..num_blocks {
        let w = base + usize::from(i < extra);
        let m = if w == 64 { u64::MAX } else { ((1u64 << w) - 1) << shift };
        masks.push(m);
        shift += w;
    }
    masks
}

fn combinations(n: usize, k: usize) -> Vec<Vec<usize>> {
    fn rec(start: usize, n: usize, k: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if cur.len() == k {
            out.push(cur.clone());
            return;
        }
        for i in start..n {
            cur.push(i);
            rec(i + 1, n, k, cur, out);
            cur.pop();
        }
    }
    let mut out = Vec::new();
    rec(0, n, k, &mut Vec::new(), &mut out);
    out
}

/// Checks the banding parameters: `1 ≤ hamming_distance < num_blocks ≤ 64`.
pub fn check_banding(num_blocks: usize, hamming_distance: u32) -> Result<()> {
    if num_blocks == 0 || num_blocks > 64 || hamming_distance as usize >= num_blocks {
        return Err(DataError::Invalid(format!(
            "document_simhash_deduplicator: need hamming_distance < num_blocks ≤ 64 (got {hamming_distance} and {num_blocks})"
        )));
    }
    Ok(())
}

/// Near-duplicate removal over `hashes` (one SimHash per document, in input order): `true`
/// marks a document to remove, i.e. one whose group (connected component of the relation
/// "Hamming distance ≤ `hamming_distance`") already had an earlier document.
///
/// Exact: two hashes within distance `k` differ in at most `k` of the `num_blocks` blocks, so
/// they agree on some `num_blocks − k` of them; every such combination of blocks is a key,
/// and only hashes sharing a key are compared.
pub fn near_duplicates(
    hashes: &[u64],
    num_blocks: usize,
    hamming_distance: u32,
) -> Result<Vec<bool>> {
    check_banding(num_blocks, hamming_distance)?;
    let mut index: HashMap<u64, u32, FxBuild> = HashMap::default();
    let mut distinct: Vec<u64> = Vec::new();
    let doc_ids: Vec<u32> = hashes
        .iter()
        .map(|&h| {
            *index.entry(h).or_insert_with(|| {
                distinct.push(h);
                (distinct.len() - 1) as u32
            })
        })
        .collect();
    let mut uf = UnionFind::new(distinct.len());
    let masks = block_masks(num_blocks);
    let mut keyed: Vec<(u64, u32)> = Vec::with_capacity(distinct.len());
    for combo in combinations(num_blocks, num_blocks - hamming_distance as usize) {
        let mask = combo.iter().fold(0u64, |m, &b| m | masks[b]);
        keyed.clear();
        keyed.extend(distinct.iter().enumerate().map(|(i, &h)| (h & mask, i as u32)));
        keyed.par_sort_unstable();
        let mut start = 0;
        while start < keyed.len() {
            let mut end = start + 1;
            while end < keyed.len() && keyed[end].0 == keyed[start].0 {
                end += 1;
            }
            for i in start..end {
                let hi = distinct[keyed[i].1 as usize];
                for j in i + 1..end {
                    if (hi ^ distinct[keyed[j].1 as usize]).count_ones() <= hamming_distance {
                        uf.union(keyed[i].1, keyed[j].1);
                    }
                }
            }
            start = end;
        }
    }
    let mut seen = vec![false; distinct.len()];
    Ok(doc_ids
        .iter()
        .map(|&d| {
            let root = uf.find(d) as usize;
            std::mem::replace(&mut seen[root], true)
        })
        .collect())
}

//! Answer extraction from generated responses, as the reference's evaluation scripts do it
//! (specs/reference-pipeline.md §6.2 `extract_choice` for CMMLU, §6.4 for C-Eval), minus their
//! random fallback: `None` when nothing can be read.

use super::Question;
use regex::Regex;

const L: &str = "[ABCD]";

fn re(p: &str) -> Regex {
    // The patterns are constants of this file; a typo is a bug caught by the tests.
    Regex::new(&p.replace("{L}", L)).expect("answer-extraction pattern")
}

fn letter_of(s: &str) -> Option<char> {
    let mut it = s.chars();
    match (it.next(), it.next()) {
        (Some(c @ 'A'..='D'), None) => Some(c),
        _ => None,
    }
}

/// CMMLU's `extract_choice` cascade (§6.2), first hit wins.
pub fn cmmlu_choice(response: &str) -> Option<char> {
    let r = response;
    if let Some(c @ 'A'..='D') = r.chars().next() {
        return Some(c);
    }
    let singles = [
        "答案(选项)?(是|为)：? ?({L})",
        "答案(是|为)选项 ?({L})",
        "故?选择?：? ?({L})",
        "({L}) ?选?项(是|为)?正确",
        "正确的?选项(是|为) ?({L})",
        "答案(应该)?(是|为)({L})",
        "选项 ?({L}) ?(是|为)?正确",
        "选择答案 ?({L})",
        "答案?：?({L})",
        "({L})(选?项)?是?符合题意",
        "答案选项：? ?({L})",
        "答案(选项)?为(.*?)({L})",
    ];
    for p in singles {
        if let Some(c) = re(p).captures(r) {
            // the captured letter is the last group that is exactly one letter
            if let Some(l) = c.iter().skip(1).flatten().filter_map(|m| letter_of(m.as_str())).last()
            {
                return Some(l);
            }
        }
    }
    for p in ["({L})(.*?)当选", "({L})(.*?)正确"] {
        let rx = re(p);
        if let Some(m) = rx.captures(r) {
            let mut ans = letter_of(m.get(1).map_or("", |x| x.as_str()));
            let mut text = m.get(0).map_or("", |x| x.as_str()).to_string();
            loop {
                let rest: String = text.chars().skip(1).collect();
                match rx.captures(&rest) {
                    Some(m2) => {
                        ans = letter_of(m2.get(1).map_or("", |x| x.as_str()));
                        text = m2.get(0).map_or("", |x| x.as_str()).to_string();
                    }
                    None => break,
                }
            }
            if ans.is_some() {
                return ans;
            }
        }
    }
    if let Some(c) = re("[^不]是：? ?({L})").captures(r) {
        return c.get(1).and_then(|m| letter_of(m.as_str()));
    }
    let letters: Vec<char> = r.chars().filter(|c| ('A'..='D').contains(c)).collect();
    if letters.len() == 1 {
        return Some(letters[0]);
    }
    None
}

/// C-Eval chat's rewrite step (§6.4 step 2): phrases of the question become `答案是` / nothing,
/// option texts (longest first) become their letters.
pub fn ceval_rewrite(response: &str, q: &Question) -> String {
    let mut r = response.to_string();
    let stem = q.question.trim_end_matches('。');
    let last = stem.split('。').next_back().unwrap_or("");
    let parts: Vec<&str> = last.split('_').collect();
    let first = parts.first().map_or("", |s| s.trim());
    if first.chars().count() > 4 {
        r = r.replace(first, "答案是");
    }
    let tail = parts.last().map_or("", |s| s.trim());
    if tail.chars().count() > 4 {
        r = r.replace(tail, "");
    }
    let mut opts: Vec<(usize, &String)> = q.options.iter().enumerate().collect();
    opts.sort_by_key(|(_, o)| std::cmp::Reverse(o.chars().count()));
    for (i, o) in opts {
        let o = o.trim_end_matches('。');
        if !o.is_empty() {
            r = r.replace(o, super::LETTERS[i]);
        }
    }
    r
}

fn negated(s: &str) -> bool {
    s.contains('不') || s.contains('非')
}

/// Levenshtein similarity in [0, 100] over characters (fuzz.ratio's measure).
fn ratio(a: &str, b: &str) -> f64 {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.is_empty() && b.is_empty() {
        return 100.0;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            // indel distance (substitution = 2), as python-Levenshtein's ratio
            cur[j + 1] =
                (prev[j] + if ca == cb { 0 } else { 2 }).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    100.0 * (1.0 - prev[b.len()] as f64 / (a.len() + b.len()) as f64)
}

/// C-Eval chat's extraction (§6.4 steps 2–3), first hit wins; the fuzzy fallback (f) compares the
/// response with each option text by Levenshtein ratio (the reference used thefuzz's extractOne).
pub fn ceval_choice(response: &str, q: &Question) -> Option<char> {
    let r = ceval_rewrite(response, q);
    let term = "([)）。.，,．、ABCD：:]|$)";
    // (a) a trigger, then the letter
    let a1 = re(&format!("(?:选择|选定|选)[：:]?\\s*[^ABCD]{{0,10}}?({L})(?:选项)?{term}"));
    let a2 = re(&format!(
        "(?:答案|选项)([^ABCD]{{0,10}}?)(?:是|选|为|：|:|】)[^ABCD]{{0,10}}?({L})(?:选项)?{term}"
    ));
    let mut hits: Vec<(usize, char)> = Vec::new();
    if let Some(c) = a1.captures(&r) {
        hits.push((c.get(0).map_or(0, |m| m.start()), letter_of(&c[1])?));
    }
    for c in a2.captures_iter(&r) {
        if !negated(&c[1]) {
            hits.push((c.get(0).map_or(0, |m| m.start()), letter_of(&c[2])?));
            break;
        }
    }
    if let Some(&(_, l)) = hits.iter().min_by_key(|h| h.0) {
        return Some(l);
    }
    // (b) the letter, then "correct"
    let b = re("({L})(?:选项|项)?([^ABCD]{0,4}?)(?:正确|对[的，。：]|符合)");
    for c in b.captures_iter(&r) {
        if !negated(&c[2]) {
            return letter_of(&c[1]);
        }
    }
    // (c) a letter at the very start
    if let Some(c) = re(&format!("^[（(]?({L})([。)）.，,．：:]|$)")).captures(&r) {
        return letter_of(&c[1]);
    }
    // (d) 最终答案是 … letter
    if let Some(c) = re(&format!("最终答案是[^ABCD]{{0,10}}?({L})(?:选项)?{term}")).captures(&r)
    {
        return letter_of(&c[1]);
    }
    // (e) the first letter not touching an ASCII letter and not followed by '='
    let chars: Vec<char> = r.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if ('A'..='D').contains(&c) {
            let before = i.checked_sub(1).map(|j| chars[j]);
            let after = chars.get(i + 1).copied();
            let ascii = |x: Option<char>| x.is_some_and(|x| x.is_ascii_alphabetic());
            if !ascii(before) && !ascii(after) && after != Some('=') {
                return Some(c);
            }
        }
    }
    // (f) the option most similar to the response
    if r.trim().is_empty() {
        return None;
    }
    q.options
        .iter()
        .enumerate()
        .map(|(i, o)| (i, ratio(&r, o)))
        .max_by(|x, y| x.1.total_cmp(&y.1).then(y.0.cmp(&x.0)))
        .filter(|(_, s)| *s > 0.0)
        .and_then(|(i, _)| super::LETTERS[i].chars().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> Question {
        Question {
            id: "0".into(),
            question: "下列金属中，熔点最高的是____。".into(),
            options: vec!["铁".into(), "钨".into(), "铜".into(), "铝".into()],
            answer: "B".into(),
        }
    }

    #[test]
    fn cmmlu_cascade() {
        assert_eq!(cmmlu_choice("B. 钨"), Some('B'));
        assert_eq!(cmmlu_choice("答案是：C"), Some('C'));
        assert_eq!(cmmlu_choice("我认为答案为 D"), Some('D'));
        assert_eq!(cmmlu_choice("所以选择：A"), Some('A'));
        assert_eq!(cmmlu_choice("选项B是正确的"), Some('B'));
        assert_eq!(cmmlu_choice("A当选，但C当选更合适"), Some('A'), "the shortest match first");
        assert_eq!(cmmlu_choice("应是A或者B当选"), Some('B'), "re-searched inside the match");
        assert_eq!(cmmlu_choice("也许是D吧"), Some('D'));
        assert_eq!(cmmlu_choice("只有C"), Some('C'));
        assert_eq!(cmmlu_choice("我不知道"), None);
        assert_eq!(cmmlu_choice("在A与B之间"), None);
    }

    #[test]
    fn ceval_cascade() {
        let q = q();
        assert_eq!(ceval_choice("答案是B。", &q), Some('B'));
        assert_eq!(
            ceval_choice("熔点最高的是钨", &q),
            Some('B'),
            "the option text becomes its letter"
        );
        assert_eq!(ceval_choice("答案不是A，选C", &q), Some('C'));
        assert_eq!(ceval_choice("(D)", &q), Some('D'));
        assert_eq!(ceval_choice("最终答案是 A", &q), Some('A'));
        assert_eq!(ceval_choice("Answer: see C here", &q), Some('C'));
        assert_eq!(ceval_choice("", &q), None);
        assert!(ratio("钨金属", "钨") > ratio("钨金属", "铝"));
    }
}

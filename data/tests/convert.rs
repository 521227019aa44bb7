//! Step 1 converters (spec §1) on the real corpus samples of `../shared/data/corpus-samples`,
//! on constructed edge cases, and on files with injected garbage.
//!
//! The per-source counts and every sample's output bytes were also reproduced by an independent
//! Python restatement of spec §1 with Steel's fixes (`json.loads` per line, `unicodedata`
//! NFKC, `json.dumps(…, ensure_ascii=False)`, pyarrow for the Parquet samples): all ten outputs
//! were byte-identical. Its vote parser, for the record:
//! `s = nfkc(s).strip(); s = s[2:].strip() if s.startswith("赞同") else s; 0 if s == "" else
//! Fraction(number) * {None: 1, "万": 10000, …}[unit]`.

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use steel_data::convert::text::{
    chatml_multi, chatml_single, json_line, parse_upvotes, passes_quality_gate, zh_process,
};
use steel_data::convert::{convert, input_files, MalformedLine, Source, Summary};

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/corpus-samples")
}

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("steel-convert-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Converts and returns the summary and the output lines (each without its `\n`).
fn run(source: Source, input: &Path, tmp: &TempDir) -> (Summary, Vec<String>) {
    let out = tmp.path(&format!("{source}.jsonl"));
    let mut reports = 0;
    let summary = convert(source, input, &out, |_| reports += 1).unwrap();
    assert!(reports >= summary.files.len(), "a progress report per file at least");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'));
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    assert_eq!(lines.len() as u64, summary.written);
    assert_eq!(summary.read, summary.written + summary.dropped_total() + summary.malformed);
    (summary, lines)
}

/// The `text` of an output line, checking the line's exact shape.
fn text_of(line: &str) -> String {
    assert!(line.starts_with("{\"text\": \"") && line.ends_with("\"}"), "{line}");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 1);
    v["text"].as_str().unwrap().to_owned()
}

fn dropped(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|&(k, n)| (k.to_string(), n)).collect()
}

fn sample_lines(rel: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(samples().join(rel))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Rows of a Parquet file through the `parquet` crate's row API (a different reader from the
/// converter's column reader): column name → string value.
fn parquet_rows(path: &Path) -> Vec<BTreeMap<String, Option<String>>> {
    let reader = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let rows = reader.get_row_iter(None).unwrap();
    rows.map(|row| {
        row.unwrap()
            .get_column_iter()
            .map(|(name, field)| {
                let value = match field {
                    Field::Str(s) => Some(s.clone()),
                    _ => None,
                };
                (name.clone(), value)
            })
            .collect()
    })
    .collect()
}

fn nfkc(s: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    s.nfkc().collect::<String>().replace('\r', "")
}

const SYSTEM: &str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n";

#[test]
fn source_names_round_trip() {
    for s in Source::ALL {
        assert_eq!(s.name().parse::<Source>().unwrap(), s);
        assert!(!s.describe().is_empty());
    }
    assert_eq!("baidu_QA".parse::<Source>().unwrap(), Source::BaiduQa);
    assert_eq!("BELLE_3_5M".parse::<Source>().unwrap(), Source::Belle3_5m);
    let err = "wikipedia".parse::<Source>().unwrap_err().to_string();
    assert!(err.contains("wiki_cn") && err.contains("skypile"), "{err}");
}

#[test]
fn baidu_baike_sample() {
    let tmp = TempDir::new("baike");
    let (s, lines) = run(Source::BaiduBaike, &samples().join("baidu_baike"), &tmp);
    // Independent count of the records without a usable title or summary.
    let empty = sample_lines("baidu_baike/563w_baidubaike_sample.json")
        .iter()
        .filter(|d| {
            let blank = |k: &str| d[k].is_null() || d[k].as_str() == Some("");
            blank("title") || blank("summary")
        })
        .count() as u64;
    assert_eq!(empty, 683);
    assert_eq!((s.read, s.written, s.malformed), (1000, 276, 0));
    assert_eq!(s.dropped, dropped(&[("empty title or summary", 683), ("too short", 41)]));
    // The first record: title：summary then title：content per section, no separators, the
    // full-width colon kept (added after NFKC), the summary's own full-width marks normalised.
    let first = text_of(&lines[0]);
    assert!(
        first.starts_with("红色食品：红色食品是指食品为红色、橙红色或棕红色的食品。"),
        "{first}"
    );
    assert!(first.contains("红果(山楂)"), "NFKC turns （） into ()");
    assert!(first.contains("预防感冒等作用。简介：红色食品富含"), "no separator before a section");
    assert!(lines.iter().all(|l| passes_quality_gate(&text_of(l))));
}

#[test]
fn baidu_qa_sample() {
    let tmp = TempDir::new("qa");
    let (s, lines) = run(Source::BaiduQa, &samples().join("baidu_QA"), &tmp);
    assert_eq!((s.read, s.written, s.dropped_total(), s.malformed), (1000, 1000, 0, 0));
    // The first answer holds "\r\n" in the raw data; zh_process removes the \r.
    let first = text_of(&lines[0]);
    assert_eq!(
        first,
        format!(
            "{SYSTEM}<|im_start|>user\n人站在地球上为什么没有头朝下的感觉 <|im_end|>\n\
             <|im_start|>assistant\n地球上重力作用一直是指向球心的,因此\n只要头远离球心,人们就回感到头朝上。"
        )
    );
    assert!(lines.iter().all(|l| !text_of(l).contains('\r')));
}

#[test]
fn belle_samples() {
    let tmp = TempDir::new("belle");
    let dir = samples().join("BELLE");
    let (s, lines) = run(Source::Belle2m, &dir.join("train_2M_CN_sample.json"), &tmp);
    assert_eq!((s.read, s.written, s.dropped_total(), s.malformed), (1000, 1000, 0, 0));
    assert!(text_of(&lines[0]).starts_with("对以下代码进行调试。\ndef add(a,b):\n  return a + b"));

    let (s, lines) = run(Source::Belle3_5m, &dir.join("train_3.5M_CN_sample.json"), &tmp);
    assert_eq!((s.read, s.written, s.dropped_total(), s.malformed), (1000, 1000, 0, 0));
    // Line 10 is a two-round conversation: the multi-turn layout, ending in the last answer
    // with no trailing <|im_end|>⏎, and NFKC applied to the turns (，： → ,:).
    assert_eq!(
        lines[9],
        "{\"text\": \"<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n\
         根据输入的文本,判断它是否属于新闻报道、广告或博客文章类别之一。\\n新闻报道:“奥运会在东京隆重开幕,\
         中国代表团获得多项奖牌。”<|im_end|>\\n<|im_start|>assistant\\n属于新闻报道类别。<|im_end|>\\n\
         <|im_start|>user\\n很好,现在请你计算一下这篇文章中出现了多少个“获得”字样。<|im_end|>\\n\
         <|im_start|>assistant\\n经过计数,这篇文章中总共出现了两次“获得”这个词汇。\"}"
    );
    // Every record ends in exactly its last answer (5 of these 1000 end in characters the
    // reference's character-set strip would have eaten).
    for (line, d) in lines.iter().zip(sample_lines("BELLE/train_3.5M_CN_sample.json")) {
        let turns = d["conversations"].as_array().unwrap();
        let last = turns.last().unwrap()["value"].as_str().unwrap();
        assert!(text_of(line).ends_with(&nfkc(last)));
    }

    // The reference's test run reads the BELLE folder with both handlers; each drops the
    // other's records by its key check, and says so.
    let (s, _) = run(Source::Belle2m, &dir, &tmp);
    assert_eq!((s.read, s.written, s.malformed), (2000, 1000, 0));
    assert_eq!(s.dropped, dropped(&[("no instruction field", 1000)]));
    let (s, _) = run(Source::Belle3_5m, &dir, &tmp);
    assert_eq!((s.read, s.written, s.malformed), (2000, 1000, 0));
    assert_eq!(s.dropped, dropped(&[("no conversations field", 1000)]));
}

#[test]
fn firefly_sample_chatml_byte_for_byte() {
    let tmp = TempDir::new("firefly");
    let (s, lines) = run(Source::Firefly, &samples().join("firefly"), &tmp);
    assert_eq!((s.read, s.written, s.dropped_total(), s.malformed), (1000, 1000, 0, 0));
    // Produced by Python: json.dumps({"text": qa2txt(zh(input), zh(target))}, ensure_ascii=False)
    assert_eq!(
        lines[0],
        "{\"text\": \"<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n\
         自然语言推理:\\n前提:家里人心甘情愿地养他,还有几家想让他做女婿的\\n假设:他是被家里人收养的孤儿\
         <|im_end|>\\n<|im_start|>assistant\\n中立\"}"
    );
}

#[test]
fn zhihu_sample_keeps_wan_votes() {
    let tmp = TempDir::new("zhihu");
    let dir = samples().join("zhihu");
    let (s, lines) = run(Source::Zhihu, &dir, &tmp);
    assert_eq!((s.read, s.written, s.malformed), (1000, 365, 0));
    assert_eq!(s.dropped, dropped(&[("fewer than 100 upvotes", 635)]));

    // Independently: the row API and a plain reading of "赞同 N" / "赞同 X 万" / "赞同".
    let files = input_files(Source::Zhihu, &dir).unwrap();
    let rows = parquet_rows(&files[0]);
    assert_eq!(rows.len(), 1000);
    let mut expected = Vec::new();
    let mut wan = 0;
    for r in &rows {
        let meta: serde_json::Value =
            serde_json::from_str(r["METADATA"].as_deref().unwrap()).unwrap();
        let votes = meta["upvotes"].as_str().unwrap().trim_start_matches("赞同").trim().to_string();
        let n: f64 = match votes.strip_suffix('万') {
            Some(x) => x.trim().parse::<f64>().unwrap() * 10_000.0,
            None if votes.is_empty() => 0.0,
            None => votes.parse().unwrap(),
        };
        if votes.ends_with('万') {
            wan += 1;
        }
        if n >= 100.0 {
            let q = nfkc(r["INSTRUCTION"].as_deref().unwrap());
            let a = nfkc(r["RESPONSE"].as_deref().unwrap());
            expected.push(format!(
                "{SYSTEM}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}"
            ));
        }
    }
    assert_eq!(wan, 16, "rows with 万 counts, all kept (the reference dropped them)");
    let got: Vec<String> = lines.iter().map(|l| text_of(l)).collect();
    assert_eq!(got, expected);
    // Row 58 ("赞同 1.5 万") is among them.
    assert!(got
        .iter()
        .any(|t| t.contains("user\n如何看待《自然》(Nature)报道声称中国西北荒漠绿化可能")));
}

#[test]
fn wiki_cn_sample() {
    let tmp = TempDir::new("wiki");
    let (s, lines) = run(Source::WikiCn, &samples().join("wiki_cn"), &tmp);
    let array: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(
            samples().join("wiki_cn/wikipedia-cn-20230720-filtered_sample.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(array.len(), 250);
    assert_eq!((s.read, s.written, s.dropped_total(), s.malformed), (250, 250, 0, 0));
    for (line, d) in lines.iter().zip(&array) {
        assert_eq!(text_of(line), nfkc(d["completion"].as_str().unwrap()));
    }
    assert!(text_of(&lines[0]).starts_with("昭通机场(ZPZT)是位于中国云南昭通的民用机场"));
}

#[test]
fn starcode_sample_is_raw() {
    let tmp = TempDir::new("starcode");
    let dir = samples().join("starcode");
    let files = input_files(Source::Starcode, &dir).unwrap();
    let langs: Vec<String> = files
        .iter()
        .map(|f| f.parent().unwrap().file_name().unwrap().to_string_lossy().into())
        .collect();
    assert_eq!(langs, ["cpp", "java", "python"]);
    let (s, lines) = run(Source::Starcode, &dir, &tmp);
    assert_eq!((s.read, s.written, s.dropped_total(), s.malformed), (1500, 1500, 0, 0));
    let contents: Vec<String> =
        files.iter().flat_map(|f| parquet_rows(f)).map(|r| r["content"].clone().unwrap()).collect();
    let got: Vec<String> = lines.iter().map(|l| text_of(l)).collect();
    assert_eq!(got, contents, "content passes through byte for byte");
    // 90 of the files (36 C++, 37 Java, 17 Python) have CRLF line ends; the \r survives (no
    // zh_process for code) and is written escaped.
    let with_cr = got.iter().filter(|t| t.contains('\r')).count();
    assert_eq!(with_cr, 90);
    assert_eq!(lines.iter().filter(|l| l.contains("\\r\\n")).count(), 90);
}

#[test]
fn wanjuan_and_skypile_samples_pass_through() {
    let tmp = TempDir::new("wanjuan");
    let (s, lines) = run(Source::Wanjuan, &samples().join("wanjuan"), &tmp);
    assert_eq!((s.read, s.written, s.dropped_total(), s.malformed), (1000, 1000, 0, 0));
    for (line, d) in lines.iter().zip(sample_lines("wanjuan/part-010205-a894b46e_sample.jsonl")) {
        assert_eq!(text_of(line), d["content"].as_str().unwrap());
    }
    let (s, lines) = run(Source::Skypile, &samples().join("sky"), &tmp);
    assert_eq!((s.read, s.written, s.dropped_total(), s.malformed), (1000, 1000, 0, 0));
    for (line, d) in lines.iter().zip(sample_lines("sky/2021-31_zh_head_0000_sample.jsonl")) {
        assert_eq!(text_of(line), d["text"].as_str().unwrap());
    }
}

#[test]
fn wanjuan_exam_records_concatenate() {
    let tmp = TempDir::new("wanjuan-exam");
    let input = tmp.write(
        "exam.jsonl",
        concat!(
            r#"{"id":"e1","q_type":"单选","q_main":"1+1=？","option_a":"A. 1","option_b":"B. 2","option_c":"C. 3","option_d":"D. 4","option_e":"","std_ans":"B","answer_detail":"1+1=2，选B。"}"#,
            "\n",
            r#"{"id":"c1","content":"全角，不变\r\n"}"#,
            "\n",
            r#"{"id":"e2","q_main":"缺选项","option_a":"A","option_b":"B","option_c":"C","option_d":null,"option_e":"","std_ans":"A","answer_detail":""}"#,
            "\n",
            r#"{"id":"x"}"#,
            "\n",
        ),
    );
    let (s, lines) = run(Source::Wanjuan, &input, &tmp);
    assert_eq!((s.read, s.written, s.malformed), (4, 2, 2));
    // §3.1: q_main, option_a..e, 标准答案：, std_ans, 解析：, answer_detail, nothing else; the
    // text is not normalised (the full-width marks stay).
    assert_eq!(text_of(&lines[0]), "1+1=？A. 1B. 2C. 3D. 4标准答案：B解析：1+1=2，选B。");
    assert_eq!(text_of(&lines[1]), "全角，不变\r\n");
    let at: Vec<u64> = s.malformed_lines.iter().map(|m| m.line).collect();
    assert_eq!(at, [3, 4]);
    assert!(s.malformed_lines[0].reason.contains("option_d"), "{:?}", s.malformed_lines);
}

#[test]
fn multi_turn_keeps_answer_endings() {
    let tmp = TempDir::new("multi");
    // Answers ending in characters of the reference's strip set {<|im_end>⏎}: "send", "\n",
    // "im_end", "<|".
    let input = tmp.write(
        "in-belle.json",
        concat!(
            r#"{"conversations": [{"from": "human", "value": "Say it"}, {"from": "assistant", "value": "I will send"}], "id": "1"}"#,
            "\n",
            r#"{"conversations": [{"from": "human", "value": "Q1"}, {"from": "assistant", "value": "A1 end\n"}, {"from": "human", "value": "Q2"}, {"from": "assistant", "value": "im_end"}], "id": "2"}"#,
            "\n",
            r#"{"conversations": [{"from": "human", "value": "only a question"}], "id": "3"}"#,
            "\n",
            r#"{"conversations": [{"from": "assistant", "value": "misplaced"}, {"from": "human", "value": "misplaced"}], "id": "4"}"#,
            "\n",
            r#"{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "ignored"}, {"from": "human", "value": "Q2"}, {"from": "assistant", "value": "A<|"}], "id": "5"}"#,
            "\n",
        ),
    );
    let (s, lines) = run(Source::Belle3_5m, &input, &tmp);
    assert_eq!((s.read, s.written, s.malformed), (5, 3, 0));
    assert_eq!(s.dropped, dropped(&[("no dialogue turns", 2)]));
    assert_eq!(
        text_of(&lines[0]),
        format!("{SYSTEM}<|im_start|>user\nSay it<|im_end|>\n<|im_start|>assistant\nI will send")
    );
    assert_eq!(
        text_of(&lines[1]),
        format!(
            "{SYSTEM}<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1 end\n<|im_end|>\n\
             <|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nim_end"
        )
    );
    // Turns are not re-aligned: questions [Q, Q2], answers [A<|] pair as (Q, A<|).
    assert_eq!(
        text_of(&lines[2]),
        format!("{SYSTEM}<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|")
    );

    // moss (no sample exists): the same layout from {human, assistant} turns.
    let input = tmp.write(
        "in-moss.jsonl",
        concat!(
            r#"{"conversation_id": 1, "category": "x", "conversation": [{"human": "你好！", "assistant": "你好，有什么可以帮你？"}, {"human": "谢谢", "assistant": "不客气，再见\n"}]}"#,
            "\n",
            r#"{"conversation_id": 2, "conversation": []}"#,
            "\n",
            r#"{"conversation_id": 3, "conversation": [{"human": "缺回答"}]}"#,
            "\n",
        ),
    );
    let (s, lines) = run(Source::Moss, &input, &tmp);
    assert_eq!((s.read, s.written, s.malformed), (3, 1, 1));
    assert_eq!(s.dropped, dropped(&[("no dialogue turns", 1)]));
    assert_eq!(
        text_of(&lines[0]),
        format!(
            "{SYSTEM}<|im_start|>user\n你好!<|im_end|>\n<|im_start|>assistant\n你好,有什么可以帮你?<|im_end|>\n\
             <|im_start|>user\n谢谢<|im_end|>\n<|im_start|>assistant\n不客气,再见\n"
        )
    );
    assert_eq!(s.malformed_lines[0].line, 3);
    assert!(s.malformed_lines[0].reason.contains("assistant"));
}

#[test]
fn nfkc_and_quality_gate() {
    let tmp = TempDir::new("nfkc");
    let input = tmp.write(
        "in-firefly.jsonl",
        concat!(
            r#"{"kind": "X", "input": "你好，世界！（测试）：ＡＢＣ１２３\r\n。", "target": "好"}"#,
            "\n",
            r#"{"input": null, "target": null}"#,
            "\n",
        ),
    );
    let (s, lines) = run(Source::Firefly, &input, &tmp);
    assert_eq!(
        (s.read, s.written),
        (2, 2),
        "the template alone passes the gate; kind is not needed"
    );
    assert_eq!(
        text_of(&lines[0]),
        format!("{SYSTEM}<|im_start|>user\n你好,世界!(测试):ABC123\n。<|im_end|>\n<|im_start|>assistant\n好")
    );
    assert_eq!(
        text_of(&lines[1]),
        format!("{SYSTEM}<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n")
    );

    // belle_2m and wiki_cn are plain text: the gate (< 20 chars) bites.
    let input = tmp.write(
        "in-belle.json",
        concat!(
            r#"{"instruction": "一二三四五六七八九", "input": "", "output": "十一二三四五六七八九"}"#,
            "\n",
            r#"{"instruction": "一二三四五六七八九", "input": "", "output": "十一二三四五六七八"}"#,
            "\n",
        ),
    );
    let (s, lines) = run(Source::Belle2m, &input, &tmp);
    assert_eq!((s.read, s.written), (2, 1));
    assert_eq!(s.dropped, dropped(&[("too short", 1)]));
    assert_eq!(text_of(&lines[0]).chars().count(), 20);

    assert_eq!(zh_process(None), "");
    assert_eq!(zh_process(Some("a\r\nb\rc，。")), "a\nbc,。");
    assert_eq!(zh_process(Some("ﬁ①㎏")), "fi1kg");
    assert!(passes_quality_gate("一二三四五六七八九十一二三四五六七八九十"));
    assert!(!passes_quality_gate("一二三四五六七八九十一二三四五六七八九"));
}

#[test]
fn wiki_array_edge_cases() {
    let tmp = TempDir::new("wiki-edge");
    let input = tmp.write(
        "wiki.json",
        "\u{feff}[\n {\"completion\": \"短\", \"source\": \"w\"},\n 42,\n {\"source\": \"w\"},\n \
         {\"completion\": \"这是一个足够长的维基百科条目，用于测试转换是否正常工作。\"}\n]\n",
    );
    let (s, lines) = run(Source::WikiCn, &input, &tmp);
    assert_eq!((s.read, s.written, s.malformed), (4, 1, 2));
    assert_eq!(s.dropped, dropped(&[("too short", 1)]));
    assert_eq!(text_of(&lines[0]), "这是一个足够长的维基百科条目,用于测试转换是否正常工作。");
    let at: Vec<u64> = s.malformed_lines.iter().map(|m| m.line).collect();
    assert_eq!(at, [2, 3], "array elements, 1-based");

    // A file that is not a JSON array as a whole is an error naming it; no output is left.
    let bad = tmp.write("bad.json", "{\"completion\": \"not an array\"}\n");
    let out = tmp.path("bad-out.jsonl");
    let err = convert(Source::WikiCn, &bad, &out, |_| {}).unwrap_err().to_string();
    assert!(err.contains("bad.json") && err.contains("JSON array"), "{err}");
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(&tmp.0)
            .unwrap()
            .filter(|e| { e.as_ref().unwrap().file_name().to_string_lossy().contains("partial") })
            .count(),
        0,
        "the temporary file is removed"
    );
}

#[test]
fn parquet_null_and_crlf_rows() {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let tmp = TempDir::new("parquet");
    let lang = tmp.path("python");
    std::fs::create_dir_all(&lang).unwrap();
    let path = lang.join("train-00000.parquet");
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message m { optional binary max_stars_repo_path (UTF8); optional binary content (UTF8); }",
        )
        .unwrap(),
    );
    let mut w = SerializedFileWriter::new(
        std::fs::File::create(&path).unwrap(),
        schema,
        Arc::new(WriterProperties::builder().build()),
    )
    .unwrap();
    let mut group = w.next_row_group().unwrap();
    let columns: [(Vec<ByteArray>, Vec<i16>); 2] = [
        (vec!["a.py".into(), "b.py".into(), "c.py".into()], vec![1, 1, 1]),
        (vec!["x = 1\r\ny = 2\r\n".into(), "".into()], vec![1, 0, 1]),
    ];
    for (values, defs) in &columns {
        let mut col = group.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>().write_batch(values, Some(defs.as_slice()), None).unwrap();
        col.close().unwrap();
    }
    group.close().unwrap();
    w.close().unwrap();

    let (s, lines) = run(Source::Starcode, &tmp.0, &tmp);
    assert_eq!((s.read, s.written, s.malformed), (3, 2, 1));
    assert_eq!(lines[0], r#"{"text": "x = 1\r\ny = 2\r\n"}"#, "raw: the \\r survives");
    assert_eq!(lines[1], r#"{"text": ""}"#, "no length gate for code");
    assert_eq!(s.malformed_lines[0].line, 2);
    assert!(s.malformed_lines[0].reason.contains("null"));

    // zhihu needs its three columns: a file without them is an error naming the column.
    let err = convert(Source::Zhihu, &path, &tmp.path("z.jsonl"), |_| {}).unwrap_err().to_string();
    assert!(err.contains("INSTRUCTION"), "{err}");
}

/// The firefly sample with garbage lines inserted: every good line is written exactly as
/// without them, every bad one is counted at its line number, and the run succeeds.
#[test]
fn injected_garbage_is_counted_not_fatal() {
    let tmp = TempDir::new("garbage");
    let clean = std::fs::read(samples().join("firefly/firefly-train-1.1M_sample.jsonl")).unwrap();
    let (_, clean_lines) = run(Source::Firefly, &samples().join("firefly"), &tmp);
    let good: Vec<&[u8]> = clean.split_inclusive(|&b| b == b'\n').collect();
    assert_eq!(good.len(), 1000);
    // (insert before this original line index, bytes)
    let garbage: [(usize, &[u8]); 8] = [
        (0, b"this is not json\n"),
        (10, b"[1, 2, 3]\n"),
        (10, b"\"a string\"\n"),
        (500, b"{\"kind\": \"NLI\", \"input\": \"no target\"}\n"),
        (700, b"{\"input\": 5, \"target\": \"x\"}\n"),
        (800, b"{\"input\": \"\xff\xfe bad utf-8\", \"target\": \"x\"}\n"),
        (900, b"   \n"), // blank: not a record
        (1000, b"{\"input\": \"truncated"),
    ];
    let mut bytes = Vec::new();
    let mut expected_bad = Vec::new();
    let mut line = 0u64;
    let mut g = garbage.iter().peekable();
    for i in 0..=good.len() {
        while let Some(&&(at, junk)) = g.peek() {
            if at != i {
                break;
            }
            bytes.extend_from_slice(junk);
            line += 1;
            if !junk.iter().all(u8::is_ascii_whitespace) {
                expected_bad.push(line);
            }
            g.next();
        }
        if i < good.len() {
            bytes.extend_from_slice(good[i]);
            line += 1;
        }
    }
    let input = tmp.write("dirty.jsonl", &bytes);
    let (s, lines) = run(Source::Firefly, &input, &tmp);
    assert_eq!(expected_bad, [1, 12, 13, 504, 705, 806, 1008]);
    assert_eq!((s.read, s.written, s.malformed), (1007, 1000, 7));
    assert_eq!(lines, clean_lines, "every good line converted as in the clean file");
    // The first five per file are listed, with their reasons.
    let file = input.display().to_string();
    let listed: Vec<(u64, &str)> =
        s.malformed_lines.iter().map(|m| (m.line, m.reason.as_str())).collect();
    assert_eq!(listed.iter().map(|x| x.0).collect::<Vec<_>>(), expected_bad[..5]);
    assert!(s.malformed_lines.iter().all(|m| m.file == file));
    assert!(listed[0].1.starts_with("invalid JSON"), "{listed:?}");
    assert_eq!(listed[1].1, "not a JSON object");
    assert_eq!(listed[2].1, "not a JSON object");
    assert_eq!(listed[3].1, "missing field `target`");
    assert_eq!(listed[4].1, "field `input` is not a string");

    // The JSON summary has the documented shape.
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["read"], 1007);
    assert_eq!(json["written"], 1000);
    assert_eq!(json["malformed"], 7);
    assert_eq!(json["dropped"], serde_json::json!({}));
    assert_eq!(
        json["malformed_lines"][0],
        serde_json::to_value(MalformedLine {
            file: file.clone(),
            line: 1,
            reason: listed[0].1.into()
        })
        .unwrap()
    );
    let report = s.to_string();
    assert!(
        report.contains("malformed 7") && report.contains(&format!("{file}:12: not a JSON object"))
    );

    // Two dirty files in a directory: each lists its own first five.
    let dir = tmp.path("two");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.jsonl"), &bytes).unwrap();
    std::fs::write(dir.join("b.jsonl"), &bytes).unwrap();
    let (s, lines) = run(Source::Firefly, &dir, &tmp);
    assert_eq!((s.read, s.written, s.malformed, s.malformed_lines.len()), (2014, 2000, 14, 10));
    assert_eq!(lines[..1000], clean_lines[..]);
}

#[test]
fn directory_discovery_is_sorted_and_skips_the_output() {
    let tmp = TempDir::new("discover");
    let rec = "{\"text\": \"x\"}\n";
    for name in ["b.jsonl", "a.jsonl", ".hidden.jsonl", "notes.txt", "c.jsonl.tar.gz"] {
        tmp.write(name, rec);
    }
    let names = |files: Vec<PathBuf>| -> Vec<String> {
        files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into()).collect()
    };
    assert_eq!(names(input_files(Source::Skypile, &tmp.0).unwrap()), ["a.jsonl", "b.jsonl"]);
    // The json sources take names containing ".json" (so *.json and *.jsonl, and archives).
    assert_eq!(
        names(input_files(Source::Firefly, &tmp.0).unwrap()),
        ["a.jsonl", "b.jsonl", "c.jsonl.tar.gz"]
    );
    // An output inside the input directory is never read back as input, and is replaced.
    let out = tmp.path("out.jsonl");
    std::fs::write(&out, "stale\n").unwrap();
    let s = convert(Source::Skypile, &tmp.0, &out, |_| {}).unwrap();
    assert_eq!((s.files.len(), s.read, s.written), (2, 2, 2));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), rec.repeat(2));

    // Unusable inputs are errors.
    let missing = tmp.path("missing");
    assert!(convert(Source::Skypile, &missing, &tmp.path("o.jsonl"), |_| {}).is_err());
    let empty = tmp.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = convert(Source::Zhihu, &empty, &tmp.path("o.jsonl"), |_| {}).unwrap_err().to_string();
    assert!(err.contains("no zhihu input files"), "{err}");
    let err = input_files(Source::Starcode, &empty).unwrap_err().to_string();
    assert!(err.contains("cpp/"), "{err}");
    assert!(!tmp.path("o.jsonl").exists());
}

#[test]
fn text_helpers() {
    assert_eq!(
        chatml_single("Q", "A"),
        format!("{SYSTEM}<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA")
    );
    assert_eq!(chatml_multi::<&str>(&[], &[]), None);
    assert_eq!(chatml_multi(&["Q"], &[]), None);
    assert_eq!(chatml_multi(&["Q", "Q2"], &["send"]).unwrap(), chatml_single("Q", "send"));

    for (raw, votes) in [
        ("赞同 15", Some(15)),
        ("赞同 1.2 万", Some(12_000)),
        ("赞同 1.25万", Some(12_500)),
        ("赞同 3 万", Some(30_000)),
        ("赞同 2 千", Some(2_000)),
        ("赞同 1.5k", Some(1_500)),
        ("赞同 1,234", Some(1_234)),
        ("赞同 １２", Some(12)),
        ("赞同", Some(0)),
        ("15", Some(15)),
        ("赞同 1.5", None),
        ("赞同 很多", None),
        ("赞同 1.2 百万", None),
        ("赞同 .5 万", None),
        ("赞同 1. 万", None),
        ("赞同 -3", None),
        ("赞同 99999999999999999999", None),
    ] {
        assert_eq!(parse_upvotes(raw), votes, "{raw:?}");
    }

    // Python: json.dumps({"text": "".join(map(chr, range(32))) + "\x7f\"\\/\u2028\u2029é中，😀"},
    // ensure_ascii=False)
    let s: String =
        (0u8..32).map(char::from).collect::<String>() + "\u{7f}\"\\/\u{2028}\u{2029}é中，😀";
    assert_eq!(
        String::from_utf8(json_line(&s)).unwrap(),
        "{\"text\": \"\\u0000\\u0001\\u0002\\u0003\\u0004\\u0005\\u0006\\u0007\\b\\t\\n\\u000b\\f\\r\
         \\u000e\\u000f\\u0010\\u0011\\u0012\\u0013\\u0014\\u0015\\u0016\\u0017\\u0018\\u0019\\u001a\
         \\u001b\\u001c\\u001d\\u001e\\u001f\u{7f}\\\"\\\\/\u{2028}\u{2029}é中，😀\"}\n"
    );
}

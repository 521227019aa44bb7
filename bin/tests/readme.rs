//! The README walked as a newcomer walks it: every command of every fenced `bash` block runs from
//! the checkout as written — placeholders substituted and sizes made small by the table below —
//! or is marked in the README's source as not runnable here, with the reason. A block without a
//! marker fails the walk, so a later README edit cannot add a command nobody runs. The README and
//! the tools' `--help` agree: every flag a README command passes, every flag its prose names and
//! every flag of a `--help` example is one the tool lists.
//!
//! Markers are HTML comments on the lines just above a fence (invisible when rendered):
//!
//! ```text
//! <!-- readme-test: run -->                   each command runs, in order, in one scratch folder
//! <!-- readme-test: script (WHY) -->          the block runs as one `sh -e` script
//! <!-- readme-test: skip (REASON) -->         no command of the block runs
//! <!-- readme-test: skip `TEXT` (REASON) -->  with `run`: the commands containing TEXT do not
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{newcomer_shell, ok};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// How a block is classified.
#[derive(Debug, PartialEq)]
enum Kind {
    Run,
    Script,
    Skip(String),
}

#[derive(Debug)]
struct Block {
    /// The fence's line (1-based).
    line: usize,
    kind: Kind,
    /// `skip \`TEXT\` (REASON)` markers of a run block.
    skips: Vec<Skip>,
    /// The commands: continuation lines joined, comment lines dropped, trailing comments cut.
    commands: Vec<String>,
    /// The block as written (a script block runs it).
    lines: Vec<String>,
}

/// Cuts a shell comment (`#` after whitespace, outside quotes) off a command line.
fn strip_comment(line: &str) -> &str {
    let (mut quote, mut prev) = (None, ' ');
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '#') if prev.is_whitespace() => return line[..i].trim_end(),
            _ => {}
        }
        prev = c;
    }
    line.trim_end()
}

/// A `skip \`TEXT\` (REASON)` marker: the text and the reason.
type Skip = (String, String);

/// One marker's body: a block kind, or a skip of some of a run block's commands.
fn parse_marker(body: &str) -> Result<(Option<Kind>, Option<Skip>), String> {
    let reason = |rest: &str| -> Result<String, String> {
        let r = rest.trim();
        match r.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
            Some(r) if !r.trim().is_empty() => Ok(r.trim().to_string()),
            _ => Err(format!("a reason in parentheses is required, got {r:?}")),
        }
    };
    if body == "run" {
        Ok((Some(Kind::Run), None))
    } else if let Some(rest) = body.strip_prefix("script") {
        reason(rest)?;
        Ok((Some(Kind::Script), None))
    } else if let Some(rest) = body.strip_prefix("skip") {
        let rest = rest.trim();
        if let Some(pat) = rest.strip_prefix('`') {
            let (text, after) = pat.split_once('`').ok_or("an unclosed `TEXT`")?;
            Ok((None, Some((text.to_string(), reason(after)?))))
        } else {
            Ok((Some(Kind::Skip(reason(rest)?)), None))
        }
    } else {
        Err(format!("unknown marker {body:?} (run, script, skip)"))
    }
}

/// Every fenced `bash` block of `readme` with its classification; every block without one, or
/// with a malformed marker, is an error naming its line.
fn parse_blocks(readme: &str) -> (Vec<Block>, Vec<String>) {
    let lines: Vec<&str> = readme.lines().collect();
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_start();
        if !fence.starts_with("```") {
            i += 1;
            continue;
        }
        let lang = fence.trim_start_matches('`').trim();
        let end = (i + 1..lines.len()).find(|&j| lines[j].trim_start().starts_with("```"));
        let Some(end) = end else {
            errors.push(format!("README.md:{}: an unclosed fence", i + 1));
            break;
        };
        if lang == "bash" || lang == "sh" {
            let (mut kind, mut skips) = (None, Vec::new());
            let mut j = i;
            while j > 0 && lines[j - 1].starts_with("<!-- readme-test:") {
                j -= 1;
                let body = lines[j]
                    .trim_start_matches("<!-- readme-test:")
                    .trim_end()
                    .trim_end_matches("-->")
                    .trim();
                match parse_marker(body) {
                    Ok((k, s)) => {
                        if k.is_some() && kind.is_some() {
                            errors.push(format!("README.md:{}: two block markers", j + 1));
                        }
                        kind = kind.or(k);
                        skips.extend(s);
                    }
                    Err(e) => errors.push(format!("README.md:{}: {e}", j + 1)),
                }
            }
            let body: Vec<String> = lines[i + 1..end].iter().map(|l| l.to_string()).collect();
            let mut commands = Vec::new();
            let mut pending = String::new();
            for l in &body {
                let t = l.trim();
                if pending.is_empty() && (t.is_empty() || t.starts_with('#')) {
                    continue;
                }
                let t = strip_comment(t);
                match t.strip_suffix('\\') {
                    Some(head) => pending.push_str(head),
                    None => {
                        pending.push_str(t);
                        commands.push(std::mem::take(&mut pending));
                    }
                }
            }
            match kind {
                None => errors.push(format!(
                    "README.md:{}: a bash block without a `<!-- readme-test: run|script|skip (…) -->` \
                     marker: every README command is run by this test or says why not",
                    i + 1
                )),
                Some(kind) => {
                    if kind != Kind::Run && !skips.is_empty() {
                        errors.push(format!(
                            "README.md:{}: `skip `TEXT`` markers belong to run blocks",
                            i + 1
                        ));
                    }
                    for (text, _) in &skips {
                        if !commands.iter().any(|c| c.contains(text.as_str())) {
                            errors.push(format!(
                                "README.md:{}: the skip marker's {text:?} matches no command",
                                i + 1
                            ));
                        }
                    }
                    out.push(Block { line: i + 1, kind, skips, commands, lines: body });
                }
            }
        }
        i = end + 1;
    }
    (out, errors)
}

/// A README text and what the walk runs instead.
enum Sub {
    /// The whole command.
    Whole(&'static str, &'static str),
    /// Every occurrence, in table order.
    Part(&'static str, &'static str),
}

/// Placeholders and sizes. `{scratch}` is the walk's scratch folder, `{shared}` is
/// `../shared/data`; every entry must be used, so the table follows the README.
const SUBSTITUTIONS: &[Sub] = &[
    // the demo: three steps, into the scratch folder instead of the checkout's runs/
    Sub::Whole(
        "cargo run --release --bin steel-train",
        "cargo run --release --bin steel-train -- --out {scratch}/runs/demo --max-steps 3",
    ),
    Sub::Part("/tmp/tiny", "{scratch}/tiny"),
    Sub::Part("[--seed N]", "--seed 7"),
    Sub::Part("[--dtype bf16|f32]", "--dtype bf16"),
    Sub::Part("[--dump-logits logits.safetensors]", "--dump-logits {scratch}/logits.safetensors"),
    // the pipeline: the shipped samples and tokenizer, data/ in the scratch folder
    Sub::Part("RAW_DIR=/data/raw", "RAW_DIR={shared}/corpus-samples"),
    Sub::Part("TOKENIZER=/models/qwen-tokenizer", "TOKENIZER={shared}/qwen-tokenizer"),
    Sub::Part(" data/", " {scratch}/data/"),
    Sub::Part("\"data/", "\"{scratch}/data/"),
    // training: a few steps of each run
    Sub::Part("--max-steps 100", "--max-steps 2"),
    Sub::Part("--max-steps 200", "--max-steps 4"),
    Sub::Part("step-000200", "step-000004"),
    Sub::Part("--max-steps 20 --set", "--max-steps 2 --out {scratch}/runs/emu --set"),
    // my.toml: the recipe the walk writes (the tiny architecture at Qwen's vocabulary, on the
    // shards the pipeline wrote); shards/web: those shards
    Sub::Part("--config my.toml --set", "--config {scratch}/my.toml --out {scratch}/runs/my --set"),
    Sub::Part(
        "--config my.toml --ranks 4",
        "--config {scratch}/my.toml --out {scratch}/runs/my-ranks --ranks 4",
    ),
    Sub::Part("shards/web", "{scratch}/data/step3/text"),
    Sub::Part("[--remote-code DIR]", "--remote-code {scratch}/remote-code"),
    // fine-tuning: from the export of runs/a (the demo's model) instead of runs/demo/export
    Sub::Part(
        "--out runs/sft-demo",
        "--out {scratch}/runs/sft-demo --set model.init_from='\"{scratch}/runs/a/hf\"' --max-steps 2",
    ),
    Sub::Part(" runs/", " {scratch}/runs/"),
    Sub::Part("--seq 256 --batch 4 --steps 10", "--seq 16 --batch 1 --steps 1"),
];

/// The recipe standing in for the README's `my.toml`.
const MY_TOML: &str = r#"# the README walk's my.toml: the tiny architecture at Qwen's vocabulary
[model]
init_seed = 7

[model.config]
architectures = ["SteelForCausalLM"]
model_type = "steel"
hidden_size = 32
intermediate_size = 128
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 1
vocab_size = 151936
max_position_embeddings = 4096
rms_norm_eps = 1e-6
rope_theta = 1000000.0
n_experts = 2
slots_per_expert = 1
mlp_div_ratio = 4
FFN_type = "softmoe_v3"
mlp_type = "senet"
tie_word_embeddings = false
initializer_range = 0.02
torch_dtype = "float32"

[data]
train = [{ path = "data/step3/text" }]
tokenizer = "{shared}/qwen-tokenizer"
seq_len = 2048

[optim]
lr = 1e-3
min_lr = 1e-4
warmup_steps = 1
decay_steps = 0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
clip = 1.0

[train]
micro_batch = 1
grad_accum = 1
max_steps = 1
log_every = 1
eval_every = 0
checkpoint_every = 1
keep_checkpoints = 1
device = "cpu"
"#;

fn fill(s: &str, scratch: &Path, shared: &Path) -> String {
    s.replace("{scratch}", &scratch.display().to_string())
        .replace("{shared}", &shared.display().to_string())
}

/// Applies the table to one command (or script line), counting each entry's uses.
fn substitute(cmd: &str, used: &mut [usize], scratch: &Path, shared: &Path) -> String {
    let mut c = cmd.to_string();
    for (i, s) in SUBSTITUTIONS.iter().enumerate() {
        match *s {
            Sub::Whole(from, to) if c == from => {
                c = fill(to, scratch, shared);
                used[i] += 1;
            }
            Sub::Part(from, to) if c.contains(from) => {
                used[i] += c.matches(from).count();
                c = c.replace(from, &fill(to, scratch, shared));
            }
            _ => {}
        }
    }
    c
}

/// Runs `script` in a newcomer's shell and asserts it succeeded; a failure shows `what`, the
/// script and both streams.
fn run_shell(script: &str, what: &str) -> Output {
    eprintln!("{what}\n$ {script}");
    let o = newcomer_shell(script, &repo()).output().unwrap();
    ok(&o);
    o
}

#[test]
fn every_readme_block_is_classified() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let (blocks, errors) = parse_blocks(&readme);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(blocks.len() >= 8, "the README's bash blocks: {}", blocks.len());
    // The classifier itself: an unmarked block, a reasonless skip and a stale skip are errors.
    let (_, e) = parse_blocks("```bash\necho hi\n```\n");
    assert!(e[0].contains("without a `<!-- readme-test"), "{e:?}");
    let (_, e) = parse_blocks("<!-- readme-test: skip -->\n```bash\necho hi\n```\n");
    assert!(e[0].contains("a reason"), "{e:?}");
    let (_, e) = parse_blocks(
        "<!-- readme-test: run -->\n<!-- readme-test: skip `nope` (x) -->\n```bash\nls\n```",
    );
    assert!(e[0].contains("matches no command"), "{e:?}");
    let (b, e) = parse_blocks(
        "<!-- readme-test: run -->\n```bash\na \\\n  b   # note\n# alone\nc '#x' \"y # z\"\n```\n",
    );
    assert!(e.is_empty(), "{e:?}");
    assert_eq!(b[0].commands, ["a b", "c '#x' \"y # z\""]);
}

/// Runs every runnable README command in README order, from the checkout, in a newcomer's shell
/// (`common::newcomer_shell`), with the substitution table applied.
#[test]
fn the_readme_runs_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let (blocks, errors) = parse_blocks(&readme);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let scratch = std::env::temp_dir().join(format!("steel-readme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let shared = repo().join("../shared/data").canonicalize().unwrap();
    std::fs::write(scratch.join("my.toml"), fill(MY_TOML, &scratch, &shared)).unwrap();
    // `--remote-code DIR`: a folder holding the three files the export copies (stand-ins: the
    // reference's modeling code is not ours to ship)
    let rc = scratch.join("remote-code");
    std::fs::create_dir_all(&rc).unwrap();
    for f in steel_model::REMOTE_CODE_FILES {
        std::fs::write(rc.join(f), format!("# stand-in for the reference's {f}\n")).unwrap();
    }
    let mut used = vec![0; SUBSTITUTIONS.len()];
    let (mut ran, mut skipped) = (Vec::new(), Vec::new());
    let mut outputs = BTreeMap::new();
    for b in &blocks {
        match &b.kind {
            Kind::Skip(why) => {
                skipped.extend(b.commands.iter().map(|c| format!("{c}  ({why})")));
            }
            Kind::Script => {
                let script: Vec<String> =
                    b.lines.iter().map(|l| substitute(l, &mut used, &scratch, &shared)).collect();
                let script = format!("set -e\n{}", script.join("\n"));
                let o = run_shell(&script, &format!("README.md:{}: the script block", b.line));
                outputs.insert(b.line, String::from_utf8_lossy(&o.stdout).into_owned());
                ran.push(format!("README.md:{}: a script of {} lines", b.line, b.lines.len()));
            }
            Kind::Run => {
                for c in &b.commands {
                    if let Some((_, why)) = b.skips.iter().find(|(t, _)| c.contains(t.as_str())) {
                        skipped.push(format!("{c}  ({why})"));
                        continue;
                    }
                    let cmd = substitute(c, &mut used, &scratch, &shared);
                    // The kernel check needs the NVRTC wheels scripts/test.sh installs; as there,
                    // their absence is a skip outside CI and a failure in it.
                    let venv = repo().join("target/nvrtc-venv/bin/python");
                    if c.contains("target/nvrtc-venv") && !venv.exists() {
                        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI needs {venv:?}");
                        eprintln!("skipped (no target/nvrtc-venv; scripts/test.sh makes it): {c}");
                        skipped.push(format!("{c}  (no NVRTC venv)"));
                        continue;
                    }
                    run_shell(&cmd, &format!("README.md:{}: {c}", b.line));
                    ran.push(cmd);
                }
            }
        }
    }
    let unused: Vec<String> = SUBSTITUTIONS
        .iter()
        .zip(&used)
        .filter(|(_, &n)| n == 0)
        .map(|(s, _)| match s {
            Sub::Whole(f, _) | Sub::Part(f, _) => f.to_string(),
        })
        .collect();
    assert!(unused.is_empty(), "substitutions the README no longer needs: {unused:?}");
    eprintln!("ran {}:\n  {}\nskipped {}:\n  {}", ran.len(), ran.join("\n  "), skipped.len(), {
        skipped.join("\n  ")
    });
    assert!(ran.len() >= 17 && skipped.len() <= 5, "ran {}, skipped {}", ran.len(), skipped.len());
    // What the pipeline wrote is what the rest of the walk trained on.
    let shards = scratch.join("data/step3/text");
    assert!(shards.join("steel-shards.json").is_file(), "tokenize writes its sidecar");
    assert!(shards.join("text_0000000000.bin").is_file(), "a small input gives a shard");
    let pipeline = outputs.values().next().expect("the pipeline script ran");
    assert!(pipeline.contains("blocks:") && !pipeline.contains("NOT a whole number"), "{pipeline}");
    for run in ["runs/demo", "runs/a", "runs/my", "runs/my-ranks", "runs/sft-demo", "runs/emu"] {
        let m = std::fs::read_to_string(scratch.join(run).join("metrics.jsonl")).unwrap();
        assert!(m.lines().count() >= 1, "{run} logged its steps");
    }
    assert!(scratch.join("runs/a/hf/modeling_steel.py").is_file(), "--remote-code copied");
    assert!(scratch.join("runs/a/loss.svg").is_file(), "steel-plot drew");
    let _ = std::fs::remove_dir_all(scratch);
}

/// A command's call of a Steel tool: the tool, its subcommand (or first argument) and its flags.
type ToolCall = (String, Option<String>, Vec<String>);

/// The call `cmd` makes of a Steel tool (`cargo run … --bin TOOL -- …`), or None for others.
fn tool_flags(cmd: &str) -> Option<ToolCall> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let bin = words.iter().position(|w| *w == "--bin")?;
    let tool = words.get(bin + 1)?.to_string();
    let args = match words[bin..].iter().position(|w| *w == "--") {
        Some(p) => &words[bin + p + 1..],
        None => &[][..],
    };
    let sub = args.first().filter(|a| !a.starts_with('-')).map(|a| a.to_string());
    let flags = args
        .iter()
        .filter(|a| a.starts_with("--") && a.len() > 2)
        .map(|a| a.split('=').next().unwrap().trim_matches(|c| c == '[' || c == ']').to_string())
        .collect();
    Some((tool, sub, flags))
}

const TOOLS: [(&str, &str); 9] = [
    ("steel-train", env!("CARGO_BIN_EXE_steel-train")),
    ("steel-export", env!("CARGO_BIN_EXE_steel-export")),
    ("steel-plot", env!("CARGO_BIN_EXE_steel-plot")),
    ("steel-generate", env!("CARGO_BIN_EXE_steel-generate")),
    ("steel-chat", env!("CARGO_BIN_EXE_steel-chat")),
    ("steel-data", env!("CARGO_BIN_EXE_steel-data")),
    ("steel-init", env!("CARGO_BIN_EXE_steel-init")),
    ("steel-eval", env!("CARGO_BIN_EXE_steel-eval")),
    ("steel-bench", env!("CARGO_BIN_EXE_steel-bench")),
];

/// `tool [sub] --help`, and the subcommands the top-level help lists.
fn help(tool: &str, sub: Option<&str>) -> String {
    let exe = TOOLS.iter().find(|(t, _)| *t == tool).unwrap_or_else(|| panic!("no tool {tool}")).1;
    let o = Command::new(exe).args(sub).arg("--help").output().unwrap();
    assert!(o.status.success(), "{tool} {sub:?} --help: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn subcommands(top_help: &str) -> Vec<String> {
    top_help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_string)
        .collect()
}

/// Whether `help` lists `flag` (not merely a longer flag starting with it).
fn lists(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        !help[i + flag.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
    })
}

/// Every flag of the README's commands is in its tool's `--help`; every flag the prose names is
/// in some tool's; every `--help` example is a command runnable from the clone
/// (`cargo run --release --bin TOOL -- …`) whose flags that tool lists.
#[test]
fn the_readme_and_help_agree() {
    let mut helps: BTreeMap<(String, Option<String>), String> = BTreeMap::new();
    let mut all_flags = BTreeSet::new();
    for (tool, _) in TOOLS {
        let top = help(tool, None);
        for sub in subcommands(&top) {
            helps.insert((tool.to_string(), Some(sub.clone())), help(tool, Some(&sub)));
        }
        helps.insert((tool.to_string(), None), top);
    }
    for h in helps.values() {
        for w in h.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
            if w.starts_with("--") && w.len() > 2 {
                all_flags.insert(w.to_string());
            }
        }
    }
    let help_of = |tool: &str, sub: &Option<String>| -> &String {
        let key = (tool.to_string(), sub.clone());
        helps.get(&key).or_else(|| helps.get(&(tool.to_string(), None))).unwrap()
    };
    let mut errors = Vec::new();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let (blocks, e) = parse_blocks(&readme);
    errors.extend(e);
    let mut checked = 0;
    for b in &blocks {
        for c in &b.commands {
            let Some((tool, sub, flags)) = tool_flags(c) else { continue };
            let h = help_of(&tool, &sub);
            for f in flags {
                checked += 1;
                if !lists(h, &f) {
                    errors.push(format!("README.md:{}: {tool} {sub:?} has no {f}: {c}", b.line));
                }
            }
        }
    }
    // The prose: `--flag` inside backticks, but not in other programs' commands.
    let mut in_fence = false;
    for (n, line) in readme.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        for span in line.split('`').skip(1).step_by(2) {
            let foreign = ["cargo install", "nsys", "python", "pip"];
            if foreign.iter().any(|f| span.starts_with(f)) {
                continue;
            }
            for w in span.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
                if w.starts_with("--") && w.len() > 2 && !all_flags.contains(w) {
                    errors.push(format!("README.md:{}: no tool has {w} (`{span}`)", n + 1));
                }
            }
        }
    }
    // The examples in --help.
    let mut examples = 0;
    for ((tool, sub), h) in &helps {
        for l in h.lines().map(str::trim) {
            if TOOLS.iter().any(|(t, _)| l.starts_with(&format!("{t} "))) || l == tool.as_str() {
                errors.push(format!("{tool} {sub:?} --help: a bare command (not on PATH): {l}"));
            }
            if !l.starts_with("cargo run --release --bin ") {
                continue;
            }
            examples += 1;
            let (t, s, flags) = tool_flags(l).unwrap();
            let eh = help_of(&t, &s);
            for f in flags.iter().filter(|f| !lists(eh, f)) {
                errors.push(format!("{tool} {sub:?} --help example: {t} has no {f}: {l}"));
            }
        }
    }
    // The demo's duration, said the same way wherever it is said.
    let recipe = std::fs::read_to_string(repo().join("configs/demo.toml")).unwrap();
    let train_help = &helps[&("steel-train".to_string(), None)];
    for (what, text) in
        [("README.md", &readme), ("configs/demo.toml", &recipe), ("--help", train_help)]
    {
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for claim in ["about 11 s on 2 cores", "first build of 3–4 minutes"] {
            if !flat.contains(claim) {
                errors.push(format!("{what} does not say the demo takes {claim:?}"));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(checked >= 40 && examples >= 8, "flags checked {checked}, help examples {examples}");
}

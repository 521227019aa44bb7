//! `steel-data convert`: step 1, one raw source → `{"text": …}` jsonl (spec §1).
//!
//! Progress goes to stderr: a spinner while a file is read (on a terminal) and one line per
//! finished file; the summary (records read, written, dropped per reason, malformed with their
//! first positions) ends every run. Malformed records never fail the run; exit status 2 is for
//! an input or output that cannot be used at all.

use anyhow::Context;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use steel_data::convert::{self, Source};

/// Arguments of `steel-data convert`.
#[derive(clap::Args)]
#[command(after_long_help = sources_help())]
pub struct ConvertArgs {
    /// The raw source the input holds: baidu_baike, baidu_qa, belle_2m, belle_3_5m, firefly,
    /// moss, zhihu, wiki_cn, starcode, wanjuan or skypile (see the list under --help).
    #[arg(long, value_parser = parse_source)]
    pub source: Source,
    /// An input file, or a directory of them (not recursive; files sorted by name; for
    /// starcode the directory holding cpp/, java/ and python/).
    #[arg(long)]
    pub input: PathBuf,
    /// The jsonl file to write, one `{"text": "…"}` line per kept record. Written to a
    /// temporary file beside it and renamed when complete.
    #[arg(long)]
    pub output: PathBuf,
    /// Also write the summary as JSON here: {"source", "files", "read", "written",
    /// "dropped": {reason: count}, "malformed", "malformed_lines": [{"file", "line",
    /// "reason"}]}.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
}

fn parse_source(s: &str) -> Result<Source, String> {
    s.parse().map_err(|e: steel_data::DataError| e.to_string())
}

fn sources_help() -> String {
    let mut s = String::from(
        "Sources (spec §1.4). NFKC + \\r removal apply to the fields of the Chinese text sources; \
         ChatML is `<|im_start|>system⏎You are a helpful assistant.<|im_end|>⏎<|im_start|>user⏎Q\
         <|im_end|>⏎<|im_start|>assistant⏎A`, turns repeated for multi-turn sources, ending in the \
         last answer.\n",
    );
    for source in Source::ALL {
        s.push_str(&format!("  {:<12} {}\n", source.name(), source.describe()));
    }
    s.push_str(
        "\nA malformed record (invalid JSON or UTF-8, not an object, a used field missing or of the \
         wrong type) is counted and reported with its line (jsonl), element (wiki_cn) or row \
         (parquet) number, and the run goes on.",
    );
    s
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let bar = crate::spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    let summary = convert::convert(args.source, &args.input, &args.output, |p| {
        let file = p.file.display();
        if p.file_done {
            bar.suspend(|| {
                eprintln!(
                    "[{}/{}] {file}: done, {} records read, {} written so far",
                    p.file_index + 1,
                    p.files,
                    p.read,
                    p.written
                )
            });
        } else {
            bar.set_message(format!(
                "[{}/{}] {file}: {} records read",
                p.file_index + 1,
                p.files,
                p.read
            ));
        }
    });
    bar.finish_and_clear();
    // The message only: `DataError::Io` already shows its cause, and `{:#}` would repeat it.
    let summary = summary.map_err(|e| {
        anyhow::anyhow!("converting {} ({}): {e}", args.input.display(), args.source)
    })?;
    eprintln!("{summary}");
    eprintln!("wrote {} in {:.1} s", args.output.display(), start.elapsed().as_secs_f64());
    if let Some(path) = &args.summary_json {
        let json = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("writing the summary to {}", path.display()))?;
    }
    Ok(())
}

//! `steel-data clean`: step 2, rule-based cleaning of `{"text": …}` jsonl (spec §2).

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;
use steel_data::clean::{clean, CleanConfig, CleanOptions, Pipeline, Preset};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum PresetArg {
    /// The reference's text configuration (steel_project_txt.yaml).
    Text,
    /// The reference's code configuration (steel_project_starcode.yaml).
    Code,
}

/// Arguments of `steel-data clean`.
#[derive(clap::Args)]
#[command(
    after_long_help = "Runs native re-implementations of the reference's data-juicer cleaning over \
    {\"text\": …} jsonl files: mappers (t2s conversion, e-mail/HTML/IP/link/copyright cleaning, LaTeX \
    macro expansion, Unicode fixes, punctuation and whitespace normalisation, repeated-sentence removal), \
    filters (alphanumeric and special-character ratios, average/maximum line length, character and word \
    repetition, text length, word count; a filter keeps a document when min ≤ stat ≤ max), then exact \
    de-duplication by content hash and near-duplicate removal by SimHash (window 6, 6 blocks, Hamming \
    distance ≤ 4), keeping the first document of each group in input order.

--preset text|code reproduces the reference's text or code configuration (without perplexity_filter \
and the tokenizer-based alphanumeric_filter, which need models Steel does not ship). --config FILE \
reads a JSON list of ops instead; --print-config shows a preset in that format, a starting point to \
edit:

  cargo run --release --bin steel-data -- clean --preset text --print-config > my.json
  {\"ops\": [
    {\"op\": \"chinese_convert_mapper\", \"mode\": \"t2s\"},
    {\"op\": \"alphanumeric_filter\", \"tokenization\": false, \"min_ratio\": 0.0, \"max_ratio\": 0.9},
    {\"op\": \"document_simhash_deduplicator\", \"window_size\": 6, \"hamming_distance\": 4}
  ]}

Op and parameter names are data-juicer's; a parameter left out takes data-juicer's default, null \
means unbounded. docs/data-cleaning.md defines every op.

Output: one {\"text\": …} line per kept document, in input order, byte-identical for any --threads; \
it is written to OUTPUT.tmp and renamed at the end. Malformed lines (not JSON, no string \"text\") are \
counted and reported, never fatal. The report (stderr, and --report-json) gives, per op, the \
documents a mapper changed and the documents a filter or deduplicator removed."
)]
pub struct CleanArgs {
    /// Input jsonl files or directories (searched recursively for *.jsonl / *.json).
    #[arg(long, num_args = 1.., required_unless_present = "print_config")]
    input: Vec<PathBuf>,
    /// Output jsonl file.
    #[arg(long, required_unless_present = "print_config")]
    output: Option<PathBuf>,
    /// Built-in configuration [default: text].
    #[arg(long, value_enum, conflicts_with = "config")]
    preset: Option<PresetArg>,
    /// JSON configuration file listing the ops (see --print-config).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Worker threads (default: all cores). The output does not depend on it.
    #[arg(long)]
    threads: Option<usize>,
    /// Also write the report as JSON.
    #[arg(long)]
    report_json: Option<PathBuf>,
    /// Print the configuration (the preset's, or --config's) as JSON and exit.
    #[arg(long)]
    print_config: bool,
}

pub fn run(args: CleanArgs) -> Result<()> {
    let (config, source) = match (&args.config, args.preset) {
        (Some(path), _) => (CleanConfig::load(path)?, format!("config {}", path.display())),
        (None, Some(PresetArg::Code)) => (Preset::Code.config(), "preset code".to_string()),
        (None, _) => (Preset::Text.config(), "preset text".to_string()),
    };
    if args.print_config {
        println!("{}", config.to_json());
        return Ok(());
    }
    let output = args.output.context("--output is required")?;
    let pipeline = Pipeline::new(&config)?;
    let (pool, threads) = crate::thread_pool(args.threads)?;
    let bar = crate::spinner();
    let start = Instant::now();
    let report = pool.install(|| {
        clean(&pipeline, &args.input, &output, &CleanOptions::default(), &mut |p| {
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{} documents, {} kept, {:.1} MB read, {:.0} docs/s",
                p.documents,
                p.kept,
                p.bytes_read as f64 / 1e6,
                p.documents as f64 / secs
            ));
            bar.tick();
        })
    })?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "steel-data clean ({source}): {} files, {} documents → {} kept in {:.2}s ({:.0} docs/s, {:.2} MB/s, {threads} threads)",
        report.input_files,
        report.documents,
        report.kept,
        secs,
        report.documents as f64 / secs.max(1e-9),
        report.bytes_read as f64 / 1e6 / secs.max(1e-9)
    );
    eprint!("{}", report.table());
    eprintln!("  written to {} ({:.1} MB)", output.display(), report.bytes_written as f64 / 1e6);
    if report.malformed > 0 {
        eprintln!("  {} malformed lines skipped; first ones:", report.malformed);
        for b in report.malformed_lines.iter().take(5) {
            eprintln!("    {}:{}: {}", b.file.display(), b.line, b.reason);
        }
    }
    if let Some(path) = &args.report_json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("source".into(), source.into());
            o.insert("threads".into(), threads.into());
            o.insert("seconds".into(), secs.into());
        }
        std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

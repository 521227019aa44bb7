//! `steel-data tokenize`: `{"text": …}` jsonl → TinyLlama-compatible packed shards.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;
use steel_data::tokenize::{tokenize, TokenizeOptions};
use steel_data::tokenizer::Tokenizer;

/// Arguments of `steel-data tokenize`.
#[derive(clap::Args)]
#[command(
    long_about = "Encodes every document of the input jsonl files (one {\"text\": …} object per line), \
    appends <|im_end|> (151645) as the document separator, and packs the ids of all documents, in input \
    order, into shards {prefix}_{counter:010d}.bin of block-size × blocks-per-shard tokens each, in the \
    TinyLlama LITPKDS format (int32 ids for vocabularies ≥ 65,500, uint16 below). With --blocks-per-shard \
    the last partial shard is padded with <|endoftext|> (151643) to a full shard and kept only when more \
    than 5 % full (the reference's layout); without it the last shard holds just the blocks the input \
    needs. steel-shards.json beside the shards records the block size. Malformed lines are \
    reported, never fatal. The output bytes depend only on the inputs and options, not on --threads."
)]
pub struct TokenizeArgs {
    /// Tokenizer directory holding tokenizer.json (a model directory works too).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Input jsonl files or directories (searched recursively for *.jsonl / *.json).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Output directory for the shards.
    #[arg(long)]
    output: PathBuf,
    /// Tokens per training block (sequence length + 1).
    #[arg(long, default_value_t = 2049)]
    block_size: usize,
    /// Blocks per shard. Given, every shard holds exactly this many blocks and a last, partial
    /// shard is padded and kept only when more than 5 % full (the reference's behaviour, byte
    /// for byte; it used 204,800). Without it, shards hold at most 204,800 blocks and the last
    /// one is sized to the input (whole blocks), so a small input still gives a shard.
    #[arg(long)]
    blocks_per_shard: Option<usize>,
    /// Shard file name prefix (default: the output directory's name).
    #[arg(long)]
    prefix: Option<String>,
    /// Encoding threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Also write the run's summary as JSON.
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// Remove the shards (*.bin) already in --output first. Without it, an --output holding
    /// shards is refused: new shards beside old ones would be mixed into training unnoticed.
    #[arg(long)]
    overwrite: bool,
}

/// The shard files (`*.bin`) directly in `dir` (none when it does not exist).
fn existing_shards(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "bin"))
        .collect();
    out.sort();
    Ok(out)
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let old = existing_shards(&args.output)?;
    if !old.is_empty() && !args.overwrite {
        anyhow::bail!(
            "--output {} already holds {} shard(s) ({}…): new shards beside them would be mixed \
             into training; choose an empty directory, or pass --overwrite to remove them first",
            args.output.display(),
            old.len(),
            old[0].display()
        );
    }
    let tok = Tokenizer::load(&args.tokenizer)?;
    for f in &old {
        std::fs::remove_file(f).with_context(|| format!("removing {}", f.display()))?;
    }
    let prefix = match args.prefix {
        Some(p) => p,
        None => args
            .output
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .context("cannot derive a prefix from --output; pass --prefix")?,
    };
    let opts = TokenizeOptions {
        block_size: args.block_size,
        blocks_per_shard: args.blocks_per_shard.unwrap_or(204_800),
        fit_last: args.blocks_per_shard.is_none(),
        prefix,
        ..TokenizeOptions::default()
    };
    let (pool, threads) = crate::thread_pool(args.threads)?;
    let bar = crate::spinner();
    let start = Instant::now();
    let summary = pool.install(|| {
        tokenize(&tok, &args.input, &args.output, &opts, &mut |p| {
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{} documents, {} tokens, {:.0} tokens/s, {:.1} MB read",
                p.documents,
                p.tokens,
                p.tokens as f64 / secs,
                p.bytes_read as f64 / 1e6
            ));
            bar.tick();
        })
    })?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "steel-data tokenize: {} files, {} documents, {} tokens in {:.1}s ({:.0} tokens/s, {threads} threads)",
        summary.input_files,
        summary.documents,
        summary.tokens,
        secs,
        summary.tokens as f64 / secs.max(1e-9)
    );
    eprintln!(
        "  {} shards written to {} ({} tokens per block, recorded in {}); {} padding tokens{}",
        summary.shards.files.len(),
        args.output.display(),
        args.block_size,
        steel_data::tokenize::SIDECAR,
        summary.shards.padding_tokens,
        if args.blocks_per_shard.is_some() {
            format!("; {} tokens dropped (final shard ≤ 5 % full)", summary.shards.tokens_dropped)
        } else {
            String::new()
        }
    );
    eprintln!(
        "  sizes: --block-size (tokens per training sequence + 1) and --blocks-per-shard (fixed \
         shards, the reference's layout) change them"
    );
    if summary.malformed > 0 {
        eprintln!("  {} malformed lines skipped; first ones:", summary.malformed);
        for b in summary.malformed_lines.iter().take(5) {
            eprintln!("    {}:{}: {}", b.file.display(), b.line, b.reason);
        }
    }
    if let Some(path) = &args.summary_json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

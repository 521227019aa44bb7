//! `steel-data`: the data pipeline from raw sources to packed training shards.
//!
//! `convert` (step 1: any source → `{"text": …}` jsonl), `clean` (step 2: rule-based filters
//! and de-duplication), `tokenize` (step 3: TinyLlama-compatible packed `.bin` shards),
//! `inspect` (validate a shard and show its text).

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use steel_cli::data_cli;

#[derive(Parser)]
#[command(
    name = "steel-data",
    version,
    about = "Steel's data pipeline: convert → clean → tokenize into packed shards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Step 1: convert one raw source (baidu_baike, baidu_qa, belle_2m, belle_3_5m, firefly, moss,
    /// zhihu, wiki_cn, starcode, wanjuan, skypile) to `{"text": …}` jsonl.
    Convert(data_cli::convert::ConvertArgs),
    /// Step 2: rule-based cleaning filters and mappers, exact and near-duplicate removal.
    Clean(data_cli::clean::CleanArgs),
    /// Step 3: tokenize `{"text": …}` jsonl into packed `.bin` shards (TinyLlama format).
    Tokenize(data_cli::tokenize::TokenizeArgs),
    /// Validate a packed shard and print its header and decoded text.
    Inspect(data_cli::inspect::InspectArgs),
}

fn main() -> ExitCode {
    steel_cli::run("steel-data", || match Cli::parse().command {
        Command::Convert(a) => data_cli::convert::run(a),
        Command::Clean(a) => data_cli::clean::run(a),
        Command::Tokenize(a) => data_cli::tokenize::run(a),
        Command::Inspect(a) => data_cli::inspect::run(a),
    })
}

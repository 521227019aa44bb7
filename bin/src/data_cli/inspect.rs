//! `steel-data inspect`: validate a packed shard and show its header and text.

use anyhow::Result;
use std::path::PathBuf;
use steel_data::shard::{Shard, HEADER_BYTES};
use steel_data::tokenizer::Tokenizer;

/// Arguments of `steel-data inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// The shard (.bin) to validate.
    file: PathBuf,
    /// Tokenizer directory to decode the blocks with (ids are printed without one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Blocks to show.
    #[arg(long, default_value_t = 1)]
    blocks: usize,
    /// Tokens per block (the training `seq_len + 1`). Default: the block size `tokenize`
    /// recorded in steel-shards.json beside the shard. Known either way, a shard that is not a
    /// whole number of blocks is an error (exit 2); with neither, blocks of 2,049 are shown and a
    /// remainder is only reported.
    #[arg(long)]
    block_size: Option<usize>,
}

/// The tokens scanned at a time when checking ids against the vocabulary.
const SCAN_TOKENS: usize = 1 << 20;

pub fn run(args: InspectArgs) -> Result<()> {
    let shard = Shard::open(&args.file)?;
    let h = shard.header;
    let file_len = HEADER_BYTES as u64 + h.chunk_size * h.dtype.itemsize() as u64;
    println!("file:        {}", args.file.display());
    println!("magic:       LITPKDS, version 1");
    println!("dtype:       {} (code {})", h.dtype.name(), h.dtype.code());
    println!("chunk size:  {} tokens ({} bytes with the header)", h.chunk_size, file_len);
    let recorded = args
        .file
        .parent()
        .and_then(steel_data::tokenize::sidecar_block_size)
        .filter(|_| args.block_size.is_none());
    let known = args.block_size.or(recorded);
    let block_size = known.unwrap_or(2049);
    if block_size == 0 {
        anyhow::bail!("--block-size must be at least 1");
    }
    let whole = h.chunk_size % block_size as u64 == 0;
    if !whole && known.is_some() {
        anyhow::bail!(
            "{}: {} tokens are not a whole number of {block_size}-token blocks ({} blocks and \
             {} tokens left over), so training with this block size cannot read it",
            args.file.display(),
            h.chunk_size,
            h.chunk_size / block_size as u64,
            h.chunk_size % block_size as u64
        );
    }
    println!(
        "blocks:      {} of {} tokens{}{}",
        h.chunk_size / block_size as u64,
        block_size,
        if recorded.is_some() { " (the block size steel-shards.json records)" } else { "" },
        if whole {
            ""
        } else {
            " (NOT a whole number: this shard cannot be read with this block size; pass \
             --block-size to check another)"
        }
    );
    let tok = args.tokenizer.as_deref().map(Tokenizer::load).transpose()?;
    if let Some(t) = &tok {
        check_ids(&shard, t.vocab_size(), &args.file)?;
        println!("ids:         all below the tokenizer's vocabulary size {}", t.vocab_size());
    }
    let bs = block_size;
    for b in 0..args.blocks {
        if (b + 1) * bs > shard.len() {
            break;
        }
        let ids = shard.tokens(b * bs, bs)?;
        println!("\n--- block {b} ---");
        match &tok {
            Some(t) => {
                let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
                println!("{}", t.decode(&ids, false)?);
            }
            None => println!("{ids:?}"),
        }
    }
    Ok(())
}

/// Every id of `shard` is below `vocab`; the error names the first one that is not and where.
fn check_ids(shard: &Shard, vocab: usize, file: &std::path::Path) -> Result<()> {
    let mut start = 0;
    while start < shard.len() {
        let n = SCAN_TOKENS.min(shard.len() - start);
        let ids = shard.tokens(start, n)?;
        if let Some(i) = ids.iter().position(|&x| x < 0 || x as u64 >= vocab as u64) {
            anyhow::bail!(
                "{}: token {} holds id {}, outside the tokenizer's vocabulary of {vocab} ids \
                 (a shard of another tokenizer, or corrupted)",
                file.display(),
                start + i,
                ids[i]
            );
        }
        start += n;
    }
    Ok(())
}

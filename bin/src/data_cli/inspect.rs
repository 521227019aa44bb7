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
    /// Tokens per block.
    #[arg(long, default_value_t = 2049)]
    block_size: usize,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let shard = Shard::open(&args.file)?;
    let h = shard.header;
    let file_len = HEADER_BYTES as u64 + h.chunk_size * h.dtype.itemsize() as u64;
    println!("file:        {}", args.file.display());
    println!("magic:       LITPKDS, version 1");
    println!("dtype:       {} (code {})", h.dtype.name(), h.dtype.code());
    println!("chunk size:  {} tokens ({} bytes with the header)", h.chunk_size, file_len);
    if args.block_size > 0 {
        let whole = h.chunk_size % args.block_size as u64 == 0;
        println!(
            "blocks:      {} of {} tokens{}",
            h.chunk_size / args.block_size as u64,
            args.block_size,
            if whole {
                ""
            } else {
                " (NOT a whole number: this shard cannot be read with this block size)"
            }
        );
    }
    let tok = args.tokenizer.as_deref().map(Tokenizer::load).transpose()?;
    let bs = args.block_size.max(1);
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

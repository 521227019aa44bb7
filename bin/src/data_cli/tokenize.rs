//! `steel-data tokenize` (being built).

/// Arguments of `steel-data tokenize`.
#[derive(clap::Args)]
pub struct TokenizeArgs {}

pub fn run(_args: TokenizeArgs) -> anyhow::Result<()> {
    anyhow::bail!("steel-data tokenize is being built")
}

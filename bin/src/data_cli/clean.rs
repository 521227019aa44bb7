//! `steel-data clean` (being built).

/// Arguments of `steel-data clean`.
#[derive(clap::Args)]
pub struct CleanArgs {}

pub fn run(_args: CleanArgs) -> anyhow::Result<()> {
    anyhow::bail!("steel-data clean is being built")
}

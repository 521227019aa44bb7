//! `steel-data inspect` (being built).

/// Arguments of `steel-data inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {}

pub fn run(_args: InspectArgs) -> anyhow::Result<()> {
    anyhow::bail!("steel-data inspect is being built")
}

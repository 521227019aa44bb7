//! `steel-data convert` (being built).

/// Arguments of `steel-data convert`.
#[derive(clap::Args)]
pub struct ConvertArgs {}

pub fn run(_args: ConvertArgs) -> anyhow::Result<()> {
    anyhow::bail!("steel-data convert is being built")
}

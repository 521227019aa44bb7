//! Shared pieces of Steel's command-line tools.

pub mod data_cli;

use std::process::ExitCode;

/// Runs a tool's body: on error prints one line naming the cause and exits with status 2
/// (user mistakes never end in a panic or a backtrace).
pub fn run(tool: &str, body: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tool}: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Parses a comma-separated list of token ids ("1,2,3").
pub fn parse_ids(s: &str) -> anyhow::Result<Vec<i64>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<i64>()
                .map_err(|_| anyhow::anyhow!("{x:?} in --ids is not an integer token id"))
        })
        .collect()
}

/// Human-readable byte counts (GiB with two decimals).
pub fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
}

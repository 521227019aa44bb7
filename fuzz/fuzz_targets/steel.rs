//! libFuzzer entry for every target of `steel_cli::fuzz`, chosen by `STEEL_FUZZ_TARGET`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static RUN: OnceLock<fn(&[u8]) -> bool> = OnceLock::new();

/// Crates whose panics the product catches (`catch_unwind` around the Parquet reader and the
/// tokenizer library) and turns into errors: those panics must unwind to that guard instead of
/// aborting here. Any other panic is a finding.
const GUARDED: [&str; 4] = ["/tokenizers-", "/parquet-", "/thrift-", "/snap-"];

fuzz_target!(
    init: {
        let name = std::env::var("STEEL_FUZZ_TARGET").unwrap_or_default();
        let Some(t) = steel_cli::fuzz::target(&name) else {
            let names: Vec<&str> = steel_cli::fuzz::TARGETS.iter().map(|t| t.name).collect();
            eprintln!("STEEL_FUZZ_TARGET={name:?} is not a target; one of {}", names.join(", "));
            std::process::exit(2);
        };
        let _ = RUN.set(t.run);
        // libFuzzer-sys's hook aborts on any panic; let the guarded crates' panics unwind.
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let guarded = info.location().is_some_and(|l| GUARDED.iter().any(|c| l.file().contains(c)));
            if !guarded {
                abort(info);
            }
        }));
    },
    |data: &[u8]| {
        if let Some(run) = RUN.get() {
            let _ = run(data);
        }
    }
);

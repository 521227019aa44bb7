//! Helpers shared by the binaries' integration tests.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Asserts that a tool exited 0, showing its exit code and both streams when it did not.
pub fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `sh -c SCRIPT` in `dir` as a newcomer's shell runs it: the environment cleared but for `HOME`,
/// rustup's and cargo's own variables and `TMPDIR`, and a `PATH` of the system and `~/.cargo/bin`
/// only, so no installed Steel tool and no exported library path helps; stdin is empty.
#[allow(dead_code)] // not every test binary runs shell commands
pub fn newcomer_shell(script: &str, dir: &Path) -> Command {
    let home = std::env::var("HOME").unwrap_or_default();
    let mut c = Command::new("sh");
    c.args(["-c", script]).current_dir(dir).env_clear().stdin(Stdio::null());
    c.env("PATH", format!("/usr/local/bin:/usr/bin:/bin:{home}/.cargo/bin")).env("HOME", &home);
    for keep in ["RUSTUP_HOME", "RUSTUP_TOOLCHAIN", "CARGO_HOME", "CARGO_TARGET_DIR", "TMPDIR"] {
        if let Ok(v) = std::env::var(keep) {
            c.env(keep, v);
        }
    }
    c
}

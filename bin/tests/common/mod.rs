//! Helpers shared by the binaries' integration tests.

use std::process::Output;

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

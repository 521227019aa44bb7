#!/usr/bin/env bash
# Steel's test command (the README's, and what CI runs through .ci/run).
# Installs what the tests need, then checks formatting and lints and runs every test of the
# workspace in release mode. Environment:
#   PROPTEST_CASES   cases per property test (default 32)
#   STEEL_SKIP_LINT  set to 1 to skip rustfmt/clippy (local iteration only)
set -euo pipefail
cd "$(dirname "$0")/.."

export PROPTEST_CASES="${PROPTEST_CASES:-32}"
export CARGO_TERM_PROGRESS_WHEN=never
export CARGO_TERM_COLOR=never

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install a Rust toolchain (rustup) first" >&2
  exit 1
fi
cargo --version
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done

if [ "${STEEL_SKIP_LINT:-0}" != 1 ]; then
  step "rustfmt"
  cargo fmt --all -- --check
  step "clippy (-D warnings)"
  cargo clippy --workspace --all-targets --release --locked -- -D warnings
fi

step "tests (release, PROPTEST_CASES=$PROPTEST_CASES)"
cargo test --workspace --release --locked

step "benchmark smoke run"
cargo run --release --locked --bin steel-bench -- cpu --quick --repeats 1

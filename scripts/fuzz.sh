#!/usr/bin/env bash
# Coverage-guided fuzzing of every loader of untrusted bytes (safetensors and its index, shards,
# the data iterator's state, checkpoint manifests, config.json, recipes, tokenizer files, the
# jsonl/Parquet converters, C-Eval/CMMLU CSVs) with libFuzzer through cargo-fuzz.
#
#   scripts/fuzz.sh list                 the targets
#   scripts/fuzz.sh run TARGET SECONDS   fuzz one target (e.g. scripts/fuzz.sh run shard 600)
#   scripts/fuzz.sh all SECONDS          fuzz every target for SECONDS each, one after another
#   scripts/fuzz.sh replay               the stable replay CI runs (no cargo-fuzz needed)
#
# The targets are `steel_cli::fuzz` (bin/src/fuzz.rs), the entry points the CLI calls; `fuzz/`
# is a separate workspace with one libFuzzer binary that STEEL_FUZZ_TARGET points at a target.
# Each run starts from seeds built from real files (`../shared/data`, tests/fixtures, configs/)
# written to fuzz/corpus/TARGET, and keeps what it finds there (git-ignored).
#
# Limits: every input runs under -rss_limit_mb (default 2048, FUZZ_RSS_MB) and -timeout
# (default 10 s, FUZZ_TIMEOUT), so allocation bombs and hangs are crashes. Panics are crashes,
# except inside the Parquet reader and the tokenizer library, whose panics the product catches
# and reports as errors (fuzz/fuzz_targets/steel.rs). A crash is written to
# fuzz/artifacts/TARGET/; once fixed, copy it to fuzz/regressions/TARGET/, which the replay test
# (bin/tests/fuzz_replay.rs, part of scripts/test.sh) runs on every CI run.
#
# Toolchain: only the stable toolchain exists here. cargo-fuzz passes nightly-only flags to
# rustc, so this script sets RUSTC_BOOTSTRAP=1 for its builds (never for the product's). It builds
# with `--sanitizer none` (the product is safe Rust but for memory maps; AddressSanitizer would
# halve the executions) and with debug assertions, so integer overflow in size arithmetic panics.
set -euo pipefail
cd "$(dirname "$0")/.."

RSS_MB="${FUZZ_RSS_MB:-2048}"
TIMEOUT="${FUZZ_TIMEOUT:-10}"
FUZZ_FLAGS=(--sanitizer none --debug-assertions)

targets() {
  grep -o "name: \"[a-z_]*\"" bin/src/fuzz.rs | sed "s/name: \"\(.*\)\"/\1/"
}

need_cargo_fuzz() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz (cargo install cargo-fuzz --locked)" >&2
    cargo install cargo-fuzz --locked
  fi
}

build() {
  need_cargo_fuzz
  # The fuzz workspace resolves the product's dependencies at the versions the product locks.
  [ -f fuzz/Cargo.lock ] || cp Cargo.lock fuzz/Cargo.lock
  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build "${FUZZ_FLAGS[@]}" steel)
}

seeds() {
  mkdir -p fuzz/corpus
  STEEL_FUZZ_SEEDS_OUT="$PWD/fuzz/corpus" cargo test -q -p steel-cli --test fuzz_replay \
    -- --ignored write_seed_corpus --nocapture
}

run_one() {
  local target=$1 secs=$2
  if ! targets | grep -qx "$target"; then
    echo "unknown target $target; one of: $(targets | tr '\n' ' ')" >&2
    exit 2
  fi
  mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
  echo "==> $target for $secs s (rss limit $RSS_MB MB, timeout $TIMEOUT s per input)"
  (cd fuzz && STEEL_FUZZ_TARGET="$target" RUSTC_BOOTSTRAP=1 cargo fuzz run "${FUZZ_FLAGS[@]}" \
    steel "corpus/$target" -- \
    -max_total_time="$secs" -rss_limit_mb="$RSS_MB" -timeout="$TIMEOUT" \
    -max_len=262144 -print_final_stats=1 -artifact_prefix="artifacts/$target/")
}

case "${1:-}" in
  list)
    targets
    ;;
  run)
    [ $# -eq 3 ] || { echo "usage: scripts/fuzz.sh run TARGET SECONDS" >&2; exit 2; }
    build
    seeds
    run_one "$2" "$3"
    ;;
  all)
    [ $# -eq 2 ] || { echo "usage: scripts/fuzz.sh all SECONDS" >&2; exit 2; }
    build
    seeds
    for t in $(targets); do
      run_one "$t" "$2"
    done
    ;;
  replay)
    cargo test -p steel-cli --test fuzz_replay
    ;;
  *)
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Steel's test command (the README's, and what CI runs through .ci/run).
# Installs what the tests need, then checks formatting and lints and runs every test of the
# workspace in release mode. Environment:
#   PROPTEST_CASES   cases per property test (default 32)
#   STEEL_SKIP_LINT  set to 1 to skip rustfmt/clippy (local iteration only)
#   CI               when "true", a missing NVRTC toolchain is a failure instead of a skip
#   STEEL_EMU_*      the emulator's schedule and checks (kernels-cu/src/lib.rs); defaults are
#                    round-robin with every detector on
#
# The GPU kernels are compiled with NVRTC for sm_90 on every run (no GPU needed): NVIDIA's pip
# wheels nvidia-cuda-nvrtc, nvidia-cuda-runtime and nvidia-cuda-cccl (13.0.*, the H200 driver's
# CUDA) are installed into target/nvrtc-venv and their lib folder is put on LD_LIBRARY_PATH
# (libnvrtc loads libnvrtc-builtins only through it); nvidia-cuda-cuobjdump and -nvdisasm
# (13.2+) disassemble the cubins for the SASS report.
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

step "NVRTC toolchain (pip, 13.0.*)"
NVRTC_VENV=target/nvrtc-venv
nvrtc=0
nvrtc_setup() {
  if [ ! -x "$NVRTC_VENV/bin/python" ]; then
    python3 -m venv "$NVRTC_VENV" || return 1
  fi
  # cuobjdump/nvdisasm 13.2+ read sm_90 cubins without a GPU (the SASS report).
  "$NVRTC_VENV/bin/python" -m pip install --disable-pip-version-check -q \
    'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*' \
    'nvidia-cuda-cuobjdump>=13.2,<14' 'nvidia-cuda-nvdisasm>=13.2,<14' || return 1
  local lib
  lib=$(ls -d "$PWD/$NVRTC_VENV"/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -n1)
  [ -n "$lib" ] && [ -e "$lib/libnvrtc.so.13" ] || return 1
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "NVRTC: $lib"
}
t0=$SECONDS
if nvrtc_setup; then
  nvrtc=1
  echo "NVRTC toolchain ready in $((SECONDS - t0)) s"
elif [ "${CI:-}" = true ]; then
  echo "could not install the NVRTC toolchain (python3 -m venv + pip); CI=true makes this a failure" >&2
  exit 1
else
  echo "warning: NVRTC toolchain unavailable (python3 -m venv + pip failed); kernel compilation is skipped" >&2
fi

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

step "the gpu-check table's checks on the emulator (steel-bench kernels --device emu)"
cargo run --release --locked --bin steel-bench -- kernels --device emu

if [ "$nvrtc" = 1 ]; then
  step "CUDA kernels: NVRTC compile for sm_90 and their SASS (fails on errors, warnings, spills, register overuse, missing kernels, tensor-core kernels without HMMA, local memory)"
  t0=$SECONDS
  report=target/kernels-sm_90.txt
  # The bench exits 2 on a compile error, a warning, a spill, or a kernel set that differs from
  # the sources' __global__ functions; the summary line is checked here as well.
  if ! cargo run --release --locked --bin steel-bench -- \
      kernels --compile-only --arch sm_90 --no-cache --require-sass 2>&1 | tee "$report"; then
    echo "kernel compilation failed (report: $report)" >&2
    exit 1
  fi
  summary=$(grep -E '^[0-9]+ kernels compiled for sm_90' "$report" || true)
  compiled=$(sed -E 's/^([0-9]+) kernels compiled.*/\1/' <<<"$summary")
  globals=$(sed -E 's/.*\(([0-9]+) __global__ functions.*/\1/' <<<"$summary")
  if [ -z "$summary" ] || [ "$compiled" != "$globals" ] || [ "$compiled" = 0 ] \
      || ! grep -q '; 0 warnings; 0 kernels with spills;' <<<"$summary"; then
    echo "kernel report check failed: ${summary:-no summary line}" >&2
    exit 1
  fi
  echo "kernels compiled for sm_90: $compiled of $globals, no warnings, no spills ($((SECONDS - t0)) s)"
fi

step "emulator detectors: the quick mutation subset (each must fail a test with the detector's message)"
# Reuses this run's target dir (its dependencies are built); each mutation rebuilds the emulator
# and the runtime's test binary. The full set: scripts/emu-mutation-check.sh (see --list).
t0=$SECONDS
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}" bash scripts/emu-mutation-check.sh --quick
echo "mutation subset: $((SECONDS - t0)) s"

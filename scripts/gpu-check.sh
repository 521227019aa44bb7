#!/usr/bin/env bash
# Steel's check on a lent GPU machine (DESIGN §4). Such a machine has no Rust toolchain and takes
# at most 64 MiB of carried files, so the check is built here and only run there:
#
#   scripts/gpu-check.sh build   # here: target/gpu-check/ = the stripped check binary
#                                # (steel-bench), the stripped runtime test binary (the kernels'
#                                # property tests) and the sm_90 cubins of every kernel
#   scripts/gpu-check.sh run     # there: finds the CUDA libraries, compares the emulator's test
#                                # kernels recorded here with the device (steel-bench emu-diff),
#                                # runs each kernel property test on the GPU in its own process
#                                # (STEEL_DEVICE=cuda, the `cuda_*` tests) and, where present,
#                                # under compute-sanitizer, then checks every GPU op against the
#                                # CPU reference and times each against the measured copy
#                                # bandwidth: one table, < 5 minutes
#
# With the device tool: carry ["target/gpu-check"], command "bash scripts/gpu-check.sh run".
#
# Libraries on the GPU machine: libcuda.so.1 comes with the driver; cuBLASLt, NCCL, NVTX (and
# NVRTC, unused when the cubins are carried) are the pip wheels of the machine's PyTorch
# virtualenv, `site-packages/nvidia/*/lib`, which `run` finds and puts on LD_LIBRARY_PATH.
# Environment: STEEL_GPU_CHECK_DIR (default target/gpu-check), STEEL_GPU_CHECK_ARCH (sm_90),
# STEEL_GPU_CHECK_REPEATS (timed repeats per op, default 20).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="${STEEL_GPU_CHECK_DIR:-target/gpu-check}"
ARCH="${STEEL_GPU_CHECK_ARCH:-sm_90}"
REPEATS="${STEEL_GPU_CHECK_REPEATS:-20}"

usage() {
  echo "usage: $0 build|run" >&2
  exit 2
}

build() {
  local t0=$SECONDS
  echo "==> building the check binary (release)"
  CARGO_TERM_PROGRESS_WHEN=never cargo build --release --locked --bin steel-bench
  rm -rf "$DIR"
  mkdir -p "$DIR"
  cp target/release/steel-bench "$DIR/steel-bench"
  strip "$DIR/steel-bench"
  echo "==> building the trainer (a short --device cuda demo run)"
  CARGO_TERM_PROGRESS_WHEN=never cargo build --release --locked --bin steel-train
  cp target/release/steel-train "$DIR/steel-train"
  strip "$DIR/steel-train"

  echo "==> building the runtime's test binary (the kernels' property tests)"
  local tests
  tests=$(CARGO_TERM_PROGRESS_WHEN=never cargo test --release --locked -p steel-runtime --test main \
    --no-run --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "main":
        print(m["executable"])
' | tail -n1)
  [ -n "$tests" ] || { echo "could not find the runtime test binary" >&2; exit 1; }
  cp "$tests" "$DIR/runtime-tests"
  strip "$DIR/runtime-tests"

  echo "==> compiling every kernel for $ARCH with NVRTC (the pip toolchain of scripts/test.sh)"
  local lib
  lib=$(ls -d "$PWD"/target/nvrtc-venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -n1 || true)
  if [ -z "$lib" ]; then
    python3 -m venv target/nvrtc-venv
    target/nvrtc-venv/bin/python -m pip install --disable-pip-version-check -q \
      'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*'
    lib=$(ls -d "$PWD"/target/nvrtc-venv/lib/python3*/site-packages/nvidia/cu13/lib | head -n1)
  fi
  LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    "$DIR/steel-bench" kernels --compile-only --arch "$ARCH" --no-cache --export "$DIR/cubins" \
    > "$DIR/compile-report.txt"
  grep -E "kernels compiled for" "$DIR/compile-report.txt"

  echo "==> recording the emulator's test kernels (compared with the device by 'run')"
  "$DIR/steel-bench" emu-diff --record "$DIR/emu-diff"
  # The GPU machine's C and C++ runtimes must be at least as new as what the binaries need.
  local b glibc glibcxx
  for b in "$DIR/steel-bench" "$DIR/runtime-tests"; do
    glibc=$(objdump -T "$b" | grep -oE 'GLIBC_[0-9]+(\.[0-9]+)*' | sort -Vu | tail -n1 || true)
    glibcxx=$(objdump -T "$b" | grep -oE 'GLIBCXX_[0-9]+(\.[0-9]+)*' | sort -Vu | tail -n1 || true)
    echo "$(basename "$b") needs ${glibc:-no GLIBC symbols} and ${glibcxx:-no GLIBCXX symbols}"
  done
  echo "==> $DIR ($(du -sh "$DIR" | cut -f1), limit 64 MiB) in $((SECONDS - t0)) s:"
  ls -l "$DIR" "$DIR/cubins"
  echo "carry [\"$DIR\"] and run: bash scripts/gpu-check.sh run"
}

# Prints the `nvidia/*/lib` folders of every Python environment found (PyTorch's first).
nvidia_lib_dirs() {
  local pys=()
  [ -n "${VIRTUAL_ENV:-}" ] && pys+=("$VIRTUAL_ENV/bin/python3")
  pys+=(python3 /opt/torch/.venv/bin/python3 /usr/bin/python3)
  local py
  for py in "${pys[@]}"; do
    command -v "$py" >/dev/null 2>&1 || [ -x "$py" ] || continue
    "$py" - <<'EOF' 2>/dev/null || true
import glob, os, site, sys
roots = list(site.getsitepackages()) + [site.getusersitepackages()]
try:
    import torch
    roots.insert(0, os.path.dirname(os.path.dirname(torch.__file__)))
except Exception:
    pass
seen = set()
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        if d not in seen:
            seen.add(d)
            print(d)
EOF
  done | awk '!seen[$0]++'
}

run() {
  local t0=$SECONDS
  [ -x "$DIR/steel-bench" ] || {
    echo "$DIR/steel-bench is missing: run 'scripts/gpu-check.sh build' here and carry $DIR" >&2
    exit 2
  }
  local dirs
  dirs=$(nvidia_lib_dirs | paste -sd: -)
  # The driver's own folder, where the image mounts it.
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [ -d "$d" ] && dirs="${dirs:+$dirs:}$d"
  done
  # cudarc asks for libnccl.so (or .so.<CUDA major>); the wheel ships libnccl.so.2 only.
  local shim d
  shim=$(mktemp -d)
  trap 'rm -rf "$shim"' EXIT
  for d in ${dirs//:/ }; do
    [ -e "$d/libnccl.so.2" ] && ln -sf "$d/libnccl.so.2" "$shim/libnccl.so"
  done
  dirs="$shim${dirs:+:$dirs}"
  export LD_LIBRARY_PATH="${dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  command -v nvidia-smi >/dev/null 2>&1 &&
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  case "$DIR" in
    /*) export STEEL_CUBINS="$DIR/cubins" ;;
    *) export STEEL_CUBINS="$PWD/$DIR/cubins" ;;
  esac
  local status=0
  echo "==> the emulator against this device: its test kernels, bit for bit where they must be"
  if [ -d "$DIR/emu-diff" ]; then
    "$DIR/steel-bench" emu-diff --against "$DIR/emu-diff" --device cuda || status=1
  else
    echo "$DIR/emu-diff is missing (rebuild with 'scripts/gpu-check.sh build')" >&2
    status=1
  fi
  echo "==> the kernels' property tests on the GPU, each in its own process (STEEL_DEVICE=cuda, PROPTEST_CASES=${PROPTEST_CASES:-32})"
  local tests=() t passed=0 failed=0
  if [ -x "$DIR/runtime-tests" ]; then
    mapfile -t tests < <("$DIR/runtime-tests" --list 2>/dev/null | sed -n 's/^\(.*cuda_[a-z0-9_]*\): test$/\1/p')
  else
    echo "$DIR/runtime-tests is missing (rebuild with 'scripts/gpu-check.sh build')" >&2
    status=1
  fi
  for t in "${tests[@]}"; do
    # One process per test: a sticky CUDA fault in one must not fail every later one.
    if STEEL_DEVICE=cuda PROPTEST_CASES="${PROPTEST_CASES:-32}" timeout 120 \
        "$DIR/runtime-tests" --exact "$t" --test-threads=1 > "$DIR/test.log" 2>&1; then
      passed=$((passed + 1)); printf '  %-60s ok\n' "$t"
    else
      failed=$((failed + 1)); status=1; printf '  %-60s FAILED\n' "$t"
      tail -n 20 "$DIR/test.log" | sed 's/^/      /'
    fi
  done
  echo "  ${#tests[@]} cuda_* tests: $passed passed, $failed failed"
  # compute-sanitizer, where the machine has it: memcheck, racecheck and synccheck over the
  # kernel property tests, few cases each (the tools are slow).
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  if [ -n "$sanitizer" ] && [ "${#tests[@]}" -gt 0 ]; then
    local tool
    for tool in memcheck racecheck synccheck; do
      echo "==> compute-sanitizer --tool $tool (PROPTEST_CASES=2)"
      for t in "${tests[@]}"; do
        case "$t" in gpu::*) ;; *) continue ;; esac
        # The whole check stays under 5 minutes: the sanitizers get what is left of 150 s.
        if [ $((SECONDS - t0)) -gt 150 ]; then
          printf '  %-60s %s: skipped (time budget)\n' "$t" "$tool"; continue
        fi
        if ! STEEL_DEVICE=cuda PROPTEST_CASES=2 timeout 40 "$sanitizer" --tool "$tool" \
            --error-exitcode 3 "$DIR/runtime-tests" --exact "$t" --test-threads=1 > "$DIR/test.log" 2>&1; then
          status=1; printf '  %-60s %s: FAILED\n' "$t" "$tool"
          grep -E "=========" "$DIR/test.log" | head -n 10 | sed 's/^/      /'
        else
          printf '  %-60s %s: clean\n' "$t" "$tool"
        fi
      done
    done
  else
    echo "==> compute-sanitizer: not on this machine (skipped)"
  fi
  echo "==> GPU ops against the CPU backend, and timings against the copy roofline"
  # PyTorch's SDPA (FlashAttention backend) at the attention rows' shape, where PyTorch exists.
  local peer=() py
  for py in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python3}" /opt/torch/.venv/bin/python3 python3; do
    [ -n "$py" ] && "$py" -c "import torch" >/dev/null 2>&1 || continue
    if timeout 120 "$py" bench/attention_torch.py > "$DIR/attention-torch.json" 2> "$DIR/attention-torch.log"; then
      peer=(--peer "$DIR/attention-torch.json")
      echo "PyTorch peer: $(cat "$DIR/attention-torch.json")"
    else
      echo "bench/attention_torch.py failed (the attention rows have no peer):"
      tail -n 5 "$DIR/attention-torch.log" "$DIR/attention-torch.json" | sed 's/^/    /'
    fi
    break
  done
  [ "${#peer[@]}" -gt 0 ] || echo "(no PyTorch here: the attention rows have no peer)"
  "$DIR/steel-bench" kernels --device cuda --repeats "$REPEATS" "${peer[@]}" || status=1
  echo "==> training on the GPU: the 1.12B step (bf16-mixed, 8 × 2048) and the demo recipe"
  timeout 150 "$DIR/steel-bench" train --device cuda --model-config configs/steel-1.1b/config.json \
    --seq 2048 --batch 8 --steps 3 --warmup 1 || { echo "steel-bench train failed"; status=1; }
  if [ -x "$DIR/steel-train" ]; then
    rm -rf "$DIR/demo-run"
    if timeout 90 "$DIR/steel-train" --device cuda --max-steps 20 --log-every 5 \
        --set 'train.precision="bf16-mixed"' --out "$DIR/demo-run" > "$DIR/demo.log" 2>&1; then
      grep -E "^(device|precision|memory|step )" "$DIR/demo.log" | sed 's/^/  /'
      tail -n 1 "$DIR/demo-run/metrics.jsonl" | sed 's/^/  last row: /'
    else
      status=1; echo "steel-train --device cuda failed:"; tail -n 20 "$DIR/demo.log" | sed 's/^/    /'
    fi
  fi
  echo "gpu-check finished in $((SECONDS - t0)) s (status $status)"
  exit "$status"
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) usage ;;
esac

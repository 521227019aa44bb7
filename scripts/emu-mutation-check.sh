#!/usr/bin/env bash
# Proof that the emulated property tests run the kernels (issue #3): each test-only breakage of
# a kernel (STEEL_EMU_MUTATE=<name> defines STEEL_MUTATE_<NAME> in every .cu, see the #ifdefs in
# kernels-cu/*.cu) must make that kernel's `emu_` property test FAIL. A mutation that survives
# means the test does not exercise the kernel.
#
# Usage: scripts/emu-mutation-check.sh [mutation ...]   (default: all)
# Builds in its own target directory (CARGO_TARGET_DIR, default target/emu-mutation) so the
# mutated emulator never replaces the normal build; the first run builds the dependencies once.
# Not part of CI by default: it rebuilds the runtime once per mutation.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/emu-mutation}"
export PROPTEST_CASES="${PROPTEST_CASES:-16}"

# mutation -> the test that must catch it
declare -A TEST=(
    [add_rms_norm_fwd]=emu_add_rms_norm_fwd_bwd_matches_cpu
    [add_rms_norm_bwd]=emu_add_rms_norm_fwd_bwd_matches_cpu
    [adamw]=emu_adamw_step_matches_cpu
    [lm_head_ce_fwd]=emu_lm_head_ce_fwd_bwd_matches_cpu
    [lm_head_ce_bwd]=emu_lm_head_ce_fwd_bwd_matches_cpu
    [mma_tile_gemm]=emu_mma_tile_gemm_matches_cpu
)
if [ "$#" -gt 0 ]; then names=("$@"); else names=(add_rms_norm_fwd add_rms_norm_bwd adamw lm_head_ce_fwd lm_head_ce_bwd mma_tile_gemm); fi

survived=0
printf '%-18s %-40s %s\n' mutation test result
for m in "${names[@]}"; do
    t="${TEST[$m]:-}"
    if [ -z "$t" ]; then echo "unknown mutation $m (known: ${!TEST[*]})" >&2; exit 2; fi
    # Build first, so a compile error is never mistaken for a caught mutation.
    if ! STEEL_EMU_MUTATE="$m" cargo test --release -p steel-runtime --no-run -q 2>/tmp/emu-mutation-build.log; then
        echo "build with STEEL_EMU_MUTATE=$m failed:" >&2; cat /tmp/emu-mutation-build.log >&2; exit 2
    fi
    out=$(STEEL_EMU_MUTATE="$m" cargo test --release -p steel-runtime -q "$t" -- --exact "gpu_kernels::$t" 2>&1 || true)
    if grep -q "gpu_kernels::$t ... FAILED\|test result: FAILED" <<<"$out"; then
        printf '%-18s %-40s %s\n' "$m" "$t" "caught (test failed)"
    else
        printf '%-18s %-40s %s\n' "$m" "$t" "SURVIVED (test passed)"
        survived=1
    fi
done
# Leave the directory's emulator unmutated.
cargo build --release -p steel-kernels -q
exit $survived

#!/usr/bin/env bash
# Proof that the emulated tests run the kernels and that the emulator's detectors see what a GPU
# would expose: every mutation below must make an emulated test (`cargo test emu`) FAIL, and
# the detector mutations must fail with their detector's message — a numeric mismatch that
# happens to fail does not count.
#
# Mutations (run `--list` for all of them):
#   kernel:<name>     a test-only breakage of one kernel (STEEL_EMU_MUTATE=<name>, #ifdef
#                     STEEL_MUTATE_<NAME> in kernels-cu): off-by-ones that must fail the numbers
#                     (the six of #3), and uninitialised-shared-read and one-past-the-end
#                     mutations per kernel family that must fail with the detector's message
#   barrier:<file>:<k> the k-th __syncthreads()/__syncwarp() of kernels-cu/<file> or include/<file>
#                     removed (STEEL_EMU_DROP_BARRIER): must fail with a race / uninitialised /
#                     cp.async report
#
# Usage: scripts/emu-mutation-check.sh [--list | --quick | mutation ...]   (default: all)
#   --quick   the fast subset CI runs: the mma tile-loop barrier, block_sum's leading barrier
#             (only a second call exercises it) and the mma tile's uninitialised read
# Builds in CARGO_TARGET_DIR (default target/emu-mutation, so the mutated emulator never replaces
# the normal build; CI passes its own target dir to reuse the dependencies). Each mutation
# rebuilds the emulator and the runtime's test binary (~30 s on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/emu-mutation}"
export PROPTEST_CASES="${PROPTEST_CASES:-16}"

DETECTOR='data race|uninitialised shared memory|has not yet written|out-of-bounds'
MEMORY='data race|uninitialised shared memory|has not yet written'

# kernel mutation -> what its failure must show: "numbers" (the named test fails) or a regex
declare -A KERNEL=(
    [add_rms_norm_fwd]=numbers [add_rms_norm_bwd]=numbers [adamw]=numbers
    [lm_head_ce_fwd]=numbers [lm_head_ce_bwd]=numbers [mma_tile_gemm]=numbers
    [softmax_fwd]=numbers [softmax_bwd]=numbers [softmax_strided_fwd]=numbers
    [softmax_strided_bwd]=numbers [l2_normalize_fwd]=numbers [l2_normalize_bwd]=numbers
    [l2_normalize_strided_fwd]=numbers [l2_normalize_strided_bwd]=numbers
    [block_sum_uninit]='uninitialised shared memory'
    [softmax_stats_uninit]='uninitialised shared memory'
    [mma_tile_gemm_uninit]='uninitialised shared memory'
    [mma_tile_gemm_shared_oob]='out-of-bounds shared memory access'
    [rms_norm_oob]='out-of-bounds global memory access|data race'
    [lm_head_ce_oob]='out-of-bounds global memory access'
    [adamw_oob]='out-of-bounds global memory access'
    [mma_tile_gemm_oob]='out-of-bounds global memory access'
    [add_fwd]=numbers [add_assign]=numbers [scale_fwd]=numbers [scale_by_bwd]=numbers
    [swiglu_fwd]=numbers [swiglu_bwd]=numbers [cast]=numbers [transpose01]=numbers
    [sum_rows]=numbers [broadcast_rows]=numbers [global_norm]=numbers [ce_count]=numbers
    [elementwise_oob]='out-of-bounds global memory access'
    [embedding_fwd]=numbers [embedding_bwd]=numbers [embedding_sort]=numbers
    [embedding_oob]='out-of-bounds global memory access'
    [rope_fwd]=numbers [rope_bwd]=numbers
    [rope_oob]='out-of-bounds global memory access|data race'
    [softmax_strided_uninit]='uninitialised shared memory|out-of-bounds shared memory access'
    [l2_normalize_strided_uninit]='uninitialised shared memory|out-of-bounds shared memory access'
    [attention_causal]=numbers [attention_skip_tile]=numbers [attention_delta]=numbers
    [attention_no_wait]='has not yet written'
    [attention_pad_uninit]='uninitialised shared memory'
    [soft_moe_logits]=numbers [soft_moe_dispatch]=numbers [soft_moe_tok2slot]=numbers
    [soft_moe_mix]=numbers [soft_moe_route_bwd]=numbers [soft_moe_phi_bwd]=numbers
    [soft_moe_tok2slot_oob]='out-of-bounds shared memory access'
    [experts_fwd]=numbers [experts_gate_grad]=numbers [experts_wgrad]=numbers
    [experts_oob]='out-of-bounds global memory access'
    [adamw_guard]=numbers [adamw_verdict]=numbers
)
KERNEL_ORDER=(add_rms_norm_fwd add_rms_norm_bwd adamw lm_head_ce_fwd lm_head_ce_bwd mma_tile_gemm
    block_sum_uninit rms_norm_oob softmax_stats_uninit lm_head_ce_oob adamw_oob
    mma_tile_gemm_uninit mma_tile_gemm_shared_oob mma_tile_gemm_oob
    add_fwd add_assign scale_fwd scale_by_bwd swiglu_fwd swiglu_bwd cast transpose01 sum_rows
    broadcast_rows global_norm ce_count elementwise_oob
    embedding_fwd embedding_bwd embedding_sort embedding_oob rope_fwd rope_bwd rope_oob
    softmax_fwd softmax_bwd softmax_strided_fwd softmax_strided_bwd softmax_strided_uninit
    l2_normalize_fwd l2_normalize_bwd l2_normalize_strided_fwd l2_normalize_strided_bwd
    l2_normalize_strided_uninit
    attention_causal attention_skip_tile attention_delta attention_no_wait attention_pad_uninit
    soft_moe_logits soft_moe_dispatch soft_moe_tok2slot soft_moe_mix soft_moe_route_bwd
    soft_moe_phi_bwd soft_moe_tok2slot_oob experts_fwd experts_gate_grad experts_wgrad experts_oob
    adamw_guard adamw_verdict)

# Every barrier call, numbered per file as build.rs numbers them (code outside `//` comments,
# not part of a longer identifier).
barrier_sites() {
    for f in kernels-cu/*.cu kernels-cu/include/*.cuh; do
        awk -v F="$(basename "$f")" '{
            code = $0; sub(/\/\/.*/, "", code)
            while (match(code, /(^|[^A-Za-z0-9_])(__syncthreads|__syncwarp)\(/)) {
                k++; print "barrier:" F ":" k "\t" F ":" NR
                code = substr(code, RSTART + RLENGTH)
            }
        }' "$f"
    done
}

all_mutations() {
    for k in "${KERNEL_ORDER[@]}"; do echo "kernel:$k"; done
    barrier_sites | cut -f1
}

case "${1:-}" in
    --list)
        for k in "${KERNEL_ORDER[@]}"; do printf 'kernel:%-40s %s\n' "$k" "${KERNEL[$k]}"; done
        barrier_sites | awk -F'\t' '{ printf "%-47s line %s\n", $1, $2 }'
        exit 0 ;;
    --quick) names=(barrier:mma_gemm.cu:2 barrier:steel_common.cuh:1 kernel:mma_tile_gemm_uninit) ;;
    "") mapfile -t names < <(all_mutations) ;;
    *) names=("$@") ;;
esac

# The test of each numeric mutation.
declare -A NUMERIC_TEST=(
    [add_rms_norm_fwd]=emu_add_rms_norm_fwd_bwd_matches_cpu [add_rms_norm_bwd]=emu_add_rms_norm_fwd_bwd_matches_cpu
    [adamw]=emu_adamw_step_matches_cpu [lm_head_ce_fwd]=emu_lm_head_ce_fwd_bwd_matches_cpu
    [lm_head_ce_bwd]=emu_lm_head_ce_fwd_bwd_matches_cpu [mma_tile_gemm]=emu_mma_tile_gemm_matches_cpu
    [add_fwd]=emu_elementwise_matches_cpu [add_assign]=emu_elementwise_matches_cpu
    [scale_fwd]=emu_elementwise_matches_cpu [scale_by_bwd]=emu_elementwise_matches_cpu
    [swiglu_fwd]=emu_elementwise_matches_cpu [swiglu_bwd]=emu_elementwise_matches_cpu
    [cast]=emu_elementwise_matches_cpu [transpose01]=emu_layout_matches_cpu
    [sum_rows]=emu_sum_rows_into_matches_cpu [broadcast_rows]=emu_matmul_with_an_empty_product
    [global_norm]=emu_global_norm_matches_cpu
    [ce_count]=emu_lm_head_ce_bf16_at_the_vocabulary_and_bad_targets
    [embedding_fwd]=emu_embedding_fwd_bwd_matches_cpu [embedding_bwd]=emu_embedding_fwd_bwd_matches_cpu
    [embedding_sort]=emu_embedding_fwd_bwd_matches_cpu
    [rope_fwd]=emu_rope_fwd_bwd_matches_cpu [rope_bwd]=emu_rope_fwd_bwd_matches_cpu
    [softmax_fwd]=emu_softmax_matches_cpu [softmax_bwd]=emu_softmax_matches_cpu
    [softmax_strided_fwd]=emu_softmax_matches_cpu [softmax_strided_bwd]=emu_softmax_matches_cpu
    [l2_normalize_fwd]=emu_l2_normalize_matches_cpu [l2_normalize_bwd]=emu_l2_normalize_matches_cpu
    [l2_normalize_strided_fwd]=emu_l2_normalize_matches_cpu
    [l2_normalize_strided_bwd]=emu_l2_normalize_matches_cpu
    [attention_causal]=emu_attention_fixed_cases [attention_skip_tile]=emu_attention_fixed_cases
    [attention_delta]=emu_attention_fixed_cases
    [soft_moe_logits]=emu_soft_moe_fixed_cases [soft_moe_dispatch]=emu_soft_moe_fixed_cases
    [soft_moe_tok2slot]=emu_soft_moe_fixed_cases [soft_moe_mix]=emu_soft_moe_fixed_cases
    [soft_moe_route_bwd]=emu_soft_moe_fixed_cases [soft_moe_phi_bwd]=emu_soft_moe_fixed_cases
    [experts_fwd]=emu_experts_fixed_cases [experts_gate_grad]=emu_experts_fixed_cases
    [experts_wgrad]=emu_experts_fixed_cases
    [adamw_guard]=emu_adamw_step_guarded_clips_skips_and_applies
    [adamw_verdict]=emu_adamw_step_guarded_clips_skips_and_applies
)

log=$(mktemp)
trap 'rm -f "$log"' EXIT
failed=0
printf '%-40s %s\n' mutation result
for m in "${names[@]}"; do
    env_var=() expect=""
    case "$m" in
        kernel:*)
            k=${m#kernel:}
            [ -n "${KERNEL[$k]:-}" ] || { echo "unknown mutation $m (see --list)" >&2; exit 2; }
            env_var=(STEEL_EMU_MUTATE="$k"); expect=${KERNEL[$k]} ;;
        barrier:*)
            env_var=(STEEL_EMU_DROP_BARRIER="${m#barrier:}"); expect=$MEMORY ;;
        *) echo "unknown mutation $m (see --list)" >&2; exit 2 ;;
    esac
    t0=$SECONDS
    # Build first, so a compile error is never mistaken for a caught mutation.
    if ! env "${env_var[@]}" cargo test --release -p steel-runtime --test main --no-run -q >"$log" 2>&1; then
        echo "build with ${env_var[*]} failed:" >&2; cat "$log" >&2; exit 2
    fi
    # A numeric mutation runs only the test that must catch it; the others run every emulated test.
    filter=emu
    [ "$expect" = numbers ] && filter=${NUMERIC_TEST[${m#kernel:}]}
    env "${env_var[@]}" cargo test --release -p steel-runtime --test main -q -- "$filter" >"$log" 2>&1 || true
    secs=$((SECONDS - t0))
    # (no failing test is an empty list, not an error under pipefail)
    failing=$({ grep -oE '^    [a-z0-9_:]+emu_[a-z0-9_]+$' "$log" || true; } | sed 's/^ *//' | sort -u | tr '\n' ' ')
    if ! grep -q 'test result: FAILED' "$log"; then
        printf '%-40s SURVIVED: every emulated test passed (%d s)\n' "$m" "$secs"; failed=1
    elif [ "$expect" = numbers ]; then
        t=${NUMERIC_TEST[${m#kernel:}]}
        if grep -qE "^    gpu::[a-z0-9_]+::$t\$" "$log"; then
            printf '%-40s caught: %s fails (%d s)\n' "$m" "$t" "$secs"
        else
            printf '%-40s NOT CAUGHT by %s (failing: %s)\n' "$m" "$t" "$failing"; failed=1
        fi
    elif msg=$(grep -oE "$expect" "$log" | head -n1) && [ -n "$msg" ]; then
        printf '%-40s caught: "%s" (%d s; failing: %s)\n' "$m" "$msg" "$secs" "$failing"
    elif [ "$m" = "barrier:test_emu.cu:3" ] && grep -q 'emu_barrier_divergence_reports_kernel' <<<"$failing"; then
        # The divergent-barrier kernel is wrong on purpose: without its barrier it is correct,
        # and the test that expects the deadlock report fails.
        printf '%-40s caught: the deadlock test no longer sees its deadlock (%d s)\n' "$m" "$secs"
    else
        printf '%-40s NUMBERS ONLY: tests failed without a detector message (failing: %s)\n' "$m" "$failing"
        grep -E 'panicked|Error' "$log" | head -n3 | cut -c1-300
        failed=1
    fi
done
exit $failed

#!/usr/bin/env bash
# One GPU check in at most 8 minutes (GPU_CHECK_LIMIT_S, default 470 s):
#   1. the CUDA tests (python -m pytest -m cuda -q tests/test_cuda.py),
#   2. measured peak memory and img/s of SlotCon, DeCon-SL and DeCon-ML (ResNet-50 U-Net, 224 px, bf16), with and
#      without train.checkpointing, at batch 64 and at the largest batch the projection fits on this GPU, beside
#      the committed projections (benchmarks/results/cost_r50_224_*.json, so nothing is counted again),
#   3. benchmarks/results/gpu_<device-name>.json and one printed table.
# Every step runs under `timeout` within one global deadline; a row that runs out of memory is recorded as "oom" and
# the next one runs. Usage: bash benchmarks/gpu_check.sh [--dry-run]   (--dry-run prints the plan, runs nothing)
set -u
cd "$(dirname "$0")/.." || exit 2

DRY=0
case "${1:-}" in
--dry-run) DRY=1 ;;
"") ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2
    exit 2
    ;;
esac

PY=${PYTHON:-python}
LIMIT_S=${GPU_CHECK_LIMIT_S:-470}
TESTS_S=270    # the CUDA tests (torch.compile of two methods is most of it)
SUMMARY_S=20   # kept back for the summary
START=$(date +%s)
DEADLINE=$((START + LIMIT_S))
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}

left() { echo $((DEADLINE - $(date +%s))); }

# step NAME BUDGET_S LOG COMMAND...: run COMMAND under `timeout`, at most BUDGET_S and never past the deadline,
# its output shown and copied to LOG; returns COMMAND's status (124: timed out or skipped).
step() {
    local name=$1 budget=$2 log=$3
    shift 3
    local remaining
    remaining=$(left)
    if [ "$budget" -gt "$remaining" ]; then budget=$remaining; fi
    if [ "$DRY" = 1 ]; then
        echo "step $name (timeout ${budget}s): $*"
        return 0
    fi
    if [ "$budget" -lt 5 ]; then
        echo "step $name skipped: the deadline is reached" >&2
        return 124
    fi
    echo "== $name (at most ${budget}s)" >&2
    timeout --kill-after=10 "$budget" "$@" 2>&1 | tee "$log"
    return "${PIPESTATUS[0]}"
}

if [ "$DRY" = 1 ]; then
    SLUG="<device>"
    DEVICE="<device name>"
    WORK="<tmp>"
else
    DEVICE=$(timeout 60 "$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>/dev/null)
    if [ -z "$DEVICE" ]; then
        echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing was run" >&2
        exit 2
    fi
    SLUG=$(printf '%s' "$DEVICE" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\{1,\}/_/g' -e 's/^_//' -e 's/_$//')
    WORK=$(mktemp -d)
fi
OUT=benchmarks/results/gpu_${SLUG}.json
PROJECTIONS="benchmarks/results/cost_r50_224_decon_ml.json benchmarks/results/cost_r50_224_others.json"

# 1. CUDA tests
step tests "$TESTS_S" "$WORK/pytest.log" env DECON_MED_CUDA_REPORT="$WORK/cuda_tests.json" \
    "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py
TESTS_RC=$?

# 2. measured cost rows, stopping (cleanly, between rows) 10 s before the summary's share of the time
COST_S=$(($(left) - SUMMARY_S))
[ "$DRY" = 1 ] && COST_S=$((LIMIT_S - TESTS_S - SUMMARY_S))
ROW_DEADLINE=$((DEADLINE - SUMMARY_S - 10))
# shellcheck disable=SC2086
step cost "$COST_S" "$WORK/cost.log" "$PY" benchmarks/cost_report.py --cuda --methods slotcon decon_sl decon_ml \
    --encoder resnet50 --size 224 --checkpointing none all --projection $PROJECTIONS \
    --measure-batches 64 fit --warmup 2 --steps 5 --deadline "$ROW_DEADLINE" --json "$WORK/cost.json"
COST_RC=$?

# 3. one JSON file and one table
step summary "$SUMMARY_S" "$WORK/summary.log" "$PY" benchmarks/gpu_check.py --device "$DEVICE" --out "$OUT" \
    --pytest-rc "$TESTS_RC" --pytest-log "$WORK/pytest.log" --cuda-report "$WORK/cuda_tests.json" \
    --cost "$WORK/cost.json" --cost-rc "$COST_RC" --elapsed-s "$(($(date +%s) - START))"
RC=$?
if [ "$DRY" = 1 ]; then
    echo "would write $OUT (device name as a slug) and print one table, within ${LIMIT_S}s"
fi
exit $RC

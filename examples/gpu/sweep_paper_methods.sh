#!/usr/bin/env bash
# Run the paper's token-selection methods one after another for one teacher-student pair:
#   all-token OPD | entropy top 50% / 20% | entropy sampling 50% | Soft-OR (TIP) top 50% / 20%
#   | Q3 (overconfident) 20% | Soft-OR bottom 50% (control, Table 6)
#
# Usage:
#   PAIR=qwen3_8b_4b DATA_DIR=data/math bash examples/gpu/sweep_paper_methods.sh [hydra overrides...]
#
# Every environment variable of run_opd_tip.sh applies (STUDENT_PATH, TEACHER_PATH, NNODES, ...);
# EXPERIMENT and OUTPUT_DIR are set per method (${PAIR}_${METHOD} under outputs/$PROJECT/).
#   METHODS   space-separated subset to run (default: all eight, in the order above)
#   KEEP_GOING=1  continue with the next method when one fails (default: stop)
# Extra arguments are passed to every run as Hydra overrides. DRY_RUN=1 prints the commands.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PAIR="${PAIR:-qwen3_8b_4b}"
PROJECT="${PROJECT:-tip_opd}"
METHODS="${METHODS:-all entropy50 entropy20 entropy_sample50 soft_or50 soft_or20 q3_20 soft_or_bottom50}"
export PAIR PROJECT

# Check every method's settings (names, paths, data) before the first long run starts.
for method in $METHODS; do
    METHOD="$method" DRY_RUN=1 bash "$here/run_opd_tip.sh" "$@" >/dev/null \
        || { echo "sweep_paper_methods.sh: METHOD=$method: settings rejected (see above); nothing was run" >&2; exit 2; }
done

failed=()
for method in $METHODS; do
    echo "=== sweep_paper_methods.sh: PAIR=$PAIR METHOD=$method ===" >&2
    if METHOD="$method" EXPERIMENT="${PAIR}_${method}" OUTPUT_DIR="${OUTPUT_ROOT:-outputs/$PROJECT}/${PAIR}_${method}" \
        bash "$here/run_opd_tip.sh" "$@"; then
        :
    else
        status=$?
        failed+=("$method")
        echo "sweep_paper_methods.sh: METHOD=$method failed (exit $status)" >&2
        [[ "${KEEP_GOING:-0}" != "0" ]] || exit "$status"
    fi
done
if (( ${#failed[@]} > 0 )); then
    echo "sweep_paper_methods.sh: failed methods: ${failed[*]}" >&2
    exit 1
fi

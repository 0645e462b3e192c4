#!/usr/bin/env bash
# OPD with TIP in verl's asynchronous colocated trainer (trainer.v1.trainer_mode=tip_colocate_async): rollout and
# training share the GPUs as in run_opd_tip.sh, but generation runs ahead of training (NUM_WARMUP_BATCHES batches
# in flight, default 1) and requests cut by a weight update continue on the new weights (partial rollouts), so
# the step waits less for the longest responses. A batch may then come from older weights: TIP selects on the
# old log-probs and entropy verl recomputes with the policy being updated (the proximal anchor of its PPO ratio),
# verl's loss sees only the kept tokens, and tip/staleness_* reports the lag (verl's
# training/off_policy/trajectory_staleness). MAX_OFF_POLICY (default 8, verl's) bounds it.
#
# Usage (every variable of run_opd_tip.sh applies):
#   PAIR=qwen3_8b_4b METHOD=soft_or50 DATA_DIR=data/math bash examples/gpu/run_opd_tip_colocate_async.sh [overrides...]
exec env TRAINER_MODE=tip_colocate_async bash "$(dirname "${BASH_SOURCE[0]}")/run_opd_tip.sh" "$@"

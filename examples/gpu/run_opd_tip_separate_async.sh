#!/usr/bin/env bash
# OPD with TIP in verl's asynchronous separated trainer (trainer.v1.trainer_mode=tip_separate_async): generation
# runs on its own GPUs (ROLLOUT_NNODES x ROLLOUT_GPUS_PER_NODE, default 1 x 4) while the student and the teacher
# (verl's ref model) train on theirs (NNODES x N_GPUS_PER_NODE, default 1 x 4: one 8-GPU node in all). Weights go
# to the rollout GPUs over a checkpoint engine (CHECKPOINT_ENGINE, default nccl) once per global step; a step is
# PARAMETER_SYNC_STEP updates (default 4, verl's) of one mini-batch each (PPO_MINI_BATCH_SIZE defaults to
# TRAIN_BATCH_SIZE / PARAMETER_SYNC_STEP), all with the old log-probs of the step's first weights (verl keeps
# them on the CPU). TIP selects per update on those recomputed log-probs and entropy; tip/staleness_* reports
# how far behind the batch's rollouts are.
#
# Usage (every variable of run_opd_tip.sh applies):
#   PAIR=qwen3_8b_4b METHOD=soft_or50 DATA_DIR=data/math bash examples/gpu/run_opd_tip_separate_async.sh [overrides...]
exec env TRAINER_MODE=tip_separate_async bash "$(dirname "${BASH_SOURCE[0]}")/run_opd_tip.sh" "$@"

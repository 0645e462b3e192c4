#!/usr/bin/env bash
# GRPO with verl's own trainer (python -m verl.trainer.main_ppo, V1 trainer) on the host CPU, on
# tip_verl's tiny assets (a tiny Qwen2 student on multi-digit addition). A few steps, a few minutes
# on 2 cores, no GPU, no network.
#
#   examples/cpu/run_tiny_grpo.sh                                   # 3 steps
#   examples/cpu/run_tiny_grpo.sh trainer.total_training_steps=2    # any Hydra override, appended last
#
# Environment: PYTHON (interpreter, default: the repo's .venv if present), ASSETS_DIR (where the tiny
# assets are built/cached; default: tip_verl.assets' own cache), RUN_DIR (logs + Hydra outputs).
#
# The CPU platform, the hf rollout and every CPU-specific flag come from ONE place:
# tip_verl/verl_adapter/cpu_overrides.py (env: --env, Hydra overrides: default output).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
RUN_DIR="${RUN_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/tip_verl_tiny_grpo.XXXXXX")}"
mkdir -p "$RUN_DIR"
LOG="$RUN_DIR/main_ppo.log"
START=$(date +%s)

# 1. CPU environment (VERL_PLATFORM=cpu selects tip_verl's CPU platform; offline; no wandb)
CPU_ENV="$("$PYTHON" -m tip_verl.verl_adapter.cpu_overrides --env)"   # (assignments keep set -e effective)
eval "$CPU_ENV"
CPU_OVERRIDES_TEXT="$("$PYTHON" -m tip_verl.verl_adapter.cpu_overrides)"
mapfile -t CPU_OVERRIDES <<<"$CPU_OVERRIDES_TEXT"

# 2. Tiny assets (`python -m tip_verl.assets` builds them on first use, then reuses the cache) and the
#    CPU start-up checks (a bad set-up stops here with a clear message).
ASSETS_JSON="$("$PYTHON" -m tip_verl.assets --json ${ASSETS_DIR:+--out "$ASSETS_DIR"})"
ASSET_VARS="$(ASSETS_JSON="$ASSETS_JSON" "$PYTHON" - <<'PY'
import json, os, shlex
from tip_verl.verl_adapter.cpu.checks import run_startup_checks

paths = json.loads(os.environ["ASSETS_JSON"])["paths"]
run_startup_checks({"student model": paths["student"]})
for key in ("root", "student", "train_parquet", "test_parquet", "reward_fn"):
    print(f"ASSET_{key.upper()}={shlex.quote(paths[key])}")
PY
)"
eval "$ASSET_VARS"
echo "[run_tiny_grpo] assets: $ASSET_ROOT"
echo "[run_tiny_grpo] log:    $LOG"

# 3. verl's trainer: CPU overrides first, then the GRPO recipe, then the caller's overrides.
set +e
"$PYTHON" -m verl.trainer.main_ppo \
  "${CPU_OVERRIDES[@]}" \
  hydra.run.dir="$RUN_DIR/hydra" \
  algorithm.adv_estimator=grpo \
  data.train_files="$ASSET_TRAIN_PARQUET" \
  data.val_files="$ASSET_TEST_PARQUET" \
  data.train_batch_size=4 \
  data.val_batch_size=8 \
  data.max_prompt_length=48 \
  data.max_response_length=8 \
  data.filter_overlong_prompts=False \
  actor_rollout_ref.model.path="$ASSET_STUDENT" \
  actor_rollout_ref.model.enable_gradient_checkpointing=False \
  actor_rollout_ref.actor.optim.lr=1e-4 \
  actor_rollout_ref.actor.ppo_mini_batch_size=4 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.actor.use_kl_loss=True \
  actor_rollout_ref.actor.kl_loss_coef=0.01 \
  actor_rollout_ref.rollout.n=2 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8 \
  reward.custom_reward_function.path="$ASSET_REWARD_FN" \
  reward.custom_reward_function.name=compute_score \
  trainer.total_epochs=1 \
  trainer.total_training_steps=3 \
  trainer.val_before_train=False \
  trainer.test_freq=-1 \
  trainer.save_freq=-1 \
  trainer.default_local_dir="$RUN_DIR/checkpoints" \
  trainer.project_name=tip_verl_cpu \
  trainer.experiment_name=tiny_grpo \
  "$@" 2>&1 | tee "$LOG"
STATUS=${PIPESTATUS[0]}
set -e
END=$(date +%s)

# 4. One-line summary from verl's console metrics ("step:N - key:value - ...").
"$PYTHON" - "$LOG" "$STATUS" "$((END - START))" <<'PY'
import re, sys

log, status, wall = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
steps = {}
for line in open(log, errors="replace"):
    m = re.search(r"\bstep:(\d+) - (.*)$", line)
    if m:
        metrics = dict(kv.split(":", 1) for kv in m.group(2).strip().split(" - ") if ":" in kv)
        steps[int(m.group(1))] = metrics
last = steps[max(steps)] if steps else {}
keys = ("critic/score/mean", "actor/pg_loss", "actor/kl_loss", "actor/entropy", "response_length/mean", "timing_s/step")
shown = " ".join(f"{k}={float(last[k]):.4g}" for k in keys if k in last)
state = "OK" if status == 0 and steps else f"FAILED(exit={status})"
print(f"[run_tiny_grpo] {state}: {len(steps)} step(s) with metrics; last step {max(steps) if steps else '-'}: {shown}; wall {wall}s")
PY
exit "$STATUS"

#!/usr/bin/env bash
# verl's own trainer (python -m verl.trainer.main_ppo, V1 trainer) on the host CPU, on tip_verl's
# tiny assets (a tiny Qwen2 student and a trained, larger Qwen2 teacher on multi-digit addition).
# A few steps, a few minutes on 2 cores, no GPU, no network. Called by the recipes beside it:
#
#   examples/cpu/tiny_main_ppo.sh opd        [hydra overrides...]  # OPD with TIP, ref = teacher (run_tiny_opd.sh)
#   examples/cpu/tiny_main_ppo.sh opd_server [hydra overrides...]  # OPD with TIP on verl's teacher server
#                                                                   # (run_tiny_opd_server.sh)
#   examples/cpu/tiny_main_ppo.sh grpo       [hydra overrides...]  # plain GRPO (run_tiny_grpo.sh)
#
# Caller's overrides are appended last, so they win (e.g. trainer.total_training_steps=2, +tip.ratio=0.2).
#
# Environment: PYTHON (interpreter, default: the repo's .venv if present), ASSETS_DIR (where the tiny
# assets are built/cached; default: tip_verl.assets' own cache), RUN_DIR (logs + Hydra outputs),
# DRY_RUN=1 (print the main_ppo command line, shell-quoted, and exit; the environment is cpu_overrides --env),
# N_WORKERS (data-parallel worker ranks of the actor and the ref, i.e. trainer.n_gpus_per_node; default 1).
#
# Data parallelism: N_WORKERS=2 (or the override trainer.n_gpus_per_node=2) shards the student with FSDP2
# over two CPU worker processes, as a GPU job does over its GPUs. Each micro-batch size the recipe (or the
# caller) sets is replaced by the largest divisor of each rank's share below it, computed from the final
# batch flags (tip_verl.verl_adapter.dp_layout); micro-batch sizes the caller sets explicitly are kept as
# given, and one that cannot divide stops main_ppo at start-up with a 'tip_verl: data-parallel layout: ...'
# line naming the flag.
#
# The CPU platform, the hf rollout and every CPU-specific flag come from ONE place:
# tip_verl/verl_adapter/cpu_overrides.py (env: --env, Hydra overrides: default output).
set -euo pipefail

RECIPE="${1:?usage: tiny_main_ppo.sh opd|opd_server|grpo [hydra overrides...]}"; shift
case "$RECIPE" in
  opd|opd_server|grpo) ;;
  *) echo "tiny_main_ppo.sh: unknown recipe '$RECIPE' (use opd, opd_server or grpo)" >&2; exit 2 ;;
esac
TAG="run_tiny_$RECIPE"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  # A fresh machine: create the project's .venv first (no-op when it is up to date).
  if [[ -z "${TIP_VERL_NO_SETUP:-}" ]]; then bash "$REPO/scripts/setup_env.sh"; fi
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
RUN_DIR="${RUN_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/tip_verl_tiny_$RECIPE.XXXXXX")}"
mkdir -p "$RUN_DIR"
LOG="$RUN_DIR/main_ppo.log"
START=$(date +%s)

# 1. CPU environment (VERL_PLATFORM=cpu selects tip_verl's CPU platform; offline; no wandb)
CPU_ENV="$("$PYTHON" -m tip_verl.verl_adapter.cpu_overrides --env)"   # (assignments keep set -e effective)
eval "$CPU_ENV"
N_WORKERS="${N_WORKERS:-1}"
if ! [[ "$N_WORKERS" =~ ^[1-9][0-9]*$ ]]; then
  echo "tiny_main_ppo.sh: N_WORKERS='$N_WORKERS' must be a positive integer (worker ranks)" >&2; exit 2
fi
CPU_OVERRIDES_TEXT="$("$PYTHON" -m tip_verl.verl_adapter.cpu_overrides --n-workers "$N_WORKERS")"
mapfile -t CPU_OVERRIDES <<<"$CPU_OVERRIDES_TEXT"

# 2. Tiny assets (`python -m tip_verl.assets` builds them on first use, then reuses the cache) and the
#    CPU start-up checks (a bad set-up stops here with a clear message).
ASSETS_JSON="$("$PYTHON" -m tip_verl.assets --json ${ASSETS_DIR:+--out "$ASSETS_DIR"})"
ASSET_VARS="$(ASSETS_JSON="$ASSETS_JSON" "$PYTHON" - <<'PY'
import json, os, shlex
from tip_verl.verl_adapter.cpu.checks import run_startup_checks

paths = json.loads(os.environ["ASSETS_JSON"])["paths"]
run_startup_checks({"student model": paths["student"], "teacher model": paths["teacher"]})
for key in ("root", "student", "teacher", "train_parquet", "test_parquet", "reward_fn"):
    print(f"ASSET_{key.upper()}={shlex.quote(paths[key])}")
with open(paths["manifest"]) as f:
    print(f"ASSET_VOCAB_SIZE={int(json.load(f)['tokenizer']['vocab_size'])}")
PY
)"
eval "$ASSET_VARS"
echo "[$TAG] assets: $ASSET_ROOT"
echo "[$TAG] log:    $LOG"

# 3. verl's trainer: CPU overrides first, then the recipe, then the caller's overrides.
if [[ "$RECIPE" == opd ]]; then
  # On-policy distillation with TIP: the ref model is the teacher; keep 50% of tokens by Soft-OR. The loss
  # is the paper's (Eq. 7): the reverse KL over the whole vocabulary at kept tokens (the teacher's top-k
  # with k = |V|, exact on this tiny vocabulary). 32 prompts x 4 responses a step, two passes over each
  # batch (ppo_epochs=2), 30 steps (so that command 1 of the README fits 10 minutes on a fresh 2-core
  # machine; the toy study runs this recipe for 60: scripts/toy_study.py --steps); verl's validation
  # (4 samples per test prompt at temperature 1) before the first and after the last step.
  RECIPE_OVERRIDES=(
    trainer.v1.trainer_mode=tip_sync
    algorithm.adv_estimator=tip_opd
    +tip.teacher_path="$ASSET_TEACHER"
    +tip.method=soft_or
    +tip.ratio=null  # unset: the method's default (0.5 for soft_or; 1.0 for tip.method=all)
    +tip.teacher_signal=topk
    +tip.topk_k="$ASSET_VOCAB_SIZE"
    +tip.loss=topk_reverse_kl
    actor_rollout_ref.actor.use_kl_loss=False
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.actor.optim.lr=3e-4
    actor_rollout_ref.actor.optim.lr_warmup_steps=5
    actor_rollout_ref.actor.ppo_epochs=2
    data.train_batch_size=32
    actor_rollout_ref.rollout.n=4
    actor_rollout_ref.actor.ppo_mini_batch_size=32
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=128
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=128
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=128
    trainer.total_training_steps=30
    trainer.val_before_train=True
    trainer.test_freq=1000000
    data.val_batch_size=128
    actor_rollout_ref.rollout.val_kwargs.do_sample=True
    actor_rollout_ref.rollout.val_kwargs.temperature=1.0
    actor_rollout_ref.rollout.val_kwargs.top_p=1.0
    actor_rollout_ref.rollout.val_kwargs.top_k=-1
    actor_rollout_ref.rollout.val_kwargs.n=4
  )
  SUMMARY_KEYS="critic/score/mean actor/tip_topk_reverse_kl_loss tip/kept_fraction tip/topk_reverse_kl_mean tip/kept_topk_reverse_kl_mean tip/q3_share tip/q3_kept_share timing_s/step"
elif [[ "$RECIPE" == opd_server ]]; then
  # The same TIP selection on verl's native distillation: the teacher runs on verl's teacher server
  # (the hf server on the CPU, vLLM/SGLang on GPUs); TIP masks verl's distillation loss (here k1 as
  # a policy-gradient reward, task rewards off). verl still computes a GRPO advantage, unused here.
  RECIPE_OVERRIDES=(
    trainer.v1.trainer_mode=tip_sync
    algorithm.adv_estimator=grpo
    distillation.enabled=True
    distillation.nnodes=1
    distillation.teacher_models.teacher_model.model_path="$ASSET_TEACHER"
    distillation.distillation_loss.loss_mode=k1
    distillation.distillation_loss.use_policy_gradient=True
    distillation.distillation_loss.use_task_rewards=False
    +tip.method=soft_or
    +tip.ratio=null  # unset: the method's default (0.5 for soft_or; 1.0 for tip.method=all)
    actor_rollout_ref.actor.use_kl_loss=False
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.actor.optim.lr=1e-3
  )
  SUMMARY_KEYS="critic/score/mean actor/distillation/loss tip/kept_fraction tip/divergence_mean tip/kept_divergence_mean tip/q3_share timing_s/step"
else
  RECIPE_OVERRIDES=(
    algorithm.adv_estimator=grpo
    actor_rollout_ref.actor.use_kl_loss=True
    actor_rollout_ref.actor.kl_loss_coef=0.01
    actor_rollout_ref.actor.optim.lr=1e-4
  )
  SUMMARY_KEYS="critic/score/mean actor/pg_loss actor/kl_loss actor/entropy response_length/mean timing_s/step"
fi
JOB_OVERRIDES=(
  "${CPU_OVERRIDES[@]}" \
  hydra.run.dir="$RUN_DIR/hydra" \
  data.train_files="$ASSET_TRAIN_PARQUET" \
  data.val_files="$ASSET_TEST_PARQUET" \
  data.train_batch_size=4 \
  data.val_batch_size=8 \
  data.max_prompt_length=32 \
  data.max_response_length=48 \
  data.filter_overlong_prompts=False \
  actor_rollout_ref.model.path="$ASSET_STUDENT" \
  actor_rollout_ref.model.enable_gradient_checkpointing=False \
  actor_rollout_ref.actor.ppo_mini_batch_size=4 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
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
  trainer.experiment_name="tiny_$RECIPE" \
  "${RECIPE_OVERRIDES[@]}"
)
# Micro-batch sizes that divide each rank's share, from the job's final batch flags (the caller's included);
# the caller's own micro-batch flags come after them and win.
# (run as a file: standard library only, no torch import)
MICRO_TEXT="$("$PYTHON" "$REPO/tip_verl/verl_adapter/dp_layout.py" -- "${JOB_OVERRIDES[@]}" "$@")"
MICRO_OVERRIDES=()
if [[ -n "$MICRO_TEXT" ]]; then mapfile -t MICRO_OVERRIDES <<<"$MICRO_TEXT"; fi
CMD=("$PYTHON" -m verl.trainer.main_ppo "${JOB_OVERRIDES[@]}" "${MICRO_OVERRIDES[@]}" "$@")
if [[ "$N_WORKERS" != 1 ]]; then echo "[$TAG] worker ranks: $N_WORKERS (${MICRO_OVERRIDES[*]})"; fi
if [[ -n "${DRY_RUN:-}" ]]; then  # print the main_ppo command line (shell-quoted) instead of running it
  echo "${CMD[*]@Q}"
  exit 0
fi
set +e
"${CMD[@]}" 2>&1 | tee "$LOG"
STATUS=${PIPESTATUS[0]}
set -e
END=$(date +%s)

# 4. One-line summary from verl's console metrics ("step:N - key:value - ...").
# shellcheck disable=SC2086  # SUMMARY_KEYS is a word list
"$PYTHON" -m tip_verl.verl_adapter.console_metrics "$LOG" --tag "$TAG" --status "$STATUS" \
  --wall "$((END - START))" --keys $SUMMARY_KEYS
exit "$STATUS"

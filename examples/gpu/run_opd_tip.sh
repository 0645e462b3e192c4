#!/usr/bin/env bash
# On-policy distillation (OPD) with TIP token selection on GPUs, through verl's own entry point
# (python -m verl.trainer.main_ppo) and verl's GPU stack: vLLM rollout, FSDP2 actor and teacher,
# flash-attention (verl's default attention), remove-padding and dynamic batch sizes.
#
# Usage:
#   PAIR=qwen3_8b_4b METHOD=soft_or50 DATA_DIR=data/math bash examples/gpu/run_opd_tip.sh [hydra overrides...]
#
# Environment (required ones marked *):
#   PAIR          qwen3_8b_4b (default) | llama_70b_8b | qwen25_14b_15b -- the paper's math pairs (Sec. 7.1);
#                 sets the default student/teacher checkpoints, learning rate and rollout TP.
#   METHOD        all | entropy50 | entropy20 | entropy_sample50 | soft_or50 (default) | soft_or20 | q3_20
#                 | soft_or_bottom50 -- the token-selection method and retention ratio (Tables 3-6).
#   STUDENT_PATH  local Hugging Face folder of the student (default: $MODEL_ROOT/<model name>)
#   TEACHER_PATH  local Hugging Face folder of the teacher (default: $MODEL_ROOT/<model name>)
#   MODEL_ROOT    where the default checkpoints live (default: $HOME/models)
#   TEACHER_SIGNAL sampled (default) | topk -- the teacher's log-prob of the sampled token, or its top-k
#                 (δ and the Q3 forward KL become top-k KLs; see docs/teacher_paths.md)
#   TOPK_K        k of TEACHER_SIGNAL=topk (default 64; 8*k bytes per response token)
#   TIP_LOSS      pg (default) | topk_reverse_kl -- policy gradient with advantage -k1, or the direct
#                 top-k reverse KL at kept tokens (needs TEACHER_SIGNAL=topk)
# * DATA_DIR      folder written by `python -m tip_verl.tools.math_data`: train.parquet (+ math500 /
#                 aime24 / aime25 .parquet, used for validation: mean@16 at temperature 1.0)
#   NNODES, N_GPUS_PER_NODE (default 1, 8), ROLLOUT_TP (vLLM tensor parallel size; per-pair default)
#   OUTPUT_DIR    checkpoints and validation dumps (default: outputs/$PROJECT/$EXPERIMENT)
#   PROJECT, EXPERIMENT  tracker names (default: tip_opd, ${PAIR}_${METHOD})
#   LR, TRAIN_BATCH_SIZE, PPO_MINI_BATCH_SIZE, ROLLOUT_N, MAX_PROMPT_LENGTH, MAX_RESPONSE_LENGTH,
#   TOTAL_EPOCHS, TOTAL_TRAINING_STEPS, WARMUP_RATIO, MIN_LR_RATIO, WEIGHT_DECAY, VAL_N, TEST_FREQ,
#   SAVE_FREQ, GPU_MEMORY_UTILIZATION, LOGGER, SEED, PYTHON -- see the defaults below.
#   TRAINER_MODE  tip_sync (default) | tip_colocate_async | tip_separate_async -- verl's V1 trainer the job
#                 runs (sync | colocate_async | separate_async) with TIP; run_opd_tip_colocate_async.sh and
#                 run_opd_tip_separate_async.sh set it. Asynchronous modes:
#     NUM_WARMUP_BATCHES  batches generated ahead of training (verl's num_warmup_batches; default 1)
#     MAX_OFF_POLICY      most weight versions a trajectory may span (trainer.v1.sampler.max_off_policy_threshold;
#                         default 8, verl's) and MAX_OFF_POLICY_STRATEGY drop | wait (default drop, verl's)
#   tip_separate_async only (generation on its own GPUs; weights sent over a checkpoint engine):
#     ROLLOUT_NNODES, ROLLOUT_GPUS_PER_NODE  the rollout pool (default 1, 4; N_GPUS_PER_NODE defaults to 4 then:
#                         4 training + 4 rollout GPUs on one 8-GPU node)
#     PARAMETER_SYNC_STEP updates per global step, one mini-batch each (default 4, verl's); PPO_MINI_BATCH_SIZE
#                         defaults to TRAIN_BATCH_SIZE / PARAMETER_SYNC_STEP (verl requires the product to match)
#     CHECKPOINT_ENGINE   nccl (default) | nixl | mooncake | ... (verl's weight-sync backends)
#   DRY_RUN=1     print the full command (one line, shell-quoted) instead of running it.
#
# Paper settings used here: AdamW with a cosine schedule, lr 1e-6 (Qwen3, Qwen2.5) / 3e-7 (Llama),
# reverse KL on student rollouts at temperature 1.0, evaluation by mean@16 at temperature 1.0.
# The paper's full hyper-parameter table (App. B.3, Table 9) is not in its text, so batch size,
# rollout.n, response length and the number of epochs below are this project's defaults.
set -euo pipefail

die() {
    echo "run_opd_tip.sh: error: $*" >&2
    exit 2
}

PAIR="${PAIR:-qwen3_8b_4b}"
METHOD="${METHOD:-soft_or50}"

case "$PAIR" in
    qwen3_8b_4b)
        # Paper: a GRPO-trained Qwen3-8B teacher; point TEACHER_PATH at yours to reproduce it exactly.
        student_hf="Qwen/Qwen3-4B"; teacher_hf="Qwen/Qwen3-8B"
        default_lr="1e-6"; default_tp=1 ;;
    llama_70b_8b)
        student_hf="meta-llama/Llama-3.1-8B-Instruct"; teacher_hf="meta-llama/Llama-3.3-70B-Instruct"
        default_lr="3e-7"; default_tp=2 ;;
    qwen25_14b_15b)
        # Paper: "Qwen2.5-14B-Instruct-thinking", a reasoning-tuned 14B teacher; set TEACHER_PATH to yours.
        student_hf="Qwen/Qwen2.5-1.5B-Instruct"; teacher_hf="Qwen/Qwen2.5-14B-Instruct"
        default_lr="1e-6"; default_tp=1 ;;
    *)
        die "unknown PAIR='$PAIR'; expected one of: qwen3_8b_4b, llama_70b_8b, qwen25_14b_15b" ;;
esac

# METHOD -> +tip.* flags (TIPConfig fields). Ratios are the retention ratio rho of the paper.
invert=false
case "$METHOD" in
    all)              tip_method=all;            tip_ratio="" ;;  # plain OPD on every token
    entropy50)        tip_method=entropy;        tip_ratio=0.5 ;;
    entropy20)        tip_method=entropy;        tip_ratio=0.2 ;;
    entropy_sample50) tip_method=entropy_sample; tip_ratio=0.5 ;;
    soft_or50)        tip_method=soft_or;        tip_ratio=0.5 ;;
    soft_or20)        tip_method=soft_or;        tip_ratio=0.2 ;;
    q3_20)            tip_method=q3;             tip_ratio=0.2 ;;
    soft_or_bottom50) tip_method=soft_or;        tip_ratio=0.5; invert=true ;;
    *)
        die "unknown METHOD='$METHOD'; expected one of: all, entropy50, entropy20, entropy_sample50, soft_or50, soft_or20, q3_20, soft_or_bottom50" ;;
esac

TEACHER_SIGNAL="${TEACHER_SIGNAL:-sampled}"
TOPK_K="${TOPK_K:-64}"
TIP_LOSS="${TIP_LOSS:-pg}"
case "$TEACHER_SIGNAL" in sampled|topk) ;; *) die "TEACHER_SIGNAL='$TEACHER_SIGNAL' must be sampled or topk" ;; esac
case "$TIP_LOSS" in pg|topk_reverse_kl) ;; *) die "TIP_LOSS='$TIP_LOSS' must be pg or topk_reverse_kl" ;; esac
[[ "$TOPK_K" =~ ^[1-9][0-9]*$ ]] || die "TOPK_K='$TOPK_K' must be a positive integer"
if [[ "$TIP_LOSS" == topk_reverse_kl && "$TEACHER_SIGNAL" != topk ]]; then
    die "TIP_LOSS=topk_reverse_kl needs TEACHER_SIGNAL=topk"
fi

MODEL_ROOT="${MODEL_ROOT:-$HOME/models}"
STUDENT_PATH="${STUDENT_PATH:-$MODEL_ROOT/${student_hf##*/}}"
TEACHER_PATH="${TEACHER_PATH:-$MODEL_ROOT/${teacher_hf##*/}}"
[[ -n "${DATA_DIR:-}" ]] || die "DATA_DIR is not set: point it at the folder written by 'python -m tip_verl.tools.math_data --dapo ... --math500 ... --aime24 ... --aime25 ... --out DIR'"
[[ -d "$STUDENT_PATH" ]] || die "STUDENT_PATH='$STUDENT_PATH' is not a folder; download the student first, e.g. 'huggingface-cli download $student_hf --local-dir $STUDENT_PATH', or set STUDENT_PATH"
[[ -d "$TEACHER_PATH" ]] || die "TEACHER_PATH='$TEACHER_PATH' is not a folder; download the teacher first, e.g. 'huggingface-cli download $teacher_hf --local-dir $TEACHER_PATH', or set TEACHER_PATH"
[[ -d "$DATA_DIR" ]] || die "DATA_DIR='$DATA_DIR' is not a folder"
[[ -f "$DATA_DIR/train.parquet" ]] || die "DATA_DIR='$DATA_DIR' has no train.parquet; create it with 'python -m tip_verl.tools.math_data --dapo PATH --out $DATA_DIR'"
val_files=()
for name in math500 aime24 aime25; do
    if [[ -f "$DATA_DIR/$name.parquet" ]]; then val_files+=("$DATA_DIR/$name.parquet"); fi
done
(( ${#val_files[@]} > 0 )) || die "DATA_DIR='$DATA_DIR' has none of math500.parquet, aime24.parquet, aime25.parquet (validation sets); add them with 'python -m tip_verl.tools.math_data --math500 PATH --aime24 PATH --aime25 PATH --out $DATA_DIR'"
val_list="[$(IFS=,; echo "${val_files[*]}")]"

TRAINER_MODE="${TRAINER_MODE:-tip_sync}"
case "$TRAINER_MODE" in
    tip_sync|tip_colocate_async|tip_separate_async) ;;
    *) die "TRAINER_MODE='$TRAINER_MODE' must be tip_sync, tip_colocate_async or tip_separate_async" ;;
esac
NNODES="${NNODES:-1}"
if [[ "$TRAINER_MODE" == tip_separate_async ]]; then default_gpus=4; else default_gpus=8; fi
N_GPUS_PER_NODE="${N_GPUS_PER_NODE:-$default_gpus}"
ROLLOUT_TP="${ROLLOUT_TP:-$default_tp}"
PROJECT="${PROJECT:-tip_opd}"
EXPERIMENT="${EXPERIMENT:-${PAIR}_${METHOD}}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/$PROJECT/$EXPERIMENT}"
NUM_WARMUP_BATCHES="${NUM_WARMUP_BATCHES:-1}"
MAX_OFF_POLICY="${MAX_OFF_POLICY:-8}"
MAX_OFF_POLICY_STRATEGY="${MAX_OFF_POLICY_STRATEGY:-drop}"
ROLLOUT_NNODES="${ROLLOUT_NNODES:-1}"
ROLLOUT_GPUS_PER_NODE="${ROLLOUT_GPUS_PER_NODE:-4}"
PARAMETER_SYNC_STEP="${PARAMETER_SYNC_STEP:-4}"
CHECKPOINT_ENGINE="${CHECKPOINT_ENGINE:-nccl}"
for var in NNODES N_GPUS_PER_NODE ROLLOUT_TP MAX_OFF_POLICY ROLLOUT_NNODES ROLLOUT_GPUS_PER_NODE PARAMETER_SYNC_STEP; do
    [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || die "$var='${!var}' must be a positive integer"
done
[[ "$NUM_WARMUP_BATCHES" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "NUM_WARMUP_BATCHES='$NUM_WARMUP_BATCHES' must be a number >= 0"
case "$MAX_OFF_POLICY_STRATEGY" in drop|wait) ;; *) die "MAX_OFF_POLICY_STRATEGY='$MAX_OFF_POLICY_STRATEGY' must be drop or wait" ;; esac
[[ "$CHECKPOINT_ENGINE" != naive ]] || die "CHECKPOINT_ENGINE=naive cannot send weights to a separate rollout pool; use nccl (or nixl, mooncake, ...)"

LR="${LR:-$default_lr}"
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE:-64}"               # prompts per step
if [[ "$TRAINER_MODE" == tip_separate_async ]]; then
    # verl's separate_async: one global step = PARAMETER_SYNC_STEP updates of one mini-batch each
    [[ "$TRAIN_BATCH_SIZE" =~ ^[1-9][0-9]*$ ]] && (( TRAIN_BATCH_SIZE % PARAMETER_SYNC_STEP == 0 )) \
        || die "TRAIN_BATCH_SIZE='$TRAIN_BATCH_SIZE' must be a multiple of PARAMETER_SYNC_STEP=$PARAMETER_SYNC_STEP with TRAINER_MODE=tip_separate_async"
    default_mini=$(( TRAIN_BATCH_SIZE / PARAMETER_SYNC_STEP ))
else
    default_mini="$TRAIN_BATCH_SIZE"                     # one optimizer step per batch: on-policy
fi
PPO_MINI_BATCH_SIZE="${PPO_MINI_BATCH_SIZE:-$default_mini}"
ROLLOUT_N="${ROLLOUT_N:-4}"                              # student rollouts per prompt
MAX_PROMPT_LENGTH="${MAX_PROMPT_LENGTH:-1024}"
MAX_RESPONSE_LENGTH="${MAX_RESPONSE_LENGTH:-8192}"
TOTAL_EPOCHS="${TOTAL_EPOCHS:-1}"
TOTAL_TRAINING_STEPS="${TOTAL_TRAINING_STEPS:-null}"     # null: epochs x batches per epoch
WARMUP_RATIO="${WARMUP_RATIO:-0.0}"
MIN_LR_RATIO="${MIN_LR_RATIO:-0.0}"
WEIGHT_DECAY="${WEIGHT_DECAY:-0.01}"
VAL_N="${VAL_N:-16}"                                     # validation: mean@16 at temperature 1.0
TEST_FREQ="${TEST_FREQ:-20}"
SAVE_FREQ="${SAVE_FREQ:-50}"
GPU_MEMORY_UTILIZATION="${GPU_MEMORY_UTILIZATION:-0.6}"
LOGGER="${LOGGER:-[console]}"                            # e.g. '[console,wandb]'
SEED="${SEED:-0}"
PYTHON="${PYTHON:-python3}"
max_token_len=$(( (MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH) * 2 ))  # dynamic batch size budget per GPU

tip_args=(
    "trainer.v1.trainer_mode=$TRAINER_MODE"
    algorithm.adv_estimator=tip_opd
    "+tip.teacher_path=$TEACHER_PATH"
    "+tip.method=$tip_method"
)
if [[ -n "$tip_ratio" ]]; then tip_args+=("+tip.ratio=$tip_ratio"); fi
tip_args+=(
    "+tip.invert=$invert"
    +tip.selection_scope=sequence
    +tip.norm_scope=batch
    +tip.divergence=k3
    +tip.sampling_mode=without_replacement
    +tip.importance_weighting=false
    "+tip.seed=$SEED"
    "+tip.teacher_signal=$TEACHER_SIGNAL"
)
if [[ "$TEACHER_SIGNAL" == topk ]]; then tip_args+=("+tip.topk_k=$TOPK_K" "+tip.loss=$TIP_LOSS"); fi
if [[ "$TIP_LOSS" == pg ]]; then tip_args+=(+tip.advantage_estimator=k1); fi

# verl's asynchronous trainers: generation runs ahead of training (partial rollouts continue across weight
# updates), so a batch may come from older weights; TIP selects on the old log-probs verl recomputes with the
# policy being updated and reports the lag as tip/staleness_* (README, "asynchronous trainers").
mode_args=()
if [[ "$TRAINER_MODE" == tip_colocate_async ]]; then
    mode_args+=("trainer.v1.colocate_async.num_warmup_batches=$NUM_WARMUP_BATCHES")
elif [[ "$TRAINER_MODE" == tip_separate_async ]]; then
    mode_args+=(
        "trainer.v1.separate_async.num_warmup_batches=$NUM_WARMUP_BATCHES"
        "trainer.v1.separate_async.parameter_sync_step=$PARAMETER_SYNC_STEP"
        "actor_rollout_ref.rollout.nnodes=$ROLLOUT_NNODES"
        "actor_rollout_ref.rollout.n_gpus_per_node=$ROLLOUT_GPUS_PER_NODE"
        "actor_rollout_ref.rollout.checkpoint_engine.backend=$CHECKPOINT_ENGINE"
    )
fi
if [[ "$TRAINER_MODE" != tip_sync ]]; then
    mode_args+=(
        "trainer.v1.sampler.max_off_policy_threshold=$MAX_OFF_POLICY"
        "trainer.v1.sampler.max_off_policy_strategy=$MAX_OFF_POLICY_STRATEGY"
    )
fi

cmd=(
    "$PYTHON" -m verl.trainer.main_ppo
    "${tip_args[@]}"
    "${mode_args[@]}"
    # OPD: the KL to the teacher is the whole signal (no KL loss, entropy bonus or KL-in-reward).
    actor_rollout_ref.actor.use_kl_loss=False
    actor_rollout_ref.actor.entropy_coeff=0
    algorithm.use_kl_in_reward=False
    actor_rollout_ref.actor.loss_agg_mode=token-mean
    actor_rollout_ref.actor.ppo_epochs=1
    # data (reward: verl's default math scorer picked by data_source, logged as accuracy only)
    "data.train_files=$DATA_DIR/train.parquet"
    "data.val_files=$val_list"
    data.prompt_key=prompt
    "data.train_batch_size=$TRAIN_BATCH_SIZE"
    "data.max_prompt_length=$MAX_PROMPT_LENGTH"
    "data.max_response_length=$MAX_RESPONSE_LENGTH"
    data.filter_overlong_prompts=True
    data.truncation=error
    data.shuffle=True
    "data.seed=$SEED"
    # student model
    "actor_rollout_ref.model.path=$STUDENT_PATH"
    actor_rollout_ref.model.use_remove_padding=True
    actor_rollout_ref.model.enable_gradient_checkpointing=True
    # actor: FSDP2, AdamW + cosine schedule, dynamic batch size
    actor_rollout_ref.actor.strategy=fsdp2
    actor_rollout_ref.actor.optim.optimizer=AdamW
    "actor_rollout_ref.actor.optim.lr=$LR"
    actor_rollout_ref.actor.optim.lr_scheduler_type=cosine
    "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=$WARMUP_RATIO"
    "actor_rollout_ref.actor.optim.min_lr_ratio=$MIN_LR_RATIO"
    "actor_rollout_ref.actor.optim.weight_decay=$WEIGHT_DECAY"
    actor_rollout_ref.actor.optim.clip_grad=1.0
    "actor_rollout_ref.actor.ppo_mini_batch_size=$PPO_MINI_BATCH_SIZE"
    actor_rollout_ref.actor.use_dynamic_bsz=True
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$max_token_len"
    actor_rollout_ref.actor.fsdp_config.param_offload=False
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False
    # teacher (verl's ref model, loaded from +tip.teacher_path): FSDP2 like the actor, params offloaded
    actor_rollout_ref.ref.fsdp_config.param_offload=True
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=$max_token_len"
    # rollout: vLLM, temperature 1.0
    actor_rollout_ref.rollout.name=vllm
    "actor_rollout_ref.rollout.tensor_model_parallel_size=$ROLLOUT_TP"
    "actor_rollout_ref.rollout.gpu_memory_utilization=$GPU_MEMORY_UTILIZATION"
    "actor_rollout_ref.rollout.n=$ROLLOUT_N"
    actor_rollout_ref.rollout.temperature=1.0
    actor_rollout_ref.rollout.top_p=1.0
    actor_rollout_ref.rollout.top_k=-1
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=$max_token_len"
    # validation: mean@VAL_N at temperature 1.0 (paper: mean@16)
    "actor_rollout_ref.rollout.val_kwargs.n=$VAL_N"
    actor_rollout_ref.rollout.val_kwargs.temperature=1.0
    actor_rollout_ref.rollout.val_kwargs.top_p=1.0
    actor_rollout_ref.rollout.val_kwargs.do_sample=True
    # trainer
    "trainer.logger=$LOGGER"
    "trainer.project_name=$PROJECT"
    "trainer.experiment_name=$EXPERIMENT"
    "trainer.nnodes=$NNODES"
    "trainer.n_gpus_per_node=$N_GPUS_PER_NODE"
    "trainer.total_epochs=$TOTAL_EPOCHS"
    "trainer.total_training_steps=$TOTAL_TRAINING_STEPS"
    "trainer.test_freq=$TEST_FREQ"
    "trainer.save_freq=$SAVE_FREQ"
    trainer.val_before_train=True
    "trainer.default_local_dir=$OUTPUT_DIR/checkpoints"
    "trainer.validation_data_dir=$OUTPUT_DIR/validation"
    "$@"
)

if [[ "${DRY_RUN:-0}" != "0" ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi

"$PYTHON" -c "import tip_verl.verl_adapter, verl" 2>/dev/null \
    || die "'$PYTHON' cannot import tip_verl and verl; install them first (pip install -e '.[gpu]') or set PYTHON"
mkdir -p "$OUTPUT_DIR"
echo "run_opd_tip.sh: PAIR=$PAIR METHOD=$METHOD TRAINER_MODE=$TRAINER_MODE student=$STUDENT_PATH teacher=$TEACHER_PATH -> $OUTPUT_DIR" >&2
exec "${cmd[@]}"

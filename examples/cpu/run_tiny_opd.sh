#!/usr/bin/env bash
# The main job: on-policy distillation with TIP (Soft-OR, keep 50% of tokens) with verl's own trainer
# on the CPU; the tiny trained teacher is verl's reference model. See tiny_main_ppo.sh.
#   examples/cpu/run_tiny_opd.sh tip.method=q3 tip.ratio=0.2 trainer.total_training_steps=5
# (no "+" for tip.method / tip.ratio / tip.teacher_path / tip.teacher_signal / tip.topk_k / tip.loss: this
#  script already adds them; "+" for other tip keys). It ends with one line: the student's accuracy before
#  and after (verl's validation), the share of response tokens trained on and the actor's peak memory.
exec bash "$(dirname "${BASH_SOURCE[0]}")/tiny_main_ppo.sh" opd "$@"

#!/usr/bin/env bash
# OPD with TIP (Soft-OR, keep 50% of tokens) on verl's NATIVE distillation: the tiny teacher is served by
# verl's teacher server (distillation.enabled=true; the hf server on the CPU) and TIP masks verl's
# distillation loss. See tiny_main_ppo.sh and docs/teacher_paths.md.
#   examples/cpu/run_tiny_opd_server.sh distillation.distillation_loss.loss_mode=forward_kl_topk \
#       distillation.distillation_loss.use_policy_gradient=False tip.method=q3 tip.ratio=0.2
exec bash "$(dirname "${BASH_SOURCE[0]}")/tiny_main_ppo.sh" opd_server "$@"

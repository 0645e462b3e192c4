#!/usr/bin/env bash
# Plain GRPO with verl's own trainer on the CPU on the tiny assets (see tiny_main_ppo.sh).
exec bash "$(dirname "${BASH_SOURCE[0]}")/tiny_main_ppo.sh" grpo "$@"

#!/usr/bin/env bash
# The project's test command (README and CI): set up .venv, then run the fast unit tests and the slow
# end-to-end tests (verl's real trainer on the CPU). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -m "not slow" -q "$@"
.venv/bin/python -m pytest -m slow -q -rA --durations=0 "$@"

#!/usr/bin/env bash
# Creates (or refreshes) the project-local virtual environment .venv with everything tip_verl needs on a
# CPU machine: torch 2.13.0 (CPU build), verl 0.9.1 + the extras its V1 trainer needs, test tools, at the
# tested versions of scripts/cpu_constraints.txt. Idempotent: re-runs only when setup.py or the constraints
# changed. Usage: bash scripts/setup_env.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
constraints="$root/scripts/cpu_constraints.txt"
if [[ $# -gt 0 ]]; then
  echo "setup_env.sh: takes no arguments (got '$*'); it reads PYTHON (the interpreter for the venv)" >&2; exit 2
fi
stamp="$venv/.tip_verl_setup_stamp"
want="$(cat "$root/setup.py" "$constraints" | sha256sum | cut -c1-16)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $venv ..." >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q -c "$constraints")
# torch first and pinned, so no resolver step can pull a multi-GB CUDA build. (pip's byte-compiling is
# kept: with --no-compile the install was 24 s shorter, but the first verl job then compiled the same
# modules in each of its Ray worker processes at once, and its start-up took 75 s instead of about 25.)
"${pip[@]}" "torch==2.13.0"
# (Building the tiny assets during this install was tried: 259 s for both, against 246 s one after the
# other, as the teacher's training needs both cores.)
"${pip[@]}" -e "$root[cpu,test]"
echo "$want" > "$stamp"
echo "[setup] done: $("$venv/bin/python" -c 'from importlib.metadata import version as v; print(*(f"{p} {v(p)}" for p in ("torch", "verl", "transformers", "tip_verl")))')" >&2

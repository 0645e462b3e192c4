#!/usr/bin/env bash
# Creates (or refreshes) the project-local virtual environment .venv with everything tip_verl needs on a
# CPU machine: torch 2.13.0 (CPU build), verl 0.9.1 + the extras its V1 trainer needs, test tools.
# Idempotent: re-runs only when setup.py changed. Usage: source-free, `bash scripts/setup_env.sh`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
stamp="$venv/.tip_verl_setup_stamp"
want="$(sha256sum "$root/setup.py" | cut -c1-16)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $venv ..." >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
# torch first and pinned, so no resolver step can pull a multi-GB CUDA build. (pip's byte-compiling is
# kept: with --no-compile the install was 24 s shorter, but the first verl job then compiled the same
# modules in each of its Ray worker processes at once, and its start-up took 75 s instead of about 25.)
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q -e "$root[cpu,test]"
echo "$want" > "$stamp"
echo "[setup] done: $("$venv/bin/python" -c 'from importlib.metadata import version as v; print(*(f"{p} {v(p)}" for p in ("torch", "verl", "transformers", "tip_verl")))')" >&2

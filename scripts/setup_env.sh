#!/usr/bin/env bash
# Creates (or refreshes) the project-local virtual environment .venv with everything tip_verl needs on a
# CPU machine: torch 2.13.0 (CPU build), verl 0.9.1 + the extras its V1 trainer needs, test tools, at the
# tested versions of scripts/cpu_constraints.txt. Idempotent: re-runs only when setup.py or the constraints
# changed. Usage: bash scripts/setup_env.sh [--with-assets]
#   --with-assets  also build the tiny assets (python -m tip_verl.assets; into $ASSETS_DIR if set, else the
#                  default cache) while pip installs verl, so that a fresh machine does both at once; a no-op
#                  when .venv is up to date (the caller's own `python -m tip_verl.assets` then builds or reuses).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
constraints="$root/scripts/cpu_constraints.txt"
with_assets=""
for arg in "$@"; do
  case "$arg" in
    --with-assets) with_assets=1 ;;
    *) echo "setup_env.sh: unknown argument '$arg' (usage: setup_env.sh [--with-assets])" >&2; exit 2 ;;
  esac
done
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
assets_pid=""
if [[ -n "$with_assets" ]]; then
  # What the asset build imports, at the constrained versions, so that installing the rest changes nothing
  # under it; the build then runs from the source tree while pip installs verl.
  "${pip[@]}" transformers pandas pyarrow
  echo "[setup] building the tiny assets while pip installs the rest ..." >&2
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" -m tip_verl.assets \
    ${ASSETS_DIR:+--out "$ASSETS_DIR"} >&2 &
  assets_pid=$!
  trap 'kill "$assets_pid" 2>/dev/null || true' EXIT  # pip failed: stop the build too
fi
"${pip[@]}" -e "$root[cpu,test]"
echo "$want" > "$stamp"
echo "[setup] done: $("$venv/bin/python" -c 'from importlib.metadata import version as v; print(*(f"{p} {v(p)}" for p in ("torch", "verl", "transformers", "tip_verl")))')" >&2
if [[ -n "$assets_pid" ]]; then
  if ! wait "$assets_pid"; then
    trap - EXIT
    echo "[setup] building the tiny assets failed (its error is above)" >&2; exit 1
  fi
  trap - EXIT
fi

"""End to end: verl's real trainer (``python -m verl.trainer.main_ppo``, V1) on the CPU.

Runs the example scripts (``examples/cpu/run_tiny_grpo.sh``, ``run_tiny_opd.sh``) (which launches ``main_ppo`` with the shared CPU overrides of
``tip_verl.verl_adapter.cpu_overrides``) as a subprocess on the tiny assets and parses verl's console
logger output (``step:N - key:value - ...``). About 70 s on 2 cores.
"""

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tip_verl.verl_adapter.console_metrics import parse_console_metrics

REPO = Path(__file__).resolve().parents[2]
MARKER_ENV = "TIP_VERL_E2E_RUN"


def _processes_with_marker(marker: str) -> list[str]:
    """Live processes whose environment carries ``marker`` (everything the run started inherits it)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            if p.environ().get(MARKER_ENV) == marker:
                found.append(f"{p.info['pid']}: {' '.join(p.info['cmdline'] or [])[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def run_example(script: str, args: list[str], assets, tmp_path, *, expect_ok: bool = True,
                env_extra: dict[str, str] | None = None):
    """Run an example script as a user would; return its output, per-step metrics and wall time.

    ``env_extra``: more environment (e.g. ``N_WORKERS``). Also checks that the run left no process behind
    (Ray, TransferQueue, rollout servers).
    """
    env = dict(os.environ)
    env.pop("VERL_PLATFORM", None)  # the script sets the CPU environment itself
    marker = uuid.uuid4().hex
    env.update(PYTHON=sys.executable, ASSETS_DIR=str(assets.root), RUN_DIR=str(tmp_path), **{MARKER_ENV: marker})
    env.update(env_extra or {})
    t0 = time.time()
    proc = subprocess.run(["bash", str(REPO / "examples" / "cpu" / script), *args], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == expect_ok, out[-6000:]
    # Ray (raylet, GCS, workers), TransferQueue and the rollout server are gone once the driver exits
    deadline = time.time() + 30
    leftovers = _processes_with_marker(marker)
    while leftovers and time.time() < deadline:
        time.sleep(1)
        leftovers = _processes_with_marker(marker)
    assert not leftovers, leftovers
    return out, parse_console_metrics(out), wall


def summary_of(out: str, tag: str) -> str:
    return [line for line in out.splitlines() if line.startswith(f"[{tag}] ")][-1]


@pytest.mark.slow
def test_main_ppo_grpo_two_steps_on_cpu(tiny_assets, tmp_path):
    out, steps, wall = run_example("run_tiny_grpo.sh", ["trainer.total_training_steps=2"], tiny_assets, tmp_path)
    # verl's console logger printed the metrics of both steps
    assert set(steps) == {1, 2}, out[-4000:]
    for step, metrics in steps.items():
        for key in ("actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/grad_norm", "critic/score/mean",
                    "response_length/mean", "timing_s/gen", "timing_s/update_actor", "timing_s/update_weights"):
            assert key in metrics, (step, key, sorted(metrics))
        assert metrics["training/global_step"] == step
        assert 1 <= metrics["response_length/max"] <= 48  # data.max_response_length=48
        assert 0.0 <= metrics["critic/score/mean"] <= 1.0
        # the hf rollout's log-probs are the actor's, in float32, also after the step-1 weight sync
        assert metrics["training/rollout_probs_diff_max"] < 1e-4, metrics["training/rollout_probs_diff_max"]
    # the hf rollout served the generations, and the example printed its summary line
    assert "LLMServerManager: ['hf-rollout-0-" in out
    summary = summary_of(out, "run_tiny_grpo")
    assert summary.startswith("[run_tiny_grpo] OK: 2 step(s) with metrics; last step 2:"), summary
    assert wall < 600, wall

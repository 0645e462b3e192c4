"""End to end: verl's real trainer (``python -m verl.trainer.main_ppo``, V1) on the CPU, 2 GRPO steps.

Runs ``examples/cpu/run_tiny_grpo.sh`` (which launches ``main_ppo`` with the shared CPU overrides of
``tip_verl.verl_adapter.cpu_overrides``) as a subprocess on the tiny assets and parses verl's console
logger output (``step:N - key:value - ...``). About 1.5-2 minutes on 2 cores.
"""

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "cpu" / "run_tiny_grpo.sh"
MARKER_ENV = "TIP_VERL_E2E_RUN"


def parse_console_metrics(text: str) -> dict[int, dict[str, float]]:
    steps: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        m = re.search(r"\bstep:(\d+) - (.*)$", line)
        if not m:
            continue
        metrics = {}
        for kv in m.group(2).strip().split(" - "):
            key, _, value = kv.partition(":")
            num = re.sub(r"^np\.\w+\((.*)\)$", r"\1", value.strip())
            try:
                metrics[key] = float(num)
            except ValueError:
                pass
        steps[int(m.group(1))] = metrics
    return steps


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


@pytest.mark.slow
def test_main_ppo_grpo_two_steps_on_cpu(tiny_assets, tmp_path):
    env = dict(os.environ)
    env.pop("VERL_PLATFORM", None)  # the script sets the CPU environment itself
    marker = uuid.uuid4().hex
    env.update(PYTHON=sys.executable, ASSETS_DIR=str(tiny_assets.root), RUN_DIR=str(tmp_path), **{MARKER_ENV: marker})
    t0 = time.time()
    proc = subprocess.run(
        ["bash", str(SCRIPT), "trainer.total_training_steps=2"],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.time() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    # verl's console logger printed the metrics of both steps
    steps = parse_console_metrics(out)
    assert set(steps) == {1, 2}, out[-4000:]
    for step, metrics in steps.items():
        for key in ("actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/grad_norm", "critic/score/mean",
                    "response_length/mean", "timing_s/gen", "timing_s/update_actor", "timing_s/update_weights"):
            assert key in metrics, (step, key, sorted(metrics))
        assert metrics["training/global_step"] == step
        assert 1 <= metrics["response_length/max"] <= 8  # data.max_response_length=8
        assert 0.0 <= metrics["critic/score/mean"] <= 1.0
        # the hf rollout's log-probs are the actor's, in float32, also after the step-1 weight sync
        assert metrics["training/rollout_probs_diff_max"] < 1e-4, metrics["training/rollout_probs_diff_max"]
    # the hf rollout served the generations, and the example printed its summary line
    assert "LLMServerManager: ['hf-rollout-0-" in out
    summary = [line for line in out.splitlines() if line.startswith("[run_tiny_grpo] ")][-1]
    assert summary.startswith("[run_tiny_grpo] OK: 2 step(s) with metrics; last step 2:"), summary
    assert wall < 600, wall

    # Ray (raylet, GCS, workers), TransferQueue and the rollout server are gone once the driver exits
    deadline = time.time() + 30
    leftovers = _processes_with_marker(marker)
    while leftovers and time.time() < deadline:
        time.sleep(1)
        leftovers = _processes_with_marker(marker)
    assert not leftovers, leftovers

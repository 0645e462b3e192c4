"""End to end: scripts/toy_study.py runs OPD with TIP through verl's real trainer and writes its tables and plot.

A 2-method, 2-step, 1-seed version of the study (all tokens vs Soft-OR 50%), about 3 minutes on 2 cores.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_toy_study_two_methods_two_steps(tiny_assets, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    env = dict(os.environ, ASSETS_DIR=str(tiny_assets.root))
    env.pop("VERL_PLATFORM", None)  # the recipe sets the CPU environment itself
    cmd = [sys.executable, str(REPO / "scripts" / "toy_study.py"), "--methods", "all,soft_or_50", "--seeds", "0",
           "--steps", "2", "--batch-size", "4", "--rollout-n", "2", "--val-n", "1",
           "--out", str(out), "--logs", str(logs)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    # progress: one line per run started and finished, with an ETA, and the up-front estimate
    assert "estimated total:" in text
    assert text.count("] start  ") == 2 and text.count("] done   ") == 2, text[-3000:]

    for name in ("results.csv", "results.md", "toy_study.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "toy_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"all", "soft_or_50"}
    for r in rows.values():
        for key in ("acc_before_mean", "acc_after_mean"):
            assert 0.0 <= float(r[key]) <= 1.0, (r["method"], key, r[key])
        assert float(r["tokens_trained_mean"]) > 0
        assert r["seeds"] == "0" and r["n_seeds"] == "1"
    # all tokens vs about half of them (per batch), over the same number of steps
    assert float(rows["soft_or_50"]["tokens_trained_mean"]) < float(rows["all"]["tokens_trained_mean"])
    assert float(rows["all"]["kept_fraction_mean"]) == pytest.approx(1.0)
    assert 0.3 <= float(rows["soft_or_50"]["kept_fraction_mean"]) <= 0.6

    md = (out / "results.md").read_text()
    assert "| all | 1.00 | 0 |" in md and "| soft_or 50% | 0.50 | 0 |" in md, md
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert runs == ["all_seed0.json", "soft_or_50_seed0.json"]
    raw = json.loads((out / "runs" / "soft_or_50_seed0.json").read_text())
    assert raw["acc_key"] == "val-core/tip_tiny_addition/acc/mean@1"
    assert set(raw["steps"]) == {"0", "1", "2"}
    assert "tip.method=soft_or" in raw["overrides"] and "+tip.selection_scope=batch" in raw["overrides"]
    assert Path(raw["log"]).is_file() and str(logs) in raw["log"]  # per-run logs stay outside --out


@pytest.mark.slow
def test_toy_study_failed_run_names_its_log(tiny_assets, tmp_path):
    """A run that fails (here: a bad tip flag, stopped at start-up) ends the study with the log's path."""
    env = dict(os.environ, ASSETS_DIR=str(tiny_assets.root))
    env.pop("VERL_PLATFORM", None)
    cmd = [sys.executable, str(REPO / "scripts" / "toy_study.py"), "--methods", "all", "--seeds", "0",
           "--steps", "1", "--out", str(tmp_path / "out"), "--logs", str(tmp_path / "logs"),
           "--extra", "+tip.divergance=k1"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = tmp_path / "logs" / "all_seed0" / "run.log"
    assert "FAILED all_seed0: exit status" in proc.stderr and f"log: {log}" in proc.stderr, proc.stderr[-3000:]
    assert "Unknown flag +tip.divergance" in log.read_text()

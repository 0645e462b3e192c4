"""scripts/ CLIs end a user error (bad value, unwritable output folder, missing input) with one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _user_error(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if f"{script}: error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("args, expected", [
    (["--out", "/proc/no/such"], "--out /proc/no/such: not a writable folder"),
    (["--out", "{tmp}/ok", "--logs", "/proc/no/such"], "--logs /proc/no/such: not a writable folder"),
    (["--from-raw", "{tmp}/missing"], "no runs/*.json there"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_toy_study_user_errors(tmp_path, args, expected):
    assert expected in _user_error("toy_study.py", *[a.format(tmp=tmp_path) for a in args])


def test_bench_memory_user_errors(tmp_path):
    assert "--out '/proc/no/such' is not a writable folder" in _user_error("bench_memory.py", "--out", "/proc/no/such")
    missing = str(tmp_path / "raw.json")
    assert f"--from-raw '{missing}': No such file or directory" in _user_error(
        "bench_memory.py", "--from-raw", missing, "--out", str(tmp_path))
    assert "--ratios must be comma-separated numbers in (0, 1], got '0.5,2'" in _user_error(
        "bench_memory.py", "--ratios", "0.5,2", "--out", str(tmp_path))

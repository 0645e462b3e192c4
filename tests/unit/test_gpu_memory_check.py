"""scripts/gpu_memory_check.py in its CI mode (--device cpu --tiny): output sane, exactness passes, no verl."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_memory_check.py"

#: runs the script in-process and reports whether anything imported verl or vllm
WRAPPER = textwrap.dedent("""
    import json, runpy, sys
    sys.argv = [{script!r}] + {args!r}
    code = 0
    try:
        runpy.run_path({script!r}, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("verl", "vllm") or m.startswith("tip_verl.verl_adapter"))
    print("WRAPPER " + json.dumps({{"code": code, "heavy": heavy}}))
""")


def _run(args, timeout=900):
    proc = subprocess.run([sys.executable, "-c", WRAPPER.format(script=str(SCRIPT), args=list(args))],
                          capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRAPPER ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(line[len("WRAPPER "):]), proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gmc")
    info, proc = _run(["--device", "cpu", "--tiny", "--out", str(out)])
    return out, info, proc


def test_tiny_cpu_run_writes_sane_json_and_table(tiny_run):
    out, info, proc = tiny_run
    assert info["code"] in (0, None), proc.stderr[-4000:]
    assert info["heavy"] == [], f"gpu_memory_check imported {info['heavy']}"
    report = json.loads((out / "gpu_memory_check.json").read_text())
    assert report["tiny"] is True and report["dtype"] == "bfloat16"
    rows = report["rows"]
    assert [(r["path"], r["ratio"]) for r in rows] == [(p, r) for r in (1.0, 0.5, 0.2) for p in ("full", "kept_rows")]
    b = report["batch"]
    for r in rows:
        assert r["oom"] is False
        assert r["kept_tokens"] == b["sequences"] * max(1, round(r["ratio"] * b["response"]))
        assert r["peak_bytes"] >= r["before_bytes"] > 0 and r["step_delta_bytes"] >= 0
        assert r["wall_s"] > 0 and r["cpu_s"] >= 0
        assert r["loss"] > 0  # mean negative log-prob of random tokens under a random model
    # the two paths compute the same loss on the same batch (bf16 model: loose tolerance)
    for ratio in (1.0, 0.5, 0.2):
        full, kept = (next(r for r in rows if r["path"] == p and r["ratio"] == ratio) for p in ("full", "kept_rows"))
        assert abs(full["loss"] - kept["loss"]) <= 0.02 * full["loss"], (ratio, full["loss"], kept["loss"])
    ex = report["exactness"]
    assert ex["passed"] is True and ex["chunks"] >= 3 and ex["kept_rows"] % ex["chunk_rows"] != 0
    assert ex["parameters_compared"] > 10 and ex["loss_abs_diff"] < 1e-4
    table = (out / "gpu_memory_check.md").read_text()
    assert table.count("| kept_rows |") == 3 and table.count("| full |") == 3 and "PASSED" in table


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu", "--tiny", "--ratios", "1.5"], "--ratios must be in (0, 1]"),
    (["--device", "cpu", "--tiny", "--ratios", "a,b"], "--ratios must be comma-separated numbers"),
    (["--device", "cpu", "--tiny", "--sequences", "0"], "--sequences must be >= 1"),
    (["--device", "cpu", "--tiny", "--out", "/proc/gpu_memory_check_out"], "is not writable"),
    (["--device", "tpu9", "--tiny"], "--device"),
])
def test_bad_arguments_fail_with_one_line_and_exit_2(args, message):
    info, proc = _run(args, timeout=300)
    assert info["code"] == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("gpu_memory_check.py: error: ") and message in err[0], proc.stderr

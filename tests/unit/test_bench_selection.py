"""scripts/bench_selection.py --tiny: every TIP rule timed, JSON and table sane, bad arguments exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_selection.py"


def test_tiny_run_times_every_rule(tmp_path):
    out = tmp_path / "sel.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--ratio", "0.25", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert (report["batch"], report["seq"], report["repeats"], report["tiny"]) == (4, 64, 1, True)
    methods = {r["config"]["method"] for r in report["rows"] if r["kind"] == "select_for_batch"}
    assert methods == {"all", "entropy", "entropy_sample", "soft_or", "q3", "divergence", "random"}
    valid = report["valid_tokens"]
    assert 0 < valid <= 4 * 64
    for r in report["rows"]:
        assert len(r["wall_ms"]) == len(r["cpu_ms"]) == 1 and r["wall_ms_median"] > 0 and r["cpu_ms_median"] >= 0
        if r["case"] == "all":
            assert r["kept_tokens"] == valid
        elif "poisson" not in r["case"]:  # top-rho rules keep ceil/round(rho * n) per sequence: about a quarter
            assert 0.15 * valid <= r["kept_tokens"] <= 0.35 * valid, r
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ") == len(report["rows"]) + 1  # header + one line per case
    out.with_suffix(".md").unlink()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--from-raw", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and out.with_suffix(".md").read_text() == table


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    for args, message in ((["--tiny", "--ratio", "0"], "--ratio"), (["--tiny", "--batch", "0"], "--batch"),
                          (["--tiny", "--out", "/proc/nope/sel.json"], "not writable")):
        proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, proc.stderr)

"""The committed memory comparison (issue 12) is rebuilt from its raw JSON by one command, unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RAW = ROOT / "docs" / "bench" / "bench_memory_compare_raw.json"
TABLE = ROOT / "docs" / "bench" / "bench_memory_compare.md"


def test_from_raw_rebuilds_the_committed_table(tmp_path):
    raw = json.loads(RAW.read_text())
    measured = {(r["config"], r["ratio"]) for r in raw["compare"] if r["config"] != "floor"}
    ratios = [float(x) for x in raw["args"]["ratios"].split(",")]
    # one complete run: both verl baselines, the floor and each tip_verl path at every ratio
    assert {c for c, _ in measured} == {"baseline", "baseline_fused", "tip", "tip_gather", "tip_fused"}
    assert {(c, r) for c in ("tip", "tip_gather", "tip_fused") for r in ratios} <= measured
    assert sum(r["config"] == "floor" for r in raw["compare"]) == 1
    for r in raw["compare"]:  # one measured run: every record has its own probes and timings
        assert r["peak_bytes"] > 0 and r["process_peak_bytes"] > r["peak_bytes"]
        assert r["memory_step"]["hwm_reset"] is True and r["seconds"] > 0 and r["cpu_seconds"] > 0
        assert r["use_fused_kernels"] == (r["config"] in ("baseline_fused", "tip_fused"))
        assert r["lm_head_chunk_rows"] == (0 if r["config"] == "tip_gather" else None)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_memory.py"), "--from-raw", str(RAW),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "bench_memory_compare.md").read_text() == TABLE.read_text()
    assert (tmp_path / "bench_memory_compare.csv").exists()

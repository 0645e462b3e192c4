"""scripts/toy_study.py's paired comparisons: seed-by-seed differences of validation gains, t-interval."""

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("toy_study", Path(__file__).resolve().parents[2] / "scripts" / "toy_study.py")
toy_study = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("toy_study", toy_study)  # its dataclasses look their module up there
_SPEC.loader.exec_module(toy_study)


def _run(method, seed, before, after):
    return {"method": method, "seed": seed, "acc_before": before, "acc_after": after}


def test_paired_rows_pair_by_seed_and_use_a_t_interval():
    results = [_run("all", 0, 0.2, 0.5), _run("all", 1, 0.3, 0.4), _run("all", 2, 0.25, 0.45),
               _run("entropy_50", 0, 0.2, 0.6), _run("entropy_50", 1, 0.3, 0.35), _run("entropy_50", 2, 0.25, 0.5),
               _run("q3_20", 0, 0.2, 0.3)]  # q3 has seed 0 only: paired on that seed alone
    rows = {r["second"] + ">" + r["first"]: r for r in toy_study.paired_rows(results)}
    a = rows["all>entropy_50"]
    assert a["seeds"] == [0, 1, 2]
    assert a["diffs"] == pytest.approx([0.1, -0.05, 0.05])
    assert a["mean"] == pytest.approx(statistics.fmean([0.1, -0.05, 0.05]))
    assert a["ci95"] == pytest.approx(4.303 * statistics.stdev([0.1, -0.05, 0.05]) / math.sqrt(3))
    assert a["first_better_seeds"] == 2
    c = rows["all>q3_20"]
    assert c["seeds"] == [0] and c["diffs"] == pytest.approx([-0.2]) and math.isnan(c["ci95"])
    assert "entropy_20>soft_or_20" not in rows  # neither rule ran: no row
    md = toy_study.paired_markdown(toy_study.paired_rows(results))
    assert "| (a) entropy top-50% ≈ all tokens | entropy_50 − all | +0.033 ± 0.190 | +0.100, -0.050, +0.050 (seeds 0 1 2) | 2 of 3 |" in md
    assert "| -0.200 | -0.200 (seeds 0) | 0 of 1 |" in md

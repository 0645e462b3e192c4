"""End to end: the README main job, OPD with TIP (soft_or, ρ=0.5) through verl's real trainer on the CPU."""

import subprocess
import sys

import pytest

from tests.e2e.test_cpu_trainer import run_example, summary_of


@pytest.mark.slow
def test_opd_with_tip_three_steps(tiny_assets, tmp_path):
    out, steps, wall = run_example(
        # one pass over each batch (the recipe makes two), so the logged loss is the step's own (Eq. 7)
        "run_tiny_opd.sh", ["trainer.total_training_steps=3", "actor_rollout_ref.actor.ppo_epochs=1",
                            "+tip.records_every=2", "+tip.records_max_rows=64"],
        tiny_assets, tmp_path,
    )
    # step 0: verl's validation before training; 1-3: training, validated again after step 3
    assert set(steps) == {0, 1, 2, 3}, out[-4000:]
    assert "OPD with TIP, teacher=" in out
    for step, m in steps.items():
        if step == 0:
            continue
        # about half of the response tokens kept (floor per sequence, at least one each)
        assert 0.3 <= m["tip/kept_fraction"] <= 0.55, (step, m["tip/kept_fraction"])
        assert m["tip/kept_count"] >= 1
        for family in ("share", "kept_share", "divergence_share"):
            total = sum(m[f"tip/q{i}_{family}"] for i in range(1, 5))
            assert total == pytest.approx(1.0, abs=1e-6), (step, family, total)
        # the recipe's loss: the exact reverse KL at kept tokens (teacher top-k with k = |V|)
        assert m["actor/tip_topk_reverse_kl_loss"] == pytest.approx(m["tip/kept_topk_reverse_kl_mean"], rel=1e-3)
        for key in ("actor/grad_norm", "tip/entropy_mean", "tip/divergence_mean",
                    "tip/score_threshold", "tip/reverse_kl_mean", "tip/topk_reverse_kl_mean"):
            assert key in m and m[key] == m[key] and abs(m[key]) < 1e6, (step, key, m.get(key))
        assert "actor/kl_loss" not in m  # no KL-to-ref loss: the ref is the teacher
    # Step 1 scores the initial student's own rollouts: a ref built from the student would give
    # identical log-probs (divergence exactly 0). The teacher disagrees.
    assert steps[1]["tip/divergence_mean"] > 1e-3
    assert abs(steps[1]["tip/reverse_kl_mean"]) > 1e-3
    summary = [line for line in out.splitlines() if line.startswith("[run_tiny_opd] OK:")][-1]
    assert summary.startswith("[run_tiny_opd] OK: 3 step(s) with metrics; last step 3:"), summary
    assert "tip/kept_fraction=" in summary
    # the last line says what the run did to the student, from verl's validations before and after
    learned = summary_of(out, "run_tiny_opd")
    before = steps[0]["val-core/tip_tiny_addition/acc/mean@4"]
    after = steps[3]["val-core/tip_tiny_addition/acc/mean@4"]
    assert learned.startswith(f"[run_tiny_opd] accuracy {before:.2f} -> {after:.2f} ({after - before:+.2f};"), learned
    assert " in 3 steps, trained on " in learned and "% of response tokens" in learned, learned
    assert wall < 600, wall

    # token records of step 2 (records_every=2), readable by the report tool
    records_dir = tmp_path / "checkpoints" / "tip_records"
    from tip_verl.analysis.records import read_records

    rows = read_records(records_dir)
    assert set(rows["step"]) == {2} and 0 < len(rows) <= 64
    assert rows["kept"].any() and set(rows["quadrant"]) <= {1, 2, 3, 4}
    report = subprocess.run([sys.executable, "-m", "tip_verl.analysis.cli", str(records_dir), "--tokenizer",
                             str(tiny_assets.student), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert sorted(p.name for p in (records_dir / "report").glob("*.png"))


@pytest.mark.slow
def test_bad_tip_flag_fails_at_start_before_any_model_loads(tiny_assets, tmp_path):
    # no "+": the script already sets +tip.ratio
    out, steps, _ = run_example("run_tiny_opd.sh", ["tip.ratio=0"], tiny_assets, tmp_path, expect_ok=False)
    assert "TIPConfig.ratio=0.0 is invalid: must be in (0, 1]" in out, out[-3000:]
    assert not steps
    assert "Before FSDP" not in out  # verl's engine never started building a model

"""End to end, verl's real trainer on the CPU, 2 steps of Soft-OR ρ=0.5 in each teacher path:

* the reference model as teacher with the top-k signal and the direct top-k reverse-KL loss;
* verl's native distillation teacher server (the hf server on the CPU) with TIP masking verl's
  k1 policy-gradient distillation loss, and with its top-k ``forward_kl_topk`` loss.
"""

import pytest

from tests.e2e.test_cpu_trainer import run_example


def _check_selection(steps):
    assert set(steps) == {1, 2}
    for step, m in steps.items():
        assert 0.3 <= m["tip/kept_fraction"] <= 0.55, (step, m["tip/kept_fraction"])
        for family in ("share", "kept_share"):
            assert sum(m[f"tip/q{i}_{family}"] for i in range(1, 5)) == pytest.approx(1.0, abs=1e-6)
        assert m["tip/divergence_mean"] > 1e-3  # the teacher disagrees with the initial student


@pytest.mark.slow
def test_ref_teacher_topk_signal_with_direct_topk_loss(tiny_assets, tmp_path):
    out, steps, _ = run_example(
        "run_tiny_opd.sh",
        # the recipe already sets the top-k signal (k = |V|) and the direct loss: here a true top-k, k=16
        ["trainer.total_training_steps=2", "trainer.val_before_train=False", "tip.topk_k=16",
         "actor_rollout_ref.actor.ppo_epochs=1",  # the logged loss is then the step's own (Eq. 7)
         "+tip.records_every=2", "+tip.records_max_rows=32"],
        tiny_assets, tmp_path,
    )
    _check_selection(steps)
    for step, m in steps.items():
        # δ is the top-k reverse KL; the actor's loss is its mean over the kept tokens (Eq. 7)
        assert m["tip/divergence_mean"] == pytest.approx(m["tip/topk_reverse_kl_mean"])
        assert m["actor/tip_topk_reverse_kl_loss"] == pytest.approx(m["tip/kept_topk_reverse_kl_mean"], rel=1e-3)
        assert m["tip/topk_forward_kl_mean"] > 0
        assert "actor/pg_loss" not in m
    assert "teacher_signal': 'topk'" in out
    # token records carry the forward KL and both models' top choices (Appendix B.4 view)
    from tip_verl.analysis.records import read_records

    rows = read_records(tmp_path / "checkpoints" / "tip_records")
    assert set(rows["step"]) == {2} and len(rows) > 0
    for column in ("forward_divergence", "teacher_top_id", "teacher_top_prob", "student_top_id", "student_top_prob"):
        assert rows[column].notna().all(), column
    assert rows["teacher_top_prob"].between(0, 1).all() and rows["student_top_prob"].between(0, 1).all()


@pytest.mark.slow
def test_native_teacher_server_k1_policy_gradient(tiny_assets, tmp_path):
    out, steps, _ = run_example("run_tiny_opd_server.sh", ["trainer.total_training_steps=2"], tiny_assets, tmp_path)
    _check_selection(steps)
    for step, m in steps.items():
        # verl's own k1 distillation loss, averaged over the kept tokens only
        assert m["actor/distillation/loss"] == pytest.approx(m["tip/kept_reverse_kl_mean"], rel=1e-4)
    assert "teacher=verl distillation teacher server" in out


@pytest.mark.slow
def test_native_teacher_server_forward_kl_topk(tiny_assets, tmp_path):
    out, steps, _ = run_example(
        "run_tiny_opd_server.sh",
        ["trainer.total_training_steps=2", "distillation.distillation_loss.loss_mode=forward_kl_topk",
         "distillation.distillation_loss.use_policy_gradient=False", "distillation.distillation_loss.topk=16"],
        tiny_assets, tmp_path,
    )
    _check_selection(steps)
    for step, m in steps.items():
        # the server's top-k drives δ (top-k reverse KL, the student's log-probs gathered at its ids)
        assert m["tip/divergence_mean"] == pytest.approx(m["tip/topk_reverse_kl_mean"])
        assert m["tip/topk_forward_kl_mean"] > 0
        assert m["actor/distillation/loss"] > 0
    assert "'topk_k': 16" in out

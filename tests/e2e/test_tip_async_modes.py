"""End to end: TIP in verl's asynchronous V1 trainers through the real ``main_ppo`` on the CPU (issue 13).

* ``tip_colocate_async``: rollout and training on the same worker, one batch generated ahead
  (``num_warmup_batches=1``), requests cut by a weight update continued on the new weights;
* ``tip_separate_async``: generation on its own resource pool (one more CPU worker, the standalone hf replica),
  the weights sent there by the ``tip_gloo`` checkpoint engine, two local updates per step
  (``parameter_sync_step=2``) with pi_old restored from the CPU for the second one.

Both with the ref as teacher, the teacher's top-k signal and verl's own PPO loss (``+tip.loss=pg``: importance
ratio and clipping) on the keep-mask, 2 steps of 8 prompts x 2 responses (4 x 2 per update in separate_async).
Checked from verl's console metrics and the sparse lm_head probe (tests/e2e/rank_probe, as in the two-rank tests):
kept fraction about rho, quadrant shares summing to 1, the sparse lm_head projecting exactly the kept tokens of each
update, the loss finite (on-policy update: equal to the kept tokens' mean reverse KL, no clipping), and
``tip/staleness_*`` equal to verl's ``training/off_policy/trajectory_staleness*`` with an off-policy batch in step 2.
The start-up errors of the async modes are in tests/e2e/test_startup_errors.py.
"""

from __future__ import annotations

import os

import pytest

from tests.e2e.test_cpu_trainer import run_example
from tests.e2e.test_tip_teacher_paths import sparse_calls_per_rank, sparse_probe

#: the recipe's job, smaller: 8 prompts x 2 responses, one pass, verl's PPO loss on the TIP advantage
SMALL = ["trainer.total_training_steps=2", "trainer.val_before_train=False", "trainer.test_freq=-1",
         "data.train_batch_size=8",
         "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
         "actor_rollout_ref.actor.ppo_epochs=1", "tip.loss=pg"]
#: what tip_separate_async needs on the CPU: a rollout pool of one worker, the tip_gloo engine, 2 updates a step
SEPARATE = ["trainer.v1.trainer_mode=tip_separate_async", "actor_rollout_ref.rollout.nnodes=1",
            "actor_rollout_ref.rollout.n_gpus_per_node=1", "actor_rollout_ref.rollout.checkpoint_engine.backend=tip_gloo",
            "trainer.v1.separate_async.parameter_sync_step=2", "actor_rollout_ref.actor.ppo_mini_batch_size=4"]
STALENESS = {"tip/staleness_mean": "training/off_policy/trajectory_staleness/mean",
             "tip/staleness_max": "training/off_policy/trajectory_staleness/max",
             "tip/staleness_worst_mean": "training/off_policy/trajectory_staleness_worst/mean",
             "tip/staleness_worst_max": "training/off_policy/trajectory_staleness_worst/max"}


#: metrics that must be present and finite in each step (the default: verl's PPO loss on the TIP advantage)
PG_KEYS = ("actor/pg_loss", "actor/grad_norm", "tip/kept_reverse_kl_mean", "tip/divergence_mean")


def _check_tip_step(step: int, m: dict, finite: tuple = PG_KEYS) -> None:
    assert 0.3 <= m["tip/kept_fraction"] <= 0.55, (step, m["tip/kept_fraction"])
    for family in ("share", "kept_share", "divergence_share"):
        assert sum(m[f"tip/q{i}_{family}"] for i in range(1, 5)) == pytest.approx(1.0, abs=1e-6), (step, family)
    for key in finite:
        assert key in m and m[key] == m[key] and abs(m[key]) < 1e6, (step, key, m.get(key))
    for tip_key, verl_key in STALENESS.items():  # the same lag verl reports, per step
        assert m[tip_key] == pytest.approx(m[verl_key]), (step, tip_key, m[tip_key], m[verl_key])
    assert "actor/tip_topk_reverse_kl_loss" not in m and "actor/kl_loss" not in m


@pytest.mark.slow
def test_colocate_async_ref_teacher(tiny_assets, tmp_path):
    env, probe = sparse_probe(tmp_path)
    out, steps, wall = run_example("run_tiny_opd.sh", ["trainer.v1.trainer_mode=tip_colocate_async", *SMALL],
                                   tiny_assets, tmp_path, env_extra=env)
    print(f"\n[tip_colocate_async] wall {wall:.0f} s (load {os.getloadavg()[0]:.1f}), step times "
          f"{[round(m['timing_s/step'], 1) for m in steps.values()]}")
    assert set(steps) == {1, 2}, out[-4000:]
    assert "OPD with TIP, teacher=" in out
    calls = sparse_calls_per_rank(probe)[0]
    assert len(calls) == 2  # one update a step, one micro-batch
    for step, m in steps.items():
        _check_tip_step(step, m)
        # the update's loss mask is the keep-mask: the sparse lm_head projected exactly the kept tokens
        assert calls[step - 1]["kept_rows"] == m["tip/kept_count"] and calls[step - 1]["sequences"] == 16
        # verl recomputed pi_old with the weights it then updates: ratio 1, nothing clipped, pg_loss = kept mean
        assert m["actor/pg_loss"] == pytest.approx(m["tip/kept_reverse_kl_mean"], rel=1e-4, abs=1e-6)
        assert m["actor/pg_clipfrac"] == 0
    # one batch generated ahead: step 2 trains on responses begun by the step-0 weights
    assert steps[1]["tip/staleness_worst_max"] == 0
    assert steps[2]["tip/staleness_worst_max"] >= 1 and steps[2]["tip/stale_sequence_share"] > 0
    assert steps[2]["tip/stale_kept_share"] > 0


@pytest.mark.slow
def test_separate_async_ref_teacher_over_gloo(tiny_assets, tmp_path):
    env, probe = sparse_probe(tmp_path)
    out, steps, wall = run_example("run_tiny_opd.sh", [*SMALL, *SEPARATE], tiny_assets, tmp_path, env_extra=env)
    print(f"\n[tip_separate_async] wall {wall:.0f} s (load {os.getloadavg()[0]:.1f}), step times "
          f"{[round(m['timing_s/step'], 1) for m in steps.values()]}")
    assert set(steps) == {1, 2}, out[-4000:]
    # the weights reached the standalone rollout over tip_gloo: at start-up (step 0) and after each step
    synced = [line.split("tip_gloo: ", 1)[1] for line in out.splitlines() if "tip_gloo: rollout rank 1 received" in line]
    assert [line.split(" of step ")[1].split()[0] for line in synced] == ["0", "1", "2"], synced
    assert len({line.split(" received ")[1].split(" tensors")[0] for line in synced}) == 1  # the whole model each time
    calls = sparse_calls_per_rank(probe)[0]
    assert len(calls) == 4  # two local updates (mini-batches of 4 prompts x 2) per step
    for step, m in steps.items():
        _check_tip_step(step, m)
        pair = calls[2 * (step - 1): 2 * step]
        assert [c["sequences"] for c in pair] == [8, 8]
        # verl averages the two updates' metrics: each update projected exactly its own kept tokens
        assert sum(c["kept_rows"] for c in pair) == pytest.approx(2 * m["tip/kept_count"])
        # the first update is on-policy w.r.t. pi_old, the second starts from the first's weights (ratio != 1;
        # measured 0.991 vs 0.948 in step 2, with 1.3% of the kept tokens clipped)
        assert abs(m["actor/pg_loss"] - m["tip/kept_reverse_kl_mean"]) < 0.15 * abs(m["tip/kept_reverse_kl_mean"])
    # step 1: the recipe's lr warm-up makes the first update 0, so the second local update still has ratio 1; step 2
    # trains on responses of the initial weights (staleness 1) against pi_old = the weights after step 1
    assert steps[1]["actor/pg_clipfrac"] == 0 and steps[1]["actor/pg_loss"] == pytest.approx(
        steps[1]["tip/kept_reverse_kl_mean"], rel=1e-4, abs=1e-6)
    assert steps[2]["tip/staleness_worst_max"] >= 1


@pytest.mark.slow
def test_colocate_async_teacher_server_forward_kl_topk(tiny_assets, tmp_path):
    """The other teacher path: verl's distillation teacher server (the hf server on the CPU) in tip_colocate_async,
    TIP masking verl's top-k ``forward_kl_topk`` loss (run_tiny_opd_server.sh: 4 prompts x 2, one update); the
    server's top-k (k=16) is TIP's signal."""
    env, probe = sparse_probe(tmp_path)
    out, steps, wall = run_example(
        "run_tiny_opd_server.sh",
        ["trainer.v1.trainer_mode=tip_colocate_async", "trainer.total_training_steps=2",
         "distillation.distillation_loss.loss_mode=forward_kl_topk",
         "distillation.distillation_loss.use_policy_gradient=False", "distillation.distillation_loss.topk=16"],
        tiny_assets, tmp_path, env_extra=env)
    print(f"\n[tip_colocate_async, teacher server] wall {wall:.0f} s (load {os.getloadavg()[0]:.1f})")
    assert set(steps) == {1, 2}, out[-4000:]
    assert "teacher=verl distillation teacher server" in out and "'topk_k': 16" in out
    # verl's top-k loss reads the student's full logits: the sparse lm_head steps aside, saying why (documented)
    assert sparse_calls_per_rank(probe) == {} and "top-K distillation needs the full student logits" in out
    for step, m in steps.items():
        _check_tip_step(step, m, finite=("actor/distillation/loss", "tip/kept_topk_reverse_kl_mean",
                                         "tip/topk_forward_kl_mean", "tip/divergence_mean"))
        # the server's top-k drives δ (top-k reverse KL, the student's log-probs gathered at its ids)
        assert m["tip/divergence_mean"] == pytest.approx(m["tip/topk_reverse_kl_mean"])
        assert m["tip/topk_forward_kl_mean"] > 0
        assert m["actor/distillation/loss"] > 0  # verl's forward KL over the top-k, on kept tokens
    assert steps[1]["tip/staleness_worst_max"] == 0
    assert steps[2]["tip/staleness_worst_max"] >= 1 and steps[2]["tip/stale_kept_share"] > 0

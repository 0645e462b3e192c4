"""End to end, verl's real trainer on the CPU, 2 steps of Soft-OR ρ=0.5 in each teacher path:

* the reference model as teacher with the top-k signal and the direct top-k reverse-KL loss, on two
  data-parallel worker ranks (``N_WORKERS=2``: FSDP2 over two processes, as a GPU job shards over GPUs);
* verl's native distillation teacher server (the hf server on the CPU) with TIP masking verl's
  k1 policy-gradient distillation loss on two ranks (its top-k ``forward_kl_topk`` loss: in
  tests/e2e/test_tip_async_modes.py, with tip_colocate_async).

The one-rank ref-as-teacher path is the main job's test (tests/e2e/test_tip_opd_trainer.py). On two ranks the
runs check that the sparse lm_head ran on both ranks (a record per rank and update call from the test
probe ``tests/e2e/rank_probe/sitecustomize.py``), that the ranks' kept rows add up to the step's kept tokens,
and that the logged loss is the mean over the kept tokens of the whole batch, not of one rank's share.
"""

import json
import os
from pathlib import Path

import pytest

from tests.e2e.test_cpu_trainer import run_example

RANK_PROBE = Path(__file__).resolve().parent / "rank_probe"


def sparse_probe(tmp_path) -> tuple[dict[str, str], Path]:
    """Environment of a run with the per-rank sparse lm_head probe (a record per kept-rows call), and its folder."""
    probe = tmp_path / "rank_probe"
    probe.mkdir()
    path = [str(RANK_PROBE), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"TIP_VERL_E2E_PROBE_DIR": str(probe), "PYTHONPATH": os.pathsep.join(path)}, probe


def two_ranks(tmp_path) -> tuple[dict[str, str], Path]:
    """Environment of a two-rank run of the recipe (``N_WORKERS=2``) with the per-rank sparse lm_head probe."""
    env, probe = sparse_probe(tmp_path)
    return {"N_WORKERS": "2", **env}, probe


def sparse_calls_per_rank(probe: Path) -> dict[int, list[dict]]:
    """The probe's records: every call of the sparse lm_head's kept-rows branch, per rank, in order."""
    calls: dict[int, list[dict]] = {}
    for f in sorted(probe.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            record = json.loads(line)
            calls.setdefault(record["rank"], []).append(record)
    return calls


def check_two_ranks(out: str, steps: dict, probe: Path, tag: str, loss_key: str, kept_mean_key: str,
                    sequences_per_step: int) -> dict[int, list[dict]]:
    """Both ranks ran the sparse lm_head on their own share; the loss is the whole batch's kept-token mean."""
    assert f"[{tag}] worker ranks: 2 (" in out, out[-3000:]
    calls = sparse_calls_per_rank(probe)
    assert set(calls) == {0, 1}, calls
    assert len({calls[r][0]["pid"] for r in (0, 1)}) == 2  # two worker processes
    for rank, records in calls.items():
        assert all(r["world"] == 2 for r in records)
        # one update micro-batch per rank and step (ppo_epochs=1, micro-batch = the rank's share)
        assert len(records) == len(steps), (rank, records)
        assert all(0 < r["kept_rows"] < r["packed_rows"] for r in records), records
    for step, m in steps.items():
        share = [calls[rank][step - 1] for rank in (0, 1)]
        # each rank projected only its own kept rows; together, the step's kept tokens
        assert sum(r["sequences"] for r in share) == sequences_per_step
        assert sum(r["kept_rows"] for r in share) == m["tip/kept_count"], (step, share, m["tip/kept_count"])
        # the logged loss: the mean over the kept tokens of the whole batch (the driver's figure), not one share's
        assert m[loss_key] == pytest.approx(m[kept_mean_key], rel=1e-4), (step, m[loss_key], m[kept_mean_key])
        print(f"\n[{tag}, 2 ranks] step {step}: {loss_key}={m[loss_key]:.7f}, {kept_mean_key}={m[kept_mean_key]:.7f}, "
              f"kept rows per rank {[r['kept_rows'] for r in share]} of {m['tip/kept_count']:.0f}")
    return calls


def _check_selection(steps):
    assert set(steps) == {1, 2}
    for step, m in steps.items():
        assert 0.3 <= m["tip/kept_fraction"] <= 0.55, (step, m["tip/kept_fraction"])
        for family in ("share", "kept_share"):
            assert sum(m[f"tip/q{i}_{family}"] for i in range(1, 5)) == pytest.approx(1.0, abs=1e-6)
        assert m["tip/divergence_mean"] > 1e-3  # the teacher disagrees with the initial student


@pytest.mark.slow
def test_ref_teacher_topk_signal_with_direct_topk_loss_on_two_ranks(tiny_assets, tmp_path):
    env, probe = two_ranks(tmp_path)
    out, steps, wall = run_example(
        "run_tiny_opd.sh",
        # the recipe already sets the top-k signal (k = |V|) and the direct loss: here a true top-k, k=16
        ["trainer.total_training_steps=2", "trainer.val_before_train=False", "tip.topk_k=16",
         "actor_rollout_ref.actor.ppo_epochs=1",  # the logged loss is then the step's own (Eq. 7)
         "+tip.records_every=2", "+tip.records_max_rows=32"],
        tiny_assets, tmp_path, env_extra=env,
    )
    _check_selection(steps)
    # 32 prompts x 4 responses: 64 sequences per rank, the recipe's micro-batches of 128 derived down to 64
    assert "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=64" in out
    check_two_ranks(out, steps, probe, "run_tiny_opd", "actor/tip_topk_reverse_kl_loss",
                    "tip/kept_topk_reverse_kl_mean", sequences_per_step=128)
    print(f"[run_tiny_opd, 2 ranks] wall {wall:.0f} s (load {os.getloadavg()[0]:.1f})")
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
def test_native_teacher_server_k1_policy_gradient_on_two_ranks(tiny_assets, tmp_path):
    env, probe = two_ranks(tmp_path)
    out, steps, wall = run_example("run_tiny_opd_server.sh", ["trainer.total_training_steps=2"], tiny_assets,
                                   tmp_path, env_extra=env)
    _check_selection(steps)
    # verl's own k1 distillation loss, averaged over the kept tokens of the whole batch (4 prompts x 2 responses)
    check_two_ranks(out, steps, probe, "run_tiny_opd_server", "actor/distillation/loss", "tip/kept_reverse_kl_mean",
                    sequences_per_step=8)
    assert "teacher=verl distillation teacher server" in out
    print(f"[run_tiny_opd_server, 2 ranks] wall {wall:.0f} s (load {os.getloadavg()[0]:.1f})")

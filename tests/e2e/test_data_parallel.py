"""The data-parallel layout does not change TIP: on one fixed batch (no rollout), a worker group of two ranks
selects the same tokens and makes the same update as one rank.

verl's actor and teacher-as-ref workers (``TIPActorRolloutRefWorker``, the sparse lm_head in the update) are
built with :func:`tip_verl.verl_adapter.local_workers.build_local_workers` in fresh processes: one world of one
rank, and one world of two ranks (FSDP2 shards the student over them; gloo). Each rank gets its contiguous share
of the batch, as verl's dispatch sends it; the ranks' log-prob, entropy and teacher outputs are gathered and the
driver's OPD step (:func:`~tip_verl.verl_adapter.opd.opd_step`, Soft-OR ρ = 0.5) picks the kept tokens on the
whole batch; each rank then updates on its share of the masked batch (token-mean over the kept tokens of the
whole mini-batch, several micro-batches per rank). The keep-mask, the advantages, the loss, the gradient norm and
the updated weights must match. The responses have different lengths, so the two shares hold different numbers of
kept tokens and a per-rank mean would differ from the whole batch's.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

pytestmark = pytest.mark.slow

# 8 sequences: 4 per rank on two ranks, micro-batches of 2 (two per rank, four on one rank)
PROMPTS = ["What is 12 + 7?", "What is 305 + 41?", "What is 9 + 9?", "What is 100 + 250?",
           "What is 58 + 67?", "What is 4 + 3?", "What is 999 + 1?", "What is 23 + 48?"]
RESPONSES = ["2+7+0=9\n1+0+0=1\n19", "5+1+0=6\n0+4+0=4\n3+0+0=3\n346", "9+9+0=18\n18", "0+0+0=0\n250",
             "8+7+0=15\n5+6+1=12\n125", "7", "9+1+0=10\n9+0+1=10\n9+0+1=10\n1000", "3+8+0=11\n2+4+1=7\n71"]
MICRO = 2
# plain SGD, lr 1, no weight decay: the weight update is minus the (clipped) gradient itself, so comparing
# updates compares gradients (AdamW's first step, about lr * sign(g), would amplify float32 noise in tiny g)
OPTIM = ["actor_rollout_ref.actor.optim.optimizer=SGD", "actor_rollout_ref.actor.optim.lr=1.0",
         "actor_rollout_ref.actor.optim.weight_decay=0"]


def _rank_job(rank: int, world: int, student: str, teacher: str) -> dict:
    """One rank: its share through the log-prob and teacher passes, the OPD step on the gathered batch, the update."""
    torch.manual_seed(0)
    from tip_verl.verl_adapter.local_workers import all_gather_rows, build_local_workers, rank_share
    from tip_verl.verl_adapter.opd import opd_step
    from tip_verl.verl_adapter.opd_config import TIPRunConfig

    t0 = time.time()
    w = build_local_workers(student, ref_model_path=teacher, check=False, overrides=[
        f"trainer.n_gpus_per_node={world}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={MICRO}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={MICRO}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={MICRO}",
        *OPTIM,
    ])
    built = time.time() - t0
    responses = [w.tokenizer.encode(r, add_special_tokens=False) for r in RESPONSES]
    full = w.make_batch(PROMPTS, responses=responses, max_new_tokens=max(len(r) for r in responses))
    share = rank_share(full, rank, world)
    rows = slice(rank * len(share), (rank + 1) * len(share))

    out = w.log_probs(share, entropy=True)
    log_probs, entropy = all_gather_rows(out["log_probs"]), all_gather_rows(out["entropy"])
    teacher_log_probs = all_gather_rows(w.ref_log_probs(share))
    run = TIPRunConfig.from_mapping({"teacher_path": teacher, "method": "soft_or", "ratio": 0.5})
    vocab = int(w.actor.actor.engine.model_config.hf_config.vocab_size)
    step = opd_step(run, student_logprobs=log_probs, teacher_logprobs=teacher_log_probs, entropy_nats=entropy,
                    response_mask=full["response_mask"], vocab_size=vocab, generator=torch.Generator().manual_seed(0))
    keep = step.keep_mask

    def full_weights():  # a collective under FSDP2 (every rank gathers), kept on rank 0
        params, _ = w.actor.actor.engine.get_per_tensor_param()
        gathered = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone() for n, t in params}
        return gathered if rank == 0 else None

    before = full_weights()
    # the trainer writes the keep-mask into response_mask and loss_mask (tip_verl.verl_adapter.trainer)
    masked = share.clone()
    masked["response_mask"] = keep[rows].to(share["response_mask"].dtype)
    metrics = w.update(masked, step.advantages[rows], old_log_probs=log_probs[rows], mini_batch_size=len(full),
                       micro_batch_size_per_gpu=MICRO)
    weights = full_weights()
    return {
        "keep": keep, "advantages": step.advantages, "log_probs": log_probs, "entropy": entropy,
        "teacher_log_probs": teacher_log_probs, "tip_metrics": step.metrics, "kept_in_share": int(keep[rows].sum()),
        "metrics": {k: [float(x) for x in (v if isinstance(v, list) else [v])] for k, v in metrics.items()
                    if isinstance(v, (int, float, list))},
        "weights": weights, "before": before, "seconds": {"build": built, "total": time.time() - t0},
    }


def _dp_value(per_rank: list[list[float]]) -> float:
    """verl's data-parallel reduction of a per-micro-batch loss metric: the ranks' sums, averaged over ranks
    (``Metric.aggregate_dp`` then ``reduce_metrics``): each rank's value is its share of the global token-mean
    scaled by the number of ranks."""
    return sum(sum(values) for values in per_rank) / len(per_rank)


def test_two_ranks_select_and_update_like_one(tiny_assets):
    from tip_verl.verl_adapter.local_workers import run_ranks

    student, teacher = str(tiny_assets.student), str(tiny_assets.teacher)
    t0 = time.time()
    (one,) = run_ranks(_rank_job, 1, student, teacher, timeout=600)
    t1 = time.time()
    two = run_ranks(_rank_job, 2, student, teacher, timeout=600)
    t2 = time.time()

    # the passes' outputs, gathered from the two shares, are the one rank's
    for key in ("log_probs", "entropy", "teacher_log_probs"):
        for r in (0, 1):
            torch.testing.assert_close(two[r][key], one[key], rtol=1e-5, atol=1e-5, msg=key)
    # the same tokens kept, the same advantages, on both ranks
    for r in (0, 1):
        assert torch.equal(two[r]["keep"], one["keep"])
        torch.testing.assert_close(two[r]["advantages"], one["advantages"], rtol=1e-5, atol=1e-5)
    kept = int(one["keep"].sum())
    shares = [two[0]["kept_in_share"], two[1]["kept_in_share"]]
    assert sum(shares) == kept == one["tip_metrics"]["tip/kept_count"] and shares[0] != shares[1], shares

    # the loss: the mean of -advantage-weighted ratio over the kept tokens of the whole mini-batch (on-policy:
    # ratio 1, pg_loss = -mean(advantage) = tip/kept_reverse_kl_mean), on one rank and on two
    one_loss = sum(one["metrics"]["actor/pg_loss"])
    two_loss = _dp_value([two[0]["metrics"]["actor/pg_loss"], two[1]["metrics"]["actor/pg_loss"]])
    kept_mean = one["tip_metrics"]["tip/kept_reverse_kl_mean"]
    assert one_loss == pytest.approx(kept_mean, rel=1e-5)
    assert two_loss == pytest.approx(kept_mean, rel=1e-5)
    # ... which is not the mean of the two shares' own kept means
    adv = one["advantages"]
    half = adv.shape[0] // 2
    share_means = [float(-adv[s][one["keep"][s]].mean()) for s in (slice(0, half), slice(half, None))]
    assert abs(sum(share_means) / 2 - kept_mean) > 1e-3 * abs(kept_mean), (share_means, kept_mean)
    key = "grad_norm" if "grad_norm" in one["metrics"] else "actor/grad_norm"
    grad_norm = (one["metrics"][key][0], two[0]["metrics"][key][0])
    assert grad_norm[1] == pytest.approx(grad_norm[0], rel=1e-5), grad_norm

    # the updated weights (one SGD step: minus the clipped gradient): the same within float32 reduction order
    assert set(two[0]["weights"]) == set(one["weights"])
    for run in (one, two[0]):
        assert all(torch.equal(run["before"][n], one["before"][n]) for n in one["before"])  # the same start
    step_size = max(float((one["weights"][n] - one["before"][n]).abs().max()) for n in one["weights"])
    moved = max(float((two[0]["weights"][n] - one["weights"][n]).abs().max()) for n in one["weights"])
    assert step_size > 1e-3, step_size  # the update moved the weights
    assert moved < 1e-5 * step_size, (moved, step_size)
    print(f"\n[data parallel] kept {kept} tokens ({shares} per rank), pg_loss one rank {one_loss:.7f}, two ranks "
          f"{two_loss:.7f}, kept mean {kept_mean:.7f} (share means {share_means[0]:.4f}, {share_means[1]:.4f}); "
          f"grad_norm {grad_norm[0]:.6f} vs {grad_norm[1]:.6f}; max weight difference "
          f"{moved:.2e} (largest update {step_size:.2e}); one rank {t1 - t0:.0f} s "
          f"(build {one['seconds']['build']:.0f} s), two ranks {t2 - t1:.0f} s "
          f"(build {two[0]['seconds']['build']:.0f} s), load {os.getloadavg()[0]:.1f}")

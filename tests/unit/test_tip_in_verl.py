"""OPD with TIP through verl's real workers (single process, CPU, no Ray) on the tiny built-in models.

The ref worker is tip_verl's TIPActorRolloutRefWorker (the reference model loaded from the teacher checkpoint);
the update is verl's own update_actor with its ppo_loss, fed the advantages and keep-mask that the
tip_sync trainer computes on the driver.
"""

import math

import pytest
import torch

from tip_verl import TIPConfig, normalized_entropy, sampled_token_divergence, select_tokens, token_scores
from tip_verl.verl_adapter.opd import opd_step
from tip_verl.verl_adapter.opd_config import TIPRunConfig

from .hf_forward import hf_response_logits

PROMPTS = [f"what is {a} plus {b}" for a, b in [(12, 7), (3, 45), (101, 9), (66, 66)]]


@pytest.fixture(scope="module")
def signals(tiny_assets):
    """A real rollout of the student, its log-probs + entropy, and the teacher's log-probs via the ref."""
    from tip_verl.verl_adapter.local_workers import build_local_workers

    w = build_local_workers(str(tiny_assets.student), ref_model_path=str(tiny_assets.teacher))
    assert type(w.ref).__name__ == "TIPActorRolloutRefWorker"
    batch = w.make_batch(PROMPTS, max_new_tokens=8, temperature=1.0, seed=3)
    out = w.log_probs(batch, entropy=True)
    teacher = w.ref_log_probs(batch)
    w.close()
    return batch, out["log_probs"], out["entropy"], teacher


def _hf_logprobs(path, batch):
    lp = torch.log_softmax(hf_response_logits(path, batch), -1)
    return lp.gather(-1, batch["responses"][..., None]).squeeze(-1) * batch["response_mask"]


def test_ref_worker_is_the_teacher(tiny_assets, signals):
    batch, student_lp, _, teacher_lp = signals
    mask = batch["response_mask"].bool()
    hf_teacher = _hf_logprobs(tiny_assets.teacher, batch)
    assert torch.allclose(teacher_lp[mask], hf_teacher[mask], atol=1e-4)
    # and it is not the student: the teacher assigns clearly different log-probs to the student's tokens
    assert (teacher_lp - student_lp)[mask].abs().mean() > 0.05


def test_kept_tokens_match_select_tokens(tiny_assets, signals):
    batch, student_lp, entropy, teacher_lp = signals
    mask = batch["response_mask"].bool()
    vocab = tiny_assets_vocab(tiny_assets)
    run = TIPRunConfig.from_mapping({"teacher_path": str(tiny_assets.teacher), "method": "soft_or", "ratio": 0.5})
    step = opd_step(run, student_logprobs=student_lp, teacher_logprobs=teacher_lp, entropy_nats=entropy,
                    response_mask=mask, vocab_size=vocab)
    h = normalized_entropy(entropy, vocab)
    delta = sampled_token_divergence(student_lp, teacher_lp, mask, "k3")
    expected = select_tokens(token_scores("soft_or", entropy=h, divergence=delta, response_mask=mask), mask, 0.5)
    assert torch.equal(step.keep_mask, expected)
    assert step.keep_mask.sum(1).tolist() == [max(1, math.floor(0.5 * m)) for m in mask.sum(1).tolist()]


def tiny_assets_vocab(assets):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(assets.student).vocab_size


def _update(assets, batch, advantages, response_mask, old_lp, *, tip_worker=True):
    """Fresh actor from the student checkpoint, one verl update_actor, then its new log-probs.

    ``tip_worker``: the tip_sync worker (sparse lm_head in the update) or verl's own worker (full logits).
    """
    from tip_verl.verl_adapter.local_workers import build_local_workers

    teacher = str(assets.teacher) if tip_worker else None
    w = build_local_workers(str(assets.student), ref_model_path=teacher, with_ref=False,
                            overrides=["actor_rollout_ref.actor.optim.lr=1e-2"])
    assert type(w.actor).__name__ == ("TIPActorRolloutRefWorker" if tip_worker else "ActorRolloutRefWorker")
    from tip_verl.verl_adapter.sparse_lm_head import TIPLMHeadMixin

    assert isinstance(w.actor.actor.engine, TIPLMHeadMixin) == tip_worker
    data = batch.clone()
    data["response_mask"] = response_mask.long()
    metrics = w.update(data, advantages, old_log_probs=old_lp)
    new_lp = w.log_probs(batch)["log_probs"]
    w.close()
    return metrics, new_lp


def _metric(metrics, key):
    value = metrics[key]
    values = value if isinstance(value, list) else [value]
    return float(sum(float(v) for v in values))


def test_loss_is_mean_reverse_kl_over_kept_tokens_and_dropped_tokens_get_no_gradient(tiny_assets, signals):
    batch, student_lp, entropy, teacher_lp = signals
    mask = batch["response_mask"].bool()
    run = TIPRunConfig.from_mapping({"teacher_path": str(tiny_assets.teacher), "method": "entropy", "ratio": 0.5})
    step = opd_step(run, student_logprobs=student_lp, teacher_logprobs=teacher_lp, entropy_nats=entropy,
                    response_mask=mask, vocab_size=tiny_assets_vocab(tiny_assets))
    keep = step.keep_mask
    assert 0 < keep.sum() < mask.sum()

    metrics, lp_masked = _update(tiny_assets, batch, step.advantages, keep, student_lp)
    # on-policy first step: ratio = 1, so verl's pg_loss = mean over kept tokens of -A = mean k1 (Eq. 7)
    expected = (student_lp - teacher_lp)[keep].mean().item()
    assert _metric(metrics, "actor/pg_loss") == pytest.approx(expected, rel=1e-4, abs=1e-5)

    # Same keep-mask, but garbage advantages at dropped positions: identical update (no gradient there).
    noisy = step.advantages.clone()
    noisy[mask & ~keep] = torch.randn(int((mask & ~keep).sum())) * 50
    _, lp_noisy = _update(tiny_assets, batch, noisy, keep, student_lp)
    assert torch.allclose(lp_masked, lp_noisy, atol=1e-6)

    # Control: without the keep-mask the same garbage does change the update.
    _, lp_unmasked = _update(tiny_assets, batch, noisy, mask, student_lp)
    assert (lp_unmasked - lp_masked)[mask].abs().max() > 1e-3

    # verl's own worker (full logits, mask applied in the loss only) makes the same update.
    m_full, lp_full = _update(tiny_assets, batch, step.advantages, keep, student_lp, tip_worker=False)
    assert _metric(m_full, "actor/pg_loss") == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert torch.allclose(lp_masked, lp_full, atol=1e-5)


def test_method_all_equals_plain_opd(tiny_assets, signals):
    batch, student_lp, entropy, teacher_lp = signals
    mask = batch["response_mask"].bool()
    run = TIPRunConfig.from_mapping({"teacher_path": str(tiny_assets.teacher), "method": "all"})
    assert run.selection == TIPConfig(method="all", ratio=1.0)
    step = opd_step(run, student_logprobs=student_lp, teacher_logprobs=teacher_lp, entropy_nats=entropy,
                    response_mask=mask, vocab_size=tiny_assets_vocab(tiny_assets))
    m_tip, lp_tip = _update(tiny_assets, batch, step.advantages, step.keep_mask, student_lp)
    # plain OPD with verl's own worker (full logits): advantage = -k1 on every response token
    plain_adv = (teacher_lp - student_lp) * mask
    m_plain, lp_plain = _update(tiny_assets, batch, plain_adv, mask, student_lp, tip_worker=False)
    assert _metric(m_tip, "actor/pg_loss") == pytest.approx(_metric(m_plain, "actor/pg_loss"), rel=1e-5)
    assert torch.allclose(lp_tip, lp_plain, atol=1e-5)
    assert (lp_tip - student_lp)[mask].abs().max() > 1e-3  # the update did something


def test_worker_settings_are_one_node_resolved_on_the_driver(tmp_path, monkeypatch):
    """+tip.sparse_lm_head / +tip.lm_head_chunk_rows (and the teacher path, the loss) reach the workers as one
    validated node, actor_rollout_ref.tip_worker; the old environment variables stop the job naming the flag."""
    from tip_verl.verl_adapter.opd_config import (RETIRED_ENV, TIPConfigError, TIPWorkerConfig,
                                                  validate_verl_config)

    def run(**tip):
        return TIPRunConfig.from_mapping({"teacher_path": str(tmp_path), **tip})

    assert run().worker_config() == TIPWorkerConfig(teacher_path=str(tmp_path))  # defaults: sparse, 64 MiB chunks
    worker = run(sparse_lm_head=True, lm_head_chunk_rows=64, teacher_signal="topk",
                 loss="topk_reverse_kl").worker_config()
    assert worker.to_node() == {"teacher_path": str(tmp_path), "loss": "topk_reverse_kl", "sparse_lm_head": True,
                                "lm_head_chunk_rows": 64}
    assert TIPWorkerConfig.from_node(worker.to_node()) == worker
    assert TIPWorkerConfig.from_node(None) == TIPWorkerConfig()
    assert run(lm_head_chunk_rows=0).worker_config().lm_head_chunk_rows == 0
    assert run(sparse_lm_head=False).worker_config().sparse_lm_head is False
    for tip, match in [
        ({"sparse_lm_head": "no"}, r"\+tip.sparse_lm_head=no is invalid"),
        ({"lm_head_chunk_rows": -1}, r"\+tip.lm_head_chunk_rows=-1 is invalid"),
        ({"lm_head_chunk_rows": True}, r"\+tip.lm_head_chunk_rows=True is invalid"),
        ({"sparse_lm_head": False, "lm_head_chunk_rows": 8}, r"only used with the sparse lm_head"),
        ({"sparse_lm_head": False, "teacher_signal": "topk", "loss": "topk_reverse_kl"},
         r"\+tip.sparse_lm_head=false turns the sparse lm_head off"),
    ]:
        with pytest.raises(TIPConfigError, match=match):
            run(**tip)
    with pytest.raises(TIPConfigError, match="unknown keys"):
        TIPWorkerConfig.from_node({"sparse": True})

    from omegaconf import OmegaConf

    job = OmegaConf.create({
        "trainer": {"v1": {"trainer_mode": "tip_sync"}},
        "algorithm": {"adv_estimator": "tip_opd"},
        "actor_rollout_ref": {"actor": {"use_kl_loss": False, "entropy_coeff": 0}},
        "tip": {"teacher_path": str(tmp_path), "lm_head_chunk_rows": 32},
    })
    assert validate_verl_config(job).worker_config().lm_head_chunk_rows == 32
    for name, flag in RETIRED_ENV.items():
        monkeypatch.setenv(name, "0")
        with pytest.raises(TIPConfigError, match=f"{name} is no longer read; use {flag.replace('+', '[+]')}"):
            validate_verl_config(job)
        monkeypatch.delenv(name)

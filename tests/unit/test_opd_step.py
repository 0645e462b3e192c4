"""OPD-with-TIP step on padded tensors (what the trainer runs on the driver) and its config checks."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from tip_verl import TIPConfig, select_tokens, token_scores
from tip_verl.verl_adapter.opd import opd_step
from tip_verl.verl_adapter.opd_config import TIPConfigError, TIPRunConfig, validate_verl_config

V = 50


def _batch(seed=0, B=4, T=12):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, T - 3, 5, 1])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[0, 4:6] = False  # a tool-output hole in a multi-turn response
    lp_s = -torch.rand(B, T, generator=g) * 3
    lp_t = -torch.rand(B, T, generator=g) * 3
    ent = torch.rand(B, T, generator=g) * math.log(V)
    return lp_s, lp_t, ent, mask


def _run(tmp_path, **tip):
    return TIPRunConfig.from_mapping({"teacher_path": str(tmp_path), **tip})


def test_soft_or_keeps_select_tokens_counts_and_sets_minus_k1(tmp_path):
    lp_s, lp_t, ent, mask = _batch()
    run = _run(tmp_path, method="soft_or", ratio=0.5)
    step = opd_step(run, student_logprobs=lp_s, teacher_logprobs=lp_t, entropy_nats=ent, response_mask=mask,
                    vocab_size=V)
    h = ent / math.log(V)
    delta = (torch.exp(lp_t - lp_s) - 1) - (lp_t - lp_s)  # k3, the default scoring divergence
    scores = token_scores("soft_or", entropy=h, divergence=delta, response_mask=mask)
    expected = select_tokens(scores, mask, 0.5)
    assert torch.equal(step.keep_mask, expected)
    assert step.keep_mask.sum(1).tolist() == [max(1, math.floor(0.5 * m)) for m in mask.sum(1).tolist()]
    assert not (step.keep_mask & ~mask).any()
    # advantage = -(lp_s - lp_t) at kept tokens, 0 elsewhere
    assert torch.allclose(step.advantages[step.keep_mask], (lp_t - lp_s)[step.keep_mask])
    assert (step.advantages[~step.keep_mask] == 0).all()
    assert step.metrics["tip/kept_count"] == step.keep_mask.sum().item()


def test_method_all_is_plain_opd(tmp_path):
    lp_s, lp_t, ent, mask = _batch(1)
    step = opd_step(_run(tmp_path, method="all"), student_logprobs=lp_s, teacher_logprobs=lp_t,
                    entropy_nats=ent, response_mask=mask, vocab_size=V)
    assert torch.equal(step.keep_mask, mask)
    assert torch.equal(step.advantages, torch.where(mask, lp_t - lp_s, torch.zeros(())))
    assert step.metrics["tip/kept_fraction"] == 1.0


def test_k3_advantage_estimator(tmp_path):
    lp_s, lp_t, ent, mask = _batch(2)
    step = opd_step(_run(tmp_path, method="all", advantage_estimator="k3"), student_logprobs=lp_s,
                    teacher_logprobs=lp_t, entropy_nats=ent, response_mask=mask, vocab_size=V)
    log_r = lp_t - lp_s
    k3 = torch.expm1(log_r) - log_r
    assert torch.allclose(step.advantages[mask], -k3[mask], atol=1e-6)


def test_poisson_importance_weights_scale_kept_advantages(tmp_path):
    lp_s, lp_t, ent, mask = _batch(3)
    run = _run(tmp_path, method="entropy_sample", ratio=0.5, sampling_mode="poisson", importance_weighting=True)
    step = opd_step(run, student_logprobs=lp_s, teacher_logprobs=lp_t, entropy_nats=ent, response_mask=mask,
                    vocab_size=V, generator=torch.Generator().manual_seed(0))
    keep = step.keep_mask
    w = step.selection.loss_weights[keep] * keep.sum() / mask.sum()
    assert torch.allclose(step.advantages[keep], (lp_t - lp_s)[keep] * w, atol=1e-6)
    assert "tip/is_weight_mean" in step.metrics


def test_poisson_weighted_token_mean_is_unbiased_for_all_token_mean(tmp_path):
    """Token-mean over kept tokens of the weighted advantage estimates the all-token mean (App. A.2)."""
    lp_s, lp_t, ent, mask = _batch(4)
    run = _run(tmp_path, method="entropy_sample", ratio=0.5, sampling_mode="poisson", importance_weighting=True)
    target = (lp_t - lp_s)[mask].mean().item()
    g = torch.Generator().manual_seed(1)
    estimates = []
    for _ in range(4000):
        step = opd_step(run, student_logprobs=lp_s, teacher_logprobs=lp_t, entropy_nats=ent, response_mask=mask,
                        vocab_size=V, generator=g)
        estimates.append(step.advantages[step.keep_mask].sum().item() / step.keep_mask.sum().item())
    est = torch.tensor(estimates)
    stderr = est.std().item() / math.sqrt(len(estimates))
    # |S| varies per draw, so the ratio estimator is only approximately unbiased: allow 4 s.e. + 2%.
    assert abs(est.mean().item() - target) < 4 * stderr + 0.02 * abs(target)


def test_run_config_errors_name_the_flag(tmp_path):
    with pytest.raises(TIPConfigError, match=r"\+tip.teacher_path is required"):
        TIPRunConfig.from_mapping({"method": "soft_or"})
    with pytest.raises(TIPConfigError, match="ratio"):
        _run(tmp_path, ratio=0)
    with pytest.raises(TIPConfigError, match="method"):
        _run(tmp_path, method="entropy_topk")
    with pytest.raises(TIPConfigError, match=r"Did you mean \+tip.ratio"):
        _run(tmp_path, ratoi=0.5)
    with pytest.raises(TIPConfigError, match="advantage_estimator"):
        _run(tmp_path, advantage_estimator="mse")
    assert _run(tmp_path, method="all").selection.ratio == 1.0
    assert _run(tmp_path).selection == TIPConfig()


def _verl_cfg(tmp_path, **over):
    base = {
        "trainer": {"use_v1": True, "v1": {"trainer_mode": "tip_sync"}},
        "algorithm": {"adv_estimator": "tip_opd", "use_kl_in_reward": False},
        "actor_rollout_ref": {"actor": {"use_kl_loss": False, "entropy_coeff": 0.0}, "model": {"lora_rank": 0}},
        "reward": {"reward_model": {"enable": False}},
        "distillation": {"enabled": False},
        "tip": {"teacher_path": str(tmp_path), "method": "q3", "ratio": 0.2},
    }
    cfg = OmegaConf.create(base)
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return cfg


def test_verl_config_contradictions_fail_naming_the_flag(tmp_path):
    run = validate_verl_config(_verl_cfg(tmp_path))
    assert run.selection.method == "q3" and run.selection.ratio == 0.2
    for flag, value in [
        ("actor_rollout_ref.actor.use_kl_loss", True),
        ("algorithm.use_kl_in_reward", True),
        ("reward.reward_model.enable", True),
        ("actor_rollout_ref.actor.entropy_coeff", 0.01),
        ("algorithm.adv_estimator", "grpo"),
        ("trainer.v1.trainer_mode", "sync"),
    ]:
        with pytest.raises(TIPConfigError, match=flag.split(".")[-1]):
            validate_verl_config(_verl_cfg(tmp_path, **{flag: value}))


def test_topk_signal_flags(tmp_path):
    run = _run(tmp_path, teacher_signal="topk")
    assert (run.teacher_signal, run.topk_k, run.loss, run.teacher_source) == ("topk", 64, "pg", "ref")
    assert _run(tmp_path, teacher_signal="topk", topk_k=8, loss="topk_reverse_kl").topk_k == 8
    for tip, match in [
        ({"topk_k": 8}, r"\+tip.topk_k=8 is only used with \+tip.teacher_signal=topk"),
        ({"teacher_signal": "topk", "topk_k": 0}, r"\+tip.topk_k=0 is invalid"),
        ({"teacher_signal": "full"}, r"\+tip.teacher_signal=full is invalid"),
        ({"loss": "topk_reverse_kl"}, r"needs the teacher's top-k: set \+tip.teacher_signal=topk"),
        ({"loss": "ce"}, r"\+tip.loss=ce is invalid"),
        ({"teacher_signal": "topk", "loss": "topk_reverse_kl", "advantage_estimator": "k3"},
         r"advantage_estimator=k3 is only used with \+tip.loss=pg"),
        ({"teacher_signal": "topk", "loss": "topk_reverse_kl", "method": "entropy_sample",
          "sampling_mode": "poisson", "importance_weighting": True}, "importance_weighting"),
    ]:
        with pytest.raises(TIPConfigError, match=match):
            _run(tmp_path, **tip)
    topk_cfg = {"tip.teacher_signal": "topk"}
    assert validate_verl_config(_verl_cfg(tmp_path, **topk_cfg)).teacher_signal == "topk"
    for flag, value in [("actor_rollout_ref.model.use_fused_kernels", True),
                        ("algorithm.rollout_correction.bypass_mode", True)]:
        with pytest.raises(TIPConfigError, match=flag):
            validate_verl_config(_verl_cfg(tmp_path, **topk_cfg, **{flag: value}))


def _server_cfg(tmp_path, loss_mode="k3", **over):
    cfg = _verl_cfg(tmp_path, **{"distillation.enabled": True, "algorithm.adv_estimator": "grpo",
                                 "distillation.distillation_loss.loss_mode": loss_mode,
                                 "distillation.distillation_loss.topk": 32})
    cfg.tip.pop("teacher_path")
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return cfg


def test_native_teacher_server_path(tmp_path):
    run = validate_verl_config(_server_cfg(tmp_path))
    assert (run.teacher_source, run.teacher_signal, run.teacher_path) == ("server", "sampled", None)
    run = validate_verl_config(_server_cfg(tmp_path, "forward_kl_topk"))
    assert (run.teacher_signal, run.topk_k) == ("topk", 32)
    assert validate_verl_config(_server_cfg(tmp_path, "forward_kl_topk", **{"tip.teacher_signal": "topk"}))
    for over, match in [
        ({"algorithm.adv_estimator": "tip_opd"}, "adv_estimator=tip_opd is for the ref-as-teacher path"),
        ({"tip.teacher_path": str(tmp_path)}, r"\+tip.teacher_path does not apply with distillation.enabled"),
        ({"tip.teacher_signal": "topk"}, "disagrees with distillation.distillation_loss.loss_mode=k3"),
        ({"tip.topk_k": 8}, r"\+tip.topk_k does not apply"),
        ({"tip.loss": "topk_reverse_kl"}, r"\+tip.loss does not apply"),
        ({"tip.method": "entropy_sample", "tip.sampling_mode": "poisson", "tip.importance_weighting": True},
         "importance_weighting"),
        ({"distillation.distillation_loss.loss_mode": "nope"}, "loss_mode=nope"),
    ]:
        with pytest.raises(TIPConfigError, match=match):
            validate_verl_config(_server_cfg(tmp_path, **over))


def test_topk_step_with_server_teacher_has_zero_advantages_and_topk_metrics(tmp_path):
    lp_s, _, ent, mask = _batch(seed=4)
    g = torch.Generator().manual_seed(9)
    B, T = mask.shape
    k = 5
    teacher_top = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).topk(k, dim=-1)
    student_at = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).gather(-1, teacher_top.indices)
    run = validate_verl_config(_server_cfg(tmp_path, "forward_kl_topk", **{"tip.method": "q3"}))
    step = opd_step(run, student_logprobs=lp_s, teacher_logprobs=None, entropy_nats=ent, response_mask=mask,
                    vocab_size=V, teacher_topk_logprobs=teacher_top.values, teacher_topk_ids=teacher_top.indices,
                    student_topk_logprobs=student_at)
    assert not bool(step.advantages.any())
    assert 0 < int(step.keep_mask.sum()) < int(mask.sum())
    assert step.metrics["tip/topk_reverse_kl_mean"] > 0 and "tip/reverse_kl_mean" not in step.metrics
    with pytest.raises(ValueError, match="needs teacher_logprobs"):
        opd_step(run, student_logprobs=lp_s, teacher_logprobs=None, entropy_nats=ent, response_mask=mask,
                 vocab_size=V)


def test_unwritable_records_dir_fails_at_start_up_naming_the_flag(tmp_path):
    bad = {"tip.records_every": 1, "tip.records_dir": "/proc/forbidden/records"}
    with pytest.raises(TIPConfigError, match=(
            r"^\+tip\.records_dir=/proc/forbidden/records: cannot write to directory '/proc/forbidden/records': "
            r"No such file or directory \(/proc/forbidden\); the token records \(\+tip\.records_every=1\) need a "
            r"writable folder\.$")):
        validate_verl_config(_verl_cfg(tmp_path, **bad))
    (tmp_path / "ckpt").write_text("a file, not a folder")
    with pytest.raises(TIPConfigError, match=r"^\+tip\.records_dir \(default <trainer\.default_local_dir>/"
                                             r"tip_records\)=.*ckpt/tip_records: cannot write to directory"):
        validate_verl_config(_verl_cfg(tmp_path, **{"tip.records_every": 1,
                                                   "trainer.default_local_dir": str(tmp_path / "ckpt")}))
    # records off: the folder is never looked at; a writable one passes and nothing is created yet
    assert validate_verl_config(_verl_cfg(tmp_path, **{**bad, "tip.records_every": 0})).records_every == 0
    good = tmp_path / "out" / "records"
    run = validate_verl_config(_verl_cfg(tmp_path, **{"tip.records_every": 2, "tip.records_dir": str(good)}))
    assert run.records_path("unused") == str(good) and not (tmp_path / "out").exists()
    assert TIPRunConfig.from_mapping({"teacher_path": "t"}).records_path("ckpt") == "ckpt/tip_records"


def test_method_all_alone_and_contradictory_ratio(tmp_path):
    assert _run(tmp_path, method="all").selection.ratio == 1.0
    with pytest.raises(TIPConfigError, match=r"TIPConfig\.ratio=0\.5 is invalid: method='all' keeps every token: "
                                             r"leave ratio unset or set it to 1\.0"):
        _run(tmp_path, method="all", ratio=0.5)

"""TIP's driver-side start-up checks (tip_verl.verl_adapter.preflight): they wrap verl's validate_config, so a
bad TIP flag or an unreadable checkpoint stops ``main_ppo`` before Ray starts; a job without TIP passes through."""

from __future__ import annotations

import os
import types

import pytest
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

from tests.unit.test_checkpoints import make_checkpoint
from tip_verl.verl_adapter import preflight
from tip_verl.verl_adapter.opd_config import TIPConfigError


def _job(tmp_path, **over):
    teacher = make_checkpoint(tmp_path / "teacher")
    student = make_checkpoint(tmp_path / "student")
    cfg = OmegaConf.create({
        "trainer": {"use_v1": True, "v1": {"trainer_mode": "tip_sync"}},
        "algorithm": {"adv_estimator": "tip_opd", "use_kl_in_reward": False},
        "actor_rollout_ref": {"actor": {"use_kl_loss": False, "entropy_coeff": 0.0},
                              "model": {"lora_rank": 0, "path": student}},
        "reward": {"reward_model": {"enable": False}},
        "distillation": {"enabled": False},
        "tip": {"teacher_path": teacher, "method": "soft_or", "ratio": None},
    })
    for key, value in over.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def _spy_module():
    calls = []

    def validate_config(config, use_reference_policy, use_critic):
        calls.append((config, use_reference_policy, use_critic))
        return "verl's result"

    return types.SimpleNamespace(validate_config=validate_config), calls


def _startup_error(cfg) -> str:
    module, calls = _spy_module()
    preflight.install(module)
    with pytest.raises(TIPConfigError) as info:
        module.validate_config(cfg, use_reference_policy=False, use_critic=False)
    assert isinstance(info.value, CompactHydraException)  # Hydra prints the message alone, no traceback
    assert calls == []  # stopped before verl's own validation (and before Ray)
    message = str(info.value)
    assert "\n" not in message and message.startswith("tip_verl: "), message
    return message


def test_plugin_wraps_verls_validate_config():
    import verl  # noqa: F401  (the verl.plugins entry point installs the wrapper)
    from verl.utils import config as verl_config

    assert getattr(verl_config.validate_config, "__tip_verl_preflight__", False)
    module, _ = _spy_module()
    preflight.install(module)
    wrapped = module.validate_config
    preflight.install(module)
    assert module.validate_config is wrapped  # idempotent


def test_a_job_without_tip_goes_straight_to_verl():
    module, calls = _spy_module()
    preflight.install(module)
    cfg = OmegaConf.create({"trainer": {"v1": {"trainer_mode": "sync"}},
                            "algorithm": {"adv_estimator": "grpo"},
                            "actor_rollout_ref": {"model": {"path": "/does/not/exist"}}})
    assert not preflight.uses_tip(cfg)
    assert module.validate_config(cfg, use_reference_policy=True, use_critic=False) == "verl's result"
    assert calls == [(cfg, True, False)]


def test_a_good_tip_job_reaches_verl(tmp_path):
    module, calls = _spy_module()
    preflight.install(module)
    cfg = _job(tmp_path)
    assert module.validate_config(cfg, use_reference_policy=False, use_critic=False) == "verl's result"
    assert len(calls) == 1


def test_bad_tip_flags_stop_before_verl(tmp_path):
    assert "Unknown flag +tip.mehtod. Did you mean +tip.method?" in _startup_error(
        _job(tmp_path, **{"tip.mehtod": "q3"}))
    assert "TIPConfig.ratio=2.0 is invalid: must be in (0, 1]" in _startup_error(_job(tmp_path, **{"tip.ratio": 2.0}))
    assert ("algorithm.adv_estimator=tip_opd is computed by the TIP trainer only, but trainer.v1.trainer_mode=sync"
            in _startup_error(_job(tmp_path, **{"trainer.v1.trainer_mode": "sync"})))
    assert "actor_rollout_ref.actor.use_kl_loss=True contradicts OPD with TIP" in _startup_error(
        _job(tmp_path, **{"actor_rollout_ref.actor.use_kl_loss": True}))
    # +tip.* flags without the TIP trainer would be ignored silently: stopped too
    assert "trainer.v1.trainer_mode=sync: OPD with TIP needs trainer.v1.trainer_mode=tip_sync" in _startup_error(
        _job(tmp_path, **{"trainer.v1.trainer_mode": "sync", "algorithm.adv_estimator": "grpo"}))


def test_unreadable_checkpoints_name_flag_and_file(tmp_path):
    cfg = _job(tmp_path)
    teacher_weights = os.path.join(cfg.tip.teacher_path, "model.safetensors")
    with open(teacher_weights, "r+b") as f:
        f.truncate(os.path.getsize(teacher_weights) - 4)
    message = _startup_error(cfg)
    assert message.startswith(f"tip_verl: +tip.teacher_path={cfg.tip.teacher_path}: {teacher_weights}: truncated")
    cfg = _job(tmp_path / "b")
    os.unlink(os.path.join(cfg.actor_rollout_ref.model.path, "config.json"))
    assert f"actor_rollout_ref.model.path={cfg.actor_rollout_ref.model.path}: no config.json" in _startup_error(cfg)
    cfg = _job(tmp_path / "c", **{"tip.teacher_path": str(tmp_path / "missing")})
    assert f"+tip.teacher_path={tmp_path / 'missing'}: the folder" in _startup_error(cfg)
    assert "does not exist" in _startup_error(cfg)


def test_teacher_server_checkpoints_are_checked(tmp_path):
    cfg = _job(tmp_path, **{"distillation.enabled": True, "algorithm.adv_estimator": "grpo",
                            "distillation.distillation_loss": {"loss_mode": "k1"},
                            "distillation.teacher_models": {"teacher_model": {"model_path": str(tmp_path / "gone")}}})
    del cfg.tip["teacher_path"]
    assert "distillation.teacher_models.teacher_model.model_path=" in _startup_error(cfg)


def test_hub_ids_are_left_to_verl(tmp_path):
    flags = {"+tip.teacher_path": "Qwen/Qwen3-8B", "actor_rollout_ref.model.path": "hdfs://x/y"}
    preflight.check_checkpoints(flags)  # resolved (and checked) by the trainer with verl's own code


def test_recipe_ratio_left_unset_follows_the_method():
    """examples/cpu/tiny_main_ppo.sh sets +tip.ratio=null: `tip.method=all` from the user then means ratio 1.0,
    the recipe's soft_or 0.5, and a ratio the user gives still wins (composed as verl's CLI composes it)."""
    import verl
    from hydra import compose, initialize_config_dir

    from tip_verl.verl_adapter.opd_config import TIPRunConfig

    recipe = ["+tip.teacher_path=/t", "+tip.method=soft_or", "+tip.ratio=null"]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        def selection(*user):
            return TIPRunConfig.from_mapping(compose("ppo_trainer", overrides=[*recipe, *user]).tip).selection

        assert (selection().method, selection().ratio) == ("soft_or", 0.5)
        assert (selection("tip.method=all").method, selection("tip.method=all").ratio) == ("all", 1.0)
        assert selection("tip.method=q3", "tip.ratio=0.2").ratio == 0.2
        with pytest.raises(TIPConfigError, match="keeps every token"):
            selection("tip.method=all", "tip.ratio=0.5")  # the user's own contradiction is still named


# --------------------------------------------------------------------------- the data-parallel layout
def _layout_job(tmp_path, *, ranks=2, tbs=4, n=2, mini=4, update=4, log_prob=8, ref=8, **over):
    return _job(tmp_path, **{"trainer.n_gpus_per_node": ranks, "trainer.nnodes": 1, "trainer.device": "cpu",
                             "data.train_batch_size": tbs, "actor_rollout_ref.rollout.n": n,
                             "actor_rollout_ref.actor.strategy": "fsdp2",
                             "actor_rollout_ref.actor.ppo_mini_batch_size": mini,
                             "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": update,
                             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": log_prob,
                             "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": ref, **over})


def _startup_error_with_ref(cfg) -> str:
    module, calls = _spy_module()
    preflight.install(module)
    with pytest.raises(TIPConfigError) as info:
        module.validate_config(cfg, use_reference_policy=True, use_critic=False)
    assert isinstance(info.value, CompactHydraException) and calls == []
    message = str(info.value)
    assert "\n" not in message and message.startswith("tip_verl: data-parallel layout: "), message
    return message


def test_micro_batches_that_cannot_divide_a_ranks_share_stop_before_verl(tmp_path):
    """The issue's case: the CPU recipe's sizes (4 prompts x 2, log-prob micro-batches of 8) on two ranks."""
    message = _startup_error_with_ref(_layout_job(tmp_path))
    assert ("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 does not divide the 4 sequences each "
            "rank gets in the log-prob pass (data.train_batch_size=4 x actor_rollout_ref.rollout.n=2 over 2 rank(s) "
            "(trainer.n_gpus_per_node=2 x trainer.nnodes=1)): use a divisor of 4, e.g. "
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4") in message, message
    assert "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8 does not divide the 4 sequences" in message
    assert "ppo_micro_batch_size_per_gpu" not in message  # the update's 4 per rank divide by 4
    assert "data size must be divisible by force_group_size * micro_batch_size_per_gpu" in message  # verl's words


def test_update_micro_batch_and_mini_batch_split_are_named(tmp_path):
    message = _startup_error_with_ref(_layout_job(tmp_path, log_prob=4, ref=4, update=3))
    assert ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3 does not divide the 4 sequences each rank gets "
            "in the update (actor_rollout_ref.actor.ppo_mini_batch_size=4 x actor_rollout_ref.rollout.n=2 over 2 "
            "rank(s)") in message, message
    # 3 prompts x 1 response per mini-batch cannot be cut in two
    message = _startup_error_with_ref(_layout_job(tmp_path, tbs=6, n=1, mini=3, update=1, log_prob=1, ref=1))
    assert ("actor_rollout_ref.actor.ppo_mini_batch_size=3 x actor_rollout_ref.rollout.n=1 = 3 sequences per "
            "mini-batch cannot be split over the 2 data-parallel ranks") in message, message


def test_a_layout_that_divides_reaches_verl(tmp_path):
    module, calls = _spy_module()
    preflight.install(module)
    for ranks, log_prob in ((1, 8), (2, 4), (4, 2)):
        cfg = _layout_job(tmp_path / str(ranks), ranks=ranks, log_prob=log_prob, ref=log_prob, update=4 // ranks)
        assert module.validate_config(cfg, use_reference_policy=True, use_critic=False) == "verl's result"
    assert len(calls) == 3


def test_ref_pass_is_checked_when_there_is_a_ref(tmp_path):
    module, calls = _spy_module()
    preflight.install(module)
    # the ref as teacher: main_ppo's need_reference_policy() says no ref (no KL loss), the ref pass runs all the same
    cfg = _layout_job(tmp_path, log_prob=4, ref=8)
    with pytest.raises(TIPConfigError, match="ref.log_prob_micro_batch_size_per_gpu=8 does not divide"):
        module.validate_config(cfg, use_reference_policy=False, use_critic=False)
    # the teacher server: no ref worker, its micro-batch flag is not read
    server = _layout_job(tmp_path / "server", log_prob=4, ref=8, **{
        "distillation.enabled": True, "algorithm.adv_estimator": "grpo",
        "distillation.distillation_loss": {"loss_mode": "k1"},
        "distillation.teacher_models": {"teacher_model": {"model_path": str(make_checkpoint(tmp_path / "t"))}}})
    del server.tip["teacher_path"]
    module.validate_config(server, use_reference_policy=False, use_critic=False)
    assert len(calls) == 1
    assert "ref.log_prob_micro_batch_size_per_gpu=8" in _startup_error_with_ref(server)  # with a ref (KL loss)


def test_layouts_it_does_not_model_pass_through(tmp_path):
    module, calls = _spy_module()
    preflight.install(module)
    for over in ({"actor_rollout_ref.actor.use_dynamic_bsz": True}, {"actor_rollout_ref.actor.strategy": "megatron"},
                 {"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": None,
                  "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": None}):
        module.validate_config(_layout_job(tmp_path / str(len(calls)), **over), True, False)
    assert len(calls) == 3


def test_a_job_without_tip_gets_the_layout_check_on_the_cpu_platform_only(tmp_path, monkeypatch):
    module, calls = _spy_module()
    preflight.install(module)
    cfg = _layout_job(tmp_path)
    del cfg["tip"]
    OmegaConf.update(cfg, "trainer.v1.trainer_mode", "sync")
    OmegaConf.update(cfg, "algorithm.adv_estimator", "grpo")
    assert not preflight.uses_tip(cfg)
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    assert "log_prob_micro_batch_size_per_gpu=8 does not divide" in _startup_error_with_ref(cfg)
    monkeypatch.setenv("VERL_PLATFORM", "cuda")
    OmegaConf.update(cfg, "trainer.device", "cuda")
    assert module.validate_config(cfg, use_reference_policy=True, use_critic=False) == "verl's result"
    assert len(calls) == 1  # off the CPU platform a job without TIP goes straight to verl, as before

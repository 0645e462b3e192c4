"""TIP in verl's three V1 trainer modes (issue 13): the classes, how they compose with verl's, the start-up checks.

The trainers are built from the CPU recipe's real command line (``examples/cpu/tiny_main_ppo.sh opd``, dry run)
composed by Hydra as ``main_ppo`` composes it, without Ray: ``__init__`` and ``_init_resource_pool_mgr`` need no
workers. They show what verl's base class sees (``trainer_mode``, replay buffer, ``parameter_sync_step``) and
which worker class each role gets. The end-to-end runs are tests/e2e/test_tip_async_modes.py.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tip_verl.verl_adapter.opd import staleness_metrics
from tip_verl.verl_adapter.opd_config import TRAINER_MODES, TIPConfigError, validate_verl_config

REPO = Path(__file__).resolve().parents[2]
SEPARATE = ["trainer.v1.trainer_mode=tip_separate_async", "actor_rollout_ref.rollout.nnodes=1",
            "actor_rollout_ref.rollout.n_gpus_per_node=1", "actor_rollout_ref.rollout.checkpoint_engine.backend=tip_gloo",
            "trainer.v1.separate_async.parameter_sync_step=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
            "data.train_batch_size=4"]


@pytest.fixture(scope="module")
def recipe_overrides(tiny_assets, tmp_path_factory):
    """The Hydra overrides of the CPU OPD recipe (ref = teacher), from the script's dry run."""
    env = dict(os.environ, PYTHON=sys.executable, ASSETS_DIR=str(tiny_assets.root),
               RUN_DIR=str(tmp_path_factory.mktemp("dry")), DRY_RUN="1")
    env.pop("VERL_PLATFORM", None)
    proc = subprocess.run(["bash", str(REPO / "examples" / "cpu" / "run_tiny_opd.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    argv = shlex.split(proc.stdout.strip().splitlines()[-1])
    return [a for a in argv[3:] if not a.startswith("hydra.")]


def _compose(overrides):
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose("ppo_trainer", overrides=overrides)


def _trainer(overrides):
    from verl.trainer.ppo.v1 import get_trainer_cls

    config = _compose(overrides)
    trainer = get_trainer_cls(config.trainer.v1.trainer_mode)(config)
    trainer._init_resource_pool_mgr()
    workers = {role.name: getattr(cls, "__ray_actor_class__", cls) for role, cls in trainer.role_worker_mapping.items()}
    return trainer, workers


def test_three_modes_are_the_mixin_before_verls_trainer():
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    from tip_verl.verl_adapter.trainer import TIPTrainerMixin

    assert set(TRAINER_MODES) <= set(TRAINER_REGISTRY)
    for tip_mode, verl_mode in TRAINER_MODES.items():
        cls, verl_cls = get_trainer_cls(tip_mode), get_trainer_cls(verl_mode)
        assert cls.__mro__[1:3] == (TIPTrainerMixin, verl_cls), cls.__mro__
        assert cls.verl_trainer_mode == verl_mode
        # every override of the mixin reaches verl's class (and its mode's own override) through super()
        for name in ("_init_resource_pool_mgr", "_compute_old_log_prob", "_compute_ref_log_prob", "_compute_advantage"):
            chain = [k for k in cls.__mro__ if name in k.__dict__]
            assert chain[0] is TIPTrainerMixin and chain[-1].__name__ == "PPOTrainer", (tip_mode, name, chain)
    separate = get_trainer_cls("tip_separate_async")
    assert [k.__name__ for k in separate.__mro__ if "_compute_old_log_prob" in k.__dict__] == [
        "TIPTrainerMixin", "PPOTrainerSeparateAsync", "PPOTrainer"]


def test_verl_sees_its_own_mode_and_settings(recipe_overrides):
    """verl's base class reads self.trainer_mode for the replay buffer, the refill, checkpointed in-flight prompts
    and trainer.v1.<mode>.parameter_sync_step: it gets the verl mode, not the tip_* name."""
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

    from tip_verl.verl_adapter.teacher import TIPActorRolloutRefWorker, TIPDetachActorWorker

    sync, workers = _trainer(recipe_overrides)
    assert (sync.trainer_mode, sync.tip_trainer_mode, sync.parameter_sync_step) == ("sync", "tip_sync", 1)
    assert type(sync.replay_buffer) is ReplayBuffer and sync.use_reference_policy
    assert workers == {"ActorRolloutRef": TIPActorRolloutRefWorker}

    colocate, workers = _trainer([*recipe_overrides, "trainer.v1.trainer_mode=tip_colocate_async"])
    assert (colocate.trainer_mode, colocate.parameter_sync_step) == ("colocate_async", 1)
    assert type(colocate.replay_buffer) is ReplayBufferAsync
    assert colocate.replay_buffer.trainer_config == colocate.config.trainer.v1.colocate_async
    assert workers == {"ActorRolloutRef": TIPActorRolloutRefWorker}

    separate, workers = _trainer([*recipe_overrides, *SEPARATE])
    assert (separate.trainer_mode, separate.parameter_sync_step) == ("separate_async", 2)
    assert type(separate.replay_buffer) is ReplayBufferAsync
    # verl's separate_async worker (pi_old saved/restored on the CPU) with TIP's teacher ref and sparse lm_head
    assert workers == {"ActorRolloutRef": TIPDetachActorWorker}
    assert TIPDetachActorWorker.__mro__[1].__name__ == "TIPActorRolloutRefWorker"
    assert TIPDetachActorWorker.__mro__[2].__name__ == "DetachActorWorker"

    # no colocated rollout on the trainer (hybrid_engine=False): separate actor and ref, both TIP's detach worker
    _, workers = _trainer([*recipe_overrides, *SEPARATE, "actor_rollout_ref.hybrid_engine=False"])
    assert workers == {"Actor": TIPDetachActorWorker, "RefPolicy": TIPDetachActorWorker}


def test_lora_student_gets_the_teacher_as_a_separate_ref_in_every_mode(recipe_overrides):
    """verl gives a LoRA job no ref worker (its ref is the actor with the adapters off: ``ref_in_actor``); TIP builds
    the ref from the teacher all the same, and answers ``ref_in_actor`` False, so verl calls that ref."""
    from tip_verl.verl_adapter.teacher import TIPActorRolloutRefWorker, TIPDetachActorWorker

    lora = [*recipe_overrides, "actor_rollout_ref.model.lora_rank=8"]
    for extra, worker in [([], TIPActorRolloutRefWorker),
                          (["trainer.v1.trainer_mode=tip_colocate_async"], TIPActorRolloutRefWorker),
                          ([*SEPARATE, "actor_rollout_ref.model.lora.merge=True"], TIPDetachActorWorker)]:
        trainer, workers = _trainer([*lora, *extra])
        assert workers == {"ActorRolloutRef": worker}, extra
        trainer.ref_in_actor = True  # what verl's _setup decides from the LoRA flags
        assert trainer.ref_in_actor is False


def test_teacher_server_path_keeps_verls_teacher_pool_in_async_modes(recipe_overrides, tiny_assets):
    from tip_verl.verl_adapter.teacher import TIPDetachActorWorker

    server = [o for o in recipe_overrides if not o.startswith(("+tip.", "algorithm.adv_estimator"))] + [
        "algorithm.adv_estimator=grpo", "distillation.enabled=True", "distillation.nnodes=1",
        f"distillation.teacher_models.teacher_model.model_path={tiny_assets.teacher}",
        "distillation.distillation_loss.loss_mode=k1", "distillation.distillation_loss.use_policy_gradient=True",
        "distillation.distillation_loss.use_task_rewards=False", "+tip.method=soft_or"]
    _, workers = _trainer([*server, *SEPARATE])
    assert workers["ActorRollout"] is TIPDetachActorWorker and "TeacherModel" not in workers  # verl's own teacher pool
    colocate, workers = _trainer([*server, "trainer.v1.trainer_mode=tip_colocate_async"])
    assert workers["ActorRollout"].__name__ == "TIPActorRolloutRefWorker" and colocate.tip.teacher_source == "server"
    assert colocate.mapping[next(r for r in colocate.mapping if r.name == "TeacherModel")] == "teacher_pool"


def _job(tmp_path, **over):
    cfg = OmegaConf.create({
        "trainer": {"use_v1": True, "v1": {"trainer_mode": "tip_separate_async", "separate_async": {
            "parameter_sync_step": 2}}},
        "algorithm": {"adv_estimator": "tip_opd", "use_kl_in_reward": False},
        "data": {"train_batch_size": 8},
        "actor_rollout_ref": {"actor": {"use_kl_loss": False, "entropy_coeff": 0.0, "ppo_mini_batch_size": 4},
                              "model": {"lora_rank": 0},
                              "rollout": {"nnodes": 1, "n_gpus_per_node": 1, "checkpoint_engine": {"backend": "nccl"}}},
        "reward": {"reward_model": {"enable": False}},
        "distillation": {"enabled": False},
        "tip": {"teacher_path": str(tmp_path), "method": "soft_or", "ratio": 0.5},
    })
    for key, value in over.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def test_start_up_checks_of_the_async_modes_name_the_flag(tmp_path):
    assert validate_verl_config(_job(tmp_path)).selection.method == "soft_or"
    for mode in ("tip_colocate_async", "tip_sync"):  # the separate pool's settings are not needed there
        validate_verl_config(_job(tmp_path, **{"trainer.v1.trainer_mode": mode,
                                               "actor_rollout_ref.rollout.checkpoint_engine.backend": "naive"}))
    for over, message in [
        ({"trainer.v1.trainer_mode": "colocate_async", "algorithm.adv_estimator": "grpo"},
         "trainer.v1.trainer_mode=colocate_async: OPD with TIP needs trainer.v1.trainer_mode=tip_colocate_async (the "
         "job sets +tip.teacher_path, +tip.method, +tip.ratio): verl's colocate_async trainer with TIP."),
        ({"trainer.v1.trainer_mode": "separate_async", "algorithm.adv_estimator": "grpo"},
         "OPD with TIP needs trainer.v1.trainer_mode=tip_separate_async"),
        ({"trainer.v1.trainer_mode": "separate_async"},
         "algorithm.adv_estimator=tip_opd is computed by the TIP trainer only, but trainer.v1.trainer_mode="
         "separate_async: set trainer.v1.trainer_mode=tip_separate_async."),
        ({"actor_rollout_ref.rollout.n_gpus_per_node": 0},
         "actor_rollout_ref.rollout.n_gpus_per_node=0: trainer.v1.trainer_mode=tip_separate_async generates on a "
         "separate resource pool"),
        ({"actor_rollout_ref.rollout.nnodes": 0}, "actor_rollout_ref.rollout.nnodes=0"),
        ({"actor_rollout_ref.rollout.checkpoint_engine.backend": "naive"},
         "actor_rollout_ref.rollout.checkpoint_engine.backend=naive: trainer.v1.trainer_mode=tip_separate_async "
         "sends the weights"),
        ({"data.train_batch_size": 6},
         "data.train_batch_size=6 must equal trainer.v1.separate_async.parameter_sync_step=2 x "
         "actor_rollout_ref.actor.ppo_mini_batch_size=4"),
        ({"trainer.v1.trainer_mode": "tip_colocate_async", "algorithm.rollout_correction.bypass_mode": True},
         "algorithm.rollout_correction.bypass_mode=True skips verl's old-log-prob pass"),
        ({"actor_rollout_ref.model.lora_rank": 8},
         "actor_rollout_ref.model.lora_rank>0 with trainer.v1.trainer_mode=tip_separate_async: verl's "
         "checkpoint-engine weight sync to the separate rollout pool sends the base weights without the LoRA adapters"),
    ]:
        with pytest.raises(TIPConfigError) as info:
            validate_verl_config(_job(tmp_path, **over))
        assert message in str(info.value), (over, str(info.value))
    # LoRA students: the teacher is the ref in every mode; separate_async with merged weights only
    for mode in ("tip_sync", "tip_colocate_async"):
        validate_verl_config(_job(tmp_path, **{"trainer.v1.trainer_mode": mode, "actor_rollout_ref.model.lora_rank": 8}))
    validate_verl_config(_job(tmp_path, **{"actor_rollout_ref.model.lora_rank": 8, "actor_rollout_ref.model.lora.merge": True}))
    # verl's default parameter_sync_step (4) when the job does not set it
    cfg = _job(tmp_path)
    del cfg.trainer.v1.separate_async["parameter_sync_step"]
    with pytest.raises(TIPConfigError, match=r"parameter_sync_step=4 x"):
        validate_verl_config(cfg)


def test_layout_check_follows_the_local_update_of_separate_async():
    """separate_async runs every pass on train_batch_size / parameter_sync_step prompts (one local update)."""
    from tip_verl.verl_adapter.dp_layout import LOG_PROB_MICRO, layout

    cfg = {"trainer": {"n_gpus_per_node": 1, "nnodes": 1, "v1": {"trainer_mode": "tip_separate_async",
                                                                  "separate_async": {"parameter_sync_step": 2}}},
           "data": {"train_batch_size": 4},
           "actor_rollout_ref": {"actor": {"strategy": "fsdp2", "ppo_mini_batch_size": 2,
                                           "ppo_micro_batch_size_per_gpu": 4},
                                 "rollout": {"n": 2, "log_prob_micro_batch_size_per_gpu": 8},
                                 "ref": {"log_prob_micro_batch_size_per_gpu": 4}}}
    found = layout(cfg)
    assert found.batch == 4 and "parameter_sync_step=2" in found.shares[0].source
    assert [p.split(" does not divide")[0] for p in found.problems] == [f"{LOG_PROB_MICRO}=8"]
    cfg["trainer"]["v1"]["trainer_mode"] = "tip_colocate_async"  # its parameter_sync_step is 1
    assert layout(cfg).batch == 8


def test_staleness_metrics_mirror_verls():
    """verl: trajectory_staleness = (global_steps - 1) - max_global_steps, _worst with min_global_steps, padding
    rows left out."""
    tags = [{"min_global_steps": 4, "max_global_steps": 4}, {"min_global_steps": 2, "max_global_steps": 4},
            {"min_global_steps": 3, "max_global_steps": 3}, {"is_padding": True, "min_global_steps": 0,
                                                              "max_global_steps": 0}]
    keep = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    m = staleness_metrics(tags, 5, keep)
    assert m["tip/staleness_mean"] == pytest.approx(1 / 3) and m["tip/staleness_max"] == 1
    assert m["tip/staleness_worst_mean"] == pytest.approx((0 + 2 + 1) / 3) and m["tip/staleness_worst_max"] == 2
    assert m["tip/stale_sequence_share"] == pytest.approx(2 / 3)
    assert m["tip/stale_kept_share"] == pytest.approx(4 / 6)  # kept tokens of rows 1 and 2 over all kept
    on_policy = staleness_metrics([{"min_global_steps": 2, "max_global_steps": 2}], 3)
    assert on_policy["tip/staleness_max"] == 0 and on_policy["tip/stale_sequence_share"] == 0
    assert staleness_metrics([{"min_global_steps": None, "max_global_steps": None}], 3) == {}


def test_ref_path_applies_verls_rollout_correction_before_selection():
    """The ref-as-teacher path skips verl's _compute_advantage; it runs verl's rollout correction itself: rejection
    sampling removes tokens from the candidates, the IS weights go to verl's loss (at kept tokens only)."""
    from tip_verl.verl_adapter.trainer import rollout_correction, rollout_correction_enabled

    old = torch.zeros(2, 4)
    rollout = torch.tensor([[0.0, -3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # token (0, 1): ratio e^3
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    node = OmegaConf.create({"rollout_is": "token", "rollout_is_threshold": 2.0, "rollout_rs": "token_k1",
                             "rollout_rs_threshold": "0.5_2.0", "bypass_mode": False})
    new_mask, weights, metrics = rollout_correction(node, old_log_probs=old, rollout_log_probs=rollout,
                                                    response_mask=mask)
    assert new_mask.dtype == mask.dtype and new_mask[0, 1] == 0 and new_mask.sum() == mask.sum() - 1
    assert weights is not None and weights.shape == mask.shape and float(weights.max()) <= 2.0
    assert any(key.startswith("rollout_corr/") for key in metrics)
    off = OmegaConf.create({"rollout_is": None, "rollout_rs": None, "bypass_mode": False})
    same, none, _ = rollout_correction(off, old_log_probs=old, rollout_log_probs=rollout, response_mask=mask)
    assert torch.equal(same, mask) and none is None
    assert rollout_correction_enabled(OmegaConf.create({"algorithm": {"rollout_correction": off}}))
    assert not rollout_correction_enabled(OmegaConf.create({"algorithm": {"rollout_correction": {"bypass_mode": True}}}))


@pytest.mark.parametrize("tip", [True, False], ids=["TIPDetachActorWorker", "verl_DetachActorWorker"])
def test_separate_async_worker_keeps_pi_old_on_the_cpu_platform(tiny_assets, tip):
    """verl's DetachActorWorker in one process, with TIP (the TIP actor engine, sparse lm_head) and without:
    save_model_to_cpu / restore_model_from_cpu give every local update of a separate_async step the same pi_old.
    On the CPU verl's .cpu() of a CPU shard is the shard itself; the CPU platform's patch stores a copy, so the
    restore really restores, for verl's own worker as for TIP's."""
    from omegaconf import open_dict
    from verl.experimental.separation.engine_workers import DetachActorWorker
    from verl.single_controller.base.decorator import MAGIC_ATTR

    from tip_verl.verl_adapter import local_workers
    from tip_verl.verl_adapter.opd_config import WORKER_NODE, TIPWorkerConfig
    from tip_verl.verl_adapter.teacher import TIPDetachActorWorker

    local_workers.ensure_cpu_platform()
    local_workers.ensure_world_of_one()
    assert hasattr(DetachActorWorker.save_model_to_cpu, "__tip_verl_patch__")
    assert hasattr(DetachActorWorker.save_model_to_cpu, MAGIC_ATTR)  # still dispatched by verl's worker group
    arr = local_workers.compose_config(str(tiny_assets.student)).actor_rollout_ref.copy()
    if tip:
        with open_dict(arr):
            arr[WORKER_NODE] = TIPWorkerConfig(teacher_path=str(tiny_assets.teacher)).to_node()
    worker = (TIPDetachActorWorker if tip else DetachActorWorker)(config=arr, role="actor_rollout")
    worker.init_model()
    assert type(worker.actor.engine).__name__.startswith("TIPLMHead") == tip  # the sparse lm_head engine
    params = list(worker.actor.engine.module.parameters())

    def values():
        return [getattr(p, "_local_tensor", p).detach().clone() for p in params]

    pi_old = values()
    worker.save_model_to_cpu(0)
    with torch.no_grad():
        for p in params:
            getattr(p, "_local_tensor", p).add_(0.5)  # an update
    updated = values()
    worker.save_model_to_cpu(1)
    worker.restore_model_from_cpu(0)
    assert all(torch.equal(a, b) for a, b in zip(values(), pi_old))
    worker.restore_model_from_cpu(1)
    assert all(torch.equal(a, b) for a, b in zip(values(), updated))
    worker.clear_cpu_model(1)
    assert list(worker.cpu_saved_models) == [0]

"""verl V1 trainer modes ``tip_sync``, ``tip_colocate_async``, ``tip_separate_async``: OPD with TIP token selection.

Each is one of verl's V1 trainers (``PPOTrainerSync``, ``PPOTrainerColocateAsync``, ``PPOTrainerSeparateAsync``)
with :class:`TIPTrainerMixin` first in its MRO, which changes three things:

1. the reference model is always built and is the teacher (:class:`TIPActorRolloutRefWorker`, composed with
   the worker class the verl mode chose: ``DetachActorWorker`` for ``separate_async``), also for a LoRA student,
   whose ref verl would otherwise take from the actor with its adapters off (:attr:`TIPTrainerMixin.ref_in_actor`);
2. ``_compute_advantage`` runs TIP on the driver, once per training batch (per local update when
   ``separate_async`` makes ``parameter_sync_step`` > 1), after verl's old-log-prob pass (student log-probs
   + entropy, recomputed by the policy being updated) and ref pass (teacher log-probs): the kept set does
   not depend on micro-batch size, dynamic batching or data-parallel layout;
3. the keep-mask is written to both ``response_mask`` and ``loss_mask``, so verl's token-mean
   averages over kept tokens only (Eq. 7), its importance ratio and clipping see kept tokens only and
   dropped tokens get no gradient.

Every method the mixin overrides calls ``super()``, so the verl mode's own overrides run inside it
(``separate_async``'s ``_init_resource_pool_mgr`` and its pi_old save/restore ``_compute_old_log_prob``).
verl's base class reads ``self.trainer_mode`` for the mode's semantics and settings (replay buffer,
``trainer.v1.<mode>.*``, checkpointed TransferQueue); the mixin answers with the verl mode it composes with.

Metrics go to verl's own tracker under ``tip/``.
"""

from __future__ import annotations

import contextlib
import logging
from types import ModuleType
from typing import Optional

import ray
import torch
import transfer_queue as tq
from omegaconf import open_dict
from tensordict import TensorDict

from verl.single_controller.ray import ResourcePoolManager
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_colocate_async import PPOTrainerColocateAsync
from verl.trainer.ppo.v1.trainer_separate_async import PPOTrainerSeparateAsync
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_from_nested, response_to_nested

from tip_verl.analysis.records import TokenRecordWriter

from . import topk_signal
from .opd import opd_step, staleness_metrics
from .opd_config import WORKER_NODE, TIPConfigError, validate_verl_config

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _batch_flags(batch, flags: dict):
    """Set non-tensor request flags on a batch for one worker call; always cleared afterwards."""
    batch.extra_info.update(flags)
    try:
        yield
    finally:
        for key in flags:
            batch.extra_info.pop(key, None)


class TIPTrainerMixin:
    """Turns a verl V1 trainer into OPD with TIP token selection.

    Teacher paths: the reference model as teacher (``+tip.teacher_path``), or verl's native
    distillation teacher server (``distillation.enabled=true``), where TIP only masks verl's
    distillation loss. Teacher signal: the sampled token's log-prob, or (``+tip.teacher_signal=topk``)
    the teacher's top-k (:mod:`tip_verl.verl_adapter.topk_signal`).

    A concrete class puts the mixin before a verl trainer and names that trainer's mode in
    :attr:`verl_trainer_mode`.
    """

    #: the verl V1 trainer mode this class adds TIP to (``sync``, ``colocate_async``, ``separate_async``)
    verl_trainer_mode: str = "sync"

    @property
    def trainer_mode(self) -> str:
        """What verl's base class reads to pick the mode's replay buffer, refill, checkpointing and
        ``trainer.v1.<mode>.*`` settings (``parameter_sync_step``): the verl mode, not ``tip_*``."""
        return self.verl_trainer_mode

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:
        # PPOTrainer.__init__ assigns config.trainer.v1.trainer_mode (the tip_* name); kept for the record.
        self.tip_trainer_mode = value

    @property
    def ref_in_actor(self) -> bool:
        """verl's LoRA shortcut (``trainer_base.py`` ``_setup``): the ref is the actor with its adapters off. TIP's
        ref is the teacher, a model of its own, so on the ref-as-teacher path it is never in the actor; verl then
        builds the ref worker and calls ``compute_ref_log_prob`` as for a full-weight student."""
        return self.tip.teacher_source != "ref" and getattr(self, "_verl_ref_in_actor", False)

    @ref_in_actor.setter
    def ref_in_actor(self, value: bool) -> None:
        self._verl_ref_in_actor = bool(value)  # what verl decided from the LoRA flags

    def __init__(self, config):
        # Imported here: teacher.py imports verl's engine workers, which only a running trainer needs (this
        # module is imported, to register it, whenever verl's V1 trainer package is).
        from .teacher import check_teacher_compatible

        self.tip = validate_verl_config(config)
        student, teachers = _resolved_models(config, self.tip)
        _check_resolved_checkpoints({"actor_rollout_ref.model.path": student, **teachers})
        trust = bool(config.actor_rollout_ref.model.get("trust_remote_code", False))
        for flag, teacher in teachers.items():
            sizes = check_teacher_compatible(student, teacher, trust_remote_code=trust)
            if self.tip.teacher_signal == "topk" and self.tip.topk_k > sizes["teacher_vocab_size"]:
                k_flag = "+tip.topk_k" if self.tip.teacher_source == "ref" else "distillation.distillation_loss.topk"
                raise TIPConfigError(
                    f"{k_flag}={self.tip.topk_k} exceeds the teacher's vocabulary size {sizes['teacher_vocab_size']} "
                    f"({flag})."
                )
        # Entropy is normalised by log |V| of the student's output layer (Eq. 2).
        self.tip_vocab_size = int(student.hf_config.vocab_size)
        with open_dict(config.actor_rollout_ref):  # the workers' settings, one node, read once by each worker
            config.actor_rollout_ref[WORKER_NODE] = self.tip.worker_config().to_node()
        super().__init__(config)
        records_dir = self.tip.records_path(config.trainer.default_local_dir)
        self.tip_records = TokenRecordWriter(records_dir, every_n_steps=self.tip.records_every,
                                             max_rows_per_step=self.tip.records_max_rows, seed=self.tip.selection.seed)
        if self.tip.teacher_source == "ref":
            # verl creates a ref only for KL losses (trainer/ppo/utils.py need_reference_policy); OPD needs it.
            self.use_reference_policy = True
        logger.warning("tip_verl: OPD with TIP, teacher=%s, settings=%s",
                       self.tip.teacher_path or "verl distillation teacher server", self.tip.to_dict())

    def _init_resource_pool_mgr(self):
        # verl's mapping first, with the mode's own worker classes (separate_async: DetachActorWorker); each role
        # TIP takes over gets TIP's worker composed with the class verl chose for it (teacher.tip_worker_class).
        super()._init_resource_pool_mgr()
        mapping, pools = self.role_worker_mapping, self.mapping

        def tip_worker(role):
            from .teacher import tip_worker_class

            chosen = mapping[role]
            return ray.remote(tip_worker_class(getattr(chosen, "__ray_actor_class__", chosen)))

        if self.tip.teacher_source == "server":  # verl's teacher pool stays; the actor gets the TIP worker
            for role in (Role.ActorRollout, Role.Actor):
                if role in mapping:
                    mapping[role] = tip_worker(role)
        elif Role.ActorRollout in mapping:  # verl chose no ref: give the hybrid worker one, built from the teacher
            worker = tip_worker(Role.ActorRollout)
            mapping.pop(Role.ActorRollout)
            pools[Role.ActorRolloutRef] = pools.pop(Role.ActorRollout)
            mapping[Role.ActorRolloutRef] = worker
        elif Role.ActorRolloutRef in mapping:
            mapping[Role.ActorRolloutRef] = tip_worker(Role.ActorRolloutRef)
        else:  # separate actor and ref workers (separate_async with actor_rollout_ref.hybrid_engine=False)
            actor = tip_worker(Role.Actor)
            mapping[Role.RefPolicy] = tip_worker(Role.RefPolicy) if Role.RefPolicy in mapping else actor
            mapping[Role.Actor] = actor
            pools.setdefault(Role.RefPolicy, pools[Role.Actor])
        self.resource_pool_manager = ResourcePoolManager(
            resource_pool_spec=self.resource_pool_manager.resource_pool_spec, mapping=pools
        )

    # -- the teacher's top-k (teacher_signal=topk) -------------------------------------------------
    def _compute_old_log_prob(self, batch, metrics: dict):
        if self.tip.teacher_signal != "topk":
            return super()._compute_old_log_prob(batch, metrics)
        if self.tip.teacher_source == "ref":
            # The teacher pass runs first, so the student's pass can gather at the teacher's top-k ids.
            with _batch_flags(batch, {topk_signal.FLAG_TEACHER_TOPK: self.tip.topk_k}):
                super()._compute_ref_log_prob(batch, metrics)
            if batch.fields is not None:  # the worker's fetch selects the listed fields only
                batch.fields = list(dict.fromkeys(
                    [*batch.fields, "ref_log_prob", topk_signal.TEACHER_TOPK_LOGPROBS, topk_signal.TEACHER_TOPK_IDS]
                ))
            source = topk_signal.TEACHER_TOPK_IDS
        else:
            source = topk_signal.NATIVE_TEACHER_IDS
        with _batch_flags(batch, {topk_signal.FLAG_GATHER_IDS: source}):
            return super()._compute_old_log_prob(batch, metrics)

    def _compute_ref_log_prob(self, batch, metrics: dict):
        if self.tip.teacher_signal == "topk" and self.tip.teacher_source == "ref":
            return batch  # already ran, with the top-k, before the old-log-prob pass
        return super()._compute_ref_log_prob(batch, metrics)

    # -- selection -------------------------------------------------------------------------------
    def _tip_signals(self, batch, extra_fields: list[str], optional_fields: tuple[str, ...] = ()):
        """The padded ``[B, T(, k)]`` signals of a batch: student, teacher, entropy, mask, top-k (and
        ``optional_fields`` when the batch has them)."""
        fields = ["response_mask", "old_log_probs", "entropy", *extra_fields]
        topk = self.tip.teacher_signal == "topk"
        if self.tip.teacher_source == "ref":
            fields.append("ref_log_prob")
            if topk:
                fields += [topk_signal.TEACHER_TOPK_LOGPROBS, topk_signal.TEACHER_TOPK_IDS]
        else:
            fields.append(topk_signal.NATIVE_TEACHER_LOGPROBS)
            if topk:
                fields.append(topk_signal.NATIVE_TEACHER_IDS)
        if topk:
            fields.append(topk_signal.STUDENT_TOPK_LOGPROBS)
            if "responses" in extra_fields:  # token records: both models' top choices
                fields += [topk_signal.STUDENT_TOP1_LOGPROB, topk_signal.STUDENT_TOP1_ID]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                               select_fields=[*fields, *optional_fields])
        missing = [f for f in fields if f not in data.keys()]
        if missing:
            raise RuntimeError(
                f"tip_verl: the batch lacks {missing} after verl's log-prob passes; the TIP workers did not run "
                "(an engine other than FSDP's LM-head engine?)."
            )
        nested_mask = data["response_mask"]
        if self.tip.teacher_source == "server":  # verl's teacher fields cover prompt + response: cut the response
            for key in (topk_signal.NATIVE_TEACHER_LOGPROBS, topk_signal.NATIVE_TEACHER_IDS):
                if key in data.keys():
                    data[key] = response_from_nested(data[key], nested_mask)
        padded = data.to_padded_tensor()
        signals = {
            "student_logprobs": padded["old_log_probs"],
            "entropy_nats": padded["entropy"],
            "response_mask": padded["response_mask"],
        }
        if self.tip.teacher_source == "ref":
            signals["teacher_logprobs"] = padded["ref_log_prob"]
            if topk:
                signals["teacher_topk_logprobs"] = padded[topk_signal.TEACHER_TOPK_LOGPROBS]
                signals["teacher_topk_ids"] = padded[topk_signal.TEACHER_TOPK_IDS]
        else:
            teacher = padded[topk_signal.NATIVE_TEACHER_LOGPROBS]
            if topk:
                signals["teacher_topk_logprobs"] = teacher
                signals["teacher_topk_ids"] = padded[topk_signal.NATIVE_TEACHER_IDS]
                signals["teacher_logprobs"] = None  # the server sends only the top-k for top-k losses
            else:
                signals["teacher_logprobs"] = teacher[..., 0]
        if topk:
            signals["student_topk_logprobs"] = padded[topk_signal.STUDENT_TOPK_LOGPROBS]
        return signals, nested_mask, padded

    def _compute_advantage(self, batch, metrics: dict):
        if self.tip.teacher_source == "server":
            # verl's own advantage (task rewards) and its rollout correction (IS weights; rejection sampling
            # removes tokens from response_mask, which TIP then selects from), then TIP masks verl's distillation loss
            batch = super()._compute_advantage(batch, metrics)
        step_index = int(self.global_steps)
        # separate_async with parameter_sync_step > 1 calls this once per local update (mini-batch) of a step
        local_step = int(getattr(self, "local_trigger_step", 0) or 0)
        records = local_step == 0 and self.tip_records.should_write(step_index)
        correction = self.tip.teacher_source == "ref" and rollout_correction_enabled(self.config)
        signals, nested_mask, padded = self._tip_signals(batch, ["responses"] if records else [],
                                                         ("rollout_log_probs",) if correction else ())
        output = {}
        if correction and "rollout_log_probs" in padded.keys():
            # what verl's _compute_advantage does on its own path (decoupled mode): rejection sampling and IS
            # weights from pi_old (the recomputed old log-probs) vs the rollout's log-probs
            mask, weights, correction_metrics = rollout_correction(
                self.config.algorithm.rollout_correction, old_log_probs=padded["old_log_probs"],
                rollout_log_probs=padded["rollout_log_probs"], response_mask=signals["response_mask"])
            metrics.update(correction_metrics)
            signals["response_mask"] = mask
            if weights is not None:
                output["rollout_is_weights"] = response_to_nested(weights.float(), nested_mask)
        response_mask = signals["response_mask"]
        seed = self.tip.selection.seed * 1_000_003 + step_index + local_step * 100_000_007
        step = opd_step(self.tip, vocab_size=self.tip_vocab_size, generator=torch.Generator().manual_seed(seed),
                        **signals)
        metrics.update(step.metrics)
        metrics.update(staleness_metrics(batch.tags, step_index, step.keep_mask))
        if "responses" in padded:
            self.tip_records.maybe_write(
                step_index, selection=step.selection, response_mask=response_mask.bool(),
                token_ids=padded["responses"], sequence_ids=list(batch.keys), extra=_top_choices(signals, padded),
            )
        keep = response_to_nested(step.keep_mask.to(response_mask.dtype), nested_mask)
        output.update(response_mask=keep, loss_mask=keep)
        if self.tip.teacher_source == "ref":
            advantages = response_to_nested(step.advantages.float(), nested_mask)
            output.update(advantages=advantages, returns=advantages)
        return tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(output, batch_size=len(batch))
        )


def rollout_correction_enabled(config) -> bool:
    """Whether verl's own ``_compute_advantage`` would run its rollout correction (decoupled mode: a
    ``algorithm.rollout_correction`` node and no bypass; it then also needs the rollout's log-probs)."""
    node = config.algorithm.get("rollout_correction", None)
    return node is not None and not bool(node.get("bypass_mode", False))


def rollout_correction(node, *, old_log_probs, rollout_log_probs, response_mask):
    """verl's rollout correction on padded ``[B, T]`` tensors: ``(response_mask after rejection sampling, IS
    weights or None, metrics)``, from verl's ``compute_rollout_correction_and_add_to_batch``."""
    from verl import DataProto
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch

    data = DataProto.from_dict(tensors={"old_log_probs": old_log_probs, "rollout_log_probs": rollout_log_probs,
                                        "response_mask": response_mask})
    data, metrics = compute_rollout_correction_and_add_to_batch(data, node)
    weights = data.batch["rollout_is_weights"] if "rollout_is_weights" in data.batch.keys() else None
    return data.batch["response_mask"].to(response_mask.dtype), weights, metrics


def _top_choices(signals: dict, padded) -> dict | None:
    """Token-record columns of both models' most likely tokens (top-k signal only)."""
    teacher_lp = signals.get("teacher_topk_logprobs")
    if teacher_lp is None or topk_signal.STUDENT_TOP1_ID not in padded.keys():
        return None
    best = teacher_lp.argmax(dim=-1, keepdim=True)
    return {
        "teacher_top_id": signals["teacher_topk_ids"].gather(-1, best).squeeze(-1).long(),
        "teacher_top_prob": teacher_lp.gather(-1, best).squeeze(-1).exp(),
        "student_top_id": padded[topk_signal.STUDENT_TOP1_ID].long(),
        "student_top_prob": padded[topk_signal.STUDENT_TOP1_LOGPROB].exp(),
    }


def _check_resolved_checkpoints(models: dict) -> None:
    """The cheap readability check of every checkpoint verl resolved to a local copy (``hdfs://``, ``use_shm``).

    Local folders given on the command line were checked on the driver before Ray
    (:mod:`.preflight`); hub ids load from the Hugging Face cache, as transformers finds them.
    """
    import os

    from .checkpoints import CheckpointError, check_checkpoint_dir

    for flag, model in models.items():
        if model.local_path != model.path and os.path.isdir(str(model.local_path)):
            try:
                check_checkpoint_dir(model.local_path, f"{flag} (resolved by verl)")
            except CheckpointError as e:
                raise TIPConfigError(str(e)) from None


def _resolved_models(config, tip) -> tuple:
    """verl's ``HFModelConfig`` of the student and of each teacher (``{flag: config}``), paths resolved by verl.

    Built as verl builds them, so the check runs on what the workers load: the student as verl's trainer
    does (``omega_conf_to_dataclass(actor_rollout_ref.model)``), the ref-as-teacher with the actor's model
    settings (``use_shm`` included) exactly as :class:`TIPActorRolloutRefWorker` does, a teacher server's
    checkpoint as ``HFModelConfig(path=model_path)`` like verl's teacher loop. Each process resolves the
    path itself (an ``hdfs://`` copy lands in that node's cache), so the workers get the path as given.
    """
    from functools import partial

    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import HFModelConfig

    from .teacher import resolve_model_config, teacher_model_config

    from .preflight import check_checkpoints, checkpoint_flags

    try:  # local folders: one line naming the flag before verl or transformers read them
        check_checkpoints(checkpoint_flags(config, tip))
    except ValueError as e:
        raise TIPConfigError(str(e)) from None
    model_node = config.actor_rollout_ref.model
    use_shm = bool(model_node.get("use_shm", False))
    student = resolve_model_config("actor_rollout_ref.model.path", model_node.path,
                                   partial(omega_conf_to_dataclass, model_node), use_shm=use_shm)
    if tip.teacher_source == "ref":
        flag = "+tip.teacher_path"
        build = partial(teacher_model_config, model_node, tip.teacher_path)
        return student, {flag: resolve_model_config(flag, tip.teacher_path, build, use_shm=use_shm)}
    trust = bool(model_node.get("trust_remote_code", False))
    teachers = {}
    for name, teacher in config.distillation.teacher_models.items():
        if teacher.get("model_path"):
            flag = f"distillation.teacher_models.{name}.model_path"
            build = partial(HFModelConfig, path=teacher.model_path, trust_remote_code=trust)
            teachers[flag] = resolve_model_config(flag, teacher.model_path, build)
    return student, teachers



class TIPTrainerSync(TIPTrainerMixin, PPOTrainerSync):
    """``trainer.v1.trainer_mode=tip_sync``: verl's synchronous trainer running OPD with TIP.

    Registered with verl's ``register_trainer`` by :mod:`tip_verl.verl_adapter.plugin` once verl's V1
    trainer package is imported (so are the two classes below).
    """

    verl_trainer_mode = "sync"


class TIPTrainerColocateAsync(TIPTrainerMixin, PPOTrainerColocateAsync):
    """``trainer.v1.trainer_mode=tip_colocate_async``: verl's ``colocate_async`` trainer (rollout on the training
    devices, partial rollouts continued across weight updates, ``num_warmup_batches`` in flight) with TIP."""

    verl_trainer_mode = "colocate_async"


class TIPTrainerSeparateAsync(TIPTrainerMixin, PPOTrainerSeparateAsync):
    """``trainer.v1.trainer_mode=tip_separate_async``: verl's ``separate_async`` trainer (generation on its own
    resource pool, weights sent over a checkpoint engine, ``parameter_sync_step`` updates per step with pi_old
    kept on the CPU) with TIP; the workers are :class:`~tip_verl.verl_adapter.teacher.TIPDetachActorWorker`."""

    verl_trainer_mode = "separate_async"


#: ``trainer.v1.trainer_mode`` name -> TIP trainer class (the names are :data:`.opd_config.TRAINER_MODES`)
TIP_TRAINERS = {"tip_sync": TIPTrainerSync, "tip_colocate_async": TIPTrainerColocateAsync,
                "tip_separate_async": TIPTrainerSeparateAsync}


def register_trainer_modes(v1: Optional[ModuleType] = None) -> None:
    """Register :data:`TIP_TRAINERS` with verl's ``register_trainer`` (idempotent for the same classes)."""
    if v1 is None:
        from verl.trainer.ppo import v1
    for mode, trainer in TIP_TRAINERS.items():
        v1.register_trainer(mode)(trainer)


# The plugin registers these when verl's V1 package is imported; when this module is what imported it, the
# plugin's hook ran before the classes above existed and left the registration to this line.
register_trainer_modes()


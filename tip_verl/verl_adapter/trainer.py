"""verl V1 trainer mode ``tip_sync``: on-policy distillation with TIP token selection.

It is verl's synchronous trainer (``PPOTrainerSync``) with three changes:

1. the reference model is always built and is the teacher (:class:`TIPActorRolloutRefWorker`);
2. ``_compute_advantage`` runs TIP on the driver, once per training batch, after verl's old-log-prob
   pass (student log-probs + entropy) and ref pass (teacher log-probs): the kept set does not depend
   on micro-batch size, dynamic batching or data-parallel layout;
3. the keep-mask is written to both ``response_mask`` and ``loss_mask``, so verl's token-mean
   averages over kept tokens only (Eq. 7) and dropped tokens get no gradient.

Metrics go to verl's own tracker under ``tip/``.
"""

from __future__ import annotations

import contextlib
import logging

import ray
import torch
import transfer_queue as tq
from omegaconf import open_dict
from tensordict import TensorDict

from verl.single_controller.ray import ResourcePoolManager
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_from_nested, response_to_nested

from tip_verl.analysis.records import TokenRecordWriter

from . import topk_signal
from .opd import opd_step
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
    """

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
        from .teacher import TIPActorRolloutRefWorker

        super()._init_resource_pool_mgr()
        mapping, pools = self.role_worker_mapping, self.mapping
        if self.tip.teacher_source == "server":  # verl's teacher pool stays; the actor gets the TIP worker
            for role in (Role.ActorRollout, Role.Actor):
                if role in mapping:
                    mapping[role] = ray.remote(TIPActorRolloutRefWorker)
        elif Role.ActorRollout in mapping:  # verl chose no ref: give the hybrid worker one, built from the teacher
            mapping.pop(Role.ActorRollout)
            pools[Role.ActorRolloutRef] = pools.pop(Role.ActorRollout)
            mapping[Role.ActorRolloutRef] = ray.remote(TIPActorRolloutRefWorker)
        elif Role.ActorRolloutRef in mapping:
            mapping[Role.ActorRolloutRef] = ray.remote(TIPActorRolloutRefWorker)
        else:  # separate actor / ref workers
            mapping[Role.RefPolicy] = ray.remote(TIPActorRolloutRefWorker)
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
    def _tip_signals(self, batch, extra_fields: list[str]):
        """The padded ``[B, T(, k)]`` signals of a batch: student, teacher, entropy, mask, top-k."""
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
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
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
            # verl's own advantage (task rewards), then TIP masks verl's distillation loss
            batch = super()._compute_advantage(batch, metrics)
        extra = ["responses"] if self.tip_records.should_write(int(self.global_steps)) else []
        signals, nested_mask, padded = self._tip_signals(batch, extra)
        response_mask = signals["response_mask"]
        generator = torch.Generator().manual_seed(self.tip.selection.seed * 1_000_003 + int(self.global_steps))
        step = opd_step(self.tip, vocab_size=self.tip_vocab_size, generator=generator, **signals)
        metrics.update(step.metrics)
        if "responses" in padded:
            self.tip_records.maybe_write(
                int(self.global_steps), selection=step.selection, response_mask=response_mask.bool(),
                token_ids=padded["responses"], sequence_ids=list(batch.keys), extra=_top_choices(signals, padded),
            )
        keep = response_to_nested(step.keep_mask.to(response_mask.dtype), nested_mask)
        output = {"response_mask": keep, "loss_mask": keep}
        if self.tip.teacher_source == "ref":
            advantages = response_to_nested(step.advantages.float(), nested_mask)
            output.update(advantages=advantages, returns=advantages)
        return tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(output, batch_size=len(batch))
        )


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
    trainer package is imported.
    """

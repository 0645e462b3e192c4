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

import logging
import os

import ray
import torch
import transfer_queue as tq
from omegaconf import open_dict
from tensordict import TensorDict

from verl.single_controller.ray import ResourcePoolManager
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from tip_verl.records import TokenRecordWriter

from .opd import opd_step
from .opd_config import ADV_ESTIMATOR, TRAINER_MODE, TIPConfigError, validate_verl_config

logger = logging.getLogger(__name__)


class TIPTrainerMixin:
    """Turns a verl V1 trainer into OPD with the ref as teacher and TIP token selection."""

    def __init__(self, config):
        # Imported here: this module is imported by the verl.plugins entry point during `import verl`,
        # and teacher.py imports verl itself.
        from .teacher import TEACHER_PATH_KEY, check_teacher_compatible

        self.tip = validate_verl_config(config)
        student_path = config.actor_rollout_ref.model.path
        sizes = check_teacher_compatible(
            student_path, self.tip.teacher_path,
            trust_remote_code=bool(config.actor_rollout_ref.model.get("trust_remote_code", False)),
        )
        # Entropy is normalised by log |V| of the student's output layer (Eq. 2).
        self.tip_vocab_size = sizes["student_vocab_size"]
        with open_dict(config.actor_rollout_ref):
            config.actor_rollout_ref[TEACHER_PATH_KEY] = self.tip.teacher_path
        super().__init__(config)
        records_dir = self.tip.records_dir or os.path.join(config.trainer.default_local_dir, "tip_records")
        self.tip_records = TokenRecordWriter(records_dir, every_n_steps=self.tip.records_every,
                                             max_rows_per_step=self.tip.records_max_rows, seed=self.tip.selection.seed)
        # verl creates a ref only for KL losses (trainer/ppo/utils.py need_reference_policy); OPD needs it always.
        self.use_reference_policy = True
        logger.warning("tip_verl: OPD with TIP, teacher=%s, selection=%s", self.tip.teacher_path, self.tip.to_dict())

    def _init_resource_pool_mgr(self):
        from .teacher import TIPActorRolloutRefWorker

        super()._init_resource_pool_mgr()
        mapping, pools = self.role_worker_mapping, self.mapping
        if Role.ActorRollout in mapping:  # verl chose no ref: give the hybrid worker one, built from the teacher
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

    def _compute_advantage(self, batch, metrics: dict):
        fields = ["response_mask", "old_log_probs", "ref_log_prob", "entropy"]
        if self.tip_records.should_write(int(self.global_steps)):
            fields.append("responses")
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        nested_mask = data["response_mask"]
        padded = data.to_padded_tensor()
        response_mask = padded["response_mask"]
        generator = torch.Generator().manual_seed(self.tip.selection.seed * 1_000_003 + int(self.global_steps))
        step = opd_step(
            self.tip,
            student_logprobs=padded["old_log_probs"],
            teacher_logprobs=padded["ref_log_prob"],
            entropy_nats=padded["entropy"],
            response_mask=response_mask,
            vocab_size=self.tip_vocab_size,
            generator=generator,
        )
        metrics.update(step.metrics)
        if "responses" in padded:
            self.tip_records.maybe_write(
                int(self.global_steps), selection=step.selection, response_mask=response_mask.bool(),
                token_ids=padded["responses"], sequence_ids=list(batch.keys), thresholds=self.tip.selection,
            )
        keep = step.keep_mask.to(response_mask.dtype)
        advantages = step.advantages.float()
        output = {
            "advantages": response_to_nested(advantages, nested_mask),
            "returns": response_to_nested(advantages, nested_mask),
            "response_mask": response_to_nested(keep, nested_mask),
            "loss_mask": response_to_nested(keep, nested_mask),
        }
        return tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(output, batch_size=len(batch))
        )


@register_trainer(TRAINER_MODE)
class TIPTrainerSync(TIPTrainerMixin, PPOTrainerSync):
    """``trainer.v1.trainer_mode=tip_sync``: verl's synchronous trainer running OPD with TIP."""


@core_algos.register_adv_est(ADV_ESTIMATOR)
def tip_opd_advantage(*args, **kwargs):
    """Placeholder so ``algorithm.adv_estimator=tip_opd`` validates; the TIP trainer computes it."""
    raise TIPConfigError(
        f"algorithm.adv_estimator={ADV_ESTIMATOR} is computed by the TIP trainer only: "
        f"also set trainer.v1.trainer_mode={TRAINER_MODE} and +tip.teacher_path=..."
    )

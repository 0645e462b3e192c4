"""The worker of OPD with TIP: the reference model is the teacher, the actor's lm_head runs at kept tokens.

verl 0.9.1 builds the reference model from a copy of the actor's model config
(``verl/workers/engine_workers.py``, ``ref_config.model_config = deepcopy(model_config)``), so the ref
is always the initial student. :class:`TIPActorRolloutRefWorker` keeps verl's worker as it is and only swaps
the class that builds the ref (``ActorRolloutRefWorker.ref_worker_cls``) for one that loads the
teacher checkpoint with the actor's model settings (remove-padding, attention implementation,
override_config ...) and verl's own ref engine settings (param offload, micro-batching) unchanged.
The teacher path (``+tip.teacher_path``) is resolved by verl's own ``HFModelConfig``, as the actor's
path is: local folder, hub id, ``hdfs://``, ``use_shm`` (:func:`resolve_model_config`). With a LoRA student the
actor is verl's PEFT model and the teacher loads without adapters (:func:`teacher_model_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from typing import Any, Callable

from omegaconf import open_dict

from verl.experimental.separation.engine_workers import DetachActorWorker
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

from .opd_config import WORKER_NODE, TIPConfigError, TIPWorkerConfig
from .sparse_lm_head import TIPLMHeadTrainingWorker, enable_sparse_lm_head
from .topk_signal import topk_reverse_kl_loss

logger = logging.getLogger(__name__)

class TeacherCompatibilityError(ValueError):
    """Teacher and student cannot be distilled token by token (different tokenizers or vocabularies)."""


def resolve_model_config(flag: str, path: str, build: Callable[[], Any], *, use_shm: bool = False):
    """Run ``build()``, which returns verl's ``HFModelConfig`` of the checkpoint ``path``; a failure becomes one line.

    ``HFModelConfig`` is where verl resolves ``actor_rollout_ref.model.path``: ``verl.utils.fs.copy_to_local
    (path, use_shm=...)`` copies an ``hdfs://`` path to a local cache and, with ``use_shm``, the checkpoint (a
    hub id is downloaded first) into ``/dev/shm``; a local folder or a hub id comes back unchanged and the
    tokenizer and config load from it, a hub id from the local Hugging Face cache (offline) or the hub.
    When that fails, :class:`TIPConfigError` names ``flag``, the path and what was tried, in one line and
    without the traceback from inside transformers.
    """
    try:
        return build()
    except Exception as error:  # huggingface_hub, transformers, hdfs and verl's asserts raise many types
        while type(error).__name__ == "InstantiationException" and error.__cause__ is not None:
            error = error.__cause__  # hydra's wrapper around HFModelConfig(...) (omega_conf_to_dataclass)
        reason = (str(error).strip().splitlines() or [""])[0][:300]
        tried = _resolution_attempts(path, use_shm)
        raise TIPConfigError(
            f"{flag}={path} cannot be loaded the way verl loads a model path: tried {tried} "
            f"({type(error).__name__}: {reason})"
        ) from None


def _resolution_attempts(path: str, use_shm: bool) -> str:
    """What verl's resolution of ``path`` tried, in words (for the one-line error)."""
    from huggingface_hub import constants
    from verl.utils.fs import is_non_local

    if is_non_local(path):
        tried = ["a copy from HDFS into a local cache (verl's copy_to_local)"]
    elif os.path.isdir(path):
        tried = [f"the local folder {os.path.abspath(path)}"]
    else:
        where = (f"the local Hugging Face cache {constants.HF_HUB_CACHE} (offline: HF_HUB_OFFLINE=1)"
                 if constants.is_offline_mode() else
                 f"the Hugging Face cache {constants.HF_HUB_CACHE} and the hub {constants.ENDPOINT}")
        tried = [f"no local folder {os.path.abspath(path)}", f"the hub id {path} in {where}"]
    if use_shm:
        tried.append("a copy into /dev/shm (actor_rollout_ref.model.use_shm=True)")
    return ", then ".join(tried)


def _vocab_and_size(model: Any, trust_remote_code: bool) -> tuple[str, dict, int]:
    """(label, tokenizer vocabulary, config vocab_size) of a checkpoint path or of verl's ``HFModelConfig``."""
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        return str(model), tokenizer.get_vocab(), int(config.vocab_size)
    label = model.path if model.local_path == model.path else f"{model.path} at {model.local_path}"
    return label, model.tokenizer.get_vocab(), int(model.hf_config.vocab_size)


def check_teacher_compatible(student: Any, teacher: Any, *, trust_remote_code: bool = False) -> dict:
    """Check, without loading weights, that the teacher scores the student's tokens.

    ``student`` and ``teacher`` are checkpoint paths or verl's resolved ``HFModelConfig`` (see
    :func:`resolve_model_config`; its tokenizer and config are used). Both tokenizers must map the same
    strings to the same ids. The models' vocabulary (lm_head rows) must match too, except for padding rows
    beyond the tokenizer (Qwen2.5-14B pads to 152,064 and Qwen2.5-1.5B to 151,936: same tokenizer, both
    valid). Returns the sizes it compared.
    """
    s_label, s_vocab, s_size = _vocab_and_size(student, trust_remote_code)
    t_label, t_vocab, t_size = _vocab_and_size(teacher, trust_remote_code)
    if s_vocab != t_vocab:
        differing = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=str)[:5]
        raise TeacherCompatibilityError(
            f"Teacher and student tokenizers differ: student vocab size {len(s_vocab)} ({s_label}), "
            f"teacher vocab size {len(t_vocab)} ({t_label}); first differing (token, id) pairs: {differing}. "
            "OPD compares log-probs token by token, so both models must share one tokenizer."
        )
    if min(s_size, t_size) < len(s_vocab):
        raise TeacherCompatibilityError(
            f"Model vocab sizes do not cover the tokenizer: student vocab size {s_size}, teacher vocab size "
            f"{t_size}, tokenizer size {len(s_vocab)}."
        )
    if s_size != t_size:
        logger.warning(
            "tip_verl: student vocab size %d and teacher vocab size %d differ only by padding rows beyond the "
            "shared tokenizer (%d tokens); sampled-token log-probs are comparable.", s_size, t_size, len(s_vocab)
        )
    return {"tokenizer_size": len(s_vocab), "student_vocab_size": s_size, "teacher_vocab_size": t_size}


def teacher_model_config(actor_model_node: Any, teacher_path: str):
    """verl's ``HFModelConfig`` for the teacher: the actor's model node with the checkpoint swapped.

    ``teacher_path`` is resolved by ``HFModelConfig`` as the student's path is (hub id, local folder,
    ``hdfs://``, the actor's ``use_shm``), in the process that calls this (driver check and worker alike).
    """
    node = copy.deepcopy(actor_model_node)
    with open_dict(node):
        node.path = teacher_path
        # The teacher has its own config and tokenizer files; LoRA (the student's adapters) and MTP never apply to it.
        for key in ("hf_config_path", "tokenizer_path", "local_path", "local_hf_config_path", "local_tokenizer_path",
                    "lora_adapter_path"):
            if key in node:
                node[key] = None
        if "lora_rank" in node:
            node.lora_rank = 0
        if "lora" in node:
            node.lora = {}
    model_config = omega_conf_to_dataclass(node)
    if hasattr(model_config, "mtp"):
        from verl.workers.config import MtpConfig

        model_config.mtp = MtpConfig(enable=False)
    return model_config


class TIPActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's ``ActorRolloutRefWorker`` for OPD with TIP: two inner classes swapped, nothing else.

    * ``ref_worker_cls`` (when the role has a ref): the ref is the teacher checkpoint named by the TIP
      trainer; its engine also answers the teacher top-k requests of ``+tip.teacher_signal=topk``;
    * ``actor_worker_cls``: :class:`~tip_verl.verl_adapter.sparse_lm_head.TIPLMHeadTrainingWorker`,
      whose update step runs the lm_head only at kept tokens (``+tip.sparse_lm_head=false`` turns it off)
      and whose old-log-prob pass gathers the student's log-probs at the teacher's top-k ids; with
      ``+tip.loss=topk_reverse_kl`` its loss is :func:`~tip_verl.verl_adapter.topk_signal.topk_reverse_kl_loss`.

    Its settings are one :class:`~tip_verl.verl_adapter.opd_config.TIPWorkerConfig`, the node
    ``actor_rollout_ref.tip_worker`` that the TIP trainer resolved from ``+tip.*``: parsed here, once,
    and handed to the engines when they are built (:attr:`tip_settings`).

    With verl's native distillation (``distillation.enabled=true``) the role has no ref and the
    teacher is verl's teacher server; only ``actor_worker_cls`` is swapped.
    """

    def __init__(self, config, role: str, distillation_config=None, **kwargs):
        settings = TIPWorkerConfig.from_node(config.get(WORKER_NODE, None))
        teacher_path = settings.teacher_path
        if "ref" in role:
            if not teacher_path:
                raise ValueError(
                    f"TIPActorRolloutRefWorker needs actor_rollout_ref.{WORKER_NODE}.teacher_path; it is set by "
                    "the TIP trainer (trainer.v1.trainer_mode=tip_sync, tip_colocate_async, tip_separate_async) from "
                    "+tip.teacher_path."
                )
        super().__init__(config, role, distillation_config=distillation_config, **kwargs)
        if "ref" in role:
            # The path as +tip.teacher_path gave it: resolved here, on this worker's node, as verl resolves
            # the actor's (verl's teacher servers also resolve on their own node; the driver checked it too).
            teacher_config = resolve_model_config(
                "+tip.teacher_path", teacher_path, functools.partial(teacher_model_config, config.model, teacher_path),
                use_shm=bool(config.model.get("use_shm", False)),
            )

            class _TeacherTrainingWorker(TrainingWorker):
                def __init__(self, config):
                    # verl passes a (frozen) TrainingWorkerConfig whose model_config is a copy of the actor's.
                    super().__init__(dataclasses.replace(config, model_config=teacher_config))
                    # forward-only: the sparse engine's update path never runs; it adds the top-k outputs
                    self.engine = enable_sparse_lm_head(self.engine, settings)

            self.ref_worker_cls = _TeacherTrainingWorker
        self.teacher_path = teacher_path
        self.tip_settings = settings
        actor_cls = TIPLMHeadTrainingWorker.with_settings(settings)
        if settings.loss == "topk_reverse_kl":

            class _TopKLossTrainingWorker(actor_cls):
                def set_loss_fn(self, loss_fn):
                    # verl sets partial(ppo_loss, config=actor_config) (engine_workers.py init_model)
                    actor_config = loss_fn.keywords["config"]
                    super().set_loss_fn(functools.partial(topk_reverse_kl_loss, config=actor_config))

            self.actor_worker_cls = _TopKLossTrainingWorker
        else:
            self.actor_worker_cls = actor_cls


class TIPDetachActorWorker(TIPActorRolloutRefWorker, DetachActorWorker):
    """verl's ``separate_async`` worker with TIP: ``DetachActorWorker`` (it saves the actor's weights to the CPU and
    restores them, so that every mini-batch of a ``parameter_sync_step`` cycle recomputes its old log-probs with
    the same pi_old) and :class:`TIPActorRolloutRefWorker` (the teacher as ref, the actor's sparse lm_head).

    MRO: this class, :class:`TIPActorRolloutRefWorker`, ``DetachActorWorker``, ``ActorRolloutRefWorker``. TIP's
    ``__init__`` runs ``DetachActorWorker.__init__`` (which runs verl's worker's) and then swaps the two inner
    worker classes; ``save_model_to_cpu`` / ``restore_model_from_cpu`` act on ``self.actor.engine.module``, which
    is the TIP actor engine's module (the sparse lm_head changes its forward, not its parameters).

    On tip_verl's CPU platform verl's ``save_model_to_cpu`` is patched to store a copy of the CPU shards
    (``separate_async_pi_old_copy`` in :mod:`tip_verl.verl_adapter.cpu.patches`), for this class and verl's own.
    """


#: verl's worker class for a role -> the TIP worker that composes with it (verl 0.9.1: ``sync`` and
#: ``colocate_async`` use ``ActorRolloutRefWorker``, ``separate_async`` ``DetachActorWorker``)
TIP_WORKERS: dict[type, type] = {ActorRolloutRefWorker: TIPActorRolloutRefWorker, DetachActorWorker: TIPDetachActorWorker}


def tip_worker_class(verl_worker: type) -> type:
    """The TIP worker for a role whose worker verl's trainer mode chose (``verl_worker``, unwrapped from
    ``ray.remote``): TIP's teacher ref and sparse lm_head on top of whatever that class adds."""
    if isinstance(verl_worker, type) and issubclass(verl_worker, TIPActorRolloutRefWorker):
        return verl_worker
    try:
        return TIP_WORKERS[verl_worker]
    except (KeyError, TypeError):
        raise TIPConfigError(
            f"the trainer mode's worker class {getattr(verl_worker, '__qualname__', verl_worker)!r} has no TIP "
            f"counterpart (tip_verl composes TIP with {', '.join(c.__name__ for c in TIP_WORKERS)})."
        ) from None

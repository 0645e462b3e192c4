"""The ``tip`` config node of a verl job, and the start-up checks that OPD with TIP needs.

A job turns TIP on with three things on verl's own command line::

    trainer.v1.trainer_mode=tip_sync algorithm.adv_estimator=tip_opd +tip.teacher_path=/path/to/teacher

(or ``tip_colocate_async`` / ``tip_separate_async``: verl's asynchronous trainers with TIP, :data:`TRAINER_MODES`;
the teacher path takes whatever ``actor_rollout_ref.model.path`` takes: a local folder, a hub id such
as ``Qwen/Qwen3-8B``, ``hdfs://...``), plus any :class:`tip_verl.TIPConfig` field as ``+tip.<field>=...``
(method, ratio, ...), the teacher signal (``+tip.teacher_signal=sampled|topk``, ``+tip.topk_k``) and
the loss (``+tip.loss=pg|topk_reverse_kl``). With verl's own teacher server (``distillation.enabled=true``)
no teacher path and no ``tip_opd`` are given: TIP masks verl's distillation loss. Everything is checked
here, on the driver before Ray starts (:mod:`.preflight` calls :func:`validate_verl_config` from verl's
``validate_config``) and again in the trainer, where the teacher path is also resolved and checked with
verl's own code before any model loads; every error names the offending flag.

What the workers need of it (teacher path, loss, ``+tip.sparse_lm_head``, ``+tip.lm_head_chunk_rows``)
is one :class:`TIPWorkerConfig`, which the trainer writes once as ``actor_rollout_ref.tip_worker`` and
each worker parses once (:class:`~tip_verl.verl_adapter.teacher.TIPActorRolloutRefWorker`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Mapping

from tip_verl.config import TIPConfig
from tip_verl.verl_adapter.dp_layout import config_value as _get  # (standard library only)
from tip_verl.verl_adapter.dp_layout import parameter_sync_step, uses_lora

TRAINER_MODE = "tip_sync"
#: Each TIP trainer mode and the verl V1 trainer mode it adds TIP to (``trainer.v1.trainer_mode``; the TIP
#: trainer is :class:`~tip_verl.verl_adapter.trainer.TIPTrainerMixin` composed with verl's registered class).
TRAINER_MODES = {"tip_sync": "sync", "tip_colocate_async": "colocate_async", "tip_separate_async": "separate_async"}
#: verl's own mode -> the TIP mode to use instead (the start-up message of a verl mode given +tip flags)
TIP_MODE_OF = {verl_mode: tip_mode for tip_mode, verl_mode in TRAINER_MODES.items()}
ADV_ESTIMATOR = "tip_opd"
#: Per-token reverse-KL estimates usable as the OPD advantage (advantage = minus the estimate).
ADVANTAGE_ESTIMATORS = ("k1", "k3")
#: What the teacher hands over per response token: the sampled token's log-prob, or its top-k.
TEACHER_SIGNALS = ("sampled", "topk")
#: The actor loss: policy gradient with advantage -δ at the sampled token, or the direct top-k reverse KL.
LOSSES = ("pg", "topk_reverse_kl")


#: Environment variables of earlier versions; their settings are now the flags named here (see
#: :func:`_check_retired_environment`).
RETIRED_ENV = {"TIP_VERL_SPARSE_LM_HEAD": "+tip.sparse_lm_head=false",
               "TIP_VERL_LM_HEAD_CHUNK_ROWS": "+tip.lm_head_chunk_rows=N"}
#: The node the TIP trainer adds under ``actor_rollout_ref`` (the config every verl worker receives): one
#: :class:`TIPWorkerConfig` as a plain mapping.
WORKER_NODE = "tip_worker"


class TIPConfigError(ValueError):
    """A bad or contradictory flag for OPD with TIP; the message names the flag."""


def _check_rows(flag: str, value: Any) -> int | None:
    """``+tip.lm_head_chunk_rows``: None (the default chunk of 64 MiB of float32 logits), 0 (no chunking) or rows."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TIPConfigError(f"{flag}={value} is invalid: must be an integer >= 0 (0 = no chunking) or null (default).")
    return value


@dataclasses.dataclass(frozen=True)
class TIPWorkerConfig:
    """What the TIP workers need, resolved once on the driver and read once by each worker.

    The TIP trainer writes it as ``actor_rollout_ref.tip_worker`` (:data:`WORKER_NODE`, :meth:`to_node`);
    :class:`~tip_verl.verl_adapter.teacher.TIPActorRolloutRefWorker` parses it in its constructor
    (:meth:`from_node`) and hands it to the engines it builds, which read the attributes, never the
    environment. Per-call facts (which pass a call is) still travel as batch flags
    (:mod:`~tip_verl.verl_adapter.topk_signal`).
    """

    #: the teacher checkpoint the ref worker loads (``+tip.teacher_path``); None on the teacher-server path
    teacher_path: str | None = None
    #: the actor loss (``+tip.loss``): ``pg`` (verl's ppo_loss) or ``topk_reverse_kl``
    loss: str = "pg"
    #: the update step runs the lm_head only at kept tokens (``+tip.sparse_lm_head``)
    sparse_lm_head: bool = True
    #: kept rows per chunk of the chunked lm_head (``+tip.lm_head_chunk_rows``): None = 64 MiB of float32
    #: logits, 0 = the (K, vocab) kept logits in one block
    lm_head_chunk_rows: int | None = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise TIPConfigError(f"+tip.loss={self.loss} is invalid: must be one of {', '.join(LOSSES)}.")
        if not isinstance(self.sparse_lm_head, bool):
            raise TIPConfigError(f"+tip.sparse_lm_head={self.sparse_lm_head} is invalid: must be true or false.")
        _check_rows("+tip.lm_head_chunk_rows", self.lm_head_chunk_rows)
        if self.loss == "topk_reverse_kl" and not self.sparse_lm_head:
            raise TIPConfigError(
                "+tip.loss=topk_reverse_kl is computed from the sparse lm_head's kept-row logits, but "
                "+tip.sparse_lm_head=false turns the sparse lm_head off; drop it or use +tip.loss=pg."
            )

    def to_node(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_node(cls, node: Mapping[str, Any] | None) -> "TIPWorkerConfig":
        """Parse ``actor_rollout_ref.tip_worker`` (absent: the defaults)."""
        node = dict(node or {})
        unknown = sorted(set(node) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TIPConfigError(f"actor_rollout_ref.{WORKER_NODE} has unknown keys {unknown}")
        return cls(**node)


def tip_opd_advantage(*args, **kwargs):
    """verl's advantage estimator ``tip_opd`` (registered by the plugin): a placeholder so the flag validates.

    The TIP trainer computes the advantage itself; reaching this means ``tip_opd`` without a TIP trainer mode.
    """
    raise TIPConfigError(
        f"algorithm.adv_estimator={ADV_ESTIMATOR} is computed by the TIP trainer only: "
        f"also set trainer.v1.trainer_mode={TRAINER_MODE} (or {', '.join(list(TRAINER_MODES)[1:])}) "
        "and +tip.teacher_path=..."
    )


@dataclasses.dataclass(frozen=True)
class TIPRunConfig:
    """Everything under the ``tip`` node: the teacher, the OPD loss and the token selection."""

    teacher_path: str | None  # the ref-as-teacher checkpoint; None with verl's teacher server
    advantage_estimator: str = "k1"
    selection: TIPConfig = dataclasses.field(default_factory=TIPConfig)
    teacher_source: str = "ref"
    teacher_signal: str = "sampled"
    topk_k: int = 64
    loss: str = "pg"
    #: Token records (tip_verl.analysis.records): every N steps a sample of per-token rows; 0 = off.
    records_every: int = 0
    records_max_rows: int = 2000
    records_dir: str | None = None  # default: <trainer.default_local_dir>/tip_records

    #: the actor's lm_head at kept tokens, and its chunk rows (:class:`TIPWorkerConfig`)
    sparse_lm_head: bool = True
    lm_head_chunk_rows: int | None = None

    RUN_KEYS = ("teacher_path", "advantage_estimator", "teacher_signal", "topk_k", "loss", "records_every",
                "records_max_rows", "records_dir", "sparse_lm_head", "lm_head_chunk_rows")

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any] | None, *, teacher_server: Mapping[str, Any] | None = None
                     ) -> "TIPRunConfig":
        """Parse the ``tip`` node. ``teacher_server`` describes verl's native distillation when it is on:
        ``{"loss_mode": str, "use_topk": bool, "topk": int | None}`` (then the teacher is that server)."""
        node = dict(node or {})
        valid = set(cls.RUN_KEYS) | {f.name for f in dataclasses.fields(TIPConfig)}
        for key in node:
            if key not in valid:
                close = difflib.get_close_matches(key, sorted(valid), n=1)
                hint = f" Did you mean +tip.{close[0]}?" if close else ""
                raise TIPConfigError(f"Unknown flag +tip.{key}.{hint} Valid keys: {', '.join(sorted(valid))}.")
        run: dict[str, Any] = {}
        if teacher_server is None:
            run.update(cls._ref_teacher(node))
        else:
            run.update(cls._server_teacher(node, teacher_server))
        for key, lowest in (("records_every", 0), ("records_max_rows", 1)):
            if key in node:
                value = node.pop(key)
                if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                    raise TIPConfigError(f"+tip.{key}={value} is invalid: must be an integer >= {lowest}.")
                run[key] = value
        if "sparse_lm_head" in node:
            value = node.pop("sparse_lm_head")
            if not isinstance(value, bool):
                raise TIPConfigError(f"+tip.sparse_lm_head={value} is invalid: must be true or false.")
            run["sparse_lm_head"] = value
        if "lm_head_chunk_rows" in node:
            run["lm_head_chunk_rows"] = _check_rows("+tip.lm_head_chunk_rows", node.pop("lm_head_chunk_rows"))
        if node.get("records_dir") is not None:
            run["records_dir"] = os.path.expanduser(str(node.pop("records_dir")))
        node.pop("records_dir", None)
        try:
            selection = TIPConfig.from_dict(node)
        except ValueError as e:
            raise TIPConfigError(f"Bad +tip.* flag: {e}") from e
        if run.get("teacher_source") == "server" and selection.importance_weighting:
            raise TIPConfigError(
                "+tip.importance_weighting=True scales the tip_opd advantages of the ref-as-teacher path; verl's "
                "distillation loss (distillation.enabled=true) does not read them. Remove it."
            )
        if run.get("loss") == "topk_reverse_kl" and selection.importance_weighting:
            raise TIPConfigError(
                "+tip.importance_weighting=True scales the policy-gradient advantages; it has no effect on "
                "+tip.loss=topk_reverse_kl. Use +tip.loss=pg with importance weighting."
            )
        if run.get("lm_head_chunk_rows") is not None and not run.get("sparse_lm_head", True):
            raise TIPConfigError(
                f"+tip.lm_head_chunk_rows={run['lm_head_chunk_rows']} is only used with the sparse lm_head; "
                "+tip.sparse_lm_head=false turns it off. Remove one of them."
            )
        parsed = cls(selection=selection, **run)
        parsed.worker_config()  # the workers' settings are checked here too
        return parsed

    @staticmethod
    def _choice(node: dict, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = str(node.pop(key, default))
        if value not in allowed:
            raise TIPConfigError(f"+tip.{key}={value} is invalid: must be one of {', '.join(allowed)}.")
        return value

    @classmethod
    def _ref_teacher(cls, node: dict) -> dict[str, Any]:
        teacher_path = node.pop("teacher_path", None)
        if not teacher_path:
            raise TIPConfigError(
                "+tip.teacher_path is required: the reference model acts as the teacher and is loaded from it "
                "(or use verl's teacher server: distillation.enabled=true)."
            )
        # Any model path verl accepts (local folder, hub id, hdfs://): the trainer resolves and checks it with
        # verl's own code (teacher.resolve_model_config) before any weights load.
        teacher_path = os.path.expanduser(str(teacher_path))
        signal = cls._choice(node, "teacher_signal", TEACHER_SIGNALS, "sampled")
        loss = cls._choice(node, "loss", LOSSES, "pg")
        run: dict[str, Any] = {"teacher_path": teacher_path, "teacher_signal": signal, "loss": loss}
        if "topk_k" in node:
            k = node.pop("topk_k")
            if signal != "topk":
                raise TIPConfigError(f"+tip.topk_k={k} is only used with +tip.teacher_signal=topk.")
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise TIPConfigError(f"+tip.topk_k={k} is invalid: must be an integer >= 1.")
            run["topk_k"] = k
        if loss == "topk_reverse_kl":
            if signal != "topk":
                raise TIPConfigError("+tip.loss=topk_reverse_kl needs the teacher's top-k: set +tip.teacher_signal=topk.")
            if "advantage_estimator" in node:
                raise TIPConfigError(
                    f"+tip.advantage_estimator={node['advantage_estimator']} is only used with +tip.loss=pg "
                    "(+tip.loss=topk_reverse_kl backpropagates the top-k reverse KL directly)."
                )
        run["advantage_estimator"] = cls._choice(node, "advantage_estimator", ADVANTAGE_ESTIMATORS, "k1")
        return run

    @staticmethod
    def _server_teacher(node: dict, server: Mapping[str, Any]) -> dict[str, Any]:
        loss_mode = server["loss_mode"]
        for key, why in (
            ("teacher_path", "the teacher is distillation.teacher_models.*.model_path"),
            ("loss", f"the loss is verl's distillation loss (distillation.distillation_loss.loss_mode={loss_mode})"),
            ("advantage_estimator", f"verl's distillation loss {loss_mode} sets the per-token signal"),
            ("topk_k", "k is distillation.distillation_loss.topk"),
        ):
            if key in node:
                raise TIPConfigError(f"+tip.{key} does not apply with distillation.enabled=true: {why}. Remove it.")
        signal = "topk" if server["use_topk"] else "sampled"
        if "teacher_signal" in node and node.pop("teacher_signal") != signal:
            raise TIPConfigError(
                f"+tip.teacher_signal disagrees with distillation.distillation_loss.loss_mode={loss_mode}: verl's "
                f"teacher server sends the {'top-k' if signal == 'topk' else 'sampled-token'} log-probs for this "
                f"loss, so the TIP signal is {signal}. Drop +tip.teacher_signal or change the loss mode."
            )
        run: dict[str, Any] = {"teacher_path": None, "teacher_source": "server", "teacher_signal": signal}
        if signal == "topk":
            run["topk_k"] = int(server["topk"])
        return run

    def worker_config(self) -> TIPWorkerConfig:
        """The settings the workers receive (as ``actor_rollout_ref.tip_worker``)."""
        return TIPWorkerConfig(teacher_path=self.teacher_path if self.teacher_source == "ref" else None,
                               loss=self.loss, sparse_lm_head=self.sparse_lm_head,
                               lm_head_chunk_rows=self.lm_head_chunk_rows)

    def records_path(self, default_local_dir: str) -> str:
        """Where the token records go: ``+tip.records_dir``, else ``<trainer.default_local_dir>/tip_records``."""
        return self.records_dir or os.path.join(str(default_local_dir), "tip_records")

    def to_dict(self) -> dict[str, Any]:
        run = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "selection"}
        return {**run, **self.selection.to_dict()}


def _teacher_server(config: Any) -> dict[str, Any] | None:
    """verl's native distillation settings when ``distillation.enabled=true`` (else None)."""
    if not bool(_get(config, "distillation.enabled", False)):
        return None
    from verl.trainer.distillation.losses import get_distillation_loss_settings

    loss_mode = str(_get(config, "distillation.distillation_loss.loss_mode", "k3"))
    try:
        settings = get_distillation_loss_settings(loss_mode)
    except ValueError as e:
        raise TIPConfigError(f"distillation.distillation_loss.loss_mode={loss_mode}: {e}") from e
    topk = _get(config, "distillation.distillation_loss.topk", None)
    return {"loss_mode": loss_mode, "use_topk": bool(settings.use_topk), "topk": topk}


def validate_verl_config(config: Any) -> TIPRunConfig:
    """Check a full verl job config for OPD with TIP; return the parsed ``tip`` node.

    Two teacher paths: the reference model as teacher (``+tip.teacher_path``, ``algorithm.adv_estimator=tip_opd``)
    or verl's own distillation teacher server (``distillation.enabled=true``, verl's distillation loss,
    any verl advantage estimator). Raises :class:`TIPConfigError` naming the flag for every setting that
    contradicts OPD with TIP (KL-to-ref losses, entropy bonus, reward models, ...) and for what the trainer mode
    needs (:func:`check_trainer_mode`); a verl mode with TIP flags names its ``tip_`` mode. A LoRA student is fine:
    the ref is still the teacher (``TIPTrainerMixin.ref_in_actor``).
    """
    mode = _get(config, "trainer.v1.trainer_mode")
    adv = _get(config, "algorithm.adv_estimator")
    server = _teacher_server(config)
    suggestion = TIP_MODE_OF.get(mode, TRAINER_MODE)
    if mode not in TRAINER_MODES and adv == ADV_ESTIMATOR:
        raise TIPConfigError(
            f"algorithm.adv_estimator={ADV_ESTIMATOR} is computed by the TIP trainer only, but "
            f"trainer.v1.trainer_mode={mode}: set trainer.v1.trainer_mode={suggestion}."
        )
    if mode not in TRAINER_MODES:
        flags = [f"+tip.{key}" for key in (_get(config, "tip") or {})]
        given = f" (the job sets {', '.join(flags[:3])}{', ...' if len(flags) > 3 else ''})" if flags else ""
        base = f": verl's {mode} trainer with TIP" if mode in TIP_MODE_OF else ""
        raise TIPConfigError(f"trainer.v1.trainer_mode={mode}: OPD with TIP needs trainer.v1.trainer_mode={suggestion}"
                             f"{given}{base}.")
    if server is None and adv != ADV_ESTIMATOR:
        raise TIPConfigError(
            f"algorithm.adv_estimator={adv}: with trainer.v1.trainer_mode={mode} the advantage is the "
            f"teacher's per-token reverse KL; set algorithm.adv_estimator={ADV_ESTIMATOR}."
        )
    if server is not None and adv == ADV_ESTIMATOR:
        raise TIPConfigError(
            f"algorithm.adv_estimator={ADV_ESTIMATOR} is for the ref-as-teacher path; with distillation.enabled=true "
            "the OPD signal is verl's distillation loss: keep a verl estimator (e.g. algorithm.adv_estimator=grpo)."
        )
    if not _get(config, "trainer.use_v1", True):
        raise TIPConfigError("trainer.use_v1=False: tip_verl plugs into verl's V1 trainer; set trainer.use_v1=True.")
    contradictions = [
        ("actor_rollout_ref.actor.use_kl_loss", False,
         "the OPD loss is already the KL to the teacher, and the keep-mask would also mask a KL-to-ref loss"),
        ("algorithm.use_kl_in_reward", False, "the OPD signal already is the per-token KL to the teacher"),
        ("reward.reward_model.enable", False, "OPD needs no reward model"),
    ]
    for flag, want, why in contradictions:
        value = _get(config, flag, want)
        if bool(value) != want:
            raise TIPConfigError(f"{flag}={value} contradicts OPD with TIP ({why}); set {flag}={want}.")
    entropy_coeff = float(_get(config, "actor_rollout_ref.actor.entropy_coeff", 0.0))
    if entropy_coeff != 0.0:
        raise TIPConfigError(
            f"actor_rollout_ref.actor.entropy_coeff={entropy_coeff}: OPD trains on the teacher's signal only; "
            "set actor_rollout_ref.actor.entropy_coeff=0 (an entropy bonus would also act on dropped tokens' mask)."
        )
    run = TIPRunConfig.from_mapping(_get(config, "tip"), teacher_server=server)
    default_local_dir = _get(config, "trainer.default_local_dir")
    if run.records_every > 0 and (run.records_dir or default_local_dir):
        from tip_verl.analysis.records import check_writable_dir  # pandas/pyarrow: only when records are on

        records_dir = run.records_path(default_local_dir)
        try:
            check_writable_dir(records_dir)
        except ValueError as e:
            flag = ("+tip.records_dir" if run.records_dir else
                    "+tip.records_dir (default <trainer.default_local_dir>/tip_records)")
            raise TIPConfigError(f"{flag}={records_dir}: {e}; the token records (+tip.records_every="
                                 f"{run.records_every}) need a writable folder.") from None
    if bool(_get(config, "algorithm.rollout_correction.bypass_mode", False)):
        why = " and gathers the student's top-k log-probs" if run.teacher_signal == "topk" else ""
        raise TIPConfigError(
            "algorithm.rollout_correction.bypass_mode=True skips verl's old-log-prob pass, which computes the "
            f"student's entropy that TIP's selection scores{why} (old_log_probs would be the rollout's own, no "
            "entropy); set it to False (verl's decoupled mode: old log-probs recomputed by the current policy)."
        )
    if run.teacher_signal == "topk":
        if bool(_get(config, "actor_rollout_ref.model.use_fused_kernels", False)):
            raise TIPConfigError(
                "actor_rollout_ref.model.use_fused_kernels=True: the fused kernels never materialise the logits "
                "that the top-k teacher signal is gathered from; set it to False."
            )
    check_trainer_mode(config, mode)
    _check_retired_environment()
    return run


def check_trainer_mode(config: Any, mode: str) -> None:
    """What verl's asynchronous trainer of ``mode`` needs, checked on the driver (verl asserts it in the trainer,
    after Ray started), each with the flag to change.

    ``tip_separate_async`` (verl's ``separate_async``): generation runs on its own resource pool
    (``actor_rollout_ref.rollout.nnodes`` x ``n_gpus_per_node`` devices) and receives the weights over a checkpoint
    engine (``actor_rollout_ref.rollout.checkpoint_engine.backend``; ``naive`` only works in-process, with the
    rollout colocated); one global step is ``parameter_sync_step`` updates of ``ppo_mini_batch_size`` prompts each.
    A LoRA student needs ``model.lora.merge=True`` there: verl's checkpoint-engine sync sends the base weights and
    no adapters otherwise.
    """
    if TRAINER_MODES.get(mode) != "separate_async":
        return
    rollout = "actor_rollout_ref.rollout"
    for key in ("nnodes", "n_gpus_per_node"):
        value = _get(config, f"{rollout}.{key}", 0)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise TIPConfigError(
                f"{rollout}.{key}={value}: trainer.v1.trainer_mode={mode} generates on a separate resource pool of "
                f"{rollout}.nnodes x {rollout}.n_gpus_per_node devices (verl's separate_async); set both > 0."
            )
    backend = _get(config, f"{rollout}.checkpoint_engine.backend", "naive")
    if backend == "naive":
        raise TIPConfigError(
            f"{rollout}.checkpoint_engine.backend=naive: trainer.v1.trainer_mode={mode} sends the weights to the "
            "separate rollout pool over a checkpoint engine; naive works only in-process with a colocated rollout. "
            "Use nccl (GPUs; nixl, mooncake, ... likewise), or tip_gloo on the CPU platform (tip_verl's gloo engine)."
        )
    if uses_lora(config) and not bool(_get(config, "actor_rollout_ref.model.lora.merge", False)):
        raise TIPConfigError(
            f"actor_rollout_ref.model.lora_rank>0 with trainer.v1.trainer_mode={mode}: verl's checkpoint-engine weight "
            "sync to the separate rollout pool sends the base weights without the LoRA adapters, so the rollout would "
            "never generate with the trained student; set actor_rollout_ref.model.lora.merge=True (verl then sends "
            "the merged weights) or use tip_sync / tip_colocate_async."
        )
    steps = parameter_sync_step(config)
    train = _get(config, "data.train_batch_size")
    mini = _get(config, "actor_rollout_ref.actor.ppo_mini_batch_size")
    if isinstance(train, int) and isinstance(mini, int) and steps * mini != train:
        raise TIPConfigError(
            f"data.train_batch_size={train} must equal trainer.v1.separate_async.parameter_sync_step={steps} x "
            f"actor_rollout_ref.actor.ppo_mini_batch_size={mini} with trainer.v1.trainer_mode={mode} (verl's "
            "separate_async trains one mini-batch per local update); change one of them."
        )


def _check_retired_environment() -> None:
    """Earlier versions read ``TIP_VERL_SPARSE_LM_HEAD`` / ``TIP_VERL_LM_HEAD_CHUNK_ROWS`` in the workers; a job
    that still sets them would silently get the defaults, so it stops here naming the flag to use."""
    for name, flag in RETIRED_ENV.items():
        if name in os.environ:
            raise TIPConfigError(f"{name} is no longer read; use {flag} instead (and unset {name}).")

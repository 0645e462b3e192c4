"""The ``tip`` config node of a verl job, and the start-up checks that OPD with TIP needs.

A job turns TIP on with three things on verl's own command line::

    trainer.v1.trainer_mode=tip_sync algorithm.adv_estimator=tip_opd +tip.teacher_path=/path/to/teacher

plus any :class:`tip_verl.TIPConfig` field as ``+tip.<field>=...`` (method, ratio, ...). Everything is
checked here, on the driver, before any model loads; every error names the offending flag.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Mapping

from tip_verl.config import TIPConfig

TRAINER_MODE = "tip_sync"
ADV_ESTIMATOR = "tip_opd"
#: Per-token reverse-KL estimates usable as the OPD advantage (advantage = minus the estimate).
ADVANTAGE_ESTIMATORS = ("k1", "k3")


class TIPConfigError(ValueError):
    """A bad or contradictory flag for OPD with TIP; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class TIPRunConfig:
    """Everything under the ``tip`` node: the teacher, the OPD advantage and the token selection."""

    teacher_path: str
    advantage_estimator: str = "k1"
    selection: TIPConfig = dataclasses.field(default_factory=TIPConfig)
    #: Token records (tip_verl.records): every N steps a sample of per-token rows; 0 = off.
    records_every: int = 0
    records_max_rows: int = 2000
    records_dir: str | None = None  # default: <trainer.default_local_dir>/tip_records

    RUN_KEYS = ("teacher_path", "advantage_estimator", "records_every", "records_max_rows", "records_dir")

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any] | None) -> "TIPRunConfig":
        node = dict(node or {})
        valid = set(cls.RUN_KEYS) | {f.name for f in dataclasses.fields(TIPConfig)}
        for key in node:
            if key not in valid:
                close = difflib.get_close_matches(key, sorted(valid), n=1)
                hint = f" Did you mean +tip.{close[0]}?" if close else ""
                raise TIPConfigError(f"Unknown flag +tip.{key}.{hint} Valid keys: {', '.join(sorted(valid))}.")
        teacher_path = node.pop("teacher_path", None)
        if not teacher_path:
            raise TIPConfigError(
                "+tip.teacher_path is required: the reference model acts as the teacher and is loaded from it."
            )
        teacher_path = os.path.expanduser(str(teacher_path))
        if not os.path.isdir(teacher_path):
            raise TIPConfigError(f"+tip.teacher_path={teacher_path} is not a directory (a Hugging Face checkpoint).")
        estimator = str(node.pop("advantage_estimator", "k1"))
        if estimator not in ADVANTAGE_ESTIMATORS:
            raise TIPConfigError(
                f"+tip.advantage_estimator={estimator} is invalid: must be one of {', '.join(ADVANTAGE_ESTIMATORS)}."
            )
        records = {}
        for key, lowest in (("records_every", 0), ("records_max_rows", 1)):
            if key in node:
                value = node.pop(key)
                if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                    raise TIPConfigError(f"+tip.{key}={value} is invalid: must be an integer >= {lowest}.")
                records[key] = value
        if node.get("records_dir") is not None:
            records["records_dir"] = os.path.expanduser(str(node.pop("records_dir")))
        node.pop("records_dir", None)
        # method=all keeps every token: let it stand alone without also asking for ratio=1.
        if node.get("method") == "all" and "ratio" not in node:
            node["ratio"] = 1.0
        try:
            selection = TIPConfig.from_dict(node)
        except ValueError as e:
            raise TIPConfigError(f"Bad +tip.* flag: {e}") from e
        return cls(teacher_path=teacher_path, advantage_estimator=estimator, selection=selection, **records)

    def to_dict(self) -> dict[str, Any]:
        run = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "selection"}
        return {**run, **self.selection.to_dict()}


def _get(config: Any, dotted: str, default: Any = None) -> Any:
    node = config
    for part in dotted.split("."):
        if node is None:
            return default
        try:
            node = node.get(part, None) if hasattr(node, "get") else getattr(node, part, None)
        except Exception:
            return default
    return default if node is None else node


def validate_verl_config(config: Any) -> TIPRunConfig:
    """Check a full verl job config for OPD with TIP; return the parsed ``tip`` node.

    Raises :class:`TIPConfigError` naming the flag for every setting that contradicts OPD with the
    reference model as teacher (KL-to-ref losses, entropy bonus, reward models, native distillation).
    """
    mode = _get(config, "trainer.v1.trainer_mode")
    adv = _get(config, "algorithm.adv_estimator")
    if mode != TRAINER_MODE:
        raise TIPConfigError(f"trainer.v1.trainer_mode={mode}: OPD with TIP needs trainer.v1.trainer_mode={TRAINER_MODE}.")
    if adv != ADV_ESTIMATOR:
        raise TIPConfigError(
            f"algorithm.adv_estimator={adv}: with trainer.v1.trainer_mode={TRAINER_MODE} the advantage is the "
            f"teacher's per-token reverse KL; set algorithm.adv_estimator={ADV_ESTIMATOR}."
        )
    if not _get(config, "trainer.use_v1", True):
        raise TIPConfigError("trainer.use_v1=False: tip_verl plugs into verl's V1 trainer; set trainer.use_v1=True.")
    contradictions = [
        ("actor_rollout_ref.actor.use_kl_loss", False,
         "the reference model is the teacher and the OPD loss is already the KL to it"),
        ("algorithm.use_kl_in_reward", False, "the OPD advantage already is the per-token KL to the teacher"),
        ("reward.reward_model.enable", False, "OPD needs no reward model"),
        ("distillation.enabled", False,
         "verl's native distillation teacher and the ref-as-teacher path are alternatives; use one"),
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
    lora = _get(config, "actor_rollout_ref.model.lora_rank", 0) or _get(config, "actor_rollout_ref.model.lora.rank", 0)
    if lora and int(lora) > 0:
        raise TIPConfigError(
            "actor_rollout_ref.model.lora_rank>0: with LoRA verl uses the adapter-free actor as the reference, "
            "so the ref cannot be a separate teacher. Disable LoRA for OPD with TIP."
        )
    run = TIPRunConfig.from_mapping(_get(config, "tip"))
    return run

"""TIP's start-up checks on the driver, before Ray starts: a bad TIP flag fails in seconds, not minutes.

verl's ``main_ppo`` runs on the driver, before ``ray.init``: Hydra's composition, ``auto_set_device``
and ``verl.utils.config.validate_config(config, ...)`` (``trainer/main_ppo.py``, ``main``). The trainer's
own checks (:class:`~tip_verl.verl_adapter.trainer.TIPTrainerMixin`) only run inside verl's task runner,
after Ray, TransferQueue and a ~950-line config dump. So the ``verl.plugins`` entry point wraps
``verl.utils.config.validate_config`` (:func:`install`, when verl imports that module, i.e. before
``main_ppo`` binds the name): for a job that uses TIP (:func:`uses_tip`) the wrapper first runs
:func:`check_tip_job` -- every flag check of :func:`~.opd_config.validate_verl_config` and the cheap
readability check of each local checkpoint (:mod:`.checkpoints`) -- and the data-parallel layout check
(:mod:`.dp_layout`: micro-batch sizes that cannot divide a rank's share, which verl would only find on the
workers after the models loaded), then verl's own validation. A job that does not use TIP goes straight to
verl's function, unchanged, except on tip_verl's CPU platform (``VERL_PLATFORM=cpu``), where the layout check
runs for every job.

The error is ``TIPStartupError`` (:func:`startup_error_class`), a :class:`~.opd_config.TIPConfigError` that is also Hydra's
``CompactHydraException``: Hydra prints its one-line message without a traceback and exits with status 1.
Checks that need the models (tokenizers, vocabulary sizes, hub ids, ``hdfs://`` copies) still run in the
trainer, before any model loads and before any rollout.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import TYPE_CHECKING, Any

# Only the standard library at import time: :func:`install` runs inside ``import verl`` (the plugin must not
# import anything there, tests/unit/test_plugin.py); the checks import what they need when a job is validated.
if TYPE_CHECKING:
    from .opd_config import TIPRunConfig

VERL_MODULE = "verl.utils.config"
ATTR = "validate_config"


@functools.lru_cache(maxsize=None)
def startup_error_class() -> type:
    """:class:`TIPStartupError`: a :class:`~.opd_config.TIPConfigError` that is also Hydra's ``CompactHydraException``
    (Hydra prints only its message, one line naming the flag). Built on first use (imports Hydra)."""
    from hydra.errors import CompactHydraException

    from .opd_config import TIPConfigError

    return type("TIPStartupError", (TIPConfigError, CompactHydraException),
                {"__doc__": "A TIP start-up error on the driver (one line naming the flag).", "__module__": __name__})


def __getattr__(name: str):
    if name == "TIPStartupError":
        return startup_error_class()
    raise AttributeError(name)


def uses_tip(config: Any) -> bool:
    """True when the job asks for TIP: a TIP trainer mode (``tip_sync``, ``tip_colocate_async``,
    ``tip_separate_async``), the ``tip_opd`` estimator or any ``+tip.*`` flag."""
    from .opd_config import ADV_ESTIMATOR, TRAINER_MODES, _get

    return (_get(config, "trainer.v1.trainer_mode") in TRAINER_MODES
            or _get(config, "algorithm.adv_estimator") == ADV_ESTIMATOR
            or _get(config, "tip") is not None)


def checkpoint_flags(config: Any, run: "TIPRunConfig") -> dict[str, str]:
    """``{flag: path}`` of every checkpoint the TIP job loads (student, teacher or teacher-server models)."""
    from .opd_config import _get

    flags: dict[str, str] = {}
    model = _get(config, "actor_rollout_ref.model")
    if model is not None and not _get(model, "hf_config_path") and _get(model, "path"):
        flags["actor_rollout_ref.model.path"] = str(_get(model, "path"))
    if run.teacher_source == "ref" and run.teacher_path:
        flags["+tip.teacher_path"] = run.teacher_path
    elif run.teacher_source == "server":
        teachers = _get(config, "distillation.teacher_models") or {}
        for name in teachers:
            path = _get(teachers[name], "model_path")
            if path:
                flags[f"distillation.teacher_models.{name}.model_path"] = str(path)
    return flags


def check_checkpoints(flags: dict[str, str]) -> None:
    """The cheap readability check (:func:`.checkpoints.check_checkpoint_dir`) of each local checkpoint path.

    Hub ids and remote URIs are left to verl's resolution, which the trainer runs and checks.
    """
    from .checkpoints import check_checkpoint_dir, is_local_path

    for flag, path in flags.items():
        if is_local_path(path):
            check_checkpoint_dir(path, flag)


def check_tip_job(config: Any) -> "TIPRunConfig":
    """Every TIP check that needs no model: flags, contradictions, output folders, local checkpoints."""
    from .opd_config import validate_verl_config

    run = validate_verl_config(config)
    check_checkpoints(checkpoint_flags(config, run))
    return run


def on_cpu_platform(config: Any) -> bool:
    """True for a job on tip_verl's CPU platform (``VERL_PLATFORM=cpu`` or ``trainer.device=cpu``)."""
    from .dp_layout import config_value as _get

    return (os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"
            or str(_get(config, "trainer.device", "")).lower() == "cpu")


def preflight(config: Any, *, use_reference_policy: bool = True) -> "TIPRunConfig | None":
    """:func:`check_tip_job` and the data-parallel layout check for a job that uses TIP (None otherwise; the layout
    check also runs for any job on the CPU platform); errors as ``TIPStartupError`` (:func:`startup_error_class`)."""
    tip = uses_tip(config)
    if not tip and not on_cpu_platform(config):
        return None
    from .checkpoints import CheckpointError
    from .dp_layout import DataParallelLayoutError, check_layout
    from .opd_config import TIPConfigError

    try:
        run = check_tip_job(config) if tip else None
        # the ref-as-teacher pass runs although verl's need_reference_policy() says no ref (no KL loss / reward)
        ref_pass = use_reference_policy or (run is not None and run.teacher_source == "ref")
        check_layout(config, use_reference_policy=ref_pass)
        return run
    except (TIPConfigError, CheckpointError, DataParallelLayoutError) as e:
        raise startup_error_class()(f"tip_verl: {e}") from None


def _use_reference_policy(args: tuple, kwargs: dict) -> bool:
    """verl's ``validate_config(config, use_reference_policy, use_critic)`` argument (True when not given)."""
    if "use_reference_policy" in kwargs:
        return bool(kwargs["use_reference_policy"])
    return bool(args[0]) if args else True


def _wrap(validate_config):
    @functools.wraps(validate_config)
    def validate_config_with_tip(config, *args, **kwargs):
        preflight(config, use_reference_policy=_use_reference_policy(args, kwargs))
        return validate_config(config, *args, **kwargs)

    validate_config_with_tip.__tip_verl_preflight__ = True
    return validate_config_with_tip


def install(module: ModuleType) -> None:
    """Wrap ``module.validate_config`` (verl's ``verl.utils.config``) with :func:`preflight`; idempotent."""
    original = getattr(module, ATTR)
    if not getattr(original, "__tip_verl_preflight__", False):
        setattr(module, ATTR, _wrap(original))

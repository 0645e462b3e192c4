"""Entry point of group ``verl.plugins`` (``setup.py``): the one place that registers tip_verl with verl.

verl imports this module on every ``import verl`` (driver, Ray workers, scripts), so it costs nothing
there: every registration that needs a heavy verl module waits until verl itself imports that module
(:func:`~tip_verl.verl_adapter._import_hooks.when_imported`), in the process that uses it.

========================================  =================================  =========================
what                                      verl registry (module)             when
========================================  =================================  =========================
``algorithm.adv_estimator=tip_opd``       ``register_adv_est``               import of
                                          (``verl.trainer.ppo.core_algos``)  ``core_algos``
``trainer.v1.trainer_mode=tip_sync``,     ``register_trainer``               import of verl's V1
``tip_colocate_async``,                   (``verl.trainer.ppo.v1``)          trainer package
``tip_separate_async``
checkpoint engine ``tip_gloo`` (weights   ``CheckpointEngineRegistry``       import of
to a separate rollout pool over gloo,     (``verl.checkpoint_engine``)       ``verl.checkpoint_engine``
:mod:`.gloo_checkpoint_engine`)
TIP's start-up checks on the driver,      wraps ``validate_config``          import of
before Ray (:mod:`.preflight`)            (``verl.utils.config``)            ``verl.utils.config``
CPU platform, engines, ``hf`` rollout,    see :mod:`.cpu`                    only with
patches                                                                      ``VERL_PLATFORM=cpu``
========================================  =================================  =========================

:func:`register` is re-entrant: calling it again (or after the modules are loaded) registers what is
missing and nothing twice. verl swallows plugin import errors at debug level, so failures are logged at
WARNING.
"""

from __future__ import annotations

import sys
from types import ModuleType

from tip_verl.verl_adapter import cpu, preflight
from tip_verl.verl_adapter._import_hooks import when_imported

ADV_ESTIMATOR_MODULE = "verl.trainer.ppo.core_algos"
TRAINER_MODULE = "verl.trainer.ppo.v1"
CHECKPOINT_ENGINE_MODULE = "verl.checkpoint_engine"
TIP_TRAINER_MODULE = "tip_verl.verl_adapter.trainer"


def _register_adv_estimator(core_algos: ModuleType) -> None:
    from tip_verl.verl_adapter.opd_config import ADV_ESTIMATOR, tip_opd_advantage

    if core_algos.ADV_ESTIMATOR_REGISTRY.get(ADV_ESTIMATOR) is not tip_opd_advantage:
        core_algos.register_adv_est(ADV_ESTIMATOR)(tip_opd_advantage)


def _register_trainer_mode(v1: ModuleType) -> None:
    trainer = sys.modules.get(TIP_TRAINER_MODULE)
    if trainer is not None and not hasattr(trainer, "register_trainer_modes"):
        # tip_verl's trainer module is being imported and is what imported verl's V1 package: its
        # classes do not exist yet, and its last line registers them (tip_sync, tip_*_async).
        return
    from tip_verl.verl_adapter.trainer import register_trainer_modes

    register_trainer_modes(v1)


def _register_checkpoint_engine(_module: ModuleType) -> None:
    from tip_verl.verl_adapter import gloo_checkpoint_engine

    gloo_checkpoint_engine.register()


def register() -> None:
    """Register everything tip_verl adds to verl (idempotent; each part decides whether it applies)."""
    # CPU platform + FSDP2 engines + "hf" rollout; a no-op unless VERL_PLATFORM=cpu. First: the trainer's
    # engines resolve the platform when they are built.
    cpu.register()
    when_imported(ADV_ESTIMATOR_MODULE, _register_adv_estimator)
    when_imported(TRAINER_MODULE, _register_trainer_mode)
    when_imported(CHECKPOINT_ENGINE_MODULE, _register_checkpoint_engine)
    # main_ppo calls verl.utils.config.validate_config on the driver before ray.init; a job without TIP
    # passes straight through the wrapper.
    when_imported(preflight.VERL_MODULE, preflight.install)


register()

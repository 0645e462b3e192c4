"""tip_verl's CPU backend for verl 0.9.1: a ``cpu`` platform, FSDP2 engines for it and an ``hf`` rollout.

Selected per process by the environment variable ``VERL_PLATFORM=cpu`` — verl's own platform
switch (``verl/plugin/platform/platform_manager.py``). Ray workers inherit it from the driver (and
``cpu_overrides()`` also puts it in Ray's ``runtime_env``). Without it :func:`register` does nothing,
so a GPU job with tip_verl installed behaves exactly as before.

What :func:`register` does when the CPU platform is selected, all through verl's extension points:

1. ``PlatformRegistry.register("cpu")`` -> :class:`.platform.PlatformCPU` (gloo, host memory).
2. ``EngineRegistry.register(..., device="cpu")`` -> verl's FSDP engines with start-up checks.
3. ``RolloutReplicaRegistry.register("hf", ...)`` and the rollout-adapter table -> the Hugging Face
   ``generate`` rollout server (:mod:`.hf_rollout`), ``actor_rollout_ref.rollout.name=hf``.
4. Four small named patches (:mod:`.patches`), each documented with the verl line it works around.

It is called from the ``verl.plugins`` entry point on every ``import verl`` (driver and Ray
workers). verl swallows plugin import errors at debug level, so failures are logged here at
WARNING (and re-raised only with ``strict=True``).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

logger = logging.getLogger(__name__)

PLATFORM_ENV = "VERL_PLATFORM"
ROLLOUT_NAME = "hf"

_registered = False
_deferred = False


def cpu_platform_selected() -> bool:
    """True when this process asked verl for the CPU platform (``VERL_PLATFORM=cpu``)."""
    return os.environ.get(PLATFORM_ENV, "").strip().lower() == "cpu"


def register_rollout() -> None:
    """Register the ``hf`` rollout: the replica (public API) and the in-worker server adapter.

    ``verl/workers/rollout/base.py:89`` keeps the adapter table ``_ROLLOUT_REGISTRY`` (looked up by
    ``get_rollout_class``) without a public register function in 0.9.1, so the entry is added
    there directly, only if absent.
    """
    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    def _load_hf_replica():
        from tip_verl.verl_adapter.cpu.hf_rollout import HFRolloutReplica

        return HFRolloutReplica

    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_hf_replica)
    rollout_base._ROLLOUT_REGISTRY.setdefault(
        (ROLLOUT_NAME, "async"), "tip_verl.verl_adapter.cpu.hf_rollout.HFServerAdapter"
    )


def register(force: bool = False, strict: bool = False) -> bool:
    """Register the CPU backend with verl if the CPU platform is selected (or ``force``).

    Returns True when registered. Idempotent. A failure is logged at WARNING (with the traceback)
    and, unless ``strict``, not raised: the ``verl.plugins`` entry point must not stop other
    registrations, and verl would hide the exception anyway; verl then reports the missing ``cpu``
    platform ("Unknown platform 'cpu'") right after the warning.
    """
    global _registered
    if _registered:
        return True
    if not (force or cpu_platform_selected()):
        return False
    partial = sys.modules.get(f"{__name__}.platform")
    if partial is not None and not hasattr(partial, "register_platform"):
        # A direct import of cpu.platform imports verl, whose plugin loader calls us back before
        # platform.py has finished: platform.py calls register() again at its end.
        global _deferred
        _deferred = True
        logger.debug("tip_verl: CPU registration deferred until cpu.platform has loaded")
        return False
    step = "platform"
    try:
        from tip_verl.verl_adapter.cpu import patches, platform

        with warnings.catch_warnings():
            # Importing verl.workers.engine warns once per optional engine that is not installed
            # (torchtitan, veomni, megatron, ...); none of them runs on the CPU, so keep CPU logs clean.
            warnings.filterwarnings("ignore", message=r".*engine is not available", category=UserWarning)
            platform.register_platform()
            step = "patches"
            # Patch before the engine/worker modules bind names from verl.utils.distributed.
            patches.apply_all()
            step = "engines"
            platform.register_engines()
            step = "rollout"
            register_rollout()
    except Exception:
        logger.warning("tip_verl: registering the CPU backend with verl failed at step %r", step, exc_info=True)
        if strict:
            raise
        return False
    _registered = True
    logger.debug("tip_verl: CPU backend registered (patches: %s)", patches.applied_patches())
    return True


def is_registered() -> bool:
    return _registered


def registration_deferred() -> bool:
    """True while a direct import of ``cpu.platform`` is loading verl (see :func:`register`)."""
    return _deferred


def finish_deferred_registration() -> None:
    """Called at the end of ``cpu.platform``: register the CPU backend, then the trainer mode."""
    global _deferred
    if not _deferred:
        return
    _deferred = False
    register()
    from tip_verl.verl_adapter.plugin import register_trainer_mode

    register_trainer_mode()

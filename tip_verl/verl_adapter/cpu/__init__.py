"""tip_verl's CPU backend for verl 0.9.1: a ``cpu`` platform, FSDP2 engines for it and an ``hf`` rollout.

Selected per process by the environment variable ``VERL_PLATFORM=cpu`` — verl's own platform
switch (``verl/plugin/platform/platform_manager.py``). Ray workers inherit it from the driver (and
``cpu_overrides()`` also puts it in Ray's ``runtime_env``). Without it :func:`register` does nothing,
so a GPU job with tip_verl installed behaves exactly as before.

What :func:`register` does when the CPU platform is selected, all through verl's extension points:

1. ``PlatformRegistry.register("cpu")`` -> :class:`.platform.PlatformCPU` (gloo, host memory), at once.
2. ``EngineRegistry.register(..., device="cpu")`` -> verl's FSDP engines with start-up checks, when
   verl imports ``verl.workers.engine``.
3. ``RolloutReplicaRegistry.register("hf", ...)`` and the rollout-adapter table -> the Hugging Face
   ``generate`` rollout server (:mod:`.hf_rollout`), ``actor_rollout_ref.rollout.name=hf``, when verl
   imports its rollout modules.
4. Six small named patches (:mod:`.patches`), each documented with the verl line it works around,
   each applied when verl imports the module it patches.

Steps 2-4 wait for their verl module (:func:`~tip_verl.verl_adapter._import_hooks.when_imported`), so
``import verl`` stays as cheap on the CPU as elsewhere. It is called by the ``verl.plugins`` entry point
(:mod:`tip_verl.verl_adapter.plugin`) on every ``import verl`` (driver and Ray workers). verl swallows
plugin import errors at debug level, so failures are logged here at WARNING (and re-raised only with
``strict=True``).
"""

from __future__ import annotations

import logging
import os
import warnings

from tip_verl.verl_adapter._import_hooks import when_imported

logger = logging.getLogger(__name__)

PLATFORM_ENV = "VERL_PLATFORM"
ROLLOUT_NAME = "hf"

_registered = False


def cpu_platform_selected() -> bool:
    """True when this process asked verl for the CPU platform (``VERL_PLATFORM=cpu``)."""
    return os.environ.get(PLATFORM_ENV, "").strip().lower() == "cpu"


def _load_hf_replica():
    from tip_verl.verl_adapter.cpu.hf_rollout import HFRolloutReplica

    return HFRolloutReplica


def _register_hf_replica(replica_module) -> None:
    """The ``hf`` rollout replica, through verl's public ``RolloutReplicaRegistry`` (loaded on first use)."""
    replica_module.RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_hf_replica)


def _register_hf_adapter(rollout_base) -> None:
    """The in-worker ``hf`` server adapter.

    ``verl/workers/rollout/base.py:89`` keeps the adapter table ``_ROLLOUT_REGISTRY`` (looked up by
    ``get_rollout_class``) without a public register function in 0.9.1, so the entry is added
    there directly, only if absent.
    """
    rollout_base._ROLLOUT_REGISTRY.setdefault(
        (ROLLOUT_NAME, "async"), "tip_verl.verl_adapter.cpu.hf_rollout.HFServerAdapter"
    )


def _register_engines(_engine_module) -> None:
    from tip_verl.verl_adapter.cpu import platform

    platform.register_engines()


def register(strict: bool = False) -> bool:
    """Register the CPU backend with verl if the CPU platform is selected.

    Returns True when registered (or already registered). Idempotent. A failure is logged at WARNING
    (with the traceback) and, unless ``strict``, not raised: the ``verl.plugins`` entry point must not
    stop other registrations, and verl would hide the exception anyway; verl then reports the missing
    ``cpu`` platform ("Unknown platform 'cpu'") right after the warning.
    """
    global _registered
    if _registered:
        return True
    if not cpu_platform_selected():
        return False
    try:
        from tip_verl.verl_adapter.cpu import patches, platform

        # Importing verl.workers.engine warns once per optional engine that is not installed (torchtitan,
        # veomni, megatron, ...); none of them runs on the CPU, so keep CPU logs clean.
        warnings.filterwarnings("ignore", message=r".*engine is not available", category=UserWarning,
                                module=r"verl\.workers\.engine")
        platform.register_platform()
        # Each patch lands when its module is imported, before verl's engine/worker modules bind names from it.
        patches.apply_when_imported()
        when_imported("verl.workers.engine", _register_engines)
        when_imported("verl.workers.rollout.replica", _register_hf_replica)
        when_imported("verl.workers.rollout.base", _register_hf_adapter)
    except Exception:
        logger.warning("tip_verl: registering the CPU backend with verl failed", exc_info=True)
        if strict:
            raise
        return False
    _registered = True
    logger.debug("tip_verl: CPU backend registered")
    return True


def is_registered() -> bool:
    return _registered

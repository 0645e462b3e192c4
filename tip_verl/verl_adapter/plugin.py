"""Entry point of group ``verl.plugins``: verl imports this module on every ``import verl``.

Keep it tiny. Each line registers one part of tip_verl with verl through verl's extension points;
each registration decides for itself whether it applies to this process.
"""

import logging

from tip_verl.verl_adapter import cpu as _cpu


def register_trainer_mode() -> None:
    """Trainer mode ``tip_sync`` + advantage estimator ``tip_opd`` (registered on import of the trainer).

    verl swallows plugin import errors at debug level, so say it loudly here.
    """
    try:
        from tip_verl.verl_adapter import trainer  # noqa: F401
    except Exception:  # pragma: no cover - only on a broken install
        logging.getLogger(__name__).warning(
            "tip_verl: could not register trainer mode tip_sync (OPD with TIP)", exc_info=True
        )


# CPU platform + FSDP2 engines + "hf" rollout; a no-op unless VERL_PLATFORM=cpu.
_cpu.register()
# The trainer imports verl's engines, which need the platform: when the CPU registration waits for
# cpu.platform to finish loading, that module registers the trainer afterwards.
if not _cpu.registration_deferred():
    register_trainer_mode()

"""Entry point of group ``verl.plugins``: verl imports this module on every ``import verl``.

Keep it tiny. Each line registers one part of tip_verl with verl through verl's extension points;
each registration decides for itself whether it applies to this process.
"""

from tip_verl.verl_adapter import cpu as _cpu

# CPU platform + FSDP2 engines + "hf" rollout; a no-op unless VERL_PLATFORM=cpu.
_cpu.register()

# Trainer mode `tip_sync` + advantage estimator `tip_opd` (OPD with TIP, the ref model as teacher).
# verl swallows plugin import errors at debug level, so say it loudly here.
try:
    from tip_verl.verl_adapter import trainer as _trainer  # noqa: E402,F401  (registers on import)
except Exception:  # pragma: no cover - only on a broken install
    import logging

    logging.getLogger(__name__).warning(
        "tip_verl: could not register trainer mode tip_sync (OPD with TIP)", exc_info=True
    )

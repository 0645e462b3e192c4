"""verl glue for tip_verl (verl 0.9.1); the ``tip_verl`` core above it never imports verl.

Importing this package imports nothing; most modules below import verl, a few stay light on purpose
(:mod:`.cpu_overrides`, :mod:`.console_metrics`, :mod:`.opd_config`, :mod:`.cpu.checks`: shell scripts call them).

- :mod:`.plugin` — the ``verl.plugins`` entry point: registers the trainer modes ``tip_sync``, ``tip_colocate_async``
  and ``tip_separate_async``, the ``tip_opd``
  advantage estimator and, with ``VERL_PLATFORM=cpu``, the CPU backend (:mod:`.cpu`), each when verl imports
  the registry it goes into (:mod:`._import_hooks`), so ``import verl`` costs nothing more.
- :mod:`.opd_config` — the ``tip`` config node and the start-up checks; :mod:`.opd` — one OPD step
  (selection, advantages, metrics) from the padded signals.
- :mod:`.trainer` — the TIP trainers: verl's V1 trainers (``sync``, ``colocate_async``, ``separate_async``) with TIP's
  advantage step (:class:`~.trainer.TIPTrainerMixin`).
- :mod:`.teacher` — the teacher as verl's ref worker; :mod:`.sparse_lm_head` — the lm_head at kept rows and the
  teacher's top-k pass; :mod:`.topk_signal` — the teacher top-k signal and the direct top-k reverse-KL loss.
- :mod:`.cpu` — the CPU platform, engines and ``hf`` rollout; :mod:`.cpu_overrides` — the flags a CPU run
  needs; :mod:`.local_workers` — verl's workers in one process, without Ray (tests, benchmarks).
"""

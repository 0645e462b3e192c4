"""Tiny, deterministic, offline assets for tests and the CPU demo.

``build_assets()`` makes (once, then reuses) a directory with

* ``student/`` and ``teacher/``: ``Qwen2ForCausalLM`` checkpoints (float32, untied embeddings), each
  saved with the tiny tokenizer; the teacher is trained on the task, the student much less;
* ``data/train.parquet`` and ``data/test.parquet``: the addition task in verl's RL dataset layout;
* ``reward.py``: the rule reward (``compute_score``) for ``reward.custom_reward_function.path``;
* ``manifest.json``: the build config, measured accuracies and timings, the sha256 of every file.

No network, no model hub: everything is generated from the seed.

Modules: ``cache`` (paths, manifest, whether a cached build can be reused), ``locking`` (one builder at
a time, the build renamed into place), ``build`` (:class:`BuildConfig` and the build and training
themselves), ``tokenizer`` / ``task`` / ``models`` / ``reward`` (the pieces), ``cli``
(``tip-verl-build-assets``); this file is the public API.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional, Union

from .build import DEFAULT_BUILD_CONFIG, BuildConfig, _build_into
from .cache import (
    ASSETS_VERSION,
    DEFAULT_ASSETS_DIR,
    AssetPaths,
    _build_key,
    _cache_problem,
    _check_replaceable,
    _is_complete,
    _refresh_reward_copy,
    load_manifest,
    resolve_out_dir,
)
from .locking import _file_lock, _lock_path, _replace_dir
from .tokenizer import check_tokenizer

__all__ = [
    "ASSETS_VERSION",
    "DEFAULT_ASSETS_DIR",
    "AssetPaths",
    "BuildConfig",
    "DEFAULT_BUILD_CONFIG",
    "build_assets",
    "check_tokenizer",
    "load_manifest",
]


def build_assets(
    out_dir: Union[str, os.PathLike, None] = None,
    *,
    seed: int = 0,
    force: bool = False,
    quiet: bool = False,
) -> AssetPaths:
    """Build the tiny assets into ``out_dir`` (or reuse a matching complete build there).

    ``out_dir`` defaults to ``$TIP_VERL_ASSETS`` or :data:`DEFAULT_ASSETS_DIR`. ``force`` rebuilds
    even when a matching build exists. The build is written to a temporary directory beside
    ``out_dir`` and renamed into place, so an interrupted build never leaves a half-valid directory.
    """
    return _build_assets(out_dir, seed=seed, force=force, quiet=quiet, config=DEFAULT_BUILD_CONFIG)


def _build_assets(
    out_dir: Union[str, os.PathLike, None] = None,
    *,
    seed: int = 0,
    force: bool = False,
    quiet: bool = False,
    config: BuildConfig = DEFAULT_BUILD_CONFIG,
    student_steps: Optional[int] = None,
    teacher_steps: Optional[int] = None,
) -> AssetPaths:
    """:func:`build_assets` with an explicit config; ``*_steps`` override the training step counts
    (tests use this to make a quick, barely trained build)."""
    config = config.with_steps(student_steps=student_steps, teacher_steps=teacher_steps)
    out = resolve_out_dir(out_dir)
    paths = AssetPaths.under(out)
    key = _build_key(config, seed)
    log: Callable[[str], None] = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    problem = None if force else _cache_problem(paths, key)
    if problem is None and not force:
        _refresh_reward_copy(paths)
        return paths
    if problem is not None and problem.startswith("content changed"):
        # Always said, even when quiet: a corrupted cache costs a rebuild (about 2.5 minutes).
        print(f"tip_verl.assets: the cached build in {out} cannot be used: {problem}; rebuilding it",
              file=sys.stderr, flush=True)

    with _file_lock(_lock_path(out)):
        # Someone else may have finished the same build while we waited for the lock.
        if not force and _is_complete(paths, key):
            _refresh_reward_copy(paths)
            return paths
        _check_replaceable(out)
        _replace_dir(out, lambda tmp: _build_into(AssetPaths.under(tmp), key=key, config=config, seed=seed, log=log))
    log(f"assets written to {out}")
    return paths

"""Run a registration once a given verl module has been imported (at once if it already has been).

verl 0.9.1 keeps its registries in module-level dicts (``TRAINER_REGISTRY`` in
``verl.trainer.ppo.v1.trainer_base``, ``ADV_ESTIMATOR_REGISTRY`` in ``verl.trainer.ppo.core_algos``,
``EngineRegistry`` in ``verl.workers.engine``, ...). Filling one means importing its module, and some of
those modules pull in verl's whole trainer or engine stack. The ``verl.plugins`` entry point runs on every
``import verl``, so :mod:`tip_verl.verl_adapter.plugin` registers through :func:`when_imported`: the entry is
added right after verl's own module has been executed, in the process that needs it, and a process that
never imports the module pays nothing.

Mechanism: one :class:`importlib.abc.MetaPathFinder` (on ``sys.meta_path`` only while something is
pending) finds the module as the other finders would and wraps its loader so that the callbacks run after
the module body. A callback that fails is logged at WARNING (verl hides plugin errors) and does not fail
the import of verl's module.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import threading
from types import ModuleType
from typing import Callable

logger = logging.getLogger(__name__)

Callback = Callable[[ModuleType], None]

_pending: dict[str, list[Callback]] = {}
_lock = threading.RLock()


def when_imported(module_name: str, callback: Callback) -> None:
    """Call ``callback(module)`` once ``module_name`` is imported; now if it already is.

    Idempotent per ``(module_name, callback)`` while pending; callbacks themselves must be idempotent
    (a registration may be asked for again, e.g. by a second call of the entry point).
    """
    with _lock:
        module = sys.modules.get(module_name)
        if module is None:
            callbacks = _pending.setdefault(module_name, [])
            if callback not in callbacks:
                callbacks.append(callback)
            if _FINDER not in sys.meta_path:
                sys.meta_path.insert(0, _FINDER)
            return
    if getattr(getattr(module, "__spec__", None), "_initializing", False):
        # Only a module that imports the plugin while it is itself loading could get here; none in verl 0.9.1.
        logger.warning("tip_verl: %s is still loading; %s not registered", module_name, _name(callback))
        return
    _run(module_name, module, [callback])


def pending() -> dict[str, list[str]]:
    """The registrations still waiting for their module (for diagnostics and tests)."""
    with _lock:
        return {name: [_name(cb) for cb in cbs] for name, cbs in _pending.items()}


def _name(callback: Callback) -> str:
    return getattr(callback, "__qualname__", repr(callback))


def _run(module_name: str, module: ModuleType, callbacks: list[Callback]) -> None:
    for callback in callbacks:
        try:
            callback(module)
        except Exception:
            logger.warning("tip_verl: registration %s on import of %s failed", _name(callback), module_name,
                           exc_info=True)


class _CallbackLoader(importlib.abc.Loader):
    """The module's own loader, followed by the callbacks pending for it."""

    def __init__(self, loader, module_name: str) -> None:
        self._loader = loader
        self._module_name = module_name

    def __getattr__(self, attr):  # get_source, get_resource_reader, is_package, ...: the real loader's
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        with _lock:
            callbacks = _pending.pop(self._module_name, [])
            if not _pending and _FINDER in sys.meta_path:
                sys.meta_path.remove(_FINDER)
        _run(self._module_name, module, callbacks)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CallbackLoader(spec.loader, fullname)
        return spec


_FINDER = _Finder()

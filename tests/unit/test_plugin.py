"""The ``verl.plugins`` entry point costs nothing at ``import verl``: time, output, environment, modules.

Each check runs in fresh interpreters. The plugin is switched off with verl's own switch,
``VERL_USE_EXTERNAL_PLUGINS=none`` (``verl/__init__.py``: "none" disables entry-point discovery); that
interpreter then loads the entry point by hand, exactly as verl would (``EntryPoint.load()``), with its
file descriptors 1 and 2 redirected, so the plugin's own cost, output and environment changes are measured
in isolation from verl's (a wall-clock comparison of two interpreters is too noisy on a shared machine; the
numbers of one are printed with ``-s``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PLUGIN_BUDGET_S = 0.2

_PROBE = textwrap.dedent(
    r"""
    import json, os, sys, tempfile, time

    env0 = dict(os.environ)
    wall = time.perf_counter()
    import verl  # noqa: F401
    result = {"import_verl_s": time.perf_counter() - wall,
              "env_changes": {k: os.environ.get(k) for k in set(env0) | set(os.environ) if env0.get(k) != os.environ.get(k)}}
    if os.environ["VERL_USE_EXTERNAL_PLUGINS"] == "none":
        from importlib.metadata import entry_points

        (ep,) = [e for e in entry_points(group="verl.plugins") if e.name == "tip_verl"]
        modules, env1 = set(sys.modules), dict(os.environ)
        with tempfile.TemporaryFile() as out:
            sys.stdout.flush(); sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(out.fileno(), 1); os.dup2(out.fileno(), 2)
            try:
                cpu, wall = time.process_time(), time.perf_counter()
                ep.load()
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os.dup2(saved[0], 1); os.dup2(saved[1], 2)
            out.seek(0)
            printed = out.read().decode()
        result.update(
            plugin_cpu_s=cpu, plugin_wall_s=wall, plugin_printed=printed,
            plugin_new_modules=sorted(set(sys.modules) - modules),
            plugin_env_changes=sorted(k for k in set(env1) | set(os.environ) if env1.get(k) != os.environ.get(k)),
        )
    print("PROBE " + json.dumps(result))
    """
)


def _env(platform: str, plugins: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "TORCH_CUDA_ARCH_LIST")}
    if platform:
        env["VERL_PLATFORM"] = platform
    env["VERL_USE_EXTERNAL_PLUGINS"] = plugins
    return env


@pytest.fixture(scope="module")
def probes():
    """``import verl`` without (``none``) and with (``auto``) the plugin, default and CPU platform."""
    procs = {
        (platform, plugins): subprocess.Popen([sys.executable, "-c", _PROBE], env=_env(platform, plugins),
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for platform in ("", "cpu") for plugins in ("none", "auto")
    }
    results = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        lines = out.splitlines()
        (probe,) = [line for line in lines if line.startswith("PROBE ")]
        results[key] = dict(json.loads(probe[len("PROBE "):]), stdout=[ln for ln in lines if ln != probe],
                            stderr=err)
    return results


@pytest.mark.parametrize("platform", ["", "cpu"], ids=["default", "cpu"])
def test_plugin_costs_nothing_at_import_verl(probes, platform):
    alone = probes[(platform, "none")]
    print(f"\n[{platform or 'default'}] import verl: {alone['import_verl_s']:.2f} s without the plugin, "
          f"{probes[(platform, 'auto')]['import_verl_s']:.2f} s with it; the plugin alone "
          f"{alone['plugin_cpu_s']:.3f} s CPU, {alone['plugin_wall_s']:.3f} s wall, "
          f"{len(alone['plugin_new_modules'])} modules")
    assert alone["plugin_cpu_s"] <= PLUGIN_BUDGET_S
    # nothing of verl's trainer or engine stack (or anything else outside tip_verl) is imported
    assert [m for m in alone["plugin_new_modules"] if m.split(".")[0] != "tip_verl"] == []
    assert alone["plugin_printed"] == ""
    assert alone["plugin_env_changes"] == []


@pytest.mark.parametrize("platform", ["", "cpu"], ids=["default", "cpu"])
def test_import_verl_prints_and_sets_the_same_with_the_plugin(probes, platform):
    alone, with_plugin = probes[(platform, "none")], probes[(platform, "auto")]
    assert with_plugin["stdout"] == alone["stdout"] == []
    assert with_plugin["stderr"] == alone["stderr"]
    assert with_plugin["env_changes"] == alone["env_changes"]  # verl's own (RAY_CLIENT_MODE, ...)
    assert "TORCH_CUDA_ARCH_LIST" not in with_plugin["env_changes"]


def test_registrations_wait_for_their_verl_module():
    """tip_sync (and tip_colocate_async, tip_separate_async) / tip_opd / the tip_gloo checkpoint engine are
    registered when verl imports its registries, and calling the entry point again registers nothing twice."""
    code = textwrap.dedent(
        """
        import sys
        import verl
        from tip_verl.verl_adapter import _import_hooks, plugin
        waiting = _import_hooks.pending()
        assert "verl.trainer.ppo.v1" not in sys.modules and "verl.trainer.ppo.core_algos" not in sys.modules
        from verl.trainer.ppo import core_algos
        from verl.trainer.ppo.v1 import get_trainer_cls
        plugin.register()
        plugin.register()
        from verl.checkpoint_engine import CheckpointEngineRegistry
        print(sorted(waiting), get_trainer_cls("tip_sync").__name__, core_algos.get_adv_estimator_fn("tip_opd").__name__,
              _import_hooks.pending())
        print(get_trainer_cls("tip_colocate_async").__name__, get_trainer_cls("tip_separate_async").__name__,
              CheckpointEngineRegistry.get("tip_gloo").__name__)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env("", "auto"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-2:] == [
        "['verl.checkpoint_engine', 'verl.trainer.ppo.core_algos', 'verl.trainer.ppo.v1'] TIPTrainerSync "
        "tip_opd_advantage {}",
        "TIPTrainerColocateAsync TIPTrainerSeparateAsync GlooCheckpointEngine",
    ]
    assert "registration" not in proc.stderr and "failed" not in proc.stderr

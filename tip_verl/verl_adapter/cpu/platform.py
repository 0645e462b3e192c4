"""A ``cpu`` platform for verl 0.9.1's platform layer (``verl/plugin/platform``).

verl resolves its device layer once per process through ``verl.plugin.platform.get_platform()``;
``VERL_PLATFORM=cpu`` selects the class registered here under the name ``cpu``
(``platform_manager.py``: ``_detect_platform_name`` reads ``VERL_PLATFORM`` first). The class is
never auto-detected (``is_platform_available`` is False), so registering it changes nothing for
jobs that do not ask for it.

What it provides:

* ``device_name == "cpu"``: verl builds its device meshes, ``torch.autocast`` contexts and
  ``.to(...)`` targets from this name, so everything runs on the host.
* ``current_device() == "cpu"``: verl uses ``get_device_id()`` as a *torch device* argument
  (``micro_batch.to(get_device_id())``, ``torch.device(get_device_id())``); an integer would mean
  accelerator 0.
* ``communication_backend_name() == "gloo"``.
* ``device_module``: a small ``torch.cuda``-shaped object (:class:`CPUDeviceModule`) whose memory
  figures are the process's real resident memory, so verl's ``perf/*memory*`` metrics mean
  something on a CPU: ``max_memory_allocated`` is the peak RSS (``VmHWM``) since the last
  ``reset_peak_memory_stats``, which the CPU engines call at the start of every optimizer step
  (:class:`UpdateMemoryWindow`; they also report ``perf/update_memory_increase_gb``).
* ``ray_resource_name() == CPU_RAY_RESOURCE``: a custom logical Ray resource (declared by
  ``ray_kwargs.ray_init.resources``, see ``cpu_overrides.py``) that stands for one "device slot",
  i.e. one verl worker process. No GPU is faked.

Importing this module does not import verl: :class:`PlatformCPU` (the subclass of verl's
``PlatformBase``) is built from :class:`CPUPlatformMethods` on first use (:func:`platform_class`, or the
attribute ``PlatformCPU``), so the ``verl.plugins`` entry point can register it even while this module is
the one whose import started ``import verl``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from typing import Any, Optional

import torch

PLATFORM_NAME = "cpu"

# Logical Ray resource that verl's resource pools request once per worker (one "device" each).
CPU_RAY_RESOURCE = "verl_cpu_slot"


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The process's resident set size now (``/proc/self/statm``: one read, cheap enough for a 1 ms
    sampler; psutil where there is no ``/proc``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover - psutil is a verl dependency
        return 0


def _vm_hwm_bytes() -> Optional[int]:
    """The process's peak RSS since start or since the last :func:`reset_peak_rss` (Linux ``VmHWM``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # lifetime peak; cannot be reset
    # Linux reports KiB, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window: ``VmHWM`` := current RSS (``/proc/self/clear_refs``, Linux >= 4.0).

    Returns False where that is not possible; the peak then stays the process's lifetime peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim(0)``), so that RSS follows the live
    tensors: with glibc's dynamic thresholds a freed medium-size tensor stays resident and a later step
    that reuses it would show no RSS growth. A no-op without glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class UpdateMemoryWindow:
    """Peak memory of one optimizer step (one mini-batch: forward, backward, optimizer step) on the CPU.

    The CPU analogue of ``torch.cuda.reset_peak_memory_stats()`` before the step and
    ``max_memory_allocated() - memory_allocated_before`` after it: freed heap is released, RSS read and
    ``VmHWM`` reset on entry; on exit :attr:`peak_bytes` is ``VmHWM`` and :attr:`increase_bytes` the peak
    minus the RSS on entry (activations, logits, gradients; not the weights, optimizer state or runtime
    already resident). Both are None where ``VmHWM`` cannot be reset (not Linux).
    """

    def __init__(self) -> None:
        self.peak_bytes: Optional[int] = None
        self.increase_bytes: Optional[int] = None
        self._before = 0
        self._armed = False

    def __enter__(self) -> "UpdateMemoryWindow":
        release_free_heap()
        self._before = rss_bytes()
        self._armed = reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        hwm = _vm_hwm_bytes() if self._armed else None
        if hwm is not None:
            self.peak_bytes = hwm
            self.increase_bytes = max(0, hwm - self._before)

    def add_metrics(self, metrics: dict) -> None:
        """``perf/update_peak_memory_gb`` and ``perf/update_memory_increase_gb`` (one value, in GiB), in the
        list-per-micro-batch form verl's workers gather and flatten; nothing when unmeasured."""
        if self.peak_bytes is None:
            return
        metrics["perf/update_peak_memory_gb"] = [self.peak_bytes / 2**30]
        metrics["perf/update_memory_increase_gb"] = [self.increase_bytes / 2**30]


class CPUDeviceModule:
    """The ``torch.<device>``-like namespace verl gets from ``get_torch_device()`` on the CPU.

    It forwards to ``torch.cpu`` where torch has the function and implements the rest of what verl
    0.9.1 calls (``grep -rho "get_torch_device()\\.[a-z_]*" verl``) explicitly. There is no
    catch-all ``__getattr__``: an unknown call fails loudly instead of silently doing nothing.
    """

    # streams / events exist in torch.cpu (no-op implementations)
    Stream = torch.cpu.Stream
    Event = torch.cpu.Event
    stream = staticmethod(torch.cpu.stream)
    current_stream = staticmethod(torch.cpu.current_stream)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        # verl/utils/flops_counter.py looks device names up in a FLOPS table; "CPU" is the name it
        # uses itself for torch.cpu (unknown -> inf FLOPS -> MFU 0).
        return "CPU"

    @staticmethod
    def synchronize(device: Any = None) -> None:
        torch.cpu.synchronize()

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return rss_bytes()

    @staticmethod
    def memory_reserved(device: Any = None) -> int:
        return rss_bytes()

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        return _peak_rss_bytes()

    @staticmethod
    def max_memory_reserved(device: Any = None) -> int:
        return _peak_rss_bytes()

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        reset_peak_rss()

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)


class CPUPlatformMethods:
    """The methods of :class:`PlatformCPU`: what verl's ``PlatformBase`` asks of a platform, for host CPUs."""

    _device_module = CPUDeviceModule()

    def __init__(self) -> None:
        # verl instantiates the platform once per process (first get_platform()); in the driver that
        # is main_ppo's auto_set_device, before Ray starts, so a wrong machine is reported first.
        from tip_verl.verl_adapter.cpu.checks import check_no_cuda

        check_no_cuda()
        super().__init__()

    # -- core device management -------------------------------------------------------------
    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self):
        return self._device_module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Only ever selected explicitly (VERL_PLATFORM=cpu); never picked by auto-detection, so a
        # machine whose accelerator probe fails keeps verl's own fallback.
        return False

    def current_device(self) -> str:  # type: ignore[override]
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        torch.cpu.synchronize()

    # -- RNG ----------------------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    # -- memory -------------------------------------------------------------------------------
    def set_allocator_settings(self, settings: str) -> None:
        return None  # no caching allocator settings on the host

    def empty_cache(self) -> None:
        return None

    # -- properties ---------------------------------------------------------------------------
    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    # -- distributed --------------------------------------------------------------------------
    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # There is no device-visibility variable on the host. verl's Worker copies this variable
        # between processes (single_controller/base/worker.py env_keys); a dedicated name keeps
        # CUDA_VISIBLE_DEVICES untouched.
        return "VERL_CPU_VISIBLE_DEVICES"

    # -- profiling ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    # -- Ray ----------------------------------------------------------------------------------
    def ray_resource_name(self) -> str:
        return CPU_RAY_RESOURCE

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"resources": {CPU_RAY_RESOURCE: num_gpus}}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def get_device_uuid(self, device_id):
        return f"{CPU_RAY_RESOURCE}-{os.getpid()}-{device_id}"

    # -- IPC / runtime ------------------------------------------------------------------------
    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


_PLATFORM_CLASS: type | None = None


def platform_class() -> type:
    """``PlatformCPU``: verl platform for running the whole stack on host CPUs (gloo collectives)."""
    global _PLATFORM_CLASS
    if _PLATFORM_CLASS is None:
        from verl.plugin.platform.platform_base import PlatformBase

        _PLATFORM_CLASS = type(PlatformBase)("PlatformCPU", (CPUPlatformMethods, PlatformBase), {
            "__module__": __name__,
            "__qualname__": "PlatformCPU",
            "__doc__": "verl platform for running the whole stack on host CPUs (gloo collectives).",
        })
    return _PLATFORM_CLASS


def __getattr__(name: str):
    if name == "PlatformCPU":
        return platform_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_platform() -> type:
    """Register ``PlatformCPU`` as verl platform ``cpu`` (public ``PlatformRegistry`` API)."""
    from verl.plugin.platform.platform_manager import PlatformRegistry

    cls = platform_class()
    if PlatformRegistry.get(PLATFORM_NAME) is not cls:
        PlatformRegistry.register(platform=PLATFORM_NAME)(cls)
    return cls


# --------------------------------------------------------------------------------------------
# Training engines for device "cpu" (verl's EngineRegistry is keyed by device name).
# --------------------------------------------------------------------------------------------
_CPU_ENGINES: dict[str, type] = {}


def _with_startup_checks(base: type) -> type:
    """Subclass of a verl FSDP engine that runs the CPU start-up checks before building the model."""

    def __init__(self, model_config, engine_config, optimizer_config, checkpoint_config):
        from tip_verl.verl_adapter.cpu import checks

        role = "reference model" if getattr(engine_config, "forward_only", False) else "actor model"
        checks.check_engine_config(engine_config, role=role)
        local = getattr(model_config, "local_path", None) or model_config.path
        if os.path.isdir(local) or getattr(model_config, "hf_config", None) is None:
            checks.check_model_dir(local, role=role)
        # else a hub id that verl's HFModelConfig already resolved from the Hugging Face cache (the CPU runs offline)
        checks.check_tokenizer(getattr(model_config, "tokenizer", None) or model_config.local_path, role=role)
        base.__init__(self, model_config, engine_config, optimizer_config, checkpoint_config)

    def train_batch(self, data, loss_function):
        # One optimizer step; its peak memory is reported as perf/update_* (see UpdateMemoryWindow).
        with UpdateMemoryWindow() as window:
            outputs = base.train_batch(self, data, loss_function)
        if isinstance(outputs, dict) and isinstance(outputs.get("metrics"), dict):
            window.add_metrics(outputs["metrics"])
        return outputs

    return type(
        f"CPU{base.__name__}",
        (base,),
        {
            "__init__": __init__,
            "train_batch": train_batch,
            "__module__": __name__,
            "__doc__": f"verl's {base.__name__} on the CPU platform (FSDP2 over gloo), with start-up checks.",
        },
    )


def register_engines() -> dict[str, type]:
    """Register verl's FSDP engines for ``device="cpu"`` via the public ``EngineRegistry.register``.

    verl registers them for ``["cuda", "npu"]`` only (``workers/engine/fsdp/transformer_impl.py:1143,
    1594``); ``EngineRegistry.get_engine_cls`` looks engines up by ``get_device_name()``.
    """
    if _CPU_ENGINES:
        return _CPU_ENGINES
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    for model_type, base in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        registry = EngineRegistry._engines.get(model_type, {})  # read-only: skip if already registered
        if all("cpu" in registry.get(backend, {}) for backend in ("fsdp", "fsdp2")):
            _CPU_ENGINES[model_type] = registry["fsdp2"]["cpu"]
            continue
        cls = _with_startup_checks(base)
        EngineRegistry.register(model_type=model_type, backend=["fsdp", "fsdp2"], device="cpu")(cls)
        _CPU_ENGINES[model_type] = cls
    return _CPU_ENGINES

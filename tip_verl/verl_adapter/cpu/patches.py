"""The few monkey-patches the CPU platform needs in verl 0.9.1, each small and named.

They are applied by :func:`tip_verl.verl_adapter.cpu.register` **only** when the CPU platform is
selected (``VERL_PLATFORM=cpu``); a GPU job with tip_verl installed never reaches this module.
Each entry names the verl line it works around (paths relative to the ``verl`` package, 0.9.1).

================================  ==============================================================
patch                              why
================================  ==============================================================
``gloo_process_group``             ``utils/distributed.py:89`` builds the backend string
                                   ``f"cpu:gloo,{device}:{backend}"``; with device ``cpu`` that is
                                   ``"cpu:gloo,cpu:gloo"``, which torch rejects ("Duplicate device
                                   type cpu"). The wrapper passes ``backend="cpu:gloo"`` when the
                                   caller gave none.
``fsdp2_offload_without_pinning``  ``workers/engine/fsdp/transformer_impl.py:462`` creates
                                   ``CPUOffloadPolicy(pin_memory=True)`` for forward-only engines
                                   (the reference model); pinning host memory needs an accelerator
                                   ("Cannot access accelerator device when none is available").
                                   The module-level name is rebound to a factory that asks for
                                   ``pin_memory=False``. (No global ``Tensor.pin_memory`` change.)
``resource_check_platform_aware``  ``single_controller/ray/base.py:226-242``
                                   (``ResourcePoolManager._check_resource_available``) counts only
                                   Ray's ``GPU``/``NPU`` resources and ignores the platform's own
                                   ``ray_resource_name()``; it is replaced by the same check on the
                                   platform's resource (``verl_cpu_slot``).
``teacher_topk_for_hf_rollout``    ``workers/config/distillation.py:188-214``
                                   (``DistillationTeacherModelConfig._validate_topk_logprobs``)
                                   raises ``NotImplementedError`` for any teacher inference engine
                                   but vllm/sglang when top-k distillation is on; the ``hf`` server
                                   answers ``prompt_logprobs=k`` per request (no engine-boot cap,
                                   like SGLang), so ``hf`` only needs ``topk`` to be set.
``replay_buffer_short_poll``       ``trainer/ppo/v1/replay_buffer.py:144,409`` (``ReplayBuffer``)
                                   sleeps ``poll_interval`` = 2.0 s between looks at the
                                   TransferQueue while it waits for a batch, so a rollout that
                                   takes 0.5 s on the CPU costs 2 s (``timing_s/gen`` is 2.0 or
                                   4.0 s in every step of the tiny job). The constructor is wrapped
                                   to cap it at :data:`CPU_POLL_INTERVAL_S`; samples, their order
                                   and every metric but the timings are unchanged.
``separate_async_pi_old_copy``     ``experimental/separation/engine_workers.py:123-137``
                                   (``DetachActorWorker.save_model_to_cpu``) keeps pi_old for the
                                   local updates of a ``separate_async`` step with the FSDP helpers'
                                   ``.detach().cpu()``; for a shard that already lives on the CPU
                                   that is the live parameter itself, so the saved pi_old moves with
                                   every update and the restore restores nothing. The method is
                                   wrapped to copy what still shares storage with a parameter.
================================  ==============================================================
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from tip_verl.verl_adapter._import_hooks import when_imported

logger = logging.getLogger(__name__)

#: seconds between the replay buffer's looks at the TransferQueue on the CPU platform (verl: 2.0)
CPU_POLL_INTERVAL_S = 0.05


@dataclass
class Patch:
    """One attribute replacement ``module.attr = factory(original)`` (``attr`` may be dotted)."""

    name: str
    module: str
    attr: str
    verl_ref: str
    reason: str
    factory: Callable[[Any], Any]
    # modules that imported the attribute by name (``from m import f``) and must see the new one
    rebind_importers: bool = False
    replacement: Any = field(default=None, repr=False)

    @property
    def applied(self) -> bool:
        return self.replacement is not None

    def apply(self, module: ModuleType | None = None) -> None:
        """Patch ``module`` (default: import :attr:`module`); idempotent."""
        if self.applied:
            return
        owner = module if module is not None else importlib.import_module(self.module)
        *path, leaf = self.attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, leaf)
        replacement = self.factory(original)
        replacement.__tip_verl_patch__ = self.name
        setattr(owner, leaf, replacement)
        self.replacement = replacement
        if self.rebind_importers:
            for mod_name, mod in list(sys.modules.items()):
                if mod is None or not mod_name.startswith("verl.") or mod_name == self.module:
                    continue
                if getattr(mod, leaf, None) is original:
                    setattr(mod, leaf, replacement)
        logger.debug("tip_verl cpu patch applied: %s (%s)", self.name, self.verl_ref)


# --------------------------------------------------------------------------------------------
# 1. gloo-only process group
# --------------------------------------------------------------------------------------------
def _gloo_process_group(original):
    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return original(timeout_second=timeout_second, backend=backend or "cpu:gloo")

    return initialize_global_process_group_ray


# --------------------------------------------------------------------------------------------
# 2. FSDP2 CPU offload policy without pinned memory
# --------------------------------------------------------------------------------------------
def _offload_without_pinning(original_cls):
    def CPUOffloadPolicy(*args, pin_memory: bool = True, **kwargs):  # noqa: N802 - mirrors the class name
        return original_cls(*args, pin_memory=False, **kwargs)

    CPUOffloadPolicy.__doc__ = f"{original_cls.__name__} with pin_memory=False (tip_verl CPU platform)."
    return CPUOffloadPolicy


# --------------------------------------------------------------------------------------------
# 3. Resource-pool check that counts the platform's Ray resource
# --------------------------------------------------------------------------------------------
def _platform_aware_resource_check(original):
    @functools.wraps(original)
    def _check_resource_available(self):
        import ray

        from verl.plugin.platform import get_platform

        resource_name = get_platform().ray_resource_name()
        per_node = ray._private.state.available_resources_per_node()
        available = sum(info.get(resource_name, 0) for info in per_node.values())
        required = sum(n for process_on_nodes in self.resource_pool_spec.values() for n in process_on_nodes)
        if available < required:
            raise ValueError(
                f"Total available {resource_name!r} Ray resources {available} is less than the {required} worker "
                f"slots the resource pools ask for. On the CPU platform declare them with "
                f"'+ray_kwargs.ray_init.resources.{resource_name}=N' (see tip_verl.verl_adapter.cpu_overrides)."
            )

    return _check_resource_available


# --------------------------------------------------------------------------------------------
# 4. Top-k teacher log-probs from the hf rollout
# --------------------------------------------------------------------------------------------
def _topk_validation_knows_hf(original):
    @functools.wraps(original)
    def _validate_topk_logprobs(self, use_topk, topk):
        if use_topk and self.inference.name == "hf":
            if topk is None:
                raise ValueError("topk must be specified when use_topk is True.")
            return None
        return original(self, use_topk, topk)

    return _validate_topk_logprobs


# --------------------------------------------------------------------------------------------
# 5. Replay buffer that looks for finished rollouts every 50 ms, not every 2 s
# --------------------------------------------------------------------------------------------
def _short_poll_interval(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):  # noqa: N807 - wraps ReplayBuffer.__init__
        original(self, *args, **kwargs)
        self.poll_interval = min(float(self.poll_interval), CPU_POLL_INTERVAL_S)

    return __init__


# --------------------------------------------------------------------------------------------
# 6. separate_async: the saved pi_old is a copy of the CPU parameters, not the parameters
# --------------------------------------------------------------------------------------------
def _local_tensors(params):
    for p in params:
        yield getattr(p, "_local_tensor", p)  # an FSDP2 DTensor's shard, else the tensor itself


def _copy_aliased(saved, live: set):
    """``saved`` (verl's saved-model structure: tensors in tuples, lists and dicts) with every tensor that shares
    storage with a live parameter replaced by a copy."""
    import torch

    if isinstance(saved, torch.Tensor):
        return saved.clone() if saved.untyped_storage().data_ptr() in live else saved
    if isinstance(saved, dict):
        return {key: _copy_aliased(value, live) for key, value in saved.items()}
    if isinstance(saved, (tuple, list)):
        return type(saved)(_copy_aliased(value, live) for value in saved)
    return saved


def _save_model_to_cpu_copies(original):
    @functools.wraps(original)  # keeps verl's @register dispatch attributes
    def save_model_to_cpu(self, n):
        original(self, n)
        live = {p.untyped_storage().data_ptr() for p in _local_tensors(self.actor.engine.module.parameters())}
        self.cpu_saved_models[n] = _copy_aliased(self.cpu_saved_models[n], live)

    return save_model_to_cpu


PATCHES: list[Patch] = [
    Patch(
        name="gloo_process_group",
        module="verl.utils.distributed",
        attr="initialize_global_process_group_ray",
        verl_ref="verl/utils/distributed.py:89",
        reason='default backend "cpu:gloo,cpu:gloo" is rejected by torch; use "cpu:gloo"',
        factory=_gloo_process_group,
        rebind_importers=True,
    ),
    Patch(
        name="fsdp2_offload_without_pinning",
        module="verl.workers.engine.fsdp.transformer_impl",
        attr="CPUOffloadPolicy",
        verl_ref="verl/workers/engine/fsdp/transformer_impl.py:462",
        reason="CPUOffloadPolicy(pin_memory=True) needs an accelerator to pin host memory",
        factory=_offload_without_pinning,
    ),
    Patch(
        name="resource_check_platform_aware",
        module="verl.single_controller.ray.base",
        attr="ResourcePoolManager._check_resource_available",
        verl_ref="verl/single_controller/ray/base.py:226-242",
        reason="resource check counts only GPU/NPU, not the platform's ray_resource_name()",
        factory=_platform_aware_resource_check,
    ),
    Patch(
        name="teacher_topk_for_hf_rollout",
        module="verl.workers.config.distillation",
        attr="DistillationTeacherModelConfig._validate_topk_logprobs",
        verl_ref="verl/workers/config/distillation.py:188-214",
        reason="top-k teacher validation knows only vllm/sglang; the hf server answers prompt_logprobs=k",
        factory=_topk_validation_knows_hf,
    ),
    Patch(
        name="replay_buffer_short_poll",
        module="verl.trainer.ppo.v1.replay_buffer",
        attr="ReplayBuffer.__init__",
        verl_ref="verl/trainer/ppo/v1/replay_buffer.py:144,409",
        reason="the replay buffer polls for finished rollouts every 2 s; a tiny CPU rollout takes well under that",
        factory=_short_poll_interval,
    ),
    Patch(
        name="separate_async_pi_old_copy",
        module="verl.experimental.separation.engine_workers",
        attr="DetachActorWorker.save_model_to_cpu",
        verl_ref="verl/experimental/separation/engine_workers.py:123-137",
        reason="the saved pi_old of a CPU shard is the live parameter (.cpu() is a no-op), so restore restores nothing",
        factory=_save_model_to_cpu_copies,
    ),
]


def apply_when_imported() -> None:
    """Apply each patch as soon as verl has imported the module it patches (now if it has)."""
    for patch in PATCHES:
        when_imported(patch.module, patch.apply)


def applied_patches() -> list[str]:
    return [p.name for p in PATCHES if p.applied]

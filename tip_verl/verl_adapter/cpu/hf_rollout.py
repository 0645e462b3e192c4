"""``actor_rollout_ref.rollout.name=hf``: a rollout server built on Hugging Face ``generate``.

verl 0.9.1 drives rollouts through three pieces; tip_verl provides all three for a plain
``transformers`` model on the host CPU, speaking the same protocol as verl's vLLM/SGLang servers:

* :class:`HFRolloutServer` (a Ray actor) — token-in/token-out ``generate(prompt_ids, sampling_params,
  request_id, ...) -> TokenOutput``, the control plane verl calls (``wake_up``, ``sleep``,
  ``abort_all_requests``, ``resume_generation``, ``clear_kv_cache``, ...) and ``update_weights``.
* :class:`HFRolloutReplica` — verl's ``RolloutReplica`` (``RolloutReplicaRegistry``, name ``hf``): launches
  one server per replica, for the policy (hybrid), the distillation teacher (colocated) or a reward
  model.
* :class:`HFServerAdapter` — verl's ``BaseRollout`` living in the actor worker: on every weight sync it
  gathers the FSDP weights (all ranks take part in the collectives) and ships them to its server; for a LoRA
  student, the base weights once and then the adapters with their PEFT config, which the server applies.

The server is :mod:`.hf_server` (on the generator of :mod:`.hf_generator`, the request semantics of
:mod:`.hf_sampling`); this module holds verl's two registry entries.
"""

from __future__ import annotations

import os
from typing import Any

import ray
import torch

from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica

from .hf_server import HFRolloutServer

def server_actor_name(replica_rank: int, *, is_teacher: bool = False, is_reward: bool = False, suffix: str = "") -> str:
    """Ray actor name of a replica's server (the adapter in the actor worker looks it up by name)."""
    if is_reward:
        return f"hf_server_reward_{replica_rank}{suffix}"
    if is_teacher:
        return f"hf_server_teacher_{replica_rank}{suffix}"
    return f"hf_server_{replica_rank}{suffix}"


class HFRolloutReplica(RolloutReplica):
    """One :class:`HFRolloutServer` per replica; registered as rollout ``hf``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.tensor_model_parallel_size * self.config.pipeline_model_parallel_size != 1:
            raise ValueError(
                "the hf rollout runs one model per process: set rollout tensor_model_parallel_size=1 and "
                "pipeline_model_parallel_size=1 (tip_verl.verl_adapter.cpu_overrides does for the policy and "
                "distillation.teacher_models.<key>.inference)"
            )
        self.server_class = ray.remote(HFRolloutServer)

    async def launch_servers(self):
        node_id = None
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
        name = server_actor_name(
            self.replica_rank, is_teacher=self.is_teacher_model, is_reward=self.is_reward_model, suffix=self.name_suffix
        )
        options: dict[str, Any] = {"name": name, "max_concurrency": self.max_concurrency, "num_cpus": 0}
        if node_id is not None:
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False
            )
        server = self.server_class.options(**options).remote(
            config=self.config, model_config=self.model_config, replica_rank=self.replica_rank
        )
        address = await server.get_server_address.remote()  # waits for the model to load
        self.servers = [server]
        self._server_handle = server
        self._server_address = address


class HFServerAdapter(BaseRollout):
    """Lives in the actor worker (hybrid engine): forwards weight syncs to the replica's server."""

    def __init__(self, config, model_config, device_mesh, *args, replica_rank: int = -1, **kwargs):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        rollout_world_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // rollout_world_size if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % rollout_world_size
        self.is_leader_rank = self.rollout_rank == 0
        self._server = None

    def _server_handle(self):
        if not self.is_leader_rank:
            return None
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        server = self._server_handle()
        if server is not None:
            await server.wake_up.remote(tags=tags)

    async def release(self):
        server = self._server_handle()
        if server is not None:
            await server.sleep.remote()

    @torch.no_grad()
    async def update_weights(self, weights, wire_format: str = "named_tensors", global_steps: int = None,
                             peft_config: dict | None = None, base_sync_done: bool = True, **kwargs):
        """verl's weight sync (``engine_workers.py`` ``update_weights``). A LoRA student sends, as to vLLM, its base
        weights once (``peft_config`` given, ``base_sync_done=False``) and then only its adapters
        (``base_sync_done=True``); ``model.lora.merge=True`` sends merged weights (no ``peft_config``)."""
        if wire_format != "named_tensors":
            raise NotImplementedError(f"hf rollout accepts wire_format='named_tensors' only, got {wire_format!r}")
        from verl.workers.rollout.utils import ensure_async_iterator

        server = self._server_handle()
        state: dict[str, torch.Tensor] = {}
        # Every rank must walk the generator: DTensor.full_tensor() inside it is a collective.
        async for name, tensor in ensure_async_iterator(weights):
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            if server is not None:
                state[name] = tensor.detach().to("cpu").clone()
        if server is not None:
            await server.update_weights.remote(state, global_steps=global_steps, peft_config=peft_config,
                                               base_sync_done=base_sync_done)

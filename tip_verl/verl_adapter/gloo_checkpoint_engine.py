"""Checkpoint engine ``tip_gloo``: the trainer's weights to a separate rollout pool over gloo (TCP), no accelerator.

verl 0.9.1's ``separate_async`` trainer generates on its own resource pool and sends each new version of the
weights there through a checkpoint engine (``actor_rollout_ref.rollout.checkpoint_engine.backend``); the
in-process ``naive`` engine only works with a colocated rollout, and every other engine verl ships (nccl, hccl,
nixl, kimi, mooncake, delta_sharded) needs CUDA/NPU memory or an RDMA library. This engine implements verl's
``CheckpointEngine`` interface (``verl/checkpoint_engine/base.py``) with a private gloo group per weight sync,
so ``separate_async`` runs on tip_verl's CPU platform::

    actor_rollout_ref.rollout.checkpoint_engine.backend=tip_gloo

(registered by the plugin whenever verl imports ``verl.checkpoint_engine``, in every process). Measured on the
tiny CPU job: the whole student (39 tensors, 1.95 MiB) in 0.03-0.10 s per sync.

Topology, as verl's nccl engine with one sender: actor rank 0 (the ``is_master`` engine) is rank 0 of the group
and broadcasts; the rollout workers are ranks 1..n and receive; the other actor ranks stay out (rank -1) but walk
the weight generator, whose FSDP2 ``full_tensor()`` gathers are collective over the actor group. The group is
private: its own ``TCPStore`` (opened by rank 0 in :meth:`prepare` on a free port) and ``ProcessGroupGloo``, so
the workers' default process group (FSDP's) is untouched; :meth:`finalize` drops both. Each tensor goes as three
broadcasts (header length, pickled ``(name, dtype, shape)``, the bytes), then an end marker; tensors arrive on the
CPU, in the dtype they were sent. ``bucket_size`` is accepted and unused (nothing is staged in device memory).
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import time
from typing import Any, AsyncGenerator

import torch
import torch.distributed as dist

from verl.checkpoint_engine.base import CheckpointEngine, CheckpointEngineRegistry

logger = logging.getLogger(__name__)

BACKEND = "tip_gloo"
#: seconds a member waits for the others to join the group or a broadcast to complete
TIMEOUT_S = float(os.environ.get("TIP_VERL_GLOO_CHECKPOINT_TIMEOUT_S", "600"))
_END = -1


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address().strip("[]")
    except Exception:  # noqa: BLE001  (outside Ray: tests)
        return "127.0.0.1"


async def _walk(weights) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
    from verl.workers.rollout.utils import ensure_async_iterator

    async for name, tensor in ensure_async_iterator(weights):
        if hasattr(tensor, "full_tensor"):  # a DTensor shard: the gather is collective over the actor group
            tensor = tensor.full_tensor()
        yield name, tensor


class GlooCheckpointEngine(CheckpointEngine):
    """verl ``CheckpointEngine`` over a private gloo group: actor rank 0 broadcasts, rollout workers receive."""

    def __init__(self, bucket_size: int = 0, is_master: bool = False, **kwargs: Any) -> None:
        self.bucket_size = bucket_size
        self.is_master = is_master
        self.rank: int | None = None
        self.world_size: int | None = None
        self._store = None
        self._group = None

    # -- group set-up, once per weight sync ------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        """Rank 0 opens the group's store on a free port of its node and reports the address."""
        if not self.is_master:
            return {"master": None}
        host = _node_ip()
        self._store = dist.TCPStore(host, 0, None, True, datetime.timedelta(seconds=TIMEOUT_S),
                                    wait_for_workers=False)
        return {"master": {"host": host, "port": int(self._store.port)}}

    @classmethod
    def build_topology(cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[dict]):
        master = metadata[0]["master"]
        assert master is not None, "actor rank 0 must be the tip_gloo checkpoint engine master"
        world_size = 1 + rollout_world_size
        actor = {"rank": [0] + [-1] * (actor_wg_world_size - 1), "world_size": [world_size] * actor_wg_world_size,
                 "master_metadata": [master] * actor_wg_world_size}
        rollout = {"rank": list(range(1, world_size)), "world_size": [world_size] * rollout_world_size,
                   "master_metadata": [master] * rollout_world_size}
        return actor, rollout

    def init_process_group(self, rank: int, world_size: int, master_metadata: dict) -> None:
        self.rank, self.world_size = rank, world_size
        if rank < 0:
            return
        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        if self._store is None:  # a receiver: connect to rank 0's store
            self._store = dist.TCPStore(master_metadata["host"], int(master_metadata["port"]), None, False, timeout)
        self._group = dist.ProcessGroupGloo(self._store, rank, world_size, timeout)

    def finalize(self) -> None:
        self._group = None
        self._store = None
        self.rank = self.world_size = None

    # -- transfer -------------------------------------------------------------------------------
    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel():
            options = dist.BroadcastOptions()
            options.rootRank = 0
            self._group.broadcast([tensor], options).wait()
        return tensor

    def _header(self, value: int) -> int:
        return int(self._broadcast(torch.tensor([value], dtype=torch.int64)).item())

    @torch.no_grad()
    async def send_weights(self, weights, global_steps: int | None = None):
        start, count, nbytes = time.time(), 0, 0
        if self.rank is None or self.rank < 0:  # outside the group: only take part in the actor group's gathers
            async for _ in _walk(weights):
                pass
            return {}
        assert self.rank == 0, "rollout workers receive weights; they do not send"
        async for name, tensor in _walk(weights):
            tensor = tensor.detach().to("cpu").contiguous()
            meta = pickle.dumps((name, tensor.dtype, tuple(tensor.shape)))
            self._header(len(meta))
            self._broadcast(torch.frombuffer(bytearray(meta), dtype=torch.uint8))
            self._broadcast(tensor.view(-1).view(torch.uint8) if tensor.numel() else tensor.view(torch.uint8))
            count, nbytes = count + 1, nbytes + tensor.numel() * tensor.element_size()
        self._header(_END)
        logger.info("tip_gloo: sent %d tensors (%.1f MiB) in %.2f s (step %s)", count, nbytes / 2**20,
                    time.time() - start, global_steps)
        return {}

    @torch.no_grad()
    async def receive_weights(self, global_steps: int | None = None) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        assert self.rank is not None and self.rank > 0, "rank 0 sends the weights; it does not receive"
        start, count, nbytes = time.time(), 0, 0
        while True:
            size = self._header(0)
            if size == _END:
                # one line per sync and rollout worker (the CPU platform's only weight path to a separate pool)
                logger.warning("tip_gloo: rollout rank %d received %d tensors (%.2f MiB) of step %s in %.2f s",
                               self.rank, count, nbytes / 2**20, global_steps, time.time() - start)
                return
            meta = self._broadcast(torch.empty(size, dtype=torch.uint8))
            name, dtype, shape = pickle.loads(meta.numpy().tobytes())
            numel = 1
            for dim in shape:
                numel *= dim
            data = self._broadcast(torch.empty(numel * torch.empty((), dtype=dtype).element_size(), dtype=torch.uint8))
            count, nbytes = count + 1, nbytes + data.numel()
            yield name, data.view(dtype).view(shape)


def register(module=None) -> None:
    """Register ``tip_gloo`` in verl's ``CheckpointEngineRegistry`` (idempotent)."""
    if CheckpointEngineRegistry._registry.get(BACKEND) is not GlooCheckpointEngine:
        CheckpointEngineRegistry.register(BACKEND)(GlooCheckpointEngine)


register()

"""The ``tip_gloo`` checkpoint engine (separate_async's weight sync on the CPU): verl's protocol, three processes.

verl's ``CheckpointEngineManager.update_weights`` calls, on every actor worker and rollout worker: ``prepare``,
``build_topology`` (on the driver, from the ``prepare`` results, actor workers first), ``init_process_group``,
then ``send_weights`` (actor) / ``receive_weights`` (rollout) at the same time, then ``finalize``. Here: actor rank
0 (the master) and one rollout worker in two processes, a second actor rank that stays out of the group in this
one; two syncs in a row (the group is rebuilt each time, as verl does).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp

import pytest
import torch

from tip_verl.verl_adapter.gloo_checkpoint_engine import BACKEND, GlooCheckpointEngine


def _weights(version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(version)
    return {
        "model.embed_tokens.weight": torch.randn(7, 5, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(5, generator=g).to(torch.float16),
        "step": torch.tensor(version, dtype=torch.int64),  # 0-dim
        "empty": torch.empty(0, 4),
    }


def _worker(role: str, inbox, outbox) -> None:
    engine = GlooCheckpointEngine(bucket_size=1 << 20, is_master=(role == "actor0"))
    for version in (1, 2):
        outbox.put(engine.prepare())
        engine.init_process_group(**inbox.get())
        walked = []

        def generator():
            for name, tensor in _weights(version).items():
                walked.append(name)
                yield name, tensor

        async def receive():
            return {name: tensor.clone() async for name, tensor in engine.receive_weights(global_steps=version)}

        if role.startswith("actor"):
            asyncio.run(engine.send_weights(generator(), global_steps=version))
            outbox.put(walked)
        else:
            outbox.put(asyncio.run(receive()))
        engine.finalize()


def test_actor_rank0_broadcasts_to_the_rollout_worker_and_other_ranks_walk_the_generator():
    ctx = mp.get_context("spawn")
    roles = ["actor0", "rollout0"]
    inboxes = {r: ctx.Queue() for r in roles}
    outboxes = {r: ctx.Queue() for r in roles}
    procs = [ctx.Process(target=_worker, args=(r, inboxes[r], outboxes[r]), daemon=True) for r in roles]
    for p in procs:
        p.start()
    outside = GlooCheckpointEngine(bucket_size=1 << 20)  # actor rank 1: out of the group
    try:
        for version in (1, 2):
            metadata = [outboxes["actor0"].get(timeout=300), outside.prepare(), outboxes["rollout0"].get(timeout=300)]
            assert metadata[0]["master"]["port"] > 0 and metadata[1]["master"] is None
            actor, rollout = GlooCheckpointEngine.build_topology(2, 1, metadata)
            assert actor["rank"] == [0, -1] and rollout["rank"] == [1] and actor["world_size"] == [2, 2]
            inboxes["actor0"].put({key: values[0] for key, values in actor.items()})
            inboxes["rollout0"].put({key: values[0] for key, values in rollout.items()})
            outside.init_process_group(**{key: values[1] for key, values in actor.items()})
            expected = _weights(version)
            walked = []

            def generator():
                for name, tensor in expected.items():
                    walked.append(name)
                    yield name, tensor

            assert asyncio.run(outside.send_weights(generator())) == {}
            assert walked == list(expected)  # walked all the same: its FSDP gathers are collective
            outside.finalize()
            assert outboxes["actor0"].get(timeout=300) == list(expected)
            received = outboxes["rollout0"].get(timeout=300)
            assert list(received) == list(expected)
            for name, tensor in expected.items():
                assert received[name].dtype == tensor.dtype and received[name].shape == tensor.shape, name
                assert torch.equal(received[name], tensor), name
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    assert [p.exitcode for p in procs] == [0, 0]


def test_registered_in_verls_registry():
    from verl.checkpoint_engine import CheckpointEngineRegistry

    assert CheckpointEngineRegistry.get(BACKEND) is GlooCheckpointEngine
    with pytest.raises(AssertionError, match="rollout workers receive"):
        engine = GlooCheckpointEngine(bucket_size=0)
        engine.rank = 1
        asyncio.run(engine.send_weights(iter([])))

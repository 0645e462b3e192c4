"""The one place that says how to run verl on the CPU: environment variables + Hydra overrides.

Used by ``examples/cpu/run_tiny_grpo.sh`` (through the CLI below), the end-to-end test and
``tip_verl.verl_adapter.local_workers``, so there is no second copy of these flags.

* :data:`CPU_ENV` / :func:`cpu_env` — set in the launching process *before* ``import verl``:
  ``VERL_PLATFORM=cpu`` selects the CPU platform (verl's own switch); the rest keeps the run offline
  (no Hugging Face hub, no wandb, no Ray usage stats).
* :func:`cpu_overrides` — Hydra overrides for ``verl.trainer.main_ppo`` (``ppo_trainer`` config).
  Later overrides win in Hydra, so callers can append their own after these.

CLI::

    python -m tip_verl.verl_adapter.cpu_overrides            # overrides, one per line
    python -m tip_verl.verl_adapter.cpu_overrides --env      # `export K=V` lines for a shell
    python -m tip_verl.verl_adapter.cpu_overrides --n-workers 2          # the same for two worker ranks
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

# Must match tip_verl.verl_adapter.cpu.platform.CPU_RAY_RESOURCE (kept literal here so that this
# module does not import verl).
CPU_RAY_RESOURCE = "verl_cpu_slot"

CPU_ENV: dict[str, str] = {
    "VERL_PLATFORM": "cpu",  # verl/plugin/platform/platform_manager.py: explicit platform choice
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray would otherwise try to report usage stats over the network
    "TOKENIZERS_PARALLELISM": "false",
}


def _physical_cores() -> int:
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:  # noqa: BLE001
        return int(os.cpu_count() or 1)


def cpu_env() -> dict[str, str]:
    """Environment variables a CPU run needs in the launching process (and in every Ray worker)."""
    env = dict(CPU_ENV)
    # TransferQueue sizes its torch thread pools with TQ_NUM_THREADS (default 8) and warns on every
    # put/get when that exceeds the physical cores.
    env["TQ_NUM_THREADS"] = str(min(8, _physical_cores()))
    return env


#: verl's short names of the FSDP mixed-precision dtypes
_MP_NAMES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16"}


def fsdp2_engine_overrides(role: str = "actor", *, model_dtype: str = "fp32") -> list[str]:
    """Hydra overrides of one FSDP2 engine computing in ``model_dtype`` (parameters), reductions in float32.

    Without an explicit mixed_precision block verl's FSDP engine computes in bf16
    (verl/workers/engine/fsdp/transformer_impl.py:397 param_dtype=torch.bfloat16 feeds FSDP2's
    MixedPrecisionPolicy and torch.autocast), whatever model_dtype says. FSDP2: FSDP1 needs an accelerator.
    Shared by :func:`cpu_overrides`, the single-process harness (:mod:`.local_workers`), the tests and the
    benchmarks.
    """
    fsdp = f"actor_rollout_ref.{role}.fsdp_config"
    return [
        f"{fsdp}.strategy=fsdp2",
        f"{fsdp}.model_dtype={model_dtype}",
        f"+{fsdp}.mixed_precision.param_dtype={_MP_NAMES[model_dtype]}",
        f"+{fsdp}.mixed_precision.reduce_dtype=fp32",
        f"+{fsdp}.mixed_precision.buffer_dtype=fp32",
    ]


def cpu_overrides(
    *,
    worker_slots: int = 8,
    ray_num_cpus: int = 32,
    n_workers: int = 1,
) -> list[str]:
    """Hydra overrides that make ``python -m verl.trainer.main_ppo`` run on the host CPU.

    Args:
        worker_slots: how many units of the logical Ray resource ``verl_cpu_slot`` (one per verl
            worker process: actor/ref/rollout group, plus teacher replicas when distillation is on)
            Ray advertises. Only an upper bound; more is harmless.
        ray_num_cpus: logical CPUs Ray advertises. verl's placement groups reserve several CPUs per
            worker bundle, TransferQueue and the agent/reward loops add actors; the real machine may
            have only 2 cores, so this is deliberately larger than ``nproc``.
        n_workers: actor/rollout worker processes (``trainer.n_gpus_per_node``): the data-parallel ranks
            of the actor and the ref, each a Ray worker holding one ``verl_cpu_slot``; 1 on a small host.
            The micro-batch sizes must divide each rank's share (:mod:`.dp_layout`; the recipe derives them).
    """
    if n_workers < 1:
        raise ValueError(f"n_workers={n_workers}: at least one worker rank")
    # one slot per actor/ref rank, plus rollout / teacher replicas and headroom
    worker_slots = max(worker_slots, 4 * n_workers)
    rollout = "actor_rollout_ref.rollout"
    o: list[str] = [
        # --- platform / device -------------------------------------------------------------
        "trainer.device=cpu",
        f"trainer.n_gpus_per_node={n_workers}",
        "trainer.nnodes=1",
        # --- Ray: logical resources on a small host, platform env in every worker, no dashboard
        f"ray_kwargs.ray_init.num_cpus={ray_num_cpus}",
        f"+ray_kwargs.ray_init.resources.{CPU_RAY_RESOURCE}={worker_slots}",
        "+ray_kwargs.ray_init.include_dashboard=False",
    ]
    # the same environment in every Ray worker, also when Ray was started outside this process
    # (values quoted: Hydra would otherwise turn "1" into an int, and Ray wants str env values)
    o += [f"+ray_kwargs.ray_init.runtime_env.env_vars.{k}='{v}'" for k, v in cpu_env().items()]
    o += [
        # --- TransferQueue: one storage unit (the default 8 storage actors ask for more CPUs than
        # a 2-core machine has and hang at start-up)
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        # --- model: no FlashAttention on the host; packed (remove-padding) attention needs it
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=False",
        # --- engines: FSDP2 (FSDP1 needs an accelerator), real float32, no torch.compile
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.ref.strategy=fsdp2",
    ]
    for role in ("actor", "ref"):
        o += fsdp2_engine_overrides(role, model_dtype="fp32")
        # torch.compile of the entropy kernel would JIT-compile C++ on the host at start-up
        o.append(f"actor_rollout_ref.{role}.fsdp_config.use_torch_compile=False")
    o += [
        "actor_rollout_ref.actor.use_torch_compile=False",
        # --- rollout: Hugging Face generate server (tip_verl.verl_adapter.cpu.hf_rollout)
        f"{rollout}.name=hf",
        f"{rollout}.dtype=float32",
        f"{rollout}.tensor_model_parallel_size=1",
        f"{rollout}.agent.num_workers=1",
        # --- teacher (only read when distillation.enabled=true): one hf replica of size 1
        "distillation.n_gpus_per_node=1",
        "distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=1",
        # --- fewer helper processes on a small host
        "reward.num_workers=1",
        "data.dataloader_num_workers=0",
        # --- logging: console only (no wandb, nothing over the network)
        "trainer.logger=[console]",
    ]
    return o


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", action="store_true", help="print `export K=V` lines instead of overrides")
    parser.add_argument("--worker-slots", type=int, default=8)
    parser.add_argument("--ray-num-cpus", type=int, default=32)
    parser.add_argument("--n-workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.env:
        for key, value in cpu_env().items():
            print(f"export {key}={shlex.quote(value)}")
    else:
        for line in cpu_overrides(
            worker_slots=args.worker_slots, ray_num_cpus=args.ray_num_cpus, n_workers=args.n_workers
        ):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The data-parallel layout (tip_verl.verl_adapter.dp_layout): each rank's share per pass, the micro-batch sizes the
CPU recipe derives for N_WORKERS, and its standard-library command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tip_verl.verl_adapter import dp_layout
from tip_verl.verl_adapter.dp_layout import (LOG_PROB_MICRO, REF_MICRO, UPDATE_MICRO, derived_micro_batch_sizes,
                                             largest_divisor_at_most, layout)

REPO = Path(__file__).resolve().parents[2]

# the CPU recipes' own flags (examples/cpu/tiny_main_ppo.sh): the base job and the OPD main job on top of it
BASE = ["actor_rollout_ref.actor.strategy=fsdp2", "trainer.nnodes=1", "data.train_batch_size=4",
        "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        f"{UPDATE_MICRO}=4", f"{LOG_PROB_MICRO}=8", f"{REF_MICRO}=8"]
OPD = [*BASE, "data.train_batch_size=32", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=32",
       f"{UPDATE_MICRO}=128", f"{LOG_PROB_MICRO}=128", f"{REF_MICRO}=128"]


def _config(overrides):
    return dp_layout._as_config(dp_layout.parse_overrides(overrides))


def test_largest_divisor_at_most():
    assert [largest_divisor_at_most(64, cap) for cap in (128, 64, 63, 33, 32, 1)] == [64, 64, 32, 32, 32, 1]
    assert largest_divisor_at_most(7, 5) == 1 and largest_divisor_at_most(12, 0) == 1


@pytest.mark.parametrize("ranks,per_rank", [(1, 128), (2, 64), (4, 32), (8, 16)])
def test_shares_of_the_opd_recipe(ranks, per_rank):
    found = layout(_config([*OPD, f"trainer.n_gpus_per_node={ranks}"]))
    assert (found.ranks, found.dp, found.batch, found.padded_batch, found.mini_batch) == (ranks, ranks, 128, 128, 128)
    assert {s.flag: s.per_rank for s in found.shares} == {LOG_PROB_MICRO: per_rank, REF_MICRO: per_rank,
                                                          UPDATE_MICRO: per_rank}
    assert bool(found.problems) == (ranks > 1)  # 128 per micro-batch: one rank only


def test_verls_padding_and_sequence_parallelism():
    # 3 prompts x 2 = 6 sequences, mini-batches of 4 over 4 ranks: verl pads the batch to 8, 2 per rank
    found = layout(_config([*BASE, "data.train_batch_size=3", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                            "trainer.n_gpus_per_node=4", f"{LOG_PROB_MICRO}=2", f"{REF_MICRO}=2", f"{UPDATE_MICRO}=1"]))
    assert (found.batch, found.padded_batch) == (6, 8) and not found.problems
    assert "padded by verl to 8" in found.shares[0].source
    # Ulysses sequence parallelism of 2 over 4 GPUs: 2 data-parallel ranks
    found = layout(_config([*OPD, "trainer.n_gpus_per_node=4", "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"]))
    assert found.dp == 2 and {s.per_rank for s in found.shares} == {64}


def test_not_modelled_layouts_are_left_alone():
    assert layout(_config([*OPD, "actor_rollout_ref.actor.use_dynamic_bsz=true"])) is None
    assert layout(_config([*OPD, "actor_rollout_ref.actor.strategy=megatron"])) is None
    assert layout({}) is None


def test_the_ref_of_a_lora_job_runs_in_the_actor_unless_it_is_the_tip_teacher():
    lora = [*OPD, "actor_rollout_ref.model.lora_rank=8"]
    assert dp_layout.uses_lora(_config(lora)) and dp_layout.ref_in_actor(_config(lora))
    assert REF_MICRO not in {s.flag for s in layout(_config(lora)).shares}  # verl: the actor's log-prob pass
    for other in ("actor_rollout_ref.model.lora.rank=8", "actor_rollout_ref.model.lora_adapter_path=/adapter"):
        assert dp_layout.ref_in_actor(_config([*OPD, other]))
    teacher = [*lora, "+tip.teacher_path=/teacher"]  # TIP: the ref is the teacher, a pass of its own
    assert not dp_layout.ref_in_actor(_config(teacher))
    assert REF_MICRO in {s.flag for s in layout(_config(teacher)).shares}
    assert not dp_layout.uses_lora(_config([*OPD, "actor_rollout_ref.model.lora_rank=0"]))


def test_derived_micro_batch_sizes():
    # one rank: the recipes' own sizes are kept (the single-rank jobs do not change)
    assert derived_micro_batch_sizes([*BASE, "trainer.n_gpus_per_node=1"]) == {LOG_PROB_MICRO: 8, REF_MICRO: 8,
                                                                              UPDATE_MICRO: 4}
    assert set(derived_micro_batch_sizes([*OPD, "trainer.n_gpus_per_node=1"]).values()) == {128}
    # two ranks: the largest divisor of each share below the configured size
    assert derived_micro_batch_sizes([*BASE, "trainer.n_gpus_per_node=2"]) == {LOG_PROB_MICRO: 4, REF_MICRO: 4,
                                                                              UPDATE_MICRO: 4}
    assert set(derived_micro_batch_sizes([*OPD, "+trainer.n_gpus_per_node=2"]).values()) == {64}
    # the caller's batch flags (later overrides win) are what the sizes are derived from
    caller = ["data.train_batch_size=16", "actor_rollout_ref.actor.ppo_mini_batch_size=16", "trainer.n_gpus_per_node=2"]
    assert set(derived_micro_batch_sizes([*OPD, *caller]).values()) == {32}
    for ranks in (1, 2, 3, 4, 8):
        job = [*OPD, f"trainer.n_gpus_per_node={ranks}", "data.train_batch_size=24",
               "actor_rollout_ref.actor.ppo_mini_batch_size=12"]
        derived = [f"{k}={v}" for k, v in derived_micro_batch_sizes(job).items()]
        assert not layout(_config([*job, *derived])).problems, (ranks, derived)


def test_command_line_runs_without_torch():
    """The recipe runs the file itself (standard library only: no torch import, ~30 ms)."""
    job = [*OPD, "trainer.n_gpus_per_node=2", "hydra.run.dir=/tmp/x y"]
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "tip_verl/verl_adapter/dp_layout.py"),
                           "--", *job], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{LOG_PROB_MICRO}=64", f"{REF_MICRO}=64", f"{UPDATE_MICRO}=64"]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "tip_verl" not in imported

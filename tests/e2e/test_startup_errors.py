"""End to end: bad TIP input stops ``python -m verl.trainer.main_ppo`` on the driver, before Ray starts.

So does a data-parallel layout whose micro-batches cannot divide a rank's share (``trainer.n_gpus_per_node=2``
with the one-rank recipe's micro-batch sizes). The command line is the CPU recipe's own
(``examples/cpu/tiny_main_ppo.sh opd`` with ``DRY_RUN=1``), run directly so that the measured time is ``main_ppo``'s alone. Each bad job must end with exit status 1, one
``tip_verl:`` line naming the flag (and the file), no traceback, and never reach ``ray.init`` (verl prints
``ray init kwargs`` right before it). The wall time is printed (``-s``); the CPU time, which the shared
machine's load does not inflate, is asserted: it is the import of verl, torch and Hydra plus the checks.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: CPU seconds (user + sys) of a bad job: ~9-10 s measured (imports of torch, tensordict, transformers, ray).
CPU_BUDGET_S = 20.0


@pytest.fixture(scope="module")
def recipe(tiny_assets, tmp_path_factory):
    """(argv, env) of the CPU recipe's main_ppo command, from the script's dry run."""
    from tip_verl.verl_adapter.cpu_overrides import cpu_env

    run_dir = tmp_path_factory.mktemp("dry")
    env = dict(os.environ, PYTHON=sys.executable, ASSETS_DIR=str(tiny_assets.root), RUN_DIR=str(run_dir), DRY_RUN="1")
    env.pop("VERL_PLATFORM", None)
    proc = subprocess.run(["bash", str(REPO / "examples" / "cpu" / "run_tiny_opd.sh"), "tip.method=all"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    argv = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert argv[1:3] == ["-m", "verl.trainer.main_ppo"] and argv[-1] == "tip.method=all", argv
    env = {k: v for k, v in os.environ.items() if k != "DRY_RUN"}
    env.update(cpu_env())
    return argv, env


def _override(argv: list[str], key: str) -> str:
    return [a for a in argv if a.startswith(key + "=")][-1].split("=", 1)[1]


def test_method_all_from_the_recipe_is_plain_opd(recipe):
    """`run_tiny_opd.sh tip.method=all`: the recipe leaves the ratio unset, so `all` keeps every token (ratio 1.0)."""
    import verl
    from hydra import compose, initialize_config_dir

    from tip_verl.verl_adapter.preflight import check_tip_job

    argv, _ = recipe
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    overrides = [a for a in argv[3:] if not a.startswith("hydra.")]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose("ppo_trainer", overrides=overrides)
    run = check_tip_job(config)  # the driver's checks, on the script's real command line
    assert (run.selection.method, run.selection.ratio) == ("all", 1.0)
    assert run.loss == "topk_reverse_kl" and run.teacher_signal == "topk"


def test_two_worker_recipe_derives_micro_batches_that_divide(tiny_assets, tmp_path):
    """`N_WORKERS=2 run_tiny_opd.sh`: 64 sequences per rank, micro-batches of 64 (one the caller sets is kept as
    given); the driver's checks pass on the script's real command line."""
    import verl
    from hydra import compose, initialize_config_dir

    from tip_verl.verl_adapter.dp_layout import LOG_PROB_MICRO, REF_MICRO, UPDATE_MICRO, layout
    from tip_verl.verl_adapter.preflight import preflight

    env = dict(os.environ, PYTHON=sys.executable, ASSETS_DIR=str(tiny_assets.root), RUN_DIR=str(tmp_path),
               DRY_RUN="1", N_WORKERS="2")
    env.pop("VERL_PLATFORM", None)
    proc = subprocess.run(["bash", str(REPO / "examples" / "cpu" / "run_tiny_opd.sh"), f"{UPDATE_MICRO}=32"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[run_tiny_opd] worker ranks: 2 (" in proc.stdout
    argv = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert _override(argv, "trainer.n_gpus_per_node") == "2"
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose("ppo_trainer", overrides=[a for a in argv[3:] if not a.startswith("hydra.")])
    found = layout(config)
    assert found.dp == 2
    assert {s.flag: (s.per_rank, s.micro) for s in found.shares} == {
        LOG_PROB_MICRO: (64, 64), REF_MICRO: (64, 64), UPDATE_MICRO: (64, 32)}
    preflight(config, use_reference_policy=False)  # passes (the ref-as-teacher pass is checked all the same)


def test_bad_tip_input_fails_before_ray(recipe, tmp_path):
    argv, env = recipe
    teacher = _override(argv, "+tip.teacher_path")
    bad_teacher = tmp_path / "teacher"
    shutil.copytree(teacher, bad_teacher)
    weights = bad_teacher / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    no_config = tmp_path / "student"
    shutil.copytree(_override(argv, "actor_rollout_ref.model.path"), no_config)
    (no_config / "config.json").unlink()
    cases = {
        "unknown key": (["+tip.mehtod=q3"], "tip_verl: Unknown flag +tip.mehtod. Did you mean +tip.method?"),
        "bad value": (["tip.ratio=0"], "tip_verl: Bad +tip.* flag: TIPConfig.ratio=0.0 is invalid: must be in (0, 1]"),
        "tip_opd without tip_sync": (["trainer.v1.trainer_mode=sync"],
                                     "tip_verl: algorithm.adv_estimator=tip_opd is computed by the TIP trainer only, "
                                     "but trainer.v1.trainer_mode=sync: set trainer.v1.trainer_mode=tip_sync."),
        "use_kl_loss": (["actor_rollout_ref.actor.use_kl_loss=True"],
                        "tip_verl: actor_rollout_ref.actor.use_kl_loss=True contradicts OPD with TIP"),
        "truncated teacher": ([f"tip.teacher_path={bad_teacher}"],
                              f"tip_verl: +tip.teacher_path={bad_teacher}: {weights}: truncated: the header describes"),
        "student without config.json": ([f"actor_rollout_ref.model.path={no_config}"],
                                        f"tip_verl: actor_rollout_ref.model.path={no_config}: no config.json in "
                                        f"{no_config} (not a Hugging Face model folder)"),
        # the one-rank recipe's micro-batches of 128 on two ranks (64 sequences each): verl would stop in
        # prepare_micro_batches after Ray start and model load
        "two ranks, one rank's micro-batches": (
            ["trainer.n_gpus_per_node=2"],
            "tip_verl: data-parallel layout: actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=128 does "
            "not divide the 64 sequences each rank gets in the log-prob pass"),
    }

    _check_bad_jobs(recipe, cases)


def test_async_mode_misconfigurations_fail_before_ray(recipe):
    """The asynchronous TIP modes: a plain verl mode with TIP flags, and what separate_async needs (issue 13)."""
    separate = ["trainer.v1.trainer_mode=tip_separate_async", "actor_rollout_ref.rollout.nnodes=1",
                "actor_rollout_ref.rollout.n_gpus_per_node=1"]
    _check_bad_jobs(recipe, {
        "plain colocate_async with TIP": (
            ["trainer.v1.trainer_mode=colocate_async"],
            "tip_verl: algorithm.adv_estimator=tip_opd is computed by the TIP trainer only, but "
            "trainer.v1.trainer_mode=colocate_async: set trainer.v1.trainer_mode=tip_colocate_async."),
        "separate_async without a rollout pool": (
            ["trainer.v1.trainer_mode=tip_separate_async"],
            "tip_verl: actor_rollout_ref.rollout.nnodes=0: trainer.v1.trainer_mode=tip_separate_async generates on a "
            "separate resource pool"),
        "separate_async with the in-process weight sync": (
            separate,
            "tip_verl: actor_rollout_ref.rollout.checkpoint_engine.backend=naive: trainer.v1.trainer_mode="
            "tip_separate_async sends the weights to the separate rollout pool over a checkpoint engine"),
        "separate_async with LoRA adapters that would never reach the rollout": (
            [*separate, "actor_rollout_ref.rollout.checkpoint_engine.backend=tip_gloo", "actor_rollout_ref.model.lora_rank=8"],
            "tip_verl: actor_rollout_ref.model.lora_rank>0 with trainer.v1.trainer_mode=tip_separate_async: verl's "
            "checkpoint-engine weight sync to the separate rollout pool sends the base weights without the LoRA adapters"),
    })


def _check_bad_jobs(recipe, cases: dict) -> None:
    """Run each bad job (the recipe's command line plus its overrides) and check its one ``tip_verl:`` line."""
    argv, env = recipe

    def run(extra):
        script = ("import resource, subprocess, sys, time, json\n"
                  "t = time.time(); rc = subprocess.run(sys.argv[1:]).returncode\n"
                  "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
                  "print('TIMING ' + json.dumps([rc, time.time() - t, u.ru_utime + u.ru_stime]))\n")
        proc = subprocess.run([sys.executable, "-c", script, *argv[:-1], *extra], env=env, capture_output=True,
                              text=True, timeout=900)
        return proc.stdout + proc.stderr

    with ThreadPoolExecutor(max_workers=3) as pool:  # a few at a time: the machine has 2 cores
        outputs = dict(zip(cases, pool.map(run, [extra for extra, _ in cases.values()])))
    load = os.getloadavg()[0]
    for name, (_, expected) in cases.items():
        out = outputs[name]
        rc, wall, cpu = json.loads([line for line in out.splitlines() if line.startswith("TIMING ")][-1][7:])
        print(f"\n[{name}] exit {rc}, {wall:.1f} s wall, {cpu:.1f} s CPU (load {load:.1f}): "
              f"{[line for line in out.splitlines() if line.startswith('tip_verl: ')]}")
        assert rc == 1, (name, out[-3000:])
        lines = [line for line in out.splitlines() if line.startswith("tip_verl: ")]
        assert len(lines) == 1 and lines[0].startswith(expected), (name, out[-3000:])
        assert "Traceback" not in out, (name, out[-3000:])
        assert "ray init kwargs" not in out  # stopped before ray.init
        assert cpu < CPU_BUDGET_S, (name, cpu)

"""The GPU example scripts: syntax, METHOD/PAIR -> flags (DRY_RUN=1), and every verl key they use exists."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_checkpoints import make_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "examples" / "gpu" / "run_opd_tip.sh"
SWEEP = ROOT / "examples" / "gpu" / "sweep_paper_methods.sh"
COLOCATE_ASYNC = ROOT / "examples" / "gpu" / "run_opd_tip_colocate_async.sh"
SEPARATE_ASYNC = ROOT / "examples" / "gpu" / "run_opd_tip_separate_async.sh"

COMMON_TIP = {
    "+tip.selection_scope": "sequence", "+tip.norm_scope": "batch", "+tip.divergence": "k3",
    "+tip.sampling_mode": "without_replacement", "+tip.importance_weighting": "false", "+tip.seed": "0",
    "+tip.advantage_estimator": "k1", "+tip.teacher_signal": "sampled",
}
#: METHOD -> the +tip flags it must produce (besides COMMON_TIP and +tip.teacher_path).
METHODS = {
    "all": {"+tip.method": "all", "+tip.invert": "false"},
    "entropy50": {"+tip.method": "entropy", "+tip.ratio": "0.5", "+tip.invert": "false"},
    "entropy20": {"+tip.method": "entropy", "+tip.ratio": "0.2", "+tip.invert": "false"},
    "entropy_sample50": {"+tip.method": "entropy_sample", "+tip.ratio": "0.5", "+tip.invert": "false"},
    "soft_or50": {"+tip.method": "soft_or", "+tip.ratio": "0.5", "+tip.invert": "false"},
    "soft_or20": {"+tip.method": "soft_or", "+tip.ratio": "0.2", "+tip.invert": "false"},
    "q3_20": {"+tip.method": "q3", "+tip.ratio": "0.2", "+tip.invert": "false"},
    "soft_or_bottom50": {"+tip.method": "soft_or", "+tip.ratio": "0.5", "+tip.invert": "true"},
}


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("examples")
    models = base / "models"
    for name in ("Qwen3-4B", "Qwen3-8B", "Llama-3.1-8B-Instruct", "Llama-3.3-70B-Instruct",
                 "Qwen2.5-1.5B-Instruct", "Qwen2.5-14B-Instruct"):
        make_checkpoint(models / name)  # the TIP start-up checks read config.json and the weight headers
    data = base / "data"
    data.mkdir()
    for name in ("train", "math500", "aime24", "aime25"):
        (data / f"{name}.parquet").write_bytes(b"")  # the script only checks that they exist
    return {"base": base, "models": models, "data": data}


def _env(setup_dirs, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PAIR", "METHOD", "STUDENT_PATH", "TEACHER_PATH", "DATA_DIR", "NNODES", "N_GPUS_PER_NODE",
                        "ROLLOUT_TP", "OUTPUT_DIR", "PROJECT", "EXPERIMENT", "METHODS", "LR", "KEEP_GOING",
                        "TRAINER_MODE", "TRAIN_BATCH_SIZE", "PPO_MINI_BATCH_SIZE", "PARAMETER_SYNC_STEP",
                        "ROLLOUT_NNODES", "ROLLOUT_GPUS_PER_NODE", "CHECKPOINT_ENGINE", "NUM_WARMUP_BATCHES",
                        "MAX_OFF_POLICY", "MAX_OFF_POLICY_STRATEGY")}
    env.update({"MODEL_ROOT": str(setup_dirs["models"]), "DATA_DIR": str(setup_dirs["data"]), "DRY_RUN": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(script, env, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def _overrides(stdout: str) -> tuple[list[str], list[str]]:
    """(program, hydra overrides) of the one command line a dry run prints."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    argv = shlex.split(lines[0])
    assert argv[1:3] == ["-m", "verl.trainer.main_ppo"], argv[:3]
    return argv[:3], argv[3:]


def _as_dict(overrides: list[str]) -> dict:
    out = {}
    for item in overrides:
        key, _, value = item.partition("=")
        out[key] = value  # later wins, as in Hydra
    return out


def test_scripts_parse_with_bash_n():
    for script in (RUN, SWEEP, COLOCATE_ASYNC, SEPARATE_ASYNC):
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("method", list(METHODS))
def test_dry_run_tip_flags_per_method(setup_dirs, method):
    res = _run(RUN, _env(setup_dirs, METHOD=method))
    assert res.returncode == 0, res.stderr
    _, overrides = _overrides(res.stdout)
    flags = _as_dict(overrides)
    tip = {k: v for k, v in flags.items() if k.startswith("+tip.")}
    assert tip == {**COMMON_TIP, **METHODS[method], "+tip.teacher_path": str(setup_dirs["models"] / "Qwen3-8B")}
    assert flags["trainer.v1.trainer_mode"] == "tip_sync"
    assert flags["algorithm.adv_estimator"] == "tip_opd"
    assert flags["actor_rollout_ref.actor.use_kl_loss"] == "False"
    assert flags["actor_rollout_ref.actor.entropy_coeff"] == "0"
    assert flags["algorithm.use_kl_in_reward"] == "False"
    assert flags["actor_rollout_ref.ref.fsdp_config.param_offload"] == "True"
    assert flags["trainer.experiment_name"] == f"qwen3_8b_4b_{method}"


@pytest.mark.parametrize("pair, student, teacher, lr, tp", [
    ("qwen3_8b_4b", "Qwen3-4B", "Qwen3-8B", "1e-6", "1"),
    ("llama_70b_8b", "Llama-3.1-8B-Instruct", "Llama-3.3-70B-Instruct", "3e-7", "2"),
    ("qwen25_14b_15b", "Qwen2.5-1.5B-Instruct", "Qwen2.5-14B-Instruct", "1e-6", "1"),
])
def test_dry_run_pairs_paths_lr_and_gpu_stack(setup_dirs, pair, student, teacher, lr, tp):
    models, data = setup_dirs["models"], setup_dirs["data"]
    res = _run(RUN, _env(setup_dirs, PAIR=pair, METHOD="soft_or50", NNODES=2, N_GPUS_PER_NODE=4,
                         OUTPUT_DIR=setup_dirs["base"] / "out", PROJECT="proj", EXPERIMENT="exp"),
               "trainer.total_epochs=3", "actor_rollout_ref.rollout.n=8")
    assert res.returncode == 0, res.stderr
    flags = _as_dict(_overrides(res.stdout)[1])
    assert flags["actor_rollout_ref.model.path"] == str(models / student)
    assert flags["+tip.teacher_path"] == str(models / teacher)
    assert flags["actor_rollout_ref.actor.optim.lr"] == lr
    assert flags["actor_rollout_ref.actor.optim.optimizer"] == "AdamW"
    assert flags["actor_rollout_ref.actor.optim.lr_scheduler_type"] == "cosine"
    assert flags["actor_rollout_ref.rollout.tensor_model_parallel_size"] == tp
    assert flags["actor_rollout_ref.rollout.name"] == "vllm"
    assert flags["actor_rollout_ref.actor.strategy"] == "fsdp2"
    assert flags["actor_rollout_ref.model.use_remove_padding"] == "True"
    assert flags["actor_rollout_ref.actor.use_dynamic_bsz"] == "True"
    assert flags["actor_rollout_ref.rollout.temperature"] == "1.0"
    assert flags["actor_rollout_ref.rollout.val_kwargs.n"] == "16"
    assert flags["actor_rollout_ref.rollout.val_kwargs.temperature"] == "1.0"
    assert flags["data.train_files"] == str(data / "train.parquet")
    assert flags["data.val_files"] == f"[{data / 'math500.parquet'},{data / 'aime24.parquet'},{data / 'aime25.parquet'}]"
    assert (flags["trainer.nnodes"], flags["trainer.n_gpus_per_node"]) == ("2", "4")
    assert flags["trainer.project_name"] == "proj" and flags["trainer.experiment_name"] == "exp"
    assert flags["trainer.default_local_dir"] == str(setup_dirs["base"] / "out" / "checkpoints")
    # extra arguments are forwarded last, so they win over the script's defaults
    assert _overrides(res.stdout)[1][-2:] == ["trainer.total_epochs=3", "actor_rollout_ref.rollout.n=8"]
    assert flags["actor_rollout_ref.rollout.n"] == "8"


@pytest.mark.parametrize("extra, needle", [
    ({"METHOD": "soft_or30"}, "unknown METHOD='soft_or30'"),
    ({"PAIR": "gpt_big_small"}, "unknown PAIR='gpt_big_small'"),
    ({"DATA_DIR": ""}, "DATA_DIR is not set"),
    ({"DATA_DIR": "/nonexistent/data"}, "DATA_DIR='/nonexistent/data' is not a folder"),
    ({"TEACHER_PATH": "/nonexistent/teacher"}, "TEACHER_PATH='/nonexistent/teacher' is not a folder"),
    ({"STUDENT_PATH": "/nonexistent/student"}, "STUDENT_PATH='/nonexistent/student' is not a folder"),
    ({"ROLLOUT_TP": "two"}, "ROLLOUT_TP='two' must be a positive integer"),
])
def test_run_fails_early_with_clear_message(setup_dirs, extra, needle):
    res = _run(RUN, _env(setup_dirs, **extra))
    assert res.returncode == 2
    assert needle in res.stderr, res.stderr
    assert res.stdout == ""


def test_run_requires_train_and_eval_parquet(setup_dirs, tmp_path):
    res = _run(RUN, _env(setup_dirs, DATA_DIR=tmp_path))
    assert res.returncode == 2 and "has no train.parquet" in res.stderr
    (tmp_path / "train.parquet").write_bytes(b"")
    res = _run(RUN, _env(setup_dirs, DATA_DIR=tmp_path))
    assert res.returncode == 2 and "none of math500.parquet" in res.stderr
    (tmp_path / "aime25.parquet").write_bytes(b"")
    res = _run(RUN, _env(setup_dirs, DATA_DIR=tmp_path))
    assert res.returncode == 0, res.stderr
    assert _as_dict(_overrides(res.stdout)[1])["data.val_files"] == f"[{tmp_path / 'aime25.parquet'}]"


def test_sweep_runs_every_paper_method(setup_dirs):
    res = _run(SWEEP, _env(setup_dirs, PAIR="llama_70b_8b"), "trainer.total_epochs=2")
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert len(lines) == len(METHODS)
    for line, method in zip(lines, METHODS):
        flags = _as_dict(shlex.split(line)[3:])
        assert {k: flags.get(k) for k in METHODS[method]} == METHODS[method]
        assert "+tip.ratio" not in flags if method == "all" else True
        assert flags["trainer.experiment_name"] == f"llama_70b_8b_{method}"
        assert flags["actor_rollout_ref.actor.optim.lr"] == "3e-7"
        assert flags["trainer.total_epochs"] == "2"
    subset = _run(SWEEP, _env(setup_dirs, METHODS="q3_20 all"))
    assert subset.returncode == 0, subset.stderr
    assert [_as_dict(shlex.split(line)[3:])["+tip.method"] for line in subset.stdout.splitlines()] == ["q3", "all"]
    bad = _run(SWEEP, _env(setup_dirs, METHODS="soft_or50 nonsense"))
    assert bad.returncode == 2 and "unknown METHOD='nonsense'" in bad.stderr
    assert bad.stdout == ""  # checked before anything runs


def test_every_override_exists_in_verl_config(setup_dirs):
    """Compose verl's own ppo_trainer config with the dry-run overrides: unknown keys would raise."""
    import verl
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    from tip_verl.verl_adapter.opd_config import validate_verl_config

    per_method = {}
    for method in METHODS:
        res = _run(RUN, _env(setup_dirs, METHOD=method, PAIR="llama_70b_8b"))
        assert res.returncode == 0, res.stderr
        per_method[method] = _overrides(res.stdout)[1]
    run_names = ("trainer.experiment_name", "trainer.default_local_dir", "trainer.validation_data_dir")

    def verl_part(overrides):
        return [o for o in overrides if not o.startswith("+tip.")]

    def same_keys(overrides):
        return [o for o in verl_part(overrides) if not o.startswith(run_names)]

    # The verl part differs between methods only in the run's names, so one composition covers all.
    assert all(same_keys(o) == same_keys(per_method["all"]) for o in per_method.values())
    overrides = per_method["soft_or_bottom50"]
    verl_overrides = verl_part(overrides)
    # no key is *added*: each one must already exist in verl's config tree
    assert not [o for o in verl_overrides if o.startswith(("+", "~"))]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose("ppo_trainer", overrides=verl_overrides)
        full = compose("ppo_trainer", overrides=overrides)  # verl's CLI accepts the +tip.* additions too
    arr = cfg.actor_rollout_ref
    assert arr.actor.strategy == "fsdp2" and arr.ref.strategy == "fsdp2"
    assert arr.actor.optim.optimizer == "AdamW" and arr.actor.optim.lr_scheduler_type == "cosine"
    assert arr.actor.optim.lr == pytest.approx(3e-7)
    assert arr.rollout.name == "vllm" and arr.rollout.temperature == 1.0
    assert arr.rollout.val_kwargs.n == 16 and arr.rollout.val_kwargs.do_sample is True
    assert arr.ref.fsdp_config.param_offload is True
    assert arr.model.use_remove_padding is True and arr.actor.use_dynamic_bsz is True
    assert cfg.trainer.v1.trainer_mode == "tip_sync" and cfg.algorithm.adv_estimator == "tip_opd"
    assert cfg.data.val_files == [str(setup_dirs["data"] / f"{n}.parquet") for n in ("math500", "aime24", "aime25")]
    assert list(cfg.trainer.logger) == ["console"]
    assert "tip" not in cfg and full.tip.method == "soft_or" and full.tip.invert is True
    # the values are valid too: verl's own dataclasses and start-up checks accept them
    actor = omega_conf_to_dataclass(arr.actor)
    assert actor.strategy == "fsdp2" and actor.optim.lr_scheduler_type == "cosine"
    assert omega_conf_to_dataclass(arr.rollout).name == "vllm"
    validate_config(full, use_reference_policy=True, use_critic=False)
    # and tip_verl's checks of the whole job accept every method's +tip flags (parsed as Hydra parses them)
    parser = OverridesParser.create()
    for method, expected in METHODS.items():
        job = OmegaConf.create(OmegaConf.to_container(cfg))
        with open_dict(job):
            job.tip = {o.key_or_group.split(".", 1)[1]: o.value()
                       for o in parser.parse_overrides([o for o in per_method[method] if o.startswith("+tip.")])}
        run = validate_verl_config(job)
        assert run.teacher_path == str(setup_dirs["models"] / "Llama-3.3-70B-Instruct")
        assert run.selection.method == expected["+tip.method"]
        assert run.selection.ratio == pytest.approx(float(expected.get("+tip.ratio", 1.0)))
        assert run.selection.invert is (expected["+tip.invert"] == "true")


def test_real_run_checks_the_python_before_launching(setup_dirs, tmp_path):
    env = _env(setup_dirs, PYTHON="false", OUTPUT_DIR=tmp_path / "out")
    env.pop("DRY_RUN")
    res = _run(RUN, env)
    assert res.returncode == 2
    assert "'false' cannot import tip_verl and verl" in res.stderr
    assert not (tmp_path / "out").exists()  # failed before anything was created or launched


def test_teacher_signal_options(setup_dirs):
    from omegaconf import OmegaConf
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from tip_verl.verl_adapter.opd_config import TIPRunConfig

    res = _run(RUN, _env(setup_dirs, TEACHER_SIGNAL="topk", TOPK_K="32", TIP_LOSS="topk_reverse_kl"))
    assert res.returncode == 0, res.stderr
    flags = _as_dict(_overrides(res.stdout)[1])
    assert (flags["+tip.teacher_signal"], flags["+tip.topk_k"], flags["+tip.loss"]) == ("topk", "32", "topk_reverse_kl")
    assert "+tip.advantage_estimator" not in flags
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in flags.items() if k.startswith("+tip.")])
    run = TIPRunConfig.from_mapping(OmegaConf.create({o.key_or_group.split(".", 1)[1]: o.value() for o in parsed}))
    assert (run.teacher_signal, run.topk_k, run.loss) == ("topk", 32, "topk_reverse_kl")
    default = _as_dict(_overrides(_run(RUN, _env(setup_dirs)).stdout)[1])
    assert default["+tip.teacher_signal"] == "sampled" and "+tip.topk_k" not in default
    for env, message in [({"TEACHER_SIGNAL": "full"}, "TEACHER_SIGNAL='full' must be"),
                         ({"TIP_LOSS": "topk_reverse_kl"}, "needs TEACHER_SIGNAL=topk"),
                         ({"TEACHER_SIGNAL": "topk", "TOPK_K": "0"}, "TOPK_K='0' must be")]:
        bad = _run(RUN, _env(setup_dirs, **env))
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


ASYNC_SAMPLER = {"trainer.v1.sampler.max_off_policy_threshold": "8", "trainer.v1.sampler.max_off_policy_strategy": "drop"}


def test_async_scripts_set_the_mode_and_what_it_needs(setup_dirs):
    """run_opd_tip_colocate_async.sh / run_opd_tip_separate_async.sh: run_opd_tip.sh with TRAINER_MODE set; the sync
    script's command line gains no mode flags."""
    sync = _as_dict(_overrides(_run(RUN, _env(setup_dirs)).stdout)[1])
    assert sync["trainer.v1.trainer_mode"] == "tip_sync"
    assert not [k for k in sync if k.startswith(("trainer.v1.colocate_async", "trainer.v1.separate_async",
                                                 "trainer.v1.sampler", "actor_rollout_ref.rollout.checkpoint"))]
    res = _run(COLOCATE_ASYNC, _env(setup_dirs, MAX_OFF_POLICY=2), "trainer.total_epochs=2")
    assert res.returncode == 0, res.stderr
    colocate = _as_dict(_overrides(res.stdout)[1])
    assert colocate["trainer.v1.trainer_mode"] == "tip_colocate_async"
    assert colocate["trainer.v1.colocate_async.num_warmup_batches"] == "1"
    assert colocate["trainer.v1.sampler.max_off_policy_threshold"] == "2"
    assert colocate["trainer.n_gpus_per_node"] == "8" and colocate["actor_rollout_ref.actor.ppo_mini_batch_size"] == "64"
    assert colocate["trainer.total_epochs"] == "2"  # extra arguments still win
    assert {k: v for k, v in colocate.items() if k not in ("trainer.v1.trainer_mode", "trainer.total_epochs")
            and not k.startswith(("trainer.v1.colocate_async", "trainer.v1.sampler"))} == \
        {k: v for k, v in sync.items() if k not in ("trainer.v1.trainer_mode", "trainer.total_epochs")}
    separate = _as_dict(_overrides(_run(SEPARATE_ASYNC, _env(setup_dirs)).stdout)[1])
    assert separate["trainer.v1.trainer_mode"] == "tip_separate_async"
    assert {k: separate[k] for k in ("trainer.n_gpus_per_node", "actor_rollout_ref.rollout.nnodes",
                                     "actor_rollout_ref.rollout.n_gpus_per_node",
                                     "trainer.v1.separate_async.parameter_sync_step", "data.train_batch_size",
                                     "actor_rollout_ref.actor.ppo_mini_batch_size",
                                     "actor_rollout_ref.rollout.checkpoint_engine.backend")} == {
        "trainer.n_gpus_per_node": "4", "actor_rollout_ref.rollout.nnodes": "1",
        "actor_rollout_ref.rollout.n_gpus_per_node": "4", "trainer.v1.separate_async.parameter_sync_step": "4",
        "data.train_batch_size": "64", "actor_rollout_ref.actor.ppo_mini_batch_size": "16",
        "actor_rollout_ref.rollout.checkpoint_engine.backend": "nccl"}
    assert {k: separate[k] for k in ASYNC_SAMPLER} == ASYNC_SAMPLER
    # the sweep runs in an async mode too
    sweep = _run(SWEEP, _env(setup_dirs, METHODS="q3_20", TRAINER_MODE="tip_colocate_async"))
    assert sweep.returncode == 0 and "trainer.v1.trainer_mode=tip_colocate_async" in sweep.stdout, sweep.stderr


@pytest.mark.parametrize("extra, needle", [
    ({"TRAINER_MODE": "colocate_async"}, "TRAINER_MODE='colocate_async' must be tip_sync, tip_colocate_async or"),
    ({"TRAINER_MODE": "tip_separate_async", "TRAIN_BATCH_SIZE": "30"},
     "TRAIN_BATCH_SIZE='30' must be a multiple of PARAMETER_SYNC_STEP=4"),
    ({"TRAINER_MODE": "tip_separate_async", "CHECKPOINT_ENGINE": "naive"}, "CHECKPOINT_ENGINE=naive cannot send"),
    ({"TRAINER_MODE": "tip_separate_async", "ROLLOUT_GPUS_PER_NODE": "0"}, "ROLLOUT_GPUS_PER_NODE='0' must be"),
    ({"TRAINER_MODE": "tip_colocate_async", "MAX_OFF_POLICY_STRATEGY": "keep"}, "MAX_OFF_POLICY_STRATEGY='keep'"),
])
def test_async_settings_fail_early(setup_dirs, extra, needle):
    res = _run(RUN, _env(setup_dirs, **extra))
    assert res.returncode == 2 and needle in res.stderr, res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("script", [COLOCATE_ASYNC, SEPARATE_ASYNC], ids=["colocate_async", "separate_async"])
def test_every_async_override_exists_in_verl_config(setup_dirs, script):
    """Each async script's command line composes with verl's own ppo_trainer config (no key added but +tip.*),
    verl's validate_config accepts it, and so do TIP's start-up checks (the mode's needs included)."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import validate_config

    from tip_verl.verl_adapter.dp_layout import parameter_sync_step
    from tip_verl.verl_adapter.opd_config import TRAINER_MODES, check_trainer_mode, validate_verl_config
    from tip_verl.verl_adapter.preflight import check_tip_job

    res = _run(script, _env(setup_dirs, METHOD="soft_or20"))
    assert res.returncode == 0, res.stderr
    overrides = _overrides(res.stdout)[1]
    assert not [o for o in overrides if o.startswith(("+", "~")) and not o.startswith("+tip.")]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        full = compose("ppo_trainer", overrides=overrides)
    mode = full.trainer.v1.trainer_mode
    assert mode in TRAINER_MODES and mode != "tip_sync"
    validate_config(full, use_reference_policy=True, use_critic=False)
    run = check_tip_job(full)  # the driver's checks: flags, checkpoints, the mode's needs
    assert (run.selection.method, run.selection.ratio) == ("soft_or", 0.2)
    check_trainer_mode(full, mode)
    assert validate_verl_config(full).teacher_source == "ref"
    if mode == "tip_separate_async":
        assert parameter_sync_step(full) == 4
        assert full.data.train_batch_size == 4 * full.actor_rollout_ref.actor.ppo_mini_batch_size
        assert full.actor_rollout_ref.rollout.checkpoint_engine.backend == "nccl"
        assert full.trainer.v1.separate_async.hybrid_rollout.enable_switch is False  # verl's default kept
    else:
        assert full.trainer.v1.colocate_async.num_warmup_batches == 1

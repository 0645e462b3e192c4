"""``+tip.teacher_path`` resolves as verl resolves ``actor_rollout_ref.model.path`` (issue 16).

The driver builds verl's ``HFModelConfig`` of student and teacher the way verl and the teacher-as-ref worker
do (``trainer._resolved_models``), so a hub id comes from the Hugging Face cache, a local folder as it is,
``use_shm`` goes through verl's shared-memory copy, and a path that resolves nowhere stops with one line.
No network: hub ids are served from a cache folder the test builds.
"""

import os

import pytest
from omegaconf import OmegaConf

from tests.unit._tiny_models import actor_config, build_tiny_qwen2
from tip_verl.verl_adapter.opd_config import TIPConfigError, TIPRunConfig
from tip_verl.verl_adapter.teacher import check_teacher_compatible
from tip_verl.verl_adapter.trainer import _resolved_models

HUB_ID = "tiny-org/tiny-teacher"
REVISION = "0123456789abcdef0123456789abcdef01234567"  # the cached snapshot refs/main points to
TEACHER_HIDDEN = 48  # differs from the student's, to tell which checkpoint was loaded


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache under tmp_path serving HUB_ID (a tiny Qwen2 teacher)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    build_tiny_qwen2(repo / "snapshots" / REVISION, vocab_size=64, hidden_size=TEACHER_HIDDEN, seed=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once at import; transformers looks them up on every call.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.mktemp("student"), vocab_size=64, hidden_size=16)


def _job(student_path, teacher_path, *overrides):
    """(verl job config with actor_rollout_ref, parsed tip node) for the ref-as-teacher path."""
    config = OmegaConf.create({"actor_rollout_ref": actor_config(student_path, overrides)})
    return config, TIPRunConfig.from_mapping({"teacher_path": teacher_path})


def test_hub_id_resolves_from_the_local_hf_cache(student, hf_cache):
    config, run = _job(student, HUB_ID)
    student_cfg, teachers = _resolved_models(config, run)
    teacher = teachers["+tip.teacher_path"]
    # verl's copy_to_local hands a hub id on unchanged; transformers loads it from the cache snapshot.
    assert (teacher.path, teacher.local_path) == (HUB_ID, HUB_ID)
    assert teacher.hf_config.hidden_size == TEACHER_HIDDEN and student_cfg.hf_config.hidden_size == 16
    sizes = check_teacher_compatible(student_cfg, teacher)
    assert sizes["teacher_vocab_size"] == sizes["student_vocab_size"] == 64


def test_local_folder(student, tmp_path):
    teacher_dir = build_tiny_qwen2(tmp_path / "teacher", vocab_size=64, hidden_size=TEACHER_HIDDEN, seed=1)
    config, run = _job(student, teacher_dir)
    _, teachers = _resolved_models(config, run)
    teacher = teachers["+tip.teacher_path"]
    assert teacher.local_path == teacher_dir and teacher.hf_config.hidden_size == TEACHER_HIDDEN
    assert check_teacher_compatible(student, teacher_dir)["teacher_vocab_size"] == 64  # plain paths work too


def test_home_is_expanded(student, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    teacher_dir = build_tiny_qwen2(tmp_path / "ckpt" / "teacher", vocab_size=64, seed=1)
    config, run = _job(student, "~/ckpt/teacher")
    assert run.teacher_path == teacher_dir
    assert _resolved_models(config, run)[1]["+tip.teacher_path"].local_path == teacher_dir


def test_use_shm_goes_through_verls_copy_for_both_models(student, hf_cache, tmp_path, monkeypatch):
    import shutil

    import verl.utils.fs as verl_fs

    def fake_copy_to_shm(src):  # verl's copy_to_shm writes to /dev/shm/verl-cache; same role, under tmp_path
        dest = tmp_path / "shm" / os.path.basename(src)
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return str(dest)

    monkeypatch.setattr(verl_fs, "copy_to_shm", fake_copy_to_shm)
    config, run = _job(student, HUB_ID, "actor_rollout_ref.model.use_shm=True")
    student_cfg, teachers = _resolved_models(config, run)
    teacher = teachers["+tip.teacher_path"]
    # The hub id is taken from the cache (verl's snapshot_download step), then copied like the student.
    assert teacher.local_path == str(tmp_path / "shm" / REVISION)
    assert student_cfg.local_path == str(tmp_path / "shm" / os.path.basename(student))
    assert teacher.hf_config.hidden_size == TEACHER_HIDDEN


def test_trainer_start_up_checks_the_resolved_hub_teacher(student, hf_cache, tmp_path):
    """tip_sync start-up, before verl's trainer is built: top-k bound from the cached teacher, path to the workers."""
    from tip_verl.verl_adapter.opd_config import WORKER_NODE
    from tip_verl.verl_adapter.trainer import TIPTrainerMixin

    class _NoVerl:  # stands in for verl's PPOTrainerSync, built after the checks
        def __init__(self, config):
            self.config = config

    class Trainer(TIPTrainerMixin, _NoVerl):
        pass

    def job(topk_k):
        return OmegaConf.create({
            "actor_rollout_ref": actor_config(student, ["actor_rollout_ref.actor.use_kl_loss=False"]),
            "trainer": {"v1": {"trainer_mode": "tip_sync"}, "default_local_dir": str(tmp_path)},
            "algorithm": {"adv_estimator": "tip_opd"},
            "tip": {"teacher_path": HUB_ID, "teacher_signal": "topk", "topk_k": topk_k},
        })

    with pytest.raises(TIPConfigError, match=r"\+tip.topk_k=65 exceeds the teacher's vocabulary size 64"):
        Trainer(job(65))
    trainer = Trainer(job(8))
    assert trainer.tip_vocab_size == 64 and trainer.config.actor_rollout_ref[WORKER_NODE].teacher_path == HUB_ID


def test_teacher_server_checkpoint_resolves_like_verls_teacher_loop(student, hf_cache):
    """distillation.enabled=true: the teacher server's model_path goes through HFModelConfig too."""
    config = OmegaConf.create({"actor_rollout_ref": actor_config(student), "distillation": {"teacher_models": {
        "teacher_model": {"model_path": HUB_ID}, "missing": {"model_path": "tiny-org/nope"}}}})
    run = TIPRunConfig.from_mapping({}, teacher_server={"loss_mode": "k3", "use_topk": False, "topk": None})
    with pytest.raises(TIPConfigError, match=r"^distillation.teacher_models.missing.model_path=tiny-org/nope "):
        _resolved_models(config, run)
    config.distillation.teacher_models.pop("missing")
    teacher = _resolved_models(config, run)[1]["distillation.teacher_models.teacher_model.model_path"]
    assert teacher.hf_config.hidden_size == TEACHER_HIDDEN


@pytest.mark.parametrize("missing", ["tiny-org/no-such-teacher", "{tmp}/no/such/folder"])
def test_unresolvable_path_fails_with_one_line_naming_the_flag(student, hf_cache, tmp_path, missing):
    missing = missing.format(tmp=tmp_path)
    config, run = _job(student, missing)
    with pytest.raises(TIPConfigError) as err:
        _resolved_models(config, run)
    msg = str(err.value)
    if os.path.isabs(missing):  # a local folder: the cheap checkpoint check names it before verl tries it
        assert "\n" not in msg and err.value.__suppress_context__
        assert msg == f"+tip.teacher_path={missing}: the folder {missing} does not exist"
        return
    assert "\n" not in msg and err.value.__suppress_context__ and "(OSError: " in msg
    assert msg.startswith(f"+tip.teacher_path={missing} cannot be loaded")
    assert f"no local folder {os.path.abspath(missing)}" in msg
    assert f"the local Hugging Face cache {hf_cache} (offline: HF_HUB_OFFLINE=1)" in msg


def test_ref_worker_loads_the_hub_teacher_the_check_checked(student, hf_cache):
    """The teacher-as-ref worker resolves the same hub id from the cache: its log-probs are the snapshot's."""
    import torch

    from tip_verl.verl_adapter.local_workers import build_local_workers

    from .hf_forward import hf_response_logits

    w = build_local_workers(student, ref_model_path=HUB_ID, check=False)
    try:
        batch = w.make_batch([[5, 6, 7], [8, 9]], responses=[[10, 11, 12, 13], [14, 15]], max_new_tokens=4)
        teacher_lp = w.ref_log_probs(batch)
        student_lp = w.log_probs(batch)["log_probs"]
    finally:
        w.close()
    snapshot = hf_cache / ("models--" + HUB_ID.replace("/", "--")) / "snapshots" / REVISION
    mask = batch["response_mask"].bool()
    expected = torch.log_softmax(hf_response_logits(snapshot, batch), -1)
    expected = expected.gather(-1, batch["responses"][..., None]).squeeze(-1)
    torch.testing.assert_close(teacher_lp[mask], expected[mask], atol=2e-5, rtol=1e-5)
    assert (teacher_lp - student_lp)[mask].abs().max() > 1e-2  # not the student

"""Start-up checks of the teacher (ref) checkpoint: same tokenizer, compatible vocabulary."""

import json
import shutil

import pytest

from tip_verl.verl_adapter.teacher import TeacherCompatibilityError, check_teacher_compatible


def test_tiny_teacher_is_compatible(tiny_assets):
    sizes = check_teacher_compatible(str(tiny_assets.student), str(tiny_assets.teacher))
    assert sizes["student_vocab_size"] == sizes["teacher_vocab_size"] >= sizes["tokenizer_size"] > 10


def test_different_tokenizer_stops_with_both_sizes(tiny_assets, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other_teacher"
    shutil.copytree(tiny_assets.teacher, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zebra", "quokka"])
    tok.save_pretrained(other)
    n_student = len(AutoTokenizer.from_pretrained(tiny_assets.student).get_vocab())
    with pytest.raises(TeacherCompatibilityError) as err:
        check_teacher_compatible(str(tiny_assets.student), str(other))
    msg = str(err.value)
    assert f"student vocab size {n_student}" in msg and f"teacher vocab size {n_student + 2}" in msg


def test_model_vocab_smaller_than_tokenizer_stops(tiny_assets, tmp_path):
    other = tmp_path / "small_vocab_teacher"
    shutil.copytree(tiny_assets.teacher, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] = 5
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TeacherCompatibilityError, match="teacher vocab size 5"):
        check_teacher_compatible(str(tiny_assets.student), str(other))

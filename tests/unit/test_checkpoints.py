"""Cheap checkpoint readability checks (tip_verl.verl_adapter.checkpoints): one line naming flag, file, problem."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from tip_verl.verl_adapter.checkpoints import CheckpointError, check_checkpoint_dir, is_local_path

FLAG = "+tip.teacher_path"


def make_checkpoint(folder, *, shards: int = 1) -> str:
    """A tiny loadable-looking checkpoint: config.json with a model_type and real safetensors weights."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "qwen2", "vocab_size": 16}, f)
    if shards == 1:
        save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, os.path.join(folder, "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({f"w{i}": torch.ones(2, 2) * i}, os.path.join(folder, name))
            weight_map[f"w{i}"] = name
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(folder)


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_dir(str(path), FLAG)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{FLAG}={path}: "), message
    return message


def test_a_valid_checkpoint_passes(tmp_path):
    for shards in (1, 3):
        folder = make_checkpoint(tmp_path / f"ok{shards}", shards=shards)
        assert check_checkpoint_dir(folder, FLAG) == os.path.abspath(folder)


def test_the_project_assets_pass(tiny_assets):
    for path in (tiny_assets.student, tiny_assets.teacher):
        check_checkpoint_dir(str(path), "actor_rollout_ref.model.path")


def test_missing_folder_or_a_file(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    assert "is a file, not a checkpoint folder" in _error(tmp_path / "f")


def test_config_json_problems(tmp_path):
    folder = tmp_path / "m"
    make_checkpoint(folder)
    config = folder / "config.json"
    config.write_text('{"vocab_size": 16}')
    message = _error(folder)
    assert f"{config}: has no \"model_type\" key" in message
    config.write_text("{not json")
    assert f"{config}: not valid JSON" in _error(folder)
    config.write_text("[1, 2]")
    assert "a JSON list, not an object" in _error(folder)
    config.unlink()
    assert "no config.json in" in _error(folder)


def test_empty_truncated_and_padded_safetensors(tmp_path):
    folder = tmp_path / "m"
    make_checkpoint(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    assert f"{weights}: truncated: the header describes 48 bytes of tensor data, the file holds 38" in _error(folder)
    weights.write_bytes(data[:5])
    assert "shorter than the 8-byte safetensors header length" in _error(folder)
    weights.write_bytes(data[:30])
    assert "does not fit in the file" in _error(folder)
    weights.write_bytes(data + b"\0" * 4)
    assert "4 bytes after the last tensor" in _error(folder)
    weights.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    assert "header is not valid JSON" in _error(folder)
    weights.write_bytes(b"")
    assert f"{weights}: empty file (0 bytes)" in _error(folder)


def test_missing_weights_and_shards(tmp_path):
    folder = tmp_path / "m"
    make_checkpoint(folder, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert "names the shard model-00002-of-00002.safetensors, which is missing" in _error(folder)
    bare = tmp_path / "bare"
    make_checkpoint(bare)
    (bare / "model.safetensors").unlink()
    assert "no model weights in" in _error(bare)
    (bare / "pytorch_model.bin").write_bytes(b"")
    assert "pytorch_model.bin: empty file (0 bytes)" in _error(bare)


def test_local_paths_versus_hub_ids(tmp_path):
    assert is_local_path("/ckpt/missing") and is_local_path("~/x") and is_local_path("./m")
    assert is_local_path(str(tmp_path))
    assert not is_local_path("Qwen/Qwen3-8B") and not is_local_path("hdfs://host/ckpt")

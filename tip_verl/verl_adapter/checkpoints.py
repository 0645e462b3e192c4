"""Cheap readability checks of a Hugging Face checkpoint folder, before any weights load.

A teacher or student folder that transformers cannot read fails deep inside model loading (a bare
``SafetensorError``, or "Should have a `model_type` key" for a folder without ``config.json``), after Ray,
the engines and the tokenizers have started. :func:`check_checkpoint_dir` reads only file sizes, the JSON
files and the safetensors headers (8-byte length + JSON), so it costs milliseconds even for a 70B
checkpoint, and names the flag, the file and what is wrong in one line (:class:`CheckpointError`).

What is checked: the folder exists; ``config.json`` is a JSON object with a ``model_type``; there are
weights (``*.safetensors``, or PyTorch ``*.bin`` / ``*.pt`` / ``*.pth``); a ``*.safetensors.index.json``
names shards that exist; every safetensors file has a well-formed header whose tensors end exactly at the
end of the file (a truncated or empty file does not); a ``.bin`` file is not empty.

No verl import (used by the driver pre-flight and by the CPU backend's checks).
"""

from __future__ import annotations

import json
import os
import struct

__all__ = ["CheckpointError", "check_checkpoint_dir", "check_safetensors_file", "is_local_path"]

#: A safetensors header larger than this is not a header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
_TORCH_WEIGHTS = (".bin", ".pt", ".pth")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the flag, the file and the problem."""


def is_local_path(path: str) -> bool:
    """True for a path that can only mean a local folder (absolute, ``~``, ``./``, ``../``, or existing).

    Hub ids (``Qwen/Qwen3-8B``) and remote URIs (``hdfs://...``) are resolved by verl's own code instead.
    """
    path = str(path)
    if "://" in path:
        return False
    return (os.path.isabs(os.path.expanduser(path)) or path.startswith(("./", "../", "~"))
            or os.path.exists(path))


def _fail(flag: str, path: str, file: str | None, what: str) -> CheckpointError:
    where = f"{file}: " if file else ""
    return CheckpointError(f"{flag}={path}: {where}{what}")


def check_safetensors_file(file: str) -> None:
    """Raise ``ValueError`` (one line, without the file name) when ``file`` is not a complete safetensors file."""
    size = os.path.getsize(file)
    if size == 0:
        raise ValueError("empty file (0 bytes), not a safetensors file")
    if size < 8:
        raise ValueError(f"{size} bytes, shorter than the 8-byte safetensors header length")
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"header length {n} does not fit in the file ({size} bytes): truncated or not "
                             "a safetensors file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("the safetensors header is not valid JSON (corrupted file)") from None
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object (corrupted file)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name!r} has no valid data_offsets in the header (corrupted file)")
        end = max(end, offsets[1])
    have = size - 8 - n
    if have < end:
        raise ValueError(f"truncated: the header describes {end} bytes of tensor data, the file holds {have}")
    if have > end:
        raise ValueError(f"{have - end} bytes after the last tensor ({end} bytes of tensor data expected): "
                         "corrupted file")


def _check_config(flag: str, path: str, folder: str) -> None:
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise _fail(flag, path, None, f"no config.json in {folder} (not a Hugging Face model folder)")
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        reason = (str(e).splitlines() or [""])[0]
        raise _fail(flag, path, config, f"not valid JSON ({type(e).__name__}: {reason})") from None
    if not isinstance(data, dict):
        raise _fail(flag, path, config, f"a JSON {type(data).__name__}, not an object")
    if not isinstance(data.get("model_type"), str) or not data["model_type"]:
        raise _fail(flag, path, config, "has no \"model_type\" key (transformers needs it to pick the model class)")


def _weight_files(flag: str, path: str, folder: str, names: list[str]) -> list[str]:
    """The weight files the checkpoint needs: the shards its index names, else every weight file present."""
    indexes = sorted(n for n in names if n.endswith((".safetensors.index.json", ".bin.index.json")))
    if indexes:
        files: list[str] = []
        for index in indexes:
            index_path = os.path.join(folder, index)
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f).get("weight_map")
            except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
                raise _fail(flag, path, index_path, f"not a valid index ({type(e).__name__})") from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise _fail(flag, path, index_path, "has no \"weight_map\" of tensor -> shard file")
            for shard in sorted(set(map(str, weight_map.values()))):
                if not os.path.isfile(os.path.join(folder, shard)):
                    raise _fail(flag, path, index_path, f"names the shard {shard}, which is missing")
                files.append(shard)
        return files
    files = [n for n in names if n.endswith(".safetensors")]
    return files or [n for n in names if n.endswith(_TORCH_WEIGHTS)]


def check_checkpoint_dir(path: str, flag: str) -> str:
    """Check that the local checkpoint folder ``path`` (given as ``flag``) can be loaded; return the folder.

    Raises :class:`CheckpointError` with one line naming ``flag``, the file and the problem.
    """
    folder = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(folder):
        raise _fail(flag, path, None, f"the folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise _fail(flag, path, None, f"{folder} is a file, not a checkpoint folder")
    _check_config(flag, path, folder)
    names = sorted(os.listdir(folder))
    weights = _weight_files(flag, path, folder, names)
    if not weights:
        raise _fail(flag, path, None, f"no model weights in {folder} (no *.safetensors or pytorch_model.bin)")
    for name in weights:
        file = os.path.join(folder, name)
        try:
            if name.endswith(".safetensors"):
                check_safetensors_file(file)
            elif os.path.getsize(file) == 0:
                raise ValueError("empty file (0 bytes)")
        except OSError as e:
            raise _fail(flag, path, file, f"cannot be read ({e.strerror or type(e).__name__})") from None
        except ValueError as e:
            raise _fail(flag, path, file, str(e)) from None
    return folder

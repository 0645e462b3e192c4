"""The asset cache: where a build lives (:class:`AssetPaths`), its manifest, and whether a build can be reused.

A build is reused when its manifest's key (version, seed, tokenizer fingerprint, build config) matches,
every file is there and each file's content matches the sha256 the manifest pins.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from .tokenizer import CHAT_TEMPLATE

if TYPE_CHECKING:
    from .build import BuildConfig

# Bump when the code that produces the assets changes in a way the config does not capture.
ASSETS_VERSION = 2
DEFAULT_ASSETS_DIR = Path("~/.cache/tip_verl/assets-v2").expanduser()
ENV_VAR = "TIP_VERL_ASSETS"
MANIFEST_NAME = "manifest.json"
MANIFEST_TITLE = "tip_verl tiny assets"


@dataclass(frozen=True)
class AssetPaths:
    root: Path
    student: Path
    teacher: Path
    train_parquet: Path
    test_parquet: Path
    reward_fn: Path
    manifest: Path

    @classmethod
    def under(cls, root: Union[str, os.PathLike]) -> "AssetPaths":
        root = Path(root)
        return cls(
            root=root,
            student=root / "student",
            teacher=root / "teacher",
            train_parquet=root / "data" / "train.parquet",
            test_parquet=root / "data" / "test.parquet",
            reward_fn=root / "reward.py",
            manifest=root / MANIFEST_NAME,
        )


def _tokenizer_fingerprint() -> str:
    from .tokenizer import PRETOKENIZE_REGEX, SPECIAL_TOKENS, _vocab_and_merges

    vocab, merges = _vocab_and_merges()
    blob = json.dumps([SPECIAL_TOKENS, sorted(vocab.items()), merges, PRETOKENIZE_REGEX, CHAT_TEMPLATE])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _build_key(config: "BuildConfig", seed: int) -> dict:
    """What a cached build must match to be reused."""
    return {
        "version": ASSETS_VERSION,
        "seed": seed,
        "tokenizer": _tokenizer_fingerprint(),
        "config": config.to_dict(),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _reward_source() -> Path:
    return Path(__file__).resolve().parent / "reward.py"


def resolve_out_dir(out_dir: Union[str, os.PathLike, None] = None) -> Path:
    if out_dir is None:
        out_dir = os.environ.get(ENV_VAR) or DEFAULT_ASSETS_DIR
    return Path(out_dir).expanduser().resolve()


def load_manifest(out_dir: Union[str, os.PathLike, None] = None) -> dict:
    return json.loads(AssetPaths.under(resolve_out_dir(out_dir)).manifest.read_text())


# Files a build must have; the manifest also pins the content (sha256) of every file of the two checkpoints
# and of the data. reward.py is not pinned: it is refreshed from the package on every use.
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def _content_hashes(paths: AssetPaths) -> dict:
    files = [paths.train_parquet, paths.test_parquet,
             *(f for role in ("student", "teacher") for f in sorted(getattr(paths, role).rglob("*")) if f.is_file())]
    return {str(f.relative_to(paths.root)): _sha256(f) for f in files if f.is_file()}


def _cache_problem(paths: AssetPaths, key: dict) -> Optional[str]:
    """Why the build in ``paths`` cannot be reused (None: it can). Checks the build key, that every file is
    there and that its content matches the sha256 in the manifest (a truncated or corrupted checkpoint in
    the cache is rebuilt instead of failing every run). A manifest from before content hashes gets them
    added from the files as they are (once)."""
    try:
        manifest = json.loads(paths.manifest.read_text())
    except (OSError, ValueError) as e:
        return f"no readable {MANIFEST_NAME} ({e.__class__.__name__})" if paths.root.exists() else "no build yet"
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return "a different build (config, seed, tokenizer or version)"
    needed = [paths.train_parquet, paths.test_parquet, paths.reward_fn,
              *(getattr(paths, role) / n for role in ("student", "teacher") for n in _CHECKPOINT_FILES)]
    missing = [str(p.relative_to(paths.root)) for p in needed if not p.is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    pinned = manifest.get("sha256")
    actual = _content_hashes(paths)
    if pinned is None:  # an older build: pin what is there now
        manifest["sha256"] = actual
        tmp = paths.manifest.with_name(f".manifest.json.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, paths.manifest)
        return None
    changed = sorted(name for name in pinned if pinned[name] != actual.get(name))  # (files added later: ignored)
    if changed:
        return f"content changed since it was built (sha256 mismatch: {', '.join(changed)})"
    return None


def _is_complete(paths: AssetPaths, key: dict) -> bool:
    return _cache_problem(paths, key) is None


def _refresh_reward_copy(paths: AssetPaths) -> None:
    """Keep the assets' reward.py identical to the package's (cheap; no rebuild needed)."""
    src = _reward_source()
    if paths.reward_fn.is_file() and _sha256(paths.reward_fn) == _sha256(src):
        return
    tmp = paths.reward_fn.with_name(f".reward.py.{uuid.uuid4().hex}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, paths.reward_fn)


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a directory that is neither empty nor an earlier asset build."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{out} exists and is not a directory of tip_verl assets")
    if out.is_dir() and any(out.iterdir()):
        try:
            name = json.loads((out / MANIFEST_NAME).read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            name = None
        if name != MANIFEST_TITLE:
            raise FileExistsError(
                f"{out} is not empty and holds no tip_verl asset manifest; refusing to replace it "
                "(choose another --out or remove it)"
            )

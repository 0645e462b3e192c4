"""Tiny, deterministic, offline assets for tests and the CPU demo.

``build_assets()`` makes (once, then reuses) a directory with

* ``student/`` and ``teacher/``: ``Qwen2ForCausalLM`` checkpoints (float32, untied embeddings), each
  saved with the tiny tokenizer; the teacher is trained on the task, the student much less;
* ``data/train.parquet`` and ``data/test.parquet``: the addition task in verl's RL dataset layout;
* ``reward.py``: the rule reward (``compute_score``) for ``reward.custom_reward_function.path``;
* ``manifest.json``: the build config, measured accuracies and timings.

No network, no model hub: everything is generated from the seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from .models import ModelConfig, TrainConfig
from .task import DATA_SOURCE, TaskConfig
from .tokenizer import CHAT_TEMPLATE, check_tokenizer

__all__ = [
    "ASSETS_VERSION",
    "DEFAULT_ASSETS_DIR",
    "AssetPaths",
    "BuildConfig",
    "DEFAULT_BUILD_CONFIG",
    "build_assets",
    "check_tokenizer",
    "load_manifest",
]

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


@dataclass(frozen=True)
class BuildConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    # A smaller student of the teacher's family (the paper pairs Qwen3-4B with Qwen3-8B), stopped part-way
    # through supervised training at a constant learning rate: it writes the format but still miscopies
    # digits and mis-adds, so on-policy distillation has something to teach and a student that can learn it.
    student: ModelConfig = field(
        default_factory=lambda: ModelConfig(hidden_size=96, num_layers=3, num_heads=4, intermediate_size=384)
    )
    teacher: ModelConfig = field(
        default_factory=lambda: ModelConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512)
    )
    student_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=300, batch_size=64, lr=1e-3, min_lr_ratio=1.0)
    )
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=600, batch_size=64, lr=3e-3))
    num_threads: int = 2

    def with_steps(self, *, student_steps: Optional[int] = None, teacher_steps: Optional[int] = None) -> "BuildConfig":
        cfg = self
        if student_steps is not None:
            cfg = dataclasses.replace(cfg, student_train=dataclasses.replace(cfg.student_train, steps=student_steps))
        if teacher_steps is not None:
            cfg = dataclasses.replace(cfg, teacher_train=dataclasses.replace(cfg.teacher_train, steps=teacher_steps))
        return cfg

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


DEFAULT_BUILD_CONFIG = BuildConfig()


def _tokenizer_fingerprint() -> str:
    from .tokenizer import PRETOKENIZE_REGEX, SPECIAL_TOKENS, _vocab_and_merges

    vocab, merges = _vocab_and_merges()
    blob = json.dumps([SPECIAL_TOKENS, sorted(vocab.items()), merges, PRETOKENIZE_REGEX, CHAT_TEMPLATE])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _build_key(config: BuildConfig, seed: int) -> dict:
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


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_assets(
    out_dir: Union[str, os.PathLike, None] = None,
    *,
    seed: int = 0,
    force: bool = False,
    quiet: bool = False,
) -> AssetPaths:
    """Build the tiny assets into ``out_dir`` (or reuse a matching complete build there).

    ``out_dir`` defaults to ``$TIP_VERL_ASSETS`` or :data:`DEFAULT_ASSETS_DIR`. ``force`` rebuilds
    even when a matching build exists. The build is written to a temporary directory beside
    ``out_dir`` and renamed into place, so an interrupted build never leaves a half-valid directory.
    """
    return _build_assets(out_dir, seed=seed, force=force, quiet=quiet, config=DEFAULT_BUILD_CONFIG)


def _build_assets(
    out_dir: Union[str, os.PathLike, None] = None,
    *,
    seed: int = 0,
    force: bool = False,
    quiet: bool = False,
    config: BuildConfig = DEFAULT_BUILD_CONFIG,
    student_steps: Optional[int] = None,
    teacher_steps: Optional[int] = None,
) -> AssetPaths:
    """:func:`build_assets` with an explicit config; ``*_steps`` override the training step counts
    (tests use this to make a quick, barely trained build)."""
    config = config.with_steps(student_steps=student_steps, teacher_steps=teacher_steps)
    out = resolve_out_dir(out_dir)
    paths = AssetPaths.under(out)
    key = _build_key(config, seed)
    log: Callable[[str], None] = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    problem = None if force else _cache_problem(paths, key)
    if problem is None and not force:
        _refresh_reward_copy(paths)
        return paths
    if problem is not None and problem.startswith("content changed"):
        # Always said, even when quiet: a corrupted cache costs a rebuild (about 2.5 minutes).
        print(f"tip_verl.assets: the cached build in {out} cannot be used: {problem}; rebuilding it",
              file=sys.stderr, flush=True)

    with _file_lock(out.parent / f".{out.name}.lock"):
        # Someone else may have finished the same build while we waited for the lock.
        if not force and _is_complete(paths, key):
            _refresh_reward_copy(paths)
            return paths
        _check_replaceable(out)
        # Leftovers of interrupted builds (we hold the lock, so no build is running).
        for stale in list(out.parent.glob(f".{out.name}.tmp-*")) + list(out.parent.glob(f".{out.name}.old-*")):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            _build_into(AssetPaths.under(tmp), key=key, config=config, seed=seed, log=log)
            old = None
            if out.exists():
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
                os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                if old is not None and not out.exists():
                    os.rename(old, out)  # put the previous build back
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"assets written to {out}")
    return paths


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


def _build_into(paths: AssetPaths, *, key: dict, config: BuildConfig, seed: int, log: Callable[[str], None]) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from . import models as M
    from .task import training_stream, write_parquets
    from .tokenizer import build_tokenizer

    t_start = time.time()
    with _torch_threads(config.num_threads):
        tok = build_tokenizer()
        check_tokenizer(tok)

        paths.train_parquet.parent.mkdir(parents=True, exist_ok=True)
        pairs = write_parquets(config.task, seed, paths.train_parquet, paths.test_parquet)
        test_pairs = pairs["test"]
        exclude = set(test_pairs)
        shutil.copyfile(_reward_source(), paths.reward_fn)
        log(f"data: {len(pairs['train'])} train / {len(test_pairs)} test problems ({DATA_SOURCE})")

        results = {}
        for role, mcfg, tcfg, model_seed in (
            ("teacher", config.teacher, config.teacher_train, seed * 1000 + 1),
            ("student", config.student, config.student_train, seed * 1000 + 2),
        ):
            t0 = time.time()
            model = M.build_model(mcfg, tok, model_seed)
            n_params = sum(p.numel() for p in model.parameters())
            log(f"{role}: Qwen2 hidden={mcfg.hidden_size} layers={mcfg.num_layers} ({n_params} params), "
                f"{tcfg.steps} training steps")
            model_dir = getattr(paths, role)
            # Save first and check the tokenizer as verl will load it (AutoTokenizer next to a qwen2
            # config.json), so a tokenizer problem fails the build before any training time is spent.
            model.save_pretrained(str(model_dir))
            tok.save_pretrained(str(model_dir))
            loaded_tok = _check_saved_tokenizer(tok, model_dir, test_pairs)

            stats = M.train(model, tok, training_stream(config.task, seed, exclude, role), tcfg, model_seed, log=log)
            model.save_pretrained(str(model_dir))
            del model

            # Measure what was saved, loaded the way verl loads it.
            loaded = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
            greedy = M.generate_answers(loaded, loaded_tok, test_pairs, do_sample=False)
            sampled = M.generate_answers(loaded, loaded_tok, test_pairs, do_sample=True, seed=seed)
            acc = {
                "greedy": _score(greedy, test_pairs),
                "sampled_t1": _score(sampled, test_pairs),
                "well_formed_greedy": sum(map(M.response_is_well_formed, greedy)) / len(greedy),
                "well_formed_sampled_t1": sum(map(M.response_is_well_formed, sampled)) / len(sampled),
            }
            results[role] = {
                "params": n_params,
                "model": mcfg.to_dict(),
                "train": {**tcfg.to_dict(), **stats},
                "accuracy": acc,
                "seconds": round(time.time() - t0, 2),
                "examples": [
                    {"prompt": q, "response": r}
                    for q, r in zip(_prompts(loaded_tok, test_pairs[:3]), greedy[:3])
                ],
            }
            log(f"{role}: test accuracy greedy {acc['greedy']:.3f}, sampled(T=1) {acc['sampled_t1']:.3f} "
                f"({results[role]['seconds']:.1f}s)")
            del loaded

    manifest = {
        "name": MANIFEST_TITLE,
        "key": key,
        "version": ASSETS_VERSION,
        "seed": seed,
        "config": key["config"],
        "data_source": DATA_SOURCE,
        "files": {
            "student": "student",
            "teacher": "teacher",
            "train_parquet": "data/train.parquet",
            "test_parquet": "data/test.parquet",
            "reward_fn": "reward.py",
        },
        "tokenizer": {
            "vocab_size": len(tok),
            "pad_token": tok.pad_token,
            "pad_token_id": tok.pad_token_id,
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "newline_token_id": tok.encode("\n", add_special_tokens=False)[0],
            "chat_template": CHAT_TEMPLATE,
        },
        "accuracy": {role: results[role]["accuracy"] for role in ("student", "teacher")},
        "models": results,
        "sha256": _content_hashes(paths),
        "build_seconds": round(time.time() - t_start, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    tmp_manifest = paths.manifest.with_name(".manifest.json.tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_manifest, paths.manifest)


def _check_saved_tokenizer(tok, model_dir: Path, pairs: list):
    from . import models as M
    from .tokenizer import load_tokenizer

    loaded = check_tokenizer(load_tokenizer(model_dir))
    if loaded.get_vocab() != tok.get_vocab():
        raise RuntimeError(f"{model_dir}: the saved tokenizer's vocabulary differs from the built one")
    for a, b in pairs[:16]:
        if M.encode_prompt(loaded, a, b) != M.encode_prompt(tok, a, b):
            raise RuntimeError(f"{model_dir}: the saved tokenizer encodes prompts differently from the built one")
    return loaded


def _score(responses: list, pairs: list) -> float:
    from .reward import compute_score
    from .task import answer

    return sum(compute_score(DATA_SOURCE, r, answer(a, b)) for r, (a, b) in zip(responses, pairs)) / len(pairs)


def _prompts(tok, pairs: list) -> list:
    from .task import prompt_messages

    return [tok.apply_chat_template(prompt_messages(a, b), add_generation_prompt=True, tokenize=False) for a, b in pairs]

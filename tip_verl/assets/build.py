"""The build itself: :class:`BuildConfig` (task, model sizes, training), then data, the teacher and the
student trained from the seed, measured as verl will load them, and the manifest (:func:`_build_into`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .cache import ASSETS_VERSION, MANIFEST_TITLE, AssetPaths, _content_hashes, _reward_source
from .models import ModelConfig, TrainConfig
from .task import DATA_SOURCE, TaskConfig
from .tokenizer import CHAT_TEMPLATE, check_tokenizer


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


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


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

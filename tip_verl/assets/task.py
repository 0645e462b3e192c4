"""The tiny synthetic task: multi-digit addition with a verifiable answer.

A problem is two numbers of 1..``max_digits`` digits each: the digit count is drawn uniformly, then
the number uniformly among the numbers with that many digits (so 0-9 are as likely as 10-99, a mix
of easy and carry-heavy problems that a tiny transformer learns quickly; the default
``max_digits=2`` keeps the teacher's training to about a minute on two CPU cores). The prompt is a
single user turn ``"What is 47 + 85?"``; the expected response is the sum's digits followed by
``<|im_end|>`` (e.g. ``"132<|im_end|>"``; each digit is one token, so a response is at most
``max_digits + 2`` tokens).

Datasets are written in verl's RL parquet layout (``data_source``, ``prompt``, ``ability``,
``reward_model``, ``extra_info``). Train and test problems are disjoint and everything is a
deterministic function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Iterator

DATA_SOURCE = "tip_tiny_addition"
ABILITY = "math"


@dataclass(frozen=True)
class TaskConfig:
    max_digits: int = 2
    n_train: int = 1024
    n_test: int = 128

    def to_dict(self) -> dict:
        return asdict(self)


def _sample_number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def sample_pair(rng: random.Random, max_digits: int) -> tuple[int, int]:
    return _sample_number(rng, max_digits), _sample_number(rng, max_digits)


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def answer(a: int, b: int) -> str:
    return str(a + b)


def prompt_messages(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": question(a, b)}]


def _rng(seed: int, stream: str) -> random.Random:
    # Independent, reproducible streams per purpose (string seeds hash deterministically).
    return random.Random(f"tip_tiny_addition/{stream}/{seed}")


def split_pairs(cfg: TaskConfig, seed: int) -> dict[str, list[tuple[int, int]]]:
    """Unique (a, b) pairs for the test and train splits, disjoint, deterministic for ``seed``."""
    if cfg.n_train + cfg.n_test > 100 ** cfg.max_digits // 2:
        raise ValueError(f"max_digits={cfg.max_digits} has too few distinct problems for the requested splits")
    rng = _rng(seed, "splits")
    seen: set[tuple[int, int]] = set()
    out: dict[str, list[tuple[int, int]]] = {}
    for split, n in (("test", cfg.n_test), ("train", cfg.n_train)):
        pairs: list[tuple[int, int]] = []
        while len(pairs) < n:
            pair = sample_pair(rng, cfg.max_digits)
            if pair not in seen:
                seen.add(pair)
                pairs.append(pair)
        out[split] = pairs
    return out


def make_rows(pairs: list[tuple[int, int]], split: str) -> list[dict]:
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": prompt_messages(a, b),
            "ability": ABILITY,
            "reward_model": {"style": "rule", "ground_truth": answer(a, b)},
            "extra_info": {"split": split, "index": i, "a": a, "b": b},
        }
        for i, (a, b) in enumerate(pairs)
    ]


def write_parquets(cfg: TaskConfig, seed: int, train_path, test_path) -> dict[str, list[tuple[int, int]]]:
    """Write the train/test parquet files; return the pairs of each split."""
    import pandas as pd

    pairs = split_pairs(cfg, seed)
    pd.DataFrame(make_rows(pairs["train"], "train")).to_parquet(str(train_path), index=False)
    pd.DataFrame(make_rows(pairs["test"], "test")).to_parquet(str(test_path), index=False)
    return pairs


def training_stream(cfg: TaskConfig, seed: int, exclude: set[tuple[int, int]], stream: str) -> Iterator[tuple[int, int]]:
    """Endless deterministic stream of problems for supervised pre-training, never yielding a pair
    in ``exclude`` (the test split), so the reported test accuracy measures generalisation."""
    rng = _rng(seed, f"sft/{stream}")
    while True:
        pair = sample_pair(rng, cfg.max_digits)
        if pair not in exclude:
            yield pair

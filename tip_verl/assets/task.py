"""The tiny synthetic task: multi-digit addition, solved column by column, with a verifiable answer.

A problem is two numbers of ``min_digits``..``max_digits`` digits each: the digit count is drawn
uniformly, then the number uniformly among the numbers with that many digits. The prompt is a single
user turn ``"What is 347 + 85?"``. The expected response is a short worked solution: one line per
column, right to left, ``<digit of a>+<digit of b>+<carry in>=<column sum>`` (a missing digit is 0),
then the answer on the last line, then ``<|im_end|>``::

    7+5+0=12
    4+8+1=13
    3+0+1=4
    432<|im_end|>

Every character is one token, so a response is 8-9 tokens per column plus the answer's digits plus
``<|im_end|>`` (19-32 tokens with the default 2-3 digits). Most tokens are near-deterministic for a
model that has learnt the format (``+``, ``=``, line breaks, digits copied from the prompt); the
column sums, carries and the answer are the real decisions: the mix the paper's (entropy, divergence)
picture is about. The reward (``reward.py``) checks the last line only.

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
    min_digits: int = 2
    max_digits: int = 3
    n_train: int = 2048
    n_test: int = 128

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")

    def to_dict(self) -> dict:
        return asdict(self)


def _sample_number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    digits = rng.randint(min_digits, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def sample_pair(rng: random.Random, cfg: TaskConfig) -> tuple[int, int]:
    return _sample_number(rng, cfg.min_digits, cfg.max_digits), _sample_number(rng, cfg.min_digits, cfg.max_digits)


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def answer(a: int, b: int) -> str:
    """The final answer (the reward's ground truth)."""
    return str(a + b)


def solution(a: int, b: int) -> str:
    """The worked solution a model is trained to write (without the closing ``<|im_end|>``)."""
    if a < 0 or b < 0:
        raise ValueError(f"the task adds non-negative numbers, got {a} and {b}")
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for col in range(max(len(da), len(db))):
        x = int(da[col]) if col < len(da) else 0
        y = int(db[col]) if col < len(db) else 0
        total = x + y + carry
        lines.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    lines.append(answer(a, b))
    return "\n".join(lines)


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
            pair = sample_pair(rng, cfg)
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
        pair = sample_pair(rng, cfg)
        if pair not in exclude:
            yield pair

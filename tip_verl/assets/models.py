"""Tiny Qwen2 student/teacher: build, brief supervised training on the task, accuracy evaluation.

Training is plain next-token cross-entropy on ``prompt -> answer<|im_end|>`` with the loss on the
answer tokens (and the closing ``<|im_end|>``) only. Sequences are right-padded, so every token keeps
the position it has at inference time. Everything runs in float32 on the CPU and is deterministic for
a seed (fixed thread count, seeded initialisation and data stream).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional

from .task import answer, prompt_messages, solution
from .tokenizer import EOS_TOKEN

# Enough for the longest worked solution of the default task (3-digit numbers: 32 tokens) with room to spare.
MAX_RESPONSE_TOKENS = 48

if TYPE_CHECKING:  # torch is imported lazily so that importing the package (configs, checks) stays light
    import torch


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: Optional[int] = None
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.05

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(cfg: ModelConfig, tok, seed: int):
    """A randomly initialised ``Qwen2ForCausalLM`` (float32, untied embeddings) for ``tok``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        use_sliding_window=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        dtype="float32",
        attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config).float()
    gen = model.generation_config
    gen.eos_token_id = tok.eos_token_id
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = None
    gen.max_new_tokens = MAX_RESPONSE_TOKENS
    return model


def encode_prompt(tok, a: int, b: int) -> list[int]:
    ids = tok.apply_chat_template(prompt_messages(a, b), add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_response(tok, a: int, b: int) -> list[int]:
    return list(tok.encode(solution(a, b), add_special_tokens=False)) + [tok.eos_token_id]


def make_batch(tok, pairs: list[tuple[int, int]]) -> dict[str, "torch.Tensor"]:
    """Right-padded batch; labels are -100 except on the response tokens."""
    import torch

    seqs, labels = [], []
    for a, b in pairs:
        p, r = encode_prompt(tok, a, b), encode_response(tok, a, b)
        seqs.append(p + r)
        labels.append([-100] * len(p) + r)
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    label_t = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        label_t[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_t}


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    model,
    tok,
    stream: Iterator[tuple[int, int]],
    cfg: TrainConfig,
    seed: int,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Supervised training on ``cfg.steps`` batches drawn from ``stream``; returns stats."""
    import torch

    torch.manual_seed(seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    t0 = time.time()
    loss_val = float("nan")
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg)
        batch = make_batch(tok, [next(stream) for _ in range(cfg.batch_size)])
        out = model(**batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss_val = float(out.loss.detach())
        if log is not None and (step % 100 == 0 or step == cfg.steps - 1):
            log(f"  step {step + 1}/{cfg.steps} loss {loss_val:.4f} ({time.time() - t0:.1f}s)")
    model.eval()
    return {"steps": cfg.steps, "final_loss": loss_val, "seconds": round(time.time() - t0, 2)}


def generate_answers(
    model,
    tok,
    pairs: Iterable[tuple[int, int]],
    *,
    do_sample: bool,
    seed: int = 0,
    max_new_tokens: int = MAX_RESPONSE_TOKENS,
    batch_size: int = 256,
) -> list[str]:
    """Decoded responses (special tokens kept) for each pair, via ``model.generate``.

    Prompts are grouped by token length so no batch needs padding.
    """
    import torch

    model.eval()
    pairs = list(pairs)
    prompts = [encode_prompt(tok, a, b) for a, b in pairs]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out: list[str] = [""] * len(pairs)
    torch.manual_seed(seed)
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if do_sample:
        kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False)
    for length in sorted(by_len):
        idx = by_len[length]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            input_ids = torch.tensor([prompts[i] for i in chunk], dtype=torch.long)
            with torch.no_grad():
                gen = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            for i, row in zip(chunk, gen[:, length:].tolist()):
                if tok.eos_token_id in row:  # cut after the first eos (the rest is padding)
                    row = row[: row.index(tok.eos_token_id) + 1]
                out[i] = tok.decode(row, skip_special_tokens=False)
    return out


def accuracy(model, tok, pairs: list[tuple[int, int]], *, do_sample: bool, seed: int = 0) -> float:
    """Fraction of exactly correct responses (``"<sum><|im_end|>"``) under the task's reward."""
    from .reward import compute_score

    responses = generate_answers(model, tok, pairs, do_sample=do_sample, seed=seed)
    scores = [compute_score("", r, answer(a, b)) for r, (a, b) in zip(responses, pairs)]
    return sum(scores) / max(1, len(scores))


_WELL_FORMED = re.compile(r"(\d\+\d\+[01]=\d{1,2}\n)+\d+")


def response_is_well_formed(response: str) -> bool:
    """Column lines, then an answer line, then ``<|im_end|>`` (the format), whether or not the sum is right."""
    if not response.endswith(EOS_TOKEN):
        return False
    return _WELL_FORMED.fullmatch(response[: -len(EOS_TOKEN)]) is not None

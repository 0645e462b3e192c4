"""Sampling parameters of the ``hf`` rollout: verl's ``sampling_params`` dicts -> :class:`SamplingSpec`.

Request semantics (vLLM's, as verl's agent/teacher loops rely on them):

* ``temperature`` (``< 1e-5`` means greedy), ``top_p`` (1 = off), ``top_k`` (-1/0 = off),
  ``repetition_penalty``, ``min_tokens``, ``max_tokens``/``max_new_tokens`` (default: what is left of
  ``prompt_length + response_length``, capped by ``response_length``; always capped by the context),
  ``ignore_eos``, ``stop_token_ids``, ``seed``, ``n``; stopping at the model's EOS token(s), which
  are included in the returned tokens.
* ``logprobs``: when truthy, ``log_probs`` holds the log-probability of each returned token under the
  distribution it was sampled from: ``logprobs_mode=processed_logprobs`` (verl's default) = after
  temperature/top-k/top-p (greedy requests: temperature 1), ``raw_logprobs`` = the model's raw
  distribution.
* ``prompt_logprobs=k``: ``extra_fields["prompt_ids"/"prompt_logprobs"]`` as vLLM's
  ``extract_prompt_logprobs`` lays them out (``verl/workers/rollout/vllm_rollout/utils.py:540``):
  one row per prompt token, row ``i`` describing token ``i+1`` — ``k == 0``: the actual token and its
  log-prob; ``k > 0``: the top-k tokens by rank — and a dummy last row of zeros.
* ``n > 1``: ``n`` independent samples; ``token_ids``/``log_probs`` are the first, and
  ``extra_fields["samples"]`` lists all of them (``token_ids``, ``log_probs``, ``finish_reason``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

_SAMPLING_EPS = 1e-5  # vLLM's threshold below which temperature means greedy
# Keys of verl's sampling_params dicts that this server understands.
_KNOWN_PARAMS = {
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "max_new_tokens",
    "min_tokens",
    "repetition_penalty",
    "logprobs",
    "prompt_logprobs",
    "n",
    "ignore_eos",
    "stop_token_ids",
    "seed",
    "detokenize",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
}


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """The part of a request's sampling parameters that decides *how* tokens are drawn.

    Requests with equal specs are generated together in one batched ``generate`` call.
    """

    greedy: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    min_tokens: int
    n: int
    ignore_eos: bool
    stop_token_ids: tuple[int, ...]
    want_logprobs: bool
    seed: Optional[int]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _RowSampler:
    """Logits processor that samples every row from its own generator (a per-request RNG).

    It runs after Hugging Face's own processors (repetition penalty, minimum length), applies Hugging
    Face's temperature / top-k / top-p warpers, draws one token per row, records that token's
    processed log-probability and returns scores that make greedy decoding pick exactly that token.
    """

    def __init__(self, spec: SamplingSpec, generators: list[torch.Generator]):
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.warpers = [TemperatureLogitsWarper(spec.temperature)] if spec.temperature != 1.0 else []
        if spec.top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k=spec.top_k))
        if spec.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=spec.top_p))
        self.generators = generators
        self.step_logprobs: list[torch.Tensor] = []  # (rows,) per generated position

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        logp = torch.log_softmax(scores.float(), dim=-1)
        probs = logp.exp()
        tokens = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        self.step_logprobs.append(logp.gather(-1, tokens[:, None])[:, 0])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, tokens[:, None], 0.0)


def parse_sampling_params(params: dict[str, Any], *, default_max_tokens: int, max_possible_tokens: int):
    """Normalise a verl/vLLM ``sampling_params`` dict into ``(SamplingSpec, max_tokens, prompt_logprobs)``."""
    unknown = set(params) - _KNOWN_PARAMS
    if unknown:
        logger.warning("hf rollout: ignoring unsupported sampling parameters %s", sorted(unknown))
    temperature = float(params.get("temperature", 1.0) if params.get("temperature") is not None else 1.0)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    greedy = temperature < _SAMPLING_EPS
    top_p = float(params.get("top_p", 1.0) if params.get("top_p") is not None else 1.0)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    top_k = params.get("top_k", -1)
    top_k = -1 if top_k is None or int(top_k) <= 0 else int(top_k)
    if "max_tokens" in params and params["max_tokens"] is not None:
        max_tokens = int(params["max_tokens"])
    elif "max_new_tokens" in params and params["max_new_tokens"] is not None:
        max_tokens = int(params["max_new_tokens"])
    else:
        max_tokens = default_max_tokens
    if max_possible_tokens < 1:
        raise ValueError("the prompt leaves no room to generate within the model's maximum context length")
    max_tokens = max(1, min(max_tokens, max_possible_tokens))
    n = int(params.get("n", 1) or 1)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    logprobs = params.get("logprobs", False)
    want_logprobs = logprobs is not None and logprobs is not False
    prompt_logprobs = params.get("prompt_logprobs")
    prompt_logprobs = None if prompt_logprobs is None else int(prompt_logprobs)
    if prompt_logprobs is not None and prompt_logprobs < 0:
        raise ValueError(f"prompt_logprobs must be >= 0, got {prompt_logprobs}")
    seed = params.get("seed")
    spec = SamplingSpec(
        greedy=greedy,
        temperature=1.0 if greedy else temperature,
        top_p=1.0 if greedy else top_p,
        top_k=-1 if greedy else top_k,
        repetition_penalty=float(params.get("repetition_penalty", 1.0) or 1.0),
        min_tokens=int(params.get("min_tokens", 0) or 0),
        n=n,
        ignore_eos=bool(params.get("ignore_eos", False)),
        stop_token_ids=tuple(int(t) for t in (params.get("stop_token_ids") or ())),
        want_logprobs=want_logprobs,
        seed=None if seed is None else int(seed),
    )
    return spec, max_tokens, prompt_logprobs

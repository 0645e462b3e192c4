"""``actor_rollout_ref.rollout.name=hf``: a rollout server built on Hugging Face ``generate``.

verl 0.9.1 drives rollouts through three pieces; this module provides all three for a plain
``transformers`` model on the host CPU, speaking the same protocol as verl's vLLM/SGLang servers:

* :class:`HFRolloutServer` (a Ray actor) — token-in/token-out ``generate(prompt_ids, sampling_params,
  request_id, ...) -> TokenOutput``, the control plane verl calls (``wake_up``, ``sleep``,
  ``abort_all_requests``, ``resume_generation``, ``clear_kv_cache``, ...) and ``update_weights``.
* :class:`HFRolloutReplica` — verl's ``RolloutReplica`` (``RolloutReplicaRegistry``, name ``hf``): launches
  one server per replica, for the policy (hybrid), the distillation teacher (colocated) or a reward
  model.
* :class:`HFServerAdapter` — verl's ``BaseRollout`` living in the actor worker: on every weight sync it
  gathers the FSDP weights (all ranks take part in the collectives) and ships them to its server.

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

Reproducibility: every sampled sequence draws from its own ``torch.Generator``, seeded from the
request's ``seed`` or, as verl's agent loop sends none, from ``actor_rollout_ref.rollout.seed``, the
prompt and how many times this server has seen that prompt. A request's samples therefore do not
depend on which other requests share its batch or in which order requests arrive.

Concurrency: requests are queued and a single scheduler task batches whatever is pending (up to
``max_num_seqs``), groups it by sampling parameters and runs one left-padded ``generate`` per group
in a worker thread. Weight updates and generation take the same lock, so a weight update never
lands in the middle of a batch. ``abort_all_requests`` stops in-flight generation at the next token
(a stopping criterion) and returns the partial tokens with ``stop_reason="aborted"``; queued requests
are answered ``aborted`` with no tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import threading
import time
from typing import Any, Iterable, Optional

import ray
import torch

from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput

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


def server_actor_name(replica_rank: int, *, is_teacher: bool = False, is_reward: bool = False, suffix: str = "") -> str:
    """Ray actor name of a replica's server (the adapter in the actor worker looks it up by name)."""
    if is_reward:
        return f"hf_server_reward_{replica_rank}{suffix}"
    if is_teacher:
        return f"hf_server_teacher_{replica_rank}{suffix}"
    return f"hf_server_{replica_rank}{suffix}"


# ----------------------------------------------------------------------------------------------
# Sampling parameters
# ----------------------------------------------------------------------------------------------
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


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    spec: SamplingSpec
    max_tokens: int
    prompt_logprobs: Optional[int]
    future: asyncio.Future
    sample_seed: int  # seeds the generators of this request's samples (see derive_seed)
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)


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


# ----------------------------------------------------------------------------------------------
# The model runner (plain, synchronous; used by the server and directly by unit tests)
# ----------------------------------------------------------------------------------------------
class HFGenerator:
    """Batched generation and prompt log-probs for one Hugging Face causal LM on the host."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        logprobs_mode: str = "processed_logprobs",
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        if logprobs_mode not in ("processed_logprobs", "raw_logprobs"):
            raise ValueError(f"hf rollout supports logprobs_mode processed_logprobs|raw_logprobs, got {logprobs_mode!r}")
        self.logprobs_mode = logprobs_mode
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        ).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        try:
            gen_cfg = GenerationConfig.from_pretrained(model_path)
        except Exception:  # noqa: BLE001 - no generation_config.json
            gen_cfg = self.model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else self.tokenizer.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(int(e) for e in eos)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else (self.eos_token_ids or (0,))[0]
        self.pad_token_id = int(pad)
        self.abort_all = threading.Event()  # set -> the running generate stops at the next token

    # ------------------------------------------------------------------ padding helpers
    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        return ids, mask

    # ------------------------------------------------------------------ prompt log-probs
    @torch.inference_mode()
    def prompt_logprobs(self, prompts: list[list[int]], k: int) -> list[tuple[list[list[int]], list[list[float]]]]:
        """vLLM-layout prompt log-probs for each prompt (see module docstring)."""
        ids, mask = self._left_pad(prompts)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        k = min(k, logp.shape[-1])
        width = max(1, k)
        out = []
        for i, p in enumerate(prompts):
            start = ids.shape[1] - len(p)
            lp = logp[i, start : ids.shape[1] - 1]  # predicts tokens 1..S-1
            if k == 0:
                nxt = torch.tensor(p[1:], dtype=torch.long).unsqueeze(-1)
                top_ids, top_lp = nxt, lp.gather(-1, nxt)
            else:
                top_lp, top_ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
            rows_ids = top_ids.tolist() + [[0] * width]
            rows_lp = top_lp.tolist() + [[0.0] * width]
            out.append((rows_ids, rows_lp))
        return out

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], spec: SamplingSpec, max_tokens: int, seeds: Optional[list[int]] = None
    ) -> list[list[dict]]:
        """Generate ``spec.n`` samples per prompt; returns, per prompt, a list of
        ``{"token_ids", "log_probs", "finish_reason"}`` dicts.

        Sample ``j`` of prompt ``i`` draws from a generator seeded with ``derive_seed(seeds[i], j)``,
        whatever else is in the batch (``seeds`` default: one per position, from ``spec.seed`` or 0).
        """
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        ids, mask = self._left_pad([p for p in prompts for _ in range(spec.n)])  # row i * n + j: sample j of prompt i
        prompt_width = ids.shape[1]
        stop_ids = () if spec.ignore_eos else tuple(dict.fromkeys(self.eos_token_ids + spec.stop_token_ids))
        generator = self

        class _Abort(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), generator.abort_all.is_set(), dtype=torch.bool)

        gen_kwargs = dict(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            min_new_tokens=min(spec.min_tokens, max_tokens) if spec.min_tokens else None,
            do_sample=False,  # sampling (when asked) is done by _RowSampler with per-request generators
            repetition_penalty=spec.repetition_penalty,
            eos_token_id=list(stop_ids) if stop_ids else None,
            pad_token_id=self.pad_token_id,
            output_scores=spec.want_logprobs and self.logprobs_mode == "processed_logprobs" and spec.greedy,
            output_logits=spec.want_logprobs and self.logprobs_mode == "raw_logprobs",
            return_dict_in_generate=True,
            stopping_criteria=StoppingCriteriaList([_Abort()]),
            use_cache=True,
        )
        sampler = None
        if not spec.greedy:
            if seeds is None:
                seeds = [derive_seed(spec.seed or 0, i) for i in range(len(prompts))]
            generators = [
                torch.Generator().manual_seed(derive_seed(seeds[i], j)) for i in range(len(prompts)) for j in range(spec.n)
            ]
            sampler = _RowSampler(spec, generators)
            gen_kwargs["logits_processor"] = LogitsProcessorList([sampler])
        if not stop_ids:
            # Without EOS ids HF would fall back to the model's generation_config; an impossible
            # id list is not accepted either, so disable EOS stopping explicitly.
            gen_kwargs["eos_token_id"] = None
        out = self.model.generate(**gen_kwargs)
        seqs = out.sequences[:, prompt_width:]
        step_lp = None  # (B*n, T): log-prob of each generated token
        if spec.want_logprobs:
            if self.logprobs_mode == "raw_logprobs" and out.logits:
                raw = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.logits], dim=1)
                step_lp = raw.gather(-1, seqs[:, : raw.shape[1], None])[..., 0]
            elif sampler is not None and sampler.step_logprobs:
                step_lp = torch.stack(sampler.step_logprobs, dim=1)
            elif out.scores:
                processed = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)
                step_lp = processed.gather(-1, seqs[:, : processed.shape[1], None])[..., 0]
        results: list[list[dict]] = []
        aborted = self.abort_all.is_set()
        for i in range(len(prompts)):
            samples = []
            for j in range(spec.n):
                row = i * spec.n + j
                toks = seqs[row].tolist()
                finish = "length"
                cut = len(toks)
                for pos, t in enumerate(toks):
                    if t in stop_ids:
                        cut, finish = pos + 1, "stop"
                        break
                if finish == "length" and cut < max_tokens:
                    finish = "abort" if aborted else "length"
                toks = toks[:cut]
                lps = None
                if step_lp is not None:
                    lps = step_lp[row, : len(toks)].tolist()
                samples.append({"token_ids": toks, "log_probs": lps, "finish_reason": finish})
            results.append(samples)
        return results

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        state = self.model.state_dict()
        unexpected, loaded = [], 0
        for name, tensor in named_tensors:
            target = state.get(name)
            if target is None:
                unexpected.append(name)
                continue
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name}: shape {tuple(tensor.shape)} != model's {tuple(target.shape)}")
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            loaded += 1
        if unexpected:
            raise ValueError(f"hf rollout: received weights the model does not have: {unexpected[:8]}")
        if loaded == 0:
            raise ValueError("hf rollout: weight update carried no tensors")
        return {"loaded": loaded}


# ----------------------------------------------------------------------------------------------
# The server (Ray actor)
# ----------------------------------------------------------------------------------------------
def _resolve_model_config(model_config: Any):
    """HFModelConfig from whatever verl hands a replica (DictConfig with _target_, dataclass, path)."""
    from omegaconf import DictConfig

    from verl.utils.config import omega_conf_to_dataclass

    if isinstance(model_config, (str, os.PathLike)):
        from verl.workers.config import HFModelConfig

        return HFModelConfig(path=str(model_config))
    if isinstance(model_config, DictConfig) or isinstance(model_config, dict):
        from omegaconf import OmegaConf

        cfg = model_config if isinstance(model_config, DictConfig) else OmegaConf.create(model_config)
        if "_target_" not in cfg:
            from verl.workers.config import HFModelConfig

            return omega_conf_to_dataclass(cfg, dataclass_type=HFModelConfig)
        return omega_conf_to_dataclass(cfg)
    return model_config


class HFRolloutServer:
    """Token-in/token-out rollout server around :class:`HFGenerator` (one per replica)."""

    def __init__(
        self,
        config: Any,
        model_config: Any,
        replica_rank: int = 0,
        *,
        batch_window_s: float = 0.005,
    ):
        from verl.utils.config import omega_conf_to_dataclass

        from tip_verl.verl_adapter.cpu import checks

        self.config = omega_conf_to_dataclass(config)
        self.model_config = _resolve_model_config(model_config)
        self.replica_rank = replica_rank
        local_path = getattr(self.model_config, "local_path", None) or self.model_config.path
        checks.check_model_dir(local_path, role="rollout model")
        checks.check_tokenizer(local_path, role="rollout model")
        override = dict(getattr(self.model_config, "override_config", {}) or {})
        dtype_name = str(getattr(self.config, "dtype", "float32") or "float32")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
            dtype_name, getattr(torch, dtype_name, torch.float32)
        )
        self.generator = HFGenerator(
            local_path,
            dtype=dtype,
            attn_implementation=override.get("attn_implementation", "sdpa"),
            logprobs_mode=getattr(self.config, "logprobs_mode", "processed_logprobs") or "processed_logprobs",
            trust_remote_code=bool(getattr(self.model_config, "trust_remote_code", False)),
        )
        # actor_rollout_ref.rollout.seed, as vLLM takes it for its engine. Requests without their own seed
        # (verl's agent loop sends none) get one derived from it, the prompt and the prompt's occurrence.
        seed = getattr(self.config, "seed", None)
        self.seed = 0 if seed is None else int(seed)
        self._prompt_occurrences: dict[tuple[int, ...], int] = {}
        prompt_length = int(getattr(self.config, "prompt_length", 512) or 512)
        self.response_length = int(getattr(self.config, "response_length", 512) or 512)
        self.prompt_length = prompt_length
        max_model_len = getattr(self.config, "max_model_len", None)
        self.max_model_len = int(max_model_len) if max_model_len else prompt_length + self.response_length
        self.max_num_seqs = int(getattr(self.config, "max_num_seqs", 256) or 256)
        self.batch_window_s = batch_window_s
        self.global_steps: Optional[int] = None
        self._pending: list[_Request] = []
        self._running: list[_Request] = []
        self._work = asyncio.Event()
        self._lock = asyncio.Lock()  # model use: one generation batch or one weight update at a time
        self._admission = asyncio.Event()
        self._admission.set()
        self._reject_when_paused = False
        self._scheduler: Optional[asyncio.Task] = None
        self.stats = {"batches": 0, "requests": 0, "max_batch": 0, "weight_updates": 0}

    # ------------------------------------------------------------------ plumbing
    def _ensure_scheduler(self) -> None:
        if self._scheduler is None or self._scheduler.done():
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule_loop())

    def get_server_address(self) -> str:
        return f"hf-rollout-{self.replica_rank}-{os.getpid()}"

    def get_stats(self) -> dict:
        return dict(self.stats, global_steps=self.global_steps, pending=len(self._pending))

    # ------------------------------------------------------------------ generation API
    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Optional[list[Any]] = None,
        video_data: Optional[list[Any]] = None,
        audio_data: Optional[list[Any]] = None,
        mm_processor_kwargs: Optional[dict[str, Any]] = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> TokenOutput:
        if image_data or video_data or audio_data:
            raise NotImplementedError("the hf rollout serves text-only models")
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("empty prompt")
        max_possible = self.max_model_len - len(prompt_ids)
        default_max = min(self.response_length, self.prompt_length + self.response_length - len(prompt_ids))
        spec, max_tokens, prompt_logprobs = parse_sampling_params(
            dict(sampling_params or {}), default_max_tokens=default_max, max_possible_tokens=max_possible
        )
        if not self._admission.is_set():
            if self._reject_when_paused:
                return self._aborted_output()
            await self._admission.wait()
        future = asyncio.get_running_loop().create_future()
        self._pending.append(
            _Request(str(request_id), prompt_ids, spec, max_tokens, prompt_logprobs, future, self._sample_seed(prompt_ids, spec))
        )
        self._work.set()
        self._ensure_scheduler()
        return await future

    def _sample_seed(self, prompt_ids: list[int], spec: SamplingSpec) -> int:
        """The request's own seed, else one from the server seed, the prompt and its occurrence count
        (the k-th request for a prompt gets the same samples whatever arrived before it)."""
        if spec.seed is not None:
            return spec.seed
        key = tuple(prompt_ids)
        occurrence = self._prompt_occurrences.get(key, 0)
        self._prompt_occurrences[key] = occurrence + 1
        return derive_seed(self.seed, key, occurrence)

    def _aborted_output(self, tokens: Optional[list[int]] = None) -> TokenOutput:
        return TokenOutput(
            token_ids=tokens or [],
            log_probs=None,
            stop_reason="aborted",
            extra_fields={"global_steps": self.global_steps},
        )

    async def _schedule_loop(self) -> None:
        while True:
            await self._work.wait()
            if self.batch_window_s > 0:
                await asyncio.sleep(self.batch_window_s)  # let concurrent requests arrive together
            async with self._lock:
                batch, self._pending = self._pending[: self.max_num_seqs], self._pending[self.max_num_seqs :]
                if not self._pending:
                    self._work.clear()
                if not batch:
                    continue
                self._running = batch
                try:
                    await self._run_batch(batch)
                except Exception as e:  # noqa: BLE001 - never leave a caller waiting forever
                    logger.exception("hf rollout: batch failed")
                    for r in batch:
                        if not r.future.done():
                            r.future.set_exception(e)
                finally:
                    self._running = []

    async def _run_batch(self, batch: list[_Request]) -> None:
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
        groups: dict[SamplingSpec, list[_Request]] = {}
        for req in batch:  # per-request generators: requests that differ only in their seed share a batch
            groups.setdefault(dataclasses.replace(req.spec, seed=None), []).append(req)
        for spec, reqs in groups.items():
            live = [r for r in reqs if not r.future.done()]
            if not live:
                continue
            try:
                prompt_lp = {}
                by_k: dict[int, list[_Request]] = {}
                for r in live:
                    if r.prompt_logprobs is not None:
                        by_k.setdefault(r.prompt_logprobs, []).append(r)
                for k, rs in by_k.items():
                    res = await asyncio.to_thread(self.generator.prompt_logprobs, [r.prompt_ids for r in rs], k)
                    prompt_lp.update({id(r): v for r, v in zip(rs, res)})
                max_tokens = max(r.max_tokens for r in live)
                results = await asyncio.to_thread(
                    self.generator.generate, [r.prompt_ids for r in live], spec, max_tokens, [r.sample_seed for r in live]
                )
            except Exception as e:  # noqa: BLE001 - delivered to the callers
                for r in live:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            for r, samples in zip(live, results):
                if r.future.done():
                    continue
                samples = [self._truncate(s, r.max_tokens) for s in samples]
                first = samples[0]
                stop_reason = "aborted" if first["finish_reason"] == "abort" else "completed"
                extra: dict[str, Any] = {"global_steps": self.global_steps, "finish_reason": first["finish_reason"]}
                if spec.n > 1:
                    extra["samples"] = samples
                if id(r) in prompt_lp:
                    extra["prompt_ids"], extra["prompt_logprobs"] = prompt_lp[id(r)]
                r.future.set_result(
                    TokenOutput(
                        token_ids=first["token_ids"],
                        log_probs=first["log_probs"] if spec.want_logprobs else None,
                        stop_reason=stop_reason,
                        num_preempted=0,
                        extra_fields=extra,
                    )
                )

    @staticmethod
    def _truncate(sample: dict, max_tokens: int) -> dict:
        if len(sample["token_ids"]) <= max_tokens:
            return sample
        lps = sample["log_probs"]
        return {
            "token_ids": sample["token_ids"][:max_tokens],
            "log_probs": None if lps is None else lps[:max_tokens],
            "finish_reason": "length",
        }

    # ------------------------------------------------------------------ weights
    async def update_weights(self, named_tensors: Any, global_steps: Optional[int] = None) -> dict:
        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        async with self._lock:  # never in the middle of a generation batch
            info = await asyncio.to_thread(self.generator.load_weights, list(items))
            if global_steps is not None:
                self.global_steps = global_steps
            self.stats["weight_updates"] += 1
        return info

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    # ------------------------------------------------------------------ control plane
    async def wake_up(self, tags: Optional[list[str]] = None) -> None:
        return None  # weights stay resident in host memory

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None  # HF generate keeps no cache between calls

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def wait_for_requests_to_drain(self) -> None:
        while self._pending or self._running:
            await asyncio.sleep(0.01)

    async def abort_all_requests(self, reject_request: bool = False, **kwargs) -> dict[str, Any]:
        """Stop admitting requests, fail queued ones and stop running ones at the next token."""
        self._admission.clear()
        self._reject_when_paused = reject_request
        aborted = [r for r in self._pending if not r.future.done()]
        self._pending = []
        for r in aborted:
            r.future.set_result(self._aborted_output())
        ids = [r.request_id for r in aborted] + [r.request_id for r in self._running]
        if self._running:
            self.generator.abort_all.set()
        await self.wait_for_requests_to_drain()
        self.generator.abort_all.clear()
        return {"aborted_count": len(ids), "request_ids": ids}

    async def abort_request(self, request_id: str, **kwargs) -> dict[str, Any]:
        """Abort one queued request (a request already inside a running batch completes normally)."""
        for r in list(self._pending):
            if r.request_id == request_id and not r.future.done():
                self._pending.remove(r)
                r.future.set_result(self._aborted_output())
                return {"aborted": True, "request_id": request_id}
        running = any(r.request_id == request_id for r in self._running)
        return {"aborted": False, "request_id": request_id, "error": "running" if running else "not found"}

    async def resume_generation(self) -> None:
        self._reject_when_paused = False
        self._admission.set()

    async def start_profile(self, **kwargs) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


# ----------------------------------------------------------------------------------------------
# verl integration: replica + in-worker adapter
# ----------------------------------------------------------------------------------------------
class HFRolloutReplica(RolloutReplica):
    """One :class:`HFRolloutServer` per replica; registered as rollout ``hf``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.tensor_model_parallel_size * self.config.pipeline_model_parallel_size != 1:
            raise ValueError(
                "the hf rollout runs one model per process: set rollout tensor_model_parallel_size=1 and "
                "pipeline_model_parallel_size=1 (tip_verl.verl_adapter.cpu_overrides does for the policy and "
                "distillation.teacher_models.<key>.inference)"
            )
        self.server_class = ray.remote(HFRolloutServer)

    async def launch_servers(self):
        node_id = None
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
        name = server_actor_name(
            self.replica_rank, is_teacher=self.is_teacher_model, is_reward=self.is_reward_model, suffix=self.name_suffix
        )
        options: dict[str, Any] = {"name": name, "max_concurrency": self.max_concurrency, "num_cpus": 0}
        if node_id is not None:
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False
            )
        server = self.server_class.options(**options).remote(
            config=self.config, model_config=self.model_config, replica_rank=self.replica_rank
        )
        address = await server.get_server_address.remote()  # waits for the model to load
        self.servers = [server]
        self._server_handle = server
        self._server_address = address


class HFServerAdapter(BaseRollout):
    """Lives in the actor worker (hybrid engine): forwards weight syncs to the replica's server."""

    def __init__(self, config, model_config, device_mesh, *args, replica_rank: int = -1, **kwargs):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        rollout_world_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // rollout_world_size if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % rollout_world_size
        self.is_leader_rank = self.rollout_rank == 0
        self._server = None

    def _server_handle(self):
        if not self.is_leader_rank:
            return None
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        server = self._server_handle()
        if server is not None:
            await server.wake_up.remote(tags=tags)

    async def release(self):
        server = self._server_handle()
        if server is not None:
            await server.sleep.remote()

    @torch.no_grad()
    async def update_weights(self, weights, wire_format: str = "named_tensors", global_steps: int = None, **kwargs):
        if wire_format != "named_tensors":
            raise NotImplementedError(f"hf rollout accepts wire_format='named_tensors' only, got {wire_format!r}")
        from verl.workers.rollout.utils import ensure_async_iterator

        server = self._server_handle()
        state: dict[str, torch.Tensor] = {}
        # Every rank must walk the generator: DTensor.full_tensor() inside it is a collective.
        async for name, tensor in ensure_async_iterator(weights):
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            if server is not None:
                state[name] = tensor.detach().to("cpu").clone()
        if server is not None:
            await server.update_weights.remote(state, global_steps=global_steps)

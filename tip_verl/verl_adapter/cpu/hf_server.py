"""The ``hf`` rollout server (a Ray actor): verl's token-in/token-out server protocol on :class:`HFGenerator`.

Concurrency: requests are queued and a single scheduler task batches them (up to ``max_num_seqs``):
it waits until requests stop arriving (none new for ``batch_quiet_s``, at most ``batch_window_s`` in
all), because verl's agent loop sends one request per sample over a second or so and one batch of
128 is several times cheaper than eight small ones; samples do not depend on the batching (each
request draws from its own generator). It groups the batch by sampling parameters and runs one
left-padded ``generate`` per group in a worker thread. Weight updates and generation take the same
lock, so a weight update never lands in the middle of a batch. ``abort_all_requests`` stops in-flight generation at the next token
(a stopping criterion) and returns the partial tokens with ``stop_reason="aborted"``; queued requests
are answered ``aborted`` with no tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, Optional

import torch

from verl.workers.rollout.replica import TokenOutput

from .hf_generator import HFGenerator
from .hf_sampling import SamplingSpec, derive_seed, parse_sampling_params

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

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
        batch_quiet_s: float = 0.05,
        batch_window_s: float = 1.0,
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
        if not 0 <= batch_quiet_s <= batch_window_s:
            raise ValueError(f"need 0 <= batch_quiet_s ({batch_quiet_s}) <= batch_window_s ({batch_window_s})")
        self.batch_quiet_s = batch_quiet_s
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
            await self._until_arrivals_settle()
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

    async def _until_arrivals_settle(self) -> None:
        """Return once no request arrived for ``batch_quiet_s``, the batch is full or ``batch_window_s`` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_window_s
        while self.batch_quiet_s > 0 and len(self._pending) < self.max_num_seqs:
            seen = len(self._pending)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(self.batch_quiet_s, remaining))
            if len(self._pending) == seen:
                return

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
    async def update_weights(self, named_tensors: Any, global_steps: Optional[int] = None,
                             peft_config: Optional[dict] = None, base_sync_done: bool = True) -> dict:
        """Load weights; a LoRA student's base weights or adapters with ``peft_config`` (:meth:`HFGenerator.load_weights`)."""
        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        async with self._lock:  # never in the middle of a generation batch
            info = await asyncio.to_thread(self.generator.load_weights, list(items), peft_config=peft_config,
                                           adapters=peft_config is not None and base_sync_done)
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

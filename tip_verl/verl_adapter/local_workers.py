"""verl's ``ActorRolloutRefWorker`` in one process on the CPU, without Ray (fast tests).

verl's workers only need ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` and a process
group; this module sets those for a world of one (free port), selects the CPU platform, composes
verl's own ``ppo_trainer`` Hydra config with the shared CPU overrides
(:mod:`tip_verl.verl_adapter.cpu_overrides`) and builds the actor and (optionally) the reference
worker exactly as verl's trainer does (``init_model``). Calls go straight to the worker methods the
trainer dispatches to (``compute_log_prob``, ``compute_ref_log_prob``, ``update_actor``) with the
meta-data the V1 trainer attaches (``verl/trainer/ppo/v1/trainer_base.py`` ``_compute_old_log_prob``,
``_compute_ref_log_prob``, ``_update_actor``).

Example::

    from tip_verl.verl_adapter.local_workers import build_local_workers

    w = build_local_workers(student_path, ref_model_path=teacher_path)   # ref = a different checkpoint
    batch = w.make_batch(["What is 1 + 2?", "What is 3 + 4?"], max_new_tokens=8)
    out = w.log_probs(batch, entropy=True)          # {"log_probs": [B, R], "entropy": [B, R]}
    ref = w.ref_log_probs(batch)                    # [B, R]
    metrics = w.update(batch, advantages=torch.ones(len(batch)))
    w.close()

Batches are padded ``TensorDict`` s in verl's rollout layout (``prompts`` [B, P] left-padded,
``responses`` / ``response_mask`` / ``rollout_log_probs`` [B, R] right-padded, ``input_ids`` /
``attention_mask`` / ``position_ids`` [B, P + R]); they are converted with verl's
``left_right_2_no_padding`` for every call, and results come back as ``[B, R]`` via :func:`padded`.

The pieces are the project's one single-process harness, also used by the tests' tiny models
(``tests/unit/_tiny_models.py``) and the benchmarks (``scripts/bench_memory.py``): :func:`free_port`,
:func:`world_of_one_env` / :func:`ensure_world_of_one`, :func:`compose_ppo_config` (verl's own Hydra config),
:func:`update_meta` (the meta-data of an ``update_actor`` batch) and, for the engines,
:func:`tip_verl.verl_adapter.cpu_overrides.fsdp2_engine_overrides`.

Several ranks (data parallelism without Ray): :func:`run_ranks` runs a function in ``N`` spawned processes
that form one gloo world; :func:`build_local_workers` in each builds that rank's workers (FSDP2 shards the
model over the ranks), :func:`rank_share` gives it its rows of a batch as verl's dispatch would, and
:func:`all_gather_rows` puts the ranks' outputs back together (``tests/e2e/test_data_parallel.py``).
"""

from __future__ import annotations

import gc
import math
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from tip_verl.verl_adapter.cpu_overrides import cpu_env, cpu_overrides

PromptLike = Union[str, Sequence[dict], Sequence[int]]

# Defaults of the single-process path (later overrides win, so callers can change any of them).
_LOCAL_DEFAULTS = (
    "actor_rollout_ref.model.enable_gradient_checkpointing=False",
    "actor_rollout_ref.rollout.n=1",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.actor.optim.lr=1e-3",
    "data.max_prompt_length=64",
    "data.max_response_length=16",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_cpu_platform() -> None:
    """Select verl's CPU platform in this process (env + registration) and check it took effect."""
    for key, value in cpu_env().items():
        os.environ.setdefault(key, value)
    if os.environ["VERL_PLATFORM"].strip().lower() != "cpu":
        raise RuntimeError(f"VERL_PLATFORM={os.environ['VERL_PLATFORM']!r} is set; the local CPU workers need 'cpu'")
    import verl  # noqa: F401  - runs the verl.plugins entry point

    from tip_verl.verl_adapter import cpu

    cpu.register(strict=True)  # no-op if the entry point already did it
    from verl.plugin.platform import get_platform

    platform = get_platform()
    if platform.device_name != "cpu":
        raise RuntimeError(
            f"verl's platform was already resolved to {type(platform).__name__} in this process; set "
            "VERL_PLATFORM=cpu before verl is first used (e.g. in the environment of the test run)."
        )


def world_env(rank: int, world_size: int, port: Optional[int] = None) -> dict[str, str]:
    """The environment of rank ``rank`` of a ``world_size``-rank ``torch.distributed`` job on this host."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port or free_port()),
    }


def world_of_one_env(port: Optional[int] = None) -> dict[str, str]:
    """The environment of a one-rank ``torch.distributed`` job on this host (a free port by default)."""
    return world_env(0, 1, port)


def ensure_world_of_one() -> None:
    """Make this process a world of one (values already set win; a free port only if none is set)."""
    for key, value in world_of_one_env(port=int(os.environ.get("MASTER_PORT", 0)) or None).items():
        os.environ.setdefault(key, value)


def compose_ppo_config(overrides: Sequence[str]):
    """verl's own ``ppo_trainer`` Hydra config with ``overrides`` (later ones win)."""
    import verl
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def compose_config(model_path: str, overrides: Sequence[str] = ()):
    """verl's ``ppo_trainer`` config with the CPU overrides, local defaults, model path and ``overrides``."""
    return compose_ppo_config([*cpu_overrides(), *_LOCAL_DEFAULTS, f"actor_rollout_ref.model.path={model_path}",
                               *overrides])


def update_meta(batch_size: int, *, seed: int, temperature: float = 1.0, calculate_entropy: bool = False,
                mini_batch_size: Optional[int] = None, epochs: int = 1, **extra: Any) -> dict[str, Any]:
    """The non-tensor meta-data verl's V1 trainer attaches to an ``update_actor`` batch (``_update_actor``).

    One (mini-)batch of ``mini_batch_size`` (default: the whole batch), no shuffling, no distillation;
    ``extra`` adds or replaces entries (``micro_batch_size_per_gpu``, ``compute_loss``, ...).
    """
    mbs = batch_size if mini_batch_size is None else mini_batch_size
    meta = dict(temperature=temperature, calculate_entropy=calculate_entropy, distillation_use_topk=False,
                distillation_only=False, global_batch_size=mbs, mini_batch_size=mbs, epochs=epochs, seed=seed,
                dataloader_kwargs={"shuffle": False})
    meta.update(extra)
    return meta


def padded(tensor: torch.Tensor, batch_nopad) -> torch.Tensor:
    """``[B, R]`` (or ``[B, R, *]``) response slice of a per-token model output (nested or packed)."""
    from verl.workers.utils.padding import no_padding_2_padding

    return no_padding_2_padding(tensor, batch_nopad)


def to_no_padding(batch, **meta):
    """verl's no-padding ``TensorDict`` of a padded batch, with ``meta`` attached as non-tensor data."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    td = left_right_2_no_padding(batch.clone())
    if meta:
        tu.assign_non_tensor(td, **meta)
    return td


def response_nested(batch, tensor: torch.Tensor) -> torch.Tensor:
    """A padded response-aligned ``[B, R, *]`` tensor as nested ``(B, R_i, *)`` (R_i = response lengths)."""
    prompt_width = batch["prompts"].shape[1]
    lengths = batch["attention_mask"][:, prompt_width:].sum(1).tolist()
    return torch.nested.as_nested_tensor([tensor[i, :n] for i, n in enumerate(lengths)], layout=torch.jagged)


def response_padded(nested: torch.Tensor, batch) -> torch.Tensor:
    """A nested ``(B, R_i, *)`` worker output as ``[B, R, *]`` (R = the batch's response width), zero-padded."""
    B, R = batch["responses"].shape
    return torch.nested.to_padded_tensor(nested, 0, output_size=(B, R, *nested.shape[2:]))


@dataclass
class LocalWorkers:
    """An actor worker and an optional reference worker of verl, built in this process."""

    config: Any  # full ppo_trainer DictConfig
    actor: Any  # verl.workers.engine_workers.ActorRolloutRefWorker(role="actor")
    ref: Optional[Any]  # ActorRolloutRefWorker(role="ref"), possibly on another checkpoint
    model_path: str
    ref_model_path: Optional[str]
    tokenizer: Any
    _generator: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------ config helpers
    @property
    def arr(self):
        return self.config.actor_rollout_ref

    @property
    def temperature(self) -> float:
        return float(self.arr.rollout.temperature)

    @property
    def loss_config(self):
        """The ``ActorConfig`` the actor's loss function is bound to (for custom losses)."""
        return self.actor.loss_fn.keywords["config"]

    def set_loss_fn(self, loss_fn: Callable) -> None:
        """Replace the actor's loss (signature of verl's ``ppo_loss(config, model_output, data, dp_group)``
        with ``config`` already bound, e.g. ``functools.partial(my_loss, config=w.loss_config)``)."""
        self.actor.loss_fn = loss_fn
        self.actor.set_loss_fn(loss_fn)

    # ------------------------------------------------------------------ batches
    def generator(self):
        """An :class:`~tip_verl.verl_adapter.cpu.hf_generator.HFGenerator` on the actor's checkpoint."""
        if self._generator is None:
            from tip_verl.verl_adapter.cpu.hf_generator import HFGenerator

            self._generator = HFGenerator(self.model_path, dtype=torch.float32)
        return self._generator

    def sync_generator(self) -> None:
        """Copy the actor's current (trained) weights into the generator, as a weight sync does."""
        params, _ = self.actor.actor.engine.get_per_tensor_param()
        self.generator().load_weights((n, t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in params)

    def encode_prompt(self, prompt: PromptLike) -> list[int]:
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if len(prompt) and isinstance(prompt[0], dict):
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        return [int(t) for t in prompt]

    def make_batch(
        self,
        prompts: Sequence[PromptLike],
        *,
        responses: Optional[Sequence[Sequence[int]]] = None,
        max_new_tokens: int = 8,
        temperature: Optional[float] = None,
        top_p: float = 1.0,
        top_k: int = -1,
        seed: Optional[int] = 0,
        sync_weights: bool = False,
    ):
        """A padded batch in verl's rollout layout from real prompts and HF-generated responses.

        ``prompts``: strings (one user turn, rendered with the chat template), message lists, or token
        id lists. ``responses``: token id lists to use instead of generating. ``sync_weights``: generate
        with the actor's current weights instead of the checkpoint's.
        """
        from tensordict import TensorDict

        from tip_verl.verl_adapter.cpu.hf_sampling import parse_sampling_params

        prompt_ids = [self.encode_prompt(p) for p in prompts]
        gen = self.generator()
        if sync_weights:
            self.sync_generator()
        rollout_lps: list[Optional[list[float]]] = [None] * len(prompt_ids)
        if responses is None:
            params = {"temperature": self.temperature if temperature is None else temperature, "top_p": top_p,
                      "top_k": top_k, "logprobs": True, "max_tokens": max_new_tokens, "seed": seed}
            spec, max_tokens, _ = parse_sampling_params(params, default_max_tokens=max_new_tokens,
                                                        max_possible_tokens=max_new_tokens)
            out = gen.generate(prompt_ids, spec, max_tokens)
            responses = [o[0]["token_ids"] for o in out]
            rollout_lps = [o[0]["log_probs"] for o in out]
        pad = gen.pad_token_id
        B = len(prompt_ids)
        P = max(len(p) for p in prompt_ids)
        R = max(max_new_tokens, max(len(r) for r in responses))
        prompts_t = torch.full((B, P), pad, dtype=torch.long)
        prompt_mask = torch.zeros((B, P), dtype=torch.long)
        resp_t = torch.full((B, R), pad, dtype=torch.long)
        resp_mask = torch.zeros((B, R), dtype=torch.long)
        resp_lp = torch.zeros((B, R), dtype=torch.float32)
        for i, (p, r) in enumerate(zip(prompt_ids, responses)):
            if not r:
                raise ValueError(f"sample {i} has an empty response")
            prompts_t[i, P - len(p) :] = torch.tensor(p)
            prompt_mask[i, P - len(p) :] = 1
            resp_t[i, : len(r)] = torch.tensor(list(r))
            resp_mask[i, : len(r)] = 1
            if rollout_lps[i] is not None:
                resp_lp[i, : len(r)] = torch.tensor(rollout_lps[i])
        attention_mask = torch.cat([prompt_mask, resp_mask], dim=1)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        return TensorDict(
            {
                "prompts": prompts_t,
                "responses": resp_t,
                "response_mask": resp_mask,
                "input_ids": torch.cat([prompts_t, resp_t], dim=1),
                "attention_mask": attention_mask,
                "position_ids": position_ids,
                "rollout_log_probs": resp_lp,
            },
            batch_size=[B],
        )

    # ------------------------------------------------------------------ verl calls
    @staticmethod
    def _micro(batch_size: int, configured: Optional[int]) -> int:
        """verl asserts batch % micro == 0; use the largest divisor of the batch not above the config."""
        configured = int(configured or batch_size)
        return math.gcd(batch_size, configured) if batch_size % configured else configured

    def log_probs(self, batch, entropy: bool = False, temperature: Optional[float] = None,
                  gather_topk_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Actor ``compute_log_prob`` (the trainer's old-log-prob step) -> ``{"log_probs", ["entropy"]}`` [B, R].

        ``gather_topk_ids`` ([B, R, k], the teacher's top-k ids) also returns the student's log-probs at
        them as ``"topk_log_probs"`` [B, R, k], as the tip_sync trainer's pass with the top-k signal does.
        """
        from verl.utils import tensordict_utils as tu

        from tip_verl.verl_adapter import topk_signal

        t = self.temperature if temperature is None else temperature
        micro = self._micro(len(batch), self.arr.rollout.log_prob_micro_batch_size_per_gpu)
        meta = dict(calculate_entropy=entropy, compute_loss=False, temperature=t, micro_batch_size_per_gpu=micro)
        if gather_topk_ids is not None:
            meta[topk_signal.FLAG_GATHER_IDS] = topk_signal.TEACHER_TOPK_IDS
        td = to_no_padding(batch, **meta)
        if gather_topk_ids is not None:
            td[topk_signal.TEACHER_TOPK_IDS] = response_nested(batch, gather_topk_ids)
        out = self.actor.compute_log_prob(td)
        ref_td = to_no_padding(batch)
        res = {"log_probs": padded(tu.get(out, "log_probs"), ref_td).float() * batch["response_mask"]}
        if entropy:
            res["entropy"] = padded(tu.get(out, "entropy"), ref_td).float() * batch["response_mask"]
        if gather_topk_ids is not None:
            res["topk_log_probs"] = response_padded(tu.get(out, topk_signal.STUDENT_TOPK_LOGPROBS), batch)
        return res

    def ref_log_probs(self, batch, temperature: Optional[float] = None, topk: int = 0):
        """Reference worker ``compute_ref_log_prob`` -> [B, R] sampled-token log-probs.

        ``topk > 0`` returns ``(log_probs, topk_log_probs, topk_ids)``, the last two [B, R, k]: the
        teacher's top-k as the tip_sync trainer requests it with ``+tip.teacher_signal=topk``.
        """
        from verl.utils import tensordict_utils as tu

        from tip_verl.verl_adapter import topk_signal

        if self.ref is None:
            raise RuntimeError("built without a reference worker (with_ref=False)")
        t = self.temperature if temperature is None else temperature
        micro = self._micro(len(batch), self.arr.ref.log_prob_micro_batch_size_per_gpu)
        meta = dict(calculate_entropy=False, compute_loss=False, temperature=t, micro_batch_size_per_gpu=micro)
        if topk:
            meta[topk_signal.FLAG_TEACHER_TOPK] = int(topk)
        out = self.ref.compute_ref_log_prob(to_no_padding(batch, **meta))
        log_probs = padded(tu.get(out, "log_probs"), to_no_padding(batch)).float() * batch["response_mask"]
        if not topk:
            return log_probs
        return (log_probs, response_padded(tu.get(out, topk_signal.TEACHER_TOPK_LOGPROBS), batch),
                response_padded(tu.get(out, topk_signal.TEACHER_TOPK_IDS), batch))

    def update(
        self,
        batch,
        advantages: torch.Tensor,
        *,
        old_log_probs: Optional[torch.Tensor] = None,
        ref_log_probs: Optional[torch.Tensor] = None,
        mini_batch_size: Optional[int] = None,
        epochs: int = 1,
        extra_fields: Optional[dict[str, torch.Tensor]] = None,
        teacher_topk: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        **meta: Any,
    ) -> dict[str, Any]:
        """One ``update_actor`` call on ``batch`` (the trainer's actor step); returns verl's metrics.

        ``advantages``: [B, R] or [B] (broadcast over the response). ``old_log_probs`` default to the
        actor's current log-probs (on-policy); ``ref_log_probs`` default to the reference worker's when
        the actor config uses a KL loss. ``extra_fields`` are added to the batch (e.g. masks a custom loss
        reads); ``teacher_topk`` ([B, R, k] log-probs, ids) are the teacher's top-k as the update step of
        ``+tip.loss=topk_reverse_kl`` receives them; ``meta`` overrides the trainer's non-tensor meta-data.
        """
        from tip_verl.verl_adapter import topk_signal

        from verl.utils import tensordict_utils as tu

        arr = self.arr
        B, R = batch["responses"].shape
        mask = batch["response_mask"].float()
        advantages = advantages.float()
        if advantages.dim() == 1:
            advantages = advantages[:, None].expand(B, R)
        data = batch.clone()
        data["advantages"] = advantages * mask
        data["old_log_probs"] = (self.log_probs(batch)["log_probs"] if old_log_probs is None else old_log_probs).float()
        if ref_log_probs is None and arr.actor.use_kl_loss:
            ref_log_probs = self.ref_log_probs(batch)
        if ref_log_probs is not None:
            data["ref_log_prob"] = ref_log_probs.float()
        for key, value in (extra_fields or {}).items():
            data[key] = value
        mbs = B if mini_batch_size is None else mini_batch_size
        info = update_meta(
            B, seed=int(arr.actor.data_loader_seed), temperature=self.temperature, mini_batch_size=mbs,
            epochs=epochs, calculate_entropy=bool(arr.actor.calculate_entropy or arr.actor.entropy_coeff != 0.0),
            micro_batch_size_per_gpu=self._micro(mbs, arr.actor.ppo_micro_batch_size_per_gpu),
        )
        info.update(meta)
        td = to_no_padding(data, **info)
        if teacher_topk is not None:
            td[topk_signal.TEACHER_TOPK_LOGPROBS] = response_nested(batch, teacher_topk[0])
            td[topk_signal.TEACHER_TOPK_IDS] = response_nested(batch, teacher_topk[1])
        out = self.actor.update_actor(td)
        return dict(tu.get(out, "metrics"))

    def close(self) -> None:
        """Drop the workers (the process group stays for other workers in this process)."""
        self.actor = None
        self.ref = None
        self._generator = None
        gc.collect()


def build_local_workers(
    model_path: Optional[str] = None,
    *,
    ref_model_path: Optional[str] = None,
    overrides: Sequence[str] = (),
    with_ref: bool = True,
    check: bool = True,
    tip_loss: str = "pg",
) -> LocalWorkers:
    """Build verl's actor (and reference) ``ActorRolloutRefWorker`` on the CPU in this process.

    Args:
        model_path: the actor's Hugging Face checkpoint (default: the tiny student from
            ``tip_verl.assets.build_assets()``).
        ref_model_path: checkpoint of the reference worker (default: the actor's). A path builds both
            workers as :class:`~tip_verl.verl_adapter.teacher.TIPActorRolloutRefWorker` (what ``tip_sync``
            uses): the reference model is that teacher, and the actor's update runs the sparse lm_head.
        overrides: extra Hydra overrides for verl's ``ppo_trainer`` config (e.g. a custom policy loss,
            ``actor_rollout_ref.actor.use_kl_loss=True``); they win over the CPU and local defaults.
        with_ref: also build the reference worker.
        check: run the CPU start-up checks (model directories, tokenizer) first.
        tip_loss: with a ``ref_model_path``, the tip actor's loss (``pg`` = verl's ppo_loss, or
            ``topk_reverse_kl``), as ``+tip.loss`` sets it in tip_sync.
    """
    ensure_cpu_platform()
    ensure_world_of_one()
    if model_path is None:
        from tip_verl.assets import build_assets

        model_path = str(build_assets(quiet=True).student)
    model_path = str(model_path)
    ref_model_path = None if ref_model_path is None else str(ref_model_path)
    if check:
        from tip_verl.verl_adapter.cpu.checks import run_startup_checks

        paths = {"actor model": model_path}
        if with_ref and ref_model_path:
            paths["reference model"] = ref_model_path
        run_startup_checks(paths)

    from omegaconf import open_dict
    from transformers import AutoTokenizer
    from verl.workers.engine_workers import ActorRolloutRefWorker

    config = compose_config(model_path, overrides)
    worker_cls = ActorRolloutRefWorker
    arr = config.actor_rollout_ref.copy()
    if ref_model_path is not None:
        # The workers of the tip_sync trainer: ref = the teacher checkpoint, actor = sparse lm_head update.
        from tip_verl.verl_adapter.opd_config import WORKER_NODE, TIPWorkerConfig
        from tip_verl.verl_adapter.teacher import TIPActorRolloutRefWorker

        worker_cls = TIPActorRolloutRefWorker
        with open_dict(arr):  # the node the tip_sync trainer writes from +tip.*
            arr[WORKER_NODE] = TIPWorkerConfig(teacher_path=ref_model_path, loss=tip_loss).to_node()
    actor = worker_cls(config=arr.copy(), role="actor")
    actor.init_model()
    ref = None
    if with_ref:
        ref = worker_cls(config=arr.copy(), role="ref")
        ref.init_model()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return LocalWorkers(
        config=config,
        actor=actor,
        ref=ref,
        model_path=model_path,
        ref_model_path=ref_model_path,
        tokenizer=tokenizer,
    )


# ---------------------------------------------------------------------------------------------- several ranks
def rank_share(batch, rank: int, world_size: int):
    """Rank ``rank``'s rows of ``batch``: the contiguous ``1/world_size`` verl's data-parallel dispatch sends it
    (``make_nd_compute_dataproto_dispatch_fn``: the batch cut into ``dp`` equal chunks, in order)."""
    n = len(batch)
    if n % world_size:
        raise ValueError(f"a batch of {n} cannot be split over {world_size} ranks")
    step = n // world_size
    return batch[rank * step:(rank + 1) * step]


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' ``[b, ...]`` shares concatenated in rank order (``torch.distributed`` gloo; a world of one: as is)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensor.detach().cpu())
    return torch.cat(parts, dim=0)


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    import io
    import traceback

    os.environ.update(world_env(rank, world_size, port))
    try:
        value = fn(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(value, buffer)  # tensors by value (no shared-memory handles outliving this process)
        results.put((rank, None, buffer.getvalue()))
    except BaseException:  # noqa: BLE001  (reported to the parent, which raises)
        results.put((rank, traceback.format_exc(), None))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 600.0,
              threads_per_rank: Optional[int] = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes forming one gloo world; their results.

    Each process is a rank of its own ``torch.distributed`` world (``RANK`` / ``WORLD_SIZE`` / a free
    ``MASTER_PORT``), so :func:`build_local_workers` there builds verl's workers as one rank of a data-parallel
    group, as verl's Ray workers are. ``fn`` must be importable by name (a module-level function; the processes
    are spawned, not forked) and return something ``torch.save`` can write. ``threads_per_rank`` sets
    ``OMP_NUM_THREADS`` for the ranks (default: the host's cores split between them). Raises ``RuntimeError``
    with the failing rank's traceback, or on ``timeout`` seconds.
    """
    import multiprocessing as mp
    import queue as queue_module
    import time

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",)}
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the spawned processes
    try:
        procs = [ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, args, results), daemon=True)
                 for rank in range(world_size)]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, error, payload = results.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except queue_module.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"run_ranks: {world_size - len(out)} rank(s) gave no result "
                                       f"({'exit codes ' + str(dead) if dead else f'timeout {timeout:.0f} s'})")
                continue
            if error is not None:
                raise RuntimeError(f"run_ranks: rank {rank} of {world_size} failed:\n{error}")
            import io

            out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return [out[rank] for rank in range(world_size)]

"""The data-parallel layout of a verl job: how many sequences each rank gets in each pass, and whether the
micro-batch sizes divide them. Standard library only (the start-up check and the CPU recipe both use it).

Without dynamic batching, verl 0.9.1 splits every micro-batch pass of the V1 trainer as follows
(``trainer/ppo/v1/trainer_base.py``, ``workers/engine_workers.py``, ``workers/engine/utils.py``):

* the step's batch holds ``B = data.train_batch_size x rollout.n`` sequences (``separate_async``: each of the
  step's ``parameter_sync_step`` local updates runs every pass on ``data.train_batch_size / parameter_sync_step``
  prompts, :func:`parameter_sync_step`), padded by
  ``_balance_batch`` up to a multiple of ``lcm(dp, M)`` (``M = actor.ppo_mini_batch_size x rollout.n``,
  ``dp = trainer.n_gpus_per_node x trainer.nnodes / ulysses_sequence_parallel_size``), then cut into
  ``dp`` equal shares;
* the actor's log-prob pass and the ref's (teacher's) pass cut each rank's share into micro-batches of
  ``rollout.log_prob_micro_batch_size_per_gpu`` / ``ref.log_prob_micro_batch_size_per_gpu``;
* the update cuts each mini-batch of ``M`` sequences into ``dp`` shares (``train_mini_batch`` asserts
  ``M % dp == 0``) and each share into micro-batches of ``actor.ppo_micro_batch_size_per_gpu``.

A micro-batch size that does not divide its share stops verl in ``prepare_micro_batches`` ("data size must be
divisible by force_group_size * micro_batch_size_per_gpu") -- on the workers, after Ray started and the models
loaded. :func:`layout_problems` finds those combinations from the config alone (the driver's start-up check,
:mod:`.preflight`), and :func:`derived_micro_batch_sizes` picks sizes that divide (the CPU recipe's
``N_WORKERS``, through the command line below). verl's own ``validate_config`` checks ``train_batch_size x n`` against the number of ranks
but not these shares.

Jobs this does not model are left alone (no problem reported): dynamic batch sizes (``use_dynamic_bsz``),
strategies other than FSDP / FSDP2 (Megatron, VeOmni, TorchTitan split by their own model-parallel sizes),
the deprecated global ``*_micro_batch_size`` flags, and the ref of verl's LoRA jobs (it runs inside the actor,
:func:`ref_in_actor`; a TIP job's ref is the teacher, a worker of its own, and is checked).

Command line (run as a file, so that only the standard library loads: no torch, ~30 ms)::

    python tip_verl/verl_adapter/dp_layout.py -- OVERRIDES...
    # one `flag=size` line per micro-batch flag of the job OVERRIDES describe (trainer.n_gpus_per_node
    # included), each the configured size if it divides the rank's share, else the largest divisor below it
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

ARR = "actor_rollout_ref"
TRAIN_BATCH = "data.train_batch_size"
ROLLOUT_N = f"{ARR}.rollout.n"
MINI_BATCH = f"{ARR}.actor.ppo_mini_batch_size"
N_GPUS = "trainer.n_gpus_per_node"
NNODES = "trainer.nnodes"
UPDATE_MICRO = f"{ARR}.actor.ppo_micro_batch_size_per_gpu"
LOG_PROB_MICRO = f"{ARR}.rollout.log_prob_micro_batch_size_per_gpu"
REF_MICRO = f"{ARR}.ref.log_prob_micro_batch_size_per_gpu"
#: the micro-batch flags, in the order the passes run
MICRO_FLAGS = (LOG_PROB_MICRO, REF_MICRO, UPDATE_MICRO)

_FSDP_STRATEGIES = {"fsdp", "fsdp2"}
_VERL_MESSAGE = "data size must be divisible by force_group_size * micro_batch_size_per_gpu"


class DataParallelLayoutError(ValueError):
    """Micro-batch sizes that do not divide the share of a data-parallel rank (one line, naming the flags)."""


_MISSING = object()


def config_value(config: Any, dotted: str, default: Any = None) -> Any:
    """``config.a.b.c`` of a DictConfig / dict, ``default`` when a level is missing or the value is None."""
    node = config
    for part in dotted.split("."):
        if node is None:
            return default
        try:
            node = node.get(part, _MISSING) if hasattr(node, "get") else getattr(node, part, _MISSING)
        except Exception:  # noqa: BLE001  (an unresolvable interpolation: let verl report it)
            return default
        if node is _MISSING:
            return default
    return default if node is None else node


#: verl 0.9.1's default of ``trainer.v1.separate_async.parameter_sync_step`` (``trainer/config/ppo_trainer.yaml``)
SEPARATE_ASYNC_SYNC_STEP = 4
SYNC_STEP = "trainer.v1.separate_async.parameter_sync_step"
_SEPARATE_ASYNC_MODES = ("separate_async", "tip_separate_async")


def parameter_sync_step(config: Any) -> int:
    """Local updates per global step: ``trainer.v1.separate_async.parameter_sync_step`` for ``separate_async`` and
    ``tip_separate_async`` (verl's default 4), else 1. verl's trainer samples ``data.train_batch_size /
    parameter_sync_step`` prompts per local update and runs every pass (log-probs, ref, update) on them."""
    if str(config_value(config, "trainer.v1.trainer_mode", "sync")) not in _SEPARATE_ASYNC_MODES:
        return 1
    value = _int(config_value(config, SYNC_STEP, SEPARATE_ASYNC_SYNC_STEP))
    return value if value is not None and value > 0 else SEPARATE_ASYNC_SYNC_STEP


def uses_lora(config: Any) -> bool:
    """A LoRA student, as verl 0.9.1's trainer decides it (``trainer/ppo/v1/trainer_base.py``): ``model.lora.rank``
    or ``model.lora_rank`` > 0, or a pre-trained adapter (``model.lora_adapter_path``)."""
    model = f"{ARR}.model"
    rank = _int(config_value(config, f"{model}.lora.rank", 0)) or _int(config_value(config, f"{model}.lora_rank", 0))
    return (rank or 0) > 0 or config_value(config, f"{model}.lora_adapter_path") is not None


def ref_in_actor(config: Any) -> bool:
    """Whether the ref pass runs inside the actor: verl's LoRA jobs use the actor with its adapters off as the ref;
    a TIP job with ``+tip.teacher_path`` builds its ref from the teacher instead (``TIPTrainerMixin.ref_in_actor``)."""
    return uses_lora(config) and not config_value(config, "tip.teacher_path")


def _int(value: Any) -> Optional[int]:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is ``<= cap`` (at least 1)."""
    cap = max(1, min(int(cap), int(n)))
    for d in range(cap, 0, -1):
        if n % d == 0:
            return d
    return 1


@dataclass(frozen=True)
class Share:
    """One micro-batched pass: each rank's sequences and the flag that sets its micro-batch size."""

    name: str  # "log-prob pass", "ref (teacher) pass", "update"
    flag: str  # the micro-batch flag
    per_rank: int  # sequences of one rank in one call (the whole step's share, or one mini-batch's share)
    micro: Optional[int]  # the configured micro-batch size (None: not set, not checked)
    source: str  # how per_rank comes about, in flags

    @property
    def divides(self) -> bool:
        return self.micro is None or (self.micro > 0 and self.per_rank % self.micro == 0)


@dataclass(frozen=True)
class Layout:
    """The numbers of :func:`layout`; ``problems`` are one-line messages (empty: every pass divides)."""

    ranks: int  # trainer.n_gpus_per_node x trainer.nnodes
    dp: int  # data-parallel ranks of the actor
    batch: int  # sequences per pass (train_batch_size x n; separate_async: / parameter_sync_step), before padding
    padded_batch: int  # after verl's padding to a multiple of lcm(dp, mini-batch)
    mini_batch: int  # sequences per mini-batch (ppo_mini_batch_size x n)
    shares: tuple[Share, ...]
    problems: tuple[str, ...]


def layout(config: Any, *, use_reference_policy: bool = True) -> Optional[Layout]:
    """The data-parallel layout of ``config`` (verl's ``ppo_trainer`` config), or None when it is not modelled."""
    actor = config_value(config, f"{ARR}.actor")
    if actor is None or str(config_value(actor, "strategy", "fsdp")) not in _FSDP_STRATEGIES:
        return None
    if bool(config_value(actor, "use_dynamic_bsz", False)):
        return None
    n_gpus, nnodes = _int(config_value(config, N_GPUS, 1)), _int(config_value(config, NNODES, 1))
    tbs, n, mini = _int(config_value(config, TRAIN_BATCH)), _int(config_value(config, ROLLOUT_N, 1)), _int(config_value(actor, "ppo_mini_batch_size"))
    if None in (n_gpus, nnodes, tbs, n, mini) or min(n_gpus, nnodes, tbs, n, mini) <= 0:
        return None
    ranks = n_gpus * nnodes
    sp = _int(config_value(actor, "ulysses_sequence_parallel_size", 1)) or 1
    if ranks % sp:
        return None  # verl reports this one itself
    dp = ranks // sp
    sync_steps = parameter_sync_step(config)
    if tbs % sync_steps:
        return None  # verl asserts it itself (and the TIP start-up check names the flags)
    batch, mini_batch = tbs // sync_steps * n, mini * n
    multiple = math.lcm(dp, mini_batch)
    padded = -(-batch // multiple) * multiple
    ranks_text = f"{N_GPUS}={n_gpus} x {NNODES}={nnodes}" + (f" / ulysses_sequence_parallel_size={sp}" if sp > 1 else "")
    batch_text = f"{TRAIN_BATCH}={tbs} x {ROLLOUT_N}={n}"
    if sync_steps > 1:
        batch_text = f"{TRAIN_BATCH}={tbs} / {SYNC_STEP}={sync_steps} x {ROLLOUT_N}={n}"
    if padded != batch:
        batch_text += f" = {batch}, padded by verl to {padded}"
    problems: list[str] = []
    shares: list[Share] = []

    shares.append(Share("log-prob pass", LOG_PROB_MICRO, padded // dp, _int(config_value(config, LOG_PROB_MICRO)),
                        f"{batch_text} over {dp} rank(s) ({ranks_text})"))
    ref_dynamic = bool(config_value(config, f"{ARR}.ref.log_prob_use_dynamic_bsz", False))
    if use_reference_policy and not ref_in_actor(config) and not ref_dynamic:
        ref_sp = _int(config_value(config, f"{ARR}.ref.ulysses_sequence_parallel_size", sp)) or sp
        if ranks % ref_sp == 0:
            ref_dp = ranks // ref_sp
            shares.append(Share("ref (teacher) pass", REF_MICRO, padded // ref_dp, _int(config_value(config, REF_MICRO)),
                                f"{batch_text} over {ref_dp} rank(s) ({ranks_text})"))
    if mini_batch % dp:
        problems.append(
            f"{MINI_BATCH}={mini} x {ROLLOUT_N}={n} = {mini_batch} sequences per mini-batch cannot be split over "
            f"the {dp} data-parallel ranks ({ranks_text}): make it a multiple of {dp} "
            f"(verl would stop in train_mini_batch after loading the models)"
        )
    else:
        shares.append(Share("update", UPDATE_MICRO, mini_batch // dp, _int(config_value(actor, "ppo_micro_batch_size_per_gpu")),
                            f"{MINI_BATCH}={mini} x {ROLLOUT_N}={n} over {dp} rank(s) ({ranks_text})"))
    for share in shares:
        if not share.divides:
            fix = largest_divisor_at_most(share.per_rank, share.micro) if share.micro > 0 else 1
            problems.append(
                f"{share.flag}={share.micro} does not divide the {share.per_rank} sequences each rank gets in the "
                f"{share.name} ({share.source}): use a divisor of {share.per_rank}, e.g. {share.flag}={fix}"
            )
    return Layout(ranks=ranks, dp=dp, batch=batch, padded_batch=padded, mini_batch=mini_batch,
                  shares=tuple(shares), problems=tuple(problems))


def layout_problems(config: Any, *, use_reference_policy: bool = True) -> list[str]:
    """One-line messages, one per micro-batch flag that cannot divide its rank's share (empty: all divide)."""
    found = layout(config, use_reference_policy=use_reference_policy)
    return [] if found is None else list(found.problems)


def check_layout(config: Any, *, use_reference_policy: bool = True) -> None:
    """Raise :class:`DataParallelLayoutError` (one line naming every flag at fault) when a pass cannot divide."""
    problems = layout_problems(config, use_reference_policy=use_reference_policy)
    if problems:
        raise DataParallelLayoutError(
            "data-parallel layout: " + "; ".join(problems)
            + f" (otherwise verl stops on the workers, after Ray started and the models loaded: '{_VERL_MESSAGE}')"
        )


# --------------------------------------------------------------------------------- the CPU recipe's sizes
def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """``{key: value}`` of Hydra ``key=value`` overrides (``+`` / ``++`` / ``~`` prefixes dropped; later ones win)."""
    values: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            continue
        key, value = item.split("=", 1)
        key = key.lstrip("+~")
        values[key] = value.strip().strip("'\"")
    return values


def _as_config(values: dict[str, str]) -> dict:
    """A nested dict of the flags :func:`layout` reads, from :func:`parse_overrides` output."""
    config: dict = {}
    for key, value in values.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        lowered = value.lower()
        node[leaf] = None if lowered in ("null", "none", "") else (lowered == "true" if lowered in ("true", "false") else value)
    return config


def derived_micro_batch_sizes(overrides: Iterable[str], *, use_reference_policy: bool = True) -> dict[str, int]:
    """Micro-batch sizes that divide each rank's share, for the job the Hydra ``overrides`` describe.

    Each configured size is kept when it divides, else replaced by the largest divisor of the share below it
    (so the work per micro-batch stays as close as possible to what was asked). Flags that are not set, or
    a layout that is not modelled, are left out. Used by ``examples/cpu/tiny_main_ppo.sh`` for ``N_WORKERS``.
    """
    found = layout(_as_config(parse_overrides(overrides)), use_reference_policy=use_reference_policy)
    if found is None:
        return {}
    return {s.flag: (s.micro if s.divides else largest_divisor_at_most(s.per_rank, s.micro))
            for s in found.shares if s.micro is not None and s.micro > 0}


def main(argv: Optional[list[str]] = None) -> int:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    for flag, size in derived_micro_batch_sizes(args).items():
        print(f"{flag}={size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

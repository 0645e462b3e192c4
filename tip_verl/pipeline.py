"""One-call TIP selection for a training batch (what the verl adapter calls on the driver each step)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ._checks import as_mask, check_generator, check_vocab_size, prepare, push_masked, require_tensor, row_counts
from .config import TIPConfig
from .scoring import RULES, ScoreInputs
from .selection import sample_prepared, top_rho
from .signals import normalized_entropy, sampled_token_divergence, topk_divergences
from .taxonomy import quadrant_codes, quadrant_stats_prepared, thresholds_prepared

__all__ = ["ENTROPY_TOL", "TIPSelection", "select_for_batch"]

#: Rounding margin of the normalised entropy h (Eq. 2): valid h must lie in
#: ``[-ENTROPY_TOL, 1 + ENTROPY_TOL]`` (entropies computed from bf16 logits can be off by ~0.1 nats).
ENTROPY_TOL = 0.05


@dataclass
class TIPSelection:
    """Output of :func:`select_for_batch` (all tensors ``[B, T]``, on the inputs' device)."""

    keep_mask: torch.Tensor  #: bool, subset of response_mask
    loss_weights: torch.Tensor | None  #: float32 1/π at kept positions (0 elsewhere) for poisson+IS, else None
    entropy: torch.Tensor  #: normalised h (Eq. 2), 0 at masked positions
    divergence: torch.Tensor  #: δ used for scoring/taxonomy (Eq. 3)
    forward_divergence: torch.Tensor | None  #: forward-KL signal (top-k or sampled "forward")
    scores: torch.Tensor  #: the selection score (soft_or for method all; h for entropy_sample)
    quadrants: torch.Tensor  #: int64 codes 1..4, 0 masked (Table 1)
    metrics: dict[str, float] = field(default_factory=dict)  #: keys prefixed "tip/"
    #: the quadrant split: absolute ``entropy`` / ``divergence`` thresholds (float32-rounded) and the config's
    #: ``threshold_mode`` / ``entropy_threshold`` / ``divergence_threshold`` they were resolved from
    thresholds: dict[str, Any] = field(default_factory=dict)
    #: :func:`tip_verl.taxonomy.quadrant_stats` of the batch (``q{i}_share``, ``q{i}_kept_share``, ...)
    quadrant_stats: dict[str, float] = field(default_factory=dict)


def _check_entropy_range(h: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> None:
    """Raise unless the normalised entropy ``h`` is in [0, 1] (up to ``ENTROPY_TOL``) at valid positions."""
    if h.numel() == 0:
        return
    lo, hi = torch.aminmax(h)
    if float(lo) >= -ENTROPY_TOL and float(hi) <= 1.0 + ENTROPY_TOL:
        return
    bad = ((h < -ENTROPY_TOL) | (h > 1.0 + ENTROPY_TOL)) & mask
    n = int(bad.sum())
    if n:
        nats = h[bad].double() * math.log(vocab_size)
        raise ValueError(
            f"entropy_nats is outside [0, log(vocab_size)] = [0, {math.log(vocab_size):.4g}] nats at {n} response "
            f"positions (from {float(nats.min()):.4g} to {float(nats.max()):.4g}): it must be the student's entropy "
            f"in nats and vocab_size={vocab_size} the size of the student's output vocabulary"
        )


def _masked_mean(x: torch.Tensor, fm: torch.Tensor, n: int) -> float:
    """Mean of a finite ``x`` over the positions where the 0/1 float mask ``fm`` is 1 (n of them)."""
    return float((x * fm).sum(dtype=torch.float64)) / n if n else 0.0


def select_for_batch(config: TIPConfig, *, entropy_nats: torch.Tensor, vocab_size: int,
                     student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                     response_mask: torch.Tensor, teacher_topk_logprobs: torch.Tensor | None = None,
                     teacher_topk_ids: torch.Tensor | None = None,
                     student_topk_logprobs: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> TIPSelection:
    """Score and select the tokens to train on for one batch (Sections 4, 6, 7.3; App. A.2).

    Signals: h = ``entropy_nats / log(vocab_size)`` (Eq. 2). With teacher top-k log-probs (and the
    student's log-probs at those ids), δ = top-k reverse KL and forward = top-k forward KL;
    otherwise δ = the sampled-token estimator ``config.divergence`` and forward = the sampled
    ``"forward"`` estimate. Methods: ``all`` keeps ``response_mask``; ``entropy | divergence |
    soft_or | q3 | random`` score (Eq. 5 / §7.3) and keep the top ρ (Eq. 6); ``entropy_sample``
    samples ∝ h (App. B.3), with ``loss_weights = 1/π`` when poisson + importance_weighting.

    ``generator`` None means a fresh ``torch.Generator`` seeded with ``config.seed`` (identical draws
    every call): pass a persistent generator to get new randomness each step.

    ``ValueError`` names the argument for NaN/inf at response positions, NaN in ``response_mask``,
    entropies outside ``[0, log(vocab_size)]`` beyond rounding (``ENTROPY_TOL``; h is then clamped to
    [0, 1]) and the top-k checks of :func:`tip_verl.signals.topk_divergences`.
    """
    if not isinstance(config, TIPConfig):
        raise TypeError(f"config must be a TIPConfig, got {type(config).__name__}")
    require_tensor("entropy_nats", entropy_nats)
    vocab_size = check_vocab_size(vocab_size)
    check_generator(generator)
    mask = as_mask(response_mask, student_logprobs, "student_logprobs", ndim=2)
    as_mask(mask, entropy_nats, "entropy_nats")
    as_mask(mask, teacher_logprobs, "teacher_logprobs")
    device = mask.device
    zero = torch.zeros((), dtype=torch.float32, device=device)

    fm = mask.to(torch.float32)
    h = normalized_entropy(prepare("entropy_nats", entropy_nats, mask), vocab_size).mul_(fm)
    _check_entropy_range(h, mask, vocab_size)
    h.clamp_(0.0, 1.0)
    sampled_delta = sampled_token_divergence(student_logprobs, teacher_logprobs, mask, config.divergence)
    have_topk = teacher_topk_logprobs is not None or student_topk_logprobs is not None
    if have_topk:
        if teacher_topk_logprobs is None or student_topk_logprobs is None:
            raise ValueError("teacher_topk_logprobs and student_topk_logprobs must be given together")
        delta, forward = topk_divergences(teacher_topk_logprobs, teacher_topk_ids, student_topk_logprobs, mask,
                                          vocab_size=vocab_size)
    else:
        if teacher_topk_ids is not None:
            raise ValueError("teacher_topk_ids given without teacher_topk_logprobs/student_topk_logprobs")
        delta = sampled_delta
        forward = sampled_token_divergence(student_logprobs, teacher_logprobs, mask, "forward")

    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed)

    rule = RULES[config.method]
    inputs = ScoreInputs(config.method, mask, entropy=h, divergence=delta, forward_divergence=forward,
                         scope=config.norm_scope, generator=generator, prepared=True)
    scores = rule.score(inputs)
    loss_weights = None
    if rule.keep == "sample":
        sampled = sample_prepared(scores, mask, config.ratio, generator=generator, mode=config.sampling_mode,
                                  scope=config.selection_scope)
        keep = sampled.keep_mask
        if config.importance_weighting:
            pi = sampled.inclusion_prob
            assert pi is not None  # poisson mode (enforced by TIPConfig)
            # π > 0 wherever a token was kept (u < π with u >= 0)
            loss_weights = torch.where(keep, pi.clamp_min(torch.finfo(torch.float32).tiny).reciprocal(), zero)
    elif rule.keep == "all":
        keep = mask.clone()
    else:
        keep = top_rho(scores, mask, config.ratio, scope=config.selection_scope, invert=config.invert)

    te, td = thresholds_prepared(h, delta, mask, config.entropy_threshold, config.divergence_threshold,
                                 threshold_mode=config.threshold_mode)
    quadrants = quadrant_codes(h, delta, mask, te, td)

    valid_count = int(row_counts(mask.reshape(1, -1)))
    kept_count = int(row_counts(keep.reshape(1, -1)))
    fk = keep.to(torch.float32)
    if kept_count:
        # min (max for invert) kept score: non-kept entries are pushed out of the reduction
        direction = -1.0 if config.invert else 1.0
        pushed = push_masked(scores, keep, 1.0 - fk, direction)
        score_threshold = float(pushed.amax() if config.invert else pushed.amin())
    else:
        score_threshold = 0.0
    metrics: dict[str, float] = {
        "tip/kept_fraction": kept_count / valid_count if valid_count else 0.0,
        "tip/kept_count": float(kept_count),
        "tip/valid_count": float(valid_count),
        "tip/entropy_mean": _masked_mean(h, fm, valid_count),
        "tip/divergence_mean": _masked_mean(delta, fm, valid_count),
        "tip/kept_entropy_mean": _masked_mean(h, fk, kept_count),
        "tip/kept_divergence_mean": _masked_mean(delta, fk, kept_count),
        "tip/score_threshold": score_threshold,
    }
    if loss_weights is not None:
        metrics["tip/loss_weight_mean"] = _masked_mean(loss_weights, fk, kept_count)
        metrics["tip/loss_weight_max"] = float(loss_weights.max()) if kept_count else 0.0
    stats = quadrant_stats_prepared(quadrants, delta, keep)
    for key, value in stats.items():
        metrics[f"tip/{key}"] = value
    thresholds = {"entropy": te, "divergence": td, "threshold_mode": config.threshold_mode,
                  "entropy_threshold": config.entropy_threshold, "divergence_threshold": config.divergence_threshold}
    return TIPSelection(keep_mask=keep, loss_weights=loss_weights, entropy=h, divergence=delta,
                        forward_divergence=forward, scores=scores, quadrants=quadrants, metrics=metrics,
                        thresholds=thresholds, quadrant_stats=stats)

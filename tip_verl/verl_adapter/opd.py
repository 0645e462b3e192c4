"""One OPD-with-TIP step on padded response tensors: select tokens, build advantages and masks.

Pure torch (no verl import) so it is tested directly; the trainer feeds it what verl's old-log-prob
pass (student log-probs and entropy) and ref pass (teacher log-probs) left in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tip_verl.pipeline import TIPSelection, select_for_batch
from tip_verl.signals import sampled_token_divergence

from .opd_config import TIPRunConfig


@dataclass
class OPDStep:
    advantages: torch.Tensor  # float [B, T]: minus the per-token reverse-KL estimate at kept tokens, else 0
    keep_mask: torch.Tensor  # bool [B, T]: the new response_mask / loss_mask
    selection: TIPSelection
    metrics: dict[str, float]


def opd_step(
    run: TIPRunConfig,
    *,
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor | None,
    entropy_nats: torch.Tensor,
    response_mask: torch.Tensor,
    vocab_size: int,
    teacher_topk_logprobs: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    student_topk_logprobs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> OPDStep:
    """Select tokens (paper Eq. 5-6) and set the OPD advantage to minus the reverse-KL estimate.

    With verl's token-mean aggregation over ``loss_mask = keep_mask`` the policy loss becomes
    Eq. 7: the mean over kept tokens only. With poisson entropy sampling and importance weighting,
    kept advantages are multiplied by ``(|S| / M) / pi_t`` (App. A.2): token-mean then divides by |S|,
    so the step estimates the all-token mean ``(1/M) * sum_t g_t`` without bias.

    With the teacher's top-k (``[B, T, k]`` log-probs and ids, and the student's log-probs at those
    ids) the selection's δ and forward KL are the top-k-plus-tail forms (Eq. 3). The advantage stays
    the estimate at the *sampled* token (k1/k3): the score-function gradient needs a per-token
    quantity that depends on the sampled token; the full top-k KL is what ``loss=topk_reverse_kl``
    backpropagates directly. ``teacher_logprobs=None`` (verl's teacher server sends only the top-k)
    gives zero advantages; verl's distillation loss then carries the signal.
    """
    response_mask = response_mask.bool()
    have_sampled_teacher = teacher_logprobs is not None
    if not have_sampled_teacher and teacher_topk_logprobs is None:
        raise ValueError("opd_step needs teacher_logprobs, the teacher's top-k, or both")
    selection = select_for_batch(
        run.selection,
        entropy_nats=entropy_nats,
        vocab_size=vocab_size,
        student_logprobs=student_logprobs,
        # without a sampled-token teacher log-prob the top-k signals drive everything; this stand-in is unused
        teacher_logprobs=teacher_logprobs if have_sampled_teacher else student_logprobs,
        response_mask=response_mask,
        teacher_topk_logprobs=teacher_topk_logprobs,
        teacher_topk_ids=teacher_topk_ids,
        student_topk_logprobs=student_topk_logprobs,
        generator=generator,
    )
    keep = selection.keep_mask & response_mask
    metrics = dict(selection.metrics)
    n_keep = max(int(keep.sum()), 1)
    if teacher_topk_logprobs is not None:
        metrics["tip/topk_reverse_kl_mean"] = metrics["tip/divergence_mean"]
        metrics["tip/kept_topk_reverse_kl_mean"] = metrics["tip/kept_divergence_mean"]
        metrics["tip/topk_forward_kl_mean"] = (
            float(selection.forward_divergence[response_mask].mean()) if response_mask.any() else 0.0
        )
    if not have_sampled_teacher:
        return OPDStep(advantages=torch.zeros_like(student_logprobs, dtype=torch.float32), keep_mask=keep,
                       selection=selection, metrics=metrics)
    reverse_kl = sampled_token_divergence(
        student_logprobs, teacher_logprobs, response_mask, estimator=run.advantage_estimator
    )
    advantages = torch.where(keep, -reverse_kl, torch.zeros_like(reverse_kl))
    if selection.loss_weights is not None:
        kept, valid = int(keep.sum()), int(response_mask.sum())
        weights = selection.loss_weights * (kept / max(valid, 1))
        advantages = torch.where(keep, advantages * weights, advantages)
        metrics["tip/is_weight_mean"] = float(weights[keep].mean()) if kept else 0.0
        metrics["tip/is_weight_max"] = float(weights[keep].max()) if kept else 0.0
    metrics["tip/reverse_kl_mean"] = float(reverse_kl[response_mask].mean()) if response_mask.any() else 0.0
    metrics["tip/kept_reverse_kl_mean"] = float(reverse_kl[keep].sum() / n_keep)
    return OPDStep(advantages=advantages, keep_mask=keep, selection=selection, metrics=metrics)


def staleness_metrics(tags, global_steps: int, keep_mask: torch.Tensor | None = None) -> dict[str, float]:
    """``tip/`` staleness of a training batch, as verl computes it (``trainer_base._compute_metrics``).

    ``tags``: the batch's per-sequence tags (verl's ``KVBatchMeta.tags``, in row order), each with
    ``min_global_steps`` / ``max_global_steps``, the weight versions the trajectory was generated across (one
    version per global step; partial rollouts continue across weight updates). The policy trained in step
    ``global_steps`` holds version ``global_steps - 1``, so a sequence lags by ``(global_steps - 1) -
    max_global_steps`` versions (verl's ``trajectory_staleness``) and, at its oldest token, by
    ``(global_steps - 1) - min_global_steps`` (``trajectory_staleness_worst``). verl's padding rows
    (``is_padding``) are left out, as verl does. Metrics: ``tip/staleness_mean`` / ``_max``,
    ``tip/staleness_worst_mean`` / ``_max``, ``tip/stale_sequence_share`` (sequences with a token from an older
    version than the one trained) and, with ``keep_mask`` (``[B, T]``, rows as ``tags``),
    ``tip/stale_kept_share``: the share of kept tokens that lie in such sequences. Empty when the tags lack
    the versions (a rollout that does not report them).
    """
    rows = [i for i, tag in enumerate(tags) if not tag.get("is_padding", False)]
    newest = [tags[i].get("max_global_steps") for i in rows]
    oldest = [tags[i].get("min_global_steps") for i in rows]
    if not rows or any(v is None for v in newest + oldest):
        return {}
    current = int(global_steps) - 1
    staleness = torch.tensor([current - int(v) for v in newest], dtype=torch.float64)
    worst = torch.tensor([current - int(v) for v in oldest], dtype=torch.float64)
    stale = worst > 0
    metrics = {
        "tip/staleness_mean": float(staleness.mean()),
        "tip/staleness_max": float(staleness.max()),
        "tip/staleness_worst_mean": float(worst.mean()),
        "tip/staleness_worst_max": float(worst.max()),
        "tip/stale_sequence_share": float(stale.double().mean()),
    }
    if keep_mask is not None:
        kept = keep_mask[rows].sum(dim=-1).double()
        metrics["tip/stale_kept_share"] = float(kept[stale].sum() / kept.sum()) if kept.sum() > 0 else 0.0
    return metrics

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
    teacher_logprobs: torch.Tensor,
    entropy_nats: torch.Tensor,
    response_mask: torch.Tensor,
    vocab_size: int,
    generator: torch.Generator | None = None,
) -> OPDStep:
    """Select tokens (paper Eq. 5-6) and set the OPD advantage to minus the reverse-KL estimate.

    With verl's token-mean aggregation over ``loss_mask = keep_mask`` the policy loss becomes
    Eq. 7: the mean over kept tokens only. With poisson entropy sampling and importance weighting,
    kept advantages are multiplied by ``(|S| / M) / pi_t`` (App. A.2): token-mean then divides by |S|,
    so the step estimates the all-token mean ``(1/M) * sum_t g_t`` without bias.
    """
    response_mask = response_mask.bool()
    selection = select_for_batch(
        run.selection,
        entropy_nats=entropy_nats,
        vocab_size=vocab_size,
        student_logprobs=student_logprobs,
        teacher_logprobs=teacher_logprobs,
        response_mask=response_mask,
        generator=generator,
    )
    keep = selection.keep_mask & response_mask
    reverse_kl = sampled_token_divergence(
        student_logprobs, teacher_logprobs, response_mask, estimator=run.advantage_estimator
    )
    advantages = torch.where(keep, -reverse_kl, torch.zeros_like(reverse_kl))
    metrics = dict(selection.metrics)
    if selection.loss_weights is not None:
        kept, valid = int(keep.sum()), int(response_mask.sum())
        weights = selection.loss_weights * (kept / max(valid, 1))
        advantages = torch.where(keep, advantages * weights, advantages)
        metrics["tip/is_weight_mean"] = float(weights[keep].mean()) if kept else 0.0
        metrics["tip/is_weight_max"] = float(weights[keep].max()) if kept else 0.0
    n_keep = max(int(keep.sum()), 1)
    metrics["tip/reverse_kl_mean"] = float(reverse_kl[response_mask].mean()) if response_mask.any() else 0.0
    metrics["tip/kept_reverse_kl_mean"] = float(reverse_kl[keep].sum() / n_keep)
    return OPDStep(advantages=advantages, keep_mask=keep, selection=selection, metrics=metrics)

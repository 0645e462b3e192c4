"""Per-token signals of TIP: normalised student entropy (Eq. 2) and teacher-student divergence (Eq. 3).

All functions work on padded tensors with a ``response_mask`` (0 = padding or a tool/environment
token), compute in float32 whatever the input dtype, and return 0 at masked positions.
"""

from __future__ import annotations

import math

import torch

from ._checks import as_mask, prepare, check_choice, check_same_shape, require_floating, require_tensor

__all__ = [
    "DIVERGENCE_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "normalized_entropy",
    "sampled_token_divergence",
    "topk_divergences",
    "full_logits_divergences",
]

#: Estimators accepted by :func:`sampled_token_divergence`.
DIVERGENCE_ESTIMATORS = ("k1", "k3", "abs", "forward")

#: The log-ratio ``lp_t - lp_s`` is clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]`` before any
#: ``exp`` so that k3 / forward estimates stay finite (exp(20) ~ 4.9e8 is far from float32 overflow).
LOG_RATIO_CLAMP = 20.0

#: Lower bound of the tail bucket probability in :func:`topk_divergences`.
TAIL_EPS = 1e-12
#: Elements per float64 chunk in :func:`topk_divergences` (16 MiB per temporary).
_TOPK_CHUNK_ELEMS = 1 << 21


def normalized_entropy(entropy: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Student entropy in nats divided by ``log(vocab_size)`` (Eq. 2), as float32.

    ``h = H(P_S) / log|V|`` lies in [0, 1] for a true entropy. No masking or clamping is applied
    (masked positions are passed through; the pipeline validates and zeroes them).
    """
    require_floating("entropy", entropy)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size!r} is invalid: must be an int >= 2")
    return entropy.float() / math.log(vocab_size)


def sampled_token_divergence(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                             response_mask: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token divergence estimate from the sampled token's log-probs (δ_t of Eq. 3).

    With ``y_t ~ P_S``, ``lp_s = log P_S(y_t)``, ``lp_t = log P_T(y_t)`` and ``r = exp(lp_t - lp_s)``:

    * ``"k1"``: ``lp_s - lp_t`` (unbiased for KL(S||T), can be negative),
    * ``"k3"``: ``(r - 1) - log r`` (unbiased for KL(S||T), non-negative),
    * ``"abs"``: ``|lp_s - lp_t|``,
    * ``"forward"``: ``r log r - (r - 1)`` (unbiased for KL(T||S) under y ~ S, non-negative).

    For k3/forward the log-ratio is clamped to ±``LOG_RATIO_CLAMP`` (20) before ``exp`` to avoid
    overflow; k1/abs use the raw difference. Returns float32 ``[B, T]`` with 0 at masked positions.
    """
    check_choice("estimator", estimator, DIVERGENCE_ESTIMATORS)
    require_tensor("student_logprobs", student_logprobs)
    require_tensor("teacher_logprobs", teacher_logprobs)
    check_same_shape("student_logprobs", student_logprobs, "teacher_logprobs", teacher_logprobs)
    mask = as_mask(response_mask, student_logprobs, "student_logprobs")
    fm = mask.to(torch.float32)
    # prepare() guarantees finite values, so multiplying by the 0/1 mask zeroes masked positions
    # (and every estimator is 0 when lp_s == lp_t == 0)
    lp_s = prepare("student_logprobs", student_logprobs, mask) * fm
    lp_t = prepare("teacher_logprobs", teacher_logprobs, mask) * fm
    k1 = lp_s.sub_(lp_t)
    if estimator == "k1":
        return k1
    if estimator == "abs":
        return k1.abs_()
    log_r = k1.neg_().clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k3":
        out = torch.expm1(log_r).sub_(log_r)
    else:  # forward
        out = torch.exp(log_r).mul_(log_r).sub_(torch.expm1(log_r))
    return out.clamp_min_(0.0)


def topk_divergences(teacher_topk_logprobs: torch.Tensor, teacher_topk_ids: torch.Tensor | None,
                     student_logprobs_at_ids: torch.Tensor,
                     response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse and forward KL over the teacher's top-k support plus one tail bucket (Eq. 3).

    Both distributions are collapsed onto the k teacher top-k tokens plus a bucket holding each
    side's leftover mass, ``tail_t = 1 - Σ p_t(top-k)`` and ``tail_s = 1 - Σ p_s(top-k)`` (clamped
    to ≥ ``TAIL_EPS``). Returns ``(KL(S||T), KL(T||S))`` as float32 ``[B, T]``, non-negative, 0 at
    masked positions. With k = |V| this is the exact KL. The arithmetic runs in float64 over
    bounded row chunks (the tail is a difference of nearly equal numbers). ``teacher_topk_ids`` (optional) is only
    validated (integer dtype, same shape); the student log-probs must already be gathered at those ids.
    """
    require_tensor("teacher_topk_logprobs", teacher_topk_logprobs)
    require_tensor("student_logprobs_at_ids", student_logprobs_at_ids)
    if teacher_topk_logprobs.dim() != 3:
        raise ValueError(
            f"teacher_topk_logprobs must be [B, T, k], got shape {tuple(teacher_topk_logprobs.shape)}"
        )
    check_same_shape("teacher_topk_logprobs", teacher_topk_logprobs,
                     "student_logprobs_at_ids", student_logprobs_at_ids)
    if teacher_topk_ids is not None:
        require_tensor("teacher_topk_ids", teacher_topk_ids)
        check_same_shape("teacher_topk_logprobs", teacher_topk_logprobs,
                         "teacher_topk_ids", teacher_topk_ids)
        if teacher_topk_ids.is_floating_point() or teacher_topk_ids.dtype == torch.bool:
            raise ValueError(f"teacher_topk_ids must be an integer tensor, got dtype {teacher_topk_ids.dtype}")
    mask = as_mask(response_mask)
    if tuple(mask.shape) != tuple(teacher_topk_logprobs.shape[:2]):
        raise ValueError(
            f"teacher_topk_logprobs has shape {tuple(teacher_topk_logprobs.shape)} but response_mask has "
            f"shape {tuple(mask.shape)}; their first two dimensions must match"
        )
    lp_t_all = prepare("teacher_topk_logprobs", teacher_topk_logprobs, mask)
    lp_s_all = prepare("student_logprobs_at_ids", student_logprobs_at_ids, mask)
    k = lp_t_all.shape[-1]
    n = mask.numel()
    lt2, ls2, m1 = lp_t_all.reshape(n, k), lp_s_all.reshape(n, k), mask.reshape(n)
    reverse = torch.zeros(n, dtype=torch.float32, device=mask.device)
    forward = torch.zeros(n, dtype=torch.float32, device=mask.device)
    # float64 in bounded row chunks: tail = 1 - Σp cancels catastrophically in float32 when the
    # top-k covers almost all the mass (a 1e-7 error on a 1e-6 tail is a 10% error on its log)
    rows = max(1, _TOPK_CHUNK_ELEMS // max(k, 1))
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        fm = m1[sl].to(torch.float64)
        fm2 = fm.unsqueeze(-1)
        lt = lt2[sl].double().mul_(fm2)  # masked rows -> log-probs 0 -> zero divergence
        ls = ls2[sl].double().mul_(fm2)
        pt, ps = lt.exp(), ls.exp()
        tail_t = (1.0 - pt.sum(-1)).clamp_min_(TAIL_EPS)
        tail_s = (1.0 - ps.sum(-1)).clamp_min_(TAIL_EPS)
        diff = ls.sub_(lt)  # log p_s - log p_t on the top-k support
        log_tail_diff = tail_s.log() - tail_t.log()
        rev = (ps * diff).sum(-1) + tail_s * log_tail_diff
        fwd = -(pt * diff).sum(-1) - tail_t * log_tail_diff
        reverse[sl] = rev.clamp_min_(0.0).mul_(fm).to(torch.float32)
        forward[sl] = fwd.clamp_min_(0.0).mul_(fm).to(torch.float32)
    return reverse.reshape(mask.shape), forward.reshape(mask.shape)


@torch.no_grad()
def full_logits_divergences(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            response_mask: torch.Tensor | None = None,
                            chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact ``(KL(S||T), KL(T||S), H(P_S))`` in nats from full logits (Eqs. 2-3, unnormalised H).

    ``student_logits``/``teacher_logits`` are ``[N, V]`` or ``[B, T, V]``; outputs have the leading
    shape. Rows are processed ``chunk_size`` at a time (only rows where ``response_mask`` is set),
    so peak extra memory is a few ``(chunk_size, V)`` float32 buffers and no full-size float32 copy
    of the logits is made. Runs under ``torch.no_grad``. Masked rows return 0. A logit of ``-inf``
    means probability 0 and is allowed; NaN/+inf at valid rows raise ``ValueError``.
    """
    require_floating("student_logits", student_logits)
    require_floating("teacher_logits", teacher_logits)
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits must be [N, V] or [B, T, V], got shape {tuple(student_logits.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: must be a positive int")
    lead = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    s2 = student_logits.reshape(-1, vocab)
    t2 = teacher_logits.reshape(-1, vocab)
    n = s2.shape[0]
    device = s2.device
    if response_mask is None:
        rows = None
        n_rows = n
    else:
        mask = as_mask(response_mask)
        if tuple(mask.shape) != lead:
            raise ValueError(
                f"student_logits has shape {tuple(student_logits.shape)} but response_mask has shape "
                f"{tuple(mask.shape)}; response_mask must equal the logits' leading shape"
            )
        rows = mask.reshape(-1).nonzero().squeeze(-1)
        n_rows = rows.numel()
    reverse = torch.zeros(n, dtype=torch.float32, device=device)
    forward = torch.zeros(n, dtype=torch.float32, device=device)
    entropy = torch.zeros(n, dtype=torch.float32, device=device)
    for start in range(0, n_rows, chunk_size):
        if rows is None:
            idx = slice(start, min(start + chunk_size, n))
            s_chunk, t_chunk = s2[idx], t2[idx]
        else:
            idx = rows[start:start + chunk_size]
            s_chunk, t_chunk = s2.index_select(0, idx), t2.index_select(0, idx)
        for name, chunk in (("student_logits", s_chunk), ("teacher_logits", t_chunk)):
            bad = int((torch.isnan(chunk) | torch.isposinf(chunk)).sum())
            if bad:
                raise ValueError(f"{name} contains {bad} non-finite values at response positions")
            if bool(torch.isneginf(chunk).all(-1).any()):
                raise ValueError(f"{name} has a response row whose logits are all -inf")
        ls = torch.log_softmax(s_chunk, dim=-1, dtype=torch.float32)
        lt = torch.log_softmax(t_chunk, dim=-1, dtype=torch.float32)
        del s_chunk, t_chunk
        ps = ls.exp()
        # where p == 0 (a -inf logit) the term is 0 by convention (x log x -> 0)
        diff = ls - lt
        rev = torch.where(ps > 0, ps * diff, 0.0).sum(-1)
        ent = -torch.where(ps > 0, ps * ls, 0.0).sum(-1)
        del ps
        pt = lt.exp()
        fwd = -torch.where(pt > 0, pt * diff, 0.0).sum(-1)
        del pt, diff, ls, lt
        reverse[idx] = rev.clamp_min(0.0)
        forward[idx] = fwd.clamp_min(0.0)
        entropy[idx] = ent.clamp_min(0.0)
    return reverse.reshape(lead), forward.reshape(lead), entropy.reshape(lead)

"""Per-token signals of TIP: normalised student entropy (Eq. 2) and teacher-student divergence (Eq. 3).

All functions work on padded tensors with a ``response_mask`` (0 = padding or a tool/environment
token), compute in float32 whatever the input dtype, and return 0 at masked positions.
"""

from __future__ import annotations

import math

import torch

from ._checks import (as_mask, check_choice, check_same_shape, check_vocab_size, is_int, prepare, require_floating,
                      require_tensor)
from .chunking import row_chunks, rows_per_chunk

__all__ = [
    "DIVERGENCE_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "LOGPROB_TOL",
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
#: Rounding tolerance of top-k log-probabilities: a log-prob above it, or top-k probabilities summing
#: to more than ``1 + LOGPROB_TOL``, cannot come from a distribution (:func:`topk_divergences`).
LOGPROB_TOL = 1e-3
#: Stand-in for a ``-inf`` log-prob in float64: ``exp`` underflows to exactly 0.
_LOG_ZERO = -1e4


def normalized_entropy(entropy: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Student entropy in nats divided by ``log(vocab_size)`` (Eq. 2), as float32.

    ``h = H(P_S) / log|V|`` lies in [0, 1] for a true entropy. No masking or clamping is applied
    (masked positions are passed through; the pipeline validates and zeroes them).
    """
    require_floating("entropy", entropy)
    return entropy.float() / math.log(check_vocab_size(vocab_size))


def _check_zero_probability(s_zero: torch.Tensor, t_zero: torch.Tensor, s_name: str, t_name: str) -> None:
    """Raise where a probability is 0 (``-inf``) on one side only: a KL would be infinite there."""
    for zero, other, name, other_name, kl in ((t_zero, s_zero, t_name, s_name, "KL(S||T)"),
                                              (s_zero, t_zero, s_name, t_name, "KL(T||S)")):
        n = int((zero & ~other).sum())
        if n:
            raise ValueError(
                f"{name} is -inf (probability 0) at {n} entries where {other_name} is not: {kl} would be "
                "infinite; probability 0 is allowed only where both are -inf"
            )


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


def topk_tail_kl(ls: torch.Tensor, lt: torch.Tensor, tail_s: torch.Tensor, tail_t: torch.Tensor, *,
                 ps: torch.Tensor | None = None, pt: torch.Tensor | None = None, forward: bool = False):
    """Eq. 3 on prepared tensors: the KLs of two distributions collapsed onto k ids plus one tail bucket.

    ``ls`` / ``lt`` ``[..., k]``: student / teacher log-probs at the teacher's top-k ids; ``tail_s`` /
    ``tail_t`` ``[...]``: each side's leftover mass (already clamped to ≥ ``TAIL_EPS``); ``ps`` / ``pt``:
    ``ls.exp()`` / ``lt.exp()`` when the caller has them. Returns ``KL(S||T)`` (and, with ``forward``,
    ``(KL(S||T), KL(T||S))``) ``[...]``, unclamped, in the inputs' dtype; differentiable. The one
    implementation of the top-k KL: :func:`topk_divergences` (float64, validated, no grad) and the direct
    top-k reverse-KL loss (:mod:`tip_verl.verl_adapter.topk_signal`, float32, on the kept rows' log-probs
    at the teacher's ids) both call it; they differ only in how they compute the tails.
    """
    ps = ls.exp() if ps is None else ps
    diff = ls - lt  # log p_s - log p_t on the top-k support
    log_tail_diff = tail_s.log() - tail_t.log()
    reverse = (ps * diff).sum(-1) + tail_s * log_tail_diff
    if not forward:
        return reverse
    pt = lt.exp() if pt is None else pt
    return reverse, -(pt * diff).sum(-1) - tail_t * log_tail_diff


def topk_divergences(teacher_topk_logprobs: torch.Tensor, teacher_topk_ids: torch.Tensor | None,
                     student_logprobs_at_ids: torch.Tensor, response_mask: torch.Tensor, *,
                     vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse and forward KL over the teacher's top-k support plus one tail bucket (Eq. 3).

    Both distributions are collapsed onto the k teacher top-k tokens plus a bucket holding each
    side's leftover mass, ``tail_t = 1 - Σ p_t(top-k)`` and ``tail_s = 1 - Σ p_s(top-k)`` (clamped
    to ≥ ``TAIL_EPS``). Returns ``(KL(S||T), KL(T||S))`` as float32 ``[B, T]``, non-negative, 0 at
    masked positions. With k = |V| this is the exact KL. The arithmetic runs in float64 over
    bounded row chunks (the tail is a difference of nearly equal numbers). ``teacher_topk_ids``
    (optional) is only validated; the student log-probs must already be gathered at those ids.

    At response positions, ``ValueError`` naming the tensor unless: k >= 1; log-probs <= 0 and each
    side's top-k probabilities sum to <= 1 (both up to ``LOGPROB_TOL``); ids are integers, distinct
    within a position and, when ``vocab_size`` is given, in ``[0, vocab_size)``. A log-prob of
    ``-inf`` (probability 0) is allowed where both sides are ``-inf`` (the entry adds 0 to both KLs);
    on one side only a KL is infinite and it raises, as in :func:`full_logits_divergences`.
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
    if vocab_size is not None:
        vocab_size = check_vocab_size(vocab_size)
    mask = as_mask(response_mask)
    if tuple(mask.shape) != tuple(teacher_topk_logprobs.shape[:2]):
        raise ValueError(
            f"teacher_topk_logprobs has shape {tuple(teacher_topk_logprobs.shape)} but response_mask has "
            f"shape {tuple(mask.shape)}; their first two dimensions must match"
        )
    k = teacher_topk_logprobs.shape[-1]
    if k == 0:
        raise ValueError(f"teacher_topk_logprobs has shape {tuple(teacher_topk_logprobs.shape)}: k=0 top-k "
                         "entries per token; k must be >= 1")
    lp_t_all = prepare("teacher_topk_logprobs", teacher_topk_logprobs, mask, allow_neginf=True)
    lp_s_all = prepare("student_logprobs_at_ids", student_logprobs_at_ids, mask, allow_neginf=True)
    m3 = mask.unsqueeze(-1)
    if teacher_topk_ids is not None and teacher_topk_ids.numel():
        lo, hi = int(teacher_topk_ids.amin()), int(teacher_topk_ids.amax())
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            bad = teacher_topk_ids < 0
            if vocab_size is not None:
                bad |= teacher_topk_ids >= vocab_size
            n_bad = int((bad & m3).sum())
            if n_bad:
                where = "below 0" if vocab_size is None else f"outside [0, vocab_size={vocab_size})"
                raise ValueError(f"teacher_topk_ids has {n_bad} ids {where} at response positions")
    has_zero = False  # a -inf log-prob somewhere
    for name, lp in (("teacher_topk_logprobs", lp_t_all), ("student_logprobs_at_ids", lp_s_all)):
        if not lp.numel():
            continue
        lo, hi = torch.aminmax(lp)
        has_zero |= float(lo) == -math.inf
        if float(hi) > LOGPROB_TOL:
            n_bad = int(((lp > LOGPROB_TOL) & m3).sum())
            if n_bad:
                raise ValueError(f"{name} has {n_bad} log-probabilities above 0 at response positions (max "
                                 f"{float(lp[m3.expand_as(lp)].max()):.4g}); log-probs must be <= 0")
    if has_zero:
        _check_zero_probability(torch.isneginf(lp_s_all) & m3, torch.isneginf(lp_t_all) & m3,
                                "student_logprobs_at_ids", "teacher_topk_logprobs")
    n = mask.numel()
    lt2, ls2, m1 = lp_t_all.reshape(n, k), lp_s_all.reshape(n, k), mask.reshape(n)
    ids2 = teacher_topk_ids.reshape(n, k) if teacher_topk_ids is not None else None
    reverse = torch.zeros(n, dtype=torch.float32, device=mask.device)
    forward = torch.zeros(n, dtype=torch.float32, device=mask.device)
    duplicated = 0
    over = {"teacher_topk_logprobs": [0, 0.0], "student_logprobs_at_ids": [0, 0.0]}  # positions, max mass
    # float64 in bounded row chunks: tail = 1 - Σp cancels catastrophically in float32 when the
    # top-k covers almost all the mass (a 1e-7 error on a 1e-6 tail is a 10% error on its log)
    for sl in row_chunks(n, rows_per_chunk(k, elem_bytes=8)):
        fm = m1[sl].to(torch.float64)
        fm2 = fm.unsqueeze(-1)
        lt, ls = lt2[sl].double(), ls2[sl].double()
        if has_zero:  # -inf (on both sides, checked above) -> p = 0 exactly, and no -inf * 0 below
            lt, ls = lt.nan_to_num_(neginf=_LOG_ZERO), ls.nan_to_num_(neginf=_LOG_ZERO)
        lt, ls = lt.mul_(fm2), ls.mul_(fm2)  # masked rows -> log-probs 0 -> zero divergence
        pt, ps = lt.exp(), ls.exp()
        mass_t, mass_s = pt.sum(-1), ps.sum(-1)
        for name, mass in (("teacher_topk_logprobs", mass_t), ("student_logprobs_at_ids", mass_s)):
            bad = (mass > 1.0 + LOGPROB_TOL) & m1[sl]
            if bool(bad.any()):
                over[name][0] += int(bad.sum())
                over[name][1] = max(over[name][1], float(mass[bad].max()))
        if ids2 is not None:
            ids = ids2[sl][m1[sl]].sort(-1).values
            duplicated += int((ids[:, 1:] == ids[:, :-1]).any(-1).sum())
        tail_t = (1.0 - mass_t).clamp_min_(TAIL_EPS)
        tail_s = (1.0 - mass_s).clamp_min_(TAIL_EPS)
        rev, fwd = topk_tail_kl(ls, lt, tail_s, tail_t, ps=ps, pt=pt, forward=True)
        reverse[sl] = rev.clamp_min_(0.0).mul_(fm).to(torch.float32)
        forward[sl] = fwd.clamp_min_(0.0).mul_(fm).to(torch.float32)
    if duplicated:
        raise ValueError(f"teacher_topk_ids repeats an id within the top-k at {duplicated} response positions; "
                         "the top-k ids of a position must be distinct")
    for name, (count, mx) in over.items():
        if count:
            raise ValueError(f"{name}: the top-k probabilities sum to more than 1 at {count} response positions "
                             f"(max {mx:.6g}); they must come from one normalised distribution")
    return reverse.reshape(mask.shape), forward.reshape(mask.shape)


@torch.no_grad()
def full_logits_divergences(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            response_mask: torch.Tensor | None = None,
                            chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact ``(KL(S||T), KL(T||S), H(P_S))`` in nats from full logits (Eqs. 2-3, unnormalised H).

    ``student_logits``/``teacher_logits`` are ``[N, V]`` or ``[B, T, V]``; outputs have the leading
    shape. Rows are processed ``chunk_size`` at a time (only rows where ``response_mask`` is set;
    default :func:`tip_verl.chunking.rows_per_chunk` of V, 64 MiB of float32 logits a chunk),
    so peak extra memory is a few ``(chunk_size, V)`` float32 buffers and no full-size float32 copy
    of the logits is made. Runs under ``torch.no_grad``. Masked rows return 0. A logit of ``-inf``
    means probability 0 and is allowed where both sides are ``-inf`` (as in :func:`topk_divergences`);
    on one side only a KL is infinite and ``ValueError`` is raised, as for NaN/+inf at valid rows.
    """
    require_floating("student_logits", student_logits)
    require_floating("teacher_logits", teacher_logits)
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits must be [N, V] or [B, T, V], got shape {tuple(student_logits.shape)}")
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: must be a positive int")
    lead = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    if chunk_size is None:
        chunk_size = rows_per_chunk(max(vocab, 1))
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
    for sl in row_chunks(n_rows, chunk_size):
        if rows is None:
            idx = sl
            s_chunk, t_chunk = s2[idx], t2[idx]
        else:
            idx = rows[sl]
            s_chunk, t_chunk = s2.index_select(0, idx), t2.index_select(0, idx)
        for name, chunk in (("student_logits", s_chunk), ("teacher_logits", t_chunk)):
            bad = int((torch.isnan(chunk) | torch.isposinf(chunk)).sum())
            if bad:
                raise ValueError(f"{name} contains {bad} non-finite values at response positions")
            if bool(torch.isneginf(chunk).all(-1).any()):
                raise ValueError(f"{name} has a response row whose logits are all -inf")
        s_zero, t_zero = torch.isneginf(s_chunk), torch.isneginf(t_chunk)
        if bool(s_zero.any()) or bool(t_zero.any()):
            _check_zero_probability(s_zero, t_zero, "student_logits", "teacher_logits")
        del s_zero, t_zero
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

"""Token selection of TIP: deterministic top-ρ (Eq. 6) and entropy-proportional sampling (App. A.2, B.3).

Everything is vectorised over sequences (no Python loop over rows): top-k uses a per-row
k-th-value threshold (one unsorted ``torch.topk`` on rows padded so that one k serves all rows)
and breaks ties by position; Poisson sampling solves its inclusion probabilities by vectorised water-filling.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import (as_mask, check_choice, check_generator, check_ratio, keep_counts, prepare, push_masked,
                      row_counts, uniform)

__all__ = ["SELECTION_SCOPES", "SAMPLING_MODES", "SampledTokens", "sample_prepared", "sample_tokens", "select_tokens", "top_rho"]

SELECTION_SCOPES = ("sequence", "batch")
SAMPLING_MODES = ("without_replacement", "poisson")

_TINY = torch.finfo(torch.float32).tiny


class SampledTokens(NamedTuple):
    """Result of :func:`sample_tokens`.

    ``keep_mask``: bool ``[B, T]``, a subset of ``response_mask``.
    ``inclusion_prob``: float32 ``[B, T]`` inclusion probabilities π_t (0 at masked positions) for
    ``mode="poisson"``; ``None`` for ``"without_replacement"`` (the exact inclusion probabilities of
    successive weighted sampling have no closed form, so no unbiased 1/π weights are offered).
    """

    keep_mask: torch.Tensor
    inclusion_prob: torch.Tensor | None


def _topk_rows(key: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the ``k[i]`` largest ``key`` entries of each row among ``valid`` ones; ties -> lower index.

    ``key`` is float32 ``[G, L]``; every masked entry must be smaller than every valid entry of its
    row (e.g. -inf, or a large negative penalty) and ``k[i] <= valid[i].sum()``.
    """
    g, width = key.shape
    if g == 0 or width == 0:
        return torch.zeros_like(valid)
    kmax = int(k.max())
    if kmax == 0:
        return torch.zeros_like(valid)
    kmin = int(k.min())
    if kmin == kmax:
        aug = key
    else:
        # Pad row i with (kmax - k_i) +inf entries: the kmax-th largest of the padded row is the
        # k_i-th largest of the row, so a single top-k call serves all rows.
        cols = torch.arange(kmax - kmin, device=key.device)
        pad = torch.where(cols.unsqueeze(0) < (kmax - k).unsqueeze(1), float("inf"), float("-inf"))
        aug = torch.cat([key, pad.to(key.dtype)], dim=1)
    # threshold = the kmax-th largest entry of each padded row, via an unsorted top-k from the
    # cheaper side (a little faster than kthvalue on CPU)
    n_low = aug.shape[1] - kmax + 1
    if kmax <= n_low:
        thr = torch.topk(aug, kmax, dim=1, sorted=False).values.amin(1, keepdim=True)
    else:
        thr = torch.topk(aug, n_low, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)
    # Rows with k_i = 0 get thr = +inf and keep nothing. A masked entry can never reach thr (it is
    # below all valid entries and k_i <= m_i), so no "& valid" is needed below.
    greater = key > thr
    eq = key == thr
    need = k - row_counts(greater)
    if torch.equal(row_counts(eq), need):  # no tie straddles the threshold
        return greater | eq
    rank = eq.view(torch.uint8).cumsum(1, dtype=torch.int32)  # position-ordered rank among ties
    return greater | (eq & (rank <= need.unsqueeze(1)))


def _groups(x: torch.Tensor, scope: str) -> torch.Tensor:
    return x.reshape(1, -1) if scope == "batch" else x


def select_tokens(scores: torch.Tensor, response_mask: torch.Tensor, ratio: float, *,
                  scope: str = "sequence", invert: bool = False) -> torch.Tensor:
    """Bool keep-mask of the top-ρ tokens by score (Eq. 6), a subset of ``response_mask``.

    ``scope="sequence"`` keeps ``max(1, floor(ρ·m_i + 1e-6))`` tokens of each non-empty response
    (m_i valid tokens); ``scope="batch"`` keeps ``max(1, floor(ρ·M + 1e-6))`` over the whole batch
    (M total valid tokens; none if M = 0). ``invert=True`` keeps the lowest scores instead (the
    bottom-ρ control of Table 6). Ties are broken by position: earlier tokens (row-major for
    ``scope="batch"``) win. ``ratio=1`` keeps every valid token.
    """
    r = check_ratio(ratio)
    check_choice("scope", scope, SELECTION_SCOPES)
    if not isinstance(invert, bool):
        raise TypeError(f"invert must be a bool, got {type(invert).__name__}")
    mask = as_mask(response_mask, scores, "scores", ndim=2)
    return top_rho(prepare("scores", scores, mask), mask, r, scope=scope, invert=invert)


def top_rho(s: torch.Tensor, mask: torch.Tensor, r: float, *, scope: str, invert: bool) -> torch.Tensor:
    """:func:`select_tokens` on prepared inputs (finite float32 scores, bool mask, checked ratio and scope)."""
    if r == 1.0:
        return mask.clone()
    notm = 1.0 - mask.to(torch.float32)
    key = push_masked(-s if invert else s, mask, notm, -1.0)  # masked entries sink below all valid
    key_g, valid_g = _groups(key, scope), _groups(mask, scope)
    k = keep_counts(row_counts(valid_g), r)
    return _topk_rows(key_g, valid_g, k).reshape(mask.shape)


def _poisson_inclusion(w: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """π = min(1, c·w) per row with Σπ = k (water-filling); see :func:`sample_tokens`.

    ``w`` is float32 ``[G, L]``, finite, >= 0 and 0 at masked positions.
    """
    pos = w > 0
    n_pos = row_counts(pos)
    feasible = n_pos >= k
    active = pos & feasible.unsqueeze(1)
    kf = k.to(torch.float64)
    cap = torch.zeros_like(pos)
    n_cap = torch.zeros_like(k)
    rest = w.sum(1, dtype=torch.float64)
    # Each pass caps (π = 1) every token with c·w >= 1 and re-solves c = (k - n_cap) / Σ_uncapped w.
    # c never decreases, so the capped set only grows and the loop ends (in practice after a
    # handful of passes) with Σπ = n_cap + c·Σ_uncapped w = k. Σ_uncapped w is summed afresh in
    # float64 each pass (not total - capped, which cancels catastrophically for tiny weights).
    for _ in range(w.shape[1] + 1):
        c = torch.where(rest > 0, (kf - n_cap.to(torch.float64)) / rest.clamp_min(1e-300), 0.0)
        c32 = c.clamp(max=3.0e38).to(torch.float32).unsqueeze(1)  # finite, so 0·c32 = 0
        new_cap = active & ((w * c32) >= 1.0) | cap
        new_n = row_counts(new_cap)
        if torch.equal(new_n, n_cap):
            break
        cap, n_cap = new_cap, new_n
        rest = (w * ~cap).sum(1, dtype=torch.float64)
    pi = torch.maximum((w * c32).clamp_(max=1.0), cap.to(torch.float32))
    if not bool(feasible.all()):
        # Too few positive weights to reach k: all of them get π = 1 and the shortfall is spread
        # uniformly over the zero-weight valid tokens (the limit of a vanishing weight floor).
        n_zero = (row_counts(valid) - n_pos).clamp_min(1).to(torch.float32)
        shortfall = ((k - n_pos).clamp_min(0).to(torch.float32) / n_zero).unsqueeze(1)
        pi_infeasible = torch.where(pos, 1.0, shortfall * valid)
        pi = torch.where(feasible.unsqueeze(1), pi, pi_infeasible)
    return pi


def sample_tokens(weights: torch.Tensor, response_mask: torch.Tensor, ratio: float, *,
                  generator: torch.Generator | None, mode: str,
                  scope: str = "sequence") -> SampledTokens:
    """Sample tokens with probability ∝ ``weights`` (entropy sampling, App. A.2 / B.3).

    ``weights`` must be finite and >= 0 at valid positions (typically normalised entropy h).

    * ``mode="without_replacement"``: exactly the :func:`select_tokens` counts (per sequence or per
      batch), drawn by successive sampling ∝ w (Gumbel-top-k on ``log(max(w, tiny)) + Gumbel``).
      The tiny floor (float32 ``tiny`` ≈ 1.2e-38) makes zero-weight tokens drawn only when needed to
      reach the count (uniformly among them). ``inclusion_prob`` is None: successive sampling has
      no closed-form inclusion probabilities, so no unbiased 1/π weights are offered.
    * ``mode="poisson"``: each token is kept independently with ``π_t = min(1, c·w_t)``, ``c`` solved
      per sequence (``scope="sequence"``) or per batch by water-filling so that ``Σπ`` equals the
      :func:`select_tokens` count. The kept count is random with that mean; ``Σ_{kept} g_t / π_t`` is
      an unbiased estimate of ``Σ_t g_t`` over tokens with ``w_t > 0`` (App. A.2, Eq. 14). If fewer
      than the count have ``w > 0``, those get π = 1 and the shortfall is spread uniformly over the
      zero-weight tokens; otherwise zero-weight tokens get π = 0. ``inclusion_prob`` is π (float32,
      0 at masked positions).
    """
    r = check_ratio(ratio)
    check_generator(generator)
    check_choice("mode", mode, SAMPLING_MODES)
    check_choice("scope", scope, SELECTION_SCOPES)
    mask = as_mask(response_mask, weights, "weights", ndim=2)
    w = prepare("weights", weights, mask)
    if w.numel() and float(w.amin()) < 0:
        n_neg = int(((w < 0) & mask).sum())
        if n_neg:
            raise ValueError(f"weights contains {n_neg} negative values at response positions")
    return sample_prepared(w, mask, r, generator=generator, mode=mode, scope=scope)


def sample_prepared(w: torch.Tensor, mask: torch.Tensor, r: float, *, generator: torch.Generator | None, mode: str,
                    scope: str) -> SampledTokens:
    """:func:`sample_tokens` on prepared inputs (finite float32 weights >= 0, bool mask, checked arguments)."""
    shape = tuple(mask.shape)
    fm = mask.to(torch.float32)
    valid_g = _groups(mask, scope)
    k = keep_counts(row_counts(valid_g), r)
    if mode == "without_replacement":
        if r == 1.0:
            return SampledTokens(mask.clone(), None)
        u = uniform(shape, generator, mask.device).clamp_(min=_TINY)
        key = w.clamp_min(_TINY).log_().sub_(u.log_().neg_().log_())  # log w + Gumbel
        key = push_masked(key, mask, 1.0 - fm, -1.0)
        keep = _topk_rows(_groups(key, scope), valid_g, k).reshape(shape)
        return SampledTokens(keep, None)
    if r == 1.0:
        pi = fm.clone()
    else:
        pi = _poisson_inclusion(_groups(w * fm, scope), valid_g, k).reshape(shape)
    u = uniform(shape, generator, mask.device)
    return SampledTokens(u < pi, pi)

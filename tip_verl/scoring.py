"""Token importance scores of TIP: min-max normalisation and the Soft-OR / Q3 scores (Eq. 5, §7.3)."""

from __future__ import annotations

import torch

from ._checks import as_mask, check_choice, check_generator, prepare, push_masked, push_scale, uniform

__all__ = ["NORM_SCOPES", "SCORE_METHODS", "minmax_normalize", "token_scores"]

NORM_SCOPES = ("batch", "sequence")
#: Score-based methods accepted by :func:`token_scores`.
SCORE_METHODS = ("entropy", "divergence", "soft_or", "q3", "random")


def _minmax(xf: torch.Tensor, mask: torch.Tensor, fm: torch.Tensor, notm: torch.Tensor,
            scope: str) -> torch.Tensor:
    """Min-max of a finite float32 ``xf``; masked outputs are 0 (see :func:`minmax_normalize`)."""
    if xf.numel() == 0:
        return xf.clone()
    big = push_scale(xf)
    if scope == "batch":
        if not bool(mask.any()):
            return torch.zeros_like(xf)
        lo = push_masked(xf, mask, notm, 1.0, big).amin()
        hi = push_masked(xf, mask, notm, -1.0, big).amax()
    else:
        lo = push_masked(xf, mask, notm, 1.0, big).amin(dim=1, keepdim=True)
        hi = push_masked(xf, mask, notm, -1.0, big).amax(dim=1, keepdim=True)
    span = hi - lo
    ok = span > 0  # false for constant groups and (sequence scope) empty rows
    inv = torch.where(ok, 1.0 / torch.where(ok, span, 1.0), 0.0)
    lo = torch.where(ok, lo, 0.0)
    if bool((ok & ~(torch.isfinite(span) & torch.isfinite(inv))).any()):
        # a spread beyond float32 (> 3.4e38) or below 1/3.4e38: the same arithmetic in float64
        span64 = hi.double() - lo.double()
        out = (xf.double() - lo.double()).div_(torch.where(ok, span64, 1.0)).clamp_(0.0, 1.0)
        return torch.where(ok, out, 0.0).mul_(fm).float()
    # clamp before the mask multiply: masked garbage may overflow to ±inf, which the clamp maps
    # into [0, 1] (so no 0 * inf = NaN)
    return (xf - lo).mul_(inv).clamp_(0.0, 1.0).mul_(fm)


def minmax_normalize(x: torch.Tensor, response_mask: torch.Tensor, scope: str = "batch") -> torch.Tensor:
    """Min-max normalise ``x`` to [0, 1] over valid positions (the hat-quantities of Eq. 5).

    ``scope="batch"`` uses one min/max over all valid tokens of ``[B, T]``; ``"sequence"`` one per
    row. A constant group (max == min) maps to 0, masked positions and empty rows output 0.
    Returns float32, finite for every finite input (spreads too large or too small for float32
    arithmetic are computed in float64).
    """
    check_choice("scope", scope, NORM_SCOPES)
    mask = as_mask(response_mask, x, "x", ndim=2)
    xf = prepare("x", x, mask)
    fm = mask.to(torch.float32)
    return _minmax(xf, mask, fm, 1.0 - fm, scope)


def _need(name: str, value: torch.Tensor | None, method: str, mask: torch.Tensor) -> torch.Tensor:
    if value is None:
        raise ValueError(f"token_scores(method={method!r}) requires {name}")
    as_mask(mask, value, name)  # shape check against response_mask
    return prepare(name, value, mask)


def token_scores(method: str, *, entropy: torch.Tensor | None = None,
                 divergence: torch.Tensor | None = None, response_mask: torch.Tensor,
                 forward_divergence: torch.Tensor | None = None, scope: str = "batch",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-token importance score, float32 ``[B, T]``, 0 at masked positions.

    ``entropy`` is the already normalised h (Eq. 2), ``divergence`` is δ (Eq. 3). Methods:

    * ``"entropy"``: h;  ``"divergence"``: δ;
    * ``"soft_or"``: ``ĥ + δ̂ - ĥ·δ̂`` with ĥ, δ̂ min-max normalised over ``scope`` (Eq. 5);
    * ``"q3"``: ``δ_fwd · (1 - ĥ)`` (§7.3), with δ_fwd = ``forward_divergence``; when
      ``forward_divergence`` is None it falls back to ``divergence``;
    * ``"random"``: U[0, 1) draws from ``generator`` (global RNG if None).

    Only the inputs a method uses are required (and validated).
    """
    check_choice("method", method, SCORE_METHODS)
    check_choice("scope", scope, NORM_SCOPES)
    check_generator(generator)
    mask = as_mask(response_mask, ndim=2)
    for name, t in (("entropy", entropy), ("divergence", divergence), ("forward_divergence", forward_divergence)):
        if t is not None:
            as_mask(mask, t, name)
    fm = mask.to(torch.float32)
    notm = 1.0 - fm
    if method == "random":
        return uniform(tuple(mask.shape), generator, mask.device).mul_(fm)
    if method == "entropy":
        return _need("entropy", entropy, method, mask) * fm  # finite * {0, 1}: masked -> 0
    if method == "divergence":
        return _need("divergence", divergence, method, mask) * fm
    h_hat = _minmax(_need("entropy", entropy, method, mask), mask, fm, notm, scope)
    if method == "soft_or":
        d_hat = _minmax(_need("divergence", divergence, method, mask), mask, fm, notm, scope)
        # ĥ + δ̂ − ĥδ̂ = 1 − (1 − ĥ)(1 − δ̂); both are 0 at masked positions, so the score is too
        return h_hat.add(d_hat).sub_(h_hat.mul_(d_hat))
    # q3
    if forward_divergence is not None:
        fwd = _need("forward_divergence", forward_divergence, method, mask)
    else:
        fwd = _need("divergence", divergence, method, mask)
    return (1.0 - h_hat).mul_(fwd).mul_(fm)

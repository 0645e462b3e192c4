"""TIP taxonomy (Section 4, Table 1): the four quadrants of the (entropy, divergence) plane.

Q1 = high h / high δ, Q2 = high h / low δ, Q3 = low h / high δ (the blind spot of entropy-only
selection, Prop. 2), Q4 = low h / low δ. "High" means strictly greater than the threshold.
"""

from __future__ import annotations

import math

import torch

from ._checks import as_mask, check_choice, is_real, prepare, push_masked, row_counts

__all__ = ["THRESHOLD_MODES", "classify_quadrants", "quadrant_codes", "quadrant_stats", "quadrant_stats_prepared",
           "resolve_thresholds", "thresholds_prepared"]

THRESHOLD_MODES = ("quantile", "absolute")


def _quantile(xf: torch.Tensor, mask: torch.Tensor, notm: torch.Tensor, q: float) -> float:
    """Quantile ``q`` of the valid entries of a finite float32 ``xf`` with linear interpolation
    (``torch.quantile``'s default), via ``kthvalue`` (no sort, no size limit), rounded to float32.
    """
    vals = push_masked(xf, mask, notm, 1.0).reshape(-1)  # masked entries above all valid ones
    n = int(row_counts(mask.reshape(1, -1)))
    pos = q * (n - 1)
    lo = min(int(math.floor(pos)), n - 1)
    frac = pos - lo
    v_lo = torch.kthvalue(vals, lo + 1).values
    if frac > 0 and lo + 1 < n:
        # next order statistic: v_lo again if it is repeated, else the smallest value above it
        n_le = int(row_counts((vals <= v_lo).reshape(1, -1)))
        if n_le >= lo + 2:
            v_hi = v_lo
        else:
            v_hi = torch.where(vals > v_lo, vals, float("inf")).amin()
        value = float(v_lo) + (float(v_hi) - float(v_lo)) * frac
    else:
        value = float(v_lo)
    return _f32(value)


def _f32(value: float) -> float:
    """Round to float32: thresholds are compared against float32 signals."""
    return float(torch.tensor(value, dtype=torch.float32))


def _check_threshold(name: str, value: object, mode: str) -> float:
    if not is_real(value):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name}={value!r} is invalid: must be finite")
    if mode == "quantile" and not (0.0 <= v <= 1.0):
        raise ValueError(f"{name}={value!r} is invalid: a quantile level must be in [0, 1]")
    return v


def resolve_thresholds(entropy: torch.Tensor, divergence: torch.Tensor, response_mask: torch.Tensor, *,
                       entropy_threshold: float = 0.5, divergence_threshold: float = 0.5,
                       threshold_mode: str = "quantile") -> tuple[float, float]:
    """Absolute ``(entropy, divergence)`` thresholds: as given, or batch quantiles over valid tokens.

    Both are rounded to float32 (the precision of the signals they are compared with). With no
    valid token the quantile mode returns ``(0.0, 0.0)`` (nothing is classified anyway).
    """
    check_choice("threshold_mode", threshold_mode, THRESHOLD_MODES)
    te = _check_threshold("entropy_threshold", entropy_threshold, threshold_mode)
    td = _check_threshold("divergence_threshold", divergence_threshold, threshold_mode)
    if threshold_mode == "absolute":
        return _f32(te), _f32(td)
    mask = as_mask(response_mask, entropy, "entropy", ndim=2)
    as_mask(mask, divergence, "divergence")
    h = prepare("entropy", entropy, mask)
    d = prepare("divergence", divergence, mask)
    return thresholds_prepared(h, d, mask, te, td, threshold_mode=threshold_mode)


def thresholds_prepared(h: torch.Tensor, d: torch.Tensor, mask: torch.Tensor, te: float, td: float, *,
                        threshold_mode: str) -> tuple[float, float]:
    """:func:`resolve_thresholds` on prepared inputs (finite float32 ``h``, ``d``; bool ``mask``; thresholds
    and mode checked, as :class:`tip_verl.config.TIPConfig` does)."""
    if threshold_mode == "absolute":
        return _f32(te), _f32(td)
    if not bool(mask.any()):
        return 0.0, 0.0
    notm = 1.0 - mask.to(torch.float32)
    return _quantile(h, mask, notm, te), _quantile(d, mask, notm, td)


def classify_quadrants(entropy: torch.Tensor, divergence: torch.Tensor, response_mask: torch.Tensor, *,
                       entropy_threshold: float = 0.5, divergence_threshold: float = 0.5,
                       threshold_mode: str = "quantile") -> torch.Tensor:
    """Quadrant codes (int64 ``[B, T]``): 1 = Q1 (h > τ_h, δ > τ_δ), 2 = Q2 (h > τ_h, δ <= τ_δ),
    3 = Q3 (h <= τ_h, δ > τ_δ), 4 = Q4 (h <= τ_h, δ <= τ_δ), 0 at masked positions (Table 1).

    ``threshold_mode="absolute"`` uses the thresholds as values; ``"quantile"`` (default, 0.5 each
    = median split) treats them as quantile levels of the valid tokens of the batch.
    """
    mask = as_mask(response_mask, entropy, "entropy", ndim=2)
    as_mask(mask, divergence, "divergence")
    h = prepare("entropy", entropy, mask)
    d = prepare("divergence", divergence, mask)
    te, td = resolve_thresholds(h, d, mask, entropy_threshold=entropy_threshold,
                                divergence_threshold=divergence_threshold, threshold_mode=threshold_mode)
    return quadrant_codes(h, d, mask, te, td)


def quadrant_codes(h: torch.Tensor, d: torch.Tensor, mask: torch.Tensor, te: float, td: float) -> torch.Tensor:
    """:func:`classify_quadrants` on prepared inputs (finite float32 ``h``, ``d``; bool ``mask``) and absolute
    thresholds ``te`` / ``td`` (:func:`resolve_thresholds`)."""
    high_h = h > te
    high_d = d > td
    # Q1 = 1, Q2 = 2, Q3 = 3, Q4 = 4 (0 where masked), built in uint8 then widened once
    low_d = (~high_d).view(torch.uint8)
    low_h = (~high_h).view(torch.uint8)
    codes = (low_h * 2).add_(low_d).add_(1).mul_(mask.view(torch.uint8))
    return codes.to(torch.int64)


def quadrant_stats(quadrants: torch.Tensor, divergence: torch.Tensor, response_mask: torch.Tensor,
                   keep_mask: torch.Tensor | None = None) -> dict[str, float]:
    """Quadrant mix as a flat dict of python floats, for i in 1..4:

    * ``q{i}_share``: fraction of valid tokens in Q_i;
    * ``q{i}_divergence_share``: fraction of the total ``|δ|`` mass (over valid tokens) in Q_i
      (|δ| makes signed estimators such as k1 non-negative; equals δ for KL/k3);
    * ``q{i}_kept_share`` (only if ``keep_mask`` is given): fraction of kept valid tokens in Q_i.

    Each family sums to 1 when its denominator is positive (≥ 1 token / non-zero mass / ≥ 1 kept
    token) and is all zeros otherwise.
    """
    mask = as_mask(response_mask, quadrants, "quadrants", ndim=2)
    as_mask(mask, divergence, "divergence")
    if quadrants.is_floating_point() or quadrants.dtype == torch.bool or quadrants.is_complex():
        raise ValueError(f"quadrants must be an integer tensor, got dtype {quadrants.dtype}")
    m8 = mask.reshape(-1).view(torch.uint8)
    n_valid = int(m8.sum(dtype=torch.int64)) if m8.numel() else 0
    if quadrants.numel():
        lo, hi = torch.aminmax(quadrants)
        in_range = 0 <= int(lo) and int(hi) <= 4
    else:
        in_range = True
    if in_range:
        q8 = quadrants.reshape(-1).to(torch.uint8).mul_(m8)  # masked -> bin 0
    else:  # out-of-range codes somewhere: fine only if all of them sit at masked positions
        qf = quadrants.reshape(-1)
        bad = int((((qf < 1) | (qf > 4)) & mask.reshape(-1)).sum())
        if bad:
            raise ValueError(f"quadrants contains {bad} codes outside 1..4 at response positions")
        q8 = torch.where(mask.reshape(-1), qf, 0).to(torch.uint8)
    counts_all = torch.bincount(q8, minlength=5).to(torch.float64)
    bad = n_valid - int(counts_all[1:5].sum())  # valid positions holding code 0
    if bad:
        raise ValueError(f"quadrants contains {bad} codes outside 1..4 at response positions")
    d = prepare("divergence", divergence, mask)
    keep = None if keep_mask is None else as_mask(keep_mask, quadrants, "quadrants", name="keep_mask")
    return _stats(q8, counts_all[1:5], d, keep)


def quadrant_stats_prepared(quadrants: torch.Tensor, d: torch.Tensor,
                            keep: torch.Tensor | None = None) -> dict[str, float]:
    """:func:`quadrant_stats` on prepared inputs: ``quadrants`` from :func:`quadrant_codes` (codes 1..4 at
    valid positions, 0 at masked ones), finite float32 ``d`` and a bool ``keep`` of the same shape."""
    q8 = quadrants.reshape(-1).to(torch.uint8)
    counts = torch.bincount(q8, minlength=5).to(torch.float64)[1:5]
    return _stats(q8, counts, d, keep)


def _stats(q8: torch.Tensor, counts: torch.Tensor, d: torch.Tensor, keep: torch.Tensor | None) -> dict[str, float]:
    """The shares of :func:`quadrant_stats` from flat uint8 codes (0 = masked), their counts per quadrant
    (float64), the finite float32 divergence and the optional bool keep mask."""
    d = d.reshape(-1).abs().to(torch.float64)
    mass = torch.bincount(q8, weights=d, minlength=5)[1:5]  # masked |δ| lands in the ignored bin 0
    out: dict[str, float] = {}

    def _shares(suffix: str, values: torch.Tensor) -> None:
        total = float(values.sum())
        for i in range(4):
            out[f"q{i + 1}_{suffix}"] = float(values[i]) / total if total > 0 else 0.0

    _shares("share", counts)
    _shares("divergence_share", mass)
    if keep is not None:
        kept = torch.bincount(q8 * keep.reshape(-1).view(torch.uint8), minlength=5)[1:5].to(torch.float64)
        _shares("kept_share", kept)
    return out

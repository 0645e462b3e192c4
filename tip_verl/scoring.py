"""The selection rules of TIP, one registry: each rule is one scoring function (Eq. 5, §7.3, App. B.3).

A rule is registered in the style of verl's ``core_algos.register_adv_est``::

    @register_method("soft_or")
    def soft_or(x: ScoreInputs) -> torch.Tensor:   # float32 [B, T], 0 at masked positions
        h_hat, d_hat = x.minmax(x.entropy), x.minmax(x.divergence)
        return h_hat.add(d_hat).sub_(h_hat.mul_(d_hat))

and from then on is a valid ``TIPConfig.method`` / ``+tip.method``. ``keep`` says what is done with
the score: ``"top"`` keeps the top ρ (Eq. 6; ``invert`` keeps the bottom ρ), ``"sample"`` samples ∝
the score (App. B.3), ``"all"`` keeps every valid token (the score is then only reported). Inputs are
validated once, at the edge (:func:`token_scores`, :func:`tip_verl.pipeline.select_for_batch`); a rule
reads prepared tensors from :class:`ScoreInputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ._checks import as_mask, check_choice, check_generator, prepare, push_masked, push_scale, uniform

__all__ = ["KEEP_MODES", "NORM_SCOPES", "RULES", "SCORE_METHODS", "ScoreInputs", "SelectionRule", "minmax_normalize",
           "register_method", "token_scores"]

NORM_SCOPES = ("batch", "sequence")
#: What a rule does with its score: keep the top ρ, sample ∝ score, or keep every valid token.
KEEP_MODES = ("top", "sample", "all")


@dataclass(frozen=True)
class SelectionRule:
    """One registered selection rule (see :func:`register_method`)."""

    name: str
    score: Callable[["ScoreInputs"], torch.Tensor]
    keep: str = "top"

    @property
    def invertible(self) -> bool:
        """``invert=True`` (keep the lowest scores) applies to top-ρ rules only."""
        return self.keep == "top"


#: The registered rules by name, in registration order (= :data:`tip_verl.config.METHODS`).
RULES: dict[str, SelectionRule] = {}


def register_method(name: str, *, keep: str = "top") -> Callable:
    """Decorator: register ``fn(x: ScoreInputs) -> float32 [B, T]`` as selection rule ``name``."""
    check_choice("keep", keep, KEEP_MODES)

    def decorator(fn: Callable[["ScoreInputs"], torch.Tensor]) -> Callable:
        existing = RULES.get(name)
        if existing is not None and (existing.score is not fn or existing.keep != keep):
            raise ValueError(f"selection rule {name!r} is already registered to {existing.score.__qualname__}")
        RULES[name] = SelectionRule(name=name, score=fn, keep=keep)
        return fn

    return decorator


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


class ScoreInputs:
    """What a rule reads: h (Eq. 2), δ (Eq. 3), the forward δ, the mask, the scope and the generator.

    Built once per call. ``prepared=True`` (:func:`tip_verl.pipeline.select_for_batch`): the tensors are
    already validated float32 and are handed out as they are. ``prepared=False`` (:func:`token_scores`):
    each input is validated on first read, so a rule needs (and checks) only the inputs it uses.
    """

    def __init__(self, method: str, mask: torch.Tensor, *, entropy: torch.Tensor | None = None,
                 divergence: torch.Tensor | None = None, forward_divergence: torch.Tensor | None = None,
                 scope: str = "batch", generator: torch.Generator | None = None, prepared: bool = False) -> None:
        self.method, self.mask, self.scope, self.generator = method, mask, scope, generator
        self.fm = mask.to(torch.float32)
        self.notm = 1.0 - self.fm
        self._raw = {"entropy": entropy, "divergence": divergence, "forward_divergence": forward_divergence}
        self._ready: dict[str, torch.Tensor] = {k: v for k, v in self._raw.items() if prepared and v is not None}

    def has(self, name: str) -> bool:
        return self._raw[name] is not None

    def _get(self, name: str) -> torch.Tensor:
        if name not in self._ready:
            value = self._raw[name]
            if value is None:
                raise ValueError(f"token_scores(method={self.method!r}) requires {name}")
            self._ready[name] = prepare(name, value, self.mask)
        return self._ready[name]

    @property
    def entropy(self) -> torch.Tensor:
        return self._get("entropy")

    @property
    def divergence(self) -> torch.Tensor:
        return self._get("divergence")

    @property
    def forward_divergence(self) -> torch.Tensor:
        return self._get("forward_divergence")

    def minmax(self, x: torch.Tensor) -> torch.Tensor:
        """Min-max normalisation of a prepared input over :attr:`scope` (the hats of Eq. 5)."""
        return _minmax(x, self.mask, self.fm, self.notm, self.scope)


# ---------------------------------------------------------------------------------------------
# The rules (registration order = TIPConfig.METHODS)
# ---------------------------------------------------------------------------------------------
def soft_or(x: ScoreInputs) -> torch.Tensor:
    """TIP's Soft-OR ``ĥ + δ̂ − ĥ·δ̂`` with ĥ, δ̂ min-max normalised over the scope (Eq. 5)."""
    h_hat = x.minmax(x.entropy)
    d_hat = x.minmax(x.divergence)
    # ĥ + δ̂ − ĥδ̂ = 1 − (1 − ĥ)(1 − δ̂); both are 0 at masked positions, so the score is too
    return h_hat.add(d_hat).sub_(h_hat.mul_(d_hat))


# plain OPD: keeps every valid token; the Soft-OR score is reported (score_threshold, records)
register_method("all", keep="all")(soft_or)


@register_method("entropy")
def entropy(x: ScoreInputs) -> torch.Tensor:
    """The student's normalised entropy h (top ρ by h)."""
    return x.entropy * x.fm  # finite * {0, 1}: masked -> 0


@register_method("entropy_sample", keep="sample")
def entropy_sample(x: ScoreInputs) -> torch.Tensor:
    """Sampling ∝ h (App. A.2 / B.3); the weights are h itself."""
    return x.entropy


register_method("soft_or")(soft_or)


@register_method("q3")
def q3(x: ScoreInputs) -> torch.Tensor:
    """Overconfident tokens (§7.3): ``δ_fwd · (1 − ĥ)``; δ_fwd falls back to δ when no forward δ is given."""
    h_hat = x.minmax(x.entropy)
    fwd = x.forward_divergence if x.has("forward_divergence") else x.divergence
    return (1.0 - h_hat).mul_(fwd).mul_(x.fm)


@register_method("divergence")
def divergence(x: ScoreInputs) -> torch.Tensor:
    """The teacher–student divergence δ (top ρ by δ)."""
    return x.divergence * x.fm


@register_method("random")
def random(x: ScoreInputs) -> torch.Tensor:
    """Uniform control: U[0, 1) draws from the generator (global RNG if None)."""
    return uniform(tuple(x.mask.shape), x.generator, x.mask.device).mul_(x.fm)


#: Rules that keep the top ρ by their score: the methods :func:`token_scores` accepts.
SCORE_METHODS = tuple(name for name, rule in RULES.items() if rule.keep == "top")


def token_scores(method: str, *, entropy: torch.Tensor | None = None,
                 divergence: torch.Tensor | None = None, response_mask: torch.Tensor,
                 forward_divergence: torch.Tensor | None = None, scope: str = "batch",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-token importance score of a top-ρ rule (:data:`SCORE_METHODS`), float32 ``[B, T]``, 0 at masked positions.

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
    inputs = ScoreInputs(method, mask, entropy=entropy, divergence=divergence, forward_divergence=forward_divergence,
                         scope=scope, generator=generator)
    return RULES[method].score(inputs)

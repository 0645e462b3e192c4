"""TIPConfig: the validated settings of TIP token selection (Sections 6-7, App. B.3)."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._checks import is_int, is_real
from .scoring import RULES

__all__ = ["METHODS", "TIPConfig"]

#: All selection methods, the rules registered in :mod:`tip_verl.scoring`: ``all`` (plain OPD), ``entropy``
#: (top-ρ by h), ``entropy_sample`` (sampling ∝ h, App. A.2), ``soft_or`` (TIP, Eq. 5), ``q3`` (overconfident
#: tokens, §7.3), ``divergence`` (top-ρ by δ), ``random`` (uniform control).
METHODS = tuple(RULES)

_CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "selection_scope": ("sequence", "batch"),
    "norm_scope": ("batch", "sequence"),
    "divergence": ("k1", "k3", "abs"),
    "sampling_mode": ("without_replacement", "poisson"),
    "threshold_mode": ("quantile", "absolute"),
}
_BOOLS = ("importance_weighting", "invert")
_FLOATS = ("ratio", "entropy_threshold", "divergence_threshold")


@dataclass(frozen=True)
class TIPConfig:
    """Settings of TIP token selection; validated on construction (``ValueError`` naming the field).

    ``method``: one of :data:`METHODS`. ``ratio``: retention ratio ρ in (0, 1] (Eq. 6); unset (None)
    means 0.5, or 1.0 for ``all``, which keeps every token and accepts no other ratio.
    ``selection_scope``: top-ρ per ``sequence`` (paper) or over the ``batch``.
    ``norm_scope``: min-max normalisation scope of Eq. 5. ``divergence``: sampled-token estimator
    used as δ when no teacher top-k is available (k1 | k3 | abs). ``sampling_mode``: for
    ``entropy_sample`` only. ``importance_weighting``: 1/π loss weights (poisson sampling only).
    ``invert``: keep the lowest scores (Table 6 control). ``entropy_threshold`` /
    ``divergence_threshold`` / ``threshold_mode``: the taxonomy split (quantile levels in [0, 1] or
    absolute values). ``seed``: seeds the generator when the caller gives none.

    The dataclass is frozen; use ``dataclasses.replace(cfg, ratio=0.2)`` (re-validated) to change it.
    """

    method: str = "soft_or"
    ratio: float | None = None  # resolved in __post_init__: 1.0 for method="all", else 0.5
    selection_scope: str = "sequence"
    norm_scope: str = "batch"
    divergence: str = "k3"
    sampling_mode: str = "without_replacement"
    importance_weighting: bool = False
    invert: bool = False
    entropy_threshold: float = 0.5
    divergence_threshold: float = 0.5
    threshold_mode: str = "quantile"
    seed: int = 0

    @staticmethod
    def _bad(field: str, value: Any, why: str) -> ValueError:
        return ValueError(f"TIPConfig.{field}={value!r} is invalid: {why}")

    def __post_init__(self) -> None:
        for field, allowed in _CHOICES.items():
            value = getattr(self, field)
            if not isinstance(value, str) or value not in allowed:
                raise self._bad(field, value, f"must be one of {list(allowed)}")
        for field in _BOOLS:
            value = getattr(self, field)
            if not isinstance(value, bool):
                raise self._bad(field, value, "must be a bool (True or False)")
        if self.ratio is None:
            object.__setattr__(self, "ratio", 1.0 if RULES[self.method].keep == "all" else 0.5)
        for field in _FLOATS:
            value = getattr(self, field)
            if not is_real(value):
                raise self._bad(field, value, "must be a float")
            if not math.isfinite(value):
                raise self._bad(field, value, "must be finite")
            object.__setattr__(self, field, float(value))
        if not is_int(self.seed):
            raise self._bad("seed", self.seed, "must be an int")
        object.__setattr__(self, "seed", int(self.seed))
        if not (0 <= self.seed < 2**63):
            raise self._bad("seed", self.seed, "must be in [0, 2**63)")
        if not (0.0 < self.ratio <= 1.0):
            raise self._bad("ratio", self.ratio, "must be in (0, 1]")
        if self.threshold_mode == "quantile":
            for field in ("entropy_threshold", "divergence_threshold"):
                value = getattr(self, field)
                if not (0.0 <= value <= 1.0):
                    raise self._bad(field, value, "must be in [0, 1] (a quantile level) when "
                                    "threshold_mode='quantile'")
        # contradictions
        rule = RULES[self.method]
        if rule.keep == "all" and self.ratio != 1.0:
            raise self._bad("ratio", self.ratio, f"method={self.method!r} keeps every token: leave ratio unset or "
                            "set it to 1.0")
        if self.invert and not rule.invertible:
            raise self._bad("invert", self.invert, f"invert=True cannot be combined with "
                            f"method={self.method!r} (it only applies to top-k methods)")
        if self.sampling_mode == "poisson" and rule.keep != "sample":
            raise self._bad("sampling_mode", self.sampling_mode,
                            f"sampling_mode='poisson' requires method='entropy_sample', got method={self.method!r}")
        if self.importance_weighting and not (rule.keep == "sample" and self.sampling_mode == "poisson"):
            raise self._bad("importance_weighting", self.importance_weighting,
                            "importance_weighting=True requires method='entropy_sample' and "
                            f"sampling_mode='poisson', got method={self.method!r}, "
                            f"sampling_mode={self.sampling_mode!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TIPConfig":
        """Build from a mapping (e.g. a Hydra/OmegaConf section); unknown keys raise ``ValueError``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"TIPConfig.from_dict expects a mapping, got {type(d).__name__}")
        valid = cls.field_names()
        unknown = [k for k in d if k not in valid]
        if unknown:
            parts = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), valid, n=1)
                parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown TIPConfig key(s): {', '.join(parts)}; valid keys are: {', '.join(valid)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (round-trips through :meth:`from_dict`)."""
        return dataclasses.asdict(self)

"""Shared input validation for the TIP core (torch only).

Conventions used by every public function of the core:

* Inputs are padded ``[B, T]`` tensors plus a ``response_mask`` (any dtype; non-zero = a scored
  response token, zero = padding or a tool/environment token of a multi-turn rollout).
* Computation happens in float32 whatever the input dtype (bf16/fp16 accepted).
* Shape mismatches raise ``ValueError`` naming both tensors and shapes.
* NaN/inf at valid (mask = 1) positions raise ``ValueError`` naming the tensor; whatever sits at
  masked positions is ignored. A floating-point mask holding NaN/inf raises too.
* Integer and float arguments accept numpy scalars as well (``np.int64``, ``np.float32``).
"""

from __future__ import annotations

import numbers

import torch


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def require_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def require_floating(name: str, x: object) -> torch.Tensor:
    x = require_tensor(name, x)
    if not (x.is_floating_point()):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {_shape(a)} but {name_b} has shape {_shape(b)}; they must match"
        )


def is_int(value: object) -> bool:
    """True for Python and numpy integers, False for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """True for Python and numpy ints/floats, False for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as a Python int; ``ValueError`` naming ``name`` if it is no int or below ``minimum``."""
    if not is_int(value):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}={v} is invalid: must be >= {minimum}")
    return v


def check_vocab_size(vocab_size: object) -> int:
    """``vocab_size`` as an int; ``ValueError`` unless it is an int >= 2."""
    if not is_int(vocab_size) or vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size!r} is invalid: must be an int >= 2")
    return int(vocab_size)


def check_generator(generator: object) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def as_mask(response_mask: object, like: torch.Tensor | None = None, like_name: str = "",
            ndim: int | None = None, name: str = "response_mask") -> torch.Tensor:
    """Return a mask tensor as bool (non-zero = true), checking its shape against ``like``."""
    m = require_tensor(name, response_mask)
    if ndim is not None and m.dim() != ndim:
        raise ValueError(
            f"{name} must be {ndim}-dimensional ([B, T]), got shape {_shape(m)}"
        )
    if like is not None:
        require_tensor(like_name, like)
        check_same_shape(like_name, like, name, m)
    if m.dtype != torch.bool:
        if m.is_floating_point():
            n_bad = int((~torch.isfinite(m)).sum())
            if n_bad:
                raise ValueError(f"{name} contains {n_bad} NaN/inf values; a mask holds 0 (ignored) or 1 (scored)")
        m = m != 0
    return m


def check_finite(name: str, x: torch.Tensor, mask: torch.Tensor | None, allow_neginf: bool = False) -> None:
    """Raise if ``x`` holds NaN/inf (NaN/+inf with ``allow_neginf``) where ``mask`` is true (everywhere
    if mask is None).

    ``mask`` may have fewer trailing dimensions than ``x`` (e.g. ``[B, T]`` for ``[B, T, k]``).
    """
    bad = (torch.isnan(x) | torch.isposinf(x)) if allow_neginf else ~torch.isfinite(x)
    if mask is not None:
        m = mask
        while m.dim() < bad.dim():
            m = m.unsqueeze(-1)
        bad = bad & m
    n = int(bad.sum())
    if n:
        what = "non-finite values (NaN/+inf)" if allow_neginf else "non-finite values"
        raise ValueError(f"{name} contains {n} {what} at response positions")


def prepare(name: str, x: object, mask: torch.Tensor, allow_neginf: bool = False) -> torch.Tensor:
    """float32 version of ``x`` (no copy if already float32), validated finite at valid positions.

    On return every element is finite: masked positions keep their (finite) values, non-finite
    garbage there is replaced by 0. The common all-finite case costs one reduction. With
    ``allow_neginf`` (log-probabilities, where ``-inf`` is probability 0) ``-inf`` is accepted and
    kept everywhere.
    """
    x = require_floating(name, x)
    xf = x.float()
    if xf.numel() == 0 or bool(torch.isfinite(xf.sum())):
        return xf
    check_finite(name, xf, mask, allow_neginf)
    keep = torch.isfinite(xf)
    if allow_neginf:
        keep |= torch.isneginf(xf)
    return torch.where(keep, xf, torch.zeros((), dtype=xf.dtype, device=xf.device))


def push_masked(xf: torch.Tensor, mask: torch.Tensor, notm: torch.Tensor, direction: float,
                big: float | None = None) -> torch.Tensor:
    """``xf`` with masked entries moved above (``direction=+1``) or below (``-1``) every valid entry.

    ``xf`` must be finite (see :func:`prepare`); ``notm`` is ``1 - mask`` as float32; ``big`` (from
    :func:`push_scale`, computed if None) is the shift. Valid entries are returned exactly
    (``x + 0·big``); one fused ``addcmul`` is several times faster than ``torch.where`` on CPU.
    Falls back to ±inf via ``torch.where`` when the inputs are too large for a finite shift.
    """
    if xf.numel() == 0:
        return xf.clone()
    if big is None:
        big = push_scale(xf)
    if big < 1e37:
        return torch.addcmul(xf, notm, torch.tensor(direction * big, dtype=xf.dtype, device=xf.device))
    fill = torch.tensor(direction * float("inf"), dtype=xf.dtype, device=xf.device)
    return torch.where(mask, xf, fill)


def push_scale(xf: torch.Tensor) -> float:
    """Shift used by :func:`push_masked`: masked entries land at >= big - M = 3M + 1 > M >= |valid|
    (M = max |xf|; the margin survives float rounding)."""
    if xf.numel() == 0:
        return 1.0
    lo, hi = torch.aminmax(xf)
    return 4.0 * max(abs(float(lo)), abs(float(hi))) + 1.0


def row_counts(mask: torch.Tensor) -> torch.Tensor:
    """Number of true entries per row of a bool ``[G, L]`` mask (int64 ``[G]``)."""
    if mask.shape[1] == 0:
        return torch.zeros(mask.shape[0], dtype=torch.int64, device=mask.device)
    return mask.view(torch.uint8).sum(1, dtype=torch.int32).to(torch.int64)


def check_ratio(ratio: object) -> float:
    if not is_real(ratio):
        raise TypeError(f"ratio must be a float in (0, 1], got {type(ratio).__name__}")
    r = float(ratio)
    if not (0.0 < r <= 1.0):
        raise ValueError(f"ratio={ratio!r} is invalid: must be in (0, 1]")
    return r


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: must be one of {list(allowed)}")
    return value  # type: ignore[return-value]


def keep_counts(valid_counts: torch.Tensor, ratio: float) -> torch.Tensor:
    """Eq. 6 budget: ``max(1, floor(ratio * m + 1e-6))`` for m > 0, else 0 (int64).

    The 1e-6 guards against floating error (e.g. ``0.3 * 10 = 2.9999999999999996``).
    """
    m = valid_counts.to(torch.float64)
    k = torch.floor(m * ratio + 1e-6).to(torch.int64).clamp_min(1)
    k = torch.minimum(k, valid_counts.to(torch.int64))
    return torch.where(valid_counts > 0, k, torch.zeros_like(k))


def uniform(shape: tuple[int, ...], generator: torch.Generator | None,
            device: torch.device) -> torch.Tensor:
    """U[0, 1) float32 draws from ``generator`` (drawn on the generator's device, then moved)."""
    check_generator(generator)
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return u.to(device)

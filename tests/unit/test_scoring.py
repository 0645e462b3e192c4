"""Scores: min-max normalisation and the entropy / divergence / Soft-OR (Eq. 5) / Q3 (§7.3) scores."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tip_verl import minmax_normalize, token_scores

try:
    from . import reference_impl as ref
except ImportError:  # tests/unit is not a package
    import reference_impl as ref


def _close(a, b, tol=1e-5):
    for ra, rb in zip(a, b, strict=True):
        for x, y in zip(ra, rb, strict=True):
            assert abs(x - y) <= tol * (1 + abs(y)), (x, y)


def _batch(seed, batch, seq, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    mask = ref.ragged_mask(batch, seq, g, empty_rows=empty_rows)
    h = torch.rand(batch, seq, generator=g)
    d = torch.rand(batch, seq, generator=g) * 3
    f = torch.rand(batch, seq, generator=g) * 2
    return g, mask, h, d, f


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), seq=st.integers(1, 12),
       scope=st.sampled_from(["batch", "sequence"]), coarse=st.booleans())
def test_minmax_matches_reference(seed, batch, seq, scope, coarse):
    _, mask, h, _, _ = _batch(seed, batch, seq, empty_rows=(batch - 1,) if batch > 1 else ())
    if coarse:  # many ties and constant rows
        h = (h * 2).floor()
    x = torch.where(mask, h * 10 - 3, torch.tensor(float("nan")))  # garbage at masked positions
    out = minmax_normalize(x, mask, scope)
    assert out.dtype == torch.float32
    _close(out.tolist(), ref.minmax(x.tolist(), mask.tolist(), scope))
    assert bool((out[~mask] == 0).all())
    assert bool(((out >= 0) & (out <= 1)).all())


def test_minmax_constant_and_empty_give_zeros_not_nan():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    x = torch.tensor([[2.5, 2.5, 100.0], [1.0, 2.0, 3.0]])
    for scope in ("batch", "sequence"):
        out = minmax_normalize(x, mask, scope)
        assert out.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    empty = minmax_normalize(x, torch.zeros(2, 3, dtype=torch.bool), "batch")
    assert empty.tolist() == [[0.0] * 3] * 2


def test_minmax_sequence_scope_normalises_each_row_separately():
    mask = torch.ones(2, 3, dtype=torch.bool)
    x = torch.tensor([[0.0, 1.0, 2.0], [10.0, 20.0, 30.0]])
    assert minmax_normalize(x, mask, "sequence").tolist() == [[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]]
    batch = minmax_normalize(x, mask, "batch")
    assert batch[0, 2].item() == pytest.approx(2 / 30) and batch[1, 2].item() == 1.0


def test_minmax_validation():
    with pytest.raises(ValueError, match="scope='global'"):
        minmax_normalize(torch.zeros(2, 2), torch.ones(2, 2), "global")
    with pytest.raises(ValueError, match="x contains 1 non-finite"):
        minmax_normalize(torch.tensor([[0.0, float("inf")]]), torch.ones(1, 2), "batch")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), seq=st.integers(1, 12),
       method=st.sampled_from(["entropy", "divergence", "soft_or", "q3"]),
       scope=st.sampled_from(["batch", "sequence"]), with_forward=st.booleans())
def test_token_scores_match_reference(seed, batch, seq, method, scope, with_forward):
    _, mask, h, d, f = _batch(seed, batch, seq, empty_rows=(0,) if batch > 2 else ())
    fwd = f if with_forward else None
    out = token_scores(method, entropy=h, divergence=d, response_mask=mask, forward_divergence=fwd, scope=scope)
    expected = ref.token_scores(method, h.tolist(), d.tolist(), mask.tolist(),
                                fwd.tolist() if fwd is not None else None, scope)
    _close(out.tolist(), expected)
    assert bool((out[~mask] == 0).all())


def test_soft_or_is_at_least_each_normalised_input_and_at_most_one():
    _, mask, h, d, _ = _batch(7, 4, 16)
    s = token_scores("soft_or", entropy=h, divergence=d, response_mask=mask)
    hh, dh = minmax_normalize(h, mask), minmax_normalize(d, mask)
    assert bool((s >= torch.maximum(hh, dh) - 1e-6).all())
    assert bool((s <= 1 + 1e-6).all())
    # Eq. 5's second form: 1 - (1 - h)(1 - d)
    assert torch.allclose(s, torch.where(mask, 1 - (1 - hh) * (1 - dh), 0.0), atol=1e-6)


def test_q3_falls_back_to_divergence_without_forward_signal():
    _, mask, h, d, _ = _batch(8, 3, 9)
    a = token_scores("q3", entropy=h, divergence=d, response_mask=mask)
    b = token_scores("q3", entropy=h, divergence=torch.zeros_like(d), response_mask=mask, forward_divergence=d)
    assert torch.equal(a, b)
    assert bool((a > 0).sum() > 0)


def test_random_scores_are_uniform_masked_and_reproducible():
    _, mask, h, d, _ = _batch(9, 6, 50)
    a = token_scores("random", entropy=h, divergence=d, response_mask=mask,
                     generator=torch.Generator().manual_seed(1))
    b = token_scores("random", entropy=h, divergence=d, response_mask=mask,
                     generator=torch.Generator().manual_seed(1))
    c = token_scores("random", response_mask=mask, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool((a[~mask] == 0).all())
    vals = a[mask]
    assert bool(((vals >= 0) & (vals < 1)).all())
    assert abs(vals.mean().item() - 0.5) < 0.1  # ~ mean of U[0,1) over >= 50 draws


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_scores_half_precision_inputs(dtype):
    _, mask, h, d, _ = _batch(10, 3, 8)
    out = token_scores("soft_or", entropy=h.to(dtype), divergence=d.to(dtype), response_mask=mask)
    expected = token_scores("soft_or", entropy=h.to(dtype).float(), divergence=d.to(dtype).float(),
                            response_mask=mask)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-6)


def test_token_scores_validation():
    mask = torch.ones(2, 3, dtype=torch.bool)
    h = torch.rand(2, 3)
    with pytest.raises(ValueError, match="requires divergence"):
        token_scores("soft_or", entropy=h, response_mask=mask)
    with pytest.raises(ValueError, match="requires entropy"):
        token_scores("entropy", divergence=h, response_mask=mask)
    with pytest.raises(ValueError, match="method='bogus'"):
        token_scores("bogus", entropy=h, divergence=h, response_mask=mask)
    with pytest.raises(ValueError, match=r"divergence has shape \(2, 4\) but response_mask has shape \(2, 3\)"):
        token_scores("soft_or", entropy=h, divergence=torch.rand(2, 4), response_mask=mask)
    bad = h.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="divergence contains 1 non-finite values at response positions"):
        token_scores("soft_or", entropy=h, divergence=bad, response_mask=mask)


@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("row, expected", [
    ([0.0, 1e-38, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]),  # spread whose reciprocal overflows float32
    ([0.0, 1e-45, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]),  # the smallest float32 spread
    ([3e-39, 4e-39, 5e-39, 3e-39], [0.0, 0.5, 1.0, 0.0]),
    ([-3e38, 3e38, 0.0, 1.5e38], [0.0, 1.0, 0.5, 0.75]),  # spread beyond float32
    ([3.4e38, -3.4e38, 3.4e38, 3.4e38], [1.0, 0.0, 1.0, 1.0]),
])
def test_minmax_is_exact_and_finite_for_tiny_and_huge_spreads(scope, row, expected):
    x = torch.tensor([row, [1.0, 2.0, 3.0, 5.0]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    out = minmax_normalize(x, mask, scope)
    assert bool(torch.isfinite(out).all())
    if scope == "sequence":
        assert out[0].tolist() == pytest.approx(expected, abs=1e-6)
        assert out[1].tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0])  # the ordinary row is unaffected
    else:  # one min/max over both rows: the batch's ends are 0 and 1, all within [0, 1]
        assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    # masked garbage at the extremes of float32 is ignored
    x_garbage = x.clone()
    x_garbage[1, 3] = -3.4e38
    mask_g = mask.clone()
    mask_g[1, 3] = False
    out_g = minmax_normalize(x_garbage, mask_g, scope)
    assert bool(torch.isfinite(out_g).all()) and out_g[1, 3].item() == 0.0


def test_soft_or_scores_of_a_near_deterministic_student_are_finite():
    h = torch.tensor([[0.0, 1e-39, 0.0, 0.0]])  # ~1e-38 nats / log|V|: the confident student
    d = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    for method in ("soft_or", "q3"):
        s = token_scores(method, entropy=h, divergence=d, response_mask=mask)
        assert bool(torch.isfinite(s).all())
    assert token_scores("soft_or", entropy=h, divergence=d, response_mask=mask)[0, 1].item() == 1.0


def test_minmax_ordinary_inputs_take_the_float32_path_unchanged():
    _, mask, h, _, _ = _batch(11, 4, 30)
    for scope in ("batch", "sequence"):
        out = minmax_normalize(h, mask, scope)
        fm = mask.float()
        if scope == "batch":
            lo, hi = h[mask].min(), h[mask].max()
        else:
            lo = torch.where(mask, h, float("inf")).amin(1, keepdim=True)
            hi = torch.where(mask, h, float("-inf")).amax(1, keepdim=True)
        expected = ((h - lo) * (1.0 / (hi - lo))).clamp(0, 1) * fm
        assert torch.equal(out, expected)


def test_token_scores_generator_must_be_a_generator():
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        token_scores("random", response_mask=mask, generator=1)


def test_float_mask_with_nan_raises_naming_the_mask():
    x = torch.rand(2, 3)
    mask = torch.tensor([[1.0, float("nan"), 0.0], [1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="response_mask contains 1 NaN/inf values"):
        minmax_normalize(x, mask)
    assert minmax_normalize(x, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])).shape == (2, 3)

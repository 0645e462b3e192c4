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

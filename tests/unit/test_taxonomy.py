"""Taxonomy (Section 4, Table 1): quadrant classification and quadrant statistics."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tip_verl import classify_quadrants, quadrant_stats
from tip_verl.taxonomy import resolve_thresholds

try:
    from . import reference_impl as ref
except ImportError:  # tests/unit is not a package
    import reference_impl as ref


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), seq=st.integers(1, 14),
       te=st.floats(0, 1), td=st.floats(0, 1), mode=st.sampled_from(["quantile", "absolute"]),
       coarse=st.booleans())
def test_classify_quadrants_matches_reference(seed, batch, seq, te, td, mode, coarse):
    g = torch.Generator().manual_seed(seed)
    mask = ref.ragged_mask(batch, seq, g, empty_rows=(0,) if batch > 2 else ())
    h = torch.rand(batch, seq, generator=g)
    d = torch.rand(batch, seq, generator=g) * 2
    if coarse:  # ties at the threshold exercise the strict ">" rule
        h, d = (h * 4).round() / 4, (d * 2).round() / 2
    q = classify_quadrants(torch.where(mask, h, torch.tensor(float("nan"))), d, mask,
                           entropy_threshold=te, divergence_threshold=td, threshold_mode=mode)
    assert q.dtype == torch.int64
    assert q.tolist() == ref.classify(h.tolist(), d.tolist(), mask.tolist(), te, td, mode)
    assert bool((q[~mask] == 0).all()) and bool(((q[mask] >= 1) & (q[mask] <= 4)).all())


def test_quadrant_codes_and_strict_threshold():
    h = torch.tensor([[0.9, 0.9, 0.1, 0.1, 0.5, 0.7]])
    d = torch.tensor([[2.0, 0.1, 2.0, 0.1, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    q = classify_quadrants(h, d, mask, entropy_threshold=0.5, divergence_threshold=0.5, threshold_mode="absolute")
    # Q1 high/high, Q2 high h / low δ, Q3 low h / high δ, Q4 low/low; exactly-at-threshold is "low"
    assert q.tolist() == [[1, 2, 3, 4, 4, 0]]


def test_quantile_thresholds_default_to_median_split_and_match_torch_quantile():
    g = torch.Generator().manual_seed(1)
    h = torch.rand(8, 64, generator=g)
    d = torch.rand(8, 64, generator=g)
    mask = ref.ragged_mask(8, 64, g)
    te, td = resolve_thresholds(h, d, mask)
    assert te == pytest.approx(torch.quantile(h[mask], 0.5).item(), abs=1e-6)
    assert td == pytest.approx(torch.quantile(d[mask], 0.5).item(), abs=1e-6)
    for lvl in (0.0, 0.1, 0.37, 0.9, 1.0):
        te, _ = resolve_thresholds(h, d, mask, entropy_threshold=lvl)
        assert te == pytest.approx(torch.quantile(h[mask], lvl).item(), abs=1e-6)
    q = classify_quadrants(h, d, mask)
    high_h = ((q == 1) | (q == 2)).sum().item()
    n = int(mask.sum())
    assert high_h == n // 2  # distinct values: exactly half are strictly above the median (n even or odd)


def test_empty_batch_classifies_nothing():
    mask = torch.zeros(2, 4, dtype=torch.bool)
    q = classify_quadrants(torch.rand(2, 4), torch.rand(2, 4), mask)
    assert q.tolist() == [[0] * 4] * 2
    stats = quadrant_stats(q, torch.rand(2, 4), mask, keep_mask=mask)
    assert set(stats.values()) == {0.0} and len(stats) == 12


def test_threshold_validation():
    h = torch.rand(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="entropy_threshold=1.5"):
        classify_quadrants(h, h, mask, entropy_threshold=1.5)
    with pytest.raises(ValueError, match="divergence_threshold=-0.1"):
        classify_quadrants(h, h, mask, divergence_threshold=-0.1)
    with pytest.raises(ValueError, match="threshold_mode='median'"):
        classify_quadrants(h, h, mask, threshold_mode="median")
    # absolute thresholds may lie outside [0, 1]
    q = classify_quadrants(h, h, mask, divergence_threshold=-0.1, threshold_mode="absolute")
    assert bool(((q == 1) | (q == 3)).all())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), seq=st.integers(1, 14), with_keep=st.booleans())
def test_quadrant_stats_match_reference(seed, batch, seq, with_keep):
    g = torch.Generator().manual_seed(seed)
    mask = ref.ragged_mask(batch, seq, g)
    h = torch.rand(batch, seq, generator=g)
    d = torch.randn(batch, seq, generator=g)  # signed (k1-like): shares use |δ|
    q = classify_quadrants(h, d, mask)
    keep = (torch.rand(batch, seq, generator=g) < 0.5) & mask if with_keep else None
    stats = quadrant_stats(q, d, mask, keep_mask=keep)
    expected = ref.quadrant_stats(q.tolist(), d.tolist(), mask.tolist(), keep.tolist() if keep is not None else None)
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert isinstance(stats[key], float)
        assert stats[key] == pytest.approx(value, abs=1e-9)
    assert sum(stats[f"q{i}_share"] for i in range(1, 5)) == pytest.approx(1.0)
    assert sum(stats[f"q{i}_divergence_share"] for i in range(1, 5)) == pytest.approx(1.0)
    if keep is not None and bool(keep.any()):
        assert sum(stats[f"q{i}_kept_share"] for i in range(1, 5)) == pytest.approx(1.0)


def test_quadrant_stats_ignores_masked_codes_and_validates():
    mask = torch.tensor([[True, True, False]])
    q = torch.tensor([[1, 3, 7]])  # code 7 at a masked position is ignored
    stats = quadrant_stats(q, torch.tensor([[1.0, 3.0, 100.0]]), mask)
    assert stats["q1_share"] == 0.5 and stats["q3_share"] == 0.5
    assert stats["q3_divergence_share"] == 0.75 and "q1_kept_share" not in stats
    with pytest.raises(ValueError, match="quadrants contains 1 codes outside 1..4"):
        quadrant_stats(torch.tensor([[1, 0, 2]]), torch.rand(1, 3), mask)
    with pytest.raises(ValueError, match="quadrants contains 2 codes outside 1..4"):
        quadrant_stats(torch.tensor([[-1, 300, 2]]), torch.rand(1, 3), mask)
    with pytest.raises(ValueError, match="integer"):
        quadrant_stats(q.float(), torch.rand(1, 3), mask)


def test_numpy_thresholds_are_accepted():
    import numpy as np

    h, d = torch.tensor([[0.1, 0.9]]), torch.tensor([[0.2, 0.8]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert torch.equal(classify_quadrants(h, d, mask, entropy_threshold=np.float32(0.5), threshold_mode="absolute",
                                          divergence_threshold=np.float64(0.5)),
                       classify_quadrants(h, d, mask, entropy_threshold=0.5, divergence_threshold=0.5,
                                          threshold_mode="absolute"))

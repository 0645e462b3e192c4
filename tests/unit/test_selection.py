"""Selection: top-ρ (Eq. 6) and entropy-proportional sampling (App. A.2 / B.3)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tip_verl import SampledTokens, sample_tokens, select_tokens, token_scores

try:
    from . import reference_impl as ref
except ImportError:  # tests/unit is not a package
    import reference_impl as ref

RATIOS = st.sampled_from([0.05, 0.1, 0.2, 0.3, 1 / 3, 0.5, 0.7, 0.9, 1.0])


def _counts(mask, ratio, scope):
    m = mask.sum(1).tolist()
    if scope == "sequence":
        return [ref.keep_count(int(x), ratio) for x in m]
    return ref.keep_count(int(sum(m)), ratio)


# ------------------------------------------------------------------ select_tokens

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), seq=st.integers(1, 16), ratio=RATIOS,
       scope=st.sampled_from(["sequence", "batch"]), invert=st.booleans(), ties=st.booleans())
def test_select_tokens_matches_reference(seed, batch, seq, ratio, scope, invert, ties):
    g = torch.Generator().manual_seed(seed)
    mask = ref.ragged_mask(batch, seq, g, empty_rows=(1,) if batch > 2 else ())
    scores = torch.randn(batch, seq, generator=g)
    if ties:
        scores = scores.round()  # few distinct values -> ties straddle the threshold
    garbage = torch.where(mask, scores, torch.tensor(float("nan")))
    keep = select_tokens(garbage, mask, ratio, scope=scope, invert=invert)
    assert keep.dtype == torch.bool and keep.shape == mask.shape
    assert keep.tolist() == ref.select(scores.tolist(), mask.tolist(), ratio, scope, invert)
    assert not bool((keep & ~mask).any())
    if scope == "sequence":
        assert keep.sum(1).tolist() == _counts(mask, ratio, scope)
    else:
        assert int(keep.sum()) == _counts(mask, ratio, scope)


def test_invert_keeps_the_lowest_and_plain_keeps_the_highest():
    g = torch.Generator().manual_seed(0)
    mask = ref.ragged_mask(5, 20, g)
    scores = torch.rand(5, 20, generator=g)
    for invert in (False, True):
        keep = select_tokens(scores, mask, 0.3, invert=invert)
        for i in range(5):
            kept, dropped = scores[i][keep[i]], scores[i][mask[i] & ~keep[i]]
            if len(kept) and len(dropped):
                if invert:
                    assert kept.max() <= dropped.min()
                else:
                    assert kept.min() >= dropped.max()


def test_ratio_one_keeps_every_valid_token_and_holes_never_kept():
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0, 1]], dtype=torch.bool)
    scores = torch.arange(21.0).reshape(3, 7)
    for scope in ("sequence", "batch"):
        assert torch.equal(select_tokens(scores, mask, 1.0, scope=scope), mask)
        # the tool-output hole of row 0 (positions 2-3) carries the highest row scores after row end
        keep = select_tokens(scores, mask, 0.5, scope=scope)
        assert not bool(keep[0, 2:4].any()) and not bool(keep[1].any())


def test_empty_inputs_keep_nothing():
    scores = torch.rand(3, 5)
    none = torch.zeros(3, 5, dtype=torch.bool)
    for scope in ("sequence", "batch"):
        assert not bool(select_tokens(scores, none, 0.5, scope=scope).any())
        assert select_tokens(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool), 0.5, scope=scope).shape == (0, 4)
    one_row = none.clone()
    one_row[1, 2] = True  # a single valid token is always kept (max(1, floor(ρm)))
    assert select_tokens(scores, one_row, 0.01).nonzero().tolist() == [[1, 2]]


def test_all_equal_scores_break_ties_by_position():
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 0] = False
    keep = select_tokens(torch.full((2, 6), 0.25), mask, 0.5)
    assert keep.tolist() == [[True, True, True, False, False, False], [False, True, True, False, False, False]]
    keep_b = select_tokens(torch.full((2, 6), 0.25), mask, 0.5, scope="batch", invert=True)
    assert keep_b.nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [0, 4]]


def test_floor_epsilon_avoids_floating_error():
    # 0.3 * 10 = 2.9999999999999996 in floating point; the budget must still be 3 (Eq. 6)
    mask = torch.ones(1, 10, dtype=torch.bool)
    assert int(select_tokens(torch.rand(1, 10), mask, 0.3).sum()) == 3
    assert int(select_tokens(torch.rand(1, 10), mask, 0.7).sum()) == 7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_select_tokens_half_precision(dtype):
    g = torch.Generator().manual_seed(2)
    mask = ref.ragged_mask(4, 10, g)
    scores = torch.rand(4, 10, generator=g).to(dtype)
    keep = select_tokens(scores, mask, 0.4)
    assert keep.tolist() == ref.select(scores.float().tolist(), mask.tolist(), 0.4)


def test_select_tokens_validation():
    mask = torch.ones(2, 3, dtype=torch.bool)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            select_tokens(torch.rand(2, 3), mask, bad)
    with pytest.raises(ValueError, match="scope='row'"):
        select_tokens(torch.rand(2, 3), mask, 0.5, scope="row")
    with pytest.raises(ValueError, match="scores contains 2 non-finite values at response positions"):
        select_tokens(torch.tensor([[0.0, float("nan"), float("-inf")], [0.0, 0.0, 0.0]]), mask, 0.5)
    with pytest.raises(ValueError, match=r"scores has shape \(2, 4\) but response_mask has shape \(2, 3\)"):
        select_tokens(torch.rand(2, 4), mask, 0.5)


def test_blind_spot_low_entropy_high_divergence_token():
    """Prop. 2: entropy top-k drops a confident-but-wrong (Q3) token; Soft-OR and Q3 keep it."""
    h = torch.tensor([[0.90, 0.80, 0.70, 0.60, 0.05, 0.04, 0.03, 0.02]])
    d = torch.tensor([[0.30, 0.20, 0.10, 0.10, 2.50, 0.01, 0.02, 0.01]])  # token 4: Q3
    mask = torch.ones_like(h, dtype=torch.bool)
    kept = {}
    for method in ("entropy", "soft_or", "q3"):
        s = token_scores(method, entropy=h, divergence=d, response_mask=mask, forward_divergence=d)
        kept[method] = select_tokens(s, mask, 0.5)
        assert int(kept[method].sum()) == 4
    assert not bool(kept["entropy"][0, 4])
    assert bool(kept["soft_or"][0, 4]) and bool(kept["q3"][0, 4])
    # Soft-OR keeps the high-entropy ranking otherwise (tokens 0-2 stay in)
    assert bool(kept["soft_or"][0, :3].all())


# ------------------------------------------------------------------ sample_tokens: without replacement

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), seq=st.integers(1, 16), ratio=RATIOS,
       scope=st.sampled_from(["sequence", "batch"]))
def test_without_replacement_counts_equal_select_tokens(seed, batch, seq, ratio, scope):
    g = torch.Generator().manual_seed(seed)
    mask = ref.ragged_mask(batch, seq, g, empty_rows=(0,) if batch > 1 else ())
    w = torch.rand(batch, seq, generator=g)
    w[w < 0.2] = 0.0  # some zero weights
    out = sample_tokens(w, mask, ratio, generator=g, mode="without_replacement", scope=scope)
    assert isinstance(out, SampledTokens) and out.inclusion_prob is None
    keep = out.keep_mask
    assert not bool((keep & ~mask).any())
    ref_keep = select_tokens(w, mask, ratio, scope=scope)
    if scope == "sequence":
        assert keep.sum(1).tolist() == ref_keep.sum(1).tolist()
    else:
        assert int(keep.sum()) == int(ref_keep.sum())
    # zero-weight tokens only when needed: #kept zero-weight = max(0, count - #positive)
    pos = mask & (w > 0)
    groups = [(keep[i], pos[i], ref_keep[i]) for i in range(batch)] if scope == "sequence" else [(keep, pos, ref_keep)]
    for k, p, r in groups:
        assert int((k & ~p).sum()) == max(0, int(r.sum()) - int(p.sum()))


def test_without_replacement_single_draw_is_proportional_to_weight():
    """With a budget of 1 token, P(token t) = w_t / Σw; checked over 20k independent rows."""
    rows = 20_000
    w = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0]).expand(rows, 5)
    mask = torch.ones(rows, 5, dtype=torch.bool)
    keep = sample_tokens(w, mask, 0.1, generator=torch.Generator().manual_seed(0), mode="without_replacement").keep_mask
    assert keep.sum(1).eq(1).all()
    freq = keep.double().mean(0)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0], dtype=torch.float64)
    se = (p * (1 - p) / rows).sqrt()
    # 5 binomial standard errors per cell (false-failure probability < 1e-5 overall)
    assert bool(((freq - p).abs() <= 5 * se + 1e-12).all()), (freq, p)


def test_sampling_is_reproducible_with_seeded_generator():
    g = torch.Generator().manual_seed(3)
    mask = ref.ragged_mask(4, 30, g)
    w = torch.rand(4, 30, generator=g)
    for mode in ("without_replacement", "poisson"):
        a = sample_tokens(w, mask, 0.4, generator=torch.Generator().manual_seed(9), mode=mode)
        b = sample_tokens(w, mask, 0.4, generator=torch.Generator().manual_seed(9), mode=mode)
        assert torch.equal(a.keep_mask, b.keep_mask)


# ------------------------------------------------------------------ sample_tokens: poisson

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), seq=st.integers(1, 16), ratio=RATIOS,
       scope=st.sampled_from(["sequence", "batch"]), skew=st.sampled_from([1, 3, 8]))
def test_poisson_inclusion_probabilities_match_water_filling_reference(seed, batch, seq, ratio, scope, skew):
    g = torch.Generator().manual_seed(seed)
    mask = ref.ragged_mask(batch, seq, g, empty_rows=(0,) if batch > 2 else ())
    w = torch.rand(batch, seq, generator=g) ** skew  # skewed weights force capping at π = 1
    w[torch.rand(batch, seq, generator=g) < 0.15] = 0.0
    out = sample_tokens(w, mask, ratio, generator=g, mode="poisson", scope=scope)
    pi = out.inclusion_prob
    expected = ref.poisson_pi(w.tolist(), mask.tolist(), ratio, scope)
    for ra, rb in zip(pi.tolist(), expected):
        for a, b in zip(ra, rb):
            assert abs(a - b) <= 2e-5, (a, b)
    assert bool(((pi >= 0) & (pi <= 1)).all()) and bool((pi[~mask] == 0).all())
    assert not bool((out.keep_mask & ~mask).any())
    assert not bool((out.keep_mask & (pi == 0)).any())
    target = _counts(mask, ratio, scope)
    if scope == "sequence":
        assert torch.allclose(pi.sum(1).double(), torch.tensor(target, dtype=torch.float64), atol=1e-4)
    else:
        assert abs(pi.sum().item() - target) < 1e-3


def test_poisson_probabilities_are_proportional_below_the_cap():
    w = torch.tensor([[0.01, 0.02, 0.04, 0.08, 5.0, 0.0, 0.03, 0.02]])
    mask = torch.ones_like(w, dtype=torch.bool)
    pi = sample_tokens(w, mask, 0.5, generator=torch.Generator(), mode="poisson").inclusion_prob
    # budget 4: c = 4/5.2 caps token 4; c = 3/0.2 = 15 then caps token 3 (0.08·15 > 1); c = 2/0.12
    assert pi[0, 4].item() == 1.0 and pi[0, 3].item() == 1.0
    assert pi[0, 5].item() == 0.0  # zero weight, count reachable without it
    assert pi[0, 2].item() == pytest.approx(0.04 * 2 / 0.12, rel=1e-5)
    uncapped = [0, 1, 2, 6, 7]
    ratios = pi[0, uncapped] / w[0, uncapped]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-5)
    assert pi.sum().item() == pytest.approx(4.0, abs=1e-5)


def test_poisson_infeasible_spreads_shortfall_over_zero_weights():
    w = torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.0, 0.0]])  # one positive weight, budget 3
    mask = torch.ones_like(w, dtype=torch.bool)
    pi = sample_tokens(w, mask, 0.5, generator=torch.Generator(), mode="poisson").inclusion_prob
    assert torch.allclose(pi, torch.tensor([[1.0, 0.4, 0.4, 0.4, 0.4, 0.4]]))
    pi1 = sample_tokens(w, mask, 1.0, generator=torch.Generator(), mode="poisson").inclusion_prob
    assert pi1.tolist() == [[1.0] * 6]


def test_poisson_importance_weighted_sum_is_unbiased():
    """E[Σ_kept g/π] = Σ g over many independent draws (App. A.2); each row is one draw."""
    draws = 20_000
    g_vals = torch.tensor([3.0, -1.0, 0.5, 2.0, 0.25, 4.0, -2.0, 1.0, 0.0, 0.75])
    w = torch.tensor([0.9, 0.05, 0.3, 0.6, 0.02, 0.8, 0.4, 0.1, 0.2, 0.5])
    mask = torch.ones(draws, 10, dtype=torch.bool)
    mask[:, 8] = False  # a tool token: never kept, not part of the target sum
    out = sample_tokens(w.expand(draws, 10), mask, 0.3, generator=torch.Generator().manual_seed(0), mode="poisson")
    pi = out.inclusion_prob[0].double()
    assert torch.equal(out.inclusion_prob, out.inclusion_prob[0].expand(draws, 10))
    assert not bool(out.keep_mask[:, 8].any())
    keep = out.keep_mask.double()
    valid = mask[0].double()
    est = (keep * (g_vals.double() / pi.clamp_min(1e-30)) * valid).sum(1)
    target = (g_vals.double() * valid).sum().item()
    # Var of the Horvitz-Thompson sum under independent inclusion: Σ (1 - π)/π g² (Eq. 14 times m²)
    var = (((1 - pi) / pi.clamp_min(1e-30)) * g_vals.double() ** 2 * valid).sum().item()
    se = math.sqrt(var / draws)
    assert abs(est.mean().item() - target) < 5 * se, (est.mean().item(), target, se)
    # kept counts: mean Σπ (= 2 = floor(0.3 * 9)) and variance Σπ(1 - π)
    counts = out.keep_mask.sum(1).double()
    assert pi.sum().item() == pytest.approx(2.0, abs=1e-5)
    count_se = math.sqrt((pi * (1 - pi)).sum().item() / draws)
    assert abs(counts.mean().item() - 2.0) < 5 * count_se


def test_sample_tokens_validation():
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="weights contains 1 negative values"):
        sample_tokens(torch.tensor([[0.1, -0.2, 0.3]]), mask, 0.5, generator=None, mode="poisson")
    # negative garbage at a masked position is ignored
    ok = sample_tokens(torch.tensor([[0.1, -0.2, 0.3]]), torch.tensor([[True, False, True]]), 0.5,
                       generator=None, mode="poisson")
    assert ok.inclusion_prob[0, 1].item() == 0.0
    with pytest.raises(ValueError, match="mode='exact'"):
        sample_tokens(torch.rand(1, 3), mask, 0.5, generator=None, mode="exact")
    with pytest.raises(ValueError, match="weights contains 1 non-finite"):
        sample_tokens(torch.tensor([[0.1, float("nan"), 0.3]]), mask, 0.5, generator=None, mode="without_replacement")


@pytest.mark.parametrize("scale", [1.0, 1e30, 3e38])
def test_masked_positions_never_win_even_with_extreme_scores(scale):
    """Masked entries are pushed below every valid score arithmetically (or via ±inf for huge inputs)."""
    g = torch.Generator().manual_seed(5)
    mask = ref.ragged_mask(4, 12, g)
    scores = (torch.rand(4, 12, generator=g) * 2 - 1) * scale
    garbage = torch.where(mask, scores, torch.tensor(scale))  # masked garbage at the top of the range
    garbage_low = torch.where(mask, scores, torch.tensor(-scale))  # ... and at the bottom
    for s, invert in ((garbage, False), (garbage_low, True)):
        for scope in ("sequence", "batch"):
            keep = select_tokens(s, mask, 0.5, scope=scope, invert=invert)
            assert keep.tolist() == ref.select(scores.tolist(), mask.tolist(), 0.5, scope, invert)


def test_numpy_ratio_is_accepted_and_generator_is_checked():
    import numpy as np

    g = torch.Generator().manual_seed(0)
    scores, mask = torch.rand(3, 10, generator=g), torch.ones(3, 10, dtype=torch.bool)
    assert torch.equal(select_tokens(scores, mask, np.float32(0.5)), select_tokens(scores, mask, 0.5))
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        sample_tokens(scores, mask, 0.5, generator=1, mode="poisson")

"""Signals: normalised entropy (Eq. 2) and divergence estimators (Eq. 3) against python references."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Categorical, kl_divergence

from tip_verl import full_logits_divergences, normalized_entropy, sampled_token_divergence, topk_divergences

try:
    from . import reference_impl as ref
except ImportError:  # tests/unit is not a package
    import reference_impl as ref

ESTIMATORS = ("k1", "k3", "abs", "forward")


def _close(a, b, tol=1e-5):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            assert abs(x - y) <= tol * (1 + abs(y)), (x, y)


# ------------------------------------------------------------------ normalized_entropy

def test_normalized_entropy_divides_by_log_vocab_and_returns_float32():
    ent = torch.tensor([[0.0, math.log(50), math.log(100)]], dtype=torch.bfloat16)
    h = normalized_entropy(ent, 100)
    assert h.dtype == torch.float32
    expected = ent.float() / math.log(100)
    assert torch.allclose(h, expected)
    assert h[0, 2].item() == pytest.approx(1.0, abs=1e-2)  # bf16 rounding of log(100)


@pytest.mark.parametrize("bad", [1, 0, -5, 2.5, True])
def test_normalized_entropy_rejects_bad_vocab_size(bad):
    with pytest.raises(ValueError, match="vocab_size"):
        normalized_entropy(torch.ones(1, 2), bad)


# ------------------------------------------------------------------ sampled-token estimators

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), seq=st.integers(1, 12),
       estimator=st.sampled_from(ESTIMATORS))
def test_sampled_token_divergence_matches_reference(seed, batch, seq, estimator):
    g = torch.Generator().manual_seed(seed)
    mask = ref.ragged_mask(batch, seq, g, empty_rows=(0,) if batch > 2 else ())
    lp_s = -torch.rand(batch, seq, generator=g) * 6
    lp_t = -torch.rand(batch, seq, generator=g) * 6
    # garbage (NaN / inf) at masked positions must be ignored
    lp_t = torch.where(mask, lp_t, torch.tensor(float("nan")))
    lp_s = torch.where(mask, lp_s, torch.tensor(float("-inf")))
    out = sampled_token_divergence(lp_s, lp_t, mask, estimator)
    assert out.dtype == torch.float32 and out.shape == (batch, seq)
    expected = ref.sampled_divergence(lp_s.tolist(), lp_t.tolist(), mask.tolist(), estimator)
    _close(out.tolist(), expected)
    assert bool((out[~mask] == 0).all())
    if estimator != "k1":
        assert bool((out >= 0).all())


def test_sampled_estimators_are_unbiased_for_reverse_and_forward_kl():
    """E_{y~S}[k1] = E[k3] = KL(S||T) and E_{y~S}[r log r - (r - 1)] = KL(T||S)."""
    g = torch.Generator().manual_seed(0)
    p_s = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    p_t = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1])
    n = 200_000
    y = torch.multinomial(p_s, n, replacement=True, generator=g).reshape(1, n)
    lp_s, lp_t = p_s.log()[y], p_t.log()[y]
    mask = torch.ones(1, n, dtype=torch.bool)
    rev = kl_divergence(Categorical(probs=p_s), Categorical(probs=p_t)).item()
    fwd = kl_divergence(Categorical(probs=p_t), Categorical(probs=p_s)).item()
    for est, target in (("k1", rev), ("k3", rev), ("forward", fwd)):
        x = sampled_token_divergence(lp_s, lp_t, mask, est).double()
        se = x.std().item() / math.sqrt(n)
        # 5 standard errors: a false failure has probability < 1e-6 (CLT)
        assert abs(x.mean().item() - target) < 5 * se, (est, x.mean().item(), target, se)


def test_exp_based_estimators_are_clamped_and_finite():
    lp_s = torch.tensor([[0.0, -1000.0, -0.5]])
    lp_t = torch.tensor([[-1000.0, 0.0, -0.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    for est in ("k3", "forward"):
        out = sampled_token_divergence(lp_s, lp_t, mask, est)
        assert bool(torch.isfinite(out).all())
        assert out[0, 2].item() == 0.0  # equal log-probs -> zero divergence
    # log r clamped at +20: k3 = e^20 - 1 - 20
    k3 = sampled_token_divergence(lp_s, lp_t, mask, "k3")
    assert k3[0, 1].item() == pytest.approx(math.expm1(20.0) - 20.0, rel=1e-5)
    assert k3[0, 0].item() == pytest.approx(math.expm1(-20.0) + 20.0, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sampled_token_divergence_accepts_half_precision(dtype):
    g = torch.Generator().manual_seed(1)
    mask = ref.ragged_mask(3, 7, g)
    lp_s = (-torch.rand(3, 7, generator=g) * 4).to(dtype)
    lp_t = (-torch.rand(3, 7, generator=g) * 4).to(dtype)
    out = sampled_token_divergence(lp_s, lp_t, mask, "k3")
    assert out.dtype == torch.float32
    expected = ref.sampled_divergence(lp_s.float().tolist(), lp_t.float().tolist(), mask.tolist(), "k3")
    _close(out.tolist(), expected, tol=1e-4)


def test_nonfinite_at_valid_positions_raises_naming_tensor():
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    lp_s = torch.full((1, 4), -1.0)
    lp_t = torch.tensor([[float("nan"), float("inf"), float("-inf"), float("nan")]])
    with pytest.raises(ValueError, match=r"teacher_logprobs contains 3 non-finite values at response positions"):
        sampled_token_divergence(lp_s, lp_t, mask, "k3")
    with pytest.raises(ValueError, match="student_logprobs contains 1 non-finite"):
        sampled_token_divergence(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]), torch.zeros(1, 4), mask, "k1")


def test_shape_mismatch_and_bad_estimator_raise():
    with pytest.raises(ValueError, match=r"student_logprobs has shape \(2, 3\) but teacher_logprobs has shape \(2, 4\)"):
        sampled_token_divergence(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), "k1")
    with pytest.raises(ValueError, match=r"response_mask has shape \(2, 4\)"):
        sampled_token_divergence(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4), "k1")
    with pytest.raises(ValueError, match="estimator='k2'"):
        sampled_token_divergence(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), "k2")


# ------------------------------------------------------------------ top-k divergences

def _random_dists(batch, seq, vocab, g, temp=2.0):
    s_logits = torch.randn(batch, seq, vocab, generator=g) * temp
    t_logits = torch.randn(batch, seq, vocab, generator=g) * temp
    return s_logits, t_logits


def _categorical_kl(s_logits, t_logits):
    ps, pt = Categorical(logits=s_logits.double()), Categorical(logits=t_logits.double())
    return kl_divergence(ps, pt), kl_divergence(pt, ps)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4), seq=st.integers(1, 6),
       vocab=st.integers(2, 12), data=st.data())
def test_topk_divergences_match_reference(seed, batch, seq, vocab, data):
    k = data.draw(st.integers(1, vocab))
    g = torch.Generator().manual_seed(seed)
    s_logits, t_logits = _random_dists(batch, seq, vocab, g)
    mask = ref.ragged_mask(batch, seq, g)
    t_lp, ids = torch.log_softmax(t_logits, -1).topk(k, dim=-1)
    s_lp = torch.log_softmax(s_logits, -1).gather(-1, ids)
    rev, fwd = topk_divergences(t_lp, ids, s_lp, mask)
    rr, rf = ref.topk_divergences(t_lp.tolist(), s_lp.tolist(), mask.tolist())
    _close(rev.tolist(), rr, tol=1e-6)
    _close(fwd.tolist(), rf, tol=1e-6)
    assert bool((rev >= 0).all()) and bool((fwd >= 0).all())
    assert bool((rev[~mask] == 0).all()) and bool((fwd[~mask] == 0).all())


def test_topk_with_full_vocab_equals_exact_kl():
    g = torch.Generator().manual_seed(3)
    vocab = 16
    s_logits, t_logits = _random_dists(3, 5, vocab, g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    # ids in a shuffled (not sorted) order: the order of the support must not matter
    ids = torch.stack([torch.randperm(vocab, generator=g) for _ in range(15)]).reshape(3, 5, vocab)
    t_lp = torch.log_softmax(t_logits, -1).gather(-1, ids)
    s_lp = torch.log_softmax(s_logits, -1).gather(-1, ids)
    rev, fwd = topk_divergences(t_lp, ids, s_lp, mask)
    exact_rev, exact_fwd = _categorical_kl(s_logits, t_logits)
    assert torch.allclose(rev.double(), exact_rev, atol=1e-5, rtol=1e-4)
    assert torch.allclose(fwd.double(), exact_fwd, atol=1e-5, rtol=1e-4)


def test_topk_tail_bucket_is_a_lower_bound_of_exact_kl():
    """Collapsing the tail is a coarsening, so by the data-processing inequality KL_topk <= KL."""
    g = torch.Generator().manual_seed(4)
    s_logits, t_logits = _random_dists(2, 6, 20, g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    t_lp, ids = torch.log_softmax(t_logits, -1).topk(5, dim=-1)
    s_lp = torch.log_softmax(s_logits, -1).gather(-1, ids)
    rev, fwd = topk_divergences(t_lp, ids, s_lp, mask)
    exact_rev, exact_fwd = _categorical_kl(s_logits, t_logits)
    assert bool((rev.double() <= exact_rev + 1e-5).all())
    assert bool((fwd.double() <= exact_fwd + 1e-5).all())
    assert bool((rev > 0).all())


def test_topk_validation():
    mask = torch.ones(2, 3, dtype=torch.bool)
    lp = torch.log_softmax(torch.zeros(2, 3, 4), -1)
    ids = torch.arange(4).expand(2, 3, 4)
    with pytest.raises(ValueError, match="teacher_topk_ids must be an integer"):
        topk_divergences(lp, ids.float(), lp, mask)
    with pytest.raises(ValueError, match=r"teacher_topk_logprobs has shape \(2, 3, 4\) but teacher_topk_ids has shape \(2, 3, 3\)"):
        topk_divergences(lp, ids[..., :3], lp, mask)
    with pytest.raises(ValueError, match="first two dimensions must match"):
        topk_divergences(lp, ids, lp, torch.ones(2, 4, dtype=torch.bool))
    bad = lp.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="student_logprobs_at_ids contains 1 non-finite"):
        topk_divergences(lp, ids, bad, mask)
    # ... but the same garbage at a masked position is ignored
    mask[1, 2] = False
    rev, fwd = topk_divergences(lp, ids, bad, mask)
    assert bool(torch.isfinite(rev).all()) and rev[1, 2].item() == 0.0


def _topk_case(k=4, vocab=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    s_logits, t_logits = _random_dists(2, 3, vocab, g)
    t_lp, ids = torch.log_softmax(t_logits, -1).topk(k, dim=-1)
    s_lp = torch.log_softmax(s_logits, -1).gather(-1, ids)
    return t_lp, ids, s_lp, torch.ones(2, 3, dtype=torch.bool)


def test_topk_rejects_k0_duplicated_out_of_range_ids_and_positive_logprobs():
    t_lp, ids, s_lp, mask = _topk_case()
    with pytest.raises(ValueError, match=r"teacher_topk_logprobs has shape \(2, 3, 0\): k=0 top-k entries per "
                                         r"token; k must be >= 1"):
        topk_divergences(t_lp[..., :0], ids[..., :0], s_lp[..., :0], mask)
    dup = ids.clone()
    dup[1, 2, 3] = dup[1, 2, 0]
    with pytest.raises(ValueError, match="teacher_topk_ids repeats an id within the top-k at 1 response positions"):
        topk_divergences(t_lp, dup, s_lp, mask)
    far = ids.clone()
    far[0, 1, 2] = 10
    with pytest.raises(ValueError, match=r"teacher_topk_ids has 1 ids outside \[0, vocab_size=10\) at response"):
        topk_divergences(t_lp, far, s_lp, mask, vocab_size=10)
    topk_divergences(t_lp, far, s_lp, mask)  # without a vocab size only negative ids are out of range
    far[0, 1, 2] = -1
    with pytest.raises(ValueError, match="teacher_topk_ids has 1 ids below 0 at response positions"):
        topk_divergences(t_lp, far, s_lp, mask)
    with pytest.raises(ValueError, match=r"vocab_size=1 is invalid: must be an int >= 2"):
        topk_divergences(t_lp, ids, s_lp, mask, vocab_size=1)
    pos = s_lp.clone()
    pos[0, 0, 1] = 0.5
    with pytest.raises(ValueError, match=r"student_logprobs_at_ids has 1 log-probabilities above 0 at response "
                                         r"positions \(max 0.5\); log-probs must be <= 0"):
        topk_divergences(t_lp, ids, pos, mask)
    # rounding above 0 is tolerated; everything above is ignored at masked positions
    near = t_lp.clone()
    near[..., 0] = 1e-6
    near[..., 1:] = -30.0
    topk_divergences(near, ids, s_lp, mask)
    # duplicated / out-of-range ids and positive log-probs at masked positions are ignored
    m = torch.tensor([[False, True, True], [True, True, False]])
    garbage_ids = dup.clone()
    garbage_ids[0, 0, 0] = 99
    garbage_s = s_lp.clone()
    garbage_s[0, 0, 1] = 0.5
    garbage_s[1, 2] = 3.0
    rev, _ = topk_divergences(t_lp, garbage_ids, garbage_s, m, vocab_size=np.int64(10))
    assert rev[0, 0].item() == 0.0 and rev[1, 2].item() == 0.0 and bool(torch.isfinite(rev).all())


def test_topk_rejects_top_k_mass_above_one():
    t_lp, ids, s_lp, mask = _topk_case()
    twice = t_lp + math.log(2.0)  # unnormalised: twice the mass (still <= 0 for these draws)
    twice = twice.clamp_max(0.0)
    with pytest.raises(ValueError, match=r"teacher_topk_logprobs: the top-k probabilities sum to more than 1 at "
                                         r"\d+ response positions"):
        topk_divergences(twice, None, s_lp, mask)


def test_topk_neg_inf_is_probability_zero_when_both_sides_agree():
    t_lp, ids, s_lp, mask = _topk_case(k=5)
    t0, s0 = t_lp.clone(), s_lp.clone()
    t0[0, 1, 4] = s0[0, 1, 4] = float("-inf")
    rev, fwd = topk_divergences(t0, ids, s0, mask)
    assert bool(torch.isfinite(rev).all()) and bool(torch.isfinite(fwd).all())
    # the same as the top-4 without that entry: probability 0 adds nothing, the tails are unchanged
    r4, f4 = topk_divergences(t0[0:1, 1:2, :4], ids[0:1, 1:2, :4], s0[0:1, 1:2, :4], mask[0:1, 1:2])
    assert rev[0, 1].item() == pytest.approx(r4.item(), rel=1e-6)
    assert fwd[0, 1].item() == pytest.approx(f4.item(), rel=1e-6)
    # masked -inf and NaN garbage is ignored
    m = mask.clone()
    m[1, 0] = False
    t_g = t0.clone()
    t_g[1, 0] = float("-inf")
    rev_g, _ = topk_divergences(t_g, ids, s0, m)
    assert rev_g[1, 0].item() == 0.0 and torch.equal(rev_g[0], rev[0])


def test_topk_neg_inf_on_one_side_only_makes_a_kl_infinite_and_raises():
    t_lp, ids, s_lp, mask = _topk_case()
    t0 = t_lp.clone()
    t0[1, 1, 3] = float("-inf")
    with pytest.raises(ValueError, match=r"teacher_topk_logprobs is -inf \(probability 0\) at 1 entries where "
                                         r"student_logprobs_at_ids is not: KL\(S\|\|T\) would be infinite"):
        topk_divergences(t0, ids, s_lp, mask)
    s0 = s_lp.clone()
    s0[0, 2, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"student_logprobs_at_ids is -inf \(probability 0\) at 1 entries where "
                                         r"teacher_topk_logprobs is not: KL\(T\|\|S\) would be infinite"):
        topk_divergences(t_lp, ids, s0, mask)


# ------------------------------------------------------------------ full-logits divergences

def test_full_logits_divergences_match_categorical_kl_and_chunking():
    g = torch.Generator().manual_seed(5)
    n, vocab = 23, 50
    s_logits = torch.randn(n, vocab, generator=g) * 3
    t_logits = torch.randn(n, vocab, generator=g) * 3
    exact_rev, exact_fwd = _categorical_kl(s_logits, t_logits)
    exact_ent = Categorical(logits=s_logits.double()).entropy()
    results = [full_logits_divergences(s_logits, t_logits, chunk_size=c) for c in (1, 7, n, 4096)]
    rev, fwd, ent = results[0]
    assert torch.allclose(rev.double(), exact_rev, atol=1e-5, rtol=1e-4)
    assert torch.allclose(fwd.double(), exact_fwd, atol=1e-5, rtol=1e-4)
    assert torch.allclose(ent.double(), exact_ent, atol=1e-5, rtol=1e-4)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, atol=1e-6)
    row = ref.full_kl_row(s_logits[3].tolist(), t_logits[3].tolist())
    assert rev[3].item() == pytest.approx(row[0], rel=1e-4)
    assert fwd[3].item() == pytest.approx(row[1], rel=1e-4)
    assert ent[3].item() == pytest.approx(row[2], rel=1e-4)


def test_full_logits_3d_with_mask_bf16_and_no_grad():
    g = torch.Generator().manual_seed(6)
    s_logits = (torch.randn(3, 5, 11, generator=g) * 2).requires_grad_()
    t_logits = torch.randn(3, 5, 11, generator=g) * 2
    mask = ref.ragged_mask(3, 5, g, empty_rows=(1,))
    t_garbage = torch.where(mask.unsqueeze(-1), t_logits, torch.tensor(float("nan")))
    rev, fwd, ent = full_logits_divergences(s_logits, t_garbage, mask, chunk_size=2)
    assert rev.shape == (3, 5) and not rev.requires_grad
    exact_rev, exact_fwd = _categorical_kl(s_logits.detach(), t_logits)
    assert torch.allclose(rev.double(), torch.where(mask, exact_rev, 0.0), atol=1e-5, rtol=1e-4)
    assert torch.allclose(fwd.double(), torch.where(mask, exact_fwd, 0.0), atol=1e-5, rtol=1e-4)
    assert bool((ent[~mask] == 0).all())
    # bf16 logits are computed in float32 (log_softmax dtype) and agree with the float32 path
    rb, fb, eb = full_logits_divergences(s_logits.detach().bfloat16(), t_logits.bfloat16(), mask)
    r32, f32_, e32 = full_logits_divergences(s_logits.detach().bfloat16().float(), t_logits.bfloat16().float(), mask)
    assert rb.dtype == torch.float32
    assert torch.allclose(rb, r32, atol=1e-5) and torch.allclose(eb, e32, atol=1e-5)


def test_full_logits_neg_inf_logits_are_zero_probability():
    s = torch.tensor([[0.0, 1.0, float("-inf")]])
    t = torch.tensor([[0.5, 0.0, float("-inf")]])
    rev, fwd, ent = full_logits_divergences(s, t)
    r2, f2, e2 = full_logits_divergences(s[:, :2], t[:, :2])
    assert torch.allclose(rev, r2) and torch.allclose(fwd, f2) and torch.allclose(ent, e2)


def test_full_logits_validation():
    s = torch.zeros(4, 6)
    bad = s.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits contains 1 non-finite"):
        full_logits_divergences(s, bad)
    mask = torch.tensor([True, True, False, True])
    rev, _, _ = full_logits_divergences(s, bad, mask)  # NaN row is masked: ignored
    assert rev.tolist() == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="chunk_size"):
        full_logits_divergences(s, s, chunk_size=0)
    with pytest.raises(ValueError, match=r"student_logits has shape \(4, 6\) but teacher_logits has shape \(4, 5\)"):
        full_logits_divergences(s, s[:, :5])
    with pytest.raises(ValueError, match="leading shape"):
        full_logits_divergences(s, s, torch.ones(3, dtype=torch.bool))


def test_full_logits_neg_inf_on_one_side_only_raises_like_topk():
    s = torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, float("-inf")]])
    t = torch.tensor([[0.5, 0.0, float("-inf")], [0.5, 0.0, 2.0]])
    with pytest.raises(ValueError, match=r"teacher_logits is -inf \(probability 0\) at 1 entries where "
                                         r"student_logits is not: KL\(S\|\|T\) would be infinite"):
        full_logits_divergences(s, t)
    with pytest.raises(ValueError, match=r"student_logits is -inf \(probability 0\) at 1 entries where "
                                         r"teacher_logits is not: KL\(T\|\|S\) would be infinite"):
        full_logits_divergences(s[1:], t[1:])
    rev, fwd, _ = full_logits_divergences(s, t, torch.tensor([False, False]))  # masked rows: ignored
    assert rev.tolist() == [0.0, 0.0]


def test_full_logits_and_topk_agree_on_a_shared_zero():
    """-inf on both sides at the same token: both paths give the same finite KLs."""
    s = torch.tensor([[[0.0, 1.0, float("-inf"), -0.5]]])
    t = torch.tensor([[[0.5, 0.0, float("-inf"), 0.3]]])
    rev, fwd, _ = full_logits_divergences(s, t)
    ids = torch.arange(4).reshape(1, 1, 4)
    r_k, f_k = topk_divergences(torch.log_softmax(t, -1), ids, torch.log_softmax(s, -1), torch.ones(1, 1))
    assert bool(torch.isfinite(rev).all()) and rev.item() == pytest.approx(r_k.item(), rel=1e-5, abs=1e-7)
    assert fwd.item() == pytest.approx(f_k.item(), rel=1e-5, abs=1e-7)


def test_numpy_integers_are_accepted_as_ints():
    e = torch.tensor([[1.0, 2.0]])
    assert torch.equal(normalized_entropy(e, np.int64(50)), normalized_entropy(e, 50))
    s = torch.randn(3, 5)
    assert torch.equal(full_logits_divergences(s, s, chunk_size=np.int32(2))[0], torch.zeros(3))
    with pytest.raises(ValueError, match="vocab_size=2.5 is invalid"):
        normalized_entropy(e, 2.5)

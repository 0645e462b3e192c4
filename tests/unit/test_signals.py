"""Signals: normalised entropy (Eq. 2) and divergence estimators (Eq. 3) against python references."""

import math

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

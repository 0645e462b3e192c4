"""select_for_batch: the one call per training step (signals -> scores -> selection -> taxonomy -> metrics)."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import tip_verl
from tip_verl import (METHODS, TIPConfig, TIPSelection, classify_quadrants, sample_tokens, sampled_token_divergence,
                      select_for_batch, select_tokens, token_scores, topk_divergences)

try:
    from . import reference_impl as ref
except ImportError:  # tests/unit is not a package
    import reference_impl as ref

VOCAB = 64
BASE_KEYS = {"tip/kept_fraction", "tip/kept_count", "tip/valid_count", "tip/entropy_mean", "tip/divergence_mean",
             "tip/kept_entropy_mean", "tip/kept_divergence_mean", "tip/score_threshold"}
QUAD_KEYS = {f"tip/q{i}_{s}" for i in range(1, 5) for s in ("share", "kept_share", "divergence_share")}


def _inputs(seed=0, batch=6, seq=40, topk=None, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    mask = ref.ragged_mask(batch, seq, g, empty_rows=empty_rows)
    s_logits = torch.randn(batch, seq, VOCAB, generator=g) * 2
    t_logits = torch.randn(batch, seq, VOCAB, generator=g) * 2
    ls, lt = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
    y = torch.distributions.Categorical(logits=s_logits).sample()
    kw = dict(entropy_nats=-(ls.exp() * ls).sum(-1), vocab_size=VOCAB,
              student_logprobs=ls.gather(-1, y[..., None])[..., 0],
              teacher_logprobs=lt.gather(-1, y[..., None])[..., 0], response_mask=mask)
    # garbage at masked positions (padding / tool tokens) must be ignored
    kw["teacher_logprobs"] = torch.where(mask, kw["teacher_logprobs"], torch.tensor(float("nan")))
    if topk:
        t_top, ids = lt.topk(topk, dim=-1)
        kw.update(teacher_topk_logprobs=t_top, teacher_topk_ids=ids, student_topk_logprobs=ls.gather(-1, ids))
    return kw


def _cfg(method, **kw):
    if method == "all":
        kw.setdefault("ratio", 1.0)
    return TIPConfig(method=method, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_consistent_selection_and_metrics(method):
    kw = _inputs(seed=1, empty_rows=(2,))
    mask = kw["response_mask"]
    sel = select_for_batch(_cfg(method), **kw)
    assert isinstance(sel, TIPSelection)
    assert sel.keep_mask.dtype == torch.bool and not bool((sel.keep_mask & ~mask).any())
    assert set(sel.metrics) >= BASE_KEYS | QUAD_KEYS
    assert all(k.startswith("tip/") and isinstance(v, float) and math.isfinite(v) for k, v in sel.metrics.items())
    for fam in ("share", "kept_share", "divergence_share"):
        assert sum(sel.metrics[f"tip/q{i}_{fam}"] for i in range(1, 5)) == pytest.approx(1.0)
    m = sel.metrics
    assert m["tip/valid_count"] == float(mask.sum()) and m["tip/kept_count"] == float(sel.keep_mask.sum())
    assert m["tip/kept_fraction"] == pytest.approx(m["tip/kept_count"] / m["tip/valid_count"])
    assert sel.quadrants.dtype == torch.int64 and bool((sel.quadrants[~mask] == 0).all())
    for t in (sel.entropy, sel.divergence, sel.scores):
        assert t.dtype == torch.float32 and bool((t[~mask] == 0).all()) and bool(torch.isfinite(t).all())
    assert sel.loss_weights is None
    assert m["tip/entropy_mean"] == pytest.approx(sel.entropy[mask].double().mean().item(), rel=1e-6)
    assert m["tip/kept_divergence_mean"] == pytest.approx(sel.divergence[sel.keep_mask].double().mean().item(), rel=1e-6)


def test_method_all_keeps_exactly_the_response_mask():
    kw = _inputs(seed=2)
    sel = select_for_batch(TIPConfig(method="all", ratio=1.0), **kw)
    assert torch.equal(sel.keep_mask, kw["response_mask"])
    assert sel.metrics["tip/kept_fraction"] == 1.0
    # informational scores are the Soft-OR scores
    assert torch.allclose(sel.scores, token_scores("soft_or", entropy=sel.entropy, divergence=sel.divergence,
                                                   response_mask=kw["response_mask"]))


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_kept_fraction_is_about_ratio(ratio, scope):
    kw = _inputs(seed=3, batch=8, seq=200)
    sel = select_for_batch(TIPConfig(ratio=ratio, selection_scope=scope), **kw)
    # floor per sequence loses < 1 token per row; the max(1, .) floor adds at most one
    rows = kw["response_mask"].shape[0]
    assert abs(sel.metrics["tip/kept_count"] - ratio * sel.metrics["tip/valid_count"]) <= rows
    assert sel.metrics["tip/kept_fraction"] == pytest.approx(ratio, abs=0.02)


def test_soft_or_pipeline_equals_manual_composition():
    kw = _inputs(seed=4)
    mask = kw["response_mask"]
    cfg = TIPConfig(method="soft_or", ratio=0.3, divergence="k1", norm_scope="sequence")
    sel = select_for_batch(cfg, **kw)
    h = torch.where(mask, kw["entropy_nats"] / math.log(VOCAB), 0.0)
    d = sampled_token_divergence(kw["student_logprobs"], kw["teacher_logprobs"], mask, "k1")
    assert torch.allclose(sel.entropy, h) and torch.equal(sel.divergence, d)
    s = token_scores("soft_or", entropy=h, divergence=d, response_mask=mask, scope="sequence")
    assert torch.equal(sel.keep_mask, select_tokens(s, mask, 0.3))
    assert torch.equal(sel.quadrants, classify_quadrants(h, d, mask))
    assert sel.metrics["tip/score_threshold"] == pytest.approx(s[sel.keep_mask].min().item())


def test_topk_signals_are_used_when_given():
    kw = _inputs(seed=5, topk=8)
    mask = kw["response_mask"]
    sel = select_for_batch(TIPConfig(method="q3", ratio=0.25), **kw)
    rev, fwd = topk_divergences(kw["teacher_topk_logprobs"], kw["teacher_topk_ids"], kw["student_topk_logprobs"], mask)
    assert torch.equal(sel.divergence, rev) and torch.equal(sel.forward_divergence, fwd)
    s = token_scores("q3", entropy=sel.entropy, divergence=rev, forward_divergence=fwd, response_mask=mask)
    assert torch.equal(sel.keep_mask, select_tokens(s, mask, 0.25))
    with pytest.raises(ValueError, match="must be given together"):
        select_for_batch(TIPConfig(), **{**kw, "student_topk_logprobs": None})


def test_sampled_forward_signal_when_no_topk():
    kw = _inputs(seed=6)
    sel = select_for_batch(TIPConfig(method="q3"), **kw)
    fwd = sampled_token_divergence(kw["student_logprobs"], kw["teacher_logprobs"], kw["response_mask"], "forward")
    assert torch.equal(sel.forward_divergence, fwd)


def test_poisson_importance_weights_are_inverse_inclusion_probabilities():
    kw = _inputs(seed=7, batch=6, seq=60)
    mask = kw["response_mask"]
    cfg = TIPConfig(method="entropy_sample", sampling_mode="poisson", importance_weighting=True, ratio=0.3, seed=11)
    sel = select_for_batch(cfg, **kw)
    expected = sample_tokens(sel.entropy, mask, 0.3, generator=torch.Generator().manual_seed(11), mode="poisson")
    assert torch.equal(sel.keep_mask, expected.keep_mask)
    lw = sel.loss_weights
    assert lw is not None and lw.dtype == torch.float32
    kept = sel.keep_mask
    assert torch.allclose(lw[kept], 1.0 / expected.inclusion_prob[kept])
    assert bool((lw[~kept] == 0).all()) and bool((lw[kept] >= 1).all())
    assert sel.metrics["tip/loss_weight_mean"] == pytest.approx(lw[kept].double().mean().item(), rel=1e-6)
    # without importance weighting: no loss weights
    cfg2 = TIPConfig(method="entropy_sample", sampling_mode="poisson", ratio=0.3)
    assert select_for_batch(cfg2, **kw).loss_weights is None


def test_entropy_sample_without_replacement_counts_match_topk():
    kw = _inputs(seed=8)
    sel = select_for_batch(TIPConfig(method="entropy_sample", ratio=0.4), **kw)
    topk = select_for_batch(TIPConfig(method="entropy", ratio=0.4), **kw)
    assert sel.keep_mask.sum(1).tolist() == topk.keep_mask.sum(1).tolist()


def test_generator_default_is_seeded_from_config_and_explicit_generator_advances():
    kw = _inputs(seed=9)
    cfg = TIPConfig(method="random", ratio=0.5, seed=3)
    a, b = select_for_batch(cfg, **kw), select_for_batch(cfg, **kw)
    assert torch.equal(a.keep_mask, b.keep_mask)
    gen = torch.Generator().manual_seed(3)
    c = select_for_batch(cfg, **kw, generator=gen)
    d = select_for_batch(cfg, **kw, generator=gen)
    assert torch.equal(a.keep_mask, c.keep_mask) and not torch.equal(c.keep_mask, d.keep_mask)


def test_invert_keeps_bottom_and_reports_max_threshold():
    kw = _inputs(seed=10)
    mask = kw["response_mask"]
    top = select_for_batch(TIPConfig(ratio=0.5), **kw)
    bot = select_for_batch(TIPConfig(ratio=0.5, invert=True), **kw)
    assert bot.metrics["tip/score_threshold"] == pytest.approx(bot.scores[bot.keep_mask].max().item())
    assert bot.metrics["tip/kept_entropy_mean"] < top.metrics["tip/kept_entropy_mean"]
    assert bool((bot.keep_mask & mask).sum() == bot.keep_mask.sum())


def test_blind_spot_in_the_pipeline():
    """A confident token the teacher strongly disagrees with: entropy drops it, soft_or / q3 keep it."""
    ent = torch.tensor([[2.0, 1.8, 1.6, 1.4, 0.02, 0.01, 0.03, 0.02]])
    lp_s = torch.tensor([[-1.0, -1.1, -1.2, -1.0, -0.01, -0.01, -0.02, -0.01]])
    lp_t = torch.tensor([[-1.2, -1.0, -1.3, -1.1, -6.00, -0.02, -0.02, -0.01]])  # token 4: Q3
    mask = torch.ones(1, 8, dtype=torch.bool)
    kw = dict(entropy_nats=ent, vocab_size=VOCAB, student_logprobs=lp_s, teacher_logprobs=lp_t, response_mask=mask)
    kept = {m: select_for_batch(TIPConfig(method=m, ratio=0.5), **kw).keep_mask[0, 4].item()
            for m in ("entropy", "soft_or", "q3")}
    assert kept == {"entropy": False, "soft_or": True, "q3": True}
    sel = select_for_batch(TIPConfig(method="soft_or", ratio=0.5), **kw)
    assert sel.quadrants[0, 4].item() == 3


def test_multi_turn_holes_are_never_kept_and_empty_batch_is_handled():
    kw = _inputs(seed=11)
    mask = kw["response_mask"].clone()
    mask[:, 10:14] = False  # a tool-output span in every row
    kw["response_mask"] = mask
    kw["entropy_nats"] = kw["entropy_nats"].clone()
    kw["entropy_nats"][:, 10:14] = 100.0  # huge garbage entropy on the tool tokens
    for method in ("entropy", "soft_or", "entropy_sample"):
        sel = select_for_batch(TIPConfig(method=method, ratio=0.9), **kw)
        assert not bool(sel.keep_mask[:, 10:14].any())
    empty = {**kw, "response_mask": torch.zeros_like(mask)}
    for method in METHODS:
        sel = select_for_batch(_cfg(method), **empty)
        assert not bool(sel.keep_mask.any())
        assert sel.metrics["tip/kept_fraction"] == 0.0 and sel.metrics["tip/valid_count"] == 0.0
        assert all(v == 0.0 for k, v in sel.metrics.items() if k.startswith("tip/q"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    kw = _inputs(seed=12)
    half = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    sel = select_for_batch(TIPConfig(), **half)
    assert sel.entropy.dtype == torch.float32 and sel.divergence.dtype == torch.float32
    assert sel.metrics["tip/kept_fraction"] == pytest.approx(0.5, abs=0.1)


def test_validation_errors_name_the_tensor():
    kw = _inputs(seed=13)
    mask = kw["response_mask"]
    bad = kw["student_logprobs"].clone()
    bad[mask.nonzero()[0].tolist()[0], mask.nonzero()[0].tolist()[1]] = float("inf")
    with pytest.raises(ValueError, match="student_logprobs contains 1 non-finite values at response positions"):
        select_for_batch(TIPConfig(), **{**kw, "student_logprobs": bad})
    ent = kw["entropy_nats"].clone()
    ent[mask] = float("nan")
    with pytest.raises(ValueError, match=f"entropy_nats contains {int(mask.sum())} non-finite"):
        select_for_batch(TIPConfig(), **{**kw, "entropy_nats": ent})
    with pytest.raises(ValueError, match=r"entropy_nats has shape \(6, 39\) but response_mask has shape \(6, 40\)"):
        select_for_batch(TIPConfig(), **{**kw, "entropy_nats": kw["entropy_nats"][:, :39]})
    with pytest.raises(TypeError, match="TIPConfig"):
        select_for_batch({"method": "soft_or"}, **kw)


def test_package_exports_and_no_verl_import():
    assert tip_verl.__version__ == "0.1.0"
    for name in ("normalized_entropy", "sampled_token_divergence", "topk_divergences", "full_logits_divergences",
                 "minmax_normalize", "token_scores", "select_tokens", "sample_tokens", "SampledTokens",
                 "classify_quadrants", "quadrant_stats", "TIPConfig", "TIPSelection", "select_for_batch", "METHODS"):
        assert name in tip_verl.__all__ and hasattr(tip_verl, name)
    code = ("import sys, tip_verl; bad = [m for m in sys.modules if m == 'verl' or m.startswith(('verl.', "
            "'tip_verl.verl_adapter', 'tip_verl.assets'))]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_zero_size_batches(shape):
    z = torch.zeros(shape)
    kw = dict(entropy_nats=z, vocab_size=VOCAB, student_logprobs=z, teacher_logprobs=z,
              response_mask=torch.zeros(shape, dtype=torch.bool))
    for method in METHODS:
        sel = select_for_batch(_cfg(method), **kw)
        assert sel.keep_mask.shape == shape and sel.metrics["tip/valid_count"] == 0.0
    cfg = TIPConfig(method="entropy_sample", sampling_mode="poisson", importance_weighting=True)
    sel = select_for_batch(cfg, **kw)
    assert sel.loss_weights.shape == shape and sel.metrics["tip/loss_weight_max"] == 0.0


def test_entropy_outside_zero_log_vocab_raises_naming_vocab_size():
    kw = _inputs(seed=14)
    mask = kw["response_mask"]
    neg = kw["entropy_nats"].clone()
    neg[0, 0] = -2.0
    with pytest.raises(ValueError, match=r"entropy_nats is outside \[0, log\(vocab_size\)\] = \[0, 4\.159\] nats at 1 "
                                         r"response positions \(from -2 to -2\).*vocab_size=64 the size of the "
                                         r"student's output vocabulary"):
        select_for_batch(TIPConfig(), **{**kw, "entropy_nats": neg})
    # a vocab_size that is too small: entropies above log|V|
    with pytest.raises(ValueError, match=r"entropy_nats is outside \[0, log\(vocab_size\)\] = \[0, 1\.609\]"):
        select_for_batch(TIPConfig(), **{**kw, "vocab_size": 5})
    # rounding (within ENTROPY_TOL) is accepted and clamped into [0, 1]; masked garbage is ignored
    near = kw["entropy_nats"].clone()
    near[0, 0], near[0, 1] = -1e-4, math.log(VOCAB) * (1 + 1e-4)
    near[~mask] = -50.0
    sel = select_for_batch(TIPConfig(method="entropy_sample", ratio=0.5), **{**kw, "entropy_nats": near})
    assert sel.entropy[0, 0].item() == 0.0 and sel.entropy[0, 1].item() == 1.0
    assert 0.0 <= sel.metrics["tip/entropy_mean"] <= 1.0


def test_confident_student_with_tiny_entropy_spread_does_not_crash():
    """Entropies [[0, 1e-38, 0, 0]] gave NaN scores ("scores contains 3 non-finite values")."""
    lp = torch.tensor([[-1e-6, -2e-6, -1e-6, -3e-6]])
    kw = dict(entropy_nats=torch.tensor([[0.0, 1e-38, 0.0, 0.0]]), vocab_size=VOCAB, student_logprobs=lp,
              teacher_logprobs=lp - 0.5, response_mask=torch.ones(1, 4, dtype=torch.bool))
    for method in METHODS:
        sel = select_for_batch(_cfg(method), **kw)
        assert bool(torch.isfinite(sel.scores).all())
        assert all(math.isfinite(v) for v in sel.metrics.values())


def test_nan_in_a_float_mask_raises_and_numpy_ints_are_accepted():
    kw = _inputs(seed=15)
    fmask = kw["response_mask"].float()
    fmask[1, 0] = float("nan")
    with pytest.raises(ValueError, match="response_mask contains 1 NaN/inf values"):
        select_for_batch(TIPConfig(), **{**kw, "response_mask": fmask})
    int_mask = kw["response_mask"].long()
    a = select_for_batch(TIPConfig(), **{**kw, "response_mask": int_mask, "vocab_size": np.int64(VOCAB)})
    b = select_for_batch(TIPConfig(), **kw)
    assert torch.equal(a.keep_mask, b.keep_mask)


def test_generator_must_be_a_torch_generator():
    kw = _inputs(seed=16)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        select_for_batch(TIPConfig(), **kw, generator=1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        sample_tokens(torch.rand(2, 3), torch.ones(2, 3), 0.5, generator=1, mode="without_replacement")
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got str"):
        sample_tokens(torch.rand(2, 3), torch.ones(2, 3), 1.0, generator="0", mode="without_replacement")


def test_topk_ids_beyond_the_student_vocabulary_raise():
    kw = _inputs(seed=17, topk=4)
    ids = kw["teacher_topk_ids"].clone()
    row, col = kw["response_mask"].nonzero()[0].tolist()
    ids[row, col, 0] = VOCAB
    with pytest.raises(ValueError, match=r"teacher_topk_ids has 1 ids outside \[0, vocab_size=64\)"):
        select_for_batch(TIPConfig(), **{**kw, "teacher_topk_ids": ids})

"""The teacher's top-k signal (``+tip.teacher_signal=topk``) through verl's real workers on the tiny models.

Checked against plain Hugging Face forwards of the same checkpoints (full logits):
* the ref worker's top-k log-probs / ids equal ``log_softmax(teacher logits).topk(k)``;
* the student's old-log-prob pass gathers its log-probs at those ids exactly;
* with k = |V| the top-k reverse / forward KL equal the exact KLs;
* the direct top-k reverse-KL loss (``+tip.loss=topk_reverse_kl``) equals its torch reference, its
  per-row gradient equals autograd of the exact KL at k = |V|, and dropped tokens get no gradient.
Plus a crafted batch where q3 with the forward top-k KL keeps the overconfident tokens.
"""

import pytest
import torch

from tip_verl import TIPConfig, full_logits_divergences, select_for_batch, topk_divergences
from tip_verl.verl_adapter.opd import opd_step
from tip_verl.verl_adapter.opd_config import TIPRunConfig
from tip_verl.kept_logprobs import kept_logprobs
from tip_verl.verl_adapter.topk_signal import topk_reverse_kl_from_logprobs, topk_reverse_kl_rows

from .hf_forward import hf_response_logits

PROMPTS = [f"what is {a} plus {b}" for a, b in [(12, 7), (3, 45), (51, 9), (66, 66)]]


@pytest.fixture(scope="module")
def rollout(tiny_assets):
    from tip_verl.verl_adapter.local_workers import build_local_workers

    w = build_local_workers(str(tiny_assets.student), ref_model_path=str(tiny_assets.teacher))
    batch = w.make_batch(PROMPTS, max_new_tokens=8, temperature=1.0, seed=5)
    yield w, batch
    w.close()


def test_worker_topk_equals_full_teacher_logits(tiny_assets, rollout):
    w, batch = rollout
    mask = batch["response_mask"].bool()
    k = 16
    sampled, top_lp, top_ids = w.ref_log_probs(batch, topk=k)
    assert top_lp.shape == (*mask.shape, k) and top_ids.dtype == torch.int32
    ref = torch.log_softmax(hf_response_logits(tiny_assets.teacher, batch), -1)
    ref_top = ref.topk(k, dim=-1)
    assert torch.allclose(top_lp[mask], ref_top.values[mask], atol=1e-4)
    # ids: the worker's ids hold exactly the teacher's log-probs it reports (ties may order differently)
    at_ids = ref.gather(-1, top_ids.long())
    assert torch.allclose(at_ids[mask], top_lp[mask], atol=1e-4)
    assert (top_ids.long() == ref_top.indices)[mask].float().mean() > 0.99
    # the sampled-token log-prob of the same pass is unchanged
    assert torch.allclose(sampled[mask], ref.gather(-1, batch["responses"][..., None]).squeeze(-1)[mask], atol=1e-4)

    # the student's old-log-prob pass gathers its own log-probs at the teacher's ids
    out = w.log_probs(batch, entropy=True, gather_topk_ids=top_ids)
    student = torch.log_softmax(hf_response_logits(tiny_assets.student, batch), -1)
    assert torch.allclose(out["topk_log_probs"][mask], student.gather(-1, top_ids.long())[mask], atol=1e-4)


@pytest.mark.parametrize("layout", ["remove_padding", "remove_padding_dynamic_bsz", "padded_dynamic_bsz"])
def test_worker_topk_in_other_batch_layouts(tiny_assets, rollout, layout):
    """Packed (remove-padding) forwards and dynamic micro-batches (reordered, then restored) give the same signal."""
    from tip_verl.verl_adapter.local_workers import build_local_workers

    _, batch = rollout
    mask = batch["response_mask"].bool()
    rmpad = layout.startswith("remove_padding")
    overrides = [f"actor_rollout_ref.model.use_remove_padding={rmpad}"]
    if layout.endswith("dynamic_bsz"):  # ~2 sequences per micro-batch
        overrides += ["actor_rollout_ref.actor.use_dynamic_bsz=True",
                      "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
                      "actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True",
                      "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=40",
                      "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=40",
                      "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=40"]
    w = build_local_workers(str(tiny_assets.student), ref_model_path=str(tiny_assets.teacher), overrides=overrides)
    try:
        _, top_lp, top_ids = w.ref_log_probs(batch, topk=8)
        out = w.log_probs(batch, gather_topk_ids=top_ids)
    finally:
        w.close()
    teacher = torch.log_softmax(hf_response_logits(tiny_assets.teacher, batch), -1)
    student = torch.log_softmax(hf_response_logits(tiny_assets.student, batch), -1)
    assert torch.allclose(top_lp[mask], teacher.topk(8, dim=-1).values[mask], atol=1e-4)
    assert torch.allclose(teacher.gather(-1, top_ids.long())[mask], top_lp[mask], atol=1e-4)
    assert torch.allclose(out["topk_log_probs"][mask], student.gather(-1, top_ids.long())[mask], atol=1e-4)


def test_k_equal_to_vocab_gives_the_exact_kl(tiny_assets, rollout):
    w, batch = rollout
    mask = batch["response_mask"].bool()
    s_logits = hf_response_logits(tiny_assets.student, batch)
    t_logits = hf_response_logits(tiny_assets.teacher, batch)
    V = t_logits.shape[-1]
    _, top_lp, top_ids = w.ref_log_probs(batch, topk=V)
    out = w.log_probs(batch, entropy=True, gather_topk_ids=top_ids)
    reverse, forward = topk_divergences(top_lp, top_ids, out["topk_log_probs"], mask)
    exact_rev, exact_fwd, _ = full_logits_divergences(s_logits, t_logits, mask)
    assert torch.allclose(reverse[mask], exact_rev[mask], rtol=1e-3, atol=1e-4)
    assert torch.allclose(forward[mask], exact_fwd[mask], rtol=1e-3, atol=1e-4)
    # and the trainer's step reports it as δ
    run = TIPRunConfig.from_mapping({"teacher_path": str(tiny_assets.teacher), "teacher_signal": "topk",
                                     "topk_k": V, "method": "soft_or", "ratio": 0.5})
    step = opd_step(run, student_logprobs=out["log_probs"], teacher_logprobs=w.ref_log_probs(batch),
                    entropy_nats=out["entropy"], response_mask=mask, vocab_size=V,
                    teacher_topk_logprobs=top_lp, teacher_topk_ids=top_ids,
                    student_topk_logprobs=out["topk_log_probs"])
    assert step.metrics["tip/topk_reverse_kl_mean"] == pytest.approx(exact_rev[mask].mean().item(), rel=1e-3)
    assert torch.allclose(step.selection.divergence[mask], exact_rev[mask], rtol=1e-3, atol=1e-4)


def test_q3_with_forward_topk_keeps_the_overconfident_tokens():
    """Rows 2 and 5: the student is sure (low entropy) of a token the teacher gives little mass."""
    torch.manual_seed(0)
    V, T, k = 50, 8, 8
    s_logits = torch.randn(1, T, V) * 0.3  # high entropy everywhere ...
    t_logits = s_logits + torch.randn(1, T, V) * 0.3
    for pos, (s_tok, t_tok) in {2: (3, 7), 5: (11, 19)}.items():
        s_logits[0, pos] = -4.0
        s_logits[0, pos, s_tok] = 9.0  # ... except two overconfident student tokens
        t_logits[0, pos] = -4.0
        t_logits[0, pos, t_tok] = 9.0
    for pos in (0, 6):  # two confident tokens the teacher agrees with (low entropy, low divergence)
        s_logits[0, pos] = -4.0
        s_logits[0, pos, 1] = 9.0
        t_logits[0, pos] = s_logits[0, pos].clone()
    ls, lt = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
    top = lt.topk(k, dim=-1)
    mask = torch.ones(1, T, dtype=torch.bool)
    entropy = -(ls.exp() * ls).sum(-1)
    sampled = ls.max(-1).values
    kw = dict(entropy_nats=entropy, vocab_size=V, student_logprobs=sampled,
              teacher_logprobs=lt.gather(-1, ls.argmax(-1, keepdim=True)).squeeze(-1), response_mask=mask,
              teacher_topk_logprobs=top.values, teacher_topk_ids=top.indices,
              student_topk_logprobs=ls.gather(-1, top.indices))
    q3 = select_for_batch(TIPConfig(method="q3", ratio=0.25), **kw)
    assert q3.keep_mask[0].nonzero().squeeze(-1).tolist() == [2, 5]
    entropy_top = select_for_batch(TIPConfig(method="entropy", ratio=0.25), **kw)
    assert not bool(entropy_top.keep_mask[0, [2, 5]].any())
    # the forward KL used for q3 is the top-k form, large exactly at the crafted rows
    assert q3.forward_divergence[0, [2, 5]].min() > 5 * q3.forward_divergence[0, [1, 3, 4, 7]].max()


def test_topk_reverse_kl_rows_matches_exact_kl_and_its_gradient():
    torch.manual_seed(1)
    V, K = 40, 6
    logits = torch.randn(K, V) * 2
    teacher = torch.log_softmax(torch.randn(K, V) * 2, -1)
    labels = torch.randint(0, V, (K,))
    top = teacher.topk(V, dim=-1)
    x1 = logits.clone().requires_grad_(True)
    rev, label_lp = topk_reverse_kl_rows(x1, labels, top.values, top.indices)
    x2 = logits.clone().requires_grad_(True)
    ls = torch.log_softmax(x2, -1)
    exact = (ls.exp() * (ls - teacher)).sum(-1)
    assert torch.allclose(rev, exact, atol=1e-5)
    assert torch.allclose(label_lp, ls.gather(-1, labels[:, None]).squeeze(-1), atol=1e-6)
    w = torch.randn(K, dtype=torch.float32)
    (rev * w).sum().backward()
    (exact * w).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    # k < V: the collapsed (top-k + tail) KL is a lower bound of the exact KL (data processing inequality)
    top8 = teacher.topk(8, dim=-1)
    rev8, _ = topk_reverse_kl_rows(logits, labels, top8.values, top8.indices)
    assert bool((rev8 <= exact.detach() + 1e-5).all())


def test_topk_reverse_kl_from_chunked_logprobs_equals_the_kept_logits_path():
    """The chunked lm_head's log-probs at [label, teacher top-k] give the KL and label log-probs of
    topk_reverse_kl_rows on the (K, V) logits, with the same gradients of hidden, weight and bias."""
    g = torch.Generator().manual_seed(2)
    K, H, V, k = 150, 24, 97, 8
    hidden = torch.randn(K, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.4
    bias = torch.randn(V, generator=g) * 0.3
    temp = torch.rand(K, generator=g) + 0.5
    labels = torch.randint(0, V, (K,), generator=g)
    teacher = torch.log_softmax(torch.randn(K, V, generator=g) * 2, -1)
    teacher[::2].scatter_(-1, labels[::2, None], 0.0)  # the label among the teacher's top-k on even rows
    top = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    w_kl, w_lp = torch.randn(K, generator=g), torch.randn(K, generator=g)
    outs = []
    for chunked in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        if chunked:
            ids = torch.cat([labels[:, None], top.indices], dim=-1)
            lp, _ = kept_logprobs(*leaves[:2], ids, bias=leaves[2], temperature=temp, chunk_rows=32)
            rev, label_lp = topk_reverse_kl_from_logprobs(lp[:, 1:], top.values), lp[:, 0]
        else:
            logits = torch.nn.functional.linear(*leaves[:2], leaves[2]) / temp[:, None]
            rev, label_lp = topk_reverse_kl_rows(logits, labels, top.values, top.indices)
        ((rev * w_kl).sum() + (label_lp * w_lp).sum()).backward()
        outs.append([rev.detach(), label_lp.detach()] + [t.grad for t in leaves])
    assert bool((outs[0][0] > 0).all())
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rmpad", [False, True], ids=["padded", "remove_padding"])
def test_direct_topk_reverse_kl_loss_through_verl_update(tiny_assets, rollout, rmpad):
    """+tip.loss=topk_reverse_kl: verl's update_actor with the sparse lm_head and the top-k loss."""
    from tip_verl.verl_adapter.local_workers import build_local_workers

    w, batch = rollout
    mask = batch["response_mask"].bool()
    k = 16
    _, top_lp, top_ids = w.ref_log_probs(batch, topk=k)
    out = w.log_probs(batch, entropy=True, gather_topk_ids=top_ids)
    reverse, _ = topk_divergences(top_lp, top_ids, out["topk_log_probs"], mask)
    keep = mask.clone()
    keep[:, 1::2] = False  # drop every other token
    keep &= mask
    assert 0 < keep.sum() < mask.sum()

    def update(teacher_lp):
        u = build_local_workers(str(tiny_assets.student), ref_model_path=str(tiny_assets.teacher), with_ref=False,
                                tip_loss="topk_reverse_kl", overrides=["actor_rollout_ref.actor.optim.lr=1e-2",
                                                                       f"actor_rollout_ref.model.use_remove_padding={rmpad}"])
        data = batch.clone()
        data["response_mask"] = keep.long()
        metrics = u.update(data, torch.zeros_like(out["log_probs"]), old_log_probs=out["log_probs"],
                           teacher_topk=(teacher_lp, top_ids))
        new = u.log_probs(batch)["log_probs"]
        u.close()
        return metrics, new

    metrics, new_lp = update(top_lp)
    loss = sum(float(v) for v in (metrics["tip_topk_reverse_kl_loss"]
                                  if isinstance(metrics["tip_topk_reverse_kl_loss"], list)
                                  else [metrics["tip_topk_reverse_kl_loss"]]))
    assert loss == pytest.approx(reverse[keep].mean().item(), rel=1e-4, abs=1e-6)
    # the update moved the student towards the teacher on the kept tokens
    out_after = w.log_probs(batch, gather_topk_ids=top_ids)  # (old worker: unchanged student)
    assert torch.allclose(out_after["log_probs"], out["log_probs"], atol=1e-6)
    assert (new_lp - out["log_probs"])[keep].abs().max() > 1e-4
    # garbage teacher top-k at dropped positions: an identical update (no gradient there)
    noisy = top_lp.clone()
    noisy[~keep] = torch.log_softmax(torch.randn(int((~keep).sum()), k) * 5, -1)
    _, new_lp_noisy = update(noisy)
    assert torch.allclose(new_lp, new_lp_noisy, atol=1e-6)

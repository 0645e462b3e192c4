"""tip_verl.kept_logprobs: chunked lm_head + log-probs/entropy against full logits -> log_softmax -> gather."""

from __future__ import annotations

import pytest
import torch

from tip_verl.chunking import row_chunks, rows_per_chunk
from tip_verl.kept_logprobs import kept_logprobs

H, V = 48, 997  # V prime: no accidental alignment with chunk sizes


def _reference(hidden, weight, bias, labels, temperature, with_entropy):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if isinstance(temperature, torch.Tensor):
        logits = logits / temperature.unsqueeze(-1)
    elif temperature is not None:
        logits = logits / float(temperature)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, ent


def _assert_grads_close(got, ref, tol):
    for g_got, g_ref in zip(got, ref):
        assert g_got.shape == g_ref.shape and g_got.dtype == g_ref.dtype
        scale = float(g_ref.abs().max())
        assert scale > 0
        # absolute tolerance relative to the gradient's scale (elements near zero after cancellation)
        torch.testing.assert_close(g_got, g_ref, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale))


def _leaves(K, seed, dtype=torch.float32, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(K, H, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_(True)
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(True) if with_bias else None
    labels = torch.randint(0, V, (K,), generator=g)
    return hidden, weight, bias, labels


def _loss(logp, ent, seed):
    """A loss with a different weight per row, so per-row gradient mistakes cannot cancel."""
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(logp.shape[0], generator=g, dtype=torch.float64).to(logp.dtype)
    loss = (w * logp).sum()
    if ent is not None:
        loss = loss + (torch.randn(ent.shape[0], generator=g, dtype=torch.float64).to(ent.dtype) * ent).sum()
    return loss


def _run(fn, K, seed, temperature, with_entropy, with_bias, dtype, **kw):
    hidden, weight, bias, labels = _leaves(K, seed, dtype=dtype, with_bias=with_bias)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(dtype)
    logp, ent = fn(hidden, weight, bias, labels, temperature, with_entropy, **kw)
    loss = _loss(logp, ent, seed)
    params = [hidden, weight] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), logp.detach(), (None if ent is None else ent.detach()), grads


def _chunked(hidden, weight, bias, labels, temperature, with_entropy, chunk_rows):
    return kept_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                         return_entropy=with_entropy, chunk_rows=chunk_rows)


CASES = {
    # name: (K, chunk_rows, temperature, entropy, bias)
    "300_rows_5_chunks_ragged_tail": (300, 64, None, False, True),
    "300_rows_entropy_temperature": (300, 64, 0.7, True, True),
    "257_rows_per_row_temperature": (257, 32, "per_row", True, True),
    "no_bias_temperature_1.3": (200, 48, 1.3, False, False),
    "K_equals_1": (1, 64, None, True, True),
    "K_equals_chunk": (64, 64, None, True, True),
    "K_one_more_than_chunk": (65, 64, 0.5, True, True),
    "chunk_of_one_row": (17, 1, None, True, True),
    "one_chunk_for_all": (300, 1000, None, True, True),
}


#: float64: the math is the reference's up to rounding; float32: what training uses (the reference
#: sums a gradient over all K rows at once, the chunked path chunk by chunk, so the last bits differ)
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_full_logits_reference(name, dtype):
    K, chunk, temperature, with_entropy, with_bias = CASES[name]
    if temperature == "per_row":
        temperature = torch.rand(K, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    ref = _run(_reference, K, 7, temperature, with_entropy, with_bias, dtype)
    got = _run(_chunked, K, 7, temperature, with_entropy, with_bias, dtype, chunk_rows=chunk)
    assert K > chunk or name in ("K_equals_1", "K_equals_chunk", "one_chunk_for_all")
    tol = TOLERANCES[dtype]
    assert got[1].dtype == dtype
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(got[1], ref[1], **tol)
    if with_entropy:
        torch.testing.assert_close(got[2], ref[2], **tol)
    else:
        assert got[2] is None
    assert len(got[3]) == len(ref[3]) == (3 if with_bias else 2)
    _assert_grads_close(got[3], ref[3], tol)


def test_float64_gradcheck():
    """Analytic backward (log-probs + entropy, per-row temperature, bias) against finite differences."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (7,), generator=g)
    temp = torch.rand(7, generator=g, dtype=torch.float64) + 0.5

    def f(h, w, b):
        lp, ent = kept_logprobs(h, w, labels, bias=b, temperature=temp, return_entropy=True, chunk_rows=3)
        return lp, ent

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_entropy_only_and_log_probs_only_gradients():
    """A loss that reads only one of the two outputs gets exactly that output's gradient."""
    for which in ("lp", "ent"):
        hidden, weight, bias, labels = _leaves(90, 5)
        lp, ent = kept_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, chunk_rows=16)
        (lp if which == "lp" else ent).sum().backward()
        got = [hidden.grad, weight.grad, bias.grad]
        hidden2, weight2, bias2, _ = _leaves(90, 5)
        lp2, ent2 = _reference(hidden2, weight2, bias2, labels, None, True)
        (lp2 if which == "lp" else ent2).sum().backward()
        for a, b in zip(got, [hidden2.grad, weight2.grad, bias2.grad]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_close_to_float32_reference():
    hidden, weight, bias, labels = _leaves(130, 11, with_bias=False)
    lp, ent = kept_logprobs(hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_(),
                            labels, return_entropy=True, chunk_rows=32)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    ref_lp, ref_ent = _reference(hidden, weight, None, labels, None, True)
    torch.testing.assert_close(lp, ref_lp.detach(), rtol=0.05, atol=0.1)
    torch.testing.assert_close(ent, ref_ent.detach(), rtol=0.05, atol=0.1)


@pytest.mark.parametrize("ids_per_row", [None, 9])
def test_at_most_one_chunk_of_logits_is_alive(ids_per_row):
    """No tensor with V columns and more than chunk_rows rows is ever allocated (forward and backward),
    with one label per row or several ids per row (repeated ids included)."""
    K, chunk = 400, 50
    hidden, weight, bias, labels = _leaves(K, 2)
    if ids_per_row is not None:
        labels = _ids(K, ids_per_row, 2, duplicates=True)
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == V:
                    seen.append(t.shape[0])
            return out

    with Spy():
        lp, ent = kept_logprobs(hidden, weight, labels, bias=bias, temperature=0.9, return_entropy=True,
                                chunk_rows=chunk)
        (lp.sum() + ent.sum()).backward()
    assert seen, "the spy saw no logits chunk"
    assert max(seen) <= chunk
    assert lp.shape == ((K,) if ids_per_row is None else (K, ids_per_row))


def test_no_rows_and_bad_arguments():
    hidden, weight, bias, labels = _leaves(0, 1)
    lp, ent = kept_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0
    h, w, b, y = _leaves(4, 1)
    with pytest.raises(ValueError, match="chunk_rows"):
        kept_logprobs(h, w, y, chunk_rows=0)
    with pytest.raises(ValueError, match="labels"):
        kept_logprobs(h, w, y[:3])
    with pytest.raises(ValueError, match="temperature"):
        kept_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        kept_logprobs(h, w, y, temperature=torch.ones(3))
    assert rows_per_chunk(151_936) == 110
    assert rows_per_chunk(10) == 64 * 2**20 // 40
    assert rows_per_chunk(2**30) == 1 and rows_per_chunk(4, elem_bytes=8, chunk_bytes=64) == 2
    with pytest.raises(ValueError, match="positive"):
        rows_per_chunk(0)
    assert list(row_chunks(7, 3)) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert list(row_chunks(0, 3)) == [] and list(row_chunks(2, 5)) == [slice(0, 2)]
    with pytest.raises(ValueError, match=">= 1"):
        list(row_chunks(4, 0))


# ---------------------------------------------------------------------------------------------
# several ids per row: labels [K, m] -> log-probs [K, m] (the top-k loss asks [label, teacher top-k])
# ---------------------------------------------------------------------------------------------
def _ids(K, m, seed, duplicates):
    g = torch.Generator().manual_seed(seed + 2)
    ids = torch.stack([torch.randperm(V, generator=g)[:m] for _ in range(K)]) if K else torch.empty(0, m).long()
    if duplicates and m > 1:  # repeat an id within some rows (the label among the teacher's top-k)
        ids[::2, -1] = ids[::2, 0]
        ids[1::3, 1] = ids[1::3, 0]
    return ids


def _reference_multi(hidden, weight, bias, ids, temperature, with_entropy):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if isinstance(temperature, torch.Tensor):
        logits = logits / temperature.unsqueeze(-1)
    elif temperature is not None:
        logits = logits / float(temperature)
    logp_all = torch.log_softmax(logits, dim=-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp_all.gather(-1, ids), ent


def _run_multi(chunk_rows, K, m, seed, temperature, with_entropy, with_bias, dtype, duplicates):
    hidden, weight, bias, _ = _leaves(K, seed, dtype=dtype, with_bias=with_bias)
    ids = _ids(K, m, seed, duplicates)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(dtype)
    if chunk_rows is None:
        logp, ent = _reference_multi(hidden, weight, bias, ids, temperature, with_entropy)
    else:
        logp, ent = kept_logprobs(hidden, weight, ids, bias=bias, temperature=temperature,
                                  return_entropy=with_entropy, chunk_rows=chunk_rows)
    g = torch.Generator().manual_seed(seed + 3)  # a different weight per (row, id): mistakes cannot cancel
    loss = (torch.randn(K, m, generator=g, dtype=torch.float64).to(logp.dtype) * logp).sum()
    if ent is not None:
        loss = loss + (torch.randn(K, generator=g, dtype=torch.float64).to(ent.dtype) * ent).sum()
    params = [hidden, weight] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, params)
    return logp.detach(), (None if ent is None else ent.detach()), grads, ids


MULTI_CASES = {
    # name: (K, m, chunk_rows, temperature, entropy, bias, duplicate ids)
    "300_rows_9_ids_5_chunks_ragged_tail": (300, 9, 64, None, False, True, False),
    "300_rows_9_ids_entropy_temperature": (300, 9, 64, 0.7, True, True, False),
    "257_rows_5_ids_per_row_temperature": (257, 5, 32, "per_row", True, True, False),
    "duplicate_ids_in_a_row": (200, 6, 48, 0.9, True, True, True),
    "duplicate_ids_no_entropy_no_bias": (131, 4, 16, 1.3, False, False, True),
    "K_equals_1": (1, 9, 64, None, True, True, False),
    "one_id_per_row_m_equals_1": (130, 1, 32, "per_row", True, True, False),
    "chunk_of_one_row": (17, 3, 1, None, True, True, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(MULTI_CASES))
def test_several_ids_per_row_match_full_logits_reference(name, dtype):
    K, m, chunk, temperature, with_entropy, with_bias, duplicates = MULTI_CASES[name]
    if temperature == "per_row":
        temperature = torch.rand(K, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    ref = _run_multi(None, K, m, 8, temperature, with_entropy, with_bias, dtype, duplicates)
    got = _run_multi(chunk, K, m, 8, temperature, with_entropy, with_bias, dtype, duplicates)
    assert K > chunk or name == "K_equals_1"
    if duplicates:
        assert any(len(set(row.tolist())) < m for row in got[3])
    tol = TOLERANCES[dtype]
    assert got[0].shape == (K, m) and got[0].dtype == dtype
    torch.testing.assert_close(got[0], ref[0], **tol)
    if with_entropy:
        torch.testing.assert_close(got[1], ref[1], **tol)
    else:
        assert got[1] is None
    assert len(got[2]) == (3 if with_bias else 2)
    _assert_grads_close(got[2], ref[2], tol)


def test_one_id_per_row_as_a_column_equals_the_one_dimensional_labels():
    """labels [K, 1] give bit for bit the [K] result (values and gradients), as a column."""
    out = []
    for column in (False, True):
        hidden, weight, bias, labels = _leaves(150, 9)
        lp, ent = kept_logprobs(hidden, weight, labels.unsqueeze(-1) if column else labels, bias=bias,
                                temperature=0.8, return_entropy=True, chunk_rows=32)
        assert lp.shape == ((150, 1) if column else (150,))
        lp = lp.squeeze(-1)
        (lp * torch.linspace(-1, 1, 150)).sum().add(ent.sum()).backward()
        out.append([lp.detach(), ent.detach(), hidden.grad, weight.grad, bias.grad])
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_several_ids_float64_gradcheck():
    """Analytic backward with [K, m] ids (repeats included), entropy, per-row temperature, bias."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (7, 4), generator=g)
    ids[0, 1] = ids[0, 0]
    temp = torch.rand(7, generator=g, dtype=torch.float64) + 0.5

    def f(h, w, b):
        return kept_logprobs(h, w, ids, bias=b, temperature=temp, return_entropy=True, chunk_rows=3)

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_several_ids_bad_shapes():
    h, w, _, _ = _leaves(4, 1)
    with pytest.raises(ValueError, match="labels"):
        kept_logprobs(h, w, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        kept_logprobs(h, w, torch.zeros(4, 2, 1, dtype=torch.long))
    lp, _ = kept_logprobs(*_leaves(0, 1)[:2], torch.zeros(0, 3, dtype=torch.long))
    assert lp.shape == (0, 3)

"""Log-probs (and entropy) of the kept rows, fused with the lm_head matmul, chunk by chunk.

Pure torch (no verl import). Given the final hidden states at the kept positions ``hidden`` [K, H],
the lm_head ``weight`` [V, H] (and optional ``bias`` [V]), the target ids ``labels`` [K] (or several
ids per row, [K, m]: e.g. the sampled token and the teacher's top-k ids) and an optional temperature
(a number or a per-row [K] tensor), :func:`kept_logprobs` returns

* ``log_probs`` [K] (or [K, m]), float32: ``log_softmax((hidden @ weight.T + bias) / T)`` at the ids,
* ``entropy`` [K], float32 (only when asked): the entropy of that softmax,

without ever holding more than ``chunk_rows x V`` logits: the forward computes the logits of
``chunk_rows`` rows at a time and keeps only their log-sum-exp (and entropy); the backward
recomputes each chunk's logits, turns them into their gradient in place (one more chunk-size buffer
when the entropy has a gradient) and accumulates the gradients of those hidden rows, of the weight
and of the bias chunk by chunk (with m ids per row, the logits' gradient is the incoming [rows, m]
gradients added at their ids minus their row sum times the softmax). Peak extra memory is therefore
``O(chunk_rows x V)`` plus the weight gradient that any lm_head backward produces, whatever K is.

Numerics: logits are computed in the weight's dtype (as ``nn.Linear`` does), then upcast to float32
and divided by the temperature (verl divides after the lm_head as well). For float32/float64
weights the weight gradient is accumulated in place in that dtype; for lower-precision weights it
is accumulated in float32 (a ``V x H`` float32 buffer) and cast once at the end, so summing over
many chunks does not lose bf16 precision.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .chunking import row_chunks, rows_per_chunk

__all__ = ["kept_logprobs"]


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  temperature: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 logits of one chunk of rows, divided by the rows' temperature."""
    logits = F.linear(hidden, weight, bias)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    if temperature is not None:
        logits = logits / temperature.unsqueeze(-1)
    return logits


class _ChunkedLinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, want_entropy: bool, chunk_rows: int):
        ctx.set_materialize_grads(False)
        num_rows = hidden.shape[0]
        out_dtype = torch.promote_types(weight.dtype, torch.float32)
        log_probs = torch.empty(labels.shape, dtype=out_dtype, device=hidden.device)  # labels: [K, m]
        lse = torch.empty(num_rows, dtype=out_dtype, device=hidden.device)
        entropy = torch.empty(num_rows if want_entropy else 0, dtype=out_dtype, device=hidden.device)
        for sl in row_chunks(num_rows, chunk_rows):
            temp = None if temperature is None else temperature[sl]
            logits = _chunk_logits(hidden[sl], weight, bias, temp)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            lse[sl] = chunk_lse
            log_probs[sl] = logits.gather(-1, labels[sl]) - chunk_lse.unsqueeze(-1)
            if want_entropy:
                # H = -sum_j p_j log p_j (each term >= 0: no cancellation between lse and E[x])
                log_p = logits.sub_(chunk_lse.unsqueeze(-1))
                entropy[sl] = -(log_p.exp() * log_p).sum(dim=-1)
            del logits
        ctx.save_for_backward(hidden, weight, bias, labels, temperature, lse, entropy)
        ctx.chunk_rows = chunk_rows
        ctx.want_entropy = want_entropy
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, bias, labels, temperature, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if not ctx.want_entropy:
            grad_entropy = None
        if grad_log_probs is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        low_precision = weight.dtype not in (torch.float32, torch.float64)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = None
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32 if low_precision else weight.dtype,
                                      device=weight.device)
        grad_bias = None
        if need_bias:
            grad_bias = torch.zeros(bias.shape, dtype=torch.promote_types(bias.dtype, torch.float32), device=bias.device)

        for sl in row_chunks(hidden.shape[0], ctx.chunk_rows):
            h = hidden[sl]
            temp = None if temperature is None else temperature[sl]
            # recompute, then overwrite the chunk's logits with d(loss)/d(logits) in place
            grad = _chunk_logits(h, weight, bias, temp)
            grad.sub_(lse[sl].unsqueeze(-1))  # log p
            g_lp = None if grad_log_probs is None else grad_log_probs[sl].to(grad.dtype)  # [rows, m]
            # d lp_j / dx = onehot(id_j) - p, so the m ids of a row act on p through their summed gradient
            # (a sum of one term when m = 1: exact, the one-id numerics are unchanged)
            g_sum = None if g_lp is None else (g_lp[:, 0] if g_lp.shape[1] == 1 else g_lp.sum(dim=-1))
            if grad_entropy is not None:
                # dH/dx = -p (log p + H)  =>  grad = -p (g_sum + g_H (log p + H)) + scatter(g_lp at the ids)
                g_h = grad_entropy[sl].to(grad.dtype).unsqueeze(-1)
                probs = grad.exp()
                grad.add_(entropy[sl].unsqueeze(-1)).mul_(g_h)
                if g_sum is not None:
                    grad.add_(g_sum.unsqueeze(-1))
                grad.mul_(probs).neg_()
                del probs
            else:
                grad.exp_().mul_(-g_sum.unsqueeze(-1))
            if g_lp is not None:
                grad.scatter_add_(-1, labels[sl], g_lp)
            if temp is not None:  # x = z / T
                grad.div_(temp.unsqueeze(-1))
            if need_hidden:
                grad_hidden[sl] = grad.to(weight.dtype) @ weight
            if need_weight:
                if low_precision:
                    grad_weight.addmm_(grad.t(), h.float())
                else:
                    grad_weight.addmm_(grad.t().to(weight.dtype), h.to(weight.dtype))
            if need_bias:
                grad_bias.add_(grad.sum(dim=0))
            del grad
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None and grad_bias.dtype != bias.dtype:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def kept_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: Union[None, float, torch.Tensor] = None,
    *,
    return_entropy: bool = False,
    chunk_rows: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs of ``labels`` (and the entropy) under ``(hidden @ weight.T + bias) / temperature``.

    Args:
        hidden: [K, H] hidden states of the kept rows (any float dtype; the weight's dtype is used).
        weight: [V, H] lm_head weight.
        labels: [K] target ids in ``[0, V)``, or [K, m]: m ids per row (repeats allowed).
        bias: optional [V] lm_head bias.
        temperature: ``None`` / a positive number (one for all rows) / a [K] tensor (per row).
        return_entropy: also return the entropy of each row's softmax (with its gradient).
        chunk_rows: rows per chunk; default :func:`tip_verl.chunking.rows_per_chunk` of V (64 MiB of
            float32 logits).

    Returns:
        ``(log_probs, entropy)``: [K] (or [K, m], as ``labels``) and [K], float32 (float64 for float64
        weights); ``entropy`` is ``None`` unless asked for.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [K, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    if labels.dim() not in (1, 2) or labels.shape[0] != num_rows:
        raise ValueError(f"labels must have shape ({num_rows},) or ({num_rows}, m), got {tuple(labels.shape)}")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
    if chunk_rows is None:
        chunk_rows = rows_per_chunk(vocab)
    if int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    temp: Optional[torch.Tensor] = None
    if temperature is not None:
        if isinstance(temperature, torch.Tensor):
            temp = temperature.detach().to(device=hidden.device, dtype=torch.promote_types(weight.dtype, torch.float32))
            if temp.dim() == 0:
                temp = temp.expand(num_rows)
            elif temp.shape != (num_rows,):
                raise ValueError(f"temperature must be a number or a ({num_rows},) tensor, got {tuple(temp.shape)}")
        else:
            if not float(temperature) > 0:
                raise ValueError(f"temperature must be positive, got {temperature}")
            if float(temperature) != 1.0:
                temp = torch.full((num_rows,), float(temperature), device=hidden.device,
                                  dtype=torch.promote_types(weight.dtype, torch.float32))
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    ids = labels.long()
    log_probs, entropy = _ChunkedLinearLogProbs.apply(
        hidden, weight, bias, ids.unsqueeze(-1) if labels.dim() == 1 else ids, temp, bool(return_entropy),
        int(chunk_rows),
    )
    if labels.dim() == 1:
        log_probs = log_probs.squeeze(-1)
    return log_probs, (entropy if return_entropy else None)

"""The teacher's top-k signal inside verl's forward passes (``+tip.teacher_signal=topk``).

With only the sampled token's log-probs, δ_t is a one-sample estimate and the forward KL that the
Q3 score needs is estimated poorly. With ``teacher_signal=topk`` the passes of one training step
carry the teacher's top-k distribution instead (Eq. 3 with the top-k-plus-tail form of
:func:`tip_verl.signals.topk_divergences`):

1. the teacher pass (the ref worker) returns, per response token, the teacher's top-k log-probs and
   ids (:data:`TEACHER_TOPK_LOGPROBS`, :data:`TEACHER_TOPK_IDS`: nested ``(bsz, R_i, k)`` float32 /
   int32, 8·k bytes per token), computed in row chunks of the logits it already has;
2. the student's old-log-prob pass, which runs after it, gathers its own log-probs at those ids
   from the logits it already produces (:data:`STUDENT_TOPK_LOGPROBS`; plus its own top-1 token for
   the token records): no extra forward;
3. with ``+tip.loss=topk_reverse_kl`` the update step computes the top-k reverse KL of the kept
   rows (:data:`TOPK_REVERSE_KL`) from the student's log-probs at the teacher's top-k ids (the
   chunked lm_head returns them without the ``(K, V)`` logits; with ``+tip.lm_head_chunk_rows=0``
   they come from the kept-row logits) and backpropagates it directly through the student's
   distribution (:func:`topk_reverse_kl_loss`).

Which pass a call is travels as a non-tensor flag of the batch (``batch.extra_info``), set by the TIP
trainer around that one call and cleared after it: :data:`FLAG_TEACHER_TOPK` (the teacher pass, with
its k) and :data:`FLAG_GATHER_IDS` (the student's old-log-prob pass, naming the field that holds the
ids to gather at: the ref path's ``tip_teacher_topk_ids`` in response layout, or verl's native
``teacher_ids`` in packed layout). The loss (3.) is a setting, not a per-call fact: the engine reads it
from its :class:`~tip_verl.verl_adapter.opd_config.TIPWorkerConfig` (``loss``). The engine side lives in
:class:`tip_verl.verl_adapter.sparse_lm_head.TIPLMHeadMixin`, which calls the functions here.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributed.tensor import DTensor

from verl.trainer.ppo.core_algos import agg_loss
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

from tip_verl.chunking import row_chunks, rows_per_chunk
from tip_verl.signals import TAIL_EPS, topk_tail_kl

TEACHER_TOPK_LOGPROBS = "tip_teacher_topk_logprobs"
TEACHER_TOPK_IDS = "tip_teacher_topk_ids"
STUDENT_TOPK_LOGPROBS = "tip_student_topk_logprobs"
#: The student's own most likely token (over the whole vocabulary), for the token records.
STUDENT_TOP1_LOGPROB = "tip_student_top1_logprob"
STUDENT_TOP1_ID = "tip_student_top1_id"
TOPK_REVERSE_KL = "tip_topk_reverse_kl"
#: verl's native distillation fields (teacher server): packed full-sequence layout.
NATIVE_TEACHER_LOGPROBS = "teacher_logprobs"
NATIVE_TEACHER_IDS = "teacher_ids"

FLAG_TEACHER_TOPK = "tip_teacher_topk_k"
FLAG_GATHER_IDS = "tip_gather_topk_ids_from"


class TopKSignalError(RuntimeError):
    """The top-k signal cannot be computed for this batch layout; the message says why."""


def _get(micro_batch, key, default=None):
    return tu.get_non_tensor_data(data=micro_batch, key=key, default=default)


def requests(micro_batch) -> dict:
    """The top-k work of this forward-only pass (empty when none): ``teacher_k``, ``gather_from``."""
    wanted = {}
    k = int(_get(micro_batch, FLAG_TEACHER_TOPK, 0) or 0)
    if k > 0:
        wanted["teacher_k"] = k
    source = _get(micro_batch, FLAG_GATHER_IDS, None)
    if source:
        wanted["gather_from"] = str(source)
    return wanted


# ---------------------------------------------------------------------------------------------
# Where the response tokens are
# ---------------------------------------------------------------------------------------------
def response_lengths(micro_batch) -> torch.Tensor:
    """Per-sequence response lengths, computed as verl's ``no_padding_2_padding`` does."""
    if "responses" not in micro_batch.keys() or "prompts" not in micro_batch.keys():
        raise TopKSignalError("micro-batch has no 'prompts'/'responses' to locate the response tokens")
    prompts, responses = micro_batch["prompts"], micro_batch["responses"]
    if prompts.is_nested:
        return responses.offsets().diff()
    if "attention_mask" not in micro_batch.keys():
        raise TopKSignalError("dense 'responses' without 'attention_mask'")
    return micro_batch["attention_mask"][:, prompts.shape[1]:].sum(dim=1)


def first_response_logits(micro_batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cu_seqlens, response_lens, first_logit)``: packed position predicting each response's token 0."""
    input_ids = micro_batch["input_ids"]
    if not input_ids.is_nested:
        raise TopKSignalError("input_ids is not a nested (no-padding) tensor")
    cu_seqlens = input_ids.offsets()
    seq_lens = cu_seqlens.diff()
    response_lens = response_lengths(micro_batch).to(seq_lens.device, torch.long)
    if response_lens.shape != seq_lens.shape:
        raise TopKSignalError("responses and input_ids disagree on the batch size")
    if bool((seq_lens - response_lens < 1).any()):
        raise TopKSignalError("a sequence has an empty prompt (no logit position before its first response token)")
    return cu_seqlens, response_lens, cu_seqlens[:-1] + seq_lens - response_lens - 1


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def response_layout(micro_batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(positions, seq_index, cu_seqlens, response_offsets)`` of every response token.

    ``positions[r]`` is the packed logit position predicting response row ``r`` (rows in
    sequence-major order, the order of a nested ``(bsz, R_i, ...)`` tensor's ``values()``), as in
    verl's ``no_padding_2_padding``: response token ``j`` of sequence ``i`` is predicted at
    ``cu[i] + L_i - R_i - 1 + j``.
    """
    cu_seqlens, response_lens, first_logit = first_response_logits(micro_batch)
    response_offsets = _offsets(response_lens)
    seq_index = torch.repeat_interleave(torch.arange(response_lens.shape[0], device=response_lens.device),
                                        response_lens)
    token_index = torch.arange(int(response_offsets[-1]), device=response_lens.device) - response_offsets[:-1][seq_index]
    return (first_logit[seq_index] + token_index).long(), seq_index.long(), cu_seqlens, response_offsets


def response_rows_of(micro_batch, positions: torch.Tensor, seq_index: torch.Tensor) -> torch.Tensor:
    """Row index in response layout (``values()`` of a ``(bsz, R_i, ...)`` tensor) of packed positions."""
    _, response_lens, first_logit = first_response_logits(micro_batch)
    return _offsets(response_lens)[:-1][seq_index] + (positions - first_logit[seq_index])


# ---------------------------------------------------------------------------------------------
# Logit rows, in chunks
# ---------------------------------------------------------------------------------------------
class LogitRows:
    """Temperature-scaled logit rows at given packed positions, read chunk by chunk
    (:func:`tip_verl.chunking.rows_per_chunk` float32 rows of the vocabulary at a time).

    ``output.logits`` is ``(1, total_nnz, V)`` with remove-padding or ``(bsz, S, V)`` (sequences
    left-aligned) without; no ``(N, V)`` copy of all rows is made.
    """

    def __init__(self, output, output_args: dict, positions: torch.Tensor, seq_index: torch.Tensor,
                 cu_seqlens: torch.Tensor, use_remove_padding: bool):
        logits = getattr(output, "logits", None)
        if logits is None:
            raise TopKSignalError(
                "the model output has no logits (fused kernels?): the top-k signal needs "
                "actor_rollout_ref.model.use_fused_kernels=False"
            )
        if isinstance(logits, DTensor):
            logits = logits.full_tensor()
        self.vocab = logits.shape[-1]
        self.flat = logits.reshape(-1, self.vocab)
        if use_remove_padding:
            self.index = positions
            temperature = output_args["temperature_rmpad"].reshape(-1)[positions]
        else:
            seq_len = logits.shape[1]
            self.index = seq_index * seq_len + (positions - cu_seqlens[seq_index])
            temperature = output_args["temperature"].reshape(-1)[seq_index]
        self.temperature = temperature.to(torch.float32)
        self.rows_per_chunk = rows_per_chunk(max(self.vocab, 1))

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def chunks(self):
        """Yield ``(slice, log_softmax rows as float32)``."""
        for sl in row_chunks(len(self), self.rows_per_chunk):
            rows = self.flat.index_select(0, self.index[sl]).float()
            rows = rows / self.temperature[sl].unsqueeze(-1)
            yield sl, torch.log_softmax(rows, dim=-1)


@torch.no_grad()
def topk_logprobs(rows: LogitRows, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher top-k log-probs (float32) and ids (int32) of every row, ``(N, k)`` each."""
    if k > rows.vocab:
        raise TopKSignalError(f"+tip.topk_k={k} exceeds the teacher's vocabulary size {rows.vocab}")
    n = len(rows)
    values = torch.empty(n, k, dtype=torch.float32, device=rows.flat.device)
    ids = torch.empty(n, k, dtype=torch.int32, device=rows.flat.device)
    for sl, logprobs in rows.chunks():
        top = logprobs.topk(k, dim=-1)
        values[sl] = top.values
        ids[sl] = top.indices.to(torch.int32)
    return values, ids


@torch.no_grad()
def gather_logprobs(rows: LogitRows, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows' log-probs at ``ids`` ``(N, k)`` (float32), and each row's top-1 log-prob and id ``(N,)``."""
    if ids.shape[0] != len(rows):
        raise TopKSignalError(f"got top-k ids for {ids.shape[0]} rows, expected {len(rows)}")
    device = rows.flat.device
    out = torch.empty(ids.shape, dtype=torch.float32, device=device)
    top1 = torch.empty(ids.shape[0], dtype=torch.float32, device=device)
    top1_id = torch.empty(ids.shape[0], dtype=torch.int32, device=device)
    for sl, logprobs in rows.chunks():
        out[sl] = logprobs.gather(-1, ids[sl].to(logprobs.device, torch.long))
        best = logprobs.max(dim=-1)
        top1[sl], top1_id[sl] = best.values, best.indices.to(torch.int32)
    return out, top1, top1_id


def nested_rows(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``(N, ...)`` rows as a nested ``(bsz, R_i, ...)`` tensor with the given offsets."""
    return torch.nested.nested_tensor_from_jagged(values, offsets.to(values.device))


def ids_for_response_rows(micro_batch, source: str, positions: torch.Tensor) -> torch.Tensor:
    """The top-k ids to gather at for every response row, from the ref path's or verl's native field."""
    if source not in micro_batch.keys():
        raise TopKSignalError(f"the batch has no '{source}' to gather the student's top-k log-probs at")
    ids = micro_batch[source]
    if not ids.is_nested:
        raise TopKSignalError(f"'{source}' must be a nested tensor")
    values = ids.values()
    if source == NATIVE_TEACHER_IDS:  # packed full-sequence layout, aligned with the logits rows
        return values.index_select(0, positions.to(values.device))
    if values.shape[0] != positions.shape[0]:
        raise TopKSignalError(f"'{source}' has {values.shape[0]} rows for {positions.shape[0]} response tokens")
    return values


def inference_outputs(output, output_args: dict, micro_batch, wanted: dict, use_remove_padding: bool) -> dict:
    """The top-k fields of a forward-only pass: the teacher's top-k and/or the student's gather."""
    positions, seq_index, cu_seqlens, response_offsets = response_layout(micro_batch)
    rows = LogitRows(output, output_args, positions, seq_index, cu_seqlens, use_remove_padding)
    out = {}
    if "teacher_k" in wanted:
        values, ids = topk_logprobs(rows, wanted["teacher_k"])
        out[TEACHER_TOPK_LOGPROBS] = nested_rows(values, response_offsets)
        out[TEACHER_TOPK_IDS] = nested_rows(ids, response_offsets)
    if "gather_from" in wanted:
        ids = ids_for_response_rows(micro_batch, wanted["gather_from"], positions)
        gathered, top1, top1_id = gather_logprobs(rows, ids)
        out[STUDENT_TOPK_LOGPROBS] = nested_rows(gathered, response_offsets)
        out[STUDENT_TOP1_LOGPROB] = nested_rows(top1, response_offsets)
        out[STUDENT_TOP1_ID] = nested_rows(top1_id, response_offsets)
    return out


# ---------------------------------------------------------------------------------------------
# The direct top-k reverse-KL loss (update step, kept rows only)
# ---------------------------------------------------------------------------------------------
def topk_reverse_kl_from_logprobs(student_logprobs: torch.Tensor,
                                  teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-row top-k-plus-tail reverse KL ``KL(S||T)`` (Eq. 3) from both sides' log-probs at the
    teacher's top-k ids, ``(K, k)`` each; ``(K,)``, differentiable in ``student_logprobs``.

    Both distributions are collapsed onto the k ids plus one tail bucket by
    :func:`tip_verl.signals.topk_tail_kl`, as in :func:`tip_verl.signals.topk_divergences`, so k = V
    gives the exact KL. The loss of ``+tip.loss=topk_reverse_kl`` on both paths of the sparse lm_head:
    the kept rows' logits (:func:`topk_reverse_kl_rows`) and the chunked lm_head, which returns these
    log-probs without the ``(K, V)`` logits.
    """
    ls = student_logprobs
    lt = teacher_logprobs.to(torch.promote_types(ls.dtype, torch.float32))
    ps = ls.exp()
    # tails: 1 - Σp, computed as -expm1(logsumexp(log p)) (accurate when the top-k holds ~all mass)
    tail_s = (-torch.expm1(torch.logsumexp(ls, dim=-1))).clamp_min(TAIL_EPS)
    tail_t = (-torch.expm1(torch.logsumexp(lt, dim=-1))).clamp_min(TAIL_EPS)
    return topk_tail_kl(ls, lt, tail_s, tail_t, ps=ps)


def topk_reverse_kl_rows(logits: torch.Tensor, labels: torch.Tensor, teacher_logprobs: torch.Tensor,
                         teacher_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-k-plus-tail reverse KL ``KL(S||T)`` (Eq. 3) and the label log-probs, differentiable.

    ``logits`` (K, V) are the kept rows (temperature applied); the teacher's top-k
    ``teacher_logprobs``/``teacher_ids`` are (K, k); the KL is :func:`topk_reverse_kl_from_logprobs`
    of the student's log-probs at those ids. Only ``(K,)`` and ``(K, k)`` tensors are added to the
    logits' own graph.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    ls = logits.gather(-1, teacher_ids.long()) - lse  # student log-probs at the teacher's top-k
    label_logprobs = (logits.gather(-1, labels.long().unsqueeze(-1)) - lse).squeeze(-1)
    return topk_reverse_kl_from_logprobs(ls, teacher_logprobs), label_logprobs


def teacher_rows_for_kept(micro_batch, positions: torch.Tensor, seq_index: torch.Tensor):
    """The teacher's top-k (log-probs, ids) at kept packed positions, from the ref path's fields."""
    for key in (TEACHER_TOPK_LOGPROBS, TEACHER_TOPK_IDS):
        if key not in micro_batch.keys():
            raise TopKSignalError(f"+tip.loss=topk_reverse_kl: the update batch has no '{key}'")
    rows = response_rows_of(micro_batch, positions, seq_index)
    logprobs = micro_batch[TEACHER_TOPK_LOGPROBS].values().index_select(0, rows)
    ids = micro_batch[TEACHER_TOPK_IDS].values().index_select(0, rows)
    return logprobs, ids


def topk_reverse_kl_loss(config, model_output: dict, data, dp_group=None):
    """Actor loss of ``+tip.loss=topk_reverse_kl``: the mean top-k reverse KL over kept tokens (Eq. 7).

    ``model_output[TOPK_REVERSE_KL]`` holds the per-token reverse KL at kept positions (0
    elsewhere); it is aggregated with verl's ``agg_loss`` over ``response_mask`` (= the keep-mask)
    with verl's global-batch normalisation, as ``ppo_loss`` does.
    """
    if TOPK_REVERSE_KL not in model_output:
        raise TopKSignalError(
            "+tip.loss=topk_reverse_kl needs the sparse lm_head's kept-row logits, but the update step "
            "took the full-logits path (see the 'tip_verl sparse lm_head' warning for the reason)"
        )
    reverse_kl = no_padding_2_padding(model_output[TOPK_REVERSE_KL], data)
    for key in ("dp_size", "batch_num_tokens", "global_batch_size"):
        config.global_batch_info[key] = data[key]
    config.global_batch_info["loss_scale_factor"] = config.loss_scale_factor
    global_norm = (
        data["dp_size"] > 1 or data["batch_num_tokens"] is not None or data["global_batch_size"] is not None
        or config.loss_scale_factor is not None
    )
    aggregation = AggregationType.SUM if global_norm else AggregationType.MEAN
    mask = data["response_mask"]
    if mask.is_nested:
        mask = mask.to_padded_tensor(0)
    mask = mask.bool()
    mask = mask[:, : reverse_kl.shape[1]]
    loss = agg_loss(loss_mat=reverse_kl, loss_mask=mask, loss_agg_mode=config.loss_agg_mode,
                    **config.global_batch_info)
    metrics = {"tip_topk_reverse_kl_loss": Metric(value=loss, aggregation=aggregation)}
    return loss, metrics


def kept_topk_loss_outputs(logits: torch.Tensor, labels: torch.Tensor, micro_batch, positions: torch.Tensor,
                           seq_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(label log-probs, reverse KL) of the kept rows, both ``(K,)`` and differentiable."""
    teacher_logprobs, teacher_ids = teacher_rows_for_kept(micro_batch, positions, seq_index)
    teacher_logprobs = teacher_logprobs.to(logits.device)
    teacher_ids = teacher_ids.to(logits.device)
    reverse, label_logprobs = topk_reverse_kl_rows(logits, labels, teacher_logprobs, teacher_ids)
    return label_logprobs, reverse

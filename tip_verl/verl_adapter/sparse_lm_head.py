"""Sparse LM head for the actor update: vocabulary projection only at kept (``loss_mask = 1``) tokens.

TIP keeps a fraction of the response tokens and writes the keep-mask into ``response_mask`` and
``loss_mask``. verl 0.9.1's update step still projects *every* packed token (prompt included) onto
the vocabulary (``FSDPEngineWithLMHead.prepare_model_outputs``,
``verl/workers/engine/fsdp/transformer_impl.py:1332``: ``output.logits.squeeze(0)`` of shape
``(total_nnz, vocab)``), then runs log-softmax and its backward over all of them, so masking the
loss alone saves nothing at peak. This module makes the update compute the vocabulary projection,
the log-probs (and the entropy, when the update asks for it) only where a kept response token is
predicted, and scatters the results back into the full-size tensors verl's loss expects (zeros
elsewhere: those positions are masked out of the loss), so ``ppo_loss`` / verl's distillation loss
run unchanged.

How (no verl source edit):

* :class:`TIPLMHeadMixin` (TIP's LM-head stage: the kept rows here, the top-k signal below) overrides
  three methods of ``FSDPEngineWithLMHead``
  (``transformer_impl.py``: ``prepare_model_inputs`` :1145, ``prepare_model_outputs`` :1332,
  ``forward_step`` :1549). For a training forward with a loss (``forward_only=False``) it
  computes the kept positions, installs a forward hook on the decoder (``model.model``: the module
  the HF causal-LM forward and verl's fused forwards in ``models/transformers/dense_common.py`` both
  call) that gathers the final hidden states at those positions, so the lm_head (or, on the
  fused-kernel path, ``FusedLinearForPPO`` / ``linear_cross_entropy``, whose labels are gathered
  the same way through ``shift_labels``) sees ``(1, K, hidden)`` instead of all tokens. The hook is
  removed when the step ends. By default (non-fused path) the lm_head itself is then run chunked:
  for that one forward its ``forward`` is replaced by :func:`tip_verl.kept_logprobs.kept_logprobs`,
  which computes the kept rows' log-probs (and entropy) ``chunk_rows`` rows at a time with a
  backward that recomputes each chunk, so at most ``chunk_rows x vocab`` logits exist at any time
  (``+tip.lm_head_chunk_rows``: rows per chunk, default 64 MiB of float32 logits; ``0`` turns
  chunking off). The lm_head module is still called, so FSDP's unshard/reshard hooks run as usual.
  With ``+tip.loss=topk_reverse_kl`` the chunked lm_head returns, per kept row, the log-probs at the
  label and at the teacher's k top ids (taken when the micro-batch is planned), from which the top-k
  reverse KL is computed: ``(K, 1 + k)`` numbers instead of ``(K, vocab)`` logits.
  Without chunking (``+tip.lm_head_chunk_rows=0``, lm_heads that are not a plain
  ``nn.Linear`` or whose logits the model rescales) the log-probs of the ``(K, vocab)`` kept logits
  come from verl's ``logprobs_from_logits`` (flash-attn / NPU kernels where verl has them); where
  verl would fall back to its row-by-row float32 helper, an equivalent function whose backward
  reuses the logits' storage for their gradient is used, so the kept rows cost one ``(K, vocab)``
  tensor, not three.
* :class:`TIPLMHeadTrainingWorker` is verl's ``TrainingWorker`` whose engine, built by verl's
  ``EngineRegistry`` as usual (``engine_workers.py:136``), is upgraded to the TIP variant of its
  own class (``TIPLMHead<EngineClass>``) before it is initialised. The TIP worker sets it as
  ``actor_worker_cls``; nothing is registered globally, so verl jobs that do not use TIP are untouched.

Settings: the engine reads one :class:`~tip_verl.verl_adapter.opd_config.TIPWorkerConfig`
(``sparse_lm_head``, ``lm_head_chunk_rows``, ``loss``), given once when the engine is upgraded
(:func:`enable_sparse_lm_head`; the TIP worker passes the ``actor_rollout_ref.tip_worker`` node the
trainer resolved from ``+tip.*``); no environment variable is read.

Alignment: the log-prob of response token ``t`` comes from the logits at packed position
``t - 1``. For sequence ``i`` of a micro-batch with packed start ``cu[i]``, length ``L_i`` and
response length ``R_i``, response token ``j`` is predicted at ``cu[i] + L_i - R_i - 1 + j``
(the same slice verl's ``no_padding_2_padding`` takes, ``workers/utils/padding.py``). Kept
positions are those whose ``loss_mask`` or ``response_mask`` is 1 (the union, so a loss that reads
either mask sees exact values). Nested (jagged) and dense response masks, remove-padding on and off,
dynamic batch size and a static packed pad (``pad_to_length``) are handled.

The same overrides serve the teacher top-k signal (:mod:`~tip_verl.verl_adapter.topk_signal`): in
forward-only passes they add the teacher's top-k or the student's log-probs at those ids to the
outputs, and in the update step of ``+tip.loss=topk_reverse_kl`` they compute the top-k reverse KL
of the kept rows from the student's log-probs at the teacher's top-k ids (chunked lm_head) or from
the kept-row logits (unchunked).

Not covered (full computation, one ``logger.warning`` per reason): Ulysses sequence parallelism
> 1, multimodal inputs / 3-D position ids, top-K distillation (needs full logits), Σπ² requests,
engines that are not a plain ``FSDPEngineWithLMHead`` (Megatron, VeOmni, value heads, subclasses
that override the three methods), models without a ``.model`` decoder, masks of another layout.
``+tip.sparse_lm_head=false`` turns the sparse path off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.distributed.tensor import DTensor

from verl.utils import tensordict_utils as tu
from verl.utils import torch_functional as verl_F
from verl.utils.dataset.dataset_utils import DatasetPadMode
from verl.utils.model import extract_multi_modal_inputs
from verl.utils.torch_functional import logprobs_from_logits
from verl.workers.engine.fsdp.transformer_impl import (
    FSDPEngineWithLMHead,
    FSDPEngineWithValueHead,
    _scale_logits_by_temperature,
)
from verl.workers.engine_workers import TrainingWorker

from tip_verl.chunking import row_chunks, rows_per_chunk
from tip_verl.kept_logprobs import kept_logprobs

from . import topk_signal
from .opd_config import TIPWorkerConfig

logger = logging.getLogger(__name__)

__all__ = [
    "TIPLMHeadMixin",
    "TIPLMHeadFSDPEngine",
    "TIPLMHeadTrainingWorker",
    "SparsePlan",
    "enable_sparse_lm_head",
    "kept_logit_positions",
    "sparse_engine_class",
]

#: config fields of models that rescale / cap the lm_head output (then the chunked path does not apply)
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

_WARNED: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    logger.warning(
        "tip_verl sparse lm_head: %s; the actor update computes logits for every token on this path "
        "(correct, but without the memory saving).",
        reason,
    )


def _warn_once_chunk(reason: str) -> None:
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    logger.warning("tip_verl sparse lm_head: %s; the kept rows' logits are computed in one block, not chunked.", reason)


class _Unsupported(Exception):
    """A micro-batch layout the sparse path does not handle; the message is the fallback reason."""


# ---------------------------------------------------------------------------------------------
# Kept positions
# ---------------------------------------------------------------------------------------------
def _dense_response_mask(mask: torch.Tensor, response_lens: torch.Tensor, name: str) -> torch.Tensor:
    """A response-aligned mask as a dense ``(bsz, max_response_len)`` bool tensor."""
    bsz = response_lens.shape[0]
    if mask.is_nested:
        lens = mask.offsets().diff()
        if lens.shape != response_lens.shape or not torch.equal(lens.to(response_lens.device), response_lens):
            raise _Unsupported(f"'{name}' is not aligned with the responses (per-sequence lengths differ)")
        width = int(lens.max().item()) if bsz else 0
        dense = torch.nested.to_padded_tensor(mask, padding=0, output_size=(bsz, width))
    else:
        if mask.dim() != 2 or mask.shape[0] != bsz:
            raise _Unsupported(f"'{name}' of shape {tuple(mask.shape)} is not a (bsz, response_len) mask")
        dense = mask
    dense = dense.bool()
    width = dense.shape[1]
    if bsz and int(response_lens.max().item()) > width:
        raise _Unsupported(f"'{name}' is narrower than the longest response")
    return dense


def kept_logit_positions(micro_batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed logit positions that predict a kept response token, and their sequence index.

    Returns ``(positions, seq_index)``, both ``(K,)`` long tensors in packed (remove-padding)
    coordinates of ``micro_batch["input_ids"]`` (nested). A token is kept where ``loss_mask`` or
    ``response_mask`` is 1. Raises :class:`_Unsupported` for layouts it does not know.
    """
    try:
        cu_seqlens, response_lens, first_logit = topk_signal.first_response_logits(micro_batch)
    except topk_signal.TopKSignalError as exc:
        raise _Unsupported(str(exc)) from exc
    seq_lens = cu_seqlens.diff()

    masks = []
    for name in ("loss_mask", "response_mask"):
        if name in micro_batch.keys():
            masks.append(_dense_response_mask(micro_batch[name], response_lens, name).to(seq_lens.device))
    if not masks:
        raise _Unsupported("micro-batch has neither 'loss_mask' nor 'response_mask'")
    width = max(m.shape[1] for m in masks)
    keep = torch.zeros(seq_lens.shape[0], width, dtype=torch.bool, device=seq_lens.device)
    for m in masks:
        keep[:, : m.shape[1]] |= m
    keep &= torch.arange(width, device=keep.device).unsqueeze(0) < response_lens.unsqueeze(1)

    seq_index, token_index = keep.nonzero(as_tuple=True)
    positions = first_logit[seq_index] + token_index
    return positions.long(), seq_index.long()


# ---------------------------------------------------------------------------------------------
# Log-probs of the kept rows
# ---------------------------------------------------------------------------------------------
def _logit_row_chunks(logits: torch.Tensor):
    """Row slices of ``logits`` (rows, vocab), :func:`tip_verl.chunking.rows_per_chunk` rows at a time."""
    return row_chunks(logits.shape[0], rows_per_chunk(max(logits.shape[-1], 1), logits.element_size()))


class _LogProbsInplaceBackward(torch.autograd.Function):
    """``log_softmax(logits)[label]`` per row; the backward turns the saved logits into their gradient.

    Same math as verl's ``logprobs_from_logits_v2`` for float32 (``x_label - logsumexp(x)``), but the
    backward needs no new ``(rows, vocab)`` tensors: it overwrites the logits it saved (nothing else
    reads them) with ``-g * softmax`` and adds ``g`` at the labels, as flash-attn's cross-entropy with
    ``inplace_backward=True`` does on GPUs. verl's row-by-row fallback instead keeps the logits plus
    two more full-size gradient buffers alive in the backward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor):
        lse = logits.new_empty(logits.shape[0])
        for sl in _logit_row_chunks(logits):
            lse[sl] = torch.logsumexp(logits[sl], dim=-1)
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, labels, lse)
        return picked - lse

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad = logits  # reused storage: d/dx (x_label - lse) = onehot(label) - softmax(x)
        grad_output = grad_output.to(grad.dtype)
        for sl in _logit_row_chunks(grad):
            grad[sl].sub_(lse[sl].unsqueeze(-1)).exp_().mul_(-grad_output[sl].unsqueeze(-1))
        grad.scatter_add_(-1, labels.unsqueeze(-1), grad_output.unsqueeze(-1))
        return grad, None


def _kept_log_probs(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool) -> torch.Tensor:
    """Log-probs of ``labels`` under ``logits`` (K, vocab), as verl's ``logprobs_from_logits``.

    Where verl would take its row-by-row fallback (no flash-attn / NPU kernel) for float32 logits
    whose storage is free to reuse, the in-place-backward variant above is used instead.
    """
    if (
        inplace_backward
        and logits.dtype in (torch.float32, torch.float64)
        and not getattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)
        and not getattr(verl_F, "NPU_CROSS_ENTROPY_LOSS_AVAILABLE", False)
        and torch.is_grad_enabled()
        and logits.requires_grad
    ):
        return _LogProbsInplaceBackward.apply(logits, labels)
    return logprobs_from_logits(logits=logits, labels=labels, inplace_backward=inplace_backward)


@dataclass
class SparsePlan:
    """What one micro-batch's sparse forward needs; lives in ``output_args`` for one step."""

    positions: torch.Tensor  # (K,) packed logit positions
    seq_index: torch.Tensor  # (K,) sequence of each position
    labels: torch.Tensor  # (K,) token predicted at each position (input_ids at position + 1)
    cu_seqlens: torch.Tensor  # (B + 1,)
    total_nnz: int
    use_remove_padding: bool
    use_fused_kernels: bool
    calculate_entropy: bool
    fired: int = 0
    handle: Any = field(default=None, repr=False)
    # chunked lm_head (non-fused path): the head whose forward is swapped, rows per chunk, the
    # kept rows' temperature, and the tensor the swapped forward returned: (1, K, C), its columns the
    # label log-prob, then (top-k loss) the k log-probs at the teacher's ids, then the entropy if asked
    head: Any = field(default=None, repr=False)
    chunk_rows: Optional[int] = None
    temperature: Optional[torch.Tensor] = None
    head_output: Optional[torch.Tensor] = field(default=None, repr=False)
    # +tip.loss=topk_reverse_kl on the chunked lm_head: the teacher's top-k of the kept rows, (K, k) each
    teacher_logprobs: Optional[torch.Tensor] = field(default=None, repr=False)
    teacher_ids: Optional[torch.Tensor] = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------
def _hf_model(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside FSDP1 / PEFT wrappers (FSDP2 keeps the model object itself)."""
    model = module
    for _ in range(8):
        if hasattr(model, "_fsdp_wrapped_module"):
            model = model._fsdp_wrapped_module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            base = model.get_base_model()
            if base is model:
                break
            model = base
        else:
            break
    return model


class TIPLMHeadMixin:
    """TIP's overrides of ``FSDPEngineWithLMHead`` around the LM head: the update step projects only
    the kept positions (and computes the top-k reverse KL of ``+tip.loss=topk_reverse_kl``); the
    forward-only passes add the teacher's top-k / the student's log-probs at those ids to the outputs."""

    _tip_sparse_request: bool = False
    _tip_sparse_plan: Optional[SparsePlan] = None
    #: the worker settings, set once by :func:`enable_sparse_lm_head` (the defaults until then)
    tip_settings: TIPWorkerConfig = TIPWorkerConfig()

    # -- helpers ----------------------------------------------------------------------------
    def _tip_decoder(self) -> torch.nn.Module:
        model = _hf_model(self.module)
        hf_config = getattr(model, "config", None)
        if hf_config is not None and getattr(hf_config, "vision_config", None) is not None:
            raise _Unsupported(f"multimodal model {type(model).__name__}")
        decoder = getattr(model, "model", None)
        if not isinstance(decoder, torch.nn.Module):
            raise _Unsupported(f"{type(model).__name__} has no '.model' decoder module to gather hidden states from")
        return decoder

    def _tip_unsupported_reason(self, micro_batch) -> Optional[str]:
        if getattr(self, "use_ulysses_sp", False):
            return "Ulysses sequence parallelism (ulysses_sequence_parallel_size > 1) is not covered"
        if self.model_config.get("model_type", "language_model") != "language_model":
            return f"model_type {self.model_config.get('model_type')!r} is not a causal LM"
        get = tu.get_non_tensor_data
        if get(data=micro_batch, key="pad_mode", default=DatasetPadMode.NO_PADDING) != DatasetPadMode.NO_PADDING:
            return "pad_mode other than NO_PADDING"
        if get(data=micro_batch, key="distillation_use_topk", default=False):
            return "top-K distillation needs the full student logits"
        if get(data=micro_batch, key="distillation_only", default=False):
            return "distillation_only (no policy log-probs) is not covered"
        if get(data=micro_batch, key="calculate_sum_pi_squared", default=False):
            return "calculate_sum_pi_squared needs the full logits"
        # verl's V1 agent loop sends an (empty) multi_modal_inputs dict per sample for text models too
        if extract_multi_modal_inputs(micro_batch.get("multi_modal_inputs", [])):
            return "multimodal inputs are not covered"
        if micro_batch["position_ids"].dim() == 3:
            return "3-D (mrope) position ids are not covered"
        return None

    def _tip_plan(self, micro_batch, model_inputs: dict, output_args: dict) -> Optional[SparsePlan]:
        reason = self._tip_unsupported_reason(micro_batch)
        try:
            if reason is None:
                decoder = self._tip_decoder()
                positions, seq_index = kept_logit_positions(micro_batch)
        except _Unsupported as exc:
            reason = str(exc)
        if reason is not None:
            _warn_once(reason)
            return None

        get = tu.get_non_tensor_data
        input_ids = micro_batch["input_ids"]
        values = input_ids.values()
        plan = SparsePlan(
            positions=positions,
            seq_index=seq_index,
            labels=values[positions + 1],
            cu_seqlens=input_ids.offsets(),
            total_nnz=values.shape[0],
            use_remove_padding=bool(get(data=micro_batch, key="use_remove_padding", default=True)),
            use_fused_kernels=bool(get(data=micro_batch, key="use_fused_kernels", default=False)),
            calculate_entropy=bool(get(data=micro_batch, key="calculate_entropy", default=False)),
        )
        if plan.use_fused_kernels:
            # verl's fused forwards take these labels verbatim (dense_common.py: shift_labels).
            model_inputs["shift_labels"] = plan.labels.unsqueeze(0)
        else:
            self._tip_plan_chunked_head(micro_batch, output_args, plan)
        plan.handle = decoder.register_forward_hook(self._tip_make_hook(plan))
        if plan.head is not None:
            plan.head.forward = self._tip_make_chunked_head_forward(plan)
        return plan

    def _tip_plan_chunked_head(self, micro_batch, output_args: dict, plan: SparsePlan) -> None:
        """Set ``plan.head`` (and its chunk size / temperature) when the lm_head can run chunked."""
        chunk_rows = self.tip_settings.lm_head_chunk_rows
        if chunk_rows == 0:
            return
        model = _hf_model(self.module)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(head, torch.nn.Linear) or "forward" in vars(head):
            _warn_once_chunk(f"the lm_head of {type(model).__name__} is not a plain nn.Linear")
            return
        hf_config = getattr(model, "config", None)
        for name in _LOGIT_POSTPROCESSING:
            value = getattr(hf_config, name, None)
            if value is not None and value not in (0, 1, 1.0):
                _warn_once_chunk(f"{type(model).__name__} rescales its logits ({name}={value})")
                return
        if not output_args.get("temperature_is_one", False):
            if plan.use_remove_padding:
                plan.temperature = output_args["temperature_rmpad"][plan.positions]
            else:
                plan.temperature = output_args["temperature"][plan.seq_index]
        if self.tip_settings.loss == "topk_reverse_kl":  # the head returns the log-probs at these ids too
            teacher_logprobs, teacher_ids = topk_signal.teacher_rows_for_kept(micro_batch, plan.positions,
                                                                             plan.seq_index)
            plan.teacher_logprobs = teacher_logprobs.to(plan.positions.device)
            plan.teacher_ids = teacher_ids.to(plan.positions.device, torch.long)
        plan.head = head
        plan.chunk_rows = chunk_rows

    @staticmethod
    def _tip_make_chunked_head_forward(plan: SparsePlan):
        head = plan.head

        def chunked_lm_head(hidden: torch.Tensor) -> torch.Tensor:
            del head.forward  # one call only: later calls of this module are plain nn.Linear again
            if plan.head_output is not None or not plan.fired:
                raise RuntimeError("tip_verl sparse lm_head: the lm_head ran before the decoder hook or twice")
            hidden = hidden.reshape(-1, hidden.shape[-1])
            if hidden.shape[0] != plan.positions.shape[0]:
                raise RuntimeError(
                    f"tip_verl sparse lm_head: the lm_head got {hidden.shape[0]} rows for {plan.positions.shape[0]} kept"
                )
            weight, bias = head.weight, head.bias
            if isinstance(weight, DTensor):
                weight = weight.full_tensor()
            if isinstance(bias, DTensor):
                bias = bias.full_tensor()
            labels = plan.labels
            if plan.teacher_ids is not None:  # (K, 1 + k): the label, then the teacher's top-k ids
                labels = torch.cat([labels.unsqueeze(-1), plan.teacher_ids.to(labels.device)], dim=-1)
            log_probs, entropy = kept_logprobs(
                hidden, weight, labels, bias=bias, temperature=plan.temperature,
                return_entropy=plan.calculate_entropy, chunk_rows=plan.chunk_rows,
            )
            columns = [log_probs.unsqueeze(-1) if log_probs.dim() == 1 else log_probs]
            if plan.calculate_entropy:
                columns.append(entropy.unsqueeze(-1))
            # (1, K, C), a fresh tensor, not a view: FSDP2 hooks its backward onto the module output
            plan.head_output = torch.cat([c.unsqueeze(0) for c in columns], dim=-1)
            return plan.head_output

        return chunked_lm_head

    @staticmethod
    def _tip_make_hook(plan: SparsePlan):
        def gather_hidden_states(module, args, output):
            if plan.fired:
                raise RuntimeError("tip_verl sparse lm_head: the decoder ran twice in one forward step")
            plan.fired += 1
            is_tuple = isinstance(output, tuple)
            hidden = output[0] if is_tuple else output.last_hidden_state
            if isinstance(hidden, DTensor):
                raise RuntimeError("tip_verl sparse lm_head: hidden states are DTensors (tensor parallel); unsupported")
            hidden_size = hidden.shape[-1]
            if plan.use_remove_padding:
                if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] < plan.total_nnz:
                    raise RuntimeError(f"tip_verl sparse lm_head: unexpected packed hidden shape {tuple(hidden.shape)}")
                flat_index = plan.positions
            else:
                seq_len = hidden.shape[1]
                if hidden.dim() != 3 or hidden.shape[0] != plan.cu_seqlens.shape[0] - 1:
                    raise RuntimeError(f"tip_verl sparse lm_head: unexpected padded hidden shape {tuple(hidden.shape)}")
                local = plan.positions - plan.cu_seqlens[plan.seq_index]
                flat_index = plan.seq_index * seq_len + local
            gathered = hidden.reshape(-1, hidden_size).index_select(0, flat_index).unsqueeze(0)  # (1, K, H)
            if is_tuple:
                return (gathered, *output[1:])
            output.last_hidden_state = gathered
            return output

        return gather_hidden_states

    # -- overrides of FSDPEngineWithLMHead ----------------------------------------------------
    def forward_step(self, micro_batch, loss_function, forward_only):
        if forward_only or loss_function is None or not torch.is_grad_enabled() or not self.tip_settings.sparse_lm_head:
            return super().forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
        self._tip_sparse_request = True
        try:
            return super().forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
        finally:
            self._tip_sparse_request = False
            plan, self._tip_sparse_plan = self._tip_sparse_plan, None
            if plan is not None and plan.handle is not None:
                plan.handle.remove()
            if plan is not None and plan.head is not None and "forward" in vars(plan.head):
                del plan.head.forward

    def prepare_model_inputs(self, micro_batch):
        model_inputs, output_args = super().prepare_model_inputs(micro_batch=micro_batch)
        if self._tip_sparse_request and self._tip_sparse_plan is None:
            plan = self._tip_plan(micro_batch, model_inputs, output_args)
            if plan is not None:
                self._tip_sparse_plan = plan
                output_args["tip_sparse_plan"] = plan
        return model_inputs, output_args

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        plan: Optional[SparsePlan] = output_args.get("tip_sparse_plan")
        wanted = topk_signal.requests(micro_batch)
        if plan is None:
            model_output = super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
            if "teacher_k" in wanted or "gather_from" in wanted:  # forward-only passes of teacher_signal=topk
                use_remove_padding = bool(tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding",
                                                                 default=True))
                model_output.update(
                    topk_signal.inference_outputs(output, output_args, micro_batch, wanted, use_remove_padding)
                )
            return model_output
        if plan.handle is not None:
            plan.handle.remove()
            plan.handle = None
        if plan.head is not None and "forward" in vars(plan.head):
            del plan.head.forward
        if not plan.fired:
            if plan.use_fused_kernels:
                raise RuntimeError("tip_verl sparse lm_head: the decoder hook did not run on the fused-kernel path")
            _warn_once(f"the forward of {type(_hf_model(self.module)).__name__} did not call its '.model' decoder")
            return super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        return self._tip_sparse_outputs(output, output_args, plan, micro_batch,
                                        topk_loss=self.tip_settings.loss == "topk_reverse_kl")

    def _tip_sparse_outputs(self, output, output_args, plan: SparsePlan, micro_batch, topk_loss: bool = False) -> dict:
        num_kept = plan.positions.shape[0]
        entropy_k = None
        reverse_kl_k = None
        if plan.use_fused_kernels and topk_loss:
            raise topk_signal.TopKSignalError(
                "+tip.loss=topk_reverse_kl needs the kept rows' logits: set actor_rollout_ref.model.use_fused_kernels=False"
            )
        if plan.use_fused_kernels:
            log_probs_k = output.log_probs.reshape(-1)
            if plan.calculate_entropy:
                entropy_k = output.entropy.reshape(-1)
        elif plan.head is not None:
            # chunked lm_head: the model returned what the swapped lm_head forward produced; the loss
            # must read that tensor (FSDP's backward hooks on the lm_head output are attached to it)
            if plan.head_output is None or output.logits is not plan.head_output:
                raise RuntimeError(
                    "tip_verl sparse lm_head: the model post-processed the lm_head output; "
                    "set +tip.lm_head_chunk_rows=0 for this model"
                )
            log_probs_k = output.logits[0, :, 0]
            if plan.calculate_entropy:
                entropy_k = output.logits[0, :, -1]
            if topk_loss:  # the top-k reverse KL from the log-probs at the teacher's ids (columns 1..k)
                if plan.teacher_logprobs is None:
                    raise RuntimeError("tip_verl sparse lm_head: the chunked lm_head has no teacher top-k")
                k = plan.teacher_logprobs.shape[-1]
                reverse_kl_k = topk_signal.topk_reverse_kl_from_logprobs(output.logits[0, :, 1:1 + k],
                                                                          plan.teacher_logprobs)
        else:
            logits = output.logits
            if isinstance(logits, DTensor):
                logits = logits.full_tensor()
            logits = logits.reshape(-1, logits.shape[-1])  # (K, vocab)
            if plan.use_remove_padding:
                temperature = output_args["temperature_rmpad"][plan.positions]
            else:
                temperature = output_args["temperature"][plan.seq_index]
            logits = _scale_logits_by_temperature(
                logits,
                temperature.unsqueeze(-1),
                is_unit_temperature=output_args.get("temperature_is_one", False),
            )
            if num_kept == 0:
                # Nothing kept in this micro-batch: verl's row-wise helpers cannot stack zero rows.
                # An empty sum keeps the (empty) autograd graph so backward still runs.
                log_probs_k = logits.sum(dim=-1)
                entropy_k = log_probs_k if plan.calculate_entropy else None
                reverse_kl_k = log_probs_k if topk_loss else None
            else:
                if plan.calculate_entropy:  # as verl does it, on the kept rows only
                    if self.engine_config.entropy_checkpointing:
                        entropy_k = torch.utils.checkpoint.checkpoint(self.compute_entropy_from_logits, logits)
                    elif self.engine_config.entropy_from_logits_with_chunking:
                        entropy_k = self.compute_entropy_from_logits(
                            logits, chunk_size=self.engine_config.entropy_from_logits_chunk_size
                        )
                    else:
                        entropy_k = self.compute_entropy_from_logits(logits)
                if topk_loss:  # the top-k reverse KL (and the label log-probs) of the kept rows
                    log_probs_k, reverse_kl_k = topk_signal.kept_topk_loss_outputs(
                        logits, plan.labels, micro_batch, plan.positions, plan.seq_index
                    )
                else:  # entropy reads the logits in its backward: then they must not be overwritten
                    log_probs_k = _kept_log_probs(logits, plan.labels, inplace_backward=not plan.calculate_entropy)
        if log_probs_k.shape[0] != num_kept:
            raise RuntimeError(
                f"tip_verl sparse lm_head: got {log_probs_k.shape[0]} log-probs for {num_kept} kept positions"
            )

        def scatter(values_k: torch.Tensor) -> torch.Tensor:
            full = values_k.new_zeros(plan.total_nnz)
            full = full.index_copy(0, plan.positions, values_k)
            return torch.nested.nested_tensor_from_jagged(full, plan.cu_seqlens)

        model_output = {"log_probs": scatter(log_probs_k)}
        if plan.calculate_entropy:
            model_output["entropy"] = scatter(entropy_k)
        if reverse_kl_k is not None:
            model_output[topk_signal.TOPK_REVERSE_KL] = scatter(reverse_kl_k)
        return model_output


class TIPLMHeadFSDPEngine(TIPLMHeadMixin, FSDPEngineWithLMHead):
    """``FSDPEngineWithLMHead`` with TIP's LM-head stage (FSDP and FSDP2)."""


_OVERRIDDEN = ("forward_step", "prepare_model_inputs", "prepare_model_outputs")
_SPARSE_CLASSES: dict[type, type] = {FSDPEngineWithLMHead: TIPLMHeadFSDPEngine}


def sparse_engine_class(engine_cls: type) -> Optional[type]:
    """The sparse variant of ``engine_cls``, or ``None`` when the sparse path does not apply to it.

    It applies to ``FSDPEngineWithLMHead`` and to subclasses (e.g. a device-specific registration)
    that keep its three forward methods as they are.
    """
    if issubclass(engine_cls, TIPLMHeadMixin):
        return engine_cls
    if engine_cls in _SPARSE_CLASSES:
        return _SPARSE_CLASSES[engine_cls]
    if not issubclass(engine_cls, FSDPEngineWithLMHead) or issubclass(engine_cls, FSDPEngineWithValueHead):
        return None
    if any(getattr(engine_cls, name) is not getattr(FSDPEngineWithLMHead, name) for name in _OVERRIDDEN):
        return None
    sparse_cls = type(f"TIPLMHead{engine_cls.__name__}", (TIPLMHeadMixin, engine_cls), {})
    sparse_cls.__module__ = __name__
    _SPARSE_CLASSES[engine_cls] = sparse_cls
    return sparse_cls


def enable_sparse_lm_head(engine, settings: Optional[TIPWorkerConfig] = None):
    """Give a freshly built (not yet initialised) engine TIP's LM-head stage, with its ``settings``.

    Returns the same object, its class switched to :func:`sparse_engine_class` of its class (the
    subclass only adds methods) and ``settings`` (default: :class:`TIPWorkerConfig`'s defaults) stored
    as its ``tip_settings``, which every micro-batch reads. An engine the sparse path does not cover is
    returned unchanged after a one-time warning.
    """
    sparse_cls = sparse_engine_class(type(engine))
    if sparse_cls is None:
        _warn_once(f"engine {type(engine).__module__}.{type(engine).__qualname__} is not covered")
        return engine
    if type(engine) is not sparse_cls:
        engine.__class__ = sparse_cls
    engine.tip_settings = TIPWorkerConfig() if settings is None else settings
    return engine


class TIPLMHeadTrainingWorker(TrainingWorker):
    """verl's ``TrainingWorker`` whose engine has TIP's LM-head stage (the update step's lm_head at kept tokens).

    Set as ``ActorRolloutRefWorker.actor_worker_cls`` by the TIP worker, as :meth:`with_settings` of the
    worker's :class:`TIPWorkerConfig`. The engine is built by verl's ``EngineRegistry`` exactly as in
    ``TrainingWorker.__init__`` and upgraded before ``reset()`` initialises it; log-prob passes
    (``infer_batch``) are unchanged.
    """

    #: handed to the engine once, when it is built
    tip_settings: TIPWorkerConfig = TIPWorkerConfig()

    @classmethod
    def with_settings(cls, settings: TIPWorkerConfig) -> type:
        """This class with ``settings`` (verl builds ``actor_worker_cls(config=...)`` itself)."""
        return type(cls.__name__, (cls,), {"tip_settings": settings, "__module__": cls.__module__})

    def __init__(self, config):
        super().__init__(config)
        self.engine = enable_sparse_lm_head(self.engine, self.tip_settings)

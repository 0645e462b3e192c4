"""The ``hf`` rollout's generator: batched, left-padded Hugging Face ``generate`` with per-sequence sampling.

Reproducibility: every sampled sequence draws from its own ``torch.Generator``, seeded from the
request's ``seed`` or, as verl's agent loop sends none, from ``actor_rollout_ref.rollout.seed``, the
prompt and how many times this server has seen that prompt. A request's samples therefore do not
depend on which other requests share its batch or in which order requests arrive.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Optional

import torch

from .hf_sampling import SamplingSpec, _RowSampler, derive_seed

class HFGenerator:
    """Batched generation and prompt log-probs for one Hugging Face causal LM on the host."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        logprobs_mode: str = "processed_logprobs",
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        if logprobs_mode not in ("processed_logprobs", "raw_logprobs"):
            raise ValueError(f"hf rollout supports logprobs_mode processed_logprobs|raw_logprobs, got {logprobs_mode!r}")
        self.logprobs_mode = logprobs_mode
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        ).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        try:
            gen_cfg = GenerationConfig.from_pretrained(model_path)
        except Exception:  # noqa: BLE001 - no generation_config.json
            gen_cfg = self.model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else self.tokenizer.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(int(e) for e in eos)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else (self.eos_token_ids or (0,))[0]
        self.pad_token_id = int(pad)
        self.abort_all = threading.Event()  # set -> the running generate stops at the next token

    # ------------------------------------------------------------------ padding helpers
    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        return ids, mask

    # ------------------------------------------------------------------ prompt log-probs
    @torch.inference_mode()
    def prompt_logprobs(self, prompts: list[list[int]], k: int) -> list[tuple[list[list[int]], list[list[float]]]]:
        """vLLM-layout prompt log-probs for each prompt (see module docstring)."""
        ids, mask = self._left_pad(prompts)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        k = min(k, logp.shape[-1])
        width = max(1, k)
        out = []
        for i, p in enumerate(prompts):
            start = ids.shape[1] - len(p)
            lp = logp[i, start : ids.shape[1] - 1]  # predicts tokens 1..S-1
            if k == 0:
                nxt = torch.tensor(p[1:], dtype=torch.long).unsqueeze(-1)
                top_ids, top_lp = nxt, lp.gather(-1, nxt)
            else:
                top_lp, top_ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
            rows_ids = top_ids.tolist() + [[0] * width]
            rows_lp = top_lp.tolist() + [[0.0] * width]
            out.append((rows_ids, rows_lp))
        return out

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], spec: SamplingSpec, max_tokens: int, seeds: Optional[list[int]] = None
    ) -> list[list[dict]]:
        """Generate ``spec.n`` samples per prompt; returns, per prompt, a list of
        ``{"token_ids", "log_probs", "finish_reason"}`` dicts.

        Sample ``j`` of prompt ``i`` draws from a generator seeded with ``derive_seed(seeds[i], j)``,
        whatever else is in the batch (``seeds`` default: one per position, from ``spec.seed`` or 0).
        """
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        ids, mask = self._left_pad([p for p in prompts for _ in range(spec.n)])  # row i * n + j: sample j of prompt i
        prompt_width = ids.shape[1]
        stop_ids = () if spec.ignore_eos else tuple(dict.fromkeys(self.eos_token_ids + spec.stop_token_ids))
        generator = self

        class _Abort(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), generator.abort_all.is_set(), dtype=torch.bool)

        gen_kwargs = dict(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            min_new_tokens=min(spec.min_tokens, max_tokens) if spec.min_tokens else None,
            do_sample=False,  # sampling (when asked) is done by _RowSampler with per-request generators
            repetition_penalty=spec.repetition_penalty,
            eos_token_id=list(stop_ids) if stop_ids else None,
            pad_token_id=self.pad_token_id,
            output_scores=spec.want_logprobs and self.logprobs_mode == "processed_logprobs" and spec.greedy,
            output_logits=spec.want_logprobs and self.logprobs_mode == "raw_logprobs",
            return_dict_in_generate=True,
            stopping_criteria=StoppingCriteriaList([_Abort()]),
            use_cache=True,
        )
        sampler = None
        if not spec.greedy:
            if seeds is None:
                seeds = [derive_seed(spec.seed or 0, i) for i in range(len(prompts))]
            generators = [
                torch.Generator().manual_seed(derive_seed(seeds[i], j)) for i in range(len(prompts)) for j in range(spec.n)
            ]
            sampler = _RowSampler(spec, generators)
            gen_kwargs["logits_processor"] = LogitsProcessorList([sampler])
        if not stop_ids:
            # Without EOS ids HF would fall back to the model's generation_config; an impossible
            # id list is not accepted either, so disable EOS stopping explicitly.
            gen_kwargs["eos_token_id"] = None
        out = self.model.generate(**gen_kwargs)
        seqs = out.sequences[:, prompt_width:]
        step_lp = None  # (B*n, T): log-prob of each generated token
        if spec.want_logprobs:
            if self.logprobs_mode == "raw_logprobs" and out.logits:
                raw = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.logits], dim=1)
                step_lp = raw.gather(-1, seqs[:, : raw.shape[1], None])[..., 0]
            elif sampler is not None and sampler.step_logprobs:
                step_lp = torch.stack(sampler.step_logprobs, dim=1)
            elif out.scores:
                processed = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)
                step_lp = processed.gather(-1, seqs[:, : processed.shape[1], None])[..., 0]
        results: list[list[dict]] = []
        aborted = self.abort_all.is_set()
        for i in range(len(prompts)):
            samples = []
            for j in range(spec.n):
                row = i * spec.n + j
                toks = seqs[row].tolist()
                finish = "length"
                cut = len(toks)
                for pos, t in enumerate(toks):
                    if t in stop_ids:
                        cut, finish = pos + 1, "stop"
                        break
                if finish == "length" and cut < max_tokens:
                    finish = "abort" if aborted else "length"
                toks = toks[:cut]
                lps = None
                if step_lp is not None:
                    lps = step_lp[row, : len(toks)].tolist()
                samples.append({"token_ids": toks, "log_probs": lps, "finish_reason": finish})
            results.append(samples)
        return results

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, peft_config: Optional[dict] = None,
                     adapters: bool = False) -> dict[str, Any]:
        """Copy weights into the model, by name.

        A LoRA student (``peft_config``: the adapter's PEFT config as a dict, what verl sends vLLM) turns the model
        into a PEFT model with that adapter on first use; its base weights then arrive under PEFT's names
        (``q_proj.base_layer.weight``), and with ``adapters=True`` the adapter weights (PEFT's saved names), so
        generation runs the adapted student exactly as the actor does (base layer plus low-rank update, unmerged).
        """
        if peft_config is not None and not hasattr(self.model, "peft_config"):
            from peft import get_peft_config, get_peft_model

            self.model = get_peft_model(self.model, get_peft_config(dict(peft_config))).eval()
            self.model.requires_grad_(False)
        if adapters:
            from peft import set_peft_model_state_dict

            tensors = dict(named_tensors)
            result = set_peft_model_state_dict(self.model, tensors)
            if result.unexpected_keys or not tensors:
                raise ValueError(f"hf rollout: adapter weights the model does not have: {result.unexpected_keys[:8]}")
            return {"loaded": len(tensors), "adapters": True}
        model = self.model.get_base_model() if hasattr(self.model, "peft_config") else self.model
        state = model.state_dict()
        unexpected, loaded = [], 0
        for name, tensor in named_tensors:
            target = state.get(name)
            if target is None:
                unexpected.append(name)
                continue
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name}: shape {tuple(tensor.shape)} != model's {tuple(target.shape)}")
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            loaded += 1
        if unexpected:
            raise ValueError(f"hf rollout: received weights the model does not have: {unexpected[:8]}")
        if loaded == 0:
            raise ValueError("hf rollout: weight update carried no tensors")
        return {"loaded": loaded}

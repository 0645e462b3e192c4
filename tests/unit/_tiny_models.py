"""Builders for tests that run verl's real engine on tiny random Hugging Face models on the CPU.

Single process, no Ray: the environment of a one-rank job (RANK/WORLD_SIZE/MASTER_*), the CPU
platform of tip_verl, verl's hydra config for ``actor_rollout_ref``, and update batches in the
no-padding (nested) layout verl's V1 trainer sends to ``update_actor``, or in the left/right padded
layout converted by verl's ``left_right_2_no_padding``. Engine tests run their engines in a child
process (:func:`run_engine_child`) and compare with :func:`assert_close`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from tip_verl.verl_adapter.cpu_overrides import cpu_env, fsdp2_engine_overrides
from tip_verl.verl_adapter.local_workers import compose_ppo_config, free_port, update_meta, world_of_one_env

__all__ = ["actor_config", "assert_close", "assert_same_update", "build_tiny_qwen2", "environ_reads", "free_port", "random_rollout",
           "run_engine_child", "setup_cpu_verl", "single_process_env", "tip_worker_config", "update_batch",
           "write_engine_results"]

#: float32 tolerance of the exactness tests (sparse / chunked lm_head against verl's full logits)
RTOL, ATOL = 1e-5, 1e-6


def write_engine_results(out_dir, results: dict) -> None:
    """What an engine child process hands back to :func:`run_engine_child` (tensors and lists in a dict)."""
    out = Path(out_dir)
    torch.save(results, out / "results.pt")
    (out / "done.json").write_text(json.dumps({"cases": sorted(results.get("cases", {}))}))


def run_engine_child(script, out_dir, *, timeout: int = 1500) -> dict:
    """Run ``script`` (a test file whose ``__main__`` writes its results into its argument with
    :func:`write_engine_results`) in a fresh process and load what it wrote.

    verl resolves its platform once per process and the child creates its own one-rank process group,
    so the engine cases do not depend on which other tests imported verl first.
    """
    out = Path(out_dir)
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), str(out)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0 or not (out / "results.pt").exists():
        raise AssertionError(f"engine child process failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return torch.load(out / "results.pt", weights_only=False)


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, *, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{what}: max |diff| {(a - b).abs().max().item():.3e}"


@contextlib.contextmanager
def environ_reads(prefix: str = "TIP_VERL"):
    """The keys starting with ``prefix`` that code inside the block reads from ``os.environ`` (a list, filled
    as they are read: ``os.environ[...]``, ``.get``, ``os.getenv``, ``in``)."""
    reads: list[str] = []
    real = os.environ

    class _Counting(type(real)):
        def __getitem__(self, key):
            if str(key).startswith(prefix):
                reads.append(str(key))
            return super().__getitem__(key)

    os.environ = _Counting(real._data, real.encodekey, real.decodekey, real.encodevalue, real.decodevalue)
    try:
        yield reads
    finally:
        os.environ = real


def assert_same_update(result: dict, what: str, *, nonzero=("lm_head", "embed_tokens")) -> None:
    """An engine case's ``loss_sparse`` / ``grads_sparse`` equal ``loss_full`` / ``grads_full`` (verl's own
    path), every gradient float32, and the reference gradients of the ``nonzero`` parameters are not zero."""
    assert_close(result["loss_sparse"], result["loss_full"], f"{what} loss")
    assert result["grads_full"].keys() == result["grads_sparse"].keys()
    for name, g_full in result["grads_full"].items():
        if any(part in name for part in nonzero):
            assert g_full.abs().sum() > 0, f"{what}: reference gradient of {name} is zero"
        assert result["grads_sparse"][name].dtype == torch.float32
        assert_close(result["grads_sparse"][name], g_full, f"{what} grad {name}")


def tip_worker_config(actor_rollout_ref, **settings):
    """A copy of ``actor_rollout_ref`` with the ``tip_worker`` node the tip_sync trainer writes (``settings``:
    :class:`~tip_verl.verl_adapter.opd_config.TIPWorkerConfig` fields), for ``TIPActorRolloutRefWorker``."""
    from omegaconf import open_dict

    from tip_verl.verl_adapter.opd_config import WORKER_NODE, TIPWorkerConfig

    cfg = actor_rollout_ref.copy()
    with open_dict(cfg):
        cfg[WORKER_NODE] = TIPWorkerConfig(**settings).to_node()
    return cfg


def single_process_env(port: Optional[int] = None) -> dict[str, str]:
    """Environment of a one-rank torch.distributed job on the CPU platform (set it before importing verl)."""
    return {**world_of_one_env(port), **cpu_env()}


def setup_cpu_verl(port: Optional[int] = None) -> None:
    """Prepare this process for verl engines on the CPU: environment, then tip_verl's CPU platform.

    Call it before anything imports verl: verl resolves its platform once per process.
    """
    os.environ.update(single_process_env(port))
    from tip_verl.verl_adapter.cpu import register

    if not register():
        raise RuntimeError("tip_verl's CPU platform did not register (VERL_PLATFORM=cpu is set)")


def build_tiny_qwen2(
    path,
    *,
    vocab_size: int = 256,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: Optional[int] = None,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    tokenizer_size: Optional[int] = None,
) -> str:
    """Save a random-weight Qwen2ForCausalLM (float32) and a word-level tokenizer under ``path``."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = str(path)
    os.makedirs(path, exist_ok=True)
    n_tok = min(tokenizer_size or vocab_size, vocab_size)
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "\n"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(n_tok - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens([AddedToken("\n", normalized=False)])  # verl's Qwen ChatML handling needs "\n" == one token
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>", bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    hf_tok.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    hf_tok.save_pretrained(path)

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.save_pretrained(path)
    return path


def actor_config(model_path: str, overrides: Sequence[str] = ()):
    """verl's ``actor_rollout_ref`` config (hydra, ``ppo_trainer``) for a float32 FSDP2 actor on the CPU.

    ``overrides`` (hydra syntax) replace the defaults below that set the same key.
    """
    base = [
        f"actor_rollout_ref.model.path={model_path}",
        "actor_rollout_ref.model.use_remove_padding=True",
        "actor_rollout_ref.model.enable_gradient_checkpointing=False",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.actor.strategy=fsdp2",
        *fsdp2_engine_overrides("actor", model_dtype="float32"),
        "actor_rollout_ref.actor.use_torch_compile=False",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=64",
        "actor_rollout_ref.actor.use_kl_loss=True",
        "actor_rollout_ref.actor.kl_loss_coef=0.1",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.rollout.n=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=64",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
        "trainer.device=cpu",
        "trainer.n_gpus_per_node=1",
    ]
    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    overridden = {key(o) for o in overrides}
    base = [o for o in base if key(o) not in overridden]
    return compose_ppo_config(base + list(overrides)).actor_rollout_ref


def random_rollout(
    *,
    batch_size: int,
    vocab_size: int,
    prompt_lens: Sequence[int],
    response_lens: Sequence[int],
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Left-padded prompts + right-padded responses with random tokens (verl's padded rollout layout)."""
    g = torch.Generator().manual_seed(seed)
    P, R = max(prompt_lens), max(response_lens)
    prompts = torch.zeros(batch_size, P, dtype=torch.long)
    responses = torch.zeros(batch_size, R, dtype=torch.long)
    prompt_mask = torch.zeros(batch_size, P, dtype=torch.long)
    response_mask = torch.zeros(batch_size, R, dtype=torch.long)
    for i in range(batch_size):
        p, r = prompt_lens[i], response_lens[i]
        prompts[i, P - p :] = torch.randint(3, vocab_size, (p,), generator=g)
        prompt_mask[i, P - p :] = 1
        responses[i, :r] = torch.randint(3, vocab_size, (r,), generator=g)
        response_mask[i, :r] = 1
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = torch.clamp(torch.cumsum(attention_mask, dim=1) - 1, min=0)
    return {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_mask": response_mask,
    }


def update_batch(
    rollout: dict[str, torch.Tensor],
    keep_mask: torch.Tensor,
    *,
    layout: str = "nested",
    seed: int = 0,
    temperature: float = 1.0,
    calculate_entropy: bool = False,
    empty_multi_modal_inputs: bool = False,
    **meta,
):
    """The TensorDict verl's actor ``train_mini_batch`` / ``train_batch`` receives.

    ``keep_mask`` (bsz, response_len) is written into both ``response_mask`` and ``loss_mask`` as the
    TIP trainer does. ``layout="nested"`` mirrors verl's V1 trainer (every per-sample field jagged);
    ``layout="padded"`` converts verl's padded rollout with ``left_right_2_no_padding``.
    ``empty_multi_modal_inputs`` adds the empty per-sample ``multi_modal_inputs`` dicts verl's V1 agent
    loop sends for text-only models.
    """
    from tensordict import TensorDict

    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(seed + 1)
    response_mask = rollout["response_mask"]
    keep = (keep_mask.bool() & response_mask.bool()).long()
    bsz, R = response_mask.shape
    old_log_probs = -torch.rand(bsz, R, generator=g) * 3 * response_mask
    ref_log_prob = -torch.rand(bsz, R, generator=g) * 3 * response_mask
    advantages = torch.randn(bsz, R, generator=g) * keep

    if layout == "padded":
        td = TensorDict(
            {**rollout, "response_mask": keep, "old_log_probs": old_log_probs, "ref_log_prob": ref_log_prob,
             "advantages": advantages},
            batch_size=bsz,
        )
        td = left_right_2_no_padding(td)
    elif layout == "nested":
        attention_mask = rollout["attention_mask"].bool()
        P = rollout["prompts"].shape[1]
        prompt_valid, resp_valid = attention_mask[:, :P], attention_mask[:, P:]

        def jag(rows):
            return torch.nested.as_nested_tensor(list(rows), layout=torch.jagged)

        fields = {
            "prompts": jag(rollout["prompts"][i][prompt_valid[i]] for i in range(bsz)),
            "responses": jag(rollout["responses"][i][resp_valid[i]] for i in range(bsz)),
            "input_ids": jag(rollout["input_ids"][i][attention_mask[i]] for i in range(bsz)),
            "position_ids": jag(rollout["position_ids"][i][attention_mask[i]] for i in range(bsz)),
        }
        for name, t in (("response_mask", keep), ("loss_mask", keep), ("old_log_probs", old_log_probs),
                        ("ref_log_prob", ref_log_prob), ("advantages", advantages)):
            fields[name] = jag(t[i][resp_valid[i]] for i in range(bsz))
        td = TensorDict(fields, batch_size=bsz)
    else:
        raise ValueError(layout)
    if empty_multi_modal_inputs:
        tu.assign_non_tensor_stack(td, "multi_modal_inputs", [{} for _ in range(bsz)])
    tu.assign_non_tensor(td, **update_meta(bsz, seed=seed, temperature=temperature, calculate_entropy=calculate_entropy,
                                           compute_loss=True, multi_turn=False, **meta))
    return td

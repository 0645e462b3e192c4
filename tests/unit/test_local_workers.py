"""verl's ActorRolloutRefWorker built in this process on the CPU (no Ray), and the CPU start-up checks.

References are computed directly with ``transformers`` on the same checkpoints, in float32.
"""

import functools
import json
import os
import shutil

import pytest
import torch

# Select verl's CPU platform for this test process before verl is first imported (see conftest).
os.environ.setdefault("VERL_PLATFORM", "cpu")

PROMPTS = ["What is 12 + 7?", "What is 305 + 41?", "What is 9 + 9?", "What is 100 + 250?"]


@pytest.fixture(scope="module")
def workers(tiny_assets):
    from tip_verl.verl_adapter.local_workers import build_local_workers

    # a small lr: a fresh AdamW step moves every weight by ~lr, and at the harness default (1e-3) one such step
    # knocks the half-trained student far from where the first-order effect of the advantages shows
    w = build_local_workers(str(tiny_assets.student), ref_model_path=str(tiny_assets.teacher),
                            overrides=["actor_rollout_ref.actor.optim.lr=1e-5"])
    yield w
    w.close()


@pytest.fixture(scope="module")
def batch(workers):
    return workers.make_batch(PROMPTS, max_new_tokens=8, seed=0)


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


@torch.no_grad()
def hf_response_stats(model, batch):
    """Per-sample (unpadded) forward: log-probs and entropies of the response tokens, padded to [B, R]."""
    B, R = batch["responses"].shape
    lps, ents = torch.zeros(B, R), torch.zeros(B, R)
    for i in range(B):
        prompt = batch["prompts"][i][batch["attention_mask"][i, : batch["prompts"].shape[1]].bool()]
        n = int(batch["response_mask"][i].sum())
        resp = batch["responses"][i, :n]
        logits = model(torch.cat([prompt, resp])[None]).logits[0, len(prompt) - 1 : -1].float()
        logp = torch.log_softmax(logits, -1)
        lps[i, :n] = logp.gather(-1, resp[:, None])[:, 0]
        ents[i, :n] = -(logp.exp() * logp).sum(-1)
    return lps, ents


def test_batch_is_in_verls_layout(workers, batch):
    B, P = batch["prompts"].shape
    R = batch["responses"].shape[1]
    assert B == len(PROMPTS) and R == 8
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["position_ids"].shape == (B, P + R)
    assert torch.equal(batch["input_ids"], torch.cat([batch["prompts"], batch["responses"]], 1))
    assert torch.equal(batch["attention_mask"][:, P:], batch["response_mask"])
    # prompts are left-padded, responses right-padded; positions count the real tokens
    prompt_mask = batch["attention_mask"][:, :P]
    assert (prompt_mask[:, -1] == 1).all() and (prompt_mask.diff(dim=1) >= 0).all()
    assert (batch["response_mask"][:, 0] == 1).all() and (batch["response_mask"].diff(dim=1) <= 0).all()
    real = batch["attention_mask"].bool()
    for i in range(B):
        assert batch["position_ids"][i][real[i]].tolist() == list(range(int(real[i].sum())))
    # the prompts are the chat-templated questions
    text = workers.tokenizer.decode(batch["prompts"][0][prompt_mask[0].bool()].tolist())
    assert PROMPTS[0].replace(" ", "") in text.replace(" ", "") and "assistant" in text


def test_actor_log_probs_equal_hf_float32(workers, batch, tiny_assets):
    out = workers.log_probs(batch, entropy=True)
    ref_lp, ref_ent = hf_response_stats(_hf(str(tiny_assets.student)), batch)
    mask = batch["response_mask"].bool()
    assert out["log_probs"].shape == out["entropy"].shape == batch["responses"].shape
    # float32 end to end (bf16 would be off by ~1e-2)
    torch.testing.assert_close(out["log_probs"][mask], ref_lp[mask], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out["entropy"][mask], ref_ent[mask], atol=2e-5, rtol=1e-5)
    assert (out["log_probs"][~mask] == 0).all()
    # and equal to the log-probs the HF generator reported while sampling (temperature 1)
    torch.testing.assert_close(out["log_probs"][mask], batch["rollout_log_probs"][mask], atol=2e-5, rtol=1e-5)


def test_ref_worker_loads_the_other_checkpoint(workers, batch, tiny_assets):
    ref = workers.ref_log_probs(batch)
    teacher_lp, _ = hf_response_stats(_hf(str(tiny_assets.teacher)), batch)
    mask = batch["response_mask"].bool()
    torch.testing.assert_close(ref[mask], teacher_lp[mask], atol=2e-5, rtol=1e-5)
    assert (ref[mask] - workers.log_probs(batch)["log_probs"][mask]).abs().max() > 1e-2  # not the student


def test_update_moves_log_probs_along_the_advantages(workers, batch):
    before = workers.log_probs(batch)["log_probs"]
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    metrics = workers.update(batch, adv, old_log_probs=before)
    assert {"actor/pg_loss", "grad_norm", "lr"} <= set(metrics)
    assert metrics["grad_norm"][0] > 0
    # the CPU engine's optimizer step reports its own peak memory (UpdateMemoryWindow)
    (peak,), (increase,) = metrics["perf/update_peak_memory_gb"], metrics["perf/update_memory_increase_gb"]
    assert 0 < increase < peak <= metrics["perf/max_memory_allocated_gb"][0] + 1e-3
    after = workers.log_probs(batch)["log_probs"]
    mask = batch["response_mask"].bool()
    delta = ((after - before) * mask).sum(-1)  # change of each response's total log-prob
    assert (after - before)[mask].abs().max() > 1e-4
    assert (delta * adv).sum() > 0  # positive-advantage responses gained probability relative to the others
    # a weight sync makes the HF generator agree with the updated actor
    workers.sync_generator()
    synced = workers.make_batch(PROMPTS, responses=[r[m.bool()].tolist() for r, m in zip(batch["responses"], batch["response_mask"])])
    regen = workers.generator()
    assert regen is workers.generator()
    out = workers.log_probs(synced)["log_probs"]
    torch.testing.assert_close(out[mask], after[mask], atol=2e-5, rtol=1e-5)


def test_custom_loss_function(workers, batch):
    """A replacement actor loss sees verl's batch (incl. extra fields) and drives the update."""
    from verl.workers.utils.padding import no_padding_2_padding

    seen = {}

    def nll_on_selected_tokens(config, model_output, data, dp_group=None):
        log_prob = no_padding_2_padding(model_output["log_probs"], data)
        sel = data.select("selected").to_padded_tensor()["selected"].float()
        seen["keys"] = set(data.keys())
        seen["config"] = config
        return -(log_prob * sel).sum() / sel.sum().clamp(min=1), {"actor/selected_tokens": float(sel.sum())}

    original = workers.actor.loss_fn
    try:
        workers.set_loss_fn(functools.partial(nll_on_selected_tokens, config=workers.loss_config))
        selected = batch["response_mask"].clone()
        selected[:, 2:] = 0  # only the first two response tokens of each sample
        before = workers.log_probs(batch)["log_probs"]
        metrics = workers.update(batch, torch.zeros(len(PROMPTS)), old_log_probs=before, extra_fields={"selected": selected})
        after = workers.log_probs(batch)["log_probs"]
    finally:
        workers.set_loss_fn(original)
    assert "selected" in seen["keys"] and seen["config"] is workers.loss_config
    assert metrics["actor/selected_tokens"][0] == float(selected.sum())
    assert ((after - before) * selected).sum() > 0  # NLL on the selected tokens raised their log-probs


# ----------------------------------------------------------------------------------------------
# start-up checks
# ----------------------------------------------------------------------------------------------
def test_checks_reject_a_missing_or_invalid_model_dir(tmp_path):
    from tip_verl.verl_adapter.cpu.checks import CPUSetupError, check_model_dir
    from tip_verl.verl_adapter.local_workers import build_local_workers

    with pytest.raises(CPUSetupError, match="does not exist.*python -m tip_verl.assets"):
        check_model_dir(tmp_path / "nope", role="student model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CPUSetupError, match="no config.json"):
        check_model_dir(tmp_path / "empty")
    with pytest.raises(CPUSetupError, match="actor model directory .* does not exist"):
        build_local_workers(str(tmp_path / "nope"), with_ref=False)


def test_checks_reject_a_tokenizer_whose_newline_is_not_one_token(tmp_path, tiny_assets):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from tip_verl.verl_adapter.cpu.checks import CPUSetupError, check_tokenizer

    assert check_tokenizer(str(tiny_assets.student)) is not None  # the project's tokenizer passes
    # a byte-level tokenizer without a newline token: "\n" -> several pieces / nothing
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<|im_end|>": 1, "a": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bad = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>")
    model_dir = tmp_path / "bad_tok"
    shutil.copytree(tiny_assets.student, model_dir)
    bad.save_pretrained(model_dir)
    assert len(AutoTokenizer.from_pretrained(model_dir).encode("\n", add_special_tokens=False)) != 1
    with pytest.raises(CPUSetupError, match="newline"):
        check_tokenizer(str(model_dir), role="student model")


def test_cpu_engine_checks_the_tokenizer_before_loading_the_model(tmp_path, tiny_assets, workers):
    """The FSDP engine registered for device "cpu" runs the start-up checks in verl's worker."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tip_verl.verl_adapter.cpu.checks import CPUSetupError
    from tip_verl.verl_adapter.local_workers import build_local_workers

    core = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<|im_end|>": 1, "a": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model_dir = tmp_path / "bad_tok"
    shutil.copytree(tiny_assets.student, model_dir)
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>").save_pretrained(model_dir)
    with pytest.raises(CPUSetupError, match="actor model tokenizer.*newline"):
        build_local_workers(str(model_dir), with_ref=False, check=False)  # no up-front checks: the engine's


def test_checks_refuse_the_cpu_platform_on_a_cuda_machine(monkeypatch):
    from tip_verl.verl_adapter.cpu import checks

    monkeypatch.delenv(checks.ALLOW_CUDA_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(checks.CPUSetupError, match="has CUDA.*Unset VERL_PLATFORM"):
        checks.check_no_cuda()
    monkeypatch.setenv(checks.ALLOW_CUDA_ENV, "1")
    checks.check_no_cuda()  # explicitly allowed


def test_checks_require_fsdp2(workers):
    from tip_verl.verl_adapter.cpu.checks import CPUSetupError, check_engine_config
    from verl.workers.config import FSDPEngineConfig

    check_engine_config(FSDPEngineConfig(strategy="fsdp2"))
    with pytest.raises(CPUSetupError, match="FSDP strategy 'fsdp' does not run on the CPU"):
        check_engine_config(FSDPEngineConfig(strategy="fsdp"))


def test_overrides_are_one_list_shared_by_everyone():
    from tip_verl.verl_adapter.cpu_overrides import CPU_RAY_RESOURCE, cpu_env, cpu_overrides
    from tip_verl.verl_adapter.cpu.platform import CPU_RAY_RESOURCE as platform_resource

    assert CPU_RAY_RESOURCE == platform_resource
    o = cpu_overrides()
    assert "actor_rollout_ref.rollout.name=hf" in o and "trainer.device=cpu" in o
    assert "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32" in o
    assert f"+ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM='cpu'" in o
    assert cpu_env()["VERL_PLATFORM"] == "cpu"
    json.dumps(o)  # plain strings

"""The CPU backend's ``hf`` rollout server (Hugging Face ``generate``) and its registration with verl.

The server is exercised in-process (no Ray): the same object verl's replica runs as a Ray actor.
References are computed directly with ``transformers`` on the same checkpoint.
"""

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

# Select verl's CPU platform for this test process before verl is first imported (see conftest).
os.environ.setdefault("VERL_PLATFORM", "cpu")

PROMPTS = ["What is 12 + 7?", "What is 305 + 41?", "What is 9 + 9?", "What is 100 + 250?"]
RESPONSE_LENGTH = 8


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _rollout_config(**kw):
    from verl.workers.config import RolloutConfig

    base = dict(name="hf", prompt_length=64, response_length=RESPONSE_LENGTH, dtype="float32",
                tensor_model_parallel_size=1)
    base.update(kw)
    return RolloutConfig(**base)


@pytest.fixture(scope="module")
def student(tiny_assets):
    return str(tiny_assets.student)


@pytest.fixture(scope="module")
def server(student, loop):
    from tip_verl.verl_adapter.cpu.hf_server import HFRolloutServer

    return HFRolloutServer(_rollout_config(), student)


@pytest.fixture(scope="module")
def hf_model(student):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def prompt_ids(server):
    tok = server.generator.tokenizer
    out = []
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        out.append([int(t) for t in ids])
    return out


def gen(loop, server, prompt, request_id="r", **params):
    return loop.run_until_complete(server.generate(prompt, params, request_id))


@torch.no_grad()
def hf_logits(model, ids):
    return model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def hf_greedy(model, prompt, max_tokens, eos_ids):
    """Reference greedy decoding: full forward each step, argmax, stop at EOS (inclusive)."""
    ids = list(prompt)
    out = []
    for _ in range(max_tokens):
        nxt = int(hf_logits(model, ids)[-1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt in eos_ids:
            break
    return out


# ----------------------------------------------------------------------------------------------
# generation semantics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [1, 3, RESPONSE_LENGTH])
def test_generation_length_at_most_max_tokens(loop, server, prompt_ids, max_tokens):
    eos = set(server.generator.eos_token_ids)
    for i, p in enumerate(prompt_ids):
        out = gen(loop, server, p, f"len{i}", temperature=1.0, max_tokens=max_tokens, logprobs=True, seed=i)
        assert 1 <= len(out.token_ids) <= max_tokens
        assert len(out.log_probs) == len(out.token_ids)
        assert out.stop_reason == "completed"
        # EOS, if produced, ends the response and is included in it
        assert all(t not in eos for t in out.token_ids[:-1])
        if len(out.token_ids) < max_tokens:
            assert out.token_ids[-1] in eos and out.extra_fields["finish_reason"] == "stop"


def test_default_max_tokens_is_response_length_and_ignore_eos(loop, server, prompt_ids):
    out = gen(loop, server, prompt_ids[0], "d", temperature=1.0)  # no max_tokens: rollout.response_length
    assert 1 <= len(out.token_ids) <= RESPONSE_LENGTH
    assert out.log_probs is None  # logprobs not asked for
    out = gen(loop, server, prompt_ids[0], "ie", temperature=0, ignore_eos=True, max_tokens=6)
    assert len(out.token_ids) == 6 and out.extra_fields["finish_reason"] == "length"


def test_temperature_zero_is_hf_greedy(loop, server, prompt_ids, hf_model):
    eos = set(server.generator.eos_token_ids)
    for i, p in enumerate(prompt_ids):
        ref = hf_greedy(hf_model, p, RESPONSE_LENGTH, eos)
        assert gen(loop, server, p, f"g{i}", temperature=0.0, max_tokens=RESPONSE_LENGTH).token_ids == ref
        # below vLLM's epsilon is greedy too; top_k=1 and a tiny top_p keep only the argmax
        assert gen(loop, server, p, f"e{i}", temperature=1e-7, max_tokens=RESPONSE_LENGTH).token_ids == ref
        assert gen(loop, server, p, f"k{i}", temperature=1.0, top_k=1, max_tokens=RESPONSE_LENGTH, seed=1).token_ids == ref
        assert gen(loop, server, p, f"p{i}", temperature=1.0, top_p=1e-6, max_tokens=RESPONSE_LENGTH, seed=2).token_ids == ref


def test_temperature_changes_the_distribution(loop, server, prompt_ids, hf_model):
    """First-token samples: nearly always the argmax when cold, spread over many tokens when hot."""
    p = prompt_ids[1]
    argmax = int(hf_logits(hf_model, p)[-1].argmax())

    def first_tokens(temperature):
        return [gen(loop, server, p, f"t{temperature}-{s}", temperature=temperature, max_tokens=1, seed=s).token_ids[0]
                for s in range(24)]

    cold, hot = first_tokens(0.05), first_tokens(20.0)
    assert sum(t == argmax for t in cold) >= 22
    assert len(set(hot)) >= 8 and sum(t == argmax for t in hot) <= 12


def test_logprobs_are_the_sampling_distribution(loop, server, prompt_ids, hf_model):
    """processed_logprobs (verl's default): log-softmax of logits / T, restricted by top-k, of the returned tokens."""
    for temperature, top_k in ((0.7, -1), (1.3, 5)):
        for i, p in enumerate(prompt_ids):
            out = gen(loop, server, p, f"lp{i}", temperature=temperature, top_k=top_k, logprobs=True,
                      max_tokens=RESPONSE_LENGTH, seed=i)
            logits = hf_logits(hf_model, p + out.token_ids)[len(p) - 1 : -1] / temperature
            if top_k > 0:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(out.log_probs), ref, atol=1e-5, rtol=1e-5)


def test_raw_logprobs_mode(loop, student, prompt_ids, hf_model):
    from tip_verl.verl_adapter.cpu.hf_server import HFRolloutServer

    raw = HFRolloutServer(_rollout_config(logprobs_mode="raw_logprobs"), student)
    p = prompt_ids[2]
    out = gen(loop, raw, p, "raw", temperature=0.5, logprobs=True, max_tokens=RESPONSE_LENGTH, seed=3)
    ref = torch.log_softmax(hf_logits(hf_model, p + out.token_ids)[len(p) - 1 : -1], -1)
    ref = ref.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.log_probs), ref, atol=1e-5, rtol=1e-5)


def test_n_samples(loop, server, prompt_ids):
    out = gen(loop, server, prompt_ids[0], "n", temperature=1.0, n=3, max_tokens=4, logprobs=True, seed=0)
    samples = out.extra_fields["samples"]
    assert len(samples) == 3
    assert out.token_ids == samples[0]["token_ids"] and out.log_probs == samples[0]["log_probs"]
    assert all(1 <= len(s["token_ids"]) <= 4 and len(s["log_probs"]) == len(s["token_ids"]) for s in samples)


# ----------------------------------------------------------------------------------------------
# prompt log-probs (verl's distillation teacher)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 5])
def test_prompt_logprobs_equal_hf(loop, server, prompt_ids, hf_model, k):
    """vLLM layout (verl/workers/rollout/vllm_rollout/utils.py:540): row i describes token i+1, dummy last row."""
    seq = prompt_ids[3] + [int(t) for t in server.generator.tokenizer.encode("350", add_special_tokens=False)]
    out = gen(loop, server, seq, f"pl{k}", max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False)
    ids, lps = torch.tensor(out.extra_fields["prompt_ids"]), torch.tensor(out.extra_fields["prompt_logprobs"])
    width = max(k, 1)
    assert ids.shape == lps.shape == (len(seq), width)
    assert (ids[-1] == 0).all() and (lps[-1] == 0).all()
    ref = torch.log_softmax(hf_logits(hf_model, seq), -1)[:-1]  # row i predicts token i+1
    if k == 0:
        assert ids[:-1, 0].tolist() == seq[1:]
        torch.testing.assert_close(lps[:-1, 0], ref.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0], atol=1e-5, rtol=1e-5)
    else:
        ref_lp, ref_ids = ref.topk(k, dim=-1)
        torch.testing.assert_close(lps[:-1], ref_lp, atol=1e-5, rtol=1e-5)
        assert (lps[:-1, :-1] >= lps[:-1, 1:]).all()  # sorted by rank
        # ids: equal to the reference wherever the log-probs are not tied
        gaps = (ref_lp[:, :-1] - ref_lp[:, 1:]).abs() > 1e-4
        assert (ids[:-1, :-1][gaps] == ref_ids[:, :-1][gaps]).all()
    assert len(out.token_ids) == 1  # one generated token, as vLLM returns with max_tokens=1


# ----------------------------------------------------------------------------------------------
# concurrency, weight updates, abort
# ----------------------------------------------------------------------------------------------
def test_concurrent_requests_are_batched_and_exact(loop, server, prompt_ids):
    """Requests arriving together share one left-padded batch and get the same result as alone."""
    alone = [gen(loop, server, p, f"a{i}", temperature=0, max_tokens=RESPONSE_LENGTH, logprobs=True)
             for i, p in enumerate(prompt_ids)]
    batches_before = server.get_stats()["batches"]

    async def together():
        reqs = [server.generate(p, {"temperature": 0, "max_tokens": RESPONSE_LENGTH, "logprobs": True}, f"c{i}")
                for i, p in enumerate(prompt_ids * 2)]
        return await asyncio.gather(*reqs)

    outs = loop.run_until_complete(together())
    assert server.get_stats()["batches"] - batches_before < len(outs)  # fewer batches than requests
    assert server.get_stats()["max_batch"] > 1
    for i, out in enumerate(outs):
        ref = alone[i % len(prompt_ids)]
        assert out.token_ids == ref.token_ids
        torch.testing.assert_close(torch.tensor(out.log_probs), torch.tensor(ref.log_probs), atol=1e-5, rtol=1e-5)


def test_trickling_requests_wait_for_each_other_within_the_window(loop, student, prompt_ids):
    """verl's agent loop sends one request per sample, a few ms apart: the server waits until they stop
    arriving (quiet gap) and runs them as one batch; a lone request waits at most the quiet gap."""
    from tip_verl.verl_adapter.cpu.hf_server import HFRolloutServer

    params = {"temperature": 0, "max_tokens": 4}
    srv = HFRolloutServer(_rollout_config(), student, batch_quiet_s=0.2, batch_window_s=5.0)

    async def trickle(gap_s):
        tasks = []
        for i, p in enumerate(prompt_ids * 2):
            tasks.append(asyncio.ensure_future(srv.generate(p, params, f"t{i}")))
            await asyncio.sleep(gap_s)
        return await asyncio.gather(*tasks)

    assert len(loop.run_until_complete(trickle(0.02))) == 2 * len(prompt_ids)
    assert srv.get_stats()["batches"] == 1 and srv.get_stats()["max_batch"] == 2 * len(prompt_ids)

    # gaps longer than the quiet gap: each request is its own batch, none waits for the window
    srv = HFRolloutServer(_rollout_config(), student, batch_quiet_s=0.01, batch_window_s=5.0)
    start = time.monotonic()
    loop.run_until_complete(trickle(0.3))
    assert srv.get_stats()["batches"] == 2 * len(prompt_ids)
    assert time.monotonic() - start < 0.3 * 2 * len(prompt_ids) + 2.5
    with pytest.raises(ValueError, match="batch_quiet_s"):
        HFRolloutServer(_rollout_config(), student, batch_quiet_s=2.0, batch_window_s=1.0)


def test_weight_update_changes_the_output_distribution(loop, student, prompt_ids):
    from tip_verl.verl_adapter.cpu.hf_server import HFRolloutServer

    srv = HFRolloutServer(_rollout_config(), student)
    p = prompt_ids[0]
    before = gen(loop, srv, p, "b", temperature=0, max_tokens=4, logprobs=True)
    state = {k: v.clone() for k, v in srv.generator.model.state_dict().items()}
    vocab = state["lm_head.weight"].shape[0]
    # a zero LM head makes every next-token distribution uniform
    info = loop.run_until_complete(
        srv.update_weights({"lm_head.weight": torch.zeros_like(state["lm_head.weight"])}, global_steps=3)
    )
    assert info["loaded"] == 1
    after = gen(loop, srv, p, "a", temperature=1.0, max_tokens=4, logprobs=True, ignore_eos=True, seed=0)
    assert after.extra_fields["global_steps"] == 3
    torch.testing.assert_close(torch.tensor(after.log_probs), torch.full((4,), -torch.log(torch.tensor(float(vocab)))))
    assert max(before.log_probs) > -torch.log(torch.tensor(float(vocab))).item() + 1.0
    # the whole state dict round-trips (what the actor sends each step): the original outputs again
    loop.run_until_complete(srv.update_weights(state, global_steps=4))
    again = gen(loop, srv, p, "c", temperature=0, max_tokens=4, logprobs=True)
    assert again.token_ids == before.token_ids and again.extra_fields["global_steps"] == 4
    torch.testing.assert_close(torch.tensor(again.log_probs), torch.tensor(before.log_probs))
    with pytest.raises(ValueError, match="does not have"):
        loop.run_until_complete(srv.update_weights({"not.a.weight": torch.zeros(1)}))


def test_lora_student_weight_sync_runs_the_adapted_model(loop, student, prompt_ids):
    """What verl sends the rollout of a LoRA student (``engine_workers.py`` ``update_weights``): the base weights
    once, under PEFT's names (``base_sync_done=False``), then the adapters after every update; the server then
    computes what the actor's PEFT model computes (unmerged adapters), and follows each adapter update."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from tip_verl.verl_adapter.cpu.hf_server import HFRolloutServer

    srv = HFRolloutServer(_rollout_config(), student)
    actor = get_peft_model(AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval(),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"))
    peft_config = actor.peft_config["default"].to_dict()
    torch.manual_seed(0)
    with torch.no_grad():
        actor.get_base_model().lm_head.weight.mul_(1.5)  # a base weight the server must take too
    base = {k: v for k, v in actor.get_base_model().state_dict().items() if "lora_" not in k}
    assert any(".base_layer." in k for k in base)
    info = loop.run_until_complete(srv.update_weights(base, peft_config=peft_config, base_sync_done=False))
    assert info["loaded"] == len(base)
    ids = torch.tensor([prompt_ids[0]])
    for _ in range(2):  # two updates of the adapters
        with torch.no_grad():
            for name, param in actor.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.05)
        adapters = get_peft_model_state_dict(actor)
        info = loop.run_until_complete(srv.update_weights(adapters, peft_config=peft_config, global_steps=1))
        assert info == {"loaded": len(adapters), "adapters": True}
        with torch.no_grad():
            torch.testing.assert_close(srv.generator.model(ids).logits, actor(ids).logits, rtol=1e-5, atol=1e-5)
            with actor.disable_adapter():  # the adapters matter: without them the logits differ
                assert not torch.allclose(srv.generator.model(ids).logits, actor(ids).logits, atol=1e-3)
        out = gen(loop, srv, prompt_ids[0], "lora", temperature=0, max_tokens=4, logprobs=True)
        assert out.token_ids == hf_greedy(actor, prompt_ids[0], len(out.token_ids), ())[: len(out.token_ids)]
    with pytest.raises(ValueError, match="adapter weights the model does not have"):
        loop.run_until_complete(srv.update_weights({"base_model.model.not_a_layer.lora_A.weight": torch.zeros(1)},
                                                   peft_config=peft_config))


def test_abort_and_resume(loop, server, prompt_ids):
    res = loop.run_until_complete(server.abort_all_requests(reject_request=True))
    assert res["aborted_count"] == 0
    out = gen(loop, server, prompt_ids[0], "x", temperature=1.0, max_tokens=4)
    assert out.stop_reason == "aborted" and out.token_ids == []
    loop.run_until_complete(server.resume_generation())
    out = gen(loop, server, prompt_ids[0], "y", temperature=1.0, max_tokens=4)
    assert out.stop_reason == "completed" and 1 <= len(out.token_ids) <= 4


def test_abort_stops_a_running_generation(loop, student, prompt_ids):
    from tip_verl.verl_adapter.cpu.hf_server import HFRolloutServer

    srv = HFRolloutServer(_rollout_config(response_length=1024), student)

    async def scenario():
        task = asyncio.ensure_future(srv.generate(prompt_ids[0], {"temperature": 1.0, "ignore_eos": True, "seed": 0}, "long"))
        while not srv._running:  # wait until the request is inside a running batch
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)
        res = await srv.abort_all_requests()
        return res, await task

    res, out = loop.run_until_complete(scenario())
    assert res["request_ids"] == ["long"]
    assert out.stop_reason == "aborted" and 0 < len(out.token_ids) < 1024
    loop.run_until_complete(srv.resume_generation())
    assert gen(loop, srv, prompt_ids[0], "after", temperature=1.0, max_tokens=4).stop_reason == "completed"


# ----------------------------------------------------------------------------------------------
# registration: only with the CPU platform selected; GPU jobs untouched
# ----------------------------------------------------------------------------------------------
_PROBE = textwrap.dedent(
    """
    import json, torch
    original_pin = torch.Tensor.pin_memory
    import verl
    import verl.utils.distributed as dist
    import verl.single_controller.ray.base as rb
    import verl.workers.config.distillation as dc
    import verl.workers.engine.fsdp.transformer_impl as ti
    import verl.trainer.ppo.v1.replay_buffer as rbuf
    import verl.experimental.separation.engine_workers as sep
    from torch.distributed.fsdp import CPUOffloadPolicy
    from verl.plugin.platform import PlatformRegistry
    from verl.workers.engine import EngineRegistry
    from verl.workers.rollout import base as rbase
    from verl.workers.rollout.replica import RolloutReplicaRegistry
    print(json.dumps({
        "pin_memory_untouched": torch.Tensor.pin_memory is original_pin
            and torch.Tensor.pin_memory is torch._C.TensorBase.pin_memory,
        "patched": sorted(n for n, f in [
            ("gloo_process_group", dist.initialize_global_process_group_ray),
            ("resource_check_platform_aware", rb.ResourcePoolManager._check_resource_available),
            ("teacher_topk_for_hf_rollout", dc.DistillationTeacherModelConfig._validate_topk_logprobs),
            ("fsdp2_offload_without_pinning", ti.CPUOffloadPolicy),
            ("replay_buffer_short_poll", rbuf.ReplayBuffer.__init__),
            ("separate_async_pi_old_copy", sep.DetachActorWorker.save_model_to_cpu),
        ] if hasattr(f, "__tip_verl_patch__")),
        "offload_policy_is_torch": ti.CPUOffloadPolicy is CPUOffloadPolicy,
        "cpu_platform": "cpu" in PlatformRegistry.registered_names(),
        "cpu_engine": "cpu" in EngineRegistry._engines["language_model"]["fsdp2"],
        "hf_replica": "hf" in RolloutReplicaRegistry._registry,
        "hf_adapter": ("hf", "async") in rbase._ROLLOUT_REGISTRY,
    }))
    """
)


def _probe_env(env_update):
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    env.update(env_update)
    return env


@pytest.fixture(scope="module")
def probes():
    """Import verl in two fresh interpreters (concurrently): without and with VERL_PLATFORM=cpu."""
    import json

    runs = {
        name: subprocess.Popen([sys.executable, "-c", _PROBE], env=_probe_env(env), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for name, env in (("plain", {}), ("cpu", {"VERL_PLATFORM": "cpu"}))
    }
    results = {}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


def test_without_cpu_platform_verl_is_untouched(probes):
    assert probes["plain"] == {
        "pin_memory_untouched": True,
        "patched": [],
        "offload_policy_is_torch": True,
        "cpu_platform": False,
        "cpu_engine": False,
        "hf_replica": False,
        "hf_adapter": False,
    }


def test_with_cpu_platform_everything_is_registered(probes):
    assert probes["cpu"] == {
        "pin_memory_untouched": True,  # never patched globally, not even on the CPU platform
        "patched": sorted(["gloo_process_group", "resource_check_platform_aware", "teacher_topk_for_hf_rollout",
                           "fsdp2_offload_without_pinning", "replay_buffer_short_poll",
                           "separate_async_pi_old_copy"]),
        "offload_policy_is_torch": False,
        "cpu_platform": True,
        "cpu_engine": True,
        "hf_replica": True,
        "hf_adapter": True,
    }


def test_replay_buffer_poll_is_capped_not_raised():
    """The poll patch lowers verl's 2 s default to the CPU interval and keeps a shorter explicit one."""
    from tip_verl.verl_adapter.cpu.patches import CPU_POLL_INTERVAL_S, _short_poll_interval

    class Buffer:
        def __init__(self, trainer_mode, poll_interval=2.0):
            self.trainer_mode, self.poll_interval = trainer_mode, poll_interval

    Buffer.__init__ = _short_poll_interval(Buffer.__init__)
    assert Buffer("sync").poll_interval == CPU_POLL_INTERVAL_S < 2.0
    assert Buffer("sync", poll_interval=0.01).poll_interval == 0.01
    assert Buffer(trainer_mode="colocate_async").trainer_mode == "colocate_async"


@pytest.mark.parametrize("first_import", ["tip_verl.verl_adapter.cpu.platform", "tip_verl.verl_adapter.cpu.patches",
                                          "tip_verl.verl_adapter.sparse_lm_head", "tip_verl.verl_adapter.trainer"])
def test_any_import_order_registers_cleanly(first_import):
    """Importing a tip_verl module that imports verl first (verl then loads the plugin mid-way) still
    registers the CPU backend and the three TIP trainer modes, without a failure warning (the trainer module
    imports verl's V1 package itself, before its classes exist)."""
    code = textwrap.dedent(f"""
        import {first_import}
        import verl.trainer.ppo.v1.trainer_base as tb
        from tip_verl.verl_adapter.cpu import is_registered
        print(is_registered(), *(tb.get_trainer_cls(m).__name__
                                 for m in ("tip_sync", "tip_colocate_async", "tip_separate_async")))
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=_probe_env({"VERL_PLATFORM": "cpu"}),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "True TIPTrainerSync TIPTrainerColocateAsync TIPTrainerSeparateAsync"
    assert "tip_verl: registering the CPU backend with verl failed" not in proc.stderr
    assert "partially initialized" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "could not register trainer mode" not in proc.stderr


def test_rollout_seed_makes_unseeded_sampling_reproducible(loop, student, prompt_ids):
    """actor_rollout_ref.rollout.seed seeds the server (verl's agent loop sends no per-request seed)."""
    from tip_verl.verl_adapter.cpu.hf_server import HFRolloutServer

    def sample(seed):
        srv = HFRolloutServer(_rollout_config(seed=seed), student)
        return [gen(loop, srv, p, f"s{i}", temperature=1.0, max_tokens=RESPONSE_LENGTH).token_ids
                for i, p in enumerate(prompt_ids)]

    first = sample(7)
    assert sample(7) == first
    assert any(sample(8) != first for _ in range(2))


def test_samples_do_not_depend_on_batch_or_arrival_order(loop, student, prompt_ids):
    """Per-request generators: the k-th request for a prompt gets the same samples whichever other requests
    share its batch and in whichever order they arrive (verl's agent loop sends no per-request seed)."""
    from tip_verl.verl_adapter.cpu.hf_server import HFRolloutServer

    # a high temperature: the trained student's first tokens are near-deterministic at T=1
    params = {"temperature": 3.0, "max_tokens": RESPONSE_LENGTH, "logprobs": True, "ignore_eos": True}

    def run(order, together):
        srv = HFRolloutServer(_rollout_config(seed=5), student)
        requests = [prompt_ids[i] for i in order]
        if together:
            async def all_at_once():
                return await asyncio.gather(*(srv.generate(p, params, f"r{j}") for j, p in enumerate(requests)))
            outs = loop.run_until_complete(all_at_once())
            assert srv.get_stats()["max_batch"] > 1
        else:
            outs = [gen(loop, srv, p, f"r{j}", **params) for j, p in enumerate(requests)]
        by_prompt = {}
        for i, out in zip(order, outs):
            by_prompt.setdefault(i, []).append((out.token_ids, out.log_probs))
        return by_prompt

    order = [0, 1, 2, 3, 0, 1]
    reference = run(order, together=False)
    for other, together in (([3, 1, 0, 2, 1, 0], True), ([1, 1, 0, 3, 2, 0], False)):
        got = run(other, together)
        assert sorted(got) == sorted(reference)
        for i in reference:
            assert [t for t, _ in got[i]] == [t for t, _ in reference[i]]
            for (_, lp), (_, ref_lp) in zip(got[i], reference[i]):
                torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-5, rtol=1e-5)
    # the first and second request for one prompt draw different samples
    assert reference[0][0][0] != reference[0][1][0] or reference[1][0][0] != reference[1][1][0]


def test_per_request_seed_overrides_the_server_seed(loop, student, prompt_ids):
    from tip_verl.verl_adapter.cpu.hf_server import HFRolloutServer

    outs = []
    for server_seed in (1, 2):
        srv = HFRolloutServer(_rollout_config(seed=server_seed), student)
        outs.append([gen(loop, srv, p, "s", temperature=1.0, max_tokens=RESPONSE_LENGTH, ignore_eos=True,
                         seed=11).token_ids for p in prompt_ids])
    assert outs[0] == outs[1]

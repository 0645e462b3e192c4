"""Exactness of the sparse update-step LM head (tip_verl.verl_adapter.sparse_lm_head) against verl.

Every case runs verl's real actor engine (``FSDPEngineWithLMHead`` as registered for tip_verl's CPU
platform; FSDP2, float32) twice on the same tiny random Qwen2 and the same update batch: once as
verl ships it (logits for every packed token, keep-mask applied only through
``response_mask``/``loss_mask`` in ``ppo_loss``) and once through the TIP worker
(:class:`~tip_verl.verl_adapter.teacher.TIPActorRolloutRefWorker`, whose ``actor_worker_cls`` is
:class:`TIPLMHeadTrainingWorker`, built from the ``actor_rollout_ref.tip_worker`` node the trainer
writes). Loss and every parameter gradient must match; ``+tip.sparse_lm_head=false`` in that node
restores verl's computation, and no environment variable is read in the update step.

The engines run in one child process (this file run as a script): verl resolves its platform once
per process and a one-rank process group is created there, so the cases do not depend on which
other tests imported verl first. The child writes tensors; the assertions are here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _tiny_models import assert_close, assert_same_update, run_engine_child  # noqa: E402

VOCAB = 160
BATCH = 4
PROMPT_LENS = (3, 6, 4, 5)
RESPONSE_LENS = (7, 3, 8, 6)

#: worker configurations (each a verl actor built twice: plain and sparse). verl's fused-kernel
#: forward reads ``lm_head.weight`` without calling the module, which FSDP2 only unshards when the
#: lm_head is not wrapped on its own, i.e. with tied embeddings (verl/utils/fsdp_utils.py
#: ``_select_fsdp2_wrap_targets``), so the fused cases use a tied model (as Qwen2.5 <= 3B are).
ENGINES = {
    "rmpad": {"use_remove_padding": True, "use_fused_kernels": False, "tied": False},
    "padded": {"use_remove_padding": False, "use_fused_kernels": False, "tied": False},
    "tied_rmpad": {"use_remove_padding": True, "use_fused_kernels": False, "tied": True},
    # verl's default: activation checkpointing of the decoder layers
    "rmpad_gradient_checkpointing": {"use_remove_padding": True, "use_fused_kernels": False, "tied": False,
                                     "overrides": ["actor_rollout_ref.model.enable_gradient_checkpointing=True"]},
    # packed micro-batches right-padded to a bucket multiple (engine_config.pad_to_length)
    "rmpad_pad_to_length": {"use_remove_padding": True, "use_fused_kernels": False, "tied": False,
                            "overrides": ["actor_rollout_ref.actor.pad_to_length=True",
                                          "actor_rollout_ref.actor.fsdp_config.pad_to_length_bucket=16"]},
    # a LoRA student (verl's PEFT model: the lm_head under PeftModel -> base_model.model; only adapters train)
    "rmpad_lora": {"use_remove_padding": True, "use_fused_kernels": False, "tied": False,
                   "overrides": ["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.lora_alpha=16"]},
    "fused_rmpad": {"use_remove_padding": True, "use_fused_kernels": True, "tied": True},
    "fused_padded": {"use_remove_padding": False, "use_fused_kernels": True, "tied": True},
}

#: (name, batch options) run on every engine configuration
BATCH_CASES = {
    "all_kept": dict(mask="all"),
    "one_per_seq": dict(mask="one_per_seq"),
    "random_30pct": dict(mask="random"),
    "nothing_kept_in_first_micro_batch": dict(mask="first_two_empty"),
    "padded_layout": dict(mask="random", layout="padded"),
    "dynamic_bsz": dict(mask="random", dynamic=True),
    "dynamic_bsz_one_per_seq": dict(mask="one_per_seq", dynamic=True),
    "entropy_and_temperature": dict(mask="random", entropy=True, temperature=0.7),
    "text_batch_with_empty_multi_modal_inputs": dict(mask="random", empty_multi_modal_inputs=True),
}

CASES = [f"{engine}/{case}" for engine in ENGINES for case in BATCH_CASES]


# ---------------------------------------------------------------------------------------------
# child process
# ---------------------------------------------------------------------------------------------
def _keep_mask(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    R = max(RESPONSE_LENS)
    valid = torch.arange(R).unsqueeze(0) < torch.tensor(RESPONSE_LENS).unsqueeze(1)
    if kind == "all":
        return valid.long()
    if kind == "random":
        keep = (torch.rand(BATCH, R, generator=g) < 0.3) & valid
        keep[:, 0] |= ~keep.any(dim=1)  # at least one per sequence
        return keep.long()
    if kind in ("one_per_seq", "first_two_empty"):
        keep = torch.zeros(BATCH, R, dtype=torch.long)
        for i, r in enumerate(RESPONSE_LENS):
            keep[i, int(torch.randint(r, (1,), generator=g))] = 1
        if kind == "first_two_empty":
            keep[:2] = 0
        return keep
    raise ValueError(kind)


def _projected_rows(output) -> int:
    """Rows of the model output's vocabulary projection: logits rows, or fused log-prob entries."""
    if getattr(output, "logits", None) is not None:
        return output.logits.shape[:-1].numel()
    return output.log_probs.numel()


def _child_main(out_dir: str) -> None:  # pragma: no cover - runs in the child process
    import logging

    import _tiny_models as tm

    tm.setup_cpu_verl()

    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from tip_verl.verl_adapter import sparse_lm_head as slh
    from tip_verl.verl_adapter.teacher import TIPActorRolloutRefWorker

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    records = Records()
    logging.getLogger(slh.__name__).addHandler(records)

    out = Path(out_dir)
    model_paths = {
        tied: tm.build_tiny_qwen2(out / f"tiny_qwen2_tied{int(tied)}", vocab_size=VOCAB, hidden_size=32, num_layers=2,
                                  tie_word_embeddings=tied, seed=0)
        for tied in (False, True)
    }
    rollout = tm.random_rollout(
        batch_size=BATCH, vocab_size=VOCAB, prompt_lens=PROMPT_LENS, response_lens=RESPONSE_LENS, seed=0
    )
    results: dict = {"cases": {}, "meta": {}}

    def grads_of(engine):
        return {
            n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for n, p in engine.module.named_parameters() if p.grad is not None  # LoRA: frozen base weights
        }

    def run_update(worker, td, *, dynamic: bool, rmpad: bool, fused: bool):
        """verl's update step without the optimizer: zero_grad + forward_backward_batch in train mode."""
        engine = worker.actor.engine
        tu.assign_non_tensor(
            td,
            use_remove_padding=rmpad,
            use_dynamic_bsz=dynamic,
            max_token_len_per_gpu=20,
            micro_batch_size_per_gpu=2,
            use_fused_kernels=fused,
        )
        rows = []  # positions projected onto the vocabulary, per micro-batch
        hook = engine.module.register_forward_hook(lambda m, a, o: rows.append(_projected_rows(o)))
        try:
            with engine.train_mode():
                engine.optimizer_zero_grad()
                output = engine.forward_backward_batch(td, loss_function=worker.actor.loss_fn, forward_only=False)
                grads = grads_of(engine)
        finally:
            hook.remove()
        loss = torch.tensor(output["loss"] if isinstance(output["loss"], list) else [output["loss"]]).sum()
        return loss, grads, rows

    for engine_name, opts in ENGINES.items():
        overrides = [
            f"actor_rollout_ref.model.use_remove_padding={opts['use_remove_padding']}",
            f"actor_rollout_ref.model.use_fused_kernels={opts['use_fused_kernels']}",
            "actor_rollout_ref.actor.entropy_coeff=0.01",
        ]
        if opts["use_fused_kernels"]:
            overrides.append("actor_rollout_ref.model.fused_kernel_options.impl_backend=torch")
        overrides += opts.get("overrides", [])
        cfg = tm.actor_config(model_paths[opts["tied"]], overrides)
        plain = ActorRolloutRefWorker(config=cfg.copy(), role="actor")
        torch.manual_seed(0)  # the same random LoRA A matrices in both
        plain.init_model()
        sparse = TIPActorRolloutRefWorker(config=tm.tip_worker_config(cfg), role="actor")
        torch.manual_seed(0)
        sparse.init_model()
        plain_cls, sparse_cls = type(plain.actor.engine), type(sparse.actor.engine)
        results["meta"][engine_name] = {
            "plain_is_verl_engine": issubclass(plain_cls, FSDPEngineWithLMHead)
            and not issubclass(plain_cls, slh.TIPLMHeadMixin),
            "sparse_is_its_sparse_variant": sparse_cls is slh.sparse_engine_class(plain_cls)
            and issubclass(sparse_cls, plain_cls),
            "names": (plain_cls.__name__, sparse_cls.__name__),
            "gradient_checkpointing": bool(getattr(sparse.actor.engine.module.model, "gradient_checkpointing", False)),
        }

        for seed, (case_name, case) in enumerate(BATCH_CASES.items()):
            keep = _keep_mask(case["mask"], seed)
            kwargs = dict(layout=case.get("layout", "nested"), seed=seed, temperature=case.get("temperature", 1.0),
                          calculate_entropy=case.get("entropy", False),
                          empty_multi_modal_inputs=case.get("empty_multi_modal_inputs", False))
            run = dict(dynamic=case.get("dynamic", False), rmpad=opts["use_remove_padding"],
                       fused=opts["use_fused_kernels"])
            loss_full, grads_full, rows_full = run_update(plain, tm.update_batch(rollout, keep, **kwargs), **run)
            with tm.environ_reads() as env_reads:
                loss_sparse, grads_sparse, rows_sparse = run_update(sparse, tm.update_batch(rollout, keep, **kwargs),
                                                                    **run)
            results["cases"][f"{engine_name}/{case_name}"] = {
                "loss_full": loss_full, "loss_sparse": loss_sparse,
                "grads_full": grads_full, "grads_sparse": grads_sparse,
                "projected_rows_full": rows_full, "projected_rows_sparse": rows_sparse,
                "kept": int(keep.sum()), "total_tokens": sum(PROMPT_LENS) + sum(RESPONSE_LENS),
                "fused": opts["use_fused_kernels"], "env_reads": list(env_reads),
            }

        if engine_name == "rmpad":
            # log-prob pass (no grad): unchanged, full logits
            lp = {}
            for name, worker in (("plain", plain), ("sparse", sparse)):
                rows = []
                hook = worker.actor.engine.module.lm_head.register_forward_pre_hook(
                    lambda m, a, rows=rows: rows.append(a[0].shape[:-1].numel()))
                tdc = tm.update_batch(rollout, _keep_mask("random", 0), calculate_entropy=True)
                tu.assign_non_tensor(tdc, compute_loss=False)
                o = worker.compute_log_prob(tdc)
                hook.remove()
                lp[name] = (tu.get(o, "log_probs").values().clone(), tu.get(o, "entropy").values().clone(), rows)
            results["log_prob_pass"] = lp

            # fallback: a request the sparse path does not cover warns once and stays exact
            records.messages.clear()
            keep = _keep_mask("random", 1)
            run = dict(dynamic=False, rmpad=True, fused=False)
            fb = {}
            for name, worker in (("plain", plain), ("sparse", sparse)):
                losses, grads = [], None
                for _ in range(2):  # two update calls x two micro-batches each
                    td = tm.update_batch(rollout, keep, seed=1, calculate_sum_pi_squared=True)
                    loss, grads, rows = run_update(worker, td, **run)
                    losses.append(loss)
                fb[name] = {"loss": losses[-1], "grads": grads, "rows": rows}
            fb["warnings"] = list(records.messages)
            results["fallback_runtime"] = fb

            # +tip.sparse_lm_head=false (the tip_worker node) restores verl's full computation
            off = TIPActorRolloutRefWorker(config=tm.tip_worker_config(cfg, sparse_lm_head=False), role="actor")
            off.init_model()
            with tm.environ_reads() as env_reads:
                loss_off, grads_off, rows = run_update(off, tm.update_batch(rollout, keep, seed=1), **run)
            loss_ref, grads_ref, _ = run_update(plain, tm.update_batch(rollout, keep, seed=1), **run)
            results["switched_off"] = {"rows": rows, "env_reads": list(env_reads), "loss": loss_off, "grads": grads_off,
                                       "loss_ref": loss_ref, "grads_ref": grads_ref,
                                       "sparse_lm_head": off.actor.engine.tip_settings.sparse_lm_head,
                                       "engine": type(off.actor.engine).__name__}
            del off

            # fallback: an engine that is not a causal-LM FSDP engine is left as it is, warned once
            records.messages.clear()
            e = sparse.actor.engine
            before = []
            for _ in range(2):
                value_engine = FSDPEngineWithValueHead(
                    model_config=e.model_config, engine_config=e.engine_config,
                    optimizer_config=e.optimizer_config, checkpoint_config=e.checkpoint_config,
                )
                before.append(type(slh.enable_sparse_lm_head(value_engine)) is FSDPEngineWithValueHead)
            results["fallback_engine"] = {"unchanged": before, "warnings": list(records.messages)}

            # the full update step through verl's worker API (train_mini_batch + optimizer step)
            step = {}
            for name, worker in (("plain", plain), ("sparse", sparse)):
                td = tm.update_batch(rollout, _keep_mask("random", 2), seed=2)
                metrics = tu.get(worker.update_actor(td), "metrics")
                params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                          for n, p in worker.actor.engine.module.named_parameters()}
                step[name] = {"pg_loss": torch.tensor(metrics["actor/pg_loss"], dtype=torch.float64),
                              "params": params}
            results["update_actor"] = step

        del plain, sparse

    tm.write_engine_results(out, results)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_engine_child(__file__, tmp_path_factory.mktemp("sparse_lm_head"))


@pytest.mark.parametrize("case", CASES)
def test_loss_and_grads_match_full_logits(results, case):
    lora = case.startswith("rmpad_lora/")  # only the adapters have gradients; B (zero at the start) gets one
    assert_same_update(results["cases"][case], case, nonzero=("lora_B",) if lora else ("lm_head", "embed_tokens"))
    assert lora == all("lora_" in name for name in results["cases"][case]["grads_full"])


@pytest.mark.parametrize("case", CASES)
def test_vocab_projection_runs_only_at_kept_positions(results, case):
    r = results["cases"][case]
    assert sum(r["projected_rows_sparse"]) == r["kept"]
    if "rmpad/" in case:  # verl's own path projects every packed token (padded: every padded slot)
        assert sum(r["projected_rows_full"]) == r["total_tokens"]


def test_engines_are_swapped_only_for_the_sparse_worker(results):
    for engine_name, meta in results["meta"].items():
        assert meta["plain_is_verl_engine"], (engine_name, meta["names"])
        assert meta["sparse_is_its_sparse_variant"], (engine_name, meta["names"])
        assert meta["gradient_checkpointing"] == ("gradient_checkpointing" in engine_name), engine_name


def test_log_prob_pass_is_unchanged(results):
    lp = results["log_prob_pass"]
    assert torch.equal(lp["sparse"][0], lp["plain"][0])
    assert torch.equal(lp["sparse"][1], lp["plain"][1])
    assert lp["sparse"][2] == lp["plain"][2] and sum(lp["sparse"][2]) == sum(PROMPT_LENS) + sum(RESPONSE_LENS)


def test_full_update_step_matches(results):
    step = results["update_actor"]
    assert_close(step["sparse"]["pg_loss"], step["plain"]["pg_loss"], "pg_loss metric")
    for name, p in step["plain"]["params"].items():
        assert_close(step["sparse"]["params"][name], p, f"param {name} after one step")


def test_fallback_warns_once_and_stays_exact(results):
    fb = results["fallback_runtime"]
    sparse_warnings = [m for m in fb["warnings"] if "calculate_sum_pi_squared" in m]
    assert len(sparse_warnings) == 1, fb["warnings"]
    assert sum(fb["sparse"]["rows"]) == sum(PROMPT_LENS) + sum(RESPONSE_LENS)  # full computation
    assert_close(fb["sparse"]["loss"], fb["plain"]["loss"], "fallback loss")
    for name, g in fb["plain"]["grads"].items():
        assert_close(fb["sparse"]["grads"][name], g, f"fallback grad {name}")


def test_config_node_switch_turns_it_off(results):
    off = results["switched_off"]
    assert off["sparse_lm_head"] is False and off["engine"].startswith("TIPLMHead")
    assert sum(off["rows"]) == sum(PROMPT_LENS) + sum(RESPONSE_LENS)  # verl's full computation
    assert off["env_reads"] == []
    assert_close(off["loss"], off["loss_ref"], "switched-off loss")  # same batch through verl's own engine
    for name, g in off["grads_ref"].items():
        assert_close(off["grads"][name], g, f"switched-off grad {name}")


@pytest.mark.parametrize("case", CASES)
def test_no_environment_variable_is_read_in_the_update_step(results, case):
    assert results["cases"][case]["env_reads"] == []


def test_uncovered_engine_is_left_alone_with_one_warning(results):
    fe = results["fallback_engine"]
    assert fe["unchanged"] == [True, True]
    assert len([m for m in fe["warnings"] if "FSDPEngineWithValueHead" in m]) == 1, fe["warnings"]


def test_kept_positions_follow_the_logit_shift():
    """Pure index check: response token j of sequence i is predicted at cu[i] + L_i - R_i - 1 + j."""
    from tensordict import TensorDict

    from tip_verl.verl_adapter.sparse_lm_head import kept_logit_positions

    prompts = [torch.tensor([5, 6]), torch.tensor([7, 8, 9])]
    responses = [torch.tensor([10, 11, 12]), torch.tensor([13, 14])]
    keep = [torch.tensor([0, 1, 1]), torch.tensor([1, 0])]
    jag = lambda rows: torch.nested.as_nested_tensor(rows, layout=torch.jagged)  # noqa: E731
    td = TensorDict(
        {
            "prompts": jag(prompts),
            "responses": jag(responses),
            "input_ids": jag([torch.cat([p, r]) for p, r in zip(prompts, responses)]),
            "loss_mask": jag(keep),
            "response_mask": jag(keep),
        },
        batch_size=2,
    )
    positions, seq_index = kept_logit_positions(td)
    values = td["input_ids"].values()
    # sequence 0 = [5, 6, 10, 11, 12] at 0..4: tokens 11, 12 are predicted at 2, 3
    # sequence 1 = [7, 8, 9, 13, 14] at 5..9: token 13 is predicted at 7
    assert positions.tolist() == [2, 3, 7]
    assert seq_index.tolist() == [0, 0, 1]
    assert values[positions + 1].tolist() == [11, 12, 13]


if __name__ == "__main__":  # child process entry point (see the `results` fixture)
    _child_main(sys.argv[1])

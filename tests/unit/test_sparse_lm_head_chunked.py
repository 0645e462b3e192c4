"""Exactness at scale of the chunked kept-row lm_head inside verl's update step (issue 12, point 3).

Same method as ``test_sparse_lm_head.py`` (verl's real FSDP2 actor engine, float32, run as verl ships
it and through the TIP worker's :class:`TIPLMHeadTrainingWorker`, loss and every parameter gradient
compared), but with hundreds of kept rows in one micro-batch and ``+tip.lm_head_chunk_rows=64`` (the
``actor_rollout_ref.tip_worker`` node the trainer writes), so the chunked lm_head
(:func:`tip_verl.kept_logprobs.kept_logprobs`) runs several chunks with a ragged tail; plus K = 1,
K = N (every response token kept), remove-padding on and off, tied and untied lm_heads, entropy with
temperature, and the unchunked gather-first path (``+tip.lm_head_chunk_rows=0``). The setting reaches
the engine from the config node, and no environment variable is read during the update step. The
engines run in one child process (this file run as a script); the assertions are here.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _tiny_models import assert_same_update, run_engine_child  # noqa: E402

VOCAB = 211
PROMPT_LENS = (5, 9, 3, 7)
RESPONSE_LENS = (120, 97, 150, 64)  # 431 response tokens
BATCH = len(PROMPT_LENS)
CHUNK = 64  # 431 = 6 x 64 + 47

ENGINES = {
    "rmpad": {"use_remove_padding": True, "tied": False},
    "padded": {"use_remove_padding": False, "tied": False},
    "tied_rmpad": {"use_remove_padding": True, "tied": True},
}

#: name: (mask, +tip.lm_head_chunk_rows, entropy, temperature)
BATCH_CASES = {
    "all_kept_K_eq_N": ("all", CHUNK, False, 1.0),
    "half_kept": ("half", CHUNK, False, 1.0),
    "one_kept_K_eq_1": ("one", CHUNK, False, 1.0),
    "half_kept_entropy_temperature": ("half", CHUNK, True, 0.7),
    "half_kept_gather_first_unchunked": ("half", 0, True, 0.7),
}

CASES = [f"{engine}/{case}" for engine in ENGINES for case in BATCH_CASES]


def _keep_mask(kind: str, seed: int) -> torch.Tensor:
    R = max(RESPONSE_LENS)
    valid = torch.arange(R).unsqueeze(0) < torch.tensor(RESPONSE_LENS).unsqueeze(1)
    if kind == "all":
        return valid.long()
    if kind == "half":
        g = torch.Generator().manual_seed(seed)
        return ((torch.rand(BATCH, R, generator=g) < 0.5) & valid).long()
    if kind == "one":
        keep = torch.zeros(BATCH, R, dtype=torch.long)
        keep[2, 77] = 1
        return keep
    raise ValueError(kind)


def _child_main(out_dir: str) -> None:  # pragma: no cover - runs in the child process
    import _tiny_models as tm

    tm.setup_cpu_verl()

    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from tip_verl.verl_adapter import sparse_lm_head as slh
    from tip_verl.verl_adapter.teacher import TIPActorRolloutRefWorker

    calls = []  # (rows, chunk_rows) of every chunked lm_head call
    real = slh.kept_logprobs

    def spy(hidden, weight, labels, **kw):
        calls.append((int(hidden.shape[0]), kw.get("chunk_rows")))
        return real(hidden, weight, labels, **kw)

    slh.kept_logprobs = spy

    out = Path(out_dir)
    model_paths = {
        tied: tm.build_tiny_qwen2(out / f"tiny_qwen2_tied{int(tied)}", vocab_size=VOCAB, hidden_size=32,
                                  num_layers=2, tie_word_embeddings=tied, seed=0)
        for tied in (False, True)
    }
    rollout = tm.random_rollout(batch_size=BATCH, vocab_size=VOCAB, prompt_lens=PROMPT_LENS,
                                response_lens=RESPONSE_LENS, seed=0)
    results: dict = {"cases": {}}

    def run_update(worker, td, rmpad: bool):
        engine = worker.actor.engine
        tu.assign_non_tensor(td, use_remove_padding=rmpad, use_dynamic_bsz=False, max_token_len_per_gpu=4096,
                             micro_batch_size_per_gpu=BATCH, use_fused_kernels=False)
        with engine.train_mode():
            engine.optimizer_zero_grad()
            output = engine.forward_backward_batch(td, loss_function=worker.actor.loss_fn, forward_only=False)
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                     for n, p in engine.module.named_parameters()}
        loss = torch.tensor(output["loss"] if isinstance(output["loss"], list) else [output["loss"]]).sum()
        return loss, grads

    for engine_name, opts in ENGINES.items():
        overrides = [
            f"actor_rollout_ref.model.use_remove_padding={opts['use_remove_padding']}",
            "actor_rollout_ref.model.use_fused_kernels=False",
            "actor_rollout_ref.actor.entropy_coeff=0.01",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096",
        ]
        cfg = tm.actor_config(model_paths[opts["tied"]], overrides)
        plain = ActorRolloutRefWorker(config=cfg.copy(), role="actor")
        plain.init_model()
        sparse = {}  # the TIP worker of each chunk setting, built from the tip_worker node as in tip_sync
        for rows in sorted({case[1] for case in BATCH_CASES.values()}):
            sparse[rows] = TIPActorRolloutRefWorker(config=tm.tip_worker_config(cfg, lm_head_chunk_rows=rows),
                                                    role="actor")
            sparse[rows].init_model()
        for seed, (case_name, (mask, chunk_rows, entropy, temperature)) in enumerate(BATCH_CASES.items()):
            keep = _keep_mask(mask, seed)
            kw = dict(seed=seed, temperature=temperature, calculate_entropy=entropy)
            loss_full, grads_full = run_update(plain, tm.update_batch(rollout, keep, **kw), opts["use_remove_padding"])
            calls.clear()
            worker = sparse[chunk_rows]
            with tm.environ_reads() as env_reads:
                loss_sparse, grads_sparse = run_update(worker, tm.update_batch(rollout, keep, **kw),
                                                       opts["use_remove_padding"])
            results["cases"][f"{engine_name}/{case_name}"] = {
                "loss_full": loss_full, "loss_sparse": loss_sparse, "grads_full": grads_full,
                "grads_sparse": grads_sparse, "kept": int(keep.sum()), "chunk_calls": list(calls),
                "chunk_rows": chunk_rows, "engine_settings": dataclasses.asdict(worker.actor.engine.tip_settings),
                "env_reads": list(env_reads),
            }
        del plain, sparse

    tm.write_engine_results(out, results)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_engine_child(__file__, tmp_path_factory.mktemp("sparse_lm_head_chunked"))


@pytest.mark.parametrize("case", CASES)
def test_loss_and_grads_match_verl_full_logits(results, case):
    assert_same_update(results["cases"][case], case)


@pytest.mark.parametrize("case", CASES)
def test_chunked_path_ran_with_several_chunks(results, case):
    r = results["cases"][case]
    if r["chunk_rows"] == 0:
        assert r["chunk_calls"] == []  # gather-first only: the lm_head module computed the kept logits
        return
    assert r["chunk_calls"] == [(r["kept"], CHUNK)]  # one micro-batch, every kept row, chunk from the config
    if "K_eq_N" in case:
        assert r["kept"] == sum(RESPONSE_LENS) and r["kept"] % CHUNK != 0 and r["kept"] > 5 * CHUNK
    if "K_eq_1" in case:
        assert r["kept"] == 1



@pytest.mark.parametrize("case", CASES)
def test_setting_reaches_the_engine_from_the_config_node_and_no_env_is_read(results, case):
    r = results["cases"][case]
    assert r["engine_settings"] == {"teacher_path": None, "loss": "pg", "sparse_lm_head": True,
                                    "lm_head_chunk_rows": r["chunk_rows"]}
    assert r["env_reads"] == []  # nothing TIP_VERL_* is read per micro-batch (or per step)


if __name__ == "__main__":
    _child_main(sys.argv[1])

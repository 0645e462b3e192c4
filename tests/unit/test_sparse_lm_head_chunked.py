"""Exactness at scale of the chunked kept-row lm_head inside verl's update step (issue 12, point 3).

Same method as ``test_sparse_lm_head.py`` (verl's real FSDP2 actor engine, float32, run as verl ships
it and through :class:`SparseLMHeadTrainingWorker`, loss and every parameter gradient compared), but
with hundreds of kept rows in one micro-batch and ``TIP_VERL_LM_HEAD_CHUNK_ROWS=64``, so the chunked
lm_head (:func:`tip_verl.kept_logprobs.kept_logprobs`) runs several chunks with a ragged tail; plus
K = 1, K = N (every response token kept), remove-padding on and off, tied and untied lm_heads,
entropy with temperature, and the unchunked gather-first path (``TIP_VERL_LM_HEAD_CHUNK_ROWS=0``).
The engines run in one child process (this file run as a script); the assertions are here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

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

#: name: (mask, chunk rows env value, entropy, temperature)
BATCH_CASES = {
    "all_kept_K_eq_N": ("all", str(CHUNK), False, 1.0),
    "half_kept": ("half", str(CHUNK), False, 1.0),
    "one_kept_K_eq_1": ("one", str(CHUNK), False, 1.0),
    "half_kept_entropy_temperature": ("half", str(CHUNK), True, 0.7),
    "half_kept_gather_first_unchunked": ("half", "0", True, 0.7),
}

CASES = [f"{engine}/{case}" for engine in ENGINES for case in BATCH_CASES]

RTOL, ATOL = 1e-5, 1e-6


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
    sys.path.insert(0, str(HERE))
    import _tiny_models as tm

    tm.setup_cpu_verl()

    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from tip_verl.verl_adapter import sparse_lm_head as slh

    calls = []  # (rows, chunk_rows) of every chunked lm_head call
    real = slh.kept_logprobs

    def spy(hidden, weight, labels, **kw):
        calls.append((int(hidden.shape[0]), kw.get("chunk_rows")))
        return real(hidden, weight, labels, **kw)

    slh.kept_logprobs = spy

    class SparseActor(ActorRolloutRefWorker):
        actor_worker_cls = slh.SparseLMHeadTrainingWorker

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
        sparse = SparseActor(config=cfg.copy(), role="actor")
        sparse.init_model()
        for seed, (case_name, (mask, chunk_env, entropy, temperature)) in enumerate(BATCH_CASES.items()):
            keep = _keep_mask(mask, seed)
            kw = dict(seed=seed, temperature=temperature, calculate_entropy=entropy)
            loss_full, grads_full = run_update(plain, tm.update_batch(rollout, keep, **kw), opts["use_remove_padding"])
            os.environ[slh.ENV_CHUNK_ROWS] = chunk_env
            calls.clear()
            try:
                loss_sparse, grads_sparse = run_update(sparse, tm.update_batch(rollout, keep, **kw),
                                                       opts["use_remove_padding"])
            finally:
                del os.environ[slh.ENV_CHUNK_ROWS]
            results["cases"][f"{engine_name}/{case_name}"] = {
                "loss_full": loss_full, "loss_sparse": loss_sparse, "grads_full": grads_full,
                "grads_sparse": grads_sparse, "kept": int(keep.sum()), "chunk_calls": list(calls),
                "chunk_env": int(chunk_env),
            }
        del plain, sparse

    torch.save(results, out / "results.pt")
    (out / "done.json").write_text(json.dumps({"cases": sorted(results["cases"])}))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse_lm_head_chunked")
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    env.pop("TIP_VERL_SPARSE_LM_HEAD", None)
    env.pop("TIP_VERL_LM_HEAD_CHUNK_ROWS", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out)],
                          env=env, capture_output=True, text=True, timeout=1500)
    if proc.returncode != 0 or not (out / "results.pt").exists():
        raise AssertionError(f"engine child process failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return torch.load(out / "results.pt", weights_only=False)


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str):
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.allclose(a, b, rtol=RTOL, atol=ATOL), f"{what}: max |diff| {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize("case", CASES)
def test_loss_and_grads_match_verl_full_logits(results, case):
    r = results["cases"][case]
    _assert_close(r["loss_sparse"], r["loss_full"], f"{case} loss")
    assert r["grads_full"].keys() == r["grads_sparse"].keys()
    for name, g_full in r["grads_full"].items():
        if "lm_head" in name or "embed_tokens" in name:
            assert g_full.abs().sum() > 0, f"{case}: reference gradient of {name} is zero"
        _assert_close(r["grads_sparse"][name], g_full, f"{case} grad {name}")


@pytest.mark.parametrize("case", CASES)
def test_chunked_path_ran_with_several_chunks(results, case):
    r = results["cases"][case]
    if r["chunk_env"] == 0:
        assert r["chunk_calls"] == []  # gather-first only: the lm_head module computed the kept logits
        return
    assert r["chunk_calls"] == [(r["kept"], CHUNK)]  # one micro-batch, every kept row, chunk from the env
    if "K_eq_N" in case:
        assert r["kept"] == sum(RESPONSE_LENS) and r["kept"] % CHUNK != 0 and r["kept"] > 5 * CHUNK
    if "K_eq_1" in case:
        assert r["kept"] == 1


if __name__ == "__main__":
    _child_main(sys.argv[1])

"""Exactness at scale of the chunked kept-row lm_head inside verl's update step (issue 12, point 3).

Same method as ``test_sparse_lm_head.py`` (verl's real FSDP2 actor engine, float32, run as verl ships
it and through the TIP worker's :class:`TIPLMHeadTrainingWorker`, loss and every parameter gradient
compared), but with hundreds of kept rows in one micro-batch and ``+tip.lm_head_chunk_rows=64`` (the
``actor_rollout_ref.tip_worker`` node the trainer writes), so the chunked lm_head
(:func:`tip_verl.kept_logprobs.kept_logprobs`) runs several chunks with a ragged tail; plus K = 1,
K = N (every response token kept), remove-padding on and off, tied and untied lm_heads, entropy with
temperature, and the unchunked gather-first path (``+tip.lm_head_chunk_rows=0``). The setting reaches
the engine from the config node, and no environment variable is read during the update step.

The top-k reverse-KL loss (``+tip.loss=topk_reverse_kl``) is compared the same way: the chunked lm_head
(log-probs at the label and the teacher's top-k ids, several chunks), the unchunked kept-row logits
(``+tip.lm_head_chunk_rows=0``) and verl's own engine (logits of every token) with the same loss written
out in plain torch on those logits give the same loss and gradients; a dispatch-mode spy shows that the
chunked path never holds more than ``chunk_rows x vocab`` logits (the other two hold ``K x vocab`` or more).
The engines run in one child process (this file run as a script); the assertions are here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _tiny_models import assert_close, assert_same_update, run_engine_child  # noqa: E402

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

TOPK = 8
#: +tip.loss=topk_reverse_kl, name: (mask, entropy, temperature); each runs chunked, unchunked and on verl's path
TOPK_BATCH_CASES = {
    "topk_all_kept_K_eq_N": ("all", False, 1.0),
    "topk_half_kept_entropy_temperature": ("half", True, 0.7),
    "topk_one_kept_K_eq_1": ("one", False, 1.0),
}
TOPK_CASES = [f"{engine}/{case}" for engine in ENGINES for case in TOPK_BATCH_CASES]


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


def _teacher_topk(rollout: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random teacher's top-k (log-probs, ids) per response token, nested ``(bsz, R_i, TOPK)`` as the ref
    pass writes them; the sampled token is boosted into the top-k at every other position (so the label
    is also one of the teacher's ids there)."""
    g = torch.Generator().manual_seed(100 + seed)
    responses = rollout["responses"]
    logits = torch.randn(*responses.shape, VOCAB, generator=g) * 2
    logits[:, ::2].scatter_add_(-1, responses[:, ::2, None], torch.full((*responses[:, ::2].shape, 1), 8.0))
    top = torch.log_softmax(logits, dim=-1).topk(TOPK, dim=-1)
    lens = rollout["response_mask"].sum(1).tolist()

    def nested(t):
        return torch.nested.as_nested_tensor([t[i, :n] for i, n in enumerate(lens)], layout=torch.jagged)

    return nested(top.values.float()), nested(top.indices.to(torch.int32))


def _reference_topk_loss(engine, config):
    """verl's own engine (logits of every packed token) with the top-k reverse KL of the kept tokens written
    out in plain torch on those logits (the tails as 1 - Σp), aggregated by the TIP loss function."""
    from verl.utils import tensordict_utils as tu

    from tip_verl.verl_adapter import sparse_lm_head as slh
    from tip_verl.verl_adapter import topk_signal as ts

    captured = []
    verl_outputs = engine.prepare_model_outputs

    def prepare_model_outputs(output, *args, **kwargs):  # the logits verl's own path reads
        captured.append(output.logits)
        return verl_outputs(output, *args, **kwargs)

    engine.prepare_model_outputs = prepare_model_outputs

    def loss_fn(model_output, data, dp_group=None):
        logits = captured.pop()
        positions, seq_index = slh.kept_logit_positions(data)
        cu = data["input_ids"].offsets()
        if logits.shape[0] == 1:  # remove-padding: (1, total_nnz, V)
            flat = positions
        else:  # (bsz, S, V), sequences left-aligned
            flat = seq_index * logits.shape[1] + positions - cu[seq_index]
        temperature = float(tu.get_non_tensor_data(data=data, key="temperature", default=1.0))
        rows = logits.reshape(-1, VOCAB)[flat].float() / temperature
        lt = data[ts.TEACHER_TOPK_LOGPROBS].values()
        ids = data[ts.TEACHER_TOPK_IDS].values()
        response_rows = ts.response_rows_of(data, positions, seq_index)
        lt, ids = lt[response_rows], ids[response_rows].long()
        ls = torch.log_softmax(rows, dim=-1).gather(-1, ids)
        tail_s, tail_t = 1 - ls.exp().sum(-1), 1 - lt.exp().sum(-1)
        kl = (ls.exp() * (ls - lt)).sum(-1) + tail_s * (tail_s.log() - tail_t.log())
        full = kl.new_zeros(data["input_ids"].values().shape[0]).index_copy(0, positions, kl)
        per_token = torch.nested.nested_tensor_from_jagged(full, cu)
        return ts.topk_reverse_kl_loss(config, {ts.TOPK_REVERSE_KL: per_token}, data, dp_group)

    return loss_fn


def _vocab_rows_spy():
    """A dispatch mode recording, for every float tensor with a vocab-sized dimension that any op (forward
    or backward) creates, its number of elements / vocab; ``.largest`` is the maximum."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class VocabRows(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if (isinstance(t, torch.Tensor) and not t.is_nested and t.is_floating_point()
                        and VOCAB in t.shape):
                    self.largest = max(self.largest, t.numel() // VOCAB)
            return out

    return VocabRows()


def _child_main(out_dir: str) -> None:  # pragma: no cover - runs in the child process
    import _tiny_models as tm

    tm.setup_cpu_verl()

    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from tip_verl.verl_adapter import sparse_lm_head as slh
    from tip_verl.verl_adapter import topk_signal
    from tip_verl.verl_adapter.teacher import TIPActorRolloutRefWorker

    calls = []  # (rows, chunk_rows) of every chunked lm_head call
    real = slh.kept_logprobs

    def spy(hidden, weight, labels, **kw):
        calls.append((int(hidden.shape[0]), kw.get("chunk_rows")) + tuple(labels.shape[1:]))
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
    results: dict = {"cases": {}, "topk_cases": {}}

    def run_update(worker, td, rmpad: bool, loss_fn=None, spy=None):
        engine = worker.actor.engine
        tu.assign_non_tensor(td, use_remove_padding=rmpad, use_dynamic_bsz=False, max_token_len_per_gpu=4096,
                             micro_batch_size_per_gpu=BATCH, use_fused_kernels=False)
        with engine.train_mode():
            engine.optimizer_zero_grad()
            with spy if spy is not None else contextlib.nullcontext():
                output = engine.forward_backward_batch(td, loss_function=loss_fn or worker.actor.loss_fn,
                                                       forward_only=False)
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

        # +tip.loss=topk_reverse_kl: chunked lm_head, unchunked kept-row logits, verl's path + torch loss
        topk = {rows: TIPActorRolloutRefWorker(config=tm.tip_worker_config(cfg, loss="topk_reverse_kl",
                                                                           lm_head_chunk_rows=rows), role="actor")
                for rows in (CHUNK, 0)}
        for worker in topk.values():
            worker.init_model()
        reference_loss = _reference_topk_loss(plain.actor.engine, plain.actor.loss_fn.keywords["config"])
        for seed, (case_name, (mask, entropy, temperature)) in enumerate(TOPK_BATCH_CASES.items()):
            keep = _keep_mask(mask, seed)
            teacher = _teacher_topk(rollout, seed)

            def batch():
                td = tm.update_batch(rollout, keep, seed=seed, temperature=temperature, calculate_entropy=entropy)
                td[topk_signal.TEACHER_TOPK_LOGPROBS], td[topk_signal.TEACHER_TOPK_IDS] = teacher
                return td

            r = {"kept": int(keep.sum())}
            spies = {name: _vocab_rows_spy() for name in ("chunked", "unchunked", "verl")}
            calls.clear()
            r["loss_chunked"], r["grads_chunked"] = run_update(topk[CHUNK], batch(), opts["use_remove_padding"],
                                                               spy=spies["chunked"])
            r["chunk_calls"] = list(calls)
            calls.clear()
            r["loss_unchunked"], r["grads_unchunked"] = run_update(topk[0], batch(), opts["use_remove_padding"],
                                                                   spy=spies["unchunked"])
            r["unchunked_calls"] = list(calls)
            r["loss_verl"], r["grads_verl"] = run_update(plain, batch(), opts["use_remove_padding"],
                                                         loss_fn=reference_loss, spy=spies["verl"])
            r["vocab_rows"] = {name: spy.largest for name, spy in spies.items()}
            results["topk_cases"][f"{engine_name}/{case_name}"] = r
        del plain, sparse, topk

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


@pytest.mark.parametrize("case", TOPK_CASES)
def test_topk_loss_chunked_equals_unchunked_and_verl(results, case):
    r = results["topk_cases"][case]
    for path in ("chunked", "unchunked"):  # verl's own logits + the loss in plain torch are the reference
        assert_same_update({"loss_full": r["loss_verl"], "grads_full": r["grads_verl"],
                            "loss_sparse": r[f"loss_{path}"], "grads_sparse": r[f"grads_{path}"]}, f"{case} {path}")
    assert_close(r["loss_chunked"], r["loss_unchunked"], f"{case} chunked vs unchunked loss")
    assert float(r["loss_verl"]) > 0


@pytest.mark.parametrize("case", TOPK_CASES)
def test_topk_loss_chunked_head_asks_label_and_teacher_ids_in_several_chunks(results, case):
    r = results["topk_cases"][case]
    assert r["chunk_calls"] == [(r["kept"], CHUNK, 1 + TOPK)]  # [label, k teacher ids] per kept row
    assert r["unchunked_calls"] == []  # +tip.lm_head_chunk_rows=0: the kept-row logits, in one block
    if "K_eq_N" in case:
        assert r["kept"] == sum(RESPONSE_LENS) and r["kept"] > 5 * CHUNK
    if "K_eq_1" in case:
        assert r["kept"] == 1


@pytest.mark.parametrize("case", TOPK_CASES)
def test_topk_loss_chunked_never_holds_more_than_chunk_rows_of_logits(results, case):
    """No float tensor with a vocab-sized dimension holds more than CHUNK x vocab elements (forward and
    backward) on the chunked path; the spy does see the K x vocab logits of the other two paths."""
    r = results["topk_cases"][case]
    rows = r["vocab_rows"]
    assert rows["chunked"] <= CHUNK, rows
    assert rows["unchunked"] >= r["kept"] and rows["verl"] >= sum(RESPONSE_LENS), rows
    if r["kept"] > CHUNK:
        assert rows["unchunked"] > CHUNK


if __name__ == "__main__":
    _child_main(sys.argv[1])

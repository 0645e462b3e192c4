#!/usr/bin/env python
"""Peak memory and time of verl's actor update step: verl's full logits vs tip_verl's sparse LM head.

Every configuration runs in a fresh subprocess: verl's ``ActorRolloutRefWorker`` (role ``actor``,
FSDP2, one rank, no Ray) is built on a random-weight Qwen2 model, one warm-up ``update_actor`` step
runs (so the optimizer state exists), then one step with the memory probes, then ``--steps`` timed
steps without them. ``update_actor`` is the call
verl's trainer makes: ``train_mini_batch`` -> ``train_batch`` -> engine ``forward_backward_batch``
+ optimizer step, with verl's ``ppo_loss``.

* ``baseline``: verl's own ``TrainingWorker`` (logits for every packed token); the keep-mask is
  applied only through ``response_mask`` / ``loss_mask`` in the loss.
* ``tip``: the TIP worker (``TIPActorRolloutRefWorker``, its actor a ``TIPLMHeadTrainingWorker``, settings
  from the ``actor_rollout_ref.tip_worker`` node as in tip_sync); same keep-mask; the LM head runs only at
  kept tokens.

``--compare`` (issue 12) runs, in one run, the configurations that separate the mechanisms:
``baseline`` (verl default), ``baseline_fused`` (verl ``use_fused_kernels=True``), and at each ratio
``tip_gather`` (gather-first only: the (K, vocab) kept logits, ``+tip.lm_head_chunk_rows=0``),
``tip`` (the default: gather-first + chunked lm_head/log-probs, ``tip_verl.kept_logprobs``) and
``tip_fused`` (gather-first on top of verl's fused kernels), plus the floor (``tip`` with one kept token
per sequence). It needs a tied lm_head (``--tied``; verl's fused forward reads ``lm_head.weight``
outside the module, which FSDP2 unshards only when it is tied to the embeddings).

Keep-masks: ``round(ratio * response_len)`` tokens per sequence drawn at random (seeded), written into
``response_mask`` and ``loss_mask`` as the TIP trainer does. Tokens and weights are random.

Memory: CPU -- peak resident memory during the step minus resident memory right before it (peak from
``/proc/self/status`` VmHWM after resetting it through ``/proc/self/clear_refs``, cross-checked by a
1 ms RSS sampler thread; glibc is told to return freed memory at once, and set back to its usual
thresholds for the timed steps, see ``--no-malloc-tuning``). CUDA --
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus the allocation before.

Default: hidden 512, 4 layers, vocab 151,936, float32, 4 x (128 prompt + 1024 response), one micro-batch
of all 4 sequences, verl's model defaults (remove-padding on, gradient checkpointing on). A
Qwen2.5-1.5B-like run on a GPU::

    python scripts/bench_memory.py --device cuda --dtype bfloat16 --hidden 1536 --layers 28 --heads 12 \\
        --kv-heads 2 --intermediate 8960 --tied --attn flash_attention_2 --out bench_results/gpu_1p5b
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: --compare configurations: mode -> (TIP worker, verl use_fused_kernels, +tip.lm_head_chunk_rows; None = default)
COMPARE_MODES = {
    "baseline_fused": (False, True, None),
    "tip_gather": (True, False, 0),
    "tip_fused": (True, True, None),
}
MODE_SETUP = {"baseline": (False, False, None), "tip": (True, False, None), "teacher": (True, False, None),
              **COMPARE_MODES}


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="model and FSDP2 compute (param) dtype")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 2 x hidden)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--tied", action="store_true", help="tie lm_head to the embeddings (Qwen2.5 <= 3B do)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--response-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="sequences; all of them form one micro-batch")
    p.add_argument("--ratios", default="1.0,0.5,0.2,0.1", help="TIP keep ratios")
    p.add_argument("--baseline-ratio", type=float, default=None,
                   help="keep ratio of the baseline's loss mask (default: the smallest ratio); its memory "
                        "and time do not depend on it")
    p.add_argument("--baseline-per-ratio", action="store_true",
                   help="run the baseline once per ratio (with that ratio's mask) instead of once")
    p.add_argument("--no-remove-padding", action="store_true", help="padded (bsz, seq) forward instead of packed")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2)")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="turn off activation checkpointing of the decoder layers (verl's default is on)")
    p.add_argument("--steps", type=int, default=2,
                   help="timed steps per configuration after 1 warm-up (the fastest is reported, the least "
                        "disturbed by other jobs); one more step measures memory")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); 1 makes CPU time comparable on a busy machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="CPU: keep glibc's default malloc thresholds throughout (freed memory may stay resident "
                        "and hide part of the step's peak)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per configuration")
    p.add_argument("--from-raw", help="only rebuild the CSV / markdown / PNG from a bench_memory_raw.json")
    p.add_argument("--resume", default=None,
                   help="--compare: keep the records of this bench_memory_compare_raw.json of a stopped run with the "
                        "same settings and run only the missing configurations")
    p.add_argument("--compare", action="store_true",
                   help="issue 12: verl default, verl fused kernels, tip gather-first / default (chunked) / on fused "
                        "at every ratio, and the floor (one kept token per sequence), in one run (needs --tied)")
    p.add_argument("--profile-memory", action="store_true",
                   help="after the measured steps, profile one more step with torch.profiler(profile_memory=True) "
                        "and write its memory timeline (by category) and top allocating ops under --out")
    # internal: one configuration in this process
    p.add_argument("--teacher-topk", default=None,
                   help="instead of the update step, measure the teacher (ref) forward pass of the TIP worker "
                        "for these comma-separated top-k sizes (0 = sampled-token log-probs only, verl's ref "
                        "pass), e.g. 0,64: peak memory, time and the bytes per token of the top-k transfer")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["baseline", "tip", "teacher", *COMPARE_MODES], help=argparse.SUPPRESS)
    p.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--profile-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# model + data
# ---------------------------------------------------------------------------------------------
def build_model(path: Path, args) -> Path:
    """Random-weight Qwen2ForCausalLM + a small word-level tokenizer (ids beyond it are still valid)."""
    import torch
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(min(args.vocab, 1000) - len(specials) - 1)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens([AddedToken("\n", normalized=False)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                     unk_token="<unk>", bos_token=None, additional_special_tokens=["<|im_start|>"])
    hf_tok.save_pretrained(path)

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or 2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(4096, args.prompt_len + args.response_len), tie_word_embeddings=args.tied,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, torch_dtype=args.dtype,
    )
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    del model
    return path


def keep_mask(args, ratio: float):
    """(batch, response_len) long mask: round(ratio * response_len) random tokens per sequence."""
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    n_keep = max(1, round(ratio * args.response_len))
    mask = torch.zeros(args.batch, args.response_len, dtype=torch.long)
    for i in range(args.batch):
        mask[i, torch.randperm(args.response_len, generator=g)[:n_keep]] = 1
    return mask


def update_batch(args, keep):
    """verl's V1-trainer layout (nested per-sample fields) for ``update_actor``."""
    import torch
    from tensordict import TensorDict

    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(args.seed)
    B, P, R = args.batch, args.prompt_len, args.response_len
    prompts = torch.randint(3, args.vocab, (B, P), generator=g)
    responses = torch.randint(3, args.vocab, (B, R), generator=g)
    input_ids = torch.cat([prompts, responses], dim=1)
    position_ids = torch.arange(P + R).expand(B, -1)
    old_log_probs = -torch.rand(B, R, generator=g) * 5
    advantages = torch.randn(B, R, generator=g) * keep

    def jag(t):
        return torch.nested.as_nested_tensor(list(t), layout=torch.jagged)

    td = TensorDict(
        {
            "prompts": jag(prompts), "responses": jag(responses), "input_ids": jag(input_ids),
            "position_ids": jag(position_ids), "response_mask": jag(keep), "loss_mask": jag(keep),
            "old_log_probs": jag(old_log_probs), "advantages": jag(advantages),
        },
        batch_size=B,
    )
    from tip_verl.verl_adapter.local_workers import update_meta

    tu.assign_non_tensor(td, **update_meta(B, seed=args.seed, compute_loss=True, multi_turn=False))
    return td


def actor_config(args, model_dir: str):
    from tip_verl.verl_adapter.cpu_overrides import fsdp2_engine_overrides
    from tip_verl.verl_adapter.local_workers import compose_ppo_config

    fused = MODE_SETUP[args.mode][1] if getattr(args, "mode", None) else False

    B, L = args.batch, args.prompt_len + args.response_len
    overrides = [
        f"actor_rollout_ref.model.path={model_dir}",
        f"actor_rollout_ref.model.use_remove_padding={not args.no_remove_padding}",
        f"actor_rollout_ref.model.enable_gradient_checkpointing={not args.no_gradient_checkpointing}",
        f"actor_rollout_ref.model.use_fused_kernels={fused}",
        "actor_rollout_ref.model.fused_kernel_options.impl_backend=torch",
        f"+actor_rollout_ref.model.override_config.attn_implementation={args.attn}",
        "actor_rollout_ref.actor.strategy=fsdp2",
        *fsdp2_engine_overrides("actor", model_dtype=args.dtype),
        "actor_rollout_ref.actor.use_torch_compile=False",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={B}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={B}",
        f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={B * L}",
        "actor_rollout_ref.actor.use_dynamic_bsz=False",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.entropy_coeff=0",
        "actor_rollout_ref.actor.optim.lr=1e-6",
        "actor_rollout_ref.rollout.n=1",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={B}",
        f"actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu={B * L}",
        f"trainer.device={args.device}",
        "trainer.n_gpus_per_node=1",
    ]
    return compose_ppo_config(overrides).actor_rollout_ref


# ---------------------------------------------------------------------------------------------
# memory probes
# ---------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    from tip_verl.verl_adapter.cpu.platform import rss_bytes as platform_rss_bytes

    return platform_rss_bytes()


def hwm_bytes() -> int:
    """Peak RSS since the last :func:`reset_hwm` (Linux ``VmHWM``; 0 where it cannot be read)."""
    from tip_verl.verl_adapter.cpu.platform import _vm_hwm_bytes

    return _vm_hwm_bytes() or 0


def reset_hwm() -> bool:
    """``VmHWM`` := current RSS (the CPU platform's own reset); False where that is not possible."""
    from tip_verl.verl_adapter.cpu.platform import reset_peak_rss

    return reset_peak_rss()


#: glibc thresholds for the memory-measured step: allocations >= 128 KiB are mmapped and unmapped on free, so
#: RSS follows the live tensors (with the defaults, freed medium-size tensors stay in the heap and a step
#: that reuses them shows no RSS growth). Set in the child's environment, i.e. from its start.
MALLOC_MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def malloc_steady_state() -> None:
    """Before the timed steps: glibc's thresholds where its dynamic defaults settle (32 MiB mmap, 64 MiB trim)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024)
    except Exception:
        pass


def malloc_trim() -> None:
    """Freed heap back to the OS (glibc ``malloc_trim(0)``), as the CPU platform's update-step window does."""
    from tip_verl.verl_adapter.cpu.platform import release_free_heap

    release_free_heap()


class RSSSampler:
    """Peak RSS seen by a background thread polling /proc/self/statm every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---------------------------------------------------------------------------------------------
# one configuration (child process)
# ---------------------------------------------------------------------------------------------
def run_worker(args) -> dict:
    from tip_verl.verl_adapter.local_workers import world_of_one_env

    os.environ.update(world_of_one_env(), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.device == "cpu":
        os.environ["VERL_PLATFORM"] = "cpu"
        from tip_verl.verl_adapter.cpu import register

        register()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from omegaconf import open_dict
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from tip_verl.verl_adapter.opd_config import WORKER_NODE, TIPWorkerConfig
    from tip_verl.verl_adapter.teacher import TIPActorRolloutRefWorker

    tip, _, chunk_rows = MODE_SETUP[args.mode]
    config = actor_config(args, args.model_dir)
    if tip:  # the node the tip_sync trainer writes from +tip.*
        with open_dict(config):
            config[WORKER_NODE] = TIPWorkerConfig(lm_head_chunk_rows=chunk_rows).to_node()
    worker = (TIPActorRolloutRefWorker if tip else ActorRolloutRefWorker)(config=config, role="actor")
    worker.init_model()
    engine_cls = type(worker.actor.engine).__name__
    keep = keep_mask(args, args.ratio)
    if args.mode == "teacher":
        return run_teacher_pass(args, worker, keep, engine_cls)

    def step():
        out = worker.update_actor(update_batch(args, keep))
        return tu.get(out, "metrics")

    metrics = step()  # warm-up: optimizer state exists from here on
    cuda = args.device == "cuda"

    # 1) memory: one step with the peak probes
    td = update_batch(args, keep)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        malloc_trim()
        before = rss_bytes()
        hwm_ok = reset_hwm()
    with RSSSampler() as sampler:
        out = worker.update_actor(td)
        if cuda:
            torch.cuda.synchronize()
    metrics = tu.get(out, "metrics")
    if cuda:
        peak, sampled = torch.cuda.max_memory_allocated() - before, None
    else:
        hwm = hwm_bytes() if hwm_ok else 0
        peak, sampled = max(hwm, sampler.peak) - before, sampler.peak - before
    memory = {"peak_bytes": peak, "sampled_peak_bytes": sampled, "before_bytes": before,
              "hwm_reset": None if cuda else hwm_ok, "process_peak_bytes": before + peak}

    # 2) time: no probes; on the CPU glibc back to its steady-state thresholds (freed memory reused)
    if not cuda and not args.no_malloc_tuning:
        malloc_steady_state()
    timings = []
    for _ in range(args.steps):
        td = update_batch(args, keep)
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        worker.update_actor(td)
        if cuda:
            torch.cuda.synchronize()
        timings.append({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0})
    if args.profile_dir:
        profile_step(args, worker, keep, Path(args.profile_dir))
    pg_loss = metrics.get("actor/pg_loss")
    return {
        "mode": args.mode, "ratio": args.ratio, "engine": engine_cls,
        "kept_tokens": int(keep.sum()), "response_tokens": args.batch * args.response_len,
        "total_tokens": args.batch * (args.prompt_len + args.response_len),
        "peak_bytes": memory["peak_bytes"], "process_peak_bytes": memory["process_peak_bytes"],
        "use_fused_kernels": MODE_SETUP[args.mode][1],
        "lm_head_chunk_rows": chunk_rows,
        "seconds": min(r["seconds"] for r in timings),
        "cpu_seconds": min(r["cpu_seconds"] for r in timings),
        "timing_steps": timings,
        "memory_step": memory,
        "pg_loss": float(pg_loss[0] if isinstance(pg_loss, list) else pg_loss) if pg_loss is not None else None,
    }


def run_teacher_pass(args, worker, keep, engine_cls: str) -> dict:
    """The TIP trainer's teacher pass (forward only, ``compute_log_prob``) with top-k k = ``args.ratio``.

    k = 0 is verl's ref pass (sampled-token log-probs). Same probes as the update step.
    """
    import torch

    from verl.utils import tensordict_utils as tu

    from tip_verl.verl_adapter import topk_signal

    k = int(args.ratio)

    def batch():
        td = update_batch(args, keep)
        tu.assign_non_tensor(td, compute_loss=False, micro_batch_size_per_gpu=args.batch)
        if k:
            tu.assign_non_tensor(td, **{topk_signal.FLAG_TEACHER_TOPK: k})
        return td

    out = worker.compute_log_prob(batch())  # warm-up
    td = batch()
    gc.collect()
    malloc_trim()
    before = rss_bytes()
    hwm_ok = reset_hwm()
    with RSSSampler() as sampler:
        out = worker.compute_log_prob(td)
    hwm = hwm_bytes() if hwm_ok else 0
    peak = max(hwm, sampler.peak) - before
    transfer = 0
    for key in (topk_signal.TEACHER_TOPK_LOGPROBS, topk_signal.TEACHER_TOPK_IDS):
        if k:
            transfer += tu.get(out, key).values().nbytes
    if not args.no_malloc_tuning:
        malloc_steady_state()
    timings = []
    for _ in range(args.steps):
        td = batch()
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        worker.compute_log_prob(td)
        timings.append({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0})
    response_tokens = args.batch * args.response_len
    return {
        "mode": "teacher", "ratio": k, "topk": k, "engine": engine_cls, "kept_tokens": response_tokens,
        "response_tokens": response_tokens, "total_tokens": args.batch * (args.prompt_len + args.response_len),
        "peak_bytes": peak, "seconds": min(r["seconds"] for r in timings),
        "cpu_seconds": min(r["cpu_seconds"] for r in timings), "timing_steps": timings,
        "transfer_bytes": transfer, "transfer_bytes_per_token": transfer / response_tokens,
        "logits_bytes": args.batch * (args.prompt_len + args.response_len) * args.vocab * 4,
        "memory_step": {"peak_bytes": peak, "before_bytes": before, "hwm_reset": hwm_ok},
    }


def teacher_report(args, recs: list[dict], out: Path) -> None:
    """bench_teacher_pass.{json,md}: peak memory / time of the teacher pass per top-k size."""
    base = recs[0]
    lines = [
        "| teacher pass | peak memory (GiB) | peak / sampled | step wall (s) | step CPU (s) | "
        "top-k transfer (bytes / response token) |",
        "|---|---|---|---|---|---|",
    ]
    for rec in recs:
        name = "sampled token only (verl's ref pass)" if rec["topk"] == 0 else f"top-{rec['topk']}"
        lines.append(f"| {name} | {rec['peak_bytes'] / 2**30:.3f} | {rec['peak_bytes'] / base['peak_bytes']:.3f} | "
                     f"{rec['seconds']:.2f} | {rec['cpu_seconds']:.2f} | {rec['transfer_bytes_per_token']:.0f} |")
    header = (f"Teacher (ref) forward pass, one run of `python scripts/bench_memory.py --teacher-topk "
              f"{args.teacher_topk}{' --threads ' + str(args.threads) if args.threads else ''}`: Qwen2 hidden "
              f"{args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}, {args.batch} x "
              f"({args.prompt_len} + {args.response_len}) tokens, one micro-batch, {args.device}. The full logits "
              f"of the pass alone are {base['logits_bytes'] / 2**30:.2f} GiB.")
    (out / "bench_teacher_pass.md").write_text(header + "\n\n" + "\n".join(lines) + "\n")
    (out / "bench_teacher_pass_raw.json").write_text(json.dumps({"args": vars(args), "runs": recs}, indent=1))


def profile_step(args, worker, keep, out: Path) -> None:
    """One more update step under torch.profiler: memory timeline by category + top allocating ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.mode}_{args.ratio}"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    td = update_batch(args, keep)
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        worker.update_actor(td)
    device = "cuda:0" if args.device == "cuda" else "cpu"
    try:
        prof.export_memory_timeline(str(out / f"memory_timeline_{tag}.json"), device=device)
        _summarise_timeline(out / f"memory_timeline_{tag}.json", out / f"memory_timeline_{tag}.txt")
    except Exception as exc:  # the timeline needs with_stack + record_shapes; keep the table anyway
        print(f"memory timeline failed: {exc!r}", file=sys.stderr)
    sort_key = "self_cuda_memory_usage" if args.device == "cuda" else "self_cpu_memory_usage"
    averages = prof.key_averages()
    time_key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    (out / f"top_ops_{tag}.txt").write_text(
        "by self memory\n" + averages.table(sort_by=sort_key, row_limit=30)
        + "\n\nby self time\n" + averages.table(sort_by=time_key, row_limit=30)
    )


def _summarise_timeline(src: Path, dst: Path) -> None:
    """Peak of the profiler's memory timeline and what each category held at that moment."""
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX

    times, sizes = json.loads(src.read_text())
    names = ["-"] + [getattr(c, "name", "UNKNOWN") for c, _ in sorted(_CATEGORY_TO_INDEX.items(), key=lambda kv: kv[1])]
    totals = [sum(row) for row in sizes]
    peak = max(range(len(totals)), key=totals.__getitem__)
    base = sizes[0]
    lines = [f"peak {totals[peak] / 2**30:.3f} GiB at t={times[peak] - times[0]:.0f} us (start {totals[0] / 2**30:.3f} GiB)"]
    for name, at_peak, at_start in zip(names, sizes[peak], base):
        lines.append(f"  {name:16s} {at_peak / 2**30:8.3f} GiB at peak   (start {at_start / 2**30:8.3f} GiB)")
    dst.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _child_cmd(args, mode: str, ratio: float, model_dir: Path, result: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mode", mode, "--ratio", str(ratio),
           "--model-dir", str(model_dir), "--result", str(result)]
    for name in ("device", "dtype", "hidden", "layers", "heads", "kv_heads", "vocab", "prompt_len",
                 "response_len", "batch", "attn", "steps", "seed", "threads"):
        if getattr(args, name) is not None:
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.intermediate:
        cmd += ["--intermediate", str(args.intermediate)]
    if args.profile_memory:
        cmd += ["--profile-dir", str(Path(args.out).resolve() / "profiles")]
    for flag in ("tied", "no_remove_padding", "no_gradient_checkpointing", "no_malloc_tuning"):
        if getattr(args, flag):
            cmd.append(f"--{flag.replace('_', '-')}")
    return cmd


def run_config(args, mode: str, ratio: float, model_dir: Path, work: Path) -> dict:
    result = work / f"{mode}_{ratio}.json"
    env = dict(os.environ)
    if args.device == "cpu" and not args.no_malloc_tuning:
        env.update(MALLOC_MEASURE_ENV)
    t0 = time.time()
    proc = subprocess.run(_child_cmd(args, mode, ratio, model_dir, result), env=env,
                          capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"{mode} ratio={ratio} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    rec = json.loads(result.read_text())
    rec["wall_seconds"] = time.time() - t0
    print(f"  {mode:8s} ratio={ratio:<4} peak={rec['peak_bytes'] / 2**30:7.3f} GiB  step={rec['seconds']:7.2f} s "
          f"(cpu {rec['cpu_seconds']:7.2f} s)  "
          f"({rec['engine']}, {rec['wall_seconds']:.0f} s wall)", flush=True)
    return rec


def write_reports(args, rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["config", "keep_ratio", "kept_tokens", "peak_mem_gib", "peak_mem_ratio", "target_mem_ratio",
              "step_s", "step_time_ratio", "step_cpu_s", "step_cpu_time_ratio", "baseline_peak_mem_gib",
              "baseline_step_s", "engine"]
    with open(out / "bench_memory.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in fields})

    setup = (f"{args.device}, {args.dtype}, Qwen2 hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}"
             f"{', tied' if args.tied else ''}, {args.batch} x ({args.prompt_len} prompt + {args.response_len} response)"
             f" tokens in one micro-batch, remove-padding {'off' if args.no_remove_padding else 'on'}, gradient "
             f"checkpointing {'off' if getattr(args, 'no_gradient_checkpointing', False) else 'on'}, attn {args.attn}"
             f"{f', {args.threads} torch thread(s)' if getattr(args, 'threads', None) else ''}")
    lines = [
        "# Actor update step: verl full logits vs tip_verl sparse LM head", "", setup, "",
        "| config | keep ratio | kept tokens | peak mem (GiB) | mem / baseline | target | step wall (s) "
        "| wall / baseline | step CPU (s) | CPU / baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = f"<= {r['target_mem_ratio']:.2f}" if r["target_mem_ratio"] is not None else ""
        lines.append(
            f"| {r['config']} | {r['keep_ratio']:.2f} | {r['kept_tokens']} | {r['peak_mem_gib']:.3f} | "
            f"{r['peak_mem_ratio']:.3f} | {target} | {r['step_s']:.2f} | {r['step_time_ratio']:.3f} | "
            f"{r['step_cpu_s']:.2f} | {r['step_cpu_time_ratio']:.3f} |"
        )
    lines += ["", "Peak memory: " + (
        "peak RSS during `update_actor` minus RSS right before it (VmHWM reset via /proc/self/clear_refs, "
        "1 ms sampler cross-check)." if args.device == "cpu" else
        "`torch.cuda.max_memory_allocated()` during `update_actor` minus the allocation before it."),
        "Ratios are to the baseline (verl's own path, keep-mask only in the loss) of the same run. "
        "Step time: wall clock of `update_actor` and the process CPU time (all threads) over the same interval, "
        "fastest of the timed steps (run without the memory probes).", ""]
    (out / "bench_memory.md").write_text("\n".join(lines))

    def draw(axes):
        labels = [f"{r['config']}\n{r['keep_ratio']:.1f}" for r in rows]
        for ax, key, title in ((axes[0], "peak_mem_ratio", "peak memory / baseline"),
                               (axes[1], "step_time_ratio", "step wall time / baseline"),
                               (axes[2], "step_cpu_time_ratio", "step CPU time / baseline")):
            colors = ["#888888" if r["config"] == "baseline" else "#1f77b4" for r in rows]
            bars = ax.bar(range(len(rows)), [r[key] for r in rows], color=colors)
            for b, r in zip(bars, rows):
                ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{r[key]:.2f}", ha="center", va="bottom",
                        fontsize=8)
            if key == "peak_mem_ratio":
                for i, r in enumerate(rows):
                    if r["target_mem_ratio"] is not None:
                        ax.plot([i - 0.4, i + 0.4], [r["target_mem_ratio"]] * 2, color="red", lw=1)
            ax.set_xticks(range(len(rows)), labels, fontsize=8)
            ax.set_title(title)
            ax.set_ylim(0, max(1.1, max(r[key] for r in rows) * 1.15))

    save_plot(out / "bench_memory.png", setup, draw, ncols=3, figsize=(15, 4))


def save_plot(path: Path, setup: str, draw, *, ncols: int, figsize: tuple) -> None:
    """One PNG of ``ncols`` panels side by side, filled by ``draw(axes)``, with the set-up line above them;
    without matplotlib a note and no PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    draw(axes)
    fig.suptitle(setup, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_main(args, out: Path) -> int:
    """``--compare``: one run of every configuration of issue 12 (or ``--from-raw`` of such a run)."""
    if args.from_raw:
        raw = json.loads(Path(args.from_raw).read_text())
        for key, value in raw["args"].items():
            if key not in ("from_raw", "out"):
                setattr(args, key, value)
        runs = raw["compare"]
    else:
        if not args.tied:
            raise SystemExit("bench_memory.py: error: --compare needs --tied (verl's fused kernels under FSDP2)")
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
        floor_ratio = 1.0 / args.response_len  # one kept token per sequence
        # the configurations the targets read first, so a stopped run still answers them
        plan = [("baseline", min(ratios)), ("baseline_fused", min(ratios)), ("floor", floor_ratio)]
        first = [r for r in (0.2, 1.0) if r in ratios]
        plan += [("tip", r) for r in first]
        plan += [(mode, r) for r in first + [r for r in ratios if r not in first]
                 for mode in ("tip_gather", "tip", "tip_fused") if (mode, r) not in plan]
        runs = []
        if args.resume:  # an earlier, stopped run of the same command: keep its records, run the rest
            earlier = json.loads(Path(args.resume).read_text())
            same = ("hidden", "layers", "vocab", "tied", "prompt_len", "response_len", "batch", "dtype", "seed",
                    "threads", "steps", "no_gradient_checkpointing", "no_remove_padding", "attn", "ratios")
            diff = [k for k in same if earlier["args"].get(k) != getattr(args, k)]
            if diff:
                raise SystemExit(f"bench_memory.py: error: --resume {args.resume}: different settings {diff}")
            runs = list(earlier["compare"])
            for rec in runs:
                rec.setdefault("resumed_from", str(args.resume))
        done = {(rec["config"], rec["ratio"]) for rec in runs}
        with tempfile.TemporaryDirectory(prefix="tip_bench_") as tmp:
            work = Path(tmp)
            model_dir = build_model(work / "model", args)
            for mode, r in plan:
                if (mode, r) in done:
                    continue
                rec = run_config(args, "tip" if mode == "floor" else mode, r, model_dir, work)
                rec["config"] = mode
                runs.append(rec)
                (out / "bench_memory_compare_raw.json").write_text(  # partial results survive a crash
                    json.dumps({"args": {k: v for k, v in vars(args).items()}, "compare": runs}, indent=1))
    compare_reports(args, runs, out)
    print((out / "bench_memory_compare.md").read_text())
    return 0


#: label, and the issue-12 targets checked in the table
COMPARE_LABELS = {"baseline": "verl default", "baseline_fused": "verl use_fused_kernels",
                  "tip_gather": "tip_verl gather-first only", "tip": "tip_verl default (chunked)",
                  "tip_fused": "tip_verl on verl fused", "floor": "floor (tip_verl, 1 kept token / sequence)"}


def compare_reports(args, runs: list[dict], out: Path) -> None:
    """Table, CSV and PNG of a --compare run; a partial run (a crash, a stopped run) gets n/a and a note."""
    by = {(r["config"], r["ratio"]): r for r in runs}
    base = next((r for r in runs if r["config"] == "baseline"), None)
    fused = next((r for r in runs if r["config"] == "baseline_fused"), None)
    floor = next((r for r in runs if r["config"] == "floor"), None)
    gib = lambda b: b / 2**30  # noqa: E731

    def targets(r) -> str:
        if r["config"] != "tip":
            return ""
        marks = []

        def check(text, ref, ok):
            marks.append(f"{text}: " + ("n/a" if ref is None else ("met" if ok() else "MISSED")))

        if abs(r["ratio"] - 1.0) < 1e-9:
            check("delta <= verl fused", fused, lambda: r["peak_bytes"] <= fused["peak_bytes"])
        if abs(r["ratio"] - 0.2) < 1e-9:
            check("delta <= 0.25 x verl default", base, lambda: r["peak_bytes"] <= 0.25 * base["peak_bytes"])
        if r["ratio"] <= 0.2 + 1e-9:
            check("process peak <= 1.1 x floor", floor,
                  lambda: r["process_peak_bytes"] <= 1.1 * floor["process_peak_bytes"])
        return "; ".join(marks)

    def ratio_to(r, ref, key):
        return None if ref is None else r[key] / ref[key]

    def fmt(x, digits=3):
        return "n/a" if x is None else f"{x:.{digits}f}"

    setup = (f"{args.device}, {args.dtype}, Qwen2 hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}"
             f"{', tied' if args.tied else ''}, {args.batch} x ({args.prompt_len} prompt + {args.response_len} response)"
             f" tokens in one micro-batch, remove-padding {'off' if args.no_remove_padding else 'on'}, gradient "
             f"checkpointing {'off' if args.no_gradient_checkpointing else 'on'}, attn {args.attn}"
             f"{f', {args.threads} torch thread(s)' if args.threads else ''}")
    lines = [
        "| config | keep ratio | kept tokens | step-delta peak (GiB) | / verl default | / verl fused | "
        "process peak (GiB) | / floor | step wall (s) | / default | / fused | step CPU (s) | / default | / fused | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = ["baseline", "baseline_fused"]
    ratios = sorted({r["ratio"] for r in runs if r["config"].startswith("tip")}, reverse=True)
    rows = [ref for ref in (base, fused) if ref is not None]
    rows += [by[(c, ratio)] for ratio in ratios for c in ("tip_gather", "tip", "tip_fused") if (c, ratio) in by]
    rows += [floor] if floor is not None else []
    planned = [("verl default", base is not None), ("verl use_fused_kernels", fused is not None)]
    for ratio in [float(x) for x in str(args.ratios).split(",") if x.strip()]:
        planned += [(f"{COMPARE_LABELS[c]} at {ratio:g}", (c, ratio) in by) for c in ("tip_gather", "tip", "tip_fused")]
    planned.append(("floor", floor is not None))
    missing = [name for name, done in planned if not done]
    csv_rows = []
    for r in rows:
        ratio = "any" if r["config"].startswith("baseline") else f"{r['ratio']:.2f}"
        # verl's own paths project every token onto the vocabulary; only their loss is masked
        kept = f"all ({r['kept_tokens']} in the loss)" if r["config"].startswith("baseline") else r["kept_tokens"]
        if r["config"] == "floor":
            ratio = f"1/{args.response_len}"
        vals = {
            "delta": gib(r["peak_bytes"]), "delta_default": ratio_to(r, base, "peak_bytes"),
            "delta_fused": ratio_to(r, fused, "peak_bytes"), "proc": gib(r["process_peak_bytes"]),
            "proc_floor": ratio_to(r, floor, "process_peak_bytes"), "wall": r["seconds"],
            "wall_default": ratio_to(r, base, "seconds"), "wall_fused": ratio_to(r, fused, "seconds"),
            "cpu": r["cpu_seconds"], "cpu_default": ratio_to(r, base, "cpu_seconds"),
            "cpu_fused": ratio_to(r, fused, "cpu_seconds"),
        }
        lines.append(
            f"| {COMPARE_LABELS[r['config']]} | {ratio} | {kept} | {vals['delta']:.3f} | "
            f"{fmt(vals['delta_default'])} | {fmt(vals['delta_fused'])} | {vals['proc']:.3f} | {fmt(vals['proc_floor'])} | "
            f"{vals['wall']:.2f} | {fmt(vals['wall_default'])} | {fmt(vals['wall_fused'])} | {vals['cpu']:.2f} | "
            f"{fmt(vals['cpu_default'])} | {fmt(vals['cpu_fused'])} | {targets(r)} |")
        csv_rows.append({"config": r["config"], "keep_ratio": r["ratio"], "kept_tokens": r["kept_tokens"], **vals,
                         "targets": targets(r), "engine": r["engine"]})
    notes = [
        "", "Step-delta peak: " + (
            "peak RSS during `update_actor` minus RSS right before it (VmHWM reset via /proc/self/clear_refs, "
            "1 ms sampler cross-check); process peak: that peak RSS itself (parameters, gradients, Adam state, "
            "runtime)." if args.device == "cpu" else
            "`torch.cuda.max_memory_allocated()` during `update_actor` minus the allocation before it; process peak: "
            "the allocation peak itself."),
        *([f"Partial run: not measured: {', '.join(missing)}."] if missing else []),
        "Floor: the default tip_verl path with one kept token per sequence, measured in the same run. "
        "Step time: fastest of the timed steps (run without the memory probes), wall clock and process CPU time.",
        "",
    ]
    (out / "bench_memory_compare.md").write_text(f"{setup}\n\n" + "\n".join(lines + notes))
    with open(out / "bench_memory_compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        w.writeheader()
        w.writerows(csv_rows)

    def draw(axes):
        colors = {"tip_gather": "#9ecae1", "tip": "#1f77b4", "tip_fused": "#08306b"}
        width = 0.27
        for ax, key, title, refs in (
            (axes[0], "peak_bytes", "step-delta peak (GiB)", (("verl default", base, "#888888", "--"),
                                                              ("verl fused", fused, "#d62728", "--"))),
            (axes[1], "process_peak_bytes", "whole-process peak (GiB)", (("verl default", base, "#888888", "--"),
                                                                         ("verl fused", fused, "#d62728", "--"),
                                                                         ("floor", floor, "#2ca02c", ":"))),
        ):
            for j, c in enumerate(("tip_gather", "tip", "tip_fused")):
                xs = [i + (j - 1) * width for i, ratio in enumerate(ratios) if (c, ratio) in by]
                ys = [gib(by[(c, ratio)][key]) for ratio in ratios if (c, ratio) in by]
                if not xs:  # not measured: no bars, no legend entry (an empty bar set has no colour)
                    continue
                bars = ax.bar(xs, ys, width, color=colors[c], label=COMPARE_LABELS[c])
                for b, y in zip(bars, ys):
                    ax.text(b.get_x() + b.get_width() / 2, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
            for name, rec, color, style in refs:
                if rec is None:
                    continue
                ax.axhline(gib(rec[key]), color=color, ls=style, lw=1, label=f"{name} {gib(rec[key]):.2f}")
            ax.set_xticks(range(len(ratios)), [f"rho={r:g}" for r in ratios])
            ax.set_title(title)
            ax.legend(fontsize=7)

    save_plot(out / "bench_memory_compare.png", setup, draw, ncols=2, figsize=(14, 4.5))


def _check_user_args(args, out: Path) -> None:
    """--out writable, --from-raw / --resume readable JSON, --ratios in (0, 1]: else one line and exit 2."""
    def fail(message: str):
        print(f"bench_memory.py: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        fail(f"--out {str(out)!r} is not a writable folder: {exc.strerror or exc}")
    for flag in ("from_raw", "resume"):
        path = getattr(args, flag)
        if path:
            try:
                json.loads(Path(path).read_text())
            except (OSError, ValueError) as exc:
                fail(f"--{flag.replace('_', '-')} {path!r}: {getattr(exc, 'strerror', None) or exc}")
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        fail(f"--ratios must be comma-separated numbers in (0, 1], got {args.ratios!r}")
    if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
        fail(f"--ratios must be comma-separated numbers in (0, 1], got {args.ratios!r}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        rec = run_worker(args)
        Path(args.result).write_text(json.dumps(rec))
        return 0

    out = Path(args.out)
    _check_user_args(args, out)  # a user error ends with one line and exit 2, before anything runs
    if args.teacher_topk is not None:
        if args.device != "cpu":
            raise SystemExit("--teacher-topk measures host memory; run it with --device cpu")
        with tempfile.TemporaryDirectory(prefix="tip_bench_") as tmp:
            work = Path(tmp)
            model_dir = build_model(work / "model", args)
            recs = [run_config(args, "teacher", int(k), model_dir, work) for k in args.teacher_topk.split(",")]
        teacher_report(args, recs, out)
        print((out / "bench_teacher_pass.md").read_text())
        return 0
    if args.compare or (args.from_raw and "compare" in json.loads(Path(args.from_raw).read_text())):
        return compare_main(args, out)
    if args.from_raw:  # rebuild the reports of an earlier run
        raw = json.loads(Path(args.from_raw).read_text())
        for key in ("device", "dtype", "hidden", "layers", "vocab", "tied", "prompt_len", "response_len", "batch",
                    "no_remove_padding", "no_gradient_checkpointing", "attn", "threads"):
            setattr(args, key, raw["args"].get(key))
        if "no_gradient_checkpointing" not in raw["args"]:  # raw files written before the flag was inverted
            args.no_gradient_checkpointing = not raw["args"].get("gradient_checkpointing", False)
        baselines = {float(k): v for k, v in raw["baseline"].items()}
        tips = {float(k): v for k, v in raw["tip"].items()}
    else:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
        baseline_ratio = args.baseline_ratio if args.baseline_ratio is not None else min(ratios)
        with tempfile.TemporaryDirectory(prefix="tip_bench_") as tmp:
            work = Path(tmp)
            t0 = time.time()
            model_dir = build_model(work / "model", args)
            print(f"model built in {time.time() - t0:.0f} s: {model_dir}", flush=True)
            baselines = {}
            for r in (ratios if args.baseline_per_ratio else [baseline_ratio]):
                baselines[r] = run_config(args, "baseline", r, model_dir, work)
            tips = {r: run_config(args, "tip", r, model_dir, work) for r in ratios}
        raw = {"args": vars(args), "baseline": {str(k): v for k, v in baselines.items()},
               "tip": {str(k): v for k, v in tips.items()}}
        (out / "bench_memory_raw.json").write_text(json.dumps(raw, indent=1))

    def row(config, ratio, rec, base):
        return {
            "config": config, "keep_ratio": ratio, "kept_tokens": rec["kept_tokens"],
            "peak_mem_gib": rec["peak_bytes"] / 2**30, "peak_mem_ratio": rec["peak_bytes"] / base["peak_bytes"],
            "target_mem_ratio": None if config == "baseline" else ratio + 0.1,
            "step_s": rec["seconds"], "step_time_ratio": rec["seconds"] / base["seconds"],
            "step_cpu_s": rec["cpu_seconds"], "step_cpu_time_ratio": rec["cpu_seconds"] / base["cpu_seconds"],
            "baseline_peak_mem_gib": base["peak_bytes"] / 2**30, "baseline_step_s": base["seconds"],
            "engine": rec["engine"],
        }

    rows = []
    for r, rec in baselines.items():
        rows.append(row("baseline", r, rec, rec))
    for r, rec in tips.items():
        base = baselines.get(r, baselines[next(iter(baselines))])
        rows.append(row("tip_verl", r, rec, base))
    write_reports(args, rows, out)
    print((out / "bench_memory.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

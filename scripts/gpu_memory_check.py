#!/usr/bin/env python
"""GPU memory of one forward+backward: full logits + masked loss vs the kept-row lm_head (issue 12).

Needs only torch + transformers (no verl, no vLLM; the kept-row path is the project's pure-torch
``tip_verl.kept_logprobs``). Builds a Qwen2.5-1.5B-sized Qwen2 from a config (random weights, bf16,
gradient checkpointing on as in verl's default) and runs one forward+backward of
8 x (1024 prompt + 7168 response) tokens with a keep-mask at each ratio rho:

* ``full``: the lm_head over every token (bf16 logits), float32 log-softmax, gather, loss masked to
  the kept response tokens (what a stock trainer does: masking the loss saves nothing at peak);
* ``kept_rows``: the decoder's hidden states gathered at the kept positions, then
  ``kept_logprobs`` (lm_head + log-softmax chunk by chunk, chunked backward).

For each it records ``torch.cuda.max_memory_allocated`` (peak) and the peak minus the memory
allocated right before the step (step delta), with the time of the step. A second part checks, in
float32 at a small size, that the kept-row path gives the full path's loss and every gradient.

``--device cpu --tiny`` runs the same code at toy size in seconds (CI); on the CPU the memory figures
are the process's peak RSS (VmHWM, reset before each step) instead of the CUDA allocator's.

Writes ``gpu_memory_check.json`` (raw) and ``gpu_memory_check.md`` (table) into ``--out``.

Usage:
  python scripts/gpu_memory_check.py --out docs/bench/gpu                # one GPU, < 5 minutes
  python scripts/gpu_memory_check.py --device cpu --tiny --out /tmp/gmc   # CI smoke run
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tip_verl.kept_logprobs import kept_logprobs  # noqa: E402  (pure torch)

GIB = 2**30

#: Qwen2.5-1.5B (config.json of Qwen/Qwen2.5-1.5B-Instruct)
QWEN25_15B = dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32_768,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
#: exactness check (float32) model and batch
EXACT = dict(vocab_size=997, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


class UsageError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
def build_model(spec: dict, dtype: torch.dtype, device: torch.device, seed: int, checkpointing: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**spec, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_batch(n_seq: int, prompt: int, response: int, vocab: int, ratio: float, device, seed: int):
    """input_ids [B, T] and the keep-mask over *logit positions* [B, T] (predicting kept response tokens)."""
    g = torch.Generator().manual_seed(seed)
    total = prompt + response
    input_ids = torch.randint(0, vocab, (n_seq, total), generator=g)
    keep = torch.zeros(n_seq, total, dtype=torch.bool)
    n_keep = max(1, round(ratio * response))
    for i in range(n_seq):
        tokens = prompt + torch.randperm(response, generator=g)[:n_keep]  # kept response token indices
        keep[i, tokens - 1] = True  # token t is predicted at position t - 1
    return input_ids.to(device), keep.to(device)


def full_loss(model, input_ids, keep):
    """Stock path: logits for every token, float32 log-softmax, gather, mean over kept positions."""
    logits = model(input_ids=input_ids).logits  # [B, T, V]
    labels = torch.roll(input_ids, -1, dims=1)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return -(logp * keep).sum() / keep.sum()


def kept_rows_loss(model, input_ids, keep, chunk_rows=None):
    """Kept-row path: decoder, gather hidden states at kept positions, chunked lm_head + log-probs."""
    hidden = model.model(input_ids=input_ids).last_hidden_state  # [B, T, H]
    labels = torch.roll(input_ids, -1, dims=1)[keep]
    head = model.get_output_embeddings()
    logp, _ = kept_logprobs(hidden[keep], head.weight, labels, bias=head.bias, chunk_rows=chunk_rows)
    return -logp.mean()


# ---------------------------------------------------------------------------------------------
class MemoryProbe:
    """Peak memory of a region: CUDA allocator on GPUs, process peak RSS (VmHWM) on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM (peak RSS)"

    @staticmethod
    def _rss_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/self/status")

    def start(self) -> int:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        return self._rss_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self._rss_kib("VmHWM") * 1024


def measure(model, fn, input_ids, keep, probe: MemoryProbe) -> dict:
    model.zero_grad(set_to_none=True)
    before = probe.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        loss = fn(model, input_ids, keep)
        loss.backward()
        peak = probe.peak()
    except torch.cuda.OutOfMemoryError as exc:  # a result, not a crash: the stock path may not fit
        model.zero_grad(set_to_none=True)
        return {"oom": True, "error": str(exc).splitlines()[0]}
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    out = {"oom": False, "loss": float(loss.detach()), "before_bytes": before, "peak_bytes": peak,
           "step_delta_bytes": peak - before, "wall_s": wall, "cpu_s": cpu}
    del loss
    model.zero_grad(set_to_none=True)
    return out


def exactness(device: torch.device, seed: int, chunk_rows: int) -> dict:
    """float32: kept-row loss and every gradient vs the full path, several chunks with a ragged tail."""
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        model = build_model(EXACT, torch.float32, device, seed, checkpointing=False)
        input_ids, keep = make_batch(3, 40, 160, EXACT["vocab_size"], 0.5, device, seed + 1)
        results = {}
        for name, fn in (("full", full_loss), ("kept_rows", lambda m, i, k: kept_rows_loss(m, i, k, chunk_rows))):
            model.zero_grad(set_to_none=True)
            loss = fn(model, input_ids, keep)
            loss.backward()
            results[name] = (loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()})
        (loss_f, grads_f), (loss_k, grads_k) = results["full"], results["kept_rows"]
        rtol, atol = 1e-5, 1e-6
        worst = {"name": None, "max_abs_diff": 0.0}
        ok = bool(torch.allclose(loss_k, loss_f, rtol=rtol, atol=atol))
        for n, g in grads_f.items():
            diff = float((grads_k[n] - g).abs().max())
            if diff > worst["max_abs_diff"]:
                worst = {"name": n, "max_abs_diff": diff}
            ok &= bool(torch.allclose(grads_k[n], g, rtol=rtol, atol=atol * max(1.0, float(g.abs().max()))))
        kept = int(keep.sum())
        return {"passed": ok, "dtype": "float32", "rtol": rtol, "atol": atol, "kept_rows": kept,
                "chunk_rows": chunk_rows, "chunks": -(-kept // chunk_rows), "loss_full": float(loss_f),
                "loss_kept_rows": float(loss_k), "loss_abs_diff": float((loss_k - loss_f).abs()),
                "parameters_compared": len(grads_f), "worst_gradient": worst,
                "model": EXACT, "batch": {"sequences": 3, "prompt": 40, "response": 160, "ratio": 0.5}}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


# ---------------------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="toy model and batch (seconds; for CI)")
    ap.add_argument("--out", default="docs/bench/gpu", help="output directory (JSON + markdown)")
    ap.add_argument("--ratios", default="1,0.5,0.2", help="comma-separated keep ratios in (0, 1]")
    ap.add_argument("--sequences", type=int, default=None, help="sequences (default 8; tiny 2)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens per sequence (default 1024; tiny 16)")
    ap.add_argument("--response", type=int, default=None, help="response tokens (default 7168; tiny 112)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise SystemExit(2)
        raise
    try:
        args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--ratios must be comma-separated numbers, got {args.ratios!r}")
    if not args.ratios or any(not 0 < r <= 1 for r in args.ratios):
        raise UsageError(f"--ratios must be in (0, 1], got {args.ratios}")
    args.sequences = args.sequences if args.sequences is not None else (2 if args.tiny else 8)
    args.prompt = args.prompt if args.prompt is not None else (16 if args.tiny else 1024)
    args.response = args.response if args.response is not None else (112 if args.tiny else 7168)
    for name in ("sequences", "prompt", "response"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a torch device")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu --tiny for a smoke run)")
    if args.device.type not in ("cuda", "cpu"):
        raise UsageError(f"--device must be cuda or cpu, got {args.device}")
    args.out = Path(args.out)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {str(args.out)!r} is not writable: {exc.strerror or exc}")
    return args


def markdown(report: dict) -> str:
    env, spec, b = report["environment"], report["model"], report["batch"]
    lines = [
        "# One forward+backward: full logits + masked loss vs kept-row lm_head",
        "",
        f"{env['device_name']}, {report['dtype']}, Qwen2 hidden {spec['hidden_size']}, {spec['num_hidden_layers']} layers, "
        f"vocab {spec['vocab_size']}, {b['sequences']} x ({b['prompt']} + {b['response']}) tokens, gradient "
        f"checkpointing {'on' if report['gradient_checkpointing'] else 'off'}, memory: {report['memory_source']}; "
        f"{report['date']}, torch {env['torch']}, transformers {env['transformers']}",
        "",
        "| path | keep ratio | kept tokens | peak (GiB) | step delta (GiB) | peak / full | delta / full | step wall (s) | step CPU (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        full = next(r for r in report["rows"] if r["path"] == "full" and r["ratio"] == row["ratio"])
        if row["oom"]:
            lines.append(f"| {row['path']} | {row['ratio']:.2f} | {row['kept_tokens']} | OOM | OOM |  |  |  |  |")
            continue
        rel = lambda key: ("" if full["oom"] else f"{row[key] / full[key]:.3f}")  # noqa: E731
        lines.append(
            f"| {row['path']} | {row['ratio']:.2f} | {row['kept_tokens']} | {row['peak_bytes'] / GIB:.2f} | "
            f"{row['step_delta_bytes'] / GIB:.2f} | {rel('peak_bytes')} | {rel('step_delta_bytes')} | "
            f"{row['wall_s']:.2f} | {row['cpu_s']:.2f} |"
        )
    ex = report["exactness"]
    lines += [
        "",
        f"Exactness (float32, {ex['kept_rows']} kept rows in {ex['chunks']} chunks of {ex['chunk_rows']}, "
        f"{ex['parameters_compared']} parameter gradients): {'PASSED' if ex['passed'] else 'FAILED'}; "
        f"|loss diff| {ex['loss_abs_diff']:.2e}, worst gradient |diff| {ex['worst_gradient']['max_abs_diff']:.2e} "
        f"({ex['worst_gradient']['name']}), rtol {ex['rtol']}, atol {ex['atol']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"gpu_memory_check.py: error: {exc}", file=sys.stderr)
        return 2
    import transformers

    device, dtype = args.device, getattr(torch, args.dtype)
    spec = TINY if args.tiny else QWEN25_15B
    t0 = time.perf_counter()
    probe = MemoryProbe(device)
    model = build_model(spec, dtype, device, args.seed, checkpointing=not args.no_gradient_checkpointing)
    rows = []
    for ratio in args.ratios:
        input_ids, keep = make_batch(args.sequences, args.prompt, args.response, spec["vocab_size"], ratio,
                                     device, args.seed + 1)
        for path, fn in (("full", full_loss), ("kept_rows", kept_rows_loss)):
            r = measure(model, fn, input_ids, keep, probe)
            rows.append({"path": path, "ratio": ratio, "kept_tokens": int(keep.sum()), **r})
            print(f"[gpu_memory_check] {path:9s} ratio {ratio:.2f}: "
                  + ("OOM" if r["oom"] else f"peak {r['peak_bytes'] / GIB:.3f} GiB, delta "
                     f"{r['step_delta_bytes'] / GIB:.3f} GiB, {r['wall_s']:.2f} s"), flush=True)
        del input_ids, keep
    del model
    gc.collect()
    ex = exactness(device, args.seed, chunk_rows=64)
    print(f"[gpu_memory_check] exactness (float32): {'passed' if ex['passed'] else 'FAILED'} "
          f"(worst gradient |diff| {ex['worst_gradient']['max_abs_diff']:.2e})", flush=True)
    report = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "tiny": args.tiny, "dtype": args.dtype, "gradient_checkpointing": not args.no_gradient_checkpointing,
        "memory_source": probe.source, "model": spec,
        "batch": {"sequences": args.sequences, "prompt": args.prompt, "response": args.response},
        "environment": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
            "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "cpu_count": os.cpu_count(),
        },
        "rows": rows, "exactness": ex, "total_wall_s": time.perf_counter() - t0,
    }
    (args.out / "gpu_memory_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "gpu_memory_check.md").write_text(markdown(report))
    print(f"[gpu_memory_check] wrote {args.out / 'gpu_memory_check.json'} and gpu_memory_check.md "
          f"({report['total_wall_s']:.1f} s)")
    return 0 if ex["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

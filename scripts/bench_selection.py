#!/usr/bin/env python
"""Benchmark TIP scoring + selection on a 256 x 8192 batch with ragged response masks (CPU).

Prints the median milliseconds per call (wall clock and process CPU time, after warm-up) for:
  soft_or top-k (sequence scope), entropy top-k (sequence scope), entropy_sample poisson,
  and the full select_for_batch pipeline with soft_or.
Target: soft_or top-k < 100 ms on 2 CPU cores.

Usage: python scripts/bench_selection.py [--batch 256] [--seq 8192] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tip_verl import TIPConfig, sample_tokens, select_for_batch, select_tokens, token_scores  # noqa: E402


def make_batch(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 8, seq + 1, (batch,), generator=g)
    pos = torch.arange(seq).unsqueeze(0)
    mask = pos < lengths.unsqueeze(1)
    # multi-turn holes: a tool-output span in the middle of every other response
    hole_start = (lengths // 3).unsqueeze(1)
    hole = (pos >= hole_start) & (pos < hole_start + 64) & (torch.arange(batch) % 2 == 0).unsqueeze(1)
    mask &= ~hole
    vocab = 151_936
    entropy_nats = torch.rand(batch, seq, generator=g) ** 3 * 4.0
    student_lp = -torch.rand(batch, seq, generator=g) ** 2 * 3.0
    teacher_lp = student_lp - torch.randn(batch, seq, generator=g).abs()
    return {"mask": mask, "h": entropy_nats / torch.log(torch.tensor(float(vocab))),
            "entropy_nats": entropy_nats, "vocab": vocab, "lp_s": student_lp, "lp_t": teacher_lp,
            "delta": (student_lp - teacher_lp).abs()}


def timeit(fn, repeats: int) -> tuple[float, float]:
    """Median (wall ms, process-CPU ms) per call after two warm-up calls.

    CPU time is summed over torch's threads; with ``--threads 1`` it is the intrinsic cost of a
    call even when other processes compete for the cores (wall time is then inflated).
    """
    fn()
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall) * 1000.0, statistics.median(cpu) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d = make_batch(args.batch, args.seq)
    mask, h, delta, ratio = d["mask"], d["h"], d["delta"], args.ratio
    gen = torch.Generator().manual_seed(0)

    def soft_or_topk():
        s = token_scores("soft_or", entropy=h, divergence=delta, response_mask=mask)
        return select_tokens(s, mask, ratio, scope="sequence")

    def entropy_topk():
        s = token_scores("entropy", entropy=h, divergence=delta, response_mask=mask)
        return select_tokens(s, mask, ratio, scope="sequence")

    def entropy_poisson():
        return sample_tokens(h, mask, ratio, generator=gen, mode="poisson", scope="sequence")

    def entropy_wor():
        return sample_tokens(h, mask, ratio, generator=gen, mode="without_replacement", scope="sequence")

    cfg = TIPConfig(method="soft_or", ratio=ratio)

    def pipeline_soft_or():
        return select_for_batch(cfg, entropy_nats=d["entropy_nats"], vocab_size=d["vocab"],
                                student_logprobs=d["lp_s"], teacher_logprobs=d["lp_t"],
                                response_mask=mask, generator=gen)

    cases = [
        ("soft_or top-k (sequence)", soft_or_topk),
        ("entropy top-k (sequence)", entropy_topk),
        ("entropy_sample poisson (sequence)", entropy_poisson),
        ("entropy_sample without_replacement", entropy_wor),
        ("select_for_batch soft_or (+signals, taxonomy, metrics)", pipeline_soft_or),
    ]
    print(f"batch={args.batch} seq={args.seq} valid_tokens={int(mask.sum())} ratio={ratio} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} load_avg_1min={_load()}")
    width = max(len(name) for name, _ in cases)
    print(f"{'case':<{width}}  wall ms  cpu ms")
    print(f"{'-' * width}  -------  ------")
    for name, fn in cases:
        wall, cpu = timeit(fn, args.repeats)
        print(f"{name:<{width}}  {wall:7.1f}  {cpu:6.1f}")


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Speed of TIP token selection for every rule on a 256 x 8192 batch (CPU), JSON out.

Each rule runs the whole per-batch selection the trainer calls (``tip_verl.pipeline.select_for_batch``:
signals, scores, top-rho or sampling, taxonomy, metrics) on a batch with ragged response lengths and
multi-turn holes; plus the bare soft_or top-k kernel (``token_scores`` + ``select_tokens``, target
< 100 ms on 2 cores). Reported per case: median wall and process-CPU milliseconds per call after two
warm-up calls (CPU time summed over torch's threads: with ``--threads 1`` it is the cost of a call
even when other processes compete for the cores, which only inflates the wall time), and the number
of kept tokens. The 1-minute load average before and after is recorded: measure on an idle machine.

Usage:
  python scripts/bench_selection.py --threads 1 --out docs/bench/bench_selection.json
  python scripts/bench_selection.py --tiny --out /tmp/sel.json          # seconds, for CI
  python scripts/bench_selection.py --from-raw docs/bench/bench_selection.json   # rebuild the .md table
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tip_verl import TIPConfig, select_for_batch, select_tokens, token_scores  # noqa: E402

VOCAB = 151_936

#: (case name, TIPConfig fields); ratio is filled from --ratio unless the rule fixes it
RULES = [
    ("all", dict(method="all")),
    ("entropy top-rho", dict(method="entropy")),
    ("entropy_sample without_replacement", dict(method="entropy_sample")),
    ("entropy_sample poisson + 1/pi weights", dict(method="entropy_sample", sampling_mode="poisson",
                                                   importance_weighting=True)),
    ("soft_or top-rho", dict(method="soft_or")),
    ("soft_or bottom-rho (invert)", dict(method="soft_or", invert=True)),
    ("soft_or top-rho, batch scope", dict(method="soft_or", selection_scope="batch")),
    ("q3", dict(method="q3")),
    ("divergence top-rho", dict(method="divergence")),
    ("random", dict(method="random")),
]


def make_batch(batch: int, seq: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, seq // 8), seq + 1, (batch,), generator=g)
    pos = torch.arange(seq).unsqueeze(0)
    mask = pos < lengths.unsqueeze(1)
    # multi-turn holes: a tool-output span in the middle of every other response
    hole_start = (lengths // 3).unsqueeze(1)
    hole = (pos >= hole_start) & (pos < hole_start + min(64, seq // 4)) & (torch.arange(batch) % 2 == 0).unsqueeze(1)
    mask &= ~hole
    entropy_nats = torch.rand(batch, seq, generator=g) ** 3 * 4.0
    student_lp = -torch.rand(batch, seq, generator=g) ** 2 * 3.0
    teacher_lp = student_lp - torch.randn(batch, seq, generator=g).abs()
    return {"mask": mask, "entropy_nats": entropy_nats, "lp_s": student_lp, "lp_t": teacher_lp}


def timeit(fn, repeats: int) -> tuple[list[float], list[float], object]:
    """Wall and process-CPU milliseconds of ``repeats`` calls after two warm-up calls."""
    fn()
    out = fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append((time.perf_counter() - w0) * 1000.0)
        cpu.append((time.process_time() - c0) * 1000.0)
    return wall, cpu, out


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run(batch: int, seq: int, ratio: float, repeats: int) -> dict:
    d = make_batch(batch, seq)
    mask = d["mask"]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, fields in RULES:
        cfg = TIPConfig(**fields) if fields["method"] == "all" else TIPConfig(ratio=ratio, **fields)

        def call(cfg=cfg):
            return select_for_batch(cfg, entropy_nats=d["entropy_nats"], vocab_size=VOCAB,
                                    student_logprobs=d["lp_s"], teacher_logprobs=d["lp_t"],
                                    response_mask=mask, generator=gen)

        wall, cpu, sel = timeit(call, repeats)
        rows.append({"case": name, "kind": "select_for_batch", "config": cfg.to_dict(),
                     "kept_tokens": int(sel.keep_mask.sum()), "wall_ms": wall, "cpu_ms": cpu,
                     "wall_ms_median": statistics.median(wall), "cpu_ms_median": statistics.median(cpu)})

    h = d["entropy_nats"] / torch.log(torch.tensor(float(VOCAB)))
    delta = (d["lp_s"] - d["lp_t"]).abs()

    def kernel():
        s = token_scores("soft_or", entropy=h, divergence=delta, response_mask=mask)
        return select_tokens(s, mask, ratio, scope="sequence")

    wall, cpu, keep = timeit(kernel, repeats)
    rows.append({"case": "soft_or top-rho kernel (token_scores + select_tokens)", "kind": "kernel",
                 "kept_tokens": int(keep.sum()), "wall_ms": wall, "cpu_ms": cpu, "target_ms": 100.0,
                 "wall_ms_median": statistics.median(wall), "cpu_ms_median": statistics.median(cpu)})
    return {"valid_tokens": int(mask.sum()), "rows": rows}


def markdown(report: dict) -> str:
    lines = [
        f"TIP selection, {report['batch']} x {report['seq']} ({report['valid_tokens']} response tokens), rho = "
        f"{report['ratio']}, {report['threads']} torch thread(s), {report['cpu']}, median of {report['repeats']} calls; "
        f"load average {report['load_avg_before']} -> {report['load_avg_after']}; {report['date']}",
        "",
        "| rule | kept tokens | wall ms | CPU ms |",
        "|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['case']} | {r['kept_tokens']} | {r['wall_ms_median']:.1f} | {r['cpu_ms_median']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None, help="sequences (default 256; tiny 4)")
    ap.add_argument("--seq", type=int, default=None, help="response length (default 8192; tiny 64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 5; tiny 1)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--tiny", action="store_true", help="4 x 64, one timed call (CI)")
    ap.add_argument("--out", default=None, help="JSON output path (a .md table is written next to it)")
    ap.add_argument("--from-raw", default=None, help="only rebuild the .md table next to this JSON of an earlier run")
    args = ap.parse_args(argv)
    if args.from_raw:
        raw = Path(args.from_raw)
        try:
            report = json.loads(raw.read_text())
            raw.with_suffix(".md").write_text(markdown(report))
        except (OSError, ValueError, KeyError) as exc:
            print(f"bench_selection.py: error: --from-raw {str(raw)!r}: {exc}", file=sys.stderr)
            return 2
        print(raw.with_suffix(".md").read_text())
        return 0
    batch = args.batch if args.batch is not None else (4 if args.tiny else 256)
    seq = args.seq if args.seq is not None else (64 if args.tiny else 8192)
    repeats = args.repeats if args.repeats is not None else (1 if args.tiny else 5)
    problems = [f"--{n} must be >= 1, got {v}" for n, v in (("batch", batch), ("seq", seq), ("repeats", repeats)) if v < 1]
    if not 0 < args.ratio <= 1:
        problems.append(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.threads < 0:
        problems.append(f"--threads must be >= 0, got {args.threads}")
    out = Path(args.out) if args.out else None
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a"):
                pass
        except OSError as exc:
            problems.append(f"--out {str(out)!r} is not writable: {exc.strerror or exc}")
    if problems:
        print(f"bench_selection.py: error: {problems[0]}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = _load()
    result = run(batch, seq, args.ratio, repeats)
    report = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "batch": batch, "seq": seq, "ratio": args.ratio, "repeats": repeats, "threads": torch.get_num_threads(),
        "tiny": args.tiny, "torch": torch.__version__, "cpu": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_avg_before": load_before, "load_avg_after": _load(), **result,
    }
    table = markdown(report)
    print(table)
    if out is not None:
        out.write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(table)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Read verl's console-logger metrics (``step:N - key:value - ...`` lines) back from a run log.

Used by the CPU example scripts for their one-line summary and by the end-to-end tests.

    python -m tip_verl.verl_adapter.console_metrics LOG --tag run_tiny_opd --status 0 --wall 95 --keys a b
"""

from __future__ import annotations

import argparse
import re
import sys

_STEP = re.compile(r"\bstep:(\d+) - (.*)$")
_NUMPY_SCALAR = re.compile(r"^np\.\w+\((.*)\)$")


def parse_console_metrics(text: str) -> dict[int, dict[str, float]]:
    """Numeric metrics per training step, from verl's console logger output."""
    steps: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        m = _STEP.search(line)
        if not m:
            continue
        metrics = {}
        for item in m.group(2).strip().split(" - "):
            key, _, value = item.partition(":")
            try:
                metrics[key.strip()] = float(_NUMPY_SCALAR.sub(r"\1", value.strip()))
            except ValueError:
                pass
        steps[int(m.group(1))] = metrics
    return steps


def summary_line(steps: dict[int, dict[str, float]], *, tag: str, status: int, wall_s: int, keys) -> str:
    last = steps[max(steps)] if steps else {}
    shown = " ".join(f"{k}={last[k]:.4g}" for k in keys if k in last)
    state = "OK" if status == 0 and steps else f"FAILED(exit={status})"
    return (f"[{tag}] {state}: {len(steps)} step(s) with metrics; last step {max(steps) if steps else '-'}: "
            f"{shown}; wall {wall_s}s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="One-line summary of a verl run log.")
    p.add_argument("log")
    p.add_argument("--tag", default="verl")
    p.add_argument("--status", type=int, default=0)
    p.add_argument("--wall", type=int, default=0)
    p.add_argument("--keys", nargs="*", default=[])
    a = p.parse_args(argv)
    with open(a.log, errors="replace") as f:
        steps = parse_console_metrics(f.read())
    print(summary_line(steps, tag=a.tag, status=a.status, wall_s=a.wall, keys=a.keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())

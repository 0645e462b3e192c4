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
# Ray's prefix of a worker's output line, e.g. "\x1b[36m(TaskRunnerV1 pid=123)\x1b[0m " (colour codes optional)
_RAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)?\(([^()]*pid=\d+)\)(?:\x1b\[[0-9;]*m)?\s?")
# the rest of a metrics line that Ray's log streaming cut in two: one fragment, then only " - key:value" items
_CONTINUATION = re.compile(r"^\S*( - [^\s:]+:\S+)*\s*$")


def _joined_lines(text: str) -> list[str]:
    """The lines of ``text``, a step line cut by Ray's log streaming (seen under load: ``... - global_seq`` then
    ``(TaskRunnerV1 pid=N) len/max:6016.0 - ...``) joined again with its continuation from the same process."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        prefix = _RAY_PREFIX.match(line)
        if prefix and _STEP.search(line):
            while i < len(lines):
                nxt = _RAY_PREFIX.match(lines[i])
                rest = lines[i][nxt.end():] if nxt else ""
                if not nxt or nxt.group(1) != prefix.group(1) or _STEP.search(rest) or not _CONTINUATION.match(rest):
                    break
                line += rest
                i += 1
        out.append(line)
    return out


def parse_console_metrics(text: str) -> dict[int, dict[str, float]]:
    """Numeric metrics per training step, from verl's console logger output."""
    steps: dict[int, dict[str, float]] = {}
    for line in _joined_lines(text):
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
    """Training steps (step 0, verl's validation before training, is not one) and the last step's ``keys``."""
    trained = sorted(s for s in steps if s > 0)
    last = steps[trained[-1]] if trained else {}
    shown = " ".join(f"{k}={last[k]:.4g}" for k in keys if k in last)
    state = "OK" if status == 0 and trained else f"FAILED(exit={status})"
    return (f"[{tag}] {state}: {len(trained)} step(s) with metrics; last step {trained[-1] if trained else '-'}: "
            f"{shown}; wall {wall_s}s")


_VAL_ACC = re.compile(r"^val-core/[^/]+/acc/mean@\d+$")


def validation_accuracy(metrics: dict[str, float]) -> tuple[str, float] | None:
    """(key, value) of verl's validation accuracy (``val-core/<data source>/acc/mean@N``) in one step's metrics."""
    hits = sorted((k, v) for k, v in metrics.items() if _VAL_ACC.match(k))
    return hits[0] if len(hits) == 1 else None


def learning_line(steps: dict[int, dict[str, float]], *, tag: str) -> str | None:
    """``accuracy 0.25 -> 0.41 (+0.17) in 30 steps, trained on 49% of response tokens, ...`` from a run
    validated before the first and after the last step; None when either validation is missing."""
    trained = sorted(s for s in steps if s > 0)
    if 0 not in steps or not trained:
        return None
    before, after = validation_accuracy(steps[0]), validation_accuracy(steps[trained[-1]])
    if before is None or after is None:
        return None
    key, b = before
    a = after[1]
    n = key.rsplit("@", 1)[1]
    line = f"[{tag}] accuracy {b:.2f} -> {a:.2f} ({a - b:+.2f}; verl validation, {n} samples per test prompt at T=1) in {len(trained)} steps"
    kept = sum(steps[s].get("tip/kept_count", 0.0) for s in trained)
    valid = sum(steps[s].get("tip/valid_count", 0.0) for s in trained)
    if valid:
        line += f", trained on {100 * kept / valid:.0f}% of response tokens ({kept:.0f} of {valid:.0f})"
    line += _memory_phrase([steps[s] for s in trained])
    return line


def largest(steps: list[dict[str, float]], key: str) -> float | None:
    """The largest value of ``key`` over ``steps`` (None when no step logged it)."""
    return max((m[key] for m in steps if key in m), default=None)


def _memory_phrase(trained: list[dict[str, float]]) -> str:
    """Update-step peak memory (largest over the steps) where the run reports it, else the process peak."""
    peak = largest(trained, "actor/perf/update_peak_memory_gb")
    increase = largest(trained, "actor/perf/update_memory_increase_gb")
    if peak is not None and increase is not None:
        return (f", update-step peak memory {peak:.2f} GiB, of which {increase:.2f} GiB allocated by the step "
                f"(actor/perf/update_peak_memory_gb, update_memory_increase_gb)")
    peak = largest(trained, "actor/perf/max_memory_allocated_gb")
    return f", actor process peak memory {peak:.2f} GiB (actor/perf/max_memory_allocated_gb)" if peak else ""


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
    learned = learning_line(steps, tag=a.tag)
    if learned:
        print(learned)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Toy study: OPD with TIP token selection on the tiny addition task, through verl's real trainer.

Every (method, seed) pair is one ``python -m verl.trainer.main_ppo`` job, launched through
``examples/cpu/tiny_main_ppo.sh opd`` (the CPU recipe: the teacher as verl's ref model, the paper's
reverse-KL loss at kept tokens) with Hydra overrides: the same student initialisation, the same seeds
and the same step budget for every method. verl's own validation measures the student's test accuracy
before training (``trainer.val_before_train=True``) and after the last step as the mean over
``--val-n`` samples per test prompt at temperature 1 (``val-core/tip_tiny_addition/acc/mean@N``).
Tokens trained on = the sum over steps of ``tip/kept_count`` (kept response tokens of the step's
batch; the recipe makes two passes over each batch, so every kept token enters two gradient steps).

Outputs (``--out``): ``results.csv``, ``results.md`` (one row per method: mean, 95% interval),
``toy_study.png`` (accuracy before and after training; tokens trained on), ``runs/*.json`` (raw
per-run results and per-step metrics: the data every table and plot is made from). Per-run logs stay
under ``--logs`` (default /tmp/toy_study/logs).

    .venv/bin/python scripts/toy_study.py --out docs/toy_study             # the full default study
    .venv/bin/python scripts/toy_study.py --methods all,soft_or_50 --seeds 0 --steps 2 --val-n 2
    .venv/bin/python scripts/toy_study.py --dry-run                         # commands + time estimate
    .venv/bin/python scripts/toy_study.py --from-raw docs/toy_study         # tables + plot from runs/*.json

Method names: ``all`` or ``<method>_<percent>`` (``entropy_20``, ``q3_20``, ``random_50``, ...) with
``_bottom`` before the percentage for the inverted control (``soft_or_bottom_50`` = ``+tip.invert=True``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "cpu" / "tiny_main_ppo.sh"
if str(REPO) not in sys.path:  # run as `python scripts/toy_study.py` without installing
    sys.path.insert(0, str(REPO))

from tip_verl.config import METHODS  # noqa: E402  (pure python, no verl import)
from tip_verl.verl_adapter.console_metrics import largest, parse_console_metrics, validation_accuracy  # noqa: E402

DEFAULT_METHODS = ("all", "entropy_50", "entropy_20", "entropy_sample_50", "soft_or_50", "soft_or_20", "q3_20",
                   "soft_or_bottom_50")
# Per-step metrics kept in the raw per-run JSON (the console lines hold ~100 keys per step).
KEEP_KEYS = re.compile(r"^(tip/|val-core/|actor/(pg_loss|tip_topk_reverse_kl_loss|grad_norm|entropy|lr)$|"
                       r"actor/perf/(max_memory_allocated|update_peak_memory|update_memory_increase)_gb$|critic/score/mean$|"
                       r"response_length/mean$|timing_s/(step|gen|update_actor|testing)$)")
ASSETS_LINE = re.compile(r"^\[run_tiny_opd\] assets: (.+)$", re.M)


# ---------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    name: str
    method: str
    ratio: float
    invert: bool = False

    @property
    def label(self) -> str:
        if self.method == "all":
            return "all"
        return f"{self.method}{' bottom' if self.invert else ''} {round(self.ratio * 100)}%"


def parse_method(name: str) -> MethodSpec:
    name = name.strip()
    if name == "all":
        return MethodSpec("all", "all", 1.0)
    m = re.fullmatch(r"(?P<method>[a-z0-9_]+?)(?P<bottom>_bottom)?_(?P<pct>\d{1,3})", name)
    if not m or m.group("method") not in METHODS or m.group("method") == "all":
        raise argparse.ArgumentTypeError(
            f"bad method {name!r}: use 'all' or <method>_<percent> / <method>_bottom_<percent> with <method> one "
            f"of {', '.join(x for x in METHODS if x != 'all')} (e.g. soft_or_20, soft_or_bottom_50)")
    pct = int(m.group("pct"))
    if not 0 < pct <= 100:
        raise argparse.ArgumentTypeError(f"bad method {name!r}: percentage must be in 1..100")
    return MethodSpec(name, m.group("method"), pct / 100.0, invert=bool(m.group("bottom")))


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated method names (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s); each sets "
                   "data.seed (data order), actor_rollout_ref.rollout.seed and +tip.seed")
    p.add_argument("--steps", type=int, default=60, help="training steps per run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="prompts per step (data.train_batch_size = ppo_mini_batch_size: the whole batch in each "
                        "of the recipe's passes; default: %(default)s)")
    p.add_argument("--rollout-n", type=int, default=4, help="responses per prompt (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4, help="actor learning rate (default: %(default)s)")
    p.add_argument("--val-n", type=int, default=4,
                   help="validation samples per test prompt at temperature 1 (default: %(default)s)")
    p.add_argument("--selection-scope", choices=["batch", "sequence"], default="sequence",
                   help="+tip.selection_scope (default: %(default)s: the top floor(rho*m) tokens of each response, "
                        "as in the paper)")
    p.add_argument("--out", default="/tmp/toy_study/out", help="results directory (default: %(default)s)")
    p.add_argument("--logs", default="/tmp/toy_study/logs", help="per-run logs (default: %(default)s)")
    p.add_argument("--python", default=None, help="interpreter for verl (default: this one)")
    p.add_argument("--threads", type=int, default=1, help="torch/OMP threads per process (default: %(default)s)")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs at the same time, each its own verl job and Ray instance (default: %(default)s; "
                        "2 on a 2-core machine: a run is mostly single-threaded Python and Ray overhead)")
    p.add_argument("--run-timeout", type=int, default=1800, help="seconds before a run counts as failed")
    p.add_argument("--resume", action="store_true",
                   help="reuse runs/*.json of finished runs with identical settings instead of rerunning them")
    p.add_argument("--keep-going", action="store_true", help="continue with the next run after a failed one")
    p.add_argument("--dry-run", action="store_true", help="print the plan, the commands and the time estimate only")
    p.add_argument("--extra", action="append", default=[], metavar="OVERRIDE",
                   help="extra Hydra override appended to every run (repeatable)")
    p.add_argument("--from-raw", metavar="DIR", default=None,
                   help="run nothing: rebuild results.csv/.md and the plot in DIR from DIR/runs/*.json")
    a = p.parse_args(argv)
    try:
        a.methods = [parse_method(x) for x in a.methods.split(",") if x.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if len({m.name for m in a.methods}) != len(a.methods):
        p.error("--methods lists a method twice")
    try:
        a.seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    if not a.methods or not a.seeds:
        p.error("need at least one method and one seed")
    for name in ("steps", "batch_size", "rollout_n", "val_n", "threads", "parallel"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    a.out, a.logs = Path(a.out).expanduser().resolve(), Path(a.logs).expanduser().resolve()
    if a.from_raw:
        a.out = Path(a.from_raw).expanduser().resolve()
        if not sorted((a.out / "runs").glob("*.json")):
            p.error(f"--from-raw {a.from_raw}: no runs/*.json there")
    if not a.dry_run:  # output folders checked before anything runs: one line, exit 2
        for flag, folder in (("--from-raw" if a.from_raw else "--out", a.out), ("--logs", None if a.from_raw else a.logs)):
            if folder is None:
                continue
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as e:
                p.error(f"{flag} {folder}: not a writable folder ({e.strerror or e})")
    a.python = a.python or sys.executable
    return a


def study_settings(a) -> dict:
    """Everything that must match for a finished run to be reused with --resume."""
    return {"steps": a.steps, "batch_size": a.batch_size, "rollout_n": a.rollout_n, "lr": a.lr, "val_n": a.val_n,
            "selection_scope": a.selection_scope, "threads": a.threads, "extra": list(a.extra)}


def run_overrides(a, spec: MethodSpec, seed: int) -> list[str]:
    threads = str(a.threads)
    o = [
        # method (the recipe sets tip.method / tip.ratio: no '+'; the other tip keys are new: '+')
        f"tip.method={spec.method}", f"tip.ratio={spec.ratio}", f"+tip.invert={spec.invert}",
        f"+tip.selection_scope={a.selection_scope}", f"+tip.seed={seed}",
        # seeds: data order (verl's sampler generator), vLLM-style rollout seed
        f"data.seed={seed}", f"actor_rollout_ref.rollout.seed={seed}",
        # budget: one on-policy update of the whole batch per step
        f"data.train_batch_size={a.batch_size}", f"actor_rollout_ref.actor.ppo_mini_batch_size={a.batch_size}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={a.batch_size * a.rollout_n}",
        f"actor_rollout_ref.rollout.n={a.rollout_n}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={a.batch_size * a.rollout_n}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={a.batch_size * a.rollout_n}",
        f"actor_rollout_ref.actor.optim.lr={a.lr}",
        f"trainer.total_training_steps={a.steps}", "trainer.total_epochs=1000",  # steps, not epochs, end the run
        # verl's validation before and after training: mean over val_n samples at temperature 1
        "trainer.val_before_train=True", f"trainer.test_freq={a.steps}",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=True", "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
        "actor_rollout_ref.rollout.val_kwargs.top_p=1.0", "actor_rollout_ref.rollout.val_kwargs.top_k=-1",
        f"actor_rollout_ref.rollout.val_kwargs.n={a.val_n}", "data.val_batch_size=128",
        f"trainer.experiment_name=toy_{spec.name}_seed{seed}",
        # one torch/OMP thread in every Ray worker, too (the machine may be shared)
        f"+ray_kwargs.ray_init.runtime_env.env_vars.OMP_NUM_THREADS='{threads}'",
        f"+ray_kwargs.ray_init.runtime_env.env_vars.MKL_NUM_THREADS='{threads}'",
    ]
    return o + list(a.extra)


def run_id(spec: MethodSpec, seed: int) -> str:
    return f"{spec.name}_seed{seed}"


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------
class RunFailed(RuntimeError):
    pass


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def extract(steps: dict[int, dict[str, float]], n_steps: int) -> dict:
    """Accuracy before/after, tokens trained on and summaries from verl's console metrics."""
    if 0 not in steps:
        raise RunFailed("no step-0 line (validation before training) in the log")
    missing = [s for s in range(1, n_steps + 1) if s not in steps]
    if missing:
        raise RunFailed(f"no metrics for training step(s) {missing[:5]}{'...' if len(missing) > 5 else ''}")
    before, after = validation_accuracy(steps[0]), validation_accuracy(steps[n_steps])
    if before is None or after is None:
        raise RunFailed(f"no single val-core/*/acc/mean@N metric before ({before}) or after ({after}) training")
    (key, before), (_, after) = before, after
    train = [steps[s] for s in range(1, n_steps + 1)]
    for s, m in enumerate(train, 1):
        if "tip/kept_count" not in m or "tip/valid_count" not in m:
            raise RunFailed(f"step {s} logged no tip/kept_count / tip/valid_count (not a tip_sync run?)")
    kept = sum(m["tip/kept_count"] for m in train)
    valid = sum(m["tip/valid_count"] for m in train)
    tail = train[-min(5, len(train)):]
    # the exact reverse KL (Eq. 1) with the teacher's full top-k; the sampled-token estimate otherwise
    kl_key = "tip/topk_reverse_kl_mean" if "tip/topk_reverse_kl_mean" in train[0] else "tip/reverse_kl_mean"
    return {
        "acc_before": before, "acc_after": after, "acc_key": key,
        "val_samples_per_prompt": int(key.rsplit("@", 1)[1]),
        "tokens_trained": kept, "tokens_generated": valid,
        "kept_fraction": kept / valid if valid else float("nan"),
        "min_step_kept_fraction": min(m["tip/kept_fraction"] for m in train),
        "reverse_kl_key": kl_key,
        "reverse_kl_first5": statistics.fmean(m[kl_key] for m in train[:5]),
        "reverse_kl_last5": statistics.fmean(m[kl_key] for m in tail),
        "train_score_last5": statistics.fmean(m.get("critic/score/mean", float("nan")) for m in tail),
        "train_time_s": sum(m.get("timing_s/step", 0.0) for m in train),
        "actor_peak_memory_gb": max(m.get("actor/perf/max_memory_allocated_gb", float("nan")) for m in train),
        # the largest over the steps of one optimizer step's peak (absent from runs before it was logged)
        "update_peak_memory_gb": _largest(train, "actor/perf/update_peak_memory_gb"),
        "update_memory_increase_gb": _largest(train, "actor/perf/update_memory_increase_gb"),
    }


def _largest(train: list[dict], key: str) -> float:
    value = largest(train, key)
    return float("nan") if value is None else value


def n_test_prompts(log_text: str) -> int | None:
    """Number of test prompts of the assets the run used (read from their manifest)."""
    m = ASSETS_LINE.search(log_text)
    try:
        return int(json.loads((Path(m.group(1).strip()) / "manifest.json").read_text())["config"]["task"]["n_test"])
    except (AttributeError, OSError, ValueError, KeyError, TypeError):
        return None


def source_info() -> dict:
    """Which tip_verl code ran: the tree next to this script, its git commit and whether it was modified."""
    info = {"repo": str(REPO), "commit": None, "modified": None}
    try:
        git = ["git", "-C", str(REPO)]
        info["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
        info["modified"] = sorted(line[3:] for line in subprocess.run(
            [*git, "status", "--porcelain", "--", "tip_verl", "examples"], capture_output=True, text=True,
            check=True).stdout.splitlines())
    except (OSError, subprocess.CalledProcessError):
        marker = REPO / ".source_commit"  # a `git archive` snapshot
        if marker.exists():
            info["commit"] = marker.read_text().strip()
    return info


def launch(a, spec: MethodSpec, seed: int) -> dict:
    rid = run_id(spec, seed)
    run_dir = a.logs / rid
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "run.log"
    overrides = run_overrides(a, spec, seed)
    env = dict(os.environ)
    env.pop("VERL_PLATFORM", None)  # the recipe sets the CPU environment itself
    # verl loads tip_verl (the verl.plugins entry point) from the tree next to this script, also in Ray's workers
    pythonpath = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    env.update(PYTHON=a.python, RUN_DIR=str(run_dir), OMP_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads), TIP_VERL_NO_SETUP="1", PYTHONPATH=pythonpath)
    cmd = ["bash", str(RECIPE), "opd", *overrides]
    t0 = time.time()
    with open(log, "w") as f:
        f.write("# " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=str(REPO), env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=a.run_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.time() - t0
    if rc != 0:
        raise RunFailed(f"exit status {rc} after {wall:.0f}s")
    return record_run(a, spec, seed, log, wall, overrides)


def record_run(a, spec: MethodSpec, seed: int, log: Path, wall: float, overrides: list[str]) -> dict:
    """The raw per-run record (runs/<run>.json) of a finished run, from its log."""
    rid = run_id(spec, seed)
    text = log.read_text(errors="replace")
    steps = parse_console_metrics(text)
    result = extract(steps, a.steps)
    result.update(
        n_test_prompts=n_test_prompts(text),
        run=rid, method=spec.name, label=spec.label, tip_method=spec.method, ratio=spec.ratio, invert=spec.invert,
        seed=seed, wall_s=wall, log=str(log), settings=study_settings(a), overrides=overrides, source=source_info(),
        steps={str(s): {k: v for k, v in m.items() if KEEP_KEYS.match(k)} for s, m in sorted(steps.items())},
    )
    return result


# ---------------------------------------------------------------------------------------------
# tables and plot
# ---------------------------------------------------------------------------------------------
def _mean_std(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def ci95(values, p_samples, n_samples: int) -> float:
    """Half-width of a 95% normal interval for the mean of ``values`` (one per seed) that counts both
    sources of noise: the spread between seeds (variance / k) and the binomial noise of the validation
    samples (p (1 - p) / N for each accuracy in ``p_samples``, pooled over the k seeds). With one seed
    only the binomial part is left. Conservative: the seed spread already holds some sampling noise."""
    k = len(values)
    if not k or not n_samples:
        return float("nan")
    between = statistics.variance(values) / k if k > 1 else 0.0
    binomial = sum(p * (1 - p) for p in p_samples) / (k * k * n_samples)
    return 1.96 * math.sqrt(between + binomial)


def summarize(a, results: list[dict]) -> list[dict]:
    rows = []
    for spec in a.methods:
        rs = [r for r in results if r["method"] == spec.name]
        if not rs:
            continue
        n_samples = (rs[0].get("n_test_prompts") or 0) * rs[0].get("val_samples_per_prompt", 0)
        before, after = [r["acc_before"] for r in rs], [r["acc_after"] for r in rs]
        deltas = [x - y for x, y in zip(after, before)]
        b, bs = _mean_std(before)
        af, afs = _mean_std(after)
        d, ds = _mean_std(deltas)
        tok, toks = _mean_std([r["tokens_trained"] for r in rs])
        kf, _ = _mean_std([r["kept_fraction"] for r in rs])
        kl0, _ = _mean_std([r.get("reverse_kl_first5", float("nan")) for r in rs])
        kl, kls = _mean_std([r["reverse_kl_last5"] for r in rs])
        mem, _ = _mean_std([r.get("actor_peak_memory_gb", float("nan")) for r in rs])
        measured = [r for r in rs if not math.isnan(r.get("update_memory_increase_gb", float("nan")))]
        upd, _ = _mean_std([r["update_peak_memory_gb"] for r in measured]) if measured else (float("nan"), 0)
        inc, _ = _mean_std([r["update_memory_increase_gb"] for r in measured]) if measured else (float("nan"), 0)
        w, _ = _mean_std([r["wall_s"] for r in rs])
        rows.append({
            "method": spec.name, "label": spec.label, "tip_method": spec.method, "ratio": spec.ratio,
            "invert": spec.invert, "seeds": " ".join(str(r["seed"]) for r in rs), "n_seeds": len(rs),
            "val_samples_per_seed": n_samples,
            "acc_before_mean": b, "acc_before_std": bs, "acc_before_ci95": ci95(before, before, n_samples),
            "acc_after_mean": af, "acc_after_std": afs, "acc_after_ci95": ci95(after, after, n_samples),
            "delta_mean": d, "delta_std": ds, "delta_ci95": ci95(deltas, before + after, n_samples),
            "delta_min": min(deltas),
            "tokens_trained_mean": tok, "tokens_trained_std": toks,
            "kept_fraction_mean": kf, "reverse_kl_first5_mean": kl0, "reverse_kl_last5_mean": kl,
            "reverse_kl_last5_std": kls, "actor_peak_memory_gb_mean": mem,
            "update_peak_memory_gb_mean": upd, "update_memory_increase_gb_mean": inc,
            "update_memory_seeds": " ".join(str(r["seed"]) for r in measured),
            "wall_s_mean": w, "wall_s_total": sum(r["wall_s"] for r in rs),
        })
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def markdown(a, rows: list[dict], total_wall: float) -> str:
    s = study_settings(a)
    head = (f"OPD with TIP on the tiny addition task (verl `main_ppo`, CPU): {s['steps']} steps x {s['batch_size']} "
            f"prompts x {s['rollout_n']} responses, lr {s['lr']:g}, +tip.selection_scope={s['selection_scope']}; "
            f"accuracy = verl validation mean@{s['val_n']} at temperature 1 on the test prompts, before training "
            f"and after the last step; mean over seeds ± the half-width of a 95% interval that counts the spread "
            f"between seeds and the binomial noise of the validation samples. Tokens = kept response tokens "
            f"summed over steps (Σ tip/kept_count). Reverse KL = the exact per-token reverse KL to the teacher "
            f"(mean over the batch's response tokens), first and last 5 steps. Update-step memory = the largest "
            f"over the steps of one optimizer step's peak RSS in the actor process (actor/perf/update_peak_memory_gb; "
            f"mostly the runtime, the models and their optimizer state) and, after the slash, the part the step "
            f"itself allocated (peak minus the RSS before it: activations, logits, gradients; "
            f"actor/perf/update_memory_increase_gb), mean over the seeds that logged it (seeds in brackets; '—' for "
            f"runs from before these metrics existed). Wall = one run incl. start-up and both validations.\n")
    lines = [head,
             "| method | ratio | seeds | acc before | acc after | Δ acc | worst seed Δ | tokens trained | kept % "
             "| rev-KL first → last 5 steps | update-step mem: peak / step's own (GiB) | wall / run (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def ci(key, fmt):
            return f"{format(r[f'{key}_mean'], fmt)} ± {format(r[f'{key}_ci95'], fmt.lstrip('+'))}"

        lines.append(
            f"| {r['label']} | {r['ratio']:.2f} | {r['seeds']} | {ci('acc_before', '.3f')} | {ci('acc_after', '.3f')} "
            f"| {ci('delta', '+.3f')} | {r['delta_min']:+.3f} | {r['tokens_trained_mean']:.0f} "
            f"| {100 * r['kept_fraction_mean']:.1f} | {r['reverse_kl_first5_mean']:.3f} → {r['reverse_kl_last5_mean']:.3f} "
            f"| {_update_memory_cell(r)} | {r['wall_s_mean']:.0f} |")
    lines.append("")
    lines.append(f"Sum of the wall times of these runs: {total_wall / 60:.1f} min.")
    return "\n".join(lines) + "\n"


# The paper's claims as paired comparisons (first rule's gain minus the second's, seed by seed), then the
# other rules against all tokens.
PAIRED = (("(a) entropy top-50% ≈ all tokens", "entropy_50", "all"),
          ("(b) Soft-OR ≥ entropy at 20%", "soft_or_20", "entropy_20"),
          ("(c) Q3 with few tokens near all tokens", "q3_20", "all"),
          ("(d) Soft-OR bottom 50% clearly worse", "soft_or_bottom_50", "soft_or_50"),
          ("Soft-OR 50% vs all tokens", "soft_or_50", "all"),
          ("Soft-OR 20% vs all tokens", "soft_or_20", "all"),
          ("entropy 20% vs all tokens", "entropy_20", "all"),
          ("entropy sampling 50% vs all tokens", "entropy_sample_50", "all"))
# two-sided 95% Student t quantiles by degrees of freedom (seeds - 1)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_rows(results: list[dict]) -> list[dict]:
    """Per-seed differences of validation gains between two rules run with the same seeds (same student,
    same validation samples before training, same step-1 rollouts), mean and t-interval over the seeds."""
    gain = {(r["method"], r["seed"]): r["acc_after"] - r["acc_before"] for r in results}
    rows = []
    for claim, first, second in PAIRED:
        seeds = sorted(s for (m, s) in gain if m == first and (second, s) in gain)
        if not seeds:
            continue
        diffs = [gain[first, s] - gain[second, s] for s in seeds]
        mean = statistics.fmean(diffs)
        half = (_T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
                if len(diffs) > 1 else float("nan"))
        rows.append({"claim": claim, "first": first, "second": second, "seeds": seeds, "diffs": diffs,
                     "mean": mean, "ci95": half,
                     "first_better_seeds": sum(d > 0 for d in diffs)})
    return rows


def paired_markdown(rows: list[dict]) -> str:
    lines = ["Paired comparisons (gain of the first rule minus gain of the second, seed by seed; mean ± the "
             "half-width of a 95% Student-t interval over the seeds):", "",
             "| comparison | first − second | mean ± 95% | per seed | first ahead on |", "|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{d:+.3f}" for d in r["diffs"])
        ci = "" if math.isnan(r["ci95"]) else f" ± {r['ci95']:.3f}"
        lines.append(f"| {r['claim']} | {r['first']} − {r['second']} | {r['mean']:+.3f}{ci} | {per_seed} "
                     f"(seeds {' '.join(map(str, r['seeds']))}) | {r['first_better_seeds']} of {len(r['diffs'])} |")
    return "\n".join(lines) + "\n"


def _update_memory_cell(row: dict) -> str:
    if not row.get("update_memory_seeds"):
        return "—"
    return (f"{row['update_peak_memory_gb_mean']:.3f} / {row['update_memory_increase_gb_mean']:.3f} "
            f"[{row['update_memory_seeds']}]")


def plot(rows: list[dict], results: list[dict], path: Path, title: str) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    x = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 1.0 * len(rows) + 2.5), 7.5), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    colors = ["tab:gray" if r["tip_method"] == "all" else ("tab:red" if r["invert"] else "tab:blue") for r in rows]
    ax1.bar(x, [r["acc_after_mean"] for r in rows], yerr=[r["acc_after_ci95"] for r in rows], capsize=4,
            color=colors, alpha=0.7, label="after training: mean, 95% interval")
    for xi, r in zip(x, rows):  # the seeds themselves, before (hollow) and after (filled)
        runs = [q for q in results if q["method"] == r["method"]]
        offs = [0.25 * (j - (len(runs) - 1) / 2) / max(1, len(runs) - 1) for j in range(len(runs))]
        ax1.scatter([xi + o for o in offs], [q["acc_after"] for q in runs], s=14, color="k", zorder=3,
                    label="after, per seed" if xi == 0 else None)
        ax1.scatter([xi + o for o in offs], [q["acc_before"] for q in runs], s=14, facecolors="none",
                    edgecolors="k", zorder=3, label="before, per seed" if xi == 0 else None)
        ax1.text(xi, r["acc_after_mean"] + r["acc_after_ci95"] + 0.003, f"{r['acc_after_mean']:.3f}",
                 ha="center", va="bottom", fontsize=7)
    before = statistics.fmean(r["acc_before_mean"] for r in rows)
    ax1.axhline(before, color="k", ls="--", lw=1, label=f"before training, mean ({before:.3f})")
    top = max(max(q["acc_after"], q["acc_before"]) for q in results)
    ax1.set_ylim(0, top * 1.35 + 1e-3)
    ax1.set_ylabel("test accuracy (mean@N, T=1)")
    ax1.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax1.legend(fontsize=7, loc="upper right", ncol=2)
    ax2.bar(x, [r["tokens_trained_mean"] for r in rows], yerr=[r["tokens_trained_std"] for r in rows], capsize=4,
            color=colors, alpha=0.6)
    ax2.set_ylabel("tokens trained on (Σ kept)")
    ax2.set_xticks(x)
    ax2.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(a, results: list[dict]) -> list[dict]:
    results = sorted(results, key=lambda r: (r["method"], r["seed"]))
    rows = summarize(a, results)
    if not rows:
        return rows
    write_csv(rows, a.out / "results.csv")
    md = markdown(a, rows, sum(r["wall_s"] for r in results))
    paired = paired_rows(results)
    if paired:
        md += "\n" + paired_markdown(paired)
    (a.out / "results.md").write_text(md)
    s = study_settings(a)
    plot(rows, results, a.out / "toy_study.png",
         f"tiny addition, OPD+TIP via verl main_ppo: {s['steps']} steps x {s['batch_size']}x{s['rollout_n']}, "
         f"lr {s['lr']:g}, scope={s['selection_scope']}, seeds={' '.join(map(str, a.seeds))}")
    return rows


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def estimate_run_s(a) -> float:
    """Rough wall time of one run on 2 idle cores (measured: start-up ~60 s, a 16x4 step ~3.1 s,
    validation ~2 s per 100 samples); refined with measured run times once runs finish."""
    startup = 60.0
    step = 1.5 + 0.025 * a.batch_size * a.rollout_n
    val = 2.0 + 0.018 * 128 * a.val_n
    return startup + a.steps * step + 2 * val


def _fmt(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def rebuild_from_raw(a) -> int:
    """Tables and plot from the committed per-run JSON (``--from-raw DIR``): no run, same outputs."""
    results = [json.loads(p.read_text()) for p in sorted((a.out / "runs").glob("*.json"))]
    settings = {json.dumps(r["settings"], sort_keys=True) for r in results}
    if len(settings) != 1:
        print(f"[toy_study] {a.out}/runs holds runs with different settings; not mixing them", file=sys.stderr)
        return 2
    for key, value in results[0]["settings"].items():
        setattr(a, key, value)
    names = list(dict.fromkeys(r["method"] for r in sorted(
        results, key=lambda r: (DEFAULT_METHODS.index(r["method"]) if r["method"] in DEFAULT_METHODS else 99))))
    a.methods = [parse_method(n) for n in names]
    a.seeds = sorted({r["seed"] for r in results})
    write_outputs(a, results)
    print((a.out / "results.md").read_text(), end="")
    print(f"[toy_study] rebuilt {a.out}/results.csv, results.md, toy_study.png from {len(results)} runs/*.json")
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.from_raw:
        return rebuild_from_raw(a)
    plan = [(spec, seed) for seed in a.seeds for spec in a.methods]  # seed-major: partial results stay balanced
    per_run = estimate_run_s(a)
    print(f"[toy_study] {len(plan)} runs: methods={','.join(m.name for m in a.methods)} seeds={a.seeds} "
          f"steps={a.steps} batch={a.batch_size}x{a.rollout_n} lr={a.lr:g} val_n={a.val_n} "
          f"scope={a.selection_scope}", flush=True)
    print(f"[toy_study] estimated total: {_fmt(per_run * len(plan) / a.parallel)} ({_fmt(per_run)} per run on 2 idle "
          f"cores, {a.parallel} at a time); "
          f"out={a.out} logs={a.logs}", flush=True)
    if a.dry_run:
        spec, seed = plan[0]
        print("[toy_study] first run: RUN_DIR=... PYTHON=... bash " + str(RECIPE.relative_to(REPO)) + " opd " +
              " ".join(run_overrides(a, spec, seed)))
        return 0
    (a.out / "runs").mkdir(parents=True, exist_ok=True)
    a.logs.mkdir(parents=True, exist_ok=True)
    results, measured, failures = [], [], []
    t_start = time.time()
    todo = []
    for i, (spec, seed) in enumerate(plan, 1):
        json_path = a.out / "runs" / f"{run_id(spec, seed)}.json"
        if a.resume and json_path.exists():
            old = json.loads(json_path.read_text())
            if old.get("settings") == study_settings(a):
                results.append(old)
                print(f"[toy_study] [{i}/{len(plan)}] {run_id(spec, seed)}: reused {json_path}", flush=True)
                continue
        todo.append((i, spec, seed))
    lock = threading.Lock()
    stop = threading.Event()

    def one(i, spec, seed):
        rid = run_id(spec, seed)
        if stop.is_set():
            return
        with lock:
            left = len(todo) - len(measured) - len(failures)
            est = statistics.fmean(measured) if measured else per_run
            print(f"[toy_study] [{i}/{len(plan)}] start  {rid} ({spec.label}, seed {seed}); "
                  f"ETA study end {_fmt(est * left / a.parallel)}; log {a.logs / rid / 'run.log'}", flush=True)
        t0 = time.time()
        try:
            r = launch(a, spec, seed)
        except RunFailed as e:
            log = a.logs / rid / "run.log"
            with lock:
                print(f"[toy_study] [{i}/{len(plan)}] FAILED {rid}: {e}\n[toy_study] log: {log}\n"
                      f"[toy_study] last lines of the log:\n{_tail(log)}", file=sys.stderr, flush=True)
                failures.append((rid, str(e), str(log)))
                if not a.keep_going:
                    stop.set()
            return
        with lock:
            measured.append(time.time() - t0)
            (a.out / "runs" / f"{rid}.json").write_text(json.dumps(r, indent=1, sort_keys=True))
            results.append(r)
            left = len(todo) - len(measured) - len(failures)
            print(f"[toy_study] [{i}/{len(plan)}] done   {rid}: acc {r['acc_before']:.3f} -> {r['acc_after']:.3f}, "
                  f"tokens trained {r['tokens_trained']:.0f} ({100 * r['kept_fraction']:.1f}% kept), "
                  f"wall {r['wall_s']:.0f}s; ETA {_fmt(statistics.fmean(measured) * left / a.parallel)}", flush=True)
            write_outputs(a, results)  # partial tables after every run

    with concurrent.futures.ThreadPoolExecutor(max_workers=a.parallel) as pool:
        for future in [pool.submit(one, *job) for job in todo]:
            future.result()
    total = time.time() - t_start
    rows = write_outputs(a, results)
    if rows:
        print((a.out / "results.md").read_text(), flush=True)
        print(f"[toy_study] wrote {a.out}/results.csv, results.md, toy_study.png, runs/*.json; "
              f"total wall {_fmt(total)}", flush=True)
    if failures:
        for rid, why, log in failures:
            print(f"[toy_study] FAILED run {rid}: {why}; log: {log}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: build (or reuse) the tiny assets and print where they are and how good the models are.

    python -m tip_verl.assets --out DIR [--seed N] [--force]
    tip-verl-build-assets --out DIR

A file-system error (an unwritable or occupied ``--out``, a full disk) prints one
``tip-verl-build-assets: error: ...`` line to stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


PROG = "tip-verl-build-assets"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Build the tiny tokenizer, addition task, student and teacher used by tip_verl's tests and CPU demo.",
    )
    from . import DEFAULT_ASSETS_DIR

    p.add_argument("--out", default=None, help=f"output directory (default: $TIP_VERL_ASSETS or {DEFAULT_ASSETS_DIR})")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole build (default: 0)")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    p.add_argument("--quiet", action="store_true", help="no progress messages (stderr)")
    p.add_argument("--json", action="store_true", help="print the paths and accuracies as one JSON object")
    # Test hooks: shorter training (a different build key, so never mistaken for the real build).
    p.add_argument("--student-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--teacher-steps", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import _build_assets, resolve_out_dir

    args = _parser().parse_args(argv)
    try:
        paths = _build_assets(
            args.out,
            seed=args.seed,
            force=args.force,
            quiet=args.quiet,
            student_steps=args.student_steps,
            teacher_steps=args.teacher_steps,
        )
    except OSError as exc:  # includes FileExistsError for an --out that is not an asset build
        print(f"{PROG}: error: cannot build the assets in {resolve_out_dir(args.out)}: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads(paths.manifest.read_text())
    acc = manifest["accuracy"]
    if args.json:
        print(json.dumps({
            "paths": {k: str(v) for k, v in vars(paths).items()},
            "accuracy": acc,
            "build_seconds": manifest.get("build_seconds"),
        }, indent=2))
        return 0
    for name in ("root", "student", "teacher", "train_parquet", "test_parquet", "reward_fn", "manifest"):
        print(f"{name}: {getattr(paths, name)}")
    for role in ("teacher", "student"):
        a = acc[role]
        print(f"{role} accuracy: greedy {a['greedy']:.3f}, sampled(T=1) {a['sampled_t1']:.3f}")
    print(f"build seconds: {manifest.get('build_seconds')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

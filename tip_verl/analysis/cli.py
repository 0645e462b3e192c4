"""``tip-verl-report RECORDS_DIR``: the command line of :func:`tip_verl.analysis.report.make_report`."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .data import PROG, ReportError
from .report import make_report

__all__ = ["main"]

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="See the TIP taxonomy (Table 1, App. B.4) in the token records written during "
                    "training (tip_verl.records.TokenRecordWriter): writes 3 PNGs and prints tables.")
    p.add_argument("records_dir", help="directory with tokens_step*.parquet, thresholds.json, quadrant_shares.csv")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: RECORDS_DIR/report)")
    p.add_argument("--step", type=int, default=None, help="step for the plane and text view (default: last)")
    p.add_argument("--max-sequences", type=int, default=3, help="sequences in the text view (default: 3)")
    p.add_argument("--tokenizer", default=None,
                   help="Hugging Face tokenizer directory (AutoTokenizer) to decode tokens; token ids if absent")
    p.add_argument("--max-tokens", type=int, default=400, help="tokens shown per sequence (default: 400)")
    p.add_argument("--max-detail", type=int, default=8,
                   help="kept tokens tabulated per sequence, highest δ first (default: 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``tip-verl-report``); returns the exit code (0 ok, 2 user error)."""
    args = _parser().parse_args(argv)
    try:
        report = make_report(args.records_dir, args.out, step=args.step, max_sequences=args.max_sequences,
                             tokenizer=args.tokenizer, max_tokens=args.max_tokens, max_detail=args.max_detail,
                             progress=not args.no_progress)
    except ReportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(report.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

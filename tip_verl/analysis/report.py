"""``tip-verl-report``: see the TIP taxonomy (Section 4, Table 1; App. B.4) in a records directory.

Reads what :class:`tip_verl.analysis.records.TokenRecordWriter` wrote and makes three PNGs in ``--out``
(default ``<records_dir>/report``):

1. ``plane_step{S}.png``: the (h, δ) plane of step S as a 2-D histogram (log colour scale), the
   quadrant thresholds, the kept tokens overlaid, Q1..Q4 labelled with their shares;
2. ``quadrant_shares.png``: the quadrant shares over the recorded steps, all tokens vs kept tokens
   (exact, from ``quadrant_shares.csv``; estimated from the samples when that file is absent);
3. ``text_step{S}.png``: a few sampled responses of step S with the kept tokens highlighted by
   quadrant, and per kept token (highest δ first) its text, h, δ and, when recorded, the student's
   and teacher's top-1 choices; text decoded with ``--tokenizer`` (token ids without one).

It prints the same as tables on stdout. Errors (no records, unknown step, unloadable tokenizer,
unwritable ``--out``) print one ``tip-verl-report: error: ...`` line to stderr and exit with code 2;
an unreadable records file is skipped with a warning. A failed report leaves no ``--out`` folder behind.

Usage: ``tip-verl-report RECORDS_DIR [--out DIR] [--step S] [--max-sequences N] [--tokenizer PATH]``
(:mod:`tip_verl.analysis.cli`, or ``python -m tip_verl.analysis.cli ...``). Never imports verl.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .._checks import is_int
from .data import (PROG, QUADRANT_LABELS, ReportError, _aggregate, _finish_quadrant_table, _first_line,
                   _format_quadrant_table, _format_shares_table, _quadrant_table)
from .figures import _plane_png, _shares_png, _text_png
from .records import check_writable_dir, list_record_files, read_quadrant_shares, read_records, read_thresholds
from .text_view import _Decoder, _load_tokenizer, _pick_sequences, _text_view

__all__ = ["QUADRANT_LABELS", "Report", "ReportError", "make_report"]

@dataclass
class Report:
    """What :func:`make_report` produced."""

    out_dir: Path
    step: int
    plane_png: Path
    shares_png: Path
    text_png: Path
    text: str  #: the terminal tables (also printed by the CLI)
    shares_exact: bool  #: shares from quadrant_shares.csv (True) or estimated from the samples
    sequence_ids: list[str] = field(default_factory=list)  #: the sequences of the text view


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None if ``path`` exists)."""
    missing = None
    p = path.absolute()
    while not p.exists() and p != p.parent:
        missing, p = p, p.parent
    return missing


def make_report(records_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                step: int | None = None, max_sequences: int = 3, tokenizer: Any = None,
                max_tokens: int = 400, max_detail: int = 8, progress: bool = True) -> Report:
    """Write the three PNGs for ``records_dir`` into ``out_dir`` and return them with the tables.

    ``step``: the step of the plane and text view (default: the last recorded); ``tokenizer``: a
    path (loaded with ``transformers.AutoTokenizer``) or a tokenizer object, None = token ids;
    ``max_tokens``: tokens shown per sequence; ``max_detail``: kept tokens tabulated per sequence.
    Raises :class:`ReportError` for user errors (no records, unknown step, bad tokenizer).
    """
    for name, value, lo in (("max_sequences", max_sequences, 0), ("max_tokens", max_tokens, 1),
                            ("max_detail", max_detail, 0)):
        if not is_int(value) or value < lo:
            raise ReportError(f"{name} must be an integer >= {lo}, got {value!r}")
    records_dir = Path(records_dir)
    try:
        files = list_record_files(records_dir)
    except FileNotFoundError as exc:
        raise ReportError(str(exc)) from None
    if step is not None and step not in files:
        shown = ", ".join(map(str, list(files)[:10])) + (", ..." if len(files) > 10 else "")
        raise ReportError(f"no records for step {step} in {str(records_dir)!r}; recorded steps: {shown}")
    out = Path(out_dir) if out_dir is not None else records_dir / "report"
    try:
        check_writable_dir(out)
    except ValueError as exc:
        raise ReportError(f"output folder (--out): {exc}") from None
    decode = _Decoder(_load_tokenizer(tokenizer))

    try:
        thresholds = read_thresholds(records_dir)
    except (ValueError, OSError) as exc:
        print(f"{PROG}: warning: ignoring unreadable thresholds.json: {exc}", file=sys.stderr)
        thresholds = {}
    try:
        shares = read_quadrant_shares(records_dir)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        print(f"{PROG}: warning: ignoring unreadable quadrant_shares.csv: {exc}", file=sys.stderr)
        shares = None
    agg = _aggregate(files, progress)
    if not agg.readable:
        raise ReportError(f"no readable records file in {str(records_dir)!r} ({len(files)} skipped, see the "
                          "warnings above)")
    if step is None:
        step = max(agg.readable)
    elif step not in agg.readable:
        raise ReportError(f"the records file of step {step} cannot be read ({str(files[step])!r}, see the warning "
                          "above); choose another --step")
    exact = shares is not None
    if shares is None:
        shares = agg.step_shares
    try:
        df = read_records(records_dir, steps=[step])
    except (OSError, ValueError) as exc:  # readable for the aggregates, not in full
        raise ReportError(f"cannot read the records file of step {step} ({str(files[step])!r}): "
                          f"{_first_line(exc)}") from None
    decode.prefetch(df["token_id"].tolist())
    for col in ("student_top_id", "teacher_top_id"):
        decode.prefetch(df[col].dropna().astype(int).tolist())
    thr = thresholds.get(step)
    srow = shares[shares["step"] == step]
    shares_row = srow.iloc[-1] if exact and len(srow) else None
    seqs = _pick_sequences(df, max_sequences, max_tokens)

    plane_png = out / f"plane_step{step:06d}.png"
    shares_png = out / "quadrant_shares.png"
    text_png = out / f"text_step{step:06d}.png"
    created = _first_missing(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _plane_png(plane_png, df, step, thr, shares_row, exact)
        _shares_png(shares_png, shares, exact, step)
        _text_png(text_png, seqs, decode, step, max_detail)
    except BaseException as exc:
        if created is not None:  # leave no half-written report folder behind
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ReportError(f"cannot write the figures to {str(out)!r}: {exc}") from None
        raise

    how = "exact, all tokens of each recorded step" if exact else "estimated from the sampled records"
    thr_line = (f"thresholds at step {step}: h > {thr['entropy']:.4g}, δ > {thr['divergence']:.4g} "
                f"({thr.get('threshold_mode', '?')})" if thr else f"thresholds at step {step}: unknown")
    text = "\n".join([
        f"TIP taxonomy report for {records_dir}",
        f"{len(agg.readable)} records files, steps {min(agg.readable)}..{max(agg.readable)}; {agg.tokens} sampled "
        "tokens in all" + (f" ({len(files) - len(agg.readable)} unreadable file(s) skipped)"
                           if len(agg.readable) < len(files) else ""),
        "",
        f"Quadrant shares per step ({how}):",
        _format_shares_table(shares),
        "",
        f"Per quadrant at step {step} ({len(df)} sampled tokens; {thr_line}):",
        _format_quadrant_table(_quadrant_table(df)),
        "",
        f"Per quadrant over all recorded steps ({agg.tokens} sampled tokens):",
        _format_quadrant_table(_finish_quadrant_table(agg.quad)),
        "",
        f"Text view, step {step} ({len(seqs)} sequence(s); kept tokens in [brackets]"
        f"{'' if decode.has_text else '; token ids, no --tokenizer given'}):",
        _text_view(seqs, decode, step, max_detail),
        "Figures:",
        f"  {plane_png}",
        f"  {shares_png}",
        f"  {text_png}",
    ])
    return Report(out_dir=out, step=step, plane_png=plane_png, shares_png=shares_png, text_png=text_png,
                  text=text, shares_exact=exact, sequence_ids=[s.sequence_id for s in seqs])

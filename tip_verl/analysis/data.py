"""The report's data: per-step aggregates of the records files, quadrant tables and their text form."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .records import COLUMNS

PROG = "tip-verl-report"
QUADRANT_LABELS = {1: "Q1 high h / high δ", 2: "Q2 high h / low δ", 3: "Q3 low h / high δ", 4: "Q4 low h / low δ"}
_AGG_COLUMNS = ["step", "entropy", "divergence", "kept", "quadrant"]


class ReportError(Exception):
    """A user-facing error of the report (the CLI prints it and exits with code 2)."""


@dataclass
class _Aggregates:
    """Per-quadrant sums over the readable records files, and per-step sampled shares (one streaming pass)."""

    readable: dict[int, Path] = field(default_factory=dict)  # step -> file, unreadable ones left out
    tokens: int = 0
    quad: pd.DataFrame | None = None  # index 1..4: tokens, kept, sum_h, sum_d
    step_shares: pd.DataFrame | None = None  # sampled shares per step (fallback for the csv)


def _aggregate(files: dict[int, Path], progress: bool) -> _Aggregates:
    import pyarrow.parquet as pq

    quad = pd.DataFrame(0.0, index=pd.Index([1, 2, 3, 4], name="quadrant"),
                        columns=["tokens", "kept", "sum_h", "sum_d"])
    rows = []
    items: Any = files.items()
    if progress and len(files) > 3:
        from tqdm.auto import tqdm

        items = tqdm(items, total=len(files), desc="reading records", unit="file")
    total = 0
    readable = {}
    for step, path in items:
        try:
            missing = [c for c in COLUMNS if c not in pq.read_schema(path).names]
            if missing:
                raise ValueError(f"not a TIP records file, it lacks the columns {missing}")
            df = pq.read_table(path, columns=_AGG_COLUMNS).to_pandas()
        except (OSError, ValueError, KeyError) as exc:  # pyarrow: ArrowInvalid is a ValueError
            print(f"{PROG}: warning: skipping unreadable records file {str(path)!r}: {_first_line(exc)}",
                  file=sys.stderr)
            continue
        readable[step] = path
        total += len(df)
        part = _quad_sums(df)
        quad += part
        n, k = len(df), int(df["kept"].sum())
        row = {"step": step, "valid_count": n, "kept_count": k}
        for i in range(1, 5):
            row[f"q{i}_share"] = float(part.loc[i, "tokens"]) / n if n else 0.0
            row[f"q{i}_kept_share"] = float(part.loc[i, "kept"]) / k if k else 0.0
        rows.append(row)
    return _Aggregates(readable=readable, tokens=total, quad=quad, step_shares=pd.DataFrame(rows))


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (pyarrow's run on with a schema dump)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _quad_sums(df: pd.DataFrame) -> pd.DataFrame:
    """Per quadrant (index 1..4): tokens, kept, sum_h, sum_d (float64) of a records frame."""
    tmp = pd.DataFrame({"quadrant": df["quadrant"].to_numpy(np.int64), "tokens": 1.0,
                        "kept": df["kept"].to_numpy(np.float64), "sum_h": df["entropy"].to_numpy(np.float64),
                        "sum_d": df["divergence"].to_numpy(np.float64)})
    return tmp.groupby("quadrant").sum().reindex(pd.Index([1, 2, 3, 4], name="quadrant"), fill_value=0.0)


def _quadrant_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per-quadrant counts / shares / means of one records frame."""
    return _finish_quadrant_table(_quad_sums(df))


def _finish_quadrant_table(quad: pd.DataFrame) -> pd.DataFrame:
    n, k = quad["tokens"].sum(), quad["kept"].sum()
    out = pd.DataFrame(index=[QUADRANT_LABELS[i] for i in range(1, 5)])
    tok = quad["tokens"].to_numpy()
    out["tokens"] = tok.astype(np.int64)
    out["share"] = tok / n if n else 0.0
    out["kept"] = quad["kept"].to_numpy().astype(np.int64)
    out["share of kept"] = quad["kept"].to_numpy() / k if k else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        out["% kept"] = np.where(tok > 0, quad["kept"].to_numpy() / np.maximum(tok, 1), np.nan)
        out["mean h"] = np.where(tok > 0, quad["sum_h"].to_numpy() / np.maximum(tok, 1), np.nan)
        out["mean δ"] = np.where(tok > 0, quad["sum_d"].to_numpy() / np.maximum(tok, 1), np.nan)
    return out


def _pct(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100.0 * float(x):.1f}%"


def _num(x: float, digits: int = 3) -> str:
    return "—" if x is None or pd.isna(x) else f"{float(x):.{digits}f}"


def _format_quadrant_table(t: pd.DataFrame) -> str:
    shown = pd.DataFrame({
        "tokens": t["tokens"].map(str), "share": t["share"].map(_pct), "kept": t["kept"].map(str),
        "share of kept": t["share of kept"].map(_pct), "% kept": t["% kept"].map(_pct),
        "mean h": t["mean h"].map(_num), "mean δ": t["mean δ"].map(_num),
    }, index=t.index)
    return shown.to_string()


def _format_shares_table(shares: pd.DataFrame, max_rows: int = 50) -> str:
    shown = pd.DataFrame({"step": shares["step"].astype(int), "tokens": shares["valid_count"].astype(int),
                          "kept": shares["kept_count"].astype(int)})
    for i in range(1, 5):
        shown[f"Q{i} all"] = shares[f"q{i}_share"].map(_pct)
    for i in range(1, 5):
        shown[f"Q{i} kept"] = shares[f"q{i}_kept_share"].map(_pct)
    if len(shown) > max_rows:
        half = max_rows // 2
        head, tail = shown.iloc[:half].to_string(index=False), shown.iloc[-half:].to_string(index=False)
        tail_lines = tail.splitlines()[1:]  # drop the repeated header
        return "\n".join([head, f"  ... ({len(shown) - 2 * half} steps not shown) ...", *tail_lines])
    return shown.to_string(index=False)

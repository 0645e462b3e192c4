"""``tip-verl-report``: see the TIP taxonomy (Section 4, Table 1; App. B.4) in a records directory.

Reads what :class:`tip_verl.records.TokenRecordWriter` wrote and makes three PNGs in ``--out``
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
(or ``python -m tip_verl.report ...``). Never imports verl.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ._checks import is_int
from .records import (COLUMNS, check_writable_dir, list_record_files, read_quadrant_shares, read_records,
                      read_thresholds)

__all__ = ["QUADRANT_LABELS", "Report", "ReportError", "main", "make_report"]

PROG = "tip-verl-report"
QUADRANT_LABELS = {1: "Q1 high h / high δ", 2: "Q2 high h / low δ", 3: "Q3 low h / high δ", 4: "Q4 low h / low δ"}
QUADRANT_COLORS = {1: "#d62728", 2: "#ff7f0e", 3: "#9467bd", 4: "#2ca02c"}
QUADRANT_FILLS = {1: "#f6b6b6", 2: "#ffd3a6", 3: "#d9c8ec", 4: "#bfe6bf"}
_MONO = "DejaVu Sans Mono"  # bundled with matplotlib: the text view relies on its fixed advance
_SCATTER_MAX = 4000
_MARKERS = {1: "o", 2: "s", 3: "^", 4: "D"}
_LINESTYLES = {1: "-", 2: "--", 3: "-.", 4: ":"}
_AGG_COLUMNS = ["step", "entropy", "divergence", "kept", "quadrant"]


class ReportError(Exception):
    """A user-facing error of the report (the CLI prints it and exits with code 2)."""


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


# ============================================================================ data


def _load_tokenizer(tokenizer: Any):
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = Path(tokenizer)
    if not path.exists():
        raise ReportError(f"--tokenizer {str(path)!r} does not exist (expected a directory with a "
                          "Hugging Face tokenizer, e.g. the model checkpoint)")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - any loading failure is a user error here
        raise ReportError(f"cannot load a tokenizer from {str(path)!r}: {type(exc).__name__}: {exc}") from None


class _Decoder:
    """Token id -> display text (single-token decode, cached); the id itself without a tokenizer."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    @property
    def has_text(self) -> bool:
        return self.tokenizer is not None

    def prefetch(self, ids: Sequence[int]) -> None:
        missing = sorted({int(i) for i in ids} - set(self._cache))
        if not missing:
            return
        if self.tokenizer is None:
            self._cache.update({i: str(i) for i in missing})
            return
        texts = self.tokenizer.batch_decode([[i] for i in missing], skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)
        self._cache.update(zip(missing, texts))

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self._cache:
            self.prefetch([token_id])
        return self._cache[token_id]


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


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None if ``path`` exists)."""
    missing = None
    p = path.absolute()
    while not p.exists() and p != p.parent:
        missing, p = p, p.parent
    return missing


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


# ============================================================================ text view


def _cell_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def _visible(text: str) -> str:
    """A token's text on one line: newline/tab/control characters made visible, never empty."""
    out = []
    for c in text:
        if c == "\n":
            out.append("↵")
        elif c == "\t":
            out.append("⇥")
        elif c == "\r":
            out.append("␍")
        elif unicodedata.category(c) in ("Cc", "Cf"):
            out.append(f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out) or "∅"


@dataclass
class _Seq:
    sequence_id: str
    rows: pd.DataFrame  # this sequence's records, by position (truncated to max_tokens)
    total: int  # tokens recorded for it
    truncated: int  # tokens not shown


def _pick_sequences(df: pd.DataFrame, max_sequences: int, max_tokens: int) -> list[_Seq]:
    seqs = []
    for sid in pd.unique(df["sequence_id"])[:max_sequences]:
        rows = df[df["sequence_id"] == sid].sort_values("position")
        total = len(rows)
        seqs.append(_Seq(str(sid), rows.iloc[:max_tokens].reset_index(drop=True), total, max(0, total - max_tokens)))
    return seqs


def _top_text(decode: _Decoder, token_id: Any, prob: Any) -> str:
    if token_id is None or pd.isna(token_id):
        return "—"
    text = repr(_visible(decode(token_id))) if decode.has_text else str(int(token_id))
    return f"{text} {_pct(prob)}" if prob is not None and not pd.isna(prob) else text


def _detail_lines(seq: _Seq, decode: _Decoder, max_detail: int) -> list[tuple[str, int | None]]:
    """The per-token table of a sequence's kept tokens (highest δ first): (line, quadrant or None)."""
    kept = seq.rows[seq.rows["kept"]]
    if kept.empty or max_detail <= 0:
        return [("  (no kept token shown)" if kept.empty else "", None)]
    kept = kept.sort_values(["divergence", "position"], ascending=[False, True]).iloc[:max_detail]
    has_fwd = bool(seq.rows["forward_divergence"].notna().any())
    has_student = bool(seq.rows["student_top_id"].notna().any())
    has_teacher = bool(seq.rows["teacher_top_id"].notna().any())
    table = pd.DataFrame({
        "pos": kept["position"].astype(int).to_numpy(),
        "token": [repr(_visible(decode(t))) if decode.has_text else str(int(t)) for t in kept["token_id"]],
        "Q": [f"Q{int(q)}" for q in kept["quadrant"]],
        "h": [_num(v) for v in kept["entropy"]],
        "δ": [_num(v) for v in kept["divergence"]],
    })
    if has_fwd:
        table["fwd δ"] = [_num(v) for v in kept["forward_divergence"]]
    table["score"] = [_num(v) for v in kept["score"]]
    if has_student:
        table["student top"] = [_top_text(decode, i, p)
                                for i, p in zip(kept["student_top_id"], kept["student_top_prob"])]
    if has_teacher:
        table["teacher top"] = [_top_text(decode, i, p)
                                for i, p in zip(kept["teacher_top_id"], kept["teacher_top_prob"])]
    lines = table.to_string(index=False).splitlines()
    title = f"  kept tokens, highest δ first ({len(kept)} of {int(seq.rows['kept'].sum())} shown):"
    rows = [("  " + ln, int(q)) for ln, q in zip(lines[1:], kept["quadrant"])]
    return [(title, None), ("  " + lines[0], None)] + rows


def _seq_header(seq: _Seq, step: int) -> str:
    rows = seq.rows
    kept = rows[rows["kept"]]
    counts = kept["quadrant"].value_counts()
    mix = " · ".join(f"Q{i} {int(counts.get(i, 0))}" for i in range(1, 5))
    shown = f", first {len(rows)} shown" if seq.truncated else ""
    return (f"sequence {seq.sequence_id} (step {step}): {seq.total} tokens{shown}, "
            f"{int(rows['kept'].sum())} kept ({mix})")


def _plain_text(seq: _Seq, decode: _Decoder) -> str:
    """The response as plain text, kept tokens in [brackets]; ⟨…⟩ marks unrecorded positions."""
    parts = []
    prev = None
    for pos, tid, kept in zip(seq.rows["position"], seq.rows["token_id"], seq.rows["kept"]):
        if prev is not None and pos != prev + 1:
            parts.append(" ⟨…⟩ ")
        prev = pos
        if decode.has_text:
            text = decode(tid)
            if kept:
                parts.append("[" + _visible(text) + "]" + ("\n" if "\n" in text else ""))
            else:
                parts.append(text)
        else:
            parts.append((f"[{int(tid)}]" if kept else str(int(tid))) + " ")
    text = "".join(parts).rstrip(" ")
    return text + (f" … (+{seq.truncated} more tokens)" if seq.truncated else "")


def _text_view(seqs: list[_Seq], decode: _Decoder, step: int, max_detail: int) -> str:
    out = []
    for seq in seqs:
        out.append("── " + _seq_header(seq, step))
        out.append(_plain_text(seq, decode))
        out.extend(line for line, _ in _detail_lines(seq, decode, max_detail))
        out.append("")
    return "\n".join(out)


# ============================================================================ figures


def _new_figure(figsize, dpi=110):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi)


def _plane_png(path: Path, df: pd.DataFrame, step: int, thr: dict | None, shares_row: pd.Series | None,
               exact: bool) -> None:
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.ticker import FuncFormatter

    fig = _new_figure((8.0, 6.2))
    ax = fig.add_subplot()
    h = df["entropy"].to_numpy(np.float64)
    d = df["divergence"].to_numpy(np.float64)
    kept = df["kept"].to_numpy(bool)
    te = thr["entropy"] if thr else None
    td = thr["divergence"] if thr else None
    if len(h) == 0:
        ax.text(0.5, 0.5, f"no tokens recorded at step {step}", ha="center", va="center", transform=ax.transAxes)
        fig.savefig(path)
        return
    # x: the data range (h is in [0, 1]); y: clip a heavy δ tail so the bulk stays readable
    xlo, xhi = min(h.min(), te if te is not None else h.min()), max(h.max(), te if te is not None else h.max())
    ylo = min(d.min(), td if td is not None else d.min())
    q = float(np.quantile(d, 0.99))
    yhi = d.max() if d.max() <= 1.5 * max(q, 1e-12) else q * 1.2
    yhi = max(yhi, td * 1.15 if td is not None else yhi)
    xpad, ypad = max((xhi - xlo) * 0.03, 1e-3), max((yhi - ylo) * 0.03, 1e-3)
    xr, yr = (xlo - xpad, xhi + xpad), (ylo - ypad, yhi + ypad)
    bins = int(np.clip(1.5 * math.sqrt(len(h)), 12, 80))
    counts, xe, ye = np.histogram2d(h, d, bins=bins, range=[xr, yr])
    masked = np.ma.masked_equal(counts.T, 0)  # empty bins stay white
    cmap = ListedColormap(colormaps["Blues"](np.linspace(0.25, 1.0, 256)))  # a single token stays visible
    mesh = ax.pcolormesh(xe, ye, masked, cmap=cmap, norm=LogNorm(vmin=1, vmax=max(2.0, counts.max())))
    cbar = fig.colorbar(mesh, ax=ax, label="tokens per bin (log scale)")
    vmax = max(2.0, counts.max())
    cbar.set_ticks([v * 10 ** e for e in range(int(math.log10(vmax)) + 1) for v in (1, 2, 5) if v * 10 ** e <= vmax])
    cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    cbar.ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    idx = np.flatnonzero(kept)
    if idx.size > _SCATTER_MAX:
        idx = np.sort(np.random.default_rng(0).choice(idx, _SCATTER_MAX, replace=False))
    drawn = f", {idx.size} drawn" if idx.size < kept.sum() else ""
    ax.scatter(h[idx], d[idx], s=6, c="#e6550d", alpha=0.45, linewidths=0,
               label=f"kept tokens ({int(kept.sum())}{drawn})")
    clipped = int((d > yr[1]).sum())
    if te is not None and td is not None:
        ax.axvline(te, color="black", ls="--", lw=1.1)
        ax.axhline(td, color="black", ls="--", lw=1.1)
        # labels in the outer corners of the view (Q1 top right, Q2 bottom right, Q3 top left, Q4 bottom left)
        corners = {1: (0.985, 0.975, "right", "top"), 2: (0.985, 0.025, "right", "bottom"),
                   3: (0.015, 0.975, "left", "top"), 4: (0.015, 0.025, "left", "bottom")}
        if shares_row is None:  # from the sample
            n, k = len(df), max(int(kept.sum()), 1)
            qd = df["quadrant"].to_numpy()
            share = {i: (qd == i).sum() / n for i in range(1, 5)}
            kshare = {i: ((qd == i) & kept).sum() / k for i in range(1, 5)}
        else:
            share = {i: shares_row[f"q{i}_share"] for i in range(1, 5)}
            kshare = {i: shares_row[f"q{i}_kept_share"] for i in range(1, 5)}
        for i, (cx, cy, ha, va) in corners.items():
            ax.text(cx, cy, f"{QUADRANT_LABELS[i]}\nall {_pct(share[i])} · kept {_pct(kshare[i])}",
                    ha=ha, va=va, fontsize=8.5, color=QUADRANT_COLORS[i], fontweight="bold", zorder=5,
                    transform=ax.transAxes,
                    bbox=dict(boxstyle="round,pad=0.3", fc="white", ec=QUADRANT_COLORS[i], alpha=0.8))
        thr_text = f"thresholds: h > {te:.3g}, δ > {td:.3g} ({thr.get('threshold_mode', '?')})"
    else:
        thr_text = "thresholds unknown (no thresholds.json entry for this step)"
    ax.set_xlim(*xr)
    ax.set_ylim(*yr)
    ax.set_xlabel("student entropy h (normalised, Eq. 2)")
    ax.set_ylabel("teacher–student divergence δ (Eq. 3)")
    src = "shares: all tokens of the step" if exact and shares_row is not None else "shares: sampled tokens"
    above = f" ({clipped} with δ > {yr[1]:.3g} above the view)" if clipped else ""
    ax.set_title(f"TIP taxonomy plane, step {step}: {len(df)} sampled tokens{above}\n{thr_text}; {src}",
                 fontsize=10)
    ax.legend(loc="upper center", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path)


def _shares_png(path: Path, shares: pd.DataFrame, exact: bool, step: int) -> None:
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    fig = _new_figure((11.5, 4.4))
    axes = fig.subplots(1, 2, sharey=True)
    x = shares["step"].to_numpy()
    for ax, fam, title in ((axes[0], "share", "all tokens"), (axes[1], "kept_share", "kept tokens")):
        for i in range(1, 5):  # distinct line styles / markers: equal shares (e.g. Q1 = Q4) stay visible
            ax.plot(x, shares[f"q{i}_{fam}"].to_numpy(), marker=_MARKERS[i], ms=6 - i, lw=1.6,
                    ls=_LINESTYLES[i], color=QUADRANT_COLORS[i], label=QUADRANT_LABELS[i])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axvline(step, color="0.6", lw=0.8, ls=":")
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of tokens")
    axes[1].legend(fontsize=8, loc="best")
    how = "exact (all tokens of each recorded step)" if exact else "estimated from the sampled records"
    fig.suptitle(f"TIP quadrant shares over training — {how}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)


def _mono_advance_px(fontsize: float, dpi: int) -> float:
    """Rendered advance (pixels) of one character of the monospace font, measured on a long string."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _new_figure((4, 1), dpi=dpi)
    FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    n = 200
    widths = []
    for k in (n, 2 * n):
        t = fig.text(0, 0.5, "M" * k, family=_MONO, fontsize=fontsize, parse_math=False)
        widths.append(t.get_window_extent(renderer).width)
    return (widths[1] - widths[0]) / n


def _text_png(path: Path, seqs: list[_Seq], decode: _Decoder, step: int, max_detail: int, cols: int = 118) -> None:
    from matplotlib.patches import Rectangle

    details = [_detail_lines(seq, decode, max_detail) for seq in seqs]
    cols = max([cols] + [_cell_width(line) for d in details for line, _ in d])  # table rows never wrap
    # layout in character cells: lines of (col, text, quadrant-highlight or None, colour)
    lines: list[list[tuple[int, str, int | None, str, str]]] = []  # (col, text, quad, colour, weight)

    def newline():
        lines.append([])

    def put(text: str, quad: int | None = None, colour: str = "black", weight: str = "normal") -> None:
        if not lines:
            newline()
        while text:
            col = lines[-1][-1][0] + _cell_width(lines[-1][-1][1]) if lines[-1] else 0
            room = cols - col
            w = _cell_width(text)
            if w <= room:
                lines[-1].append((col, text, quad, colour, weight))
                return
            if col > 0 and w <= cols:
                newline()
                continue
            cut, acc = 0, 0  # split a piece longer than a whole line
            for c in text:
                if acc + _cell_width(c) > room:
                    break
                acc += _cell_width(c)
                cut += 1
            lines[-1].append((col, text[:cut], quad, colour, weight))
            text = text[cut:]
            newline()

    put("kept tokens are highlighted by quadrant:", colour="0.2")
    newline()
    for i in range(1, 5):
        put(f" {QUADRANT_LABELS[i]} ", quad=i)
        put("  ")
    put("grey = not kept", colour="0.45")
    newline()
    for seq, detail in zip(seqs, details):
        newline()
        put(_seq_header(seq, step), weight="bold")
        newline()
        prev = None
        for pos, tid, kept, quad in zip(seq.rows["position"], seq.rows["token_id"], seq.rows["kept"],
                                        seq.rows["quadrant"]):
            if prev is not None and pos != prev + 1:
                put(" ⟨…⟩ ", colour="0.45")
            prev = pos
            raw = decode(tid)
            text = _visible(raw) if decode.has_text else str(int(tid))
            put(text, quad=int(quad) if kept else None, colour="black" if kept else "0.45")
            if decode.has_text and "\n" in raw:
                newline()
            elif not decode.has_text:
                put(" ")
        if seq.truncated:
            put(f" … (+{seq.truncated} more tokens)", colour="0.45")
        newline()
        for line, quad in detail:
            put(line, colour="0.15")
            if quad is not None:  # colour the Q column of the row
                qcol = line.find(f"Q{quad}")
                col0 = lines[-1][-1][0]
                lines[-1].append((col0 + _cell_width(line[:qcol]), f"Q{quad}", quad, "black", "bold"))
            newline()
    fs, dpi = 9.0, 110
    cw = _mono_advance_px(fs, dpi) / dpi  # inches per cell, as rendered (Agg rounds glyph advances)
    lh = 1.55 * fs / 72.0  # inches per line
    n = len(lines)
    fig = _new_figure(((cols + 4) * cw, (n + 2) * lh), dpi=dpi)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(-2, cols + 2)
    ax.set_ylim(n + 1, -1)
    ax.axis("off")
    for row, items in enumerate(lines):
        for col, text, quad, colour, weight in items:
            if quad is not None:
                ax.add_patch(Rectangle((col, row - 0.48), _cell_width(text), 0.96, fc=QUADRANT_FILLS[quad],
                                       ec=QUADRANT_COLORS[quad], lw=0.4))
            ax.text(col, row, text, family=_MONO, fontsize=fs, va="center", ha="left", color=colour,
                    fontweight=weight, parse_math=False)
    fig.savefig(path)


# ============================================================================ entry points


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

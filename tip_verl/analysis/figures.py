"""The report's figures (matplotlib): the (h, δ) plane, the quadrant shares over steps, the text view."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .data import QUADRANT_LABELS, _pct
from .text_view import _cell_width, _Decoder, _detail_lines, _Seq, _seq_header, _visible

QUADRANT_COLORS = {1: "#d62728", 2: "#ff7f0e", 3: "#9467bd", 4: "#2ca02c"}
QUADRANT_FILLS = {1: "#f6b6b6", 2: "#ffd3a6", 3: "#d9c8ec", 4: "#bfe6bf"}
_MONO = "DejaVu Sans Mono"  # bundled with matplotlib: the text view relies on its fixed advance
_SCATTER_MAX = 4000
_MARKERS = {1: "o", 2: "s", 3: "^", 4: "D"}
_LINESTYLES = {1: "-", 2: "--", 3: "-.", 4: ":"}


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

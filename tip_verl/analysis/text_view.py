"""The report's text view: sampled responses with the kept tokens marked, decoded with a tokenizer."""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .data import ReportError, _num, _pct

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

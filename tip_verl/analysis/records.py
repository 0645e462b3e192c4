"""Per-token records of TIP selection, for looking at the taxonomy (Section 4, Table 1; App. B.4).

:class:`TokenRecordWriter` is called by the trainer on the driver once per step. Every
``every_n_steps`` steps it writes, into ``out_dir``:

* ``tokens_step{step:06d}.parquet``: a bounded sample of per-token records. Whole sequences are
  drawn at random (seeded by ``seed + step``) until ``max_rows_per_step`` would be exceeded, so the
  text view can show complete responses; masked positions (padding, tool tokens) are never written.
  Columns (:data:`COLUMNS`): ``step``, ``sequence_id``, ``position`` (column index in the response),
  ``token_id``, ``entropy`` (normalised h, Eq. 2), ``divergence`` (δ, Eq. 3),
  ``forward_divergence`` (null when the selection has none), ``score``, ``kept``, ``quadrant``
  (1..4, Table 1) and the optional top-1 columns :data:`TOP_COLUMNS` (null when not given).
* ``thresholds.json``: per step, the absolute entropy/divergence thresholds of the quadrant split
  and the config values (``TIPSelection.thresholds``, resolved by the pipeline on the whole batch).
* ``quadrant_shares.csv`` (one appended row per written step): the quadrant shares over ALL valid
  tokens of the batch (``TIPSelection.quadrant_stats``, not just the sample), plus the valid/kept
  token counts.

:func:`read_records`, :func:`read_thresholds` and :func:`read_quadrant_shares` read them back.
Pure torch/pandas/pyarrow: this module never imports verl.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .._checks import as_mask, check_int

__all__ = [
    "COLUMNS",
    "RECORDS_GLOB",
    "SHARES_FILE",
    "THRESHOLDS_FILE",
    "TOP_COLUMNS",
    "TokenRecordWriter",
    "check_writable_dir",
    "list_record_files",
    "read_quadrant_shares",
    "read_records",
    "read_thresholds",
    "record_path",
]

RECORDS_GLOB = "tokens_step*.parquet"
THRESHOLDS_FILE = "thresholds.json"
SHARES_FILE = "quadrant_shares.csv"
_RECORD_RE = re.compile(r"^tokens_step(\d+)\.parquet$")

#: Optional top-1 columns (``extra=`` of :meth:`TokenRecordWriter.maybe_write`); null when absent.
TOP_COLUMNS = ("student_top_id", "student_top_prob", "teacher_top_id", "teacher_top_prob")

SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("sequence_id", pa.string()),
    ("position", pa.int32()),
    ("token_id", pa.int64()),
    ("entropy", pa.float32()),
    ("divergence", pa.float32()),
    ("forward_divergence", pa.float32()),
    ("score", pa.float32()),
    ("kept", pa.bool_()),
    ("quadrant", pa.int8()),
    ("student_top_id", pa.int64()),
    ("student_top_prob", pa.float32()),
    ("teacher_top_id", pa.int64()),
    ("teacher_top_prob", pa.float32()),
])
#: Every column of a records file, in order.
COLUMNS = tuple(SCHEMA.names)

_SHARE_KEYS = tuple(f"q{i}_{fam}" for fam in ("share", "kept_share", "divergence_share") for i in range(1, 5))
SHARES_COLUMNS = ("step", "valid_count", "kept_count") + _SHARE_KEYS
_THRESHOLD_KEYS = ("entropy", "divergence", "entropy_threshold", "divergence_threshold", "threshold_mode")


def record_path(out_dir: str | os.PathLike, step: int) -> Path:
    """Path of the records file of ``step`` in ``out_dir``."""
    return Path(out_dir) / f"tokens_step{int(step):06d}.parquet"


def check_writable_dir(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` (one line naming ``path``) unless ``path`` is a directory, or can be created
    as one, in which files can be written. Leaves nothing behind: folders made for the test are removed."""
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise ValueError(f"{str(d)!r} exists and is not a directory")
    created = []  # the missing folders, deepest first
    p = d.absolute()
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tip_verl_write_test-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(d) else ""
        raise ValueError(f"cannot write to directory {str(d)!r}: {exc.strerror or exc}{where}") from None
    finally:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                pass


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same directory, then rename (no half-written files)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class TokenRecordWriter:
    """Writes a bounded per-token sample of the TIP selection every ``every_n_steps`` steps.

    ``every_n_steps <= 0`` disables it: :meth:`maybe_write` then returns ``None`` at once, without
    touching any tensor or the file system (nothing is created). ``max_rows_per_step`` (>= 1) caps
    the rows of each records file; ``seed`` (>= 0) seeds the choice of sequences (``seed + step``).
    """

    def __init__(self, out_dir: str | os.PathLike, *, every_n_steps: int, max_rows_per_step: int,
                 seed: int = 0) -> None:
        if not isinstance(out_dir, (str, os.PathLike)) or str(out_dir) == "":
            raise ValueError(f"out_dir must be a non-empty path, got {out_dir!r}")
        self.every_n_steps = check_int("every_n_steps", every_n_steps)
        self.max_rows_per_step = check_int("max_rows_per_step", max_rows_per_step, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        self.out_dir = Path(out_dir)
        self._warned_thresholds = False
        if self.enabled:
            if self.out_dir.exists() and not self.out_dir.is_dir():
                raise ValueError(f"out_dir {str(self.out_dir)!r} exists and is not a directory")
            self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    def should_write(self, step: int) -> bool:
        """Whether :meth:`maybe_write` writes at ``step``."""
        return self.every_n_steps > 0 and step % self.every_n_steps == 0

    def __repr__(self) -> str:
        return (f"TokenRecordWriter({str(self.out_dir)!r}, every_n_steps={self.every_n_steps}, "
                f"max_rows_per_step={self.max_rows_per_step}, seed={self.seed})")

    # ------------------------------------------------------------------ sampling

    def _choose_rows(self, lengths: np.ndarray, step: int) -> tuple[list[int], int | None]:
        """Rows to write, in the order drawn, and the truncation length (None = whole sequences).

        Sequences (rows with at least one valid token) are drawn in a random order seeded by
        ``seed + step``; each is taken whole if it still fits under the cap, else skipped. If no
        sequence fits at all, the first drawn one is cut to its first ``max_rows_per_step`` tokens.
        """
        candidates = np.flatnonzero(lengths > 0)
        if candidates.size == 0:
            return [], None
        order = np.random.default_rng(self.seed + step).permutation(candidates)
        budget = self.max_rows_per_step
        chosen: list[int] = []
        for row in order.tolist():
            n = int(lengths[row])
            if n <= budget:
                chosen.append(row)
                budget -= n
                if budget == 0:
                    break
        if not chosen:
            return [int(order[0])], self.max_rows_per_step
        return chosen, None

    # ------------------------------------------------------------------ writing

    def maybe_write(self, step: int, *, selection: Any, response_mask: torch.Tensor, token_ids: torch.Tensor,
                    sequence_ids: Sequence[Any], extra: Mapping[str, torch.Tensor | None] | None = None) -> Path | None:
        """Write the records of ``step`` if ``step % every_n_steps == 0``; return the parquet path or None.

        ``selection``: the step's :class:`tip_verl.pipeline.TIPSelection` (``[B, T]`` fields; its
        ``thresholds`` and ``quadrant_stats``, computed by the pipeline over the whole batch, are written as
        they are); ``response_mask``, ``token_ids``: ``[B, T]``; ``sequence_ids``: ``B`` ids (stored as str);
        ``extra``: optional ``[B, T]`` tensors named in :data:`TOP_COLUMNS` (None values allowed).
        """
        if self.every_n_steps <= 0:
            return None
        step = check_int("step", step, minimum=0)
        if step % self.every_n_steps:
            return None
        mask, fields = self._validate(selection, response_mask, token_ids, sequence_ids, extra)

        # ---- exact per-step statistics over all tokens (the pipeline's)
        thresholds, stats = selection.thresholds, selection.quadrant_stats
        valid_count = int(mask.sum())
        kept_count = int((selection.keep_mask.bool() & mask).sum())

        # ---- the sample
        lengths = mask.sum(dim=1).cpu().numpy()
        rows, cut = self._choose_rows(lengths, step)
        table = self._table(step, rows, cut, mask, fields, [str(s) for s in sequence_ids])

        path = record_path(self.out_dir, step)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        self._write_thresholds(step, thresholds)
        self._append_shares(step, valid_count, kept_count, stats)
        return path

    def _validate(self, selection, response_mask, token_ids, sequence_ids, extra):
        for name in ("keep_mask", "entropy", "divergence", "scores", "quadrants"):
            if not isinstance(getattr(selection, name, None), torch.Tensor):
                raise TypeError(f"selection.{name} must be a torch.Tensor (a TIPSelection is expected), "
                                f"got {type(getattr(selection, name, None)).__name__}")
        for name, keys in (("thresholds", _THRESHOLD_KEYS), ("quadrant_stats", _SHARE_KEYS)):
            value = getattr(selection, name, None)
            if not isinstance(value, Mapping) or any(k not in value for k in keys):
                raise TypeError(f"selection.{name} must be a dict with keys {list(keys)} (a TIPSelection from "
                                f"select_for_batch is expected), got {value!r}")
        if not isinstance(response_mask, torch.Tensor) or response_mask.dim() != 2:
            raise ValueError("response_mask must be a 2-D [B, T] tensor, got "
                             f"{getattr(response_mask, 'shape', type(response_mask).__name__)}")
        shape = tuple(response_mask.shape)
        fields: dict[str, torch.Tensor | None] = {
            "token_id": token_ids, "entropy": selection.entropy, "divergence": selection.divergence,
            "forward_divergence": getattr(selection, "forward_divergence", None), "score": selection.scores,
            "kept": selection.keep_mask, "quadrant": selection.quadrants,
        }
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(TOP_COLUMNS))
        if unknown:
            raise ValueError(f"extra has unknown columns {unknown}; allowed: {list(TOP_COLUMNS)}")
        for name in TOP_COLUMNS:
            fields[name] = extra.get(name)
        for name, t in fields.items():
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but response_mask has shape {shape}; "
                                 "they must match")
        if fields["token_id"] is None:
            raise TypeError("token_ids must be a torch.Tensor, got None")
        if isinstance(sequence_ids, (str, bytes)) or not hasattr(sequence_ids, "__len__"):
            raise TypeError(f"sequence_ids must be a sequence of {shape[0]} ids, got {type(sequence_ids).__name__}")
        if len(sequence_ids) != shape[0]:
            raise ValueError(f"sequence_ids has {len(sequence_ids)} ids but the batch has {shape[0]} rows")
        return as_mask(response_mask), fields

    def _table(self, step, rows, cut, mask, fields, seq_ids) -> pa.Table:
        T = mask.shape[1]
        if rows:
            idx = torch.tensor(rows, dtype=torch.long, device=mask.device)
            m = mask.index_select(0, idx).cpu()
            if cut is not None:  # one over-long sequence: keep its first `cut` valid tokens
                m = m & (m.long().cumsum(dim=1) <= cut)
        else:
            idx, m = None, torch.zeros(0, T, dtype=torch.bool)
        counts = m.sum(dim=1).numpy()
        n = int(counts.sum())
        positions = torch.arange(T, dtype=torch.int32).expand(m.shape[0], T)[m].numpy()
        arrays: dict[str, pa.Array] = {
            "step": pa.array(np.full(n, step, dtype=np.int64)),
            "sequence_id": pa.array(np.repeat(np.array([seq_ids[r] for r in rows], dtype=object), counts)
                                    if n else [], type=pa.string()),
            "position": pa.array(positions),
        }
        numpy_types = {"token_id": np.int64, "entropy": np.float32, "divergence": np.float32,
                       "forward_divergence": np.float32, "score": np.float32, "kept": np.bool_,
                       "quadrant": np.int8, "student_top_id": np.int64, "student_top_prob": np.float32,
                       "teacher_top_id": np.int64, "teacher_top_prob": np.float32}
        for name in COLUMNS[3:]:
            t = fields[name]
            typ = SCHEMA.field(name).type
            if t is None or idx is None:
                arrays[name] = pa.nulls(n, type=typ) if t is None else pa.array(np.zeros(0, numpy_types[name]))
                continue
            sub = t.index_select(0, idx).detach().cpu()
            if name == "kept":
                sub = sub != 0
            elif numpy_types[name] is np.float32:
                sub = sub.float()  # bf16 has no numpy dtype
            else:
                sub = sub.long()
            values = sub[m].numpy().astype(numpy_types[name], copy=False)
            arrays[name] = pa.array(values, type=typ)
        return pa.Table.from_arrays([arrays[c] for c in COLUMNS], schema=SCHEMA)

    def _write_thresholds(self, step: int, thresholds: Mapping[str, Any]) -> None:
        path = self.out_dir / THRESHOLDS_FILE
        data = _load_thresholds_json(path) if path.exists() else {}
        steps = data.setdefault("steps", {})
        steps[str(step)] = {
            "entropy": float(thresholds["entropy"]), "divergence": float(thresholds["divergence"]),
            "threshold_mode": thresholds["threshold_mode"],
            "entropy_threshold": float(thresholds["entropy_threshold"]),
            "divergence_threshold": float(thresholds["divergence_threshold"]),
        }
        data["steps"] = {k: steps[k] for k in sorted(steps, key=int)}
        text = json.dumps(data, indent=1)
        _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def _append_shares(self, step: int, valid_count: int, kept_count: int, stats: Mapping[str, float]) -> None:
        path = self.out_dir / SHARES_FILE
        new = not path.exists() or path.stat().st_size == 0
        row = {"step": step, "valid_count": valid_count, "kept_count": kept_count}
        row.update({k: repr(float(stats[k])) for k in _SHARE_KEYS})
        with open(path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(SHARES_COLUMNS))
            if new:
                w.writeheader()
            w.writerow(row)


# ---------------------------------------------------------------------------- reading


def _no_records(directory: Path, why: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no TIP token records in {str(directory)!r}: {why}; expected {RECORDS_GLOB} files "
        f"(tokens_step000010.parquet, ...) written by tip_verl.records.TokenRecordWriter "
        "(enable it with a positive every_n_steps)")


def list_record_files(directory: str | os.PathLike) -> dict[int, Path]:
    """``{step: path}`` of the records files in ``directory``, sorted by step (raises if none)."""
    d = Path(directory)
    if not d.exists():
        raise _no_records(d, "the directory does not exist")
    if not d.is_dir():
        raise _no_records(d, "it is not a directory")
    found = {}
    for p in d.iterdir():
        match = _RECORD_RE.match(p.name)
        if match and p.is_file():
            found[int(match.group(1))] = p
    if not found:
        raise _no_records(d, "the directory holds no records file")
    return dict(sorted(found.items()))


def read_records(directory: str | os.PathLike, *, steps: Iterable[int] | None = None,
                 columns: Sequence[str] | None = None, progress: bool = False) -> pd.DataFrame:
    """All records of ``directory`` (or only ``steps``) as one DataFrame, sorted by step.

    Raises ``FileNotFoundError`` naming the directory when it holds no records (or none of
    ``steps``). ``columns`` selects columns; ``progress`` shows a tqdm bar when more than 3 files.
    """
    files = list_record_files(directory)
    if steps is not None:
        wanted = sorted({int(s) for s in steps})
        missing = [s for s in wanted if s not in files]
        if missing:
            raise _no_records(Path(directory), f"no records for step(s) {missing} (recorded steps: "
                                              f"{_steps_summary(list(files))})")
        files = {s: files[s] for s in wanted}
    cols = list(columns) if columns is not None else None
    if cols is not None:
        unknown = [c for c in cols if c not in COLUMNS]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; records have {list(COLUMNS)}")
    items: Iterable = files.items()
    if progress and len(files) > 3:
        from tqdm.auto import tqdm
        items = tqdm(items, total=len(files), desc="reading records", unit="file")
    frames = [pq.read_table(p, columns=cols).to_pandas() for _, p in items]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    for name in ("student_top_id", "teacher_top_id"):  # nullable ints stay ints (pandas would use float)
        if name in df.columns:
            df[name] = df[name].astype("Int64")
    return df


def _steps_summary(steps: list[int]) -> str:
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[:4])) + ", ..., " + ", ".join(map(str, steps[-3:]))


def _load_thresholds_json(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("steps", {}), dict):
        raise ValueError(f"{path} is not a TIP thresholds file (expected {{'steps': {{...}}}})")
    return data


def read_thresholds(directory: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """``{step: {"entropy", "divergence", "threshold_mode", "entropy_threshold", "divergence_threshold"}}``
    from ``thresholds.json`` (``{}`` when the file is absent)."""
    path = Path(directory) / THRESHOLDS_FILE
    if not path.exists():
        return {}
    return {int(k): v for k, v in _load_thresholds_json(path)["steps"].items()}


def read_quadrant_shares(directory: str | os.PathLike) -> pd.DataFrame | None:
    """``quadrant_shares.csv`` as a DataFrame sorted by step (the last row wins for a step written
    twice, e.g. after a resume); None when the file is absent or empty."""
    path = Path(directory) / SHARES_FILE
    if not path.exists() or path.stat().st_size == 0:
        return None
    df = pd.read_csv(path)
    if df.empty:
        return None
    missing = [c for c in SHARES_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}")
    return df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)

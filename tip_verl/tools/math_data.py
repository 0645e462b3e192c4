"""Turn downloaded math datasets into verl parquet files for OPD with TIP (paper Section 7.1).

Training prompts come from DAPO-Math-17k; evaluation uses MATH-500 and AIME 2024 / AIME 2025. This
tool reads files you downloaded yourself (it never touches the network) and writes verl's RL
dataset layout::

    data_source   str    "math_dapo" | "HuggingFaceH4/MATH-500" | "aime24" | "aime25"
    prompt        list   [{"role": "user", "content": <problem> + "\\n\\n" + INSTRUCTION}]
    ability       str    "math"
    reward_model  dict   {"style": "rule", "ground_truth": <answer>}
    extra_info    dict   {"split": "train" | "test", "index": <row number>}

The ``data_source`` values are the ones verl's ``verl.utils.reward_score.default_compute_score``
routes to its math scorers (``math_reward`` for MATH-500, ``math_dapo`` for DAPO and AIME), so
verl's default reward manager logs accuracy without a custom reward function.

Where to get the data (Hugging Face datasets; any of these files or folders works)::

    huggingface-cli download --repo-type dataset BytedTsinghua-SIA/DAPO-Math-17k --local-dir raw/dapo
    huggingface-cli download --repo-type dataset HuggingFaceH4/MATH-500          --local-dir raw/math500
    huggingface-cli download --repo-type dataset HuggingFaceH4/aime_2024         --local-dir raw/aime24
        (or Maxwell-Jia/AIME_2024)
    huggingface-cli download --repo-type dataset yentinglin/aime_2025            --local-dir raw/aime25
        (or opencompass/AIME2025)

Usage::

    python -m tip_verl.tools.math_data --dapo raw/dapo --math500 raw/math500 \\
        --aime24 raw/aime24 --aime25 raw/aime25 --out data/math

Each input may be a ``.parquet``, ``.jsonl`` or ``.json`` file, or a folder: every file under it of the
first kind found (parquet, else JSONL, else JSON; hidden folders such as ``.cache`` skipped) is read
and concatenated. The problem is taken from
the first column found among :data:`PROBLEM_COLUMNS` (a chat-message list such as DAPO's
``prompt`` is accepted: its last user message is used, with DAPO's own "Answer:" instructions
removed) and the answer from :data:`ANSWER_COLUMNS` (a full ``solution`` is reduced to its last
``\\boxed{...}``). Column names are matched case-insensitively. DAPO-Math-17k repeats every
problem many times; duplicates (same problem and answer) are dropped from the training file
unless ``--keep-duplicates`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ANSWER_COLUMNS",
    "DATASETS",
    "INSTRUCTION",
    "PROBLEM_COLUMNS",
    "ColumnError",
    "build_records",
    "load_table",
    "main",
    "prepare",
    "write_parquet",
]

#: Appended to every problem (the usual \\boxed{} instruction for math reasoning models).
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

#: Candidate problem columns, in order of preference (matched case-insensitively).
PROBLEM_COLUMNS = ("problem", "question", "prompt", "query", "input")
#: Candidate answer columns, in order of preference (``a.b`` = key ``b`` of dict column ``a``).
ANSWER_COLUMNS = ("answer", "ground_truth", "final_answer", "reward_model.ground_truth", "solution")

SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".json")

# DAPO-Math-17k wraps each problem in its own "Answer: $Answer" instructions; we swap them for the
# \boxed{} instruction so that training and evaluation prompts look alike.
_DAPO_PREFIX = "Solve the following math problem step by step."
_DAPO_SUFFIX = "Remember to put your answer on its own line after"


class ColumnError(ValueError):
    """No usable problem/answer column in an input file (the message lists the columns found)."""


@dataclass(frozen=True)
class DatasetSpec:
    key: str
    out_name: str
    data_source: str
    split: str
    hf_ids: tuple[str, ...]
    description: str


#: The datasets this tool knows, by CLI flag name.
DATASETS: dict[str, DatasetSpec] = {
    "dapo": DatasetSpec("dapo", "train.parquet", "math_dapo", "train",
                        ("BytedTsinghua-SIA/DAPO-Math-17k",), "DAPO-Math-17k training prompts"),
    "math500": DatasetSpec("math500", "math500.parquet", "HuggingFaceH4/MATH-500", "test",
                           ("HuggingFaceH4/MATH-500",), "MATH-500 (500 problems)"),
    "aime24": DatasetSpec("aime24", "aime24.parquet", "aime24", "test",
                          ("HuggingFaceH4/aime_2024", "Maxwell-Jia/AIME_2024"), "AIME 2024 (30 problems)"),
    "aime25": DatasetSpec("aime25", "aime25.parquet", "aime25", "test",
                          ("yentinglin/aime_2025", "opencompass/AIME2025"), "AIME 2025 (30 problems)"),
}


# ----------------------------------------------------------------------------------------- loading
def _input_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected one of "
                             f"{', '.join(SUPPORTED_SUFFIXES)}")
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise ValueError(f"{path}: folder holds no {', '.join(SUPPORTED_SUFFIXES)} files")
        # Hub downloads may carry metadata JSON next to the data: read only the first kind present
        # (parquet, then JSONL, then JSON).
        for suffix in SUPPORTED_SUFFIXES:
            kind = [p for p in files if p.suffix.lower() == suffix]
            if kind:
                return kind
        return files
    raise FileNotFoundError(f"{path}: no such file or folder")


def _read_json(path: Path):
    import pandas as pd

    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return pd.read_json(path, lines=True)  # JSON lines saved as .json
    if isinstance(obj, Mapping):
        for key in ("data", "rows", "train", "test", "examples"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, list) for v in obj.values()):
            return pd.DataFrame(obj)  # column-oriented
        obj = [obj]
    if not isinstance(obj, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(obj).__name__}")
    return pd.DataFrame.from_records(obj)


def load_table(path: str | os.PathLike):
    """Read a parquet / JSONL / JSON file, or every such file under a folder, as one DataFrame."""
    import pandas as pd

    frames = []
    for file in _input_files(Path(path)):
        suffix = file.suffix.lower()
        if suffix == ".parquet":
            frames.append(pd.read_parquet(file))
        elif suffix == ".jsonl":
            frames.append(pd.read_json(file, lines=True))
        else:
            frames.append(_read_json(file))
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return frame


# ------------------------------------------------------------------------------ column extraction
def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return False


def _as_list(value: Any):
    """Sequences from parquet arrive as numpy arrays; give plain lists (or None)."""
    if isinstance(value, (str, bytes, Mapping)):
        return None
    if isinstance(value, Sequence):
        return list(value)
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1:
        return list(value)
    return None


def _find_column(columns: Sequence[str], candidates: Sequence[str], frame) -> tuple[str, str | None] | None:
    """First candidate present: ``(column, subkey)``; ``a.b`` matches dict column ``a`` with key ``b``."""
    lower = {}
    for col in columns:
        lower.setdefault(str(col).lower(), col)
    for cand in candidates:
        if "." in cand:
            outer, inner = cand.split(".", 1)
            col = lower.get(outer)
            if col is None:
                continue
            sample = next((v for v in frame[col] if not _is_missing(v)), None)
            if isinstance(sample, Mapping) and inner in sample:
                return col, inner
            continue
        col = lower.get(cand)
        if col is not None:
            return col, None
    return None


def _strip_dapo_template(text: str) -> str:
    text = text.strip()
    if text.startswith(_DAPO_PREFIX):
        head, sep, rest = text.partition("\n\n")
        if sep:
            text = rest
    pos = text.rfind(_DAPO_SUFFIX)
    if pos >= 0:
        text = text[:pos]
    return text.strip()


def _problem_text(value: Any) -> str | None:
    if _is_missing(value):
        return None
    messages = _as_list(value)
    if messages is not None:  # a chat-message list (e.g. DAPO's `prompt`)
        users = [m for m in messages if isinstance(m, Mapping) and m.get("role", "user") == "user"]
        if not users:
            return None
        content = users[-1].get("content")
        if not isinstance(content, str):
            return None
        value = content
    if isinstance(value, Mapping):
        value = value.get("content")
    if not isinstance(value, str):
        return None
    text = _strip_dapo_template(value)
    return text or None


def _last_boxed(text: str) -> str | None:
    from verl.utils.reward_score.math_reward import last_boxed_only_string, remove_boxed

    boxed = last_boxed_only_string(text)
    if boxed is None:
        return None
    try:
        return remove_boxed(boxed)
    except AssertionError:
        return None


def _answer_text(value: Any, *, from_solution: bool) -> str | None:
    if _is_missing(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)) and getattr(value, "ndim", 0) == 0:
        value = value.item()  # numpy scalar
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if from_solution:
        text = (_last_boxed(text) or "").strip()
    elif text.startswith("\\boxed"):
        text = (_last_boxed(text) or text).strip()
    return text or None


def build_records(frame, spec: DatasetSpec, *, source: str = "<input>", dedup: bool = False) -> tuple[list[dict], dict]:
    """Rows of ``frame`` as verl records for ``spec``; returns ``(records, stats)``.

    Raises :class:`ColumnError` (listing the columns found) when no problem or answer column
    matches, and ``ValueError`` when no row yields both a problem and an answer.
    """
    columns = [str(c) for c in frame.columns]
    prob_col = _find_column(columns, PROBLEM_COLUMNS, frame)
    ans_col = _find_column(columns, ANSWER_COLUMNS, frame)
    missing = []
    if prob_col is None:
        missing.append(f"a problem column (one of: {', '.join(PROBLEM_COLUMNS)})")
    if ans_col is None:
        missing.append(f"an answer column (one of: {', '.join(ANSWER_COLUMNS)})")
    if missing:
        raise ColumnError(f"{source}: could not find {' or '.join(missing)}; columns found: {columns}")

    from_solution = ans_col[0].lower() == "solution"
    records: list[dict] = []
    seen: set[tuple[str, str]] = set()
    dropped_missing = dropped_dup = 0
    for prob_value, ans_value in zip(frame[prob_col[0]], frame[ans_col[0]]):
        if ans_col[1] is not None:
            ans_value = ans_value.get(ans_col[1]) if isinstance(ans_value, Mapping) else None
        problem = _problem_text(prob_value)
        answer = _answer_text(ans_value, from_solution=from_solution)
        if problem is None or answer is None:
            dropped_missing += 1
            continue
        if dedup:
            key = (problem, answer)
            if key in seen:
                dropped_dup += 1
                continue
            seen.add(key)
        records.append({
            "data_source": spec.data_source,
            "prompt": [{"role": "user", "content": f"{problem}\n\n{INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": spec.split, "index": len(records)},
        })
    if not records:
        raise ValueError(f"{source}: no row has both a problem (column {prob_col[0]!r}) and an answer "
                         f"(column {'.'.join(c for c in ans_col if c)!r}); {dropped_missing} rows dropped")
    stats = {
        "rows": len(frame), "written": len(records), "dropped_missing": dropped_missing,
        "dropped_duplicates": dropped_dup, "problem_column": prob_col[0],
        "answer_column": ".".join(c for c in ans_col if c),
    }
    return records, stats


def write_parquet(records: list[dict], path: str | os.PathLike) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)


def prepare(kind: str, path: str | os.PathLike, out_dir: str | os.PathLike, *, dedup: bool | None = None) -> dict:
    """Convert one dataset (``kind`` in :data:`DATASETS`) to ``out_dir/<name>.parquet``; return stats."""
    if kind not in DATASETS:
        raise ValueError(f"unknown dataset {kind!r}; expected one of {', '.join(DATASETS)}")
    spec = DATASETS[kind]
    if dedup is None:
        dedup = spec.split == "train"
    frame = load_table(path)
    records, stats = build_records(frame, spec, source=str(path), dedup=dedup)
    out = Path(out_dir) / spec.out_name
    write_parquet(records, out)
    stats["path"] = str(out)
    return stats


def _parser() -> argparse.ArgumentParser:
    where = "\n".join(f"  --{k:<8} {s.description}: Hugging Face dataset {' or '.join(s.hf_ids)} -> {s.out_name}"
                      for k, s in DATASETS.items())
    parser = argparse.ArgumentParser(
        prog="python -m tip_verl.tools.math_data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert downloaded math datasets (parquet / JSONL / JSON files or folders) into verl "
                    "parquet for OPD with TIP.",
        epilog=(
            "Inputs (download first, e.g. `huggingface-cli download --repo-type dataset <id> --local-dir DIR`):\n"
            f"{where}\n\n"
            f"Problem columns tried: {', '.join(PROBLEM_COLUMNS)}; answer columns tried: {', '.join(ANSWER_COLUMNS)}\n"
            f"(case-insensitive). Every prompt gets the instruction: {INSTRUCTION}"
        ),
    )
    for key, spec in DATASETS.items():
        parser.add_argument(f"--{key}", metavar="PATH", help=f"{spec.description} ({' / '.join(spec.hf_ids)})")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for the parquet files")
    parser.add_argument("--keep-duplicates", action="store_true",
                        help="keep repeated (problem, answer) rows in the training file (dropped by default)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    chosen = [k for k in DATASETS if getattr(args, k)]
    if not chosen:
        parser.error("give at least one input: " + ", ".join(f"--{k} PATH" for k in DATASETS))
    for key in chosen:
        dedup = None if not args.keep_duplicates else False
        try:
            stats = prepare(key, getattr(args, key), args.out, dedup=dedup)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: --{key}: {e}", file=sys.stderr)
            return 2
        extra = f", dropped {stats['dropped_duplicates']} duplicates" if stats["dropped_duplicates"] else ""
        skipped = f", skipped {stats['dropped_missing']} rows without problem/answer" if stats["dropped_missing"] else ""
        print(f"{stats['path']}: {stats['written']} prompts from {stats['rows']} rows "
              f"(problem={stats['problem_column']}, answer={stats['answer_column']}{extra}{skipped})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

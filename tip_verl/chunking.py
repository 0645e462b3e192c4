"""Row chunks under a byte budget: the one chunking rule of tip_verl (pure Python, no verl).

Every place that walks a ``(rows, width)`` tensor a block of rows at a time (the full-logit and
top-k divergences, the teacher's top-k pass, the kept-row lm_head and its in-place backward) sizes
its blocks with :func:`rows_per_chunk` (one block of ``rows x width`` elements fits in
:data:`DEFAULT_CHUNK_BYTES` unless told otherwise) and walks them with :func:`row_chunks`. All of
those computations are row by row, so the chunk size changes peak memory, never a value.
"""

from __future__ import annotations

from typing import Iterator

__all__ = ["DEFAULT_CHUNK_BYTES", "rows_per_chunk", "row_chunks"]

#: Byte budget of one chunk (``rows x width`` elements): 64 MiB, e.g. 110 rows of float32 logits
#: over a 151,936-token vocabulary.
DEFAULT_CHUNK_BYTES = 64 * 2**20


def rows_per_chunk(width: int, elem_bytes: int = 4, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one ``rows x width`` block of ``elem_bytes``-byte elements fits in
    ``chunk_bytes`` (at least 1 row)."""
    if int(width) <= 0:
        raise ValueError(f"the row width (vocab size) must be positive, got {width}")
    return max(1, int(chunk_bytes) // (int(elem_bytes) * int(width)))


def row_chunks(n_rows: int, rows: int) -> Iterator[slice]:
    """``slice(start, stop)`` over ``range(n_rows)``, in order, ``rows`` at a time (the last may be shorter)."""
    rows = int(rows)
    if rows < 1:
        raise ValueError(f"rows per chunk must be >= 1, got {rows}")
    n_rows = int(n_rows)
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows))

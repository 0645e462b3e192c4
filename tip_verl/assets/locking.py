"""Building a directory in place safely: one builder at a time (a file lock beside it), the new build
written to a temporary directory and renamed into place, so an interrupted build never leaves a
half-valid directory and a reader never sees one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _replace_dir(out: Path, fill: Callable[[Path], None]) -> None:
    """Call ``fill(tmp)`` on a fresh temporary directory beside ``out``, then rename it to ``out`` (an
    earlier ``out`` is removed once the new one is in place, and put back if the rename fails).
    The caller holds :func:`_file_lock` of :func:`_lock_path` (so no other build is running)."""
    # Leftovers of interrupted builds (we hold the lock, so no build is running).
    for stale in list(out.parent.glob(f".{out.name}.tmp-*")) + list(out.parent.glob(f".{out.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None and not out.exists():
                os.rename(old, out)  # put the previous build back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

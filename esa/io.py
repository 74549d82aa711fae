"""Files between steps: atomic writes, and Parquet reads that fail with one line.

Writes: an output path either holds a complete file or does not exist. Snakemake treats an
existing output as finished, so a crash halfway through a write must not leave a truncated
file under the final name. Each writer writes a temporary file in the same directory (so the
rename stays on one filesystem), flushes it to disk and then renames it over the target with
``os.replace``, which is atomic on POSIX and Windows.

Every step reads Parquet through :func:`read_parquet`, so a damaged input (truncated, not
Parquet at all) ends in one ``esa: error:`` line naming the file instead of a pyarrow traceback.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow

from .errors import ESAError


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then move the result to ``path``; on error remove the tmp.

    For any file format: ``write`` writes the whole file to the temporary path it is given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_parquet_atomic(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` (without its index) as Parquet to ``path`` atomically; dtypes round-trip."""
    return write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pd.DataFrame:
    """``pd.read_parquet(path, columns=columns)``; an unreadable file is an :class:`ESAError` naming it."""
    try:
        return pd.read_parquet(path, columns=columns)
    except (OSError, pyarrow.ArrowException) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ESAError(f"cannot read Parquet file {os.fspath(path)!r}: {first}") from None


def _json_default(value):
    """Let numpy scalars/arrays and paths, which metrics dicts often carry, serialise as JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=2, default=_json_default)
            handle.write("\n")
    return write_atomic(path, write)


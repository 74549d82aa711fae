"""Files between steps: atomic writes, and Parquet reads that fail with one line.

Writes: an output path either holds a complete file or does not exist. Snakemake treats an
existing output as finished, so a crash halfway through a write must not leave a truncated
file under the final name. Each writer writes a temporary file in the same directory (so the
rename stays on one filesystem), flushes it to disk and then renames it over the target with
``os.replace``, which is atomic on POSIX and Windows. The file gets mode 0666 less the umask, as
with a plain ``open()``, whatever the writer does (mkstemp's, and safetensors', 0600 would make
results on a shared filesystem unreadable to collaborators). A full disk or an exhausted quota
ends in one ``esa: error:`` line naming the file and the free space on its filesystem.

Every step reads Parquet through :func:`read_parquet`, so a damaged input (truncated, not
Parquet at all) ends in one ``esa: error:`` line naming the file instead of a pyarrow traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow

from .errors import ESAError


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _os_errno(err: Exception) -> int | None:
    """The OS error number behind a failed write: an OSError's (pyarrow sets it too), or the
    ``(os error N)`` of a Rust writer's message (safetensors raises SafetensorError, no errno)."""
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"\(os error (\d+)\)", str(err))
    return int(found.group(1)) if found else None


def _mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding the absolute ``path`` (what ``df`` names)."""
    while not os.path.ismount(path):
        path = path.parent
    return path


def _size(n: float) -> str:
    """A byte count in decimal units, as ``df -H`` gives them: 512 B, 12.0 MB."""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        n /= 1000
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}"


@contextmanager
def disk_full_as_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk or quota (ENOSPC, EDQUOT) while writing ``path`` into an :class:`ESAError`
    naming ``path`` and the space left on its filesystem; other errors pass through unchanged."""
    try:
        yield
    except Exception as err:
        number = _os_errno(err)
        if number not in DISK_FULL:
            raise
        # the nearest existing folder: an unwritten path, or a folder its mkdir could not create
        folder = next(p for p in Path(os.path.abspath(path)).parents if p.is_dir())
        mount = _mount_point(folder)
        raise ESAError(f"{os.strerror(number).lower()} writing {os.fspath(path)} "
                       f"({_size(shutil.disk_usage(folder).free)} free on {mount})") from err


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then move the result to ``path``; on error remove the tmp.

    For any file format: ``write`` writes the whole file to the temporary path it is given."""
    path = Path(path)
    with disk_full_as_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        # O_EXCL: never another write's file; mode 0o666: the kernel applies the umask
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        try:
            write(str(tmp))
            # a writer may replace the file: safetensors renames its own 0600 temporary over it
            os.chmod(tmp, mode)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
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


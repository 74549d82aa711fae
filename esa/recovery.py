"""What a new run does to a working directory that an interrupted or damaged run left behind.

Called once per Snakemake start, in its main process, before the DAG is built
(``rules/common.smk``); torch- and pyarrow-free.

- **Stale locks.** Snakemake locks the files of a run in ``.snakemake/locks/`` and removes the
  locks when it ends; a Snakemake killed with SIGKILL cannot, and every later run is refused
  ("Directory cannot be locked") until ``snakemake --unlock``. A lock file cannot say whether
  its process lives, so each ESA run also holds an advisory ``flock`` on
  ``.snakemake/esa-run.lock`` for as long as it runs. The kernel drops a flock when its process
  dies, however it dies: if this run gets it, no other ESA run holds the directory, and any
  Snakemake locks left there are stale and removed. If another run holds it, nothing is
  touched and Snakemake refuses this run as before.
- **Damaged results.** A file under ``results/`` whose framing is broken (``esa.integrity``)
  is removed, so Snakemake sees its output missing and reruns the job that makes it and every
  job after it; a damaged file inside a model's ``checkpoint/`` removes that model's
  ``model.json`` too (the model step writes the checkpoint beside it). This happens in a dry
  run as well, which then lists those jobs: the file could not be read by any step.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from .integrity import damaged_files

RUN_LOCK = Path(".snakemake") / "esa-run.lock"
SNAKEMAKE_LOCKS = Path(".snakemake") / "locks"
_held = []  # the open run lock: its flock lasts as long as this process


def hold_run_lock(workdir: str | os.PathLike = ".") -> bool:
    """Take the run lock of ``workdir`` for the life of this process; False when another
    process holds it."""
    path = Path(workdir) / RUN_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return False
    _held.append(handle)
    return True


def remove_stale_locks(workdir: str | os.PathLike = ".") -> list[Path]:
    """Remove Snakemake's lock files of ``workdir`` when this process holds the run lock (no
    other ESA run can own them); the files removed."""
    if not hold_run_lock(workdir):
        return []
    locks = sorted((Path(workdir) / SNAKEMAKE_LOCKS).glob("*.lock"))
    for lock in locks:
        lock.unlink(missing_ok=True)
    return locks


def remove_damaged(results: str | os.PathLike = "results") -> dict[Path, str]:
    """Remove every damaged file under ``results`` (and the model.json of a damaged
    checkpoint); the files found damaged, with why."""
    if not Path(results).is_dir():
        return {}
    found = damaged_files(results)
    for path in found:
        path.unlink(missing_ok=True)
        if path.parent.name == "checkpoint":
            (path.parent.parent / "model.json").unlink(missing_ok=True)
    return found


def recover(workdir: str | os.PathLike = ".") -> None:
    """Both, with one line on stderr for each thing done."""
    for lock in remove_stale_locks(workdir):
        print(f"esa: removed {lock}, a lock left by a Snakemake run that no longer runs", file=sys.stderr)
    for path, reason in remove_damaged(Path(workdir) / "results").items():
        print(f"esa: removed damaged {path} ({reason}); this run rebuilds it where a step needs it",
              file=sys.stderr)

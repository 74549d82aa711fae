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
  is removed, and so is every result made from it, directly or through other results, as
  Snakemake's own records say (``.snakemake/metadata/``: one JSON record per output, naming
  the inputs its job read). Removing only the damaged file is not enough: Snakemake reruns a
  job whose output is missing only when a job that needs the output runs, so a damaged
  intermediate whose consumers are all present would stay missing. With its consumers gone,
  the run rebuilds the chain from the damaged file on. A damaged file inside a model's
  ``checkpoint/`` removes that model's ``model.json`` too (the model step writes the
  checkpoint beside it). This happens in a dry run as well, which then lists those jobs: the
  file could not be read by any step. Without Snakemake's records (a first run, or the
  database backend) only the damaged file goes.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import sys
from pathlib import Path

from .integrity import damaged_files

RUN_LOCK = Path(".snakemake") / "esa-run.lock"
SNAKEMAKE_LOCKS = Path(".snakemake") / "locks"
SNAKEMAKE_METADATA = Path(".snakemake") / "metadata"
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


def made_from(workdir: str | os.PathLike = ".") -> dict[str, set[str]]:
    """Each file, as a path relative to ``workdir``, mapped to the outputs whose job read it,
    from Snakemake's file records (``.snakemake/metadata/<urlsafe-base64 of the output path>``,
    split into directories of at most NAME_MAX-1 characters, each but the last prefixed "@")."""
    metadata = Path(workdir) / SNAKEMAKE_METADATA
    consumers: dict[str, set[str]] = {}
    for record in metadata.rglob("*"):
        if not record.is_file():
            continue
        parts = record.relative_to(metadata).parts
        try:
            output = base64.urlsafe_b64decode("".join(part.removeprefix("@") for part in parts)).decode()
            inputs = json.loads(record.read_text()).get("input") or []
        except (ValueError, UnicodeDecodeError, OSError, AttributeError):
            continue  # not a record of Snakemake's file format: nothing known from it
        for source in inputs:
            consumers.setdefault(source, set()).add(output)
    return consumers


def results_made_from(paths, workdir: str | os.PathLike = ".") -> list[Path]:
    """The existing files made, directly or through others, from any of ``paths`` (relative
    to ``workdir`` or absolute), sorted, excluding ``paths`` themselves."""
    workdir = Path(workdir)
    consumers = made_from(workdir)
    start = {str(Path(path).relative_to(workdir)) if Path(path).is_absolute() else str(path) for path in paths}
    seen, queue = set(start), list(start)
    while queue:
        for output in consumers.get(queue.pop(), ()):
            if output not in seen:
                seen.add(output)
                queue.append(output)
    return sorted(workdir / path for path in seen - start if (workdir / path).exists())


def remove_damaged(workdir: str | os.PathLike = ".") -> tuple[dict[Path, str], list[Path]]:
    """Remove every damaged file under ``workdir/results`` (and the model.json of a damaged
    checkpoint) and every existing result made from them; the files found damaged, with why,
    and the results removed with them."""
    workdir = Path(workdir)
    if not (workdir / "results").is_dir():
        return {}, []
    found = damaged_files(workdir / "results")
    sources = set()
    for path in found:
        path.unlink(missing_ok=True)
        sources.add(path)
        if path.parent.name == "checkpoint":
            model_json = path.parent.parent / "model.json"
            model_json.unlink(missing_ok=True)
            sources.add(model_json)
    dependents = results_made_from(sources, workdir) if found else []
    for path in dependents:
        path.unlink()
    return found, dependents


def recover(workdir: str | os.PathLike = ".") -> None:
    """Both, with one line on stderr for each thing done."""
    for lock in remove_stale_locks(workdir):
        print(f"esa: removed {lock}, a lock left by a Snakemake run that no longer runs", file=sys.stderr)
    found, dependents = remove_damaged(workdir)
    for path, reason in found.items():
        print(f"esa: removed damaged {path} ({reason}); this run rebuilds it where a step needs it",
              file=sys.stderr)
    if dependents:
        shown = ", ".join(str(path) for path in dependents[:4])
        more = f" and {len(dependents) - 4} more" if len(dependents) > 4 else ""
        print(f"esa: removed the {len(dependents)} results made from the damaged files too ({shown}{more}); "
              f"this run rebuilds them from whole inputs", file=sys.stderr)

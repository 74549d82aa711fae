"""Reading a study's result files back: the experiments, agreement tables and JSON that the
verdicts, the report and ``esa summary`` judge or show. Reading only: nothing here decides.

An experiment is described by a JSON-able entry (see :func:`load_experiment`); its per-seed
files are given as ``{seed: path}`` (seed keys may be strings, as in JSON) or, as the config
lists them, as paths in the order of the entry's ``seeds``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import ESAError
from .io import read_parquet


@dataclass
class ExperimentData:
    """The outputs one experiment (metric, mode, k, seeds, perhaps a perturbation) produced."""

    name: str
    metric: str
    mode: str
    k: int
    stats: dict[int, pd.DataFrame] = field(default_factory=dict)  # seed -> stats.parquet
    masks: dict[int, pd.DataFrame] = field(default_factory=dict)  # seed -> mask.parquet
    results: pd.DataFrame | None = None  # perturb results.parquet
    stability: dict | None = None  # stability summary
    stability_pairs: pd.DataFrame | None = None


def read_json(path):
    """A JSON file's content (metrics, stability summary, the verdict list)."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_optional(path, read):
    """``read(path)``, or None for no path (that part of the study was not run)."""
    return None if path is None else read(path)


def _per_seed(entry: Mapping, key: str) -> dict[int, pd.DataFrame]:
    """``entry[key]`` as ``{seed: path}`` (seed keys may be strings, as in JSON) or as a list
    of paths in the order of ``entry["seeds"]``, read into ``{seed: DataFrame}``."""
    paths = entry.get(key) or {}
    if not isinstance(paths, Mapping):
        seeds = entry.get("seeds")
        if seeds is None or len(seeds) != len(paths):
            raise ESAError(f"experiment {entry['name']!r}: {key} lists {len(paths)} files, "
                           f"expected one per seed of {seeds}")
        paths = dict(zip(seeds, paths))
    return {int(seed): read_parquet(path) for seed, path in paths.items()}


def load_experiment(entry: Mapping) -> ExperimentData:
    """Read an experiment's files, described by a JSON-able dict.

    Keys: ``name, metric, mode`` and ``k`` (or ``topk``, as in the config's experiments);
    ``stats`` and ``masks``: ``{seed: path}`` or a list of paths, one per seed of ``seeds``;
    ``results`` (perturb results.parquet), ``stability`` (summary JSON), ``stability_pairs``
    (pairs parquet): a path, or absent/None when not run.
    """
    missing = [key for key in ("name", "metric", "mode") if key not in entry]
    if missing or ("k" not in entry and "topk" not in entry):
        raise ESAError(f"experiment entry lacks {missing or ['k']}: {dict(entry)}")
    return ExperimentData(name=entry["name"], metric=entry["metric"], mode=entry["mode"],
                          k=int(entry.get("k", entry.get("topk"))), stats=_per_seed(entry, "stats"),
                          masks=_per_seed(entry, "masks"),
                          results=read_optional(entry.get("results"), read_parquet),
                          stability=read_optional(entry.get("stability"), read_json),
                          stability_pairs=read_optional(entry.get("stability_pairs"), read_parquet))


def read_agreement(paths) -> pd.DataFrame | None:
    """The agreement tables (one parquet per mode and k) as one frame; None for no path."""
    if paths is None:
        return None
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    return pd.concat([read_parquet(p) for p in paths], ignore_index=True) if paths else None

"""Stability of top-k sets across seeds, and agreement between metrics.

A weight is identified by the key ``(tensor, flat_index)``; the top set of a mask is the keys
of its rows with ``set == "top"``.

    Jaccard(A, B)  = |A ∩ B| / |A ∪ B|          (1.0 when both sets are empty)
    Spearman(x, y) = Pearson correlation of rank(x) and rank(y), tied values sharing the
                     average of the ranks they span

Across seeds, every pair of seeds gets the Jaccard of their top sets and the Spearman of
their scores on the union of the two top sets. Each seed's scores come from its candidates
table (columns ``tensor, flat_index, score``). An entry of the union missing from a seed's
candidates was not among that seed's highest scores and its exact score is unknown; it is
given 0, the floor of every score (all ranking scores are nonnegative), so such entries tie
at the bottom rank. Across metrics (same seed, mode and k), every pair of metrics gets the
Jaccard of their top sets.
"""

from __future__ import annotations

import math
from itertools import combinations

import pandas as pd

from .names import TOP

MISSING_SCORE = 0.0


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|, defined as 1.0 for two empty sets."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def spearman(x, y) -> float:
    """Spearman rank correlation with average ranks for ties; NaN if either side is constant."""
    rx = pd.Series(x, dtype="float64").rank(method="average").to_numpy()
    ry = pd.Series(y, dtype="float64").rank(method="average").to_numpy()
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else math.nan


def top_set(mask: pd.DataFrame) -> set[tuple[str, int]]:
    """Keys ``(tensor, flat_index)`` of the top rows of a mask."""
    top = mask[mask["set"] == TOP]
    return set(zip(top["tensor"], top["flat_index"].astype("int64")))


def _score_lookup(candidates: pd.DataFrame) -> dict[tuple[str, int], float]:
    # An entry can be a candidate from both ends of a small tensor; its score is the same.
    unique = candidates.drop_duplicates(["tensor", "flat_index"])
    return dict(zip(zip(unique["tensor"], unique["flat_index"].astype("int64")),
                    unique["score"].astype("float64")))


def seed_stability(masks_by_seed: dict[int, pd.DataFrame],
                   scores_by_seed: dict[int, pd.DataFrame] | None = None) -> tuple[pd.DataFrame, dict]:
    """Pairwise Jaccard of top sets and Spearman of scores on their union, across seeds.

    Returns ``(pairs, summary)``: pairs has columns ``seed_a, seed_b, jaccard, spearman``
    (spearman NaN without ``scores_by_seed``), one row per pair of seeds in ascending order;
    summary has ``n_seeds``, ``n_pairs`` and the mean and min of each column over the pairs
    where it is defined (NaN where none is).
    """
    seeds = sorted(masks_by_seed)
    tops = {s: top_set(masks_by_seed[s]) for s in seeds}
    lookups = {s: _score_lookup(scores_by_seed[s]) for s in seeds} if scores_by_seed is not None else None
    rows = []
    for a, b in combinations(seeds, 2):
        rho = math.nan
        if lookups is not None:
            union = sorted(tops[a] | tops[b])
            rho = spearman([lookups[a].get(key, MISSING_SCORE) for key in union],
                           [lookups[b].get(key, MISSING_SCORE) for key in union])
        rows.append({"seed_a": a, "seed_b": b, "jaccard": jaccard(tops[a], tops[b]), "spearman": rho})
    pairs = pd.DataFrame(rows, columns=["seed_a", "seed_b", "jaccard", "spearman"])
    summary = {"n_seeds": len(seeds), "n_pairs": len(pairs)}
    for column in ("jaccard", "spearman"):  # undefined (NaN) pairs are skipped
        values = pairs[column].astype("float64")
        summary[f"{column}_mean"] = float(values.mean())
        summary[f"{column}_min"] = float(values.min())
    return pairs, summary


def metric_agreement(masks_by_metric: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Pairwise Jaccard of the top sets of several metrics (same seed, mode and k).

    One row per pair of metrics, in the order given, with columns ``metric_a, metric_b, jaccard``.
    """
    tops = {metric: top_set(mask) for metric, mask in masks_by_metric.items()}
    rows = [{"metric_a": a, "metric_b": b, "jaccard": jaccard(tops[a], tops[b])}
            for a, b in combinations(tops, 2)]
    return pd.DataFrame(rows, columns=["metric_a", "metric_b", "jaccard"])

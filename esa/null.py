"""A calibrated null for confirmation: what innocent weights of the same magnitude do when zeroed.

A PPL ratio of x1.3 means nothing without knowing what an ordinary weight of the same size
does. For a weight c of a tensor T with n entries, let p(e) be entry e's position among T's
entries sorted by |w| ascending (stable: equal |w| by lower flat index, Linear convention) and
h = ceil(band * n). Its *band* is

    B(c) = { e in T : |p(e) - p(c)| <= h } \\ K,

the entries within ``band`` of c in |w|-quantile, K being every weight confirm considers (each
metric's global top-N and the joint candidates, :mod:`esa.confirm`): an innocent weight is never a
candidate.

- Single weights: per tested tensor T, ``samples`` innocent weights, draw i matched to the i-th
  (cyclically) of T's tested weights by |w| descending, each drawn uniformly from that weight's
  band without the tensor's earlier draws, zeroed alone.
- Groups (:mod:`esa.joint`): per group that reaches the factor and holds no confirmed single super
  weight (one that does beats its null through that weight, which beat its own: no evaluation is
  spent there), ``samples`` innocent groups of the same size, member m replaced by a draw from
  B(m) (its own tensor; the structure, a shared column or row, is not matched: the band rarely
  holds another neuron's weights), zeroed jointly.

Draws use numpy's ``default_rng((seed, crc32(T)))`` per tensor and ``default_rng((seed, group))``
per group, so a rerun draws the same weights. Each draw is evaluated like the weight it stands
for (the same :class:`esa.damage.DamageMeter`, from its first changed layer). The null of a
tensor (of a group) is its draws' PPL ratios: ``null_max`` and ``null_p95`` (the inverted-CDF
95th percentile, one of the draws). A confirmation must beat both the factor and ``null_max``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .damage import DAMAGE_COLUMNS
from .errors import ESAError
from .targets import find_targets, target_parameter

SINGLE_NULL, GROUP_NULL = "single", "group"
# null.parquet: one row per draw (an innocent weight, or an innocent group), its damage zeroed
NULL_COLUMNS = ["kind", "tensor", "group", "sample", "tensors", "flat_indices", "weights", "quantiles",
                "matched_flat_indices", *DAMAGE_COLUMNS]
# the null's summary next to each factor (super_weights.parquet per tested tensor, groups.parquet per group)
NULL_SUMMARY_COLUMNS = ["null_n", "null_max", "null_p95"]
_NULL_DTYPES = {"group": "int64", "sample": "int64", **dict.fromkeys(DAMAGE_COLUMNS, "float64"), "finite": "bool"}


@dataclass(frozen=True)
class NullSettings:
    """Config ``confirm.innocent``: ``samples`` innocent draws per tested tensor and per group
    reaching the factor (0: no null), within ``band`` of the candidate in |w|-quantile,
    drawn with ``seed``."""

    samples: int = 8
    band: float = 0.001
    seed: int = 0


class MagnitudeBands:
    """Each tensor's entries ordered by |w| (module docstring), and the draws from a band."""

    def __init__(self, model: torch.nn.Module, excluded: pd.DataFrame, band: float):
        if not 0 < band <= 1:
            raise ESAError(f"confirm.innocent.band={band}: must be in (0, 1]")
        self.model, self.band = model, band
        self.excluded = {tensor: set(rows["flat_index"].astype(np.int64).tolist())
                         for tensor, rows in excluded.groupby("tensor", sort=False)}
        self._targets = {t.name: t for t in find_targets(model)}
        self._orders: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _order(self, tensor: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flat indices by |w| ascending, each flat index's position there, the weights)."""
        if tensor not in self._orders:
            target = self._targets.get(tensor)
            if target is None:
                raise ESAError(f"{tensor}: not a weight matrix of the model")
            matrix = target.matrix(target_parameter(self.model, target).detach())
            weights = matrix.reshape(-1).double().cpu().numpy()
            order = np.argsort(np.abs(weights), kind="stable")
            position = np.empty_like(order)
            position[order] = np.arange(len(order))
            self._orders[tensor] = order, position, weights
        return self._orders[tensor]

    def draw(self, tensor: str, around: int, rng: np.random.Generator, taken: set[int]) -> dict | None:
        """One entry of B(``around``) in ``tensor`` not in ``taken`` (flat indices), uniformly,
        as {flat_index, weight, quantile}; None when the band holds no such entry."""
        order, position, weights = self._order(tensor)
        n = len(order)
        half = math.ceil(self.band * n)
        centre = int(position[around])
        window = order[max(0, centre - half): centre + half + 1]
        blocked = self.excluded.get(tensor, set()) | taken
        free = window[~np.isin(window, np.fromiter(blocked, dtype=np.int64, count=len(blocked)))]
        if len(free) == 0:
            return None
        chosen = int(free[rng.integers(len(free))])
        return {"flat_index": chosen, "weight": float(weights[chosen]), "quantile": (position[chosen] + 0.5) / n}


def _tensor_rng(seed: int, tensor: str) -> np.random.Generator:
    return np.random.default_rng((seed, zlib.crc32(tensor.encode())))


def _row(kind: str, tensor: str, group: int, sample: int, drawn: list[tuple[str, dict]], matched: list[int],
         measured: dict) -> dict:
    return {"kind": kind, "tensor": tensor, "group": group, "sample": sample,
            "tensors": [t for t, _ in drawn], "flat_indices": [d["flat_index"] for _, d in drawn],
            "weights": [d["weight"] for _, d in drawn], "quantiles": [d["quantile"] for _, d in drawn],
            "matched_flat_indices": matched, **measured}


def single_null(tested: pd.DataFrame, bands: MagnitudeBands, settings: NullSettings,
                zeroed: Callable[[pd.DataFrame], dict]) -> list[dict]:
    """The innocent single weights of every tensor of ``tested`` (tensor, flat_index, weight:
    the weights zeroed alone), ``settings.samples`` per tensor (module docstring), each zeroed
    alone by ``zeroed(selection)`` -> DAMAGE_COLUMNS: rows of ``NULL_COLUMNS``."""
    rows = []
    for tensor, own in tested.groupby("tensor", sort=False):
        own = own.assign(size=own["weight"].abs()).sort_values("size", ascending=False, kind="stable")
        rng, taken = _tensor_rng(settings.seed, tensor), set()
        for sample in range(settings.samples):
            around = int(own["flat_index"].iloc[sample % len(own)])
            drawn = bands.draw(tensor, around, rng, taken)
            if drawn is None:
                break
            taken.add(drawn["flat_index"])
            measured = zeroed(pd.DataFrame({"tensor": [tensor], "flat_index": [drawn["flat_index"]]}))
            rows.append(_row(SINGLE_NULL, tensor, -1, sample, [(tensor, drawn)], [around], measured))
    return rows


def group_null(group: int, members: pd.DataFrame, bands: MagnitudeBands, settings: NullSettings,
               zeroed: Callable[[pd.DataFrame], dict]) -> list[dict]:
    """``settings.samples`` innocent groups standing for ``members`` (tensor, flat_index) of group
    number ``group``, member by member from its band, each zeroed jointly: rows of ``NULL_COLUMNS``."""
    rng, rows = np.random.default_rng((settings.seed, group)), []
    taken: dict[str, set[int]] = {}
    for sample in range(settings.samples):
        drawn = []
        for member in members.itertuples(index=False):
            found = bands.draw(member.tensor, int(member.flat_index), rng, taken.setdefault(member.tensor, set()))
            if found is None:
                return rows
            taken[member.tensor].add(found["flat_index"])
            drawn.append((member.tensor, found))
        measured = zeroed(pd.DataFrame({"tensor": [t for t, _ in drawn],
                                        "flat_index": [d["flat_index"] for _, d in drawn]}))
        rows.append(_row(GROUP_NULL, "", group, sample, drawn, members["flat_index"].astype(int).tolist(),
                         measured))
    return rows


def null_table(rows: list[dict]) -> pd.DataFrame:
    """The draws as null.parquet (``NULL_COLUMNS``)."""
    return pd.DataFrame(rows, columns=NULL_COLUMNS).astype(_NULL_DTYPES)


def null_summary(ratios) -> dict:
    """``NULL_SUMMARY_COLUMNS`` of a null's PPL ratios (an inf ratio counts; none: n 0, NaN)."""
    values = np.asarray(list(ratios), dtype=np.float64)
    if len(values) == 0:
        return {"null_n": 0, "null_max": np.nan, "null_p95": np.nan}
    return {"null_n": len(values), "null_max": float(values.max()),
            "null_p95": float(np.quantile(values, 0.95, method="inverted_cdf"))}


def beats_null(ratio: float, summary: dict) -> bool:
    """Above the null's max (no null drawn: nothing to beat)."""
    return summary["null_n"] == 0 or ratio > summary["null_max"]

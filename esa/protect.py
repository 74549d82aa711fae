"""Which weights quantization keeps in full precision: the protect conditions of the quantize phase.

Each condition names a set of target weights (columns ``tensor``, ``flat_index`` in the Linear
convention, plus ``row``, ``col``) that :mod:`esa.quantize` leaves untouched:

- ``none``: nothing protected.
- a metric at k: the metric's global top-k (``esa.selection.select_topk(candidates, table,
  "global", k)``: score descending, equal scores by the tensor's position in the tensor table,
  then by lower flat index); a k the candidates cannot rank exactly is refused.
- ``random_k`` at k: k of all N target weights drawn uniformly without replacement
  (``numpy.random.default_rng(seed).choice(N, k, replace=False)`` over the targets' weights laid
  end to end in table order, each at ``flat_index`` of its tensor): one condition per k,
  whatever the metrics.
- ``super_weights``: the confirmed super weights (``confirmed`` True in confirm's
  ``super_weights.parquet``), each once; none confirmed protects nothing.

A k of ``quantize.protect`` is a count (an integer >= 1) or a share of the N target weights,
``"p%"``, which protects ``ceil(p / 100 * N)`` weights (exact decimal arithmetic).

Torch-free: the export of a protect mask is a table step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pandas as pd

from .errors import ESAError
from .names import GLOBAL, PROTECT_METRIC, PROTECT_NONE, RANDOM_K, SUPER_WEIGHTS
from .selection import select_topk

PROTECTED_WEIGHT_COLUMNS = ["tensor", "flat_index", "row", "col"]  # a protected weight, in the Linear convention
# an exported protect mask (results/{model}/quantize/protect/{metric}_k{k}.parquet)
PROTECT_MASK_COLUMNS = [*PROTECTED_WEIGHT_COLUMNS, "score"]


@dataclass(frozen=True)
class Condition:
    """One protect condition: ``protect`` (none | metric | random_k | super_weights), the metric
    ("" unless ``protect`` is "metric"), k (0 for none; the count for super_weights) and the
    protected weights (tensor, flat_index, row, col), each once."""

    protect: str
    metric: str
    k: int
    weights: pd.DataFrame


def resolve_k(value: int | str, total: int) -> int:
    """A ``quantize.protect`` entry as a count of weights out of ``total`` (module docstring)."""
    if isinstance(value, str) and value.endswith("%"):
        try:
            share = Fraction(value[:-1])
        except ValueError:
            share = None
        if share is None or not 0 < share <= 100:
            raise ESAError(f"quantize.protect {value!r}: a share must be a number in (0, 100] followed by %")
        k = math.ceil(share * total / 100)
    elif isinstance(value, int) and not isinstance(value, bool):
        k = value
    else:
        raise ESAError(f"quantize.protect {value!r}: expected a count (integer >= 1) or a share like '0.1%'")
    if not 1 <= k <= total:
        raise ESAError(f"quantize.protect {value!r}: {k} weights is not between 1 and the {total} target weights")
    return k


def metric_top(candidates: pd.DataFrame, table: pd.DataFrame, k: int, what: str) -> pd.DataFrame:
    """The metric's global top-k (tensor, flat_index, row, col, score); ``what`` names where k
    came from when the candidates cannot rank it exactly."""
    try:
        top = select_topk(candidates, table, GLOBAL, k)
    except ESAError as err:
        raise ESAError(f"{what}: {err}") from None
    return top[PROTECT_MASK_COLUMNS]


def random_weights(table: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    """k of the table's weights drawn uniformly without replacement (module docstring), sorted
    by table position then flat index; columns tensor, flat_index, row, col."""
    numel = table["numel"].to_numpy(np.int64)
    ends = np.cumsum(numel)
    drawn = np.sort(np.random.default_rng(seed).choice(int(ends[-1]), size=k, replace=False))
    position = np.searchsorted(ends, drawn, side="right")
    flat = drawn - (ends - numel)[position]
    cols = table["cols"].to_numpy(np.int64)[position]
    return pd.DataFrame({"tensor": table["tensor"].to_numpy()[position], "flat_index": flat,
                         "row": flat // cols, "col": flat % cols}, columns=PROTECTED_WEIGHT_COLUMNS)


def protect_conditions(candidates: dict[str, pd.DataFrame], table: pd.DataFrame, protect: list,
                       seed: int, super_weights: pd.DataFrame) -> list[Condition]:
    """Every condition one quantization scheme is measured under, in this order: none; each
    metric of ``candidates`` (metric -> its candidates) at each k of ``protect``; random_k at
    each k; super_weights. ``table``: the tensor table of the targets (tensor, ..., rows, cols,
    numel, in target order); ``super_weights``: the distinct confirmed super weights (tensor,
    flat_index, row, col; ``esa.mechanism.confirmed_weights`` of confirm's table). Entries of
    ``protect`` that resolve to the same k count once."""
    total = int(table["numel"].sum())
    ks = {}
    for value in protect:
        ks.setdefault(resolve_k(value, total), value)
    ks = dict(sorted(ks.items()))
    conditions = [Condition(PROTECT_NONE, "", 0, pd.DataFrame(columns=PROTECTED_WEIGHT_COLUMNS))]
    for metric, frame in candidates.items():
        conditions += [Condition(PROTECT_METRIC, metric, k, metric_top(frame, table, k, f"quantize.protect {value!r}"))
                       for k, value in ks.items()]
    conditions += [Condition(RANDOM_K, "", k, random_weights(table, k, seed)) for k in ks]
    confirmed = super_weights[PROTECTED_WEIGHT_COLUMNS].reset_index(drop=True)
    return conditions + [Condition(SUPER_WEIGHTS, "", len(confirmed), confirmed)]


def mask_arrays(weights: pd.DataFrame, table: pd.DataFrame) -> dict[str, np.ndarray]:
    """One boolean (rows, cols) matrix (the Linear convention) per tensor of ``table`` that holds
    at least one of ``weights`` (tensor, flat_index), True at the protected entries."""
    shapes = table.set_index("tensor")[["rows", "cols"]]
    unknown = sorted(set(weights["tensor"]) - set(shapes.index))
    if unknown:
        raise ESAError(f"protected weights name tensors that are not targets: {unknown[:5]}")
    arrays = {}
    for tensor, rows in weights.groupby("tensor", sort=False):
        shape = tuple(int(n) for n in shapes.loc[tensor])
        mask = np.zeros(shape[0] * shape[1], dtype=bool)
        mask[rows["flat_index"].to_numpy(np.int64)] = True
        arrays[tensor] = mask.reshape(shape)
    return arrays

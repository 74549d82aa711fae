"""Distribution statistics of each target tensor's score: is the sensitivity heavy-tailed?

For the ``numel`` scores x_1..x_n (n = numel >= 1) of one tensor:

- ``sum``, ``max``, ``mean = sum / n`` (sums accumulated in float64).
- ``p50, p90, p99, p99_9, p99_99``: exact quantiles q = 0.5, 0.9, 0.99, 0.999, 0.9999 with
  linear interpolation between order statistics (numpy's default ``method="linear"``): with
  x_(0) <= ... <= x_(n-1) and h = (n - 1) q, Q(q) = x_(floor h) + (h - floor h) (x_(floor h + 1)
  - x_(floor h)). Computed from one sort on the tensor's device, because ``torch.quantile``
  refuses inputs over 16M elements (a Llama-8B MLP matrix has 58M).
- ``kurtosis``: excess kurtosis, Fisher's definition with population (biased) moments,
  m4 / m2^2 - 3 where m_r = mean((x - mean)^r); 0 for a normal distribution, large for a heavy
  tail (``scipy.stats.kurtosis(x)`` with its defaults). NaN when all scores are equal.
- ``top_share``: the share of the tensor's score mass held by its top 0.01%, i.e. the sum of
  its ``top_n = max(1, ceil(n * 1e-4))`` largest scores divided by ``sum``. NaN when sum = 0.
- ``zeros``: how many scores are exactly 0 (no log10; e.g. weights that never got a gradient).
- ``log10_hist``: counts of the positive scores in ``HIST_BINS`` bins of log10(score) with
  fixed edges ``hist_edges()`` = linspace(-12, 4, 65) (width 0.25); bin i holds
  10^e_i <= score < 10^e_(i+1) with the edges 10^e rounded to float32, and the first and last
  bins also hold everything below and above the range, so ``sum(log10_hist) + zeros = numel``.

Scores are >= 0 (every metric's score is an absolute value or a product of squares).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .errors import ESAError
from .names import TOP_DENOMINATOR, hist_edges

if TYPE_CHECKING:
    from .targets import Target

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p99_9": 0.999, "p99_99": 0.9999}
_CHUNK = 1 << 22  # elements per float64 step of the moment sums, to bound temporary memory


def _quantile(ordered: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile of an ascending 1-D tensor (see the module docstring)."""
    h = (ordered.numel() - 1) * q
    low = math.floor(h)
    high = min(low + 1, ordered.numel() - 1)
    below, above = float(ordered[low]), float(ordered[high])
    return below + (h - low) * (above - below)


def _sorted(flat: torch.Tensor) -> torch.Tensor:
    """``flat`` in ascending order, on its device. On CPU numpy's vectorised sort is ~3x
    faster than ``torch.sort`` (and these sorts are most of a scores job's statistics time)."""
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(flat.numpy()))
    return torch.sort(flat).values


def _excess_kurtosis(flat: torch.Tensor, mean: float) -> float:
    """m4 / m2^2 - 3 with population central moments, accumulated in float64 chunk by chunk."""
    m2 = m4 = 0.0
    for chunk in flat.split(_CHUNK):
        squared = (chunk.double() - mean).square()
        m2 += float(squared.sum())
        m4 += float(squared.square().sum())
    m2, m4 = m2 / flat.numel(), m4 / flat.numel()
    return m4 / m2**2 - 3.0 if m2 > 0 else math.nan


def tensor_stats(meta: Target, score: torch.Tensor) -> dict:
    """Statistics of one tensor's fp32 ``score`` (definitions: see the module docstring)."""
    n = score.numel()
    if n == 0 or n != meta.rows * meta.cols:
        raise ESAError(f"score of {meta.name} has {n} elements, expected "
                       f"{meta.rows} x {meta.cols} = {meta.rows * meta.cols}")
    flat = score.detach().reshape(-1)
    ordered = _sorted(flat)
    total = float(ordered.sum(dtype=torch.float64))
    top_n = max(1, -(-n // TOP_DENOMINATOR))
    top_mass = float(ordered[n - top_n:].sum(dtype=torch.float64))
    # The sorted scores give the histogram by binary search: count below each edge.
    edges = torch.tensor(10.0 ** hist_edges(), dtype=ordered.dtype, device=ordered.device)
    zeros = int(torch.searchsorted(ordered, torch.zeros_like(edges[:1]), right=True))
    below = torch.searchsorted(ordered, edges[1:-1]).cpu().numpy()
    cumulative = np.concatenate([[zeros], below, [n]])
    return {
        "tensor": meta.name, "layer": meta.layer, "module": meta.module, "expert": meta.expert,
        "rows": meta.rows, "cols": meta.cols, "numel": n,
        "sum": total, "max": float(ordered[-1]), "mean": total / n,
        **{name: _quantile(ordered, q) for name, q in QUANTILES.items()},
        "kurtosis": _excess_kurtosis(flat, total / n),
        "top_share": top_mass / total if total > 0 else math.nan,
        "top_n": top_n,
        "zeros": zeros,
        "log10_hist": np.diff(cumulative).astype(np.int64),
    }


def build_stats(targets: Sequence[Target], scores: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """One row of ``tensor_stats`` per target, in target order (``log10_hist`` a list column).

    Its first columns (``esa.names.TABLE_COLUMNS``: tensor, layer, module, expert, rows, cols,
    numel) are the tensor table that ``esa.selection`` takes; one row per expert of an expert
    stack gives each expert's score mass (``sum``).
    """
    frame = pd.DataFrame([tensor_stats(t, scores[t.name]) for t in targets])
    return frame.astype({"layer": np.int32, "expert": np.int32, "rows": np.int64, "cols": np.int64, "numel": np.int64,
                         "top_n": np.int64, "zeros": np.int64})

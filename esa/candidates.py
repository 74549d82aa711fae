"""Per-tensor candidates: the M highest- and M lowest-scoring entries of every target tensor.

A top-k over all targets (or over a layer) is exact when merged from per-tensor candidates:
the top-k of a pool holds at most k entries of any one tensor, and those are that tensor's
own top-k. So the scores step keeps, per tensor, its top-M and bottom-M entries (M at least
the largest k the study asks for), selected on the tensor's own device with ``torch.topk``
(never a Python loop over elements, never a sort of all weights), and the selection step
ranks the merged candidates (``esa.selection``).

Order within a tensor, both ends: ``end="top"`` ranks by score descending, ``end="bottom"``
by score ascending, and equal scores rank by the lower flat index (row-major,
``flat_index = row * cols + col``). ``rank_in_tensor`` is 0 for the highest (top) or lowest
(bottom) entry. If M >= numel, each end holds the whole tensor.

Columns: tensor, layer, module, expert (str/int32/str/int32, from the target), part (the
fused part of the row, e.g. "q" or "up", where the target is a fused projection of a known
layout; "" otherwise), row, col (int32), flat_index (int64), weight, stat, score (float32;
weight cast from the model dtype), rank_in_tensor (int64), end ("top" | "bottom").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .errors import ESAError
from .names import END_BOTTOM, END_TOP

if TYPE_CHECKING:
    from .targets import Target

CANDIDATE_COLUMNS = ["tensor", "layer", "module", "expert", "part", "row", "col", "flat_index", "weight", "stat",
                     "score", "rank_in_tensor", "end"]
LARGEST = {END_TOP: True, END_BOTTOM: False}  # end -> torch.topk(largest=...)
_CHUNK = 1 << 22  # elements per scan step when resolving ties, to bound temporary memory


def _lowest_equal(flat: torch.Tensor, value: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` lowest flat indices whose entry equals ``value`` (stops once it has them)."""
    found = []
    for start in range(0, flat.numel(), _CHUNK):
        hits = torch.nonzero(flat[start:start + _CHUNK] == value).flatten()[:count] + start
        found.append(hits)
        count -= hits.numel()
        if count == 0:
            break
    return torch.cat(found)


def extreme_indices(score: torch.Tensor, m: int, largest: bool) -> torch.Tensor:
    """Flat indices of the ``m`` highest (``largest``) or lowest entries, in rank order.

    Rank order is score descending (ascending if not ``largest``), then flat index ascending.
    ``torch.topk`` returns an arbitrary subset of the entries equal to the m-th value, so only
    the entries strictly beyond that value are taken from it (there are fewer than m, and topk
    must include all of them); the remaining places go to the lowest-index entries equal to it.
    Indices stay on ``score``'s device.
    """
    flat = score.reshape(-1)
    if m >= flat.numel():
        chosen = torch.arange(flat.numel(), device=flat.device)
    else:
        values, indices = torch.topk(flat, m, largest=largest, sorted=False)
        boundary = values.min() if largest else values.max()
        beyond = indices[values > boundary] if largest else indices[values < boundary]
        chosen = torch.cat([beyond, _lowest_equal(flat, boundary, m - beyond.numel())])
    chosen = torch.sort(chosen).values
    # A stable sort by score keeps equal scores in the index order just established.
    order = torch.sort(flat[chosen], descending=largest, stable=True).indices
    return chosen[order]


def _gather(tensor: torch.Tensor, indices: torch.Tensor) -> np.ndarray:
    """Entries of ``tensor`` at flat ``indices`` as float32, gathered on the tensor's device."""
    picked = tensor.detach().reshape(-1)[indices.to(tensor.device)]
    return picked.float().cpu().numpy()


def tensor_candidates(meta: Target, weight: torch.Tensor, stat: torch.Tensor, score: torch.Tensor,
                      m: int) -> pd.DataFrame:
    """The top-``m`` and bottom-``m`` rows of one target tensor (columns: see module docstring).

    ``weight`` may have any dtype; ``stat`` and ``score`` are the fp32 tensors of the scores
    step, all three of shape (rows, cols). A NaN score has no rank and is rejected.
    """
    if m < 1:
        raise ESAError(f"candidates per tensor M must be >= 1, got {m}")
    shape = (meta.rows, meta.cols)
    for label, tensor in (("weight", weight), ("stat", stat), ("score", score)):
        if tuple(tensor.shape) != shape:
            raise ESAError(f"{label} of {meta.name} has shape {tuple(tensor.shape)}, "
                           f"expected {shape}")
    if torch.isnan(score).any():
        raise ESAError(f"score of {meta.name} contains NaN")
    frames = []
    for end, largest in LARGEST.items():
        indices = extreme_indices(score, m, largest)
        flat = indices.cpu().numpy().astype(np.int64)
        frames.append(pd.DataFrame({
            "tensor": meta.name,
            "layer": np.full(flat.size, meta.layer, dtype=np.int32),
            "module": meta.module,
            "expert": np.full(flat.size, meta.expert, dtype=np.int32),
            "part": meta.fused.part(flat // meta.cols) if meta.fused else "",
            "row": (flat // meta.cols).astype(np.int32),
            "col": (flat % meta.cols).astype(np.int32),
            "flat_index": flat,
            "weight": _gather(weight, indices),
            "stat": _gather(stat, indices),
            "score": _gather(score, indices),
            "rank_in_tensor": np.arange(flat.size, dtype=np.int64),
            "end": end,
        }))
    return pd.concat(frames, ignore_index=True)


def build_candidates(targets: Sequence[Target], weights: Mapping[str, torch.Tensor],
                     stats: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor],
                     m: int) -> pd.DataFrame:
    """Candidates of every target, in target order; tensors are looked up by ``Target.name``."""
    frames = [tensor_candidates(t, weights[t.name], stats[t.name], scores[t.name], m)
              for t in targets]
    return pd.concat(frames, ignore_index=True)

"""Selecting the top-k weights per mode, and the matched controls the perturbation compares.

Inputs: the candidates of the scores step (``esa.candidates``: each tensor's top-M and
bottom-M entries) and the tensor table (one row per target, in target order: tensor, layer,
module, expert, rows, cols, numel; ``esa.targets.target_table`` or the first columns of
``stats.parquet``).

Modes, each ranking a pool of weights and keeping its k highest scores:

- ``global``: one pool, every target.
- ``per_layer``: one pool per decoder layer, all targets of the layer together. Targets outside
  the decoder layers (layer -1: embeddings, lm_head) form one more pool of their own.
- ``per_tensor``: one pool per target tensor.

Order within a pool: score descending, then the tensor's position in the tensor table, then
flat index ascending, so equal scores go to the lower flat index and the result is
deterministic. ``rank`` is the 0-based position in the pool. Exactness: the top-k of a pool is
read from the candidates, which hold it as long as every tensor either has all its entries
there or M >= k; otherwise selection refuses (re-score with more candidates).

Controls, for the same mode and k: ``bottom_k`` takes the k lowest scores of each pool (the
mirror order: score ascending, then table position, then flat index); ``random_k`` draws, per
tensor, as many weights as the top set has there, uniformly without replacement from the
tensor's other weights (seeded).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import ESAError
from .names import (CONTROLS, END_BOTTOM, END_TOP, GLOBAL, MODES, PER_LAYER, PER_TENSOR,
                    RANDOM_K, TOP)

SELECTED_COLUMNS = ["tensor", "layer", "module", "expert", "part", "row", "col", "flat_index", "weight", "stat",
                    "score", "rank"]
TOPK_MASK_COLUMNS = ["set", "tensor", "layer", "module", "expert", "row", "col", "flat_index", "score"]


def _pools(table: pd.DataFrame, mode: str) -> pd.Series:
    """The pool of each tensor (indexed by tensor name), for ``mode``."""
    if mode not in MODES:
        raise ESAError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    key = {GLOBAL: pd.Series("all", index=table.index), PER_LAYER: table["layer"],
           PER_TENSOR: table["tensor"]}[mode]
    return pd.Series(key.to_numpy(), index=table["tensor"].to_numpy())


def _check_k(candidates: pd.DataFrame, table: pd.DataFrame, pools: pd.Series, mode: str,
             k: int) -> None:
    """Refuse a k the pools cannot supply, or that the candidates cannot rank exactly."""
    if k < 1:
        raise ESAError(f"k must be >= 1, got {k}")
    numel = table.set_index("tensor")["numel"]
    pool_size = numel.groupby(pools, sort=False).sum()
    if k > pool_size.min():
        group = pool_size.idxmin()
        raise ESAError(f"k={k} is larger than {mode} pool {group!r}, which has "
                       f"{pool_size.min()} weights")
    kept = candidates.groupby("tensor").size().reindex(numel.index)
    partial = kept[kept < numel]
    if len(partial) and k > partial.min():
        raise ESAError(f"k={k} is more than the {partial.min()} candidates kept per tensor "
                       f"(e.g. {partial.idxmin()}): candidates M must be >= k; re-score with "
                       f"a larger M")


def _check_tensors(frame: pd.DataFrame, table: pd.DataFrame, what: str, every: bool) -> None:
    """``frame`` may only name tensors of the table and, if ``every``, must name all of them."""
    unknown = sorted(set(frame["tensor"]) - set(table["tensor"]))
    if unknown:
        raise ESAError(f"{what} has tensors missing from the tensor table: {unknown[:5]}")
    missing = sorted(set(table["tensor"]) - set(frame["tensor"])) if every else []
    if missing:
        raise ESAError(f"{what} lacks tensors of the tensor table: {missing[:5]}")


def _select(candidates: pd.DataFrame, tensor_table: pd.DataFrame, mode: str, k: int,
            end: str) -> pd.DataFrame:
    """The k best entries of each pool from the candidates of ``end`` ("top" or "bottom")."""
    pools = _pools(tensor_table, mode)
    _check_tensors(candidates, tensor_table, "candidates", every=True)
    ranked = candidates[candidates["end"] == end]
    _check_k(ranked, tensor_table, pools, mode, k)
    position = {name: i for i, name in enumerate(tensor_table["tensor"])}
    pool_position = {pool: i for i, pool in enumerate(pd.unique(pools.to_numpy()))}
    ranked = ranked.assign(_position=ranked["tensor"].map(position).to_numpy(),
                           _pool=ranked["tensor"].map(pools).to_numpy())
    ranked = ranked.sort_values(["score", "_position", "flat_index"],
                                ascending=[end == END_BOTTOM, True, True], kind="stable")
    ranked["rank"] = ranked.groupby("_pool", sort=False).cumcount().astype(np.int64)
    chosen = ranked[ranked["rank"] < k]
    chosen = chosen.assign(_pool_position=chosen["_pool"].map(pool_position).to_numpy())
    chosen = chosen.sort_values(["_pool_position", "rank"], kind="stable")
    return chosen[SELECTED_COLUMNS].reset_index(drop=True)


def select_topk(candidates: pd.DataFrame, tensor_table: pd.DataFrame, mode: str,
                k: int) -> pd.DataFrame:
    """The k highest scores of each pool of ``mode``, pool by pool in table order, then by rank.

    Raises :class:`ESAError` for an unknown mode, k larger than a pool, or k above the candidates
    kept per tensor (M).
    """
    return _select(candidates, tensor_table, mode, k, END_TOP)


def select_bottomk(candidates: pd.DataFrame, tensor_table: pd.DataFrame, mode: str,
                   k: int) -> pd.DataFrame:
    """The k lowest scores of each pool of ``mode`` (the mirror of ``select_topk``)."""
    return _select(candidates, tensor_table, mode, k, END_BOTTOM)


def random_control(top: pd.DataFrame, tensor_table: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Per tensor, as many uniformly drawn weights as ``top`` has there, none of them in ``top``.

    One ``numpy.random.default_rng(seed)`` draws for the tensors in table order. For a tensor
    with n top weights it draws min(numel, 2n) distinct flat indices in random order, drops
    those in the top set (at most n) and keeps the first n left: a uniform sample without
    replacement from the other weights, without permuting a 58M-element tensor. Rows are
    sorted by flat index within each tensor; columns tensor, layer, module, expert, row, col,
    flat_index.
    """
    _check_tensors(top, tensor_table, "top set", every=False)
    rng = np.random.default_rng(seed)
    in_top = dict(tuple(top.groupby("tensor", sort=False)["flat_index"]))
    frames = []
    for target in tensor_table.itertuples(index=False):
        excluded = in_top.get(target.tensor)
        if excluded is None:
            continue
        n = len(excluded)
        if target.numel - n < n:
            raise ESAError(f"random_k needs {n} weights of {target.tensor} outside its top set, "
                           f"which leaves only {target.numel - n} of {target.numel}")
        draw = rng.choice(target.numel, size=min(target.numel, 2 * n), replace=False)
        flat = np.sort(draw[~np.isin(draw, excluded.to_numpy())][:n]).astype(np.int64)
        frames.append(pd.DataFrame({
            "tensor": target.tensor,
            "layer": np.full(n, target.layer, dtype=np.int32),
            "module": target.module,
            "expert": np.full(n, target.expert, dtype=np.int32),
            "row": (flat // target.cols).astype(np.int32),
            "col": (flat % target.cols).astype(np.int32),
            "flat_index": flat,
        }))
    return pd.concat(frames, ignore_index=True)


def build_mask(candidates: pd.DataFrame, tensor_table: pd.DataFrame, mode: str, k: int,
               seed: int, controls: tuple[str, ...] | list[str] = CONTROLS) -> pd.DataFrame:
    """The top set of ``mode`` and k and the requested controls, one row per selected weight.

    Columns: set ("top" | "random_k" | "bottom_k"), tensor, layer, module, expert, row, col,
    flat_index, score (float32; NaN for random_k, whose scores the candidates do not hold).
    """
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ESAError(f"unknown control(s) {unknown}; allowed: {', '.join(CONTROLS)}")
    top = select_topk(candidates, tensor_table, mode, k)
    sets = {TOP: top}
    for control in controls:
        if control == RANDOM_K:
            sets[control] = random_control(top, tensor_table, seed).assign(score=np.float32("nan"))
        else:
            sets[control] = select_bottomk(candidates, tensor_table, mode, k)
    mask = pd.concat([frame.assign(set=name) for name, frame in sets.items()], ignore_index=True)
    return mask[TOPK_MASK_COLUMNS].astype({"layer": np.int32, "expert": np.int32, "row": np.int32, "col": np.int32,
                                      "flat_index": np.int64, "score": np.float32})

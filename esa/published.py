"""Known super weights: where ESA ranks the coordinates published for a public model.

The shipped table ``esa/tables/published_super_weights.csv`` lists super weights published for
public models (one row per weight: ``model`` the hub id, ``layer``, ``tensor`` the parameter
name in transformers, ``row``, ``col`` in the Linear [out, in] convention, ``source`` the
citation); ``published.extra_table`` adds rows with the same columns (unpublished or private
models, tests). A study model matches the rows of its ``published_as`` (config) or, without
one, of its source when that is a hub id; hub ids compare case-insensitively, as the hub
resolves them.

Each matched weight w gets, per scored metric, its rank in that metric's global ordering
(:mod:`esa.selection`'s ``global`` mode: score descending, then the tensor's position in the
tensor table, then flat index; rank 0 = the highest score), computed from the metric's
candidates (each tensor's top-M, :mod:`esa.candidates`) and tensor table:

    rank(w) = #{candidates x : key(x) < key(w)},   key = (-score, table position, flat index).

That count is the exact rank when w is a candidate and no tensor with weights left out (M <
numel) has all M of its candidates ahead of w: every left-out weight of a tensor comes after
its M-th candidate. Otherwise it is a lower bound (status ``at_least``); a weight outside its
tensor's top-M comes after that tensor's M-th candidate, so its bound is one more than the
M-th candidate's count. A tensor the metric did not score gives ``not_scored``.

Whether confirm tested the weight (zeroed alone, ``esa.confirm``), confirmed it and its PPL
factor come from ``super_weights.parquet``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .config import study_models
from .errors import ESAError
from .names import END_TOP, RANK_AT_LEAST, RANK_EXACT, RANK_NOT_SCORED
from .sources import is_hub_id

SHIPPED_TABLE = Path(__file__).resolve().parent / "tables" / "published_super_weights.csv"
PUBLISHED_COLUMNS = ["model", "layer", "tensor", "row", "col", "source"]
COORDINATE = ["tensor", "row", "col"]
# matches.parquet: one row per (published coordinate, metric)
MATCH_COLUMNS = [*PUBLISHED_COLUMNS, "metric", "status", "rank", "candidate", "score", "kept", "flat_index",
                 "tested", "confirmed", "ppl_ratio"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


@functools.cache
def _read_table(path: str) -> pd.DataFrame:
    """One published table, checked: the columns, integer coordinates >= 0, a layer that the
    tensor name carries, a non-empty source."""
    if not Path(path).is_file():
        raise ESAError(f"published table {path!r} does not exist")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as err:
        raise ESAError(f"published table {path!r} is not a CSV: {err}") from None
    if list(table.columns) != PUBLISHED_COLUMNS:
        raise ESAError(f"published table {path!r} has columns {list(table.columns)}; "
                       f"expected {', '.join(PUBLISHED_COLUMNS)}")
    for column in ("layer", "row", "col"):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() | (values < 0) | (values % 1 != 0)
        if bad.any():
            raise ESAError(f"published table {path!r} line {int(bad.idxmax()) + 2}: {column} "
                           f"{table[column][bad.idxmax()]!r} is not an integer >= 0")
        table[column] = values.astype(np.int64)
    for i, row in enumerate(table.itertuples(index=False), start=2):
        if not row.model.strip() or not row.source.strip():
            raise ESAError(f"published table {path!r} line {i}: model and source must not be empty")
        if not re.search(rf"\.{row.layer}\.", row.tensor):
            raise ESAError(f"published table {path!r} line {i}: tensor {row.tensor!r} is not in layer {row.layer}")
    return table


def load_table(extra_table: str | None = None) -> pd.DataFrame:
    """The shipped table, then the rows of ``extra_table`` (same columns); a coordinate listed
    twice for one model is an error."""
    tables = [_read_table(str(SHIPPED_TABLE))] + ([_read_table(str(extra_table))] if extra_table else [])
    table = pd.concat(tables, ignore_index=True)
    key = table["model"].str.lower().to_frame().join(table[COORDINATE])
    repeated = table[key.duplicated()]
    if len(repeated):
        first = repeated.iloc[0]
        raise ESAError(f"published coordinate {first.tensor}[{first.row}, {first.col}] of {first.model} "
                       f"is listed twice (shipped table and published.extra_table)")
    return table


def hub_id(source: str) -> str | None:
    """The hub id a model source names (``owner/name`` that is no local path, as
    :func:`esa.sources.is_hub_id` tells them apart), else None."""
    return source if is_hub_id(source) and _HUB_ID.match(source) else None


def published_id(model: Mapping) -> str | None:
    """The id a study model (a ``model``/``models[]`` entry) is published as: its
    ``published_as``, else its source when that is a hub id."""
    return model.get("published_as") or hub_id(model["source"])


def coordinates_of(config: Mapping, name: str) -> list[dict]:
    """The published rows (``PUBLISHED_COLUMNS``, plain Python values) of the study model
    ``name``; none when its id is unknown or unlisted."""
    wanted = published_id({m["name"]: m for m in study_models(config)}[name])
    if wanted is None:
        return []
    table = load_table(config["published"]["extra_table"])
    matched = table[table["model"].str.lower() == wanted.lower()]
    return [{c: (int(v) if isinstance(v, np.integer) else v) for c, v in row.items()}
            for row in matched.to_dict("records")]


def global_ranks(candidates: pd.DataFrame, tensor_table: pd.DataFrame, weights: pd.DataFrame) -> pd.DataFrame:
    """Rank of each weight of ``weights`` (tensor, row, col) in the global ordering of one
    metric (see the module docstring), one row per weight, in order: ``status`` (exact |
    at_least | not_scored), ``rank`` (the exact rank or its lower bound; -1 when not scored),
    ``candidate`` (among its tensor's kept candidates), ``score`` (NaN unless a candidate),
    ``kept`` (candidates kept of its tensor), ``flat_index`` (row * cols + col; -1 when not
    scored).

    A coordinate outside its tensor's shape is an :class:`ESAError` (the published id names
    another model).
    """
    top = candidates[candidates["end"] == END_TOP]
    table = tensor_table.set_index("tensor")
    position = pd.Series(np.arange(len(table)), index=table.index)
    score = top["score"].to_numpy(np.float64)
    pos = top["tensor"].map(position).to_numpy(np.int64)
    flat = top["flat_index"].to_numpy(np.int64)
    kept = top.groupby("tensor").size().reindex(table.index, fill_value=0)
    # each tensor with weights left out: its last (M-th) candidate, the key of everything left out
    last = top.loc[top.groupby("tensor")["rank_in_tensor"].idxmax()].set_index("tensor")
    last = last[kept.reindex(last.index) < table["numel"].reindex(last.index)]
    lasts = (last["score"].to_numpy(np.float64), last.index.map(position).to_numpy(np.int64),
             last["flat_index"].to_numpy(np.int64))

    def ahead(key, score_, pos_, flat_):
        """Which of the entries (score_, pos_, flat_) come before ``key`` in the global order."""
        s, p, f = key
        return (score_ > s) | ((score_ == s) & ((pos_ < p) | ((pos_ == p) & (flat_ < f))))

    rows = []
    for weight in weights.itertuples(index=False):
        if weight.tensor not in table.index:
            rows.append((RANK_NOT_SCORED, -1, False, np.nan, 0, -1))
            continue
        shape = table.loc[weight.tensor, ["rows", "cols"]]
        if not (weight.row < shape["rows"] and weight.col < shape["cols"]):
            raise ESAError(f"published coordinate {weight.tensor}[{weight.row}, {weight.col}] is outside the "
                           f"tensor's shape [{shape['rows']}, {shape['cols']}]: published_as names another model?")
        index = int(weight.row * shape["cols"] + weight.col)
        hit = top[(top["tensor"] == weight.tensor).to_numpy() & (flat == index)]
        n_kept = int(kept[weight.tensor])
        if len(hit):
            key = (float(hit["score"].iloc[0]), int(position[weight.tensor]), index)
            exact = not ahead(key, *lasts).any()
            rows.append((RANK_EXACT if exact else RANK_AT_LEAST, int(ahead(key, score, pos, flat).sum()), True,
                         key[0], n_kept, index))
        else:
            if weight.tensor not in last.index:
                raise ESAError(f"{weight.tensor} has all its weights among the candidates but not "
                               f"flat index {index}: damaged candidates")
            m = last.loc[weight.tensor]
            key = (float(m["score"]), int(position[weight.tensor]), int(m["flat_index"]))
            rows.append((RANK_AT_LEAST, int(ahead(key, score, pos, flat).sum()) + 1, False, np.nan, n_kept, index))
    frame = pd.DataFrame(rows, columns=["status", "rank", "candidate", "score", "kept", "flat_index"])
    return frame.astype({"rank": np.int64, "candidate": bool, "score": np.float64, "kept": np.int64,
                         "flat_index": np.int64})


def match_published(coordinates: pd.DataFrame, candidates: Mapping[str, pd.DataFrame],
                    tensor_tables: Mapping[str, pd.DataFrame], super_weights: pd.DataFrame) -> pd.DataFrame:
    """One row per (published coordinate, metric), columns ``MATCH_COLUMNS``: the coordinate's
    published row, its :func:`global_ranks` under the metric (metrics in the order of
    ``candidates``) and, from confirm's ``super_weights`` (``esa.confirm.SUPER_WEIGHT_COLUMNS``),
    whether it was ``tested`` (zeroed alone), ``confirmed`` and its ``ppl_ratio`` (NaN untested).
    """
    tested = super_weights.drop_duplicates(["tensor", "flat_index"]).set_index(["tensor", "flat_index"])
    frames = []
    for metric in candidates:
        ranks = global_ranks(candidates[metric], tensor_tables[metric], coordinates)
        outcome = tested.reindex(pd.MultiIndex.from_arrays([coordinates["tensor"], ranks["flat_index"]]))
        frames.append(pd.concat([coordinates[PUBLISHED_COLUMNS].reset_index(drop=True), ranks], axis=1).assign(
            metric=metric, tested=outcome["confirmed"].notna().to_numpy(),
            confirmed=outcome["confirmed"].astype("boolean").fillna(False).to_numpy(bool),
            ppl_ratio=outcome["ppl_ratio"].to_numpy(np.float64)))
    if not frames:
        return pd.DataFrame(columns=MATCH_COLUMNS)
    return pd.concat(frames, ignore_index=True)[MATCH_COLUMNS]

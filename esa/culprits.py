"""Culprits of a destructive set: which of its weights, alone or together, do the damage.

A set S of n weights (a top-k set) is *destructive* when its perturbation (``zero`` or
``sign_flip``: each weight gets the same new value in every group that holds it) gives

    ppl_ratio = PPL(S perturbed) / PPL(baseline) >= factor        (factor = confirm.factor)

as measured by :class:`esa.damage.DamageMeter`. When confirm's single weights do not explain a
destructive set, :func:`find_culprits` looks for the weights that do by adaptive binary
splitting (adaptive group testing):

1. Order S by (layer, tensor, col, flat_index), so that the weights of one *neuron* (an input
   column of one matrix: one intermediate neuron of an MLP output projection) are consecutive,
   and evaluate it whole; a set that is not destructive is reported and not searched.
2. A destructive group G of at most ``min_group`` weights is a culprit (one weight: a culprit
   weight). A larger one is split in two at the neuron boundary nearest its middle (the first
   ceil(|G|/2) weights and the rest where G is one neuron: then inside it), so a neuron's
   weights stay in one branch until the search reaches that neuron (super weights that act
   together often share one, :mod:`esa.joint`); each half is perturbed alone and evaluated;
   the search recurses into the destructive halves.
3. A destructive group neither of whose halves is destructive is a *minimal destructive
   group*: the damage needs weights of both halves together (an interaction).
4. The most destructive group still unresolved is split next (best first: largest
   ppl_ratio, equal ratios by the lower group id), so a budget that runs out is spent on the
   groups that do the most damage. A split costs two evaluations; when fewer than two of the
   ``budget`` are left, every destructive group not yet resolved is reported as such
   (``budget``).

Cost: if the damage comes from d culprits acting independently (a group is destructive
exactly when it holds one of them), the groups split are the nodes on the d paths from S down
to each culprit. Halving reaches one weight after ceil(log2 n) splits, so at most
d * ceil(log2 n) groups are split and

    evaluations <= 1 + 2 * d * ceil(log2 n)

(fewer where the paths share their first splits), against n evaluations for zeroing each
weight alone. The search trusts that damage does not cancel: a culprit inside a half that other
weights of that half make harmless is not found, since only destructive halves are searched.

Interactions: a minimal destructive group holds weights that are harmless alone but
destructive together, e.g. two weights that each carry the same signal (redundant copies of a
massive activation): perturbing either leaves the other to do the work. It is the smallest
group of the halving tree holding them, so it may also hold innocent weights; the search does
not test subsets across its halves.

Halves are layer-contiguous and a later half starts at a later (or the same) layer, so an
evaluation runs only the decoder layers from its group's first changed layer on
(:func:`esa.perturb.first_changed_layer_of`, :mod:`esa.replay`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from .damage import DAMAGE_COLUMNS, DamageMeter
from .errors import ESAError
from .names import CULPRIT_BUDGET, CULPRIT_GROUP, CULPRIT_PERTURBATIONS, CULPRIT_WEIGHT
from .perturb import first_changed_layer_of, perturbed
from .replay import first_changed_layer

ORDER = ["layer", "tensor", "col", "flat_index"]
# group ids number the halving tree: the whole set is 1, the halves of group g are 2g and 2g + 1
ROOT = 1
# search.parquet: one row per evaluation, in order; parent 0 = none (the whole set)
SEARCH_COLUMNS = ["step", "group", "parent", "depth", "size", "start_layer", "first", "last",
                  *DAMAGE_COLUMNS, "destructive"]
# culprits.parquet: one row per culprit weight, culprit group or group left unresolved; the
# weight's tensor..flat_index for a single weight (null for a group), first/last member for all
CULPRIT_COLUMNS = ["kind", "interaction", "group", "depth", "size", "tensor", "layer", "module", "row", "col",
                   "flat_index", "first", "last", *DAMAGE_COLUMNS]
_WEIGHT_DTYPES = {"layer": "Int64", "row": "Int64", "col": "Int64", "flat_index": "Int64"}


@dataclass(frozen=True)
class CulpritSearch:
    """What :func:`find_culprits` found, and every evaluation it made on the way."""

    weights: pd.DataFrame  # the set, in search order (ORDER)
    culprits: pd.DataFrame  # CULPRIT_COLUMNS; empty when the set is not destructive
    search: pd.DataFrame  # SEARCH_COLUMNS, row i = evaluation i; row 0 = the whole set
    budget: int

    @property
    def n_weights(self) -> int:
        return len(self.weights)

    @property
    def destructive(self) -> bool:
        return bool(self.search["destructive"].iloc[0])

    @property
    def evaluations(self) -> int:
        return len(self.search)


def weight_name(row) -> str:
    """``tensor[row, col]``: one weight as the report names it."""
    return f"{row.tensor}[{row.row}, {row.col}]"


def _split(neurons: list, lo: int, hi: int) -> int:
    """Where group [lo, hi) splits (at least 2 weights): the boundary between two neurons
    (``neurons[i]``: weight i's (tensor, col)) nearest ceil of the middle, the earlier of two
    as near; the middle itself when the group is one neuron."""
    middle = lo + math.ceil((hi - lo) / 2)
    boundaries = [i for i in range(lo + 1, hi) if neurons[i] != neurons[i - 1]]
    return min(boundaries, key=lambda i: (abs(i - middle), i)) if boundaries else middle


def search_layers(model: torch.nn.Module, selection: pd.DataFrame) -> set[int]:
    """Every first changed layer a group of ``selection`` can have: a group's is its lowest
    tensor's (:func:`esa.replay.first_changed_layer`), so these are the ``start_layers`` of the
    :class:`esa.damage.DamageMeter` that :func:`find_culprits` measures with."""
    return {first_changed_layer(model, tensor) for tensor in selection["tensor"].unique()}


def find_culprits(model: torch.nn.Module, selection: pd.DataFrame, meter: DamageMeter, kind: str,
                  scale: float, factor: float, budget: int, min_group: int = 1,
                  show_progress: bool = False) -> CulpritSearch:
    """Search ``selection`` (tensor, layer, module, row, col, flat_index; one row per weight)
    for the weights whose perturbation ``kind`` (zero or sign_flip, with ``scale``) makes it
    destructive (``ppl_ratio >= factor``), spending at most ``budget`` evaluations of
    ``meter`` (built on the unmodified model, with :func:`search_layers` of ``selection``).

    The algorithm, its cost and what an interaction means: the module docstring. Each group is
    perturbed with :func:`esa.perturb.perturbed` (restored bit-exactly) and measured from its
    first changed layer.
    """
    if kind not in CULPRIT_PERTURBATIONS:
        raise ESAError(f"a culprit search perturbs with {kind!r}; allowed: {', '.join(CULPRIT_PERTURBATIONS)}")
    if budget < 1:
        raise ESAError(f"budget {budget}: at least 1 evaluation (the whole set) is needed")
    if min_group < 1:
        raise ESAError(f"min_group {min_group}: a group holds at least 1 weight")
    weights = selection.sort_values(ORDER, kind="stable", ignore_index=True)
    if weights.duplicated(["tensor", "flat_index"]).any() or weights.empty:
        raise ESAError("a culprit search needs a non-empty set of distinct weights")
    names = [weight_name(row) for row in weights.itertuples(index=False)]
    neurons = list(zip(weights["tensor"], weights["col"]))
    search: list[dict] = []
    progress = tqdm(total=budget, desc=f"culprits of {len(weights)} weights", disable=not show_progress)

    def evaluate(group: int, depth: int, lo: int, hi: int) -> dict:
        rows = weights.iloc[lo:hi]
        start = first_changed_layer_of(model, rows)
        with perturbed(model, rows, kind, scale):
            measured = meter.measure(start)
        record = {"step": len(search), "group": group, "parent": group // 2, "depth": depth, "size": hi - lo,
                  "start_layer": start, "first": names[lo], "last": names[hi - 1], **measured,
                  "destructive": measured["ppl_ratio"] >= factor}
        search.append(record)
        progress.update()
        return record

    whole = evaluate(ROOT, 0, 0, len(weights))
    culprits: list[dict] = []

    def report(record: dict, lo: int, what: str, interaction: bool = False) -> None:
        single = what == CULPRIT_WEIGHT
        weight = weights.iloc[lo] if single else None
        culprits.append({"kind": what, "interaction": interaction,
                         **{key: record[key] for key in ("group", "depth", "size", "first", "last")},
                         **{key: weight[key] if single else None
                            for key in ("tensor", "layer", "module", "row", "col", "flat_index")},
                         **{key: record[key] for key in DAMAGE_COLUMNS}})

    # most destructive first: (-ppl_ratio, group, lo, hi) of the destructive groups still to resolve
    pending = [(-whole["ppl_ratio"], ROOT, 0, len(weights))] if whole["destructive"] else []
    records = {ROOT: whole}
    while pending:
        _, group, lo, hi = heapq.heappop(pending)
        record = records[group]
        if hi - lo <= min_group:
            report(record, lo, CULPRIT_WEIGHT if hi - lo == 1 else CULPRIT_GROUP)
            continue
        if budget - len(search) < 2:
            report(record, lo, CULPRIT_BUDGET)
            continue
        mid = _split(neurons, lo, hi)
        halves = [(evaluate(2 * record["group"] + i, record["depth"] + 1, a, b), a, b)
                  for i, (a, b) in enumerate(((lo, mid), (mid, hi)))]
        destructive = [half for half in halves if half[0]["destructive"]]
        if not destructive:
            report(record, lo, CULPRIT_GROUP, interaction=True)
        for half, a, b in destructive:
            records[half["group"]] = half
            heapq.heappush(pending, (-half["ppl_ratio"], half["group"], a, b))
    progress.close()
    return CulpritSearch(weights, pd.DataFrame(culprits, columns=CULPRIT_COLUMNS).astype(_WEIGHT_DTYPES),
                         pd.DataFrame(search, columns=SEARCH_COLUMNS), budget)


def culprit_summary(result: CulpritSearch, super_weights: pd.DataFrame) -> dict:
    """summary.json of a search: the set's size and damage, the evaluations spent, the
    culprits found by kind, and confirm's confirmed super weights (``super_weights``: confirm's
    super_weights.parquet) that lie in the set, and which of them are culprit weights."""
    whole = result.search.head(1).to_dict("records")[0]  # Python scalars, as JSON takes them
    confirmed = super_weights[super_weights["confirmed"]].drop_duplicates(["tensor", "flat_index"])
    named = {weight_name(row): (row.tensor, row.flat_index) for row in confirmed.itertuples(index=False)}
    in_set = set(zip(result.weights["tensor"], result.weights["flat_index"]))
    kinds = result.culprits["kind"].value_counts()
    culprit_weights = set(result.culprits.loc[result.culprits["kind"] == CULPRIT_WEIGHT, "first"])
    in_set_names = [name for name, key in named.items() if key in in_set]
    return {"n_weights": result.n_weights, "destructive": result.destructive,
            "set_ppl_ratio": whole["ppl_ratio"],
            "set_damage": {key: whole[key] for key in DAMAGE_COLUMNS},
            "evaluations": result.evaluations, "budget": result.budget,
            "culprit_weights": int(kinds.get(CULPRIT_WEIGHT, 0)), "culprit_groups": int(kinds.get(CULPRIT_GROUP, 0)),
            "unresolved_groups": int(kinds.get(CULPRIT_BUDGET, 0)),
            "super_weights_in_set": in_set_names,
            "super_weights_found": [name for name in in_set_names if name in culprit_weights]}

"""Super-weight confirmation: zero each of the metrics' highest-scoring weights alone.

A *super weight* (Yu et al. 2024) is a single scalar whose removal alone destroys the model.
Each metric's global top-N is :mod:`esa.selection`'s ``global`` top-k with k = N (score
descending across all tensors, equal scores by the tensor's position in the tensor table,
then by lower flat index), which refuses an N its candidates cannot rank exactly. Every weight
in the union of the metrics' top-N is zeroed on its own, once (``esa.perturb.perturbed``, kind
``zero``, restored bit-exactly), the model is evaluated on the fixed evaluation windows and

    ppl_ratio = PPL(w <- 0) / PPL(baseline),   confirmed = ppl_ratio >= factor.

Super weights sit where a massive activation (one input channel of an early ``mlp.down_proj``
spiking far above the rest) meets a large weight; :func:`activation_trace` records, for every
decoder layer's down_proj, the largest |input| and |output| with its channel, window,
position and token.

With ``null`` (``samples`` > 0), each tested tensor also gets magnitude-matched innocent
weights zeroed the same way (:mod:`esa.null`), and a weight is confirmed only when its ratio
beats the factor and the largest ratio of its tensor's innocent weights:

    confirmed = ppl_ratio >= factor and ppl_ratio > null_max.

Each ablation is measured by :class:`esa.damage.DamageMeter` (PPL, its bootstrap interval
against the baseline, KL from and top-1 agreement with the unmodified model), running only the
decoder layers from the weight's own on (:mod:`esa.replay`): ``ppl_after`` is bit-identical to
evaluating the whole model.

A *super expert* is the mixture-of-experts analogue: one expert whose removal alone destroys
the model. :func:`confirm_super_experts` ranks the experts by score mass (an expert's
matrices summed) and zeroes each of every metric's top-N whole, one at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import pandas as pd
import torch

from .architecture import is_expert_stack, split_expert
from .damage import Baseline, Bootstrap, DamageMeter, damage_columns
from .errors import ESAError
from .evaluation import DEFAULT_CHUNK, Evaluation, batches, evaluate
from .joint import JointSettings, no_groups, structural_groups, take_apart
from .null import (NULL_SUMMARY_COLUMNS, MagnitudeBands, NullSettings, beats_null, group_null, null_summary,
                   null_table, single_null)
from .names import GLOBAL, ZERO
from .perturb import first_changed_layer_of, perturbed, zeroed_damage
from .replay import first_changed_layer
from .activation_trace import massive_activation_trace, traced
from .selection import select_topk

# each ablation's damage (esa.damage): PPL after, its ratio to before, the bootstrap interval of
# PPL after - before, the mean KL from and the top-1 agreement with the unmodified model
ABLATION_DAMAGE_COLUMNS = ["ppl_before", "ppl_after", "ppl_ratio", "delta_ppl_lo", "delta_ppl_hi", "kl", "top1"]
# a weight's ablation also keeps its loss (log PPL, exact), from which a later step rebuilds the
# whole measurement of that edit (ablation_damage) instead of evaluating it again
ABLATION_COLUMNS = ["tensor", "layer", "module", "expert", "part", "row", "col", "flat_index", "weight", "score",
                    *ABLATION_DAMAGE_COLUMNS, "loss_after", *NULL_SUMMARY_COLUMNS, "confirmed"]
WEIGHT_KEY = ["tensor", "flat_index"]
# super_weights.parquet: one row per (metric, rank), the weight's key first
SUPER_WEIGHT_COLUMNS = ["metric", "rank", *WEIGHT_KEY, *(c for c in ABLATION_COLUMNS if c not in WEIGHT_KEY)]
EXPERT_KEY = ["layer", "stack", "expert"]
_STACK = re.compile(r"^(.*experts)(?:\.\d+)?\..*$")  # a matrix's name -> its expert stack's
# super_experts.parquet: one row per (metric, rank), the expert's key first
SUPER_EXPERT_COLUMNS = ["metric", "rank", *EXPERT_KEY, "score_mass", *ABLATION_DAMAGE_COLUMNS, "confirmed"]
_EXPERT_DTYPES = {"rank": "int64", "layer": "int32", "expert": "int32", "score_mass": "float64",
                  **dict.fromkeys(ABLATION_DAMAGE_COLUMNS, "float64"), "confirmed": "bool"}


@dataclass(frozen=True)
class Confirmation:
    """The ablation table, the massive-activation trace and the unmodified model's evaluation."""

    super_weights: pd.DataFrame  # one row per weight tested (ABLATION_COLUMNS) or per (metric, rank)
    activations: pd.DataFrame  # esa.activation_trace.TRACE_COLUMNS
    rerun: Evaluation  # evaluated after every ablation was undone
    groups: pd.DataFrame  # esa.joint.GROUP_COLUMNS (no rows when no groups were asked for)
    group_members: pd.DataFrame  # esa.joint.MEMBER_COLUMNS
    null: pd.DataFrame  # esa.null.NULL_COLUMNS (no rows without a null)


def global_top(candidates: pd.DataFrame, tensor_table: pd.DataFrame, top_n: int) -> pd.DataFrame:
    """The ``top_n`` highest scores over every tensor of ``tensor_table``, ``rank`` 0..top_n-1:
    ``esa.selection.select_topk(candidates, tensor_table, "global", top_n)``.

    A ``top_n`` the candidates cannot rank exactly (above the M kept per tensor, or above the
    weights there are) is an :class:`ESAError` naming it.
    """
    try:
        return select_topk(candidates, tensor_table, GLOBAL, top_n)
    except ESAError as err:
        raise ESAError(f"confirm.top_n={top_n}: {err}") from None


def confirm_super_weights(model: torch.nn.Module, candidates: Mapping[str, pd.DataFrame],
                          tensor_tables: Mapping[str, pd.DataFrame], eval_windows: torch.Tensor,
                          batch_size: int, baseline: Baseline, top_n: int = 10, factor: float = 1.5,
                          chunk_size: int = DEFAULT_CHUNK, bootstrap: Bootstrap = Bootstrap(),
                          joint: JointSettings | None = None, null: NullSettings | None = None) -> Confirmation:
    """Zero each weight of every metric's global top-``top_n`` alone, once, and measure the PPL;
    with ``joint`` (``top_n`` > 0), the structural groups of every metric's global
    top-``joint.top_n`` zeroed jointly and taken apart (:mod:`esa.joint`), on the same meter;
    with ``null`` (``samples`` > 0), the calibrated null of every tested tensor and of every
    group reaching the factor without a confirmed member (:mod:`esa.null`; innocent weights are
    none of these candidates).

    ``candidates`` and ``tensor_tables``: metric -> its candidates and tensor table (the first
    columns of its stats.parquet). Each metric's :func:`global_top`, stacked in the order of
    ``candidates``, gives the rows; a weight in several metrics' top-N is zeroed once (as
    :func:`zero_each`, in first-seen order) and its row, ``score`` included, is that of the
    metric listed first. ``super_weights`` has one row per (metric, rank), columns
    ``SUPER_WEIGHT_COLUMNS`` (``rank`` int64, 0 = the metric's highest score).
    """
    tops = pd.concat([global_top(candidates[metric], tensor_tables[metric], top_n).assign(metric=metric)
                      for metric in candidates], ignore_index=True)
    take_groups, group_layers, pool = None, set(), tops.iloc[:0]
    if joint is not None and joint.top_n > 0:
        try:
            pool = pd.concat([global_top(candidates[metric], tensor_tables[metric], joint.top_n)
                              for metric in candidates], ignore_index=True).drop_duplicates(WEIGHT_KEY)
        except ESAError as err:
            raise ESAError(f"confirm.joint.top_n={joint.top_n}: {err}") from None
        group_layers = {first_changed_layer(model, tensor) for tensor in pool["tensor"].unique()}

        def take_groups(meter: DamageMeter, trace: pd.DataFrame, singles: pd.DataFrame, innocents):
            recorded = singles.set_index(WEIGHT_KEY)

            def single(tensor: str, flat_index: int) -> dict | None:
                key = (tensor, flat_index)
                return ablation_damage(recorded.loc[key], baseline) if key in recorded.index else None

            groups = structural_groups(model, pool, trace, joint.massive_fraction)
            return take_apart(model, groups, meter, factor, joint.max_members, single, innocents)

    considered = pd.concat([tops[WEIGHT_KEY], pool[WEIGHT_KEY]], ignore_index=True).drop_duplicates()
    result = zero_each(model, tops.drop_duplicates(WEIGHT_KEY), eval_windows, batch_size, baseline,
                       factor, chunk_size, bootstrap, group_layers, take_groups, null, considered)
    table = tops[["metric", "rank", *WEIGHT_KEY]].merge(result.super_weights, on=WEIGHT_KEY)
    return replace(result, super_weights=table[SUPER_WEIGHT_COLUMNS])


def _ablation(measured: dict, before: float, factor: float) -> dict:
    """The ``ABLATION_DAMAGE_COLUMNS`` and ``confirmed`` (against the factor alone) of one
    ablation's :mod:`esa.damage` numbers; a non-finite loss gives ``ppl_after = inf`` and
    reaches any factor."""
    return {"ppl_before": before, "loss_after": measured["loss"], "ppl_after": measured["ppl"],
            "ppl_ratio": measured["ppl_ratio"],
            "delta_ppl_lo": measured["delta_ppl_lo"], "delta_ppl_hi": measured["delta_ppl_hi"],
            "kl": measured["kl"], "top1": measured["top1"], "confirmed": measured["ppl_ratio"] >= factor}


def ablation_damage(ablation, baseline: Baseline) -> dict:
    """The ``esa.damage.DAMAGE_COLUMNS`` of one recorded weight ablation (a row of
    super_weights.parquet, ``ABLATION_COLUMNS``) against ``baseline``: the bits its measurement gave,
    as a step that makes the same edit on the same windows would measure them. A finite loss
    is a finite NLL in every window (the loss is their sum over the tokens)."""
    return damage_columns(ablation.loss_after, ablation.ppl_after, ablation.delta_ppl_lo, ablation.delta_ppl_hi,
                          ablation.kl, ablation.top1, math.isfinite(ablation.loss_after), baseline)


def zero_each(model: torch.nn.Module, weights: pd.DataFrame, eval_windows: torch.Tensor,
              batch_size: int, baseline: Baseline, factor: float = 1.5,
              chunk_size: int = DEFAULT_CHUNK, bootstrap: Bootstrap = Bootstrap(),
              group_layers: set[int] = frozenset(), take_groups=None, null: NullSettings | None = None,
              considered: pd.DataFrame | None = None) -> Confirmation:
    """Zero each row of ``weights`` (tensor, layer, module, row, col, flat_index, weight,
    score) alone and measure the damage (:mod:`esa.damage`) it does; with ``null`` (``samples``
    > 0) draw each tensor's innocent weights (:func:`esa.null.single_null`; never one of
    ``considered``, tensor and flat_index, default ``weights``) and confirm against their max
    too; then, given ``take_groups(meter, trace, table, innocents)`` (the joint groups' two
    tables, :mod:`esa.joint`; ``innocents(group, members)`` the group's null summary, or None
    without a null), that on the same meter, which also keeps the inputs of ``group_layers``.

    The unmodified model runs first as the :class:`esa.damage.DamageMeter`'s reference (which
    keeps the candidate layers' inputs: each ablation runs from the first layer it changes,
    :mod:`esa.replay`), traced (the massive activations: :func:`esa.activation_trace.traced`),
    and last as the rerun, after every weight is restored. The table has one row per row of ``weights``, in their
    order, columns ``ABLATION_COLUMNS``; ``ppl_before`` is the baseline's PPL.
    """
    starts = [first_changed_layer(model, tensor) for tensor in weights["tensor"]]
    with traced(model) as activations:
        meter = DamageMeter(model, eval_windows, batch_size, baseline, chunk_size, set(starts) | group_layers,
                            bootstrap)
    trace = activations.frame()
    rows = []
    for i, start in enumerate(starts):
        with perturbed(model, weights.iloc[i:i + 1], ZERO):
            rows.append(_ablation(meter.measure(start), baseline.ppl, factor))
    table = pd.concat([weights[["tensor", "layer", "module", "expert", "part", "row", "col", "flat_index", "weight",
                                "score"]].reset_index(drop=True),
                       pd.DataFrame(rows, columns=[*ABLATION_DAMAGE_COLUMNS, "loss_after", "confirmed"])], axis=1)

    table, drawn, groups, members = _null_and_groups(model, meter, trace, table, null,
                                                     weights[WEIGHT_KEY] if considered is None else considered,
                                                     take_groups)
    del meter  # up to one hidden state of every window per layer: free it before the rerun
    rerun = evaluate(model, eval_windows, batch_size, chunk_size=chunk_size)
    return Confirmation(table[ABLATION_COLUMNS], trace, rerun, groups, members, null_table(drawn))


def _null_and_groups(model: torch.nn.Module, meter: DamageMeter, trace: pd.DataFrame, table: pd.DataFrame,
                     null: NullSettings | None, considered: pd.DataFrame, take_groups):
    """:func:`zero_each`'s null (``NULL_SUMMARY_COLUMNS`` added to ``table`` and ``confirmed``
    tested against them) and groups: ``(table, null draws, groups, members)``."""
    zeroed = partial(zeroed_damage, meter)
    drawn, innocents = [], None
    if null is not None and null.samples > 0:
        bands = MagnitudeBands(model, considered, null.band)
        drawn = single_null(table, bands, null, zeroed)

        def innocents(group: int, members: pd.DataFrame) -> dict:
            if any(confirmed.get(key, False) for key in members[WEIGHT_KEY].itertuples(index=False, name=None)):
                return null_summary([])  # it beats its null through that weight, which beat its own
            rows = group_null(group, members, bands, null, zeroed)
            drawn.extend(rows)
            return null_summary(row["ppl_ratio"] for row in rows)

    summaries = {tensor: null_summary(row["ppl_ratio"] for row in drawn if row["tensor"] == tensor)
                 for tensor in table["tensor"].unique()}
    table = pd.concat([table, pd.DataFrame([summaries[t] for t in table["tensor"]], index=table.index,
                                           columns=NULL_SUMMARY_COLUMNS).astype({"null_n": "int64"})], axis=1)
    table["confirmed"] = [bool(row.confirmed) and beats_null(row.ppl_ratio, summaries[row.tensor])
                          for row in table.itertuples(index=False)]
    confirmed = dict(zip(table[WEIGHT_KEY].itertuples(index=False, name=None), table["confirmed"]))
    groups, members = take_groups(meter, trace, table, innocents) if take_groups else no_groups()
    return table, drawn, groups, members


def expert_mass(stats: pd.DataFrame) -> pd.DataFrame:
    """The experts of one metric's stats.parquet ranked by score mass: one row per expert (a
    ``(layer, stack, expert)``, ``stack`` the expert stack's module path inside the layer, e.g.
    ``mlp.experts``), ``score_mass`` = the sum of ``sum`` over its matrices' rows (its
    ``gate_up_proj[e]`` and ``down_proj[e]``, or the matrices of a ``ModuleList``'s expert e),
    ``path`` = the stack's qualified module name.

    Highest mass first; equal masses keep the order of the experts' first rows in ``stats``
    (model order). No expert rows (a dense model): an empty frame.
    """
    rows = stats[stats["expert"] >= 0]

    def stack(name: str) -> str:  # "mlp.experts.down_proj" and "mlp.experts.3.down_proj" -> "mlp.experts"
        return _STACK.sub(r"\1", name)

    keyed = pd.DataFrame({"layer": rows["layer"], "stack": rows["module"].map(stack),
                          "expert": rows["expert"],
                          "path": rows["tensor"].map(lambda tensor: stack(split_expert(tensor)[0])),
                          "score_mass": rows["sum"].astype("float64")})
    mass = keyed.groupby([*EXPERT_KEY, "path"], sort=False)["score_mass"].sum().reset_index()
    return mass.sort_values("score_mass", ascending=False, kind="stable", ignore_index=True)


def expert_selection(model: torch.nn.Module, path: str, expert: int) -> pd.DataFrame:
    """Every entry of expert ``expert`` of the expert stack ``path``, as a selection for
    :func:`esa.perturb.perturbed` (columns tensor, flat_index): the ``expert``-th block of each
    of the stack's own parameters with one block per expert (``gate_up_proj``, ``down_proj``
    and, in families that have them, the experts' biases), or every parameter of module
    ``expert`` of a ``ModuleList`` of experts."""
    stack = model.get_submodule(path)
    if isinstance(stack, torch.nn.ModuleList):
        return pd.concat([pd.DataFrame({"tensor": f"{path}.{expert}.{name}", "flat_index": np.arange(p.numel())})
                          for name, p in stack[expert].named_parameters()], ignore_index=True)
    if not is_expert_stack(stack):
        raise ESAError(f"{path} is not an expert stack (no 3-D down_proj parameter, not a ModuleList)")
    count = stack.down_proj.shape[0]
    parts = []
    for name, param in stack.named_parameters(recurse=False):
        if param.ndim >= 2 and param.shape[0] == count:
            size = param[0].numel()
            parts.append(pd.DataFrame({"tensor": f"{path}.{name}",
                                       "flat_index": np.arange(expert * size, (expert + 1) * size)}))
    return pd.concat(parts, ignore_index=True)


def confirm_super_experts(model: torch.nn.Module, stats: Mapping[str, pd.DataFrame], eval_windows: torch.Tensor,
                          batch_size: int, baseline: Baseline, top_n: int = 10, factor: float = 1.5,
                          chunk_size: int = DEFAULT_CHUNK, bootstrap: Bootstrap = Bootstrap()) -> pd.DataFrame:
    """Zero each of every metric's ``top_n`` experts by score mass whole, alone, once, and
    measure the PPL.

    ``stats``: metric -> its stats.parquet (tensor, layer, module, expert, ..., sum). An
    expert is one ``(layer, stack, expert)``; its score mass is the sum of ``sum`` over its
    matrices (:func:`expert_mass`), and each metric's top-``top_n`` are its ``top_n`` largest
    masses (all its experts when it has fewer). Every expert in the union is ablated once, in
    first-seen order (metrics in the order of ``stats``): every entry of its matrices (and
    biases, where the family has them; :func:`expert_selection`) is zeroed together with
    ``esa.perturb.perturbed`` (restored and verified bit-exactly), the whole model is evaluated
    on ``eval_windows`` and

        ppl_ratio = PPL(expert <- 0) / PPL(baseline),   confirmed = ppl_ratio >= factor,

    ``ppl_before`` being the baseline's PPL, with the rest of :mod:`esa.damage`'s numbers
    (``ABLATION_DAMAGE_COLUMNS``); each expert's evaluation runs from its layer
    (:mod:`esa.replay`). A non-finite loss gives ``ppl_after = inf`` and counts as confirmed.
    Zeroing an expert's matrices makes its output 0 wherever the router sends a token; the
    router still sends them, so the expert's share of the routing weight is lost rather than
    handed to the others.

    Returns one row per (metric, rank), ``rank`` 0 = the metric's largest mass, columns
    ``SUPER_EXPERT_COLUMNS`` (``score_mass`` the metric's own); a dense model (no expert
    rows) gives an empty frame with those columns. Zeroing an expert holds an int64 index and
    a copy of each of its entries until restored.
    """
    tops = pd.concat([expert_mass(stats[metric]).head(top_n).assign(
        metric=metric, rank=lambda top: np.arange(len(top))) for metric in stats], ignore_index=True)
    tested = tops.drop_duplicates(EXPERT_KEY)[[*EXPERT_KEY, "path"]]
    selections = [expert_selection(model, expert.path, expert.expert) for expert in tested.itertuples(index=False)]
    starts = [first_changed_layer_of(model, selection) for selection in selections]
    rows = []
    if selections:
        meter = DamageMeter(model, eval_windows, batch_size, baseline, chunk_size, set(starts), bootstrap)
        for selection, start in zip(selections, starts):
            with perturbed(model, selection, ZERO):
                rows.append(_ablation(meter.measure(start), baseline.ppl, factor))
    tested = pd.concat([tested[EXPERT_KEY].reset_index(drop=True),
                        pd.DataFrame(rows, columns=[*ABLATION_DAMAGE_COLUMNS, "confirmed"]).drop(columns="confirmed")],
                       axis=1)
    table = tops.drop(columns="path").merge(tested, on=EXPERT_KEY).assign(
        confirmed=lambda frame: frame["ppl_ratio"] >= factor)
    return table[SUPER_EXPERT_COLUMNS].astype(_EXPERT_DTYPES)


def activation_trace(model: torch.nn.Module, windows: torch.Tensor, batch_size: int,
                     chunk_size: int = DEFAULT_CHUNK) -> pd.DataFrame:
    """Max |input| and |output| of every decoder layer's ``mlp.down_proj`` over ``windows``
    (the massive-activation trace; see :func:`esa.activation_trace.massive_activation_trace`)."""
    return massive_activation_trace(model, list(batches(windows, batch_size)), chunk_size)

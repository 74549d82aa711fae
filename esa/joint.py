"""Super weights that act together: structural groups of confirm's candidates, zeroed jointly.

Most published super weights act together (replications of Yu et al. 2024, arXiv:2411.07191:
Phi-3-mini's six coordinates x1.00-1.02 each and x374-671 jointly; Llama-3-8B's three share
down_proj input column 2427, harmless alone). Zeroing one weight at a time (:mod:`esa.confirm`)
misses them. Among the weights confirm considers for this (each metric's global
top-``joint.top_n``, the ``candidates``), a *group* is two or more candidates of MLP output
projections (:func:`esa.architecture.mlp_output_projections`: down_proj, fc2, c_proj, an
expert's down_proj; one matrix each) that share

- ``neuron``: an input column j of one projection (one intermediate neuron writing into several
  residual channels);
- ``channel``: an output row r of one projection (one residual channel fed by several neurons);
- ``massive_channel``: an output row r, across the projections of two or more layers, where r
  carries a massive activation: its peak |output| in confirm's trace (:mod:`esa.activation_trace`)
  is at least ``massive_fraction`` of the largest of any layer's.

Groups with the same members are one (the first kind in that order). Each is zeroed jointly,
one evaluation from its first layer (:class:`esa.damage.DamageMeter`, replay as everywhere).
A group is *destructive* when ``ppl_ratio >= factor`` and, with a calibrated null
(:mod:`esa.null`: innocent groups of the same size and magnitudes, drawn for each group that
reaches the factor and holds no confirmed single super weight), ``ppl_ratio > null_max``. A
destructive group of at most ``max_members`` members is taken apart:

- *single*: each member zeroed alone (confirm's own measurement where the member is one of the
  weights it zeroed alone, :func:`esa.confirm.ablation_damage`);
- *leave-one-out*: all members but one zeroed, for each member (of a pair: the other alone);
- *minimal subset*: starting from the whole group, members are dropped one at a time, the one
  whose leave-one-out set keeps the most damage first, each drop kept only when the rest stays
  at or above the factor (the first drop is its leave-one-out evaluation): what is left reaches
  the factor and, at the time each member was tried, was needed.

With delta = loss - loss_baseline (log-PPL) of an edit, the group's label:

- ``single``: a member alone reaches the factor;
- ``joint``: no member alone is, and delta_group > sum of the members' deltas: together they do
  more than the sum of their parts (the field's joint super weights);
- ``additive``: no member alone is, and delta_group <= that sum: each contributes a share;
- ``not_destructive``: the group zeroed is below the factor or within its null;
  ``not_taken_apart``: destructive,
  with more than ``max_members`` members (only its joint numbers).

``synergy`` = delta_group / sum of the members' deltas, of a group taken apart: above 1 the
members do more together than apart, whatever the label (a single super weight can sit in a
group that is far worse than it alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .architecture import is_expert_stack, mlp_output_projections, split_expert
from .damage import DAMAGE_COLUMNS, DamageMeter
from .null import NULL_SUMMARY_COLUMNS, beats_null, null_summary
from .perturb import zeroed_damage

NEURON, CHANNEL, MASSIVE_CHANNEL = "neuron", "channel", "massive_channel"
GROUP_KINDS = (NEURON, CHANNEL, MASSIVE_CHANNEL)
SINGLE, JOINT, ADDITIVE, NOT_DESTRUCTIVE, NOT_TAKEN_APART = (
    "single", "joint", "additive", "not_destructive", "not_taken_apart")
MEMBER_KEY = ["tensor", "flat_index"]
# groups.parquet: one row per group; tensor "" for a massive channel across projections
GROUP_COLUMNS = ["group", "kind", "tensor", "layer", "index", "n_members", "tensors", "flat_indices",
                 *DAMAGE_COLUMNS, *NULL_SUMMARY_COLUMNS, "destructive", "label", "synergy", "n_minimal",
                 "minimal_tensors", "minimal_flat_indices", "minimal_loss", "minimal_ppl", "minimal_ppl_ratio",
                 "evaluations"]
# group_members.parquet: one row per (group, member), each member's edits' PPL ratio and loss
MEMBER_COLUMNS = ["group", "tensor", "flat_index", "layer", "row", "col", "weight", "single_ppl_ratio",
                  "single_loss", "left_out_ppl_ratio", "left_out_loss", "minimal"]
_GROUP_DTYPES = {"group": "int64", "layer": "int64", "index": "int64", "n_members": "int64",
                 **dict.fromkeys(DAMAGE_COLUMNS, "float64"), "finite": "bool", "null_n": "int64",
                 "null_max": "float64", "null_p95": "float64", "destructive": "bool",
                 "synergy": "float64", "n_minimal": "int64", "evaluations": "int64",
                 **dict.fromkeys(["minimal_loss", "minimal_ppl", "minimal_ppl_ratio"], "float64")}
_MEMBER_DTYPES = {"group": "int64", "flat_index": "int64", "layer": "int64", "row": "int64", "col": "int64",
                  "weight": "float64", "single_ppl_ratio": "float64", "single_loss": "float64",
                  "left_out_ppl_ratio": "float64", "left_out_loss": "float64", "minimal": "bool"}


@dataclass(frozen=True)
class JointSettings:
    """Config ``confirm.joint``: each metric's global top-``top_n`` are the candidates (0: no
    groups), groups of up to ``max_members`` are taken apart, ``massive_fraction`` of the
    trace's largest output makes a channel massive."""

    top_n: int = 20
    max_members: int = 8
    massive_fraction: float = 0.5


@dataclass(frozen=True)
class Group:
    """One structural group: its kind, the projection's tensor ("" across projections), the
    shared column, row or channel, and its members (candidate rows: tensor, flat_index, layer,
    row, col, weight)."""

    kind: str
    tensor: str
    index: int
    members: pd.DataFrame


def _projection_tensors(model: torch.nn.Module, tensors) -> set[str]:
    """The tensors (keys as in the candidates) among ``tensors`` that are MLP output projections."""
    params = {id(module.down_proj if is_expert_stack(module) else module.weight): is_expert_stack(module)
              for _, _, module in mlp_output_projections(model)}
    found = set()
    for tensor in tensors:
        name, expert = split_expert(tensor)
        stacked = params.get(id(model.get_parameter(name)))
        if stacked is not None and stacked == (expert >= 0):
            found.add(tensor)
    return found


def massive_channels(trace: pd.DataFrame, massive_fraction: float) -> list[int]:
    """The residual channels whose peak |output| of an MLP output projection in ``trace``
    reaches ``massive_fraction`` of the largest, largest first."""
    outputs = trace[trace["side"] == "output"]
    if outputs.empty:
        return []
    peaks = outputs.groupby("channel")["value"].max().sort_values(ascending=False, kind="stable")
    return [int(c) for c, value in peaks.items() if value >= massive_fraction * peaks.iloc[0]]


def structural_groups(model: torch.nn.Module, candidates: pd.DataFrame, trace: pd.DataFrame,
                      massive_fraction: float) -> list[Group]:
    """The groups of the module docstring among ``candidates`` (one row per weight: tensor,
    flat_index, layer, row, col, weight), in kind order, then by (layer, tensor, index)."""
    weights = candidates.drop_duplicates(MEMBER_KEY)
    weights = weights[weights["tensor"].isin(_projection_tensors(model, weights["tensor"].unique()))]
    weights = weights.sort_values(["layer", "tensor", "flat_index"], kind="stable")
    found, seen = [], set()

    def add(kind: str, tensor: str, index: int, members: pd.DataFrame) -> None:
        key = frozenset(members[MEMBER_KEY].itertuples(index=False, name=None))
        if len(members) >= 2 and key not in seen:
            seen.add(key)
            found.append(Group(kind, tensor, int(index), members.reset_index(drop=True)))

    for kind, axis in ((NEURON, "col"), (CHANNEL, "row")):
        for (tensor, index), members in weights.groupby(["tensor", axis], sort=False):
            add(kind, tensor, index, members)
    for channel in massive_channels(trace, massive_fraction):
        members = weights[weights["row"] == channel]
        if members["tensor"].nunique() >= 2:
            add(MASSIVE_CHANNEL, "", channel, members)
    order = {kind: i for i, kind in enumerate(GROUP_KINDS)}
    return sorted(found, key=lambda g: (order[g.kind], int(g.members["layer"].min()), g.tensor, g.index))


def _tables(group_rows: list[dict], member_rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (pd.DataFrame(group_rows, columns=GROUP_COLUMNS).astype(_GROUP_DTYPES),
            pd.DataFrame(member_rows, columns=MEMBER_COLUMNS).astype(_MEMBER_DTYPES))


def no_groups() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two tables with no group: their columns and dtypes."""
    return _tables([], [])


def _destructive(measured: dict, factor: float) -> bool:
    """PPL ratio at least ``factor``; a non-finite loss (inf PPL) counts."""
    return not measured["finite"] or measured["ppl_ratio"] >= factor


def _delta(measured: dict, baseline_loss: float) -> float:
    return measured["loss"] - baseline_loss if measured["finite"] else math.inf


def group_label(whole: dict, singles: list[dict], factor: float, baseline_loss: float) -> str:
    """``single``, ``joint`` or ``additive`` (module docstring) of a destructive group, from its
    joint damage and each member's alone (DAMAGE_COLUMNS)."""
    if any(_destructive(s, factor) for s in singles):
        return SINGLE
    if _delta(whole, baseline_loss) > sum(_delta(s, baseline_loss) for s in singles):
        return JOINT
    return ADDITIVE


def take_apart(model: torch.nn.Module, groups: list[Group], meter: DamageMeter, factor: float, max_members: int,
               singles: Callable[[str, int], dict | None],
               innocents: Callable[[int, pd.DataFrame], dict] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Zero each group jointly and take each destructive one apart (module docstring):
    ``(groups table GROUP_COLUMNS, members table MEMBER_COLUMNS)``. ``singles(tensor,
    flat_index)``: a member's recorded damage zeroed alone (DAMAGE_COLUMNS), or None to
    measure it; ``innocents(group, members)``: the null summary (``esa.null.null_summary``) of
    a group reaching the factor, None for no null. Every edit is undone bit-exactly."""
    group_rows, member_rows = [], []
    for number, group in enumerate(groups):
        members = group.members
        evaluations = 0

        def zeroed(rows: pd.DataFrame) -> dict:
            nonlocal evaluations
            evaluations += 1
            return zeroed_damage(meter, rows[MEMBER_KEY])

        whole = zeroed(members)
        reaches = _destructive(whole, factor)
        nulled = innocents(number, members[MEMBER_KEY]) if innocents and reaches else null_summary([])
        destructive = reaches and beats_null(whole["ppl_ratio"], nulled)
        n = len(members)
        single, left_out, minimal = [None] * n, [None] * n, list(range(n))
        minimal_measured, synergy = whole, np.nan
        if not destructive:
            label = NOT_DESTRUCTIVE
        elif n > max_members:
            label = NOT_TAKEN_APART
        else:
            for i, member in enumerate(members.itertuples(index=False)):
                single[i] = singles(member.tensor, int(member.flat_index)) or zeroed(members.iloc[[i]])
            for i in range(n):  # a pair's leave-one-out is the other member alone
                left_out[i] = single[1 - i] if n == 2 else zeroed(members.drop(index=i))
            # drop first the member whose absence keeps the most damage (inf loss: the most)
            order = sorted(range(n), key=lambda i: -_delta(left_out[i], 0.0))
            for i in order:
                if len(minimal) == 1:
                    break
                rest = [j for j in minimal if j != i]
                measured = left_out[i] if len(minimal) == n else zeroed(members.iloc[rest])
                if _destructive(measured, factor):
                    minimal, minimal_measured = rest, measured
            label = group_label(whole, single, factor, meter.baseline.loss)
            apart = sum(_delta(s, meter.baseline.loss) for s in single)
            synergy = _delta(whole, meter.baseline.loss) / apart if 0 < apart < math.inf else np.nan
        kept = members.iloc[minimal] if label in (SINGLE, JOINT, ADDITIVE) else members.iloc[[]]
        group_rows.append({
            "group": number, "kind": group.kind, "tensor": group.tensor, "layer": int(members["layer"].min()),
            "index": group.index, "n_members": n, "tensors": members["tensor"].tolist(),
            "flat_indices": members["flat_index"].astype(np.int64).tolist(), **whole, **nulled,
            "destructive": destructive, "label": label, "synergy": synergy, "n_minimal": len(kept),
            "minimal_tensors": kept["tensor"].tolist(),
            "minimal_flat_indices": kept["flat_index"].astype(np.int64).tolist(),
            **{f"minimal_{column}": minimal_measured[column] if len(kept) else np.nan
               for column in ("loss", "ppl", "ppl_ratio")},
            "evaluations": evaluations})
        for i, member in enumerate(members.itertuples(index=False)):
            member_rows.append({
                "group": number, "tensor": member.tensor, "flat_index": member.flat_index, "layer": member.layer,
                "row": member.row, "col": member.col, "weight": member.weight,
                "single_ppl_ratio": single[i]["ppl_ratio"] if single[i] else np.nan,
                "single_loss": single[i]["loss"] if single[i] else np.nan,
                "left_out_ppl_ratio": left_out[i]["ppl_ratio"] if left_out[i] else np.nan,
                "left_out_loss": left_out[i]["loss"] if left_out[i] else np.nan,
                "minimal": len(kept) > 0 and i in minimal})
    return _tables(group_rows, member_rows)

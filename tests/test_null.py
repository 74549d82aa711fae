"""The calibrated null (esa.null) on the tiny planted Llamas: innocent weights are never candidates,
sit in their candidate's |w|-quantile band, are the same on a rerun, and a confirmation (single
or joint) must beat the largest of them as well as the factor."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_bit_identical, snapshot, unigram_text
from test_confirm import DOWN, INTERMEDIATE, _planted_model
from test_joint import _confirmed_with_groups, _joint_planted_model, _weights

from esa.candidates import build_candidates
from esa.confirm import global_top
from esa.damage import Baseline, DamageMeter
from esa.errors import ESAError
from esa.evaluation import evaluate
from esa.joint import JOINT, NOT_DESTRUCTIVE, JointSettings, structural_groups, take_apart
from esa.report import _headline_weights
from esa.null import GROUP_NULL, NULL_COLUMNS, SINGLE_NULL, MagnitudeBands, NullSettings, null_summary
from esa.scores import compute_scores
from esa.targets import find_targets, target_table

pytestmark = pytest.mark.usefixtures("one_thread")

BAND = 0.05  # of a 32 x 64 down_proj: 103 positions either side


def _positions(model, tensor: str) -> tuple[np.ndarray, np.ndarray]:
    """Each flat index's position among the tensor's entries by |w| ascending (stable), and the weights."""
    weights = model.get_parameter(tensor).detach().reshape(-1).double().numpy()
    order = np.argsort(np.abs(weights), kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    return position, weights


def _considered(model, top_n: int, joint_top_n: int) -> set[tuple[str, int]]:
    """Every weight confirm considers: activation_magnitude's global top-N and the joint pool, by hand."""
    targets = find_targets(model)
    scores = compute_scores(model, targets, unigram_text(8, seed=1), ["activation_magnitude"], batch_size=4,
                            seed=0, progress=False)["activation_magnitude"]
    candidates = build_candidates(targets, scores.weights, scores.stat, scores.score, m=joint_top_n)
    table = target_table(targets)
    top = pd.concat([global_top(candidates, table, n) for n in (top_n, joint_top_n)])
    return set(top[["tensor", "flat_index"]].itertuples(index=False, name=None))


def test_innocent_weights_are_no_candidates_sit_in_the_band_and_repeat():
    """(c) Per tested tensor, 4 innocent weights, each within BAND of its matched candidate's
    |w|-quantile (the candidates cyclically by |w| descending), none a candidate, distinct; each
    group reaching the factor gets 4 innocent groups of its size, member by member from its band;
    the summaries are the draws' max and inverted-CDF 95th percentile; a rerun draws the same."""
    model = _joint_planted_model()
    before = snapshot(model)
    settings = NullSettings(samples=4, band=BAND, seed=3)

    result, baseline = _confirmed_with_groups(model, top_n=6, joint=JointSettings(top_n=10), null=settings)

    null = result.null
    assert list(null.columns) == NULL_COLUMNS
    considered = _considered(model, 6, 10)
    singles = result.super_weights.drop_duplicates(["tensor", "flat_index"])
    position, weights = _positions(model, DOWN)
    half = math.ceil(BAND * len(weights))
    for tensor, tested in singles.groupby("tensor"):
        drawn = null[(null["kind"] == SINGLE_NULL) & (null["tensor"] == tensor)]
        assert drawn["sample"].tolist() == [0, 1, 2, 3] and (drawn["group"] == -1).all()
        flats = [f for fs in drawn["flat_indices"] for f in fs]
        assert len(set(flats)) == 4 and not {(tensor, f) for f in flats} & considered
        by_size = tested.assign(size=tested["weight"].abs()).sort_values("size", ascending=False, kind="stable")
        matched = [by_size["flat_index"].iloc[i % len(by_size)] for i in range(4)]
        assert [m[0] for m in drawn["matched_flat_indices"]] == matched
        if tensor == DOWN:
            for flat, around, w in zip(flats, matched, [ws[0] for ws in drawn["weights"]]):
                assert abs(position[flat] - position[around]) <= half and w == weights[flat]
        ratios = np.sort(drawn["ppl_ratio"].to_numpy())
        row = tested.iloc[0]
        assert (row["null_n"], row["null_max"], row["null_p95"]) == (4, ratios[-1], ratios[math.ceil(0.95 * 4) - 1])
    # each draw is its weight zeroed alone: one by hand, the whole model evaluated
    first = null[null["tensor"] == DOWN].iloc[0]
    with torch.no_grad():
        down = model.get_parameter(DOWN).view(-1)
        down[first["flat_indices"][0]] = 0.0
        assert first["ppl"] == evaluate(model, unigram_text(8, seed=2), 4).ppl
        down[first["flat_indices"][0]] = first["weights"][0]

    groups = result.groups
    reached = groups[groups["ppl_ratio"] >= 1.5]
    assert len(reached) >= 1 and (groups.loc[groups["ppl_ratio"] < 1.5, "null_n"] == 0).all()
    for group in reached.itertuples(index=False):
        drawn = null[(null["kind"] == GROUP_NULL) & (null["group"] == group.group)]
        assert len(drawn) == 4 and (drawn["tensors"].map(len) == group.n_members).all()
        assert group.null_max == drawn["ppl_ratio"].max() and group.null_n == 4
        for members, matched in zip(drawn["flat_indices"], drawn["matched_flat_indices"]):
            assert matched == list(group.flat_indices)
            assert not {(DOWN, f) for f in members} & considered
            assert all(abs(position[f] - position[m]) <= half for f, m in zip(members, matched))
    # the planted pair beats its innocent groups by far: still joint
    pair = reached[reached["n_members"] == 2].iloc[0]
    assert pair["destructive"] and pair["label"] == JOINT and pair["ppl_ratio"] > 6 and pair["null_max"] < 1.1
    assert_bit_identical(model, before)

    again, _ = _confirmed_with_groups(model, top_n=6, joint=JointSettings(top_n=10), null=settings)
    pd.testing.assert_frame_equal(again.null, null)
    other, _ = _confirmed_with_groups(model, top_n=6, joint=JointSettings(top_n=10),
                                      null=NullSettings(samples=4, band=BAND, seed=4))
    assert other.null["flat_indices"].tolist() != null["flat_indices"].tolist()


def test_a_confirmation_must_beat_the_null_as_well_as_the_factor():
    """At a factor of 0.9 every weight reaches it; only those above their tensor's innocent
    weights' max stay confirmed, the planted super weight among them."""
    model = _planted_model()

    result, _ = _confirmed_with_groups(model, top_n=8, joint=JointSettings(top_n=0),
                                       null=NullSettings(samples=6, band=BAND), factor=0.9)

    table = result.super_weights
    reaches = table["ppl_ratio"] >= 0.9
    expected = reaches & ((table["null_n"] == 0) | (table["ppl_ratio"] > table["null_max"]))
    assert table["confirmed"].tolist() == expected.tolist()
    assert (reaches & ~table["confirmed"]).any()  # the null took some back
    planted = table.set_index("flat_index").loc[5 * INTERMEDIATE + 7]
    assert planted["confirmed"] and planted["ppl_ratio"] > 6
    # no null: the factor alone
    plain, _ = _confirmed_with_groups(model, top_n=8, joint=JointSettings(top_n=0), factor=0.9)
    assert plain.super_weights["confirmed"].tolist() == reaches.tolist() and plain.null.empty
    assert (plain.super_weights["null_n"] == 0).all() and plain.super_weights["null_max"].isna().all()


def test_a_group_within_its_null_is_not_destructive_and_not_taken_apart():
    """A group reaching the factor whose innocent groups do as much: not destructive, no
    single or leave-one-out measured; the null is asked only for groups reaching the factor."""
    model = _planted_model()
    windows = unigram_text(8, seed=2)
    meter = DamageMeter(model, windows, 4, Baseline.of(evaluate(model, windows, 4)), start_layers={0})
    weights = _weights([(DOWN, 5, 7), (DOWN, 6, 7), (DOWN, 9, 30), (DOWN, 10, 30)])
    groups = structural_groups(model, weights, pd.DataFrame(columns=["side", "channel", "value"]), 0.5)
    asked = []

    def innocents(group: int, members: pd.DataFrame) -> dict:
        asked.append(group)
        return null_summary([math.inf])  # innocent groups that destroy the model

    table, members = take_apart(model, groups, meter, 1.5, 8, lambda tensor, flat: None, innocents)

    assert table["kind"].tolist() == ["neuron", "neuron"] and asked == [0]  # column 30's pair stays below
    assert table["ppl_ratio"].iloc[0] > 6 and not table["destructive"].any()
    assert table["label"].tolist() == [NOT_DESTRUCTIVE, NOT_DESTRUCTIVE]
    assert table[["null_n", "evaluations"]].values.tolist() == [[1, 1], [0, 1]] and math.isinf(table["null_max"][0])
    assert members["single_ppl_ratio"].isna().all()


def test_a_band_of_candidates_only_has_no_innocent_weight():
    """Every entry a candidate: nothing to draw; a band outside (0, 1] is refused by name."""
    model = _planted_model()
    everything = pd.DataFrame({"tensor": DOWN, "flat_index": np.arange(32 * 64)})
    bands = MagnitudeBands(model, everything, 0.01)
    assert bands.draw(DOWN, 5 * INTERMEDIATE + 7, np.random.default_rng(0), set()) is None
    with pytest.raises(ESAError, match=r"^confirm.innocent.band=0.0: must be in \(0, 1\]$"):
        MagnitudeBands(model, everything, 0.0)


def test_a_group_holding_a_confirmed_super_weight_spends_no_null():
    """The planted super weight's neuron group beats its null through that weight, confirmed
    against its own tensor's innocent weights: no innocent group is drawn for it; the summary
    says why."""
    model = _planted_model()

    result, _ = _confirmed_with_groups(model, top_n=3, joint=JointSettings(top_n=6),
                                       null=NullSettings(samples=2, band=BAND))

    groups, null = result.groups, result.null
    neuron = groups[groups["index"] == 7].iloc[0]
    assert neuron["destructive"] and neuron["label"] == "single" and neuron["null_n"] == 0
    assert (null["kind"] == SINGLE_NULL).all() and len(null) == 2 * result.super_weights["tensor"].nunique()
    line = _headline_weights(result.super_weights, 1.5, groups, result.group_members)
    assert "<td>via its confirmed member</td>" in line

"""Super weights that act together (esa.joint): structural groups by hand, and on tiny Llamas a
planted joint pair (each weight harmless alone, the pair destructive) found as ``joint`` with its
minimal subset, and the planted single super weight still ``single``."""

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import UNIGRAM, assert_bit_identical, make_tiny_llama, shared_sign_direction, snapshot, unigram_text
from test_confirm import COL, DOWN, HIDDEN, INTERMEDIATE, ROW, VOCAB, _planted_model

from esa.candidates import build_candidates
from esa.confirm import confirm_super_weights
from esa.damage import Baseline, DamageMeter
from esa.evaluation import evaluate
from esa.joint import (ADDITIVE, CHANNEL, GROUP_COLUMNS, JOINT, MASSIVE_CHANNEL, MEMBER_COLUMNS, NEURON,
                       NOT_DESTRUCTIVE, NOT_TAKEN_APART, SINGLE, JointSettings, group_label, massive_channels,
                       structural_groups, take_apart)
from esa.null import NullSettings
from esa.report import _headline_weights, _joint_section
from esa.scores import compute_scores
from esa.targets import find_targets, target_table

pytestmark = pytest.mark.usefixtures("one_thread")

COL2 = 21  # the planted pair: down_proj[ROW, COL] and down_proj[ROW, COL2], half the super weight each
DOWN1 = "model.layers.1.mlp.down_proj.weight"


def _joint_planted_model():
    """The planted super weight of test_confirm split into two redundant halves: input channels
    COL and COL2 of layer 0's down_proj are both massive (~100 on every token) and each writes
    0.5 of itself into residual channel ROW. Either half alone keeps channel ROW at ~50, still
    far above every other channel, so RMSNorm leaves the unigram in place; both zeroed lose it."""
    model = make_tiny_llama(hidden=HIDDEN, intermediate=INTERMEDIATE, vocab=VOCAB)
    signs = shared_sign_direction(model, ROW)
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        for col in (COL, COL2):
            mlp.gate_proj.weight[col] = 10 * signs / (HIDDEN - 1)
            mlp.up_proj.weight[col] = 10 * signs / (HIDDEN - 1)
            mlp.down_proj.weight[ROW, col] = 0.5
        model.lm_head.weight[:, ROW] = UNIGRAM.log() / math.sqrt(HIDDEN)
    return model


def _confirmed_with_groups(model, top_n: int, joint: JointSettings, null: NullSettings | None = None, factor=1.5):
    """Score by activation_magnitude on one text, confirm (singles and groups) on another."""
    calib, evaluation = unigram_text(8, seed=1), unigram_text(8, seed=2)
    baseline = Baseline.of(evaluate(model, evaluation, batch_size=4))
    targets = find_targets(model)
    scores = compute_scores(model, targets, calib, ["activation_magnitude"], batch_size=4, seed=0,
                            progress=False)["activation_magnitude"]
    candidates = build_candidates(targets, scores.weights, scores.stat, scores.score, m=max(top_n, joint.top_n))
    result = confirm_super_weights(model, {"activation_magnitude": candidates},
                                   {"activation_magnitude": target_table(targets)}, evaluation, batch_size=4,
                                   baseline=baseline, top_n=top_n, factor=factor, joint=joint, null=null)
    return result, baseline


def _weights(rows) -> pd.DataFrame:
    """Candidate rows (tensor, row, col) of 64-wide down_proj matrices, as confirm hands them over."""
    return pd.DataFrame([{"tensor": t, "layer": int(t.split(".")[2]), "row": r, "col": c,
                          "flat_index": r * INTERMEDIATE + c, "weight": 0.1} for t, r, c in rows])


def test_groups_by_neuron_channel_and_massive_channel():
    """Shared input column -> neuron group, shared output row -> channel group, a massive
    residual channel written by two layers' down_proj -> one massive_channel group; a group is
    at least two weights, the same members are one group, non-projections never group."""
    model = make_tiny_llama(hidden=HIDDEN, intermediate=INTERMEDIATE, vocab=VOCAB, layers=2)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    weights = pd.concat([_weights([(DOWN, 3, 9), (DOWN, 4, 9), (DOWN, 3, 12), (DOWN1, 3, 40), (DOWN1, 6, 50)]),
                         pd.DataFrame([{"tensor": q_proj, "layer": 0, "row": 3, "col": 9, "flat_index": 3 * 32 + 9,
                                        "weight": 0.1}] * 2)], ignore_index=True)
    trace = pd.DataFrame({"layer": [0, 0, 1, 1], "module": "mlp.down_proj", "side": ["output", "input"] * 2,
                          "value": [80.0, 500.0, 60.0, 3.0], "channel": [3, 9, 6, 1], "window": 0, "position": 0,
                          "token": 0})

    groups = structural_groups(model, weights, trace, massive_fraction=0.5)

    assert massive_channels(trace, 0.5) == [3, 6] and massive_channels(trace, 0.9) == [3]
    found = [(g.kind, g.tensor, g.index, sorted(g.members["flat_index"])) for g in groups]
    assert found == [(NEURON, DOWN, 9, [3 * 64 + 9, 4 * 64 + 9]),
                     (CHANNEL, DOWN, 3, [3 * 64 + 9, 3 * 64 + 12]),
                     (MASSIVE_CHANNEL, "", 3, [3 * 64 + 9, 3 * 64 + 12, 3 * 64 + 40])]
    # channel 6 is massive but written by layer 1 alone; q_proj's weights are no MLP output
    assert massive_channels(trace.iloc[[1, 3]], 0.5) == []  # no output side recorded


def test_planted_pair_is_joint_with_both_in_its_minimal_subset():
    """Each half of the planted pair alone: PPL x1.00; the pair zeroed: the unigram is gone.
    Its channel group (row ROW) is destructive and labelled joint, both weights its minimal
    subset; the neuron groups of columns COL and COL2 (a half and random weights) are not."""
    model = _joint_planted_model()
    before = snapshot(model)

    result, baseline = _confirmed_with_groups(model, top_n=10, joint=JointSettings(top_n=10, max_members=8))

    singles = result.super_weights.set_index("flat_index")
    pair = [ROW * INTERMEDIATE + COL, ROW * INTERMEDIATE + COL2]
    assert not singles["confirmed"].any()  # confirm alone finds nothing
    assert singles.loc[pair, "ppl_ratio"].max() < 1.01
    groups, members = result.groups, result.group_members
    assert list(groups.columns) == GROUP_COLUMNS and list(members.columns) == MEMBER_COLUMNS
    row = groups[(groups["kind"] == CHANNEL) & (groups["index"] == ROW)].iloc[0]
    assert row["tensor"] == DOWN and sorted(row["flat_indices"]) == pair and row["n_members"] == 2
    assert row["label"] == JOINT and row["destructive"] and row["ppl_ratio"] > 6
    deltas = members.loc[members["group"] == row["group"], "single_loss"] - baseline.loss
    assert row["synergy"] == (row["loss"] - baseline.loss) / deltas.sum() and row["synergy"] > 100
    assert sorted(row["minimal_flat_indices"]) == pair and row["minimal_ppl_ratio"] == row["ppl_ratio"]
    assert (row["minimal_loss"], row["minimal_ppl"]) == (row["loss"], row["ppl"])  # the pair is its minimal subset
    # the pair zeroed by hand, the whole model evaluated
    down = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        down[ROW, [COL, COL2]] = 0.0
        assert row["ppl"] == evaluate(model, unigram_text(8, seed=2), 4).ppl
        down[ROW, [COL, COL2]] = 0.5
    mine = members[members["group"] == row["group"]].set_index("flat_index")
    assert mine["minimal"].all() and (mine["single_ppl_ratio"] < 1.01).all()
    # leaving either half out leaves the other alone, confirm's measurement: harmless; the pair's one evaluation
    assert mine["left_out_ppl_ratio"].tolist() == mine["single_ppl_ratio"].tolist()[::-1]
    assert (mine["left_out_ppl_ratio"] < 1.01).all() and row["evaluations"] == 1
    neurons = groups[groups["kind"] == NEURON]
    assert set(neurons["index"]) <= {COL, COL2} and (neurons["label"] == NOT_DESTRUCTIVE).all()
    assert members.loc[members["group"].isin(neurons["group"]), "single_ppl_ratio"].isna().all()
    assert_bit_identical(model, before)
    # the report's section: the pair's row first (largest factor), its two weights as the minimal subset
    page = _joint_section(groups, members, 1.5)
    start = page.index("<tbody><tr>")
    first = page[start:page.index("</tr>", start)]
    assert f"<td>{CHANNEL}</td><td>layers.0.mlp.down_proj row {ROW}</td><td>2</td>" in first
    assert f"<td>{JOINT}</td>" in first
    assert f"layers.0.mlp.down_proj[{ROW}, {COL}], layers.0.mlp.down_proj[{ROW}, {COL2}]" in first
    assert "1 multiply PPL by >= 1.5 and by more than their innocent groups (4 not_destructive, 1 joint)" in page
    assert f"1 {JOINT}" in page
    # the summary's table: the pair beside the (no) single super weights, with its minimal subset
    line = _headline_weights(result.super_weights, 1.5, groups, members)
    assert "<b>0 single super weights</b> of 10 weights tested and 1 of 5 structural groups destructive" in line
    assert re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>&mdash;</td><td><b>&times;([^<]*)</b></td>", line) == [
        (f"layers.0.mlp.down_proj row {ROW}: 2 weights", f"group: {JOINT}", f"{row['ppl_ratio']:.3g}")]
    assert (f"minimal subset layers.0.mlp.down_proj[{ROW}, {COL}], layers.0.mlp.down_proj[{ROW}, {COL2}] "
            f"(&times;{row['ppl_ratio']:.3g}), synergy") in line


def test_planted_single_super_weight_is_single_with_itself_as_minimal_subset():
    """test_confirm's planted super weight: its neuron group (column COL: it and random
    weights) is destructive through it alone, labelled single, its minimal subset itself."""
    model = _planted_model()

    result, _ = _confirmed_with_groups(model, top_n=3, joint=JointSettings(top_n=6, max_members=8))

    groups, members = result.groups, result.group_members
    neuron = groups[(groups["kind"] == NEURON) & (groups["index"] == COL)].iloc[0]
    assert neuron["label"] == SINGLE and neuron["minimal_flat_indices"] == [ROW * INTERMEDIATE + COL]
    assert neuron["n_members"] == 6 and neuron["minimal_ppl_ratio"] > 6
    mine = members[members["group"] == neuron["group"]].set_index("flat_index")
    assert mine.loc[ROW * INTERMEDIATE + COL, "single_ppl_ratio"] > 6
    assert (mine.drop(index=ROW * INTERMEDIATE + COL)["single_ppl_ratio"] < 1.01).all()
    # the members confirm zeroed alone (its top 3) are its numbers, not measured again
    confirmed = result.super_weights.set_index("flat_index")["ppl_ratio"]
    for flat, ratio in confirmed.items():
        assert mine.loc[flat, "single_ppl_ratio"] == ratio
    # one joint, 6 leave-one-outs, the 3 members confirm did not zero alone, then dropping down to one
    # member: the first drop is a leave-one-out, each of the 4 more a new evaluation
    assert neuron["evaluations"] == 1 + 6 + 3 + 4


def _damage(loss: float, ratio: float) -> dict:
    return {"loss": loss, "ppl_ratio": ratio, "finite": math.isfinite(loss)}


def test_labels_from_the_joint_and_single_damage():
    """delta = loss - 2.0 (the baseline's): a destructive member makes it single; otherwise
    joint when the group's delta exceeds the members' summed deltas, else additive; an
    infinite loss is destructive and the largest delta."""
    whole = _damage(2.9, math.exp(0.9))
    assert group_label(whole, [_damage(2.6, math.exp(0.6)), _damage(2.1, math.exp(0.1))], 1.5, 2.0) == SINGLE
    assert group_label(whole, [_damage(2.3, math.exp(0.3)), _damage(2.3, math.exp(0.3))], 1.5, 2.0) == JOINT
    assert group_label(whole, [_damage(2.4, math.exp(0.4)), _damage(2.35, math.exp(0.35))], 1.5, 2.0) == JOINT
    assert group_label(whole, [_damage(2.4, math.exp(0.4)), _damage(2.39, math.exp(0.39)),
                               _damage(2.2, math.exp(0.2))], 1.5, 2.0) == ADDITIVE
    assert group_label(_damage(math.inf, math.inf), [_damage(2.3, 1.35)] * 3, 1.5, 2.0) == JOINT
    assert group_label(whole, [_damage(math.nan, math.nan), _damage(2.0, 1.0)], 1.5, 2.0) == SINGLE


def test_a_destructive_group_above_max_members_keeps_only_its_joint_numbers():
    model = _planted_model()
    windows = unigram_text(8, seed=2)
    meter = DamageMeter(model, windows, 4, Baseline.of(evaluate(model, windows, 4)), start_layers={0})
    weights = _weights([(DOWN, ROW, COL), (DOWN, ROW + 1, COL)])
    groups = structural_groups(model, weights, pd.DataFrame(columns=["side", "channel", "value"]), 0.5)

    table, members = take_apart(model, groups, meter, 1.5, max_members=1, singles=lambda tensor, flat: None)

    assert table[["kind", "label", "evaluations", "n_minimal"]].values.tolist() == [[NEURON, NOT_TAKEN_APART, 1, 0]]
    assert table["ppl_ratio"].iloc[0] > 6 and table["minimal_flat_indices"].iloc[0] == []
    assert np.isnan(table["minimal_ppl_ratio"].iloc[0])
    assert members[["single_ppl_ratio", "left_out_ppl_ratio"]].isna().all().all() and not members["minimal"].any()

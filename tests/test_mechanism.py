"""How a super weight acts (esa.mechanism) on the tiny Llama with a planted super weight and a
tiny GPT-2 (Conv1D): the scale sweep against hand-made edits, the massive-activation restore
against a hand-made hook on a full evaluation, the matched control's weights by hand, the
step's four files and the workflow wiring; the joint super weights' mean contribution on the
planted pair of test_joint."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_bit_identical, confirm_by_activation, snakemake, snapshot, study_layout, unigram_text
from test_confirm import COL, DOWN, INTERMEDIATE, ROW, _planted_model
from test_joint import COL2, _confirmed_with_groups, _joint_planted_model
from transformers import GPT2Config, GPT2LMHeadModel

from esa.architecture import is_transposed
from esa.config import validate_config
from esa.confirm import ablation_damage, zero_each
from esa.damage import DAMAGE_COLUMNS, Baseline, DamageMeter
from esa.data import windows_frame
from esa.errors import ESAError
from esa.evaluation import evaluate
from esa.io import read_parquet, write_json_atomic, write_parquet_atomic
from esa.layout import MECHANISM_FILES, Layout
from esa.joint import ADDITIVE, JOINT, NOT_DESTRUCTIVE, NOT_TAKEN_APART, SINGLE, JointSettings
from esa.mechanism import (CONTROL_COLUMNS, JOINT_MEAN_COLUMNS, NOT_MLP_OUTPUT, RESTORE_COLUMNS, SWEEP_COLUMNS,
                           joint_super_weights, matched_control, super_weight_mechanism)
from esa.model_steps import step_mechanism
from esa.models import materialize
from esa.names import MATCHED_CONTROL, SUPER_WEIGHTS
from esa.replay import first_changed_layer
from esa.report import NOT_RUN, _mechanism_section
from esa.step_specs import typed_spec

pytestmark = pytest.mark.usefixtures("one_thread")

Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
CALIB = unigram_text(8, seed=1)  # the calibration text confirm_by_activation scores on


def _planted():
    """The planted model, its confirmation on the evaluation windows, those windows, its baseline."""
    model = _planted_model()
    confirmation, baseline = confirm_by_activation(model, top_n=5)
    return model, confirmation, unigram_text(8, seed=2), baseline


def _claimed(model, weights: list[tuple[str, int, int, int, str]], windows, baseline) -> pd.DataFrame:
    """A super_weights table whose rows (tensor, layer, row, col, module; Linear convention)
    are all confirmed, each with confirm's measurement of its zeroing (esa.confirm.zero_each)."""
    rows = []
    for tensor, layer, row, col, module in weights:
        param = model.get_parameter(tensor).detach()
        matrix = param.t() if is_transposed(model.get_submodule(tensor.rpartition(".")[0])) else param
        rows.append({"tensor": tensor, "layer": layer, "module": module, "expert": -1, "part": "", "row": row,
                     "col": col, "flat_index": row * matrix.shape[1] + col, "weight": float(matrix[row, col]),
                     "score": 1.0})
    table = zero_each(model, pd.DataFrame(rows), windows, 4, baseline).super_weights
    return table.assign(metric="m", rank=range(len(table)), confirmed=True)


def _zeroed_by_meter(model, tensor: str, flat_index: int, windows, baseline) -> dict:
    """The damage of zeroing one weight, measured afresh by a DamageMeter from its layer on, and
    the PPL of the whole zeroed model."""
    start = first_changed_layer(model, tensor)
    meter = DamageMeter(model, windows, 4, baseline, start_layers={start})
    param = model.get_parameter(tensor)
    original = param.view(-1)[flat_index].item()
    with torch.no_grad():
        param.view(-1)[flat_index] = 0.0
    measured, full = meter.measure(start), evaluate(model, windows, 4).ppl
    with torch.no_grad():
        param.view(-1)[flat_index] = original
    return measured, full




def _restored_by_hand(model, module, channel: int, stored: tuple[int, int], fraction: float, windows):
    """Zero ``module.weight[stored]`` and, by a hook, give output ``channel`` back its unmodified
    values wherever they reach ``fraction`` of their peak; the whole model evaluated, then undone.
    Returns (evaluation, the unmodified channel per batch, its peak)."""
    recorded = []
    handle = module.register_forward_hook(lambda m, a, out: recorded.append(out[..., channel].clone()))
    evaluate(model, windows, 4)
    handle.remove()
    peak = max(float(y.abs().max()) for y in recorded)
    calls = iter(recorded)

    def restore(m, args, out):
        y = next(calls)
        out = out.clone()
        out[..., channel] = torch.where(y.abs() >= fraction * peak, y, out[..., channel])
        return out

    handle = module.register_forward_hook(restore)
    original = module.weight[stored].item()
    with torch.no_grad():
        module.weight[stored] = 0.0
    result = evaluate(model, windows, 4)
    with torch.no_grad():
        module.weight[stored] = original
    handle.remove()
    return result, recorded, peak


def test_scale_sweep_is_each_scaled_weight_evaluated_in_full():
    model, confirmation, windows, baseline = _planted()
    before = snapshot(model)
    scales = [0, 0.5, 1, 2, -1]

    sweep = super_weight_mechanism(model, confirmation.super_weights, windows, 4, baseline, scales, 0.5, CALIB).sweep

    assert list(sweep.columns) == SWEEP_COLUMNS and sweep["scale"].tolist() == scales
    assert (sweep["tensor"] == DOWN).all() and (sweep["flat_index"] == ROW * INTERMEDIATE + COL).all()
    assert (sweep[["row", "col", "layer", "weight"]] == [ROW, COL, 0, 1.0]).all().all()
    by_scale = sweep.set_index("scale")
    # scale 0 is confirm's measurement of the zeroing, the bits a fresh measurement gives
    fresh, full = _zeroed_by_meter(model, DOWN, ROW * INTERMEDIATE + COL, windows, baseline)
    assert by_scale.loc[0.0, DAMAGE_COLUMNS].to_dict() == fresh and fresh["ppl"] == full
    assert by_scale.loc[1.0, "ppl"] == baseline.ppl and by_scale.loc[1.0, "kl"] == 0  # unchanged: the baseline
    assert by_scale.loc[1.0, "delta_ppl_lo"] == by_scale.loc[1.0, "delta_ppl_hi"] == 0
    down = model.model.layers[0].mlp.down_proj.weight
    for scale in (0.5, 2, -1):  # w <- s * w written by hand, the whole model evaluated
        with torch.no_grad():
            down[ROW, COL] = scale
        assert by_scale.loc[scale, "ppl"] == evaluate(model, windows, 4).ppl, scale
        with torch.no_grad():
            down[ROW, COL] = 1.0
    assert_bit_identical(model, before)
    # measured: halving or doubling the weight keeps the model; flipping its sign destroys it
    assert by_scale.loc[0.5, "ppl_ratio"] == pytest.approx(1.00094, abs=1e-5)
    assert by_scale.loc[2.0, "ppl_ratio"] == pytest.approx(0.99997, abs=1e-5)
    assert by_scale.loc[-1.0, "ppl"] == pytest.approx(8.87e9, rel=0.01) and by_scale.loc[-1.0, "top1"] == 0


def test_restoring_the_massive_activation_undoes_the_zeroing():
    """The planted activation is massive on every token: restoring it there gives the
    unmodified model back exactly; restoring only its peak position gives back almost nothing."""
    model, confirmation, windows, baseline = _planted()
    before = snapshot(model)
    weights = confirmation.super_weights

    everywhere = super_weight_mechanism(model, weights, windows, 4, baseline, [0], 0.5, CALIB).restore.iloc[0]
    peak_only = super_weight_mechanism(model, weights, windows, 4, baseline, [0], 1.0, CALIB).restore.iloc[0]

    assert list(everywhere.index) == RESTORE_COLUMNS
    assert (everywhere["projection"], everywhere["module"], everywhere["reason"]) == (
        "model.layers.0.mlp.down_proj", "mlp.down_proj", "")
    trace = confirmation.activations.set_index(["layer", "side"])
    assert trace.loc[(0, "output"), "channel"] == ROW
    assert everywhere["peak"] == pytest.approx(trace.loc[(0, "output"), "value"], rel=1e-6)
    assert everywhere["positions"] == 8 * 32  # |y_row| ~103 on every token of the 8 windows
    assert everywhere["ppl_zeroed"] == weights.loc[weights["confirmed"], "ppl_after"].iloc[0]
    assert everywhere["loss_baseline"] == baseline.loss
    assert everywhere["ppl_restored"] == baseline.ppl and everywhere["kl_restored"] == 0
    assert everywhere["recovered"] == 1.0

    # the same restore written by hand: a hook on the whole zeroed model's down_proj
    down = model.model.layers[0].mlp.down_proj
    by_hand, recorded, peak = _restored_by_hand(model, down, ROW, (ROW, COL), 1.0, windows)
    assert_bit_identical(model, before)
    assert peak_only["positions"] == sum(int((y.abs() >= peak).sum()) for y in recorded) == 1
    assert peak_only["ppl_restored"] == by_hand.ppl and peak_only["loss_restored"] == by_hand.loss
    assert peak_only["recovered"] == pytest.approx(0.00433, abs=1e-5)  # one position of 256


def _mean_by_hand(model, module, col: int, windows) -> float:
    """m_j: the mean of ``module``'s input channel ``col`` over every position of ``windows``."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0][..., col].double().flatten()))
    evaluate(model, windows, 4)
    handle.remove()
    return float(torch.cat(seen).mean())


def test_mean_contribution_gives_back_a_bias_like_weight_exactly():
    """Every token embedding the same: layer 0's down_proj input is the same at every position,
    so the planted weight's contribution is a constant, and adding back w * m_j recovers the
    whole damage (up to the matmul's summation order)."""
    model = _planted_model()
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = model.model.embed_tokens.weight[0]
    windows = unigram_text(8, seed=2)
    baseline = Baseline.of(evaluate(model, windows, 4))
    weights = _claimed(model, [(DOWN, 0, ROW, COL, "mlp.down_proj")], windows, baseline)
    restore = super_weight_mechanism(model, weights, windows, 4, baseline, [0], 0.5, CALIB).restore.iloc[0]

    assert restore["ppl_zeroed"] > 2 * baseline.ppl
    down = model.model.layers[0].mlp.down_proj
    assert restore["mean_input"] == pytest.approx(_mean_by_hand(model, down, COL, CALIB), rel=1e-12)
    assert restore["mean_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert restore["ppl_mean"] == pytest.approx(baseline.ppl, rel=1e-5)


def test_mean_contribution_is_the_hand_computed_share():
    """The planted weight's input varies a little from token to token (103.15 to 103.17, the
    tokens' own embeddings): zeroing it and adding w * m_j by hand (a hook on the whole model)
    gives the loss, and the share, the control reports. On i.i.d. text nothing token-dependent
    can help, so the mean gives back the whole damage: it acts as a constant bias."""
    model, confirmation, windows, baseline = _planted()
    before = snapshot(model)
    restore = super_weight_mechanism(model, confirmation.super_weights, windows, 4, baseline, [0], 0.5,
                                     CALIB).restore.iloc[0]

    down = model.model.layers[0].mlp.down_proj
    mean = _mean_by_hand(model, down, COL, CALIB)
    assert restore["mean_input"] == pytest.approx(mean, rel=1e-12) and mean > 50  # the massive input

    def shifted(module, args, out):
        out = out.clone()
        out[..., ROW] += 1.0 * restore["mean_input"]
        return out

    handle = down.register_forward_hook(shifted)
    with torch.no_grad():
        down.weight[ROW, COL] = 0.0
    by_hand = evaluate(model, windows, 4)
    with torch.no_grad():
        down.weight[ROW, COL] = 1.0
    handle.remove()
    assert_bit_identical(model, before)
    assert restore["loss_mean"] == by_hand.loss
    share = (restore["loss_zeroed"] - by_hand.loss) / (restore["loss_zeroed"] - baseline.loss)
    assert restore["mean_recovered"] == share and share == pytest.approx(1.0, abs=1e-8)
    seen = []  # the input does vary by token
    handle = down.register_forward_pre_hook(lambda m, args: seen.append(args[0][..., COL].flatten()))
    evaluate(model, CALIB, 4)
    handle.remove()
    assert 0.005 < float(torch.cat(seen).std()) < 0.05


def _joint_planted():
    """The planted pair (test_joint): its confirmation with groups, the evaluation windows, the baseline."""
    model = _joint_planted_model()
    result, baseline = _confirmed_with_groups(model, top_n=10, joint=JointSettings(top_n=10, max_members=8))
    return model, result, unigram_text(8, seed=2), baseline


def test_joint_mean_contribution_is_the_hand_computed_share():
    """The planted pair zeroed together while each half W[ROW, j] gives back 0.5 * m_j on
    channel ROW (both write into it: one hook adds the sum), by a hand-made hook on the whole
    model: the loss the control reports, bit for bit, and the share. The pair is confirm's
    minimal subset, so its zeroed damage is confirm's measurement; no single super weight."""
    model, result, windows, baseline = _joint_planted()
    before = snapshot(model)

    mechanism = super_weight_mechanism(model, result.super_weights, windows, 4, baseline, [0], 0.5, CALIB,
                                       result.groups, result.group_members)

    assert mechanism.sweep.empty and mechanism.restore.empty and mechanism.control.empty
    assert list(mechanism.joint_mean.columns) == JOINT_MEAN_COLUMNS
    [row] = mechanism.joint_mean.to_dict("records")
    pair = result.groups.set_index("group").loc[row["group"]]
    assert (row["kind"], row["label"], row["n_minimal"]) == ("channel", JOINT, 2) and row["reason"] == ""
    assert list(row["flat_indices"]) == [ROW * INTERMEDIATE + COL, ROW * INTERMEDIATE + COL2]
    assert (row["loss_zeroed"], row["ppl_zeroed"]) == (pair["minimal_loss"], pair["minimal_ppl"])
    down = model.model.layers[0].mlp.down_proj
    means = [_mean_by_hand(model, down, col, CALIB) for col in (COL, COL2)]
    assert list(row["mean_inputs"]) == pytest.approx(means, rel=1e-12) and min(means) > 50

    def shifted(module, args, out):
        out = out.clone()
        out[..., ROW] += 0.5 * row["mean_inputs"][0] + 0.5 * row["mean_inputs"][1]
        return out

    with torch.no_grad():
        down.weight[ROW, [COL, COL2]] = 0.0
    zeroed = evaluate(model, windows, 4)
    handle = down.register_forward_hook(shifted)
    by_hand = evaluate(model, windows, 4)
    handle.remove()
    with torch.no_grad():
        down.weight[ROW, [COL, COL2]] = 0.5
    assert_bit_identical(model, before)
    assert row["loss_zeroed"] == zeroed.loss and row["ppl_zeroed"] > 6 * baseline.ppl
    assert row["loss_mean"] == by_hand.loss and row["ppl_mean"] == by_hand.ppl
    share = (zeroed.loss - by_hand.loss) / (zeroed.loss - baseline.loss)
    assert row["mean_recovered"] == share and share == pytest.approx(1.0, abs=1e-6)


def _group(group: int, label: str, destructive: bool = True) -> dict:
    return {"group": group, "kind": "channel", "label": label, "destructive": destructive,
            "minimal_loss": 3.0, "minimal_ppl": np.exp(3.0)}


def _member(group: int, flat_index: int, minimal: bool = True) -> dict:
    return {"group": group, "tensor": DOWN, "flat_index": flat_index, "layer": 0, "row": flat_index // INTERMEDIATE,
            "col": flat_index % INTERMEDIATE, "weight": 0.5, "minimal": minimal}


def test_joint_super_weights_are_the_minimal_subsets_of_destructive_joint_and_additive_groups():
    """Groups 0 (joint) and 3 (additive) count with their minimal members; group 1 (a massive
    channel, the same minimal subset as group 0) once; single, not taken apart and not
    destructive groups never (a single's member is mechanism's as a confirmed single)."""
    groups = pd.DataFrame([_group(0, JOINT), _group(1, JOINT), _group(2, SINGLE), _group(3, ADDITIVE),
                           _group(4, NOT_TAKEN_APART), _group(5, NOT_DESTRUCTIVE, destructive=False)])
    members = pd.DataFrame([_member(0, 7), _member(0, 21), _member(0, 30, minimal=False), _member(1, 21),
                            _member(1, 7), _member(2, 7), _member(2, 9, minimal=False), _member(3, 70),
                            _member(3, 71), _member(3, 72), _member(4, 7), _member(4, 8, minimal=False),
                            _member(5, 80), _member(5, 81)])

    found = joint_super_weights(groups, members)

    assert [(int(g["group"]), mine["flat_index"].tolist()) for g, mine in found] == [(0, [7, 21]), (3, [70, 71, 72])]


def test_confirms_zeroing_is_scale_zero_the_restores_zeroed_model_and_the_controls_set():
    """Confirm measured each super weight zeroed: mechanism evaluates that edit never again. It
    is the sweep's scale 0, the restore's zeroed model and, for a tensor with one confirmed
    weight, the control's super-weight set; with or without 0 among the scales the restore and
    the control are the same tables, at the same number of evaluations."""
    model, confirmation, windows, baseline = _planted()
    weights = confirmation.super_weights
    evaluations = []
    handle = model.model.norm.register_forward_hook(lambda *args: evaluations.append(1))
    try:
        with_zero = super_weight_mechanism(model, weights, windows, 4, baseline, [0, 0.5], 0.5, CALIB)
        with_zero_cost = len(evaluations)
        evaluations.clear()
        without = super_weight_mechanism(model, weights, windows, 4, baseline, [0.5], 0.5, CALIB)
    finally:
        handle.remove()
    pd.testing.assert_frame_equal(with_zero.restore, without.restore)
    pd.testing.assert_frame_equal(with_zero.control, without.control)
    # the calibration pass, the reference, scale 0.5, the restored model, the mean contribution, the
    # control's matched set (two batches each)
    assert with_zero_cost == len(evaluations) == 2 * (1 + 1 + 1 + 1 + 1 + 1)
    recorded = weights[weights["confirmed"]].iloc[0]
    zero_row = with_zero.sweep[with_zero.sweep["scale"] == 0].iloc[0]
    super_row = with_zero.control[with_zero.control["set"] == SUPER_WEIGHTS].iloc[0]
    assert zero_row[DAMAGE_COLUMNS].to_dict() == super_row[DAMAGE_COLUMNS].to_dict() == ablation_damage(
        recorded, baseline)
    assert (zero_row["loss"], zero_row["ppl"]) == (recorded["loss_after"], recorded["ppl_after"])
    assert with_zero.restore.iloc[0]["loss_zeroed"] == recorded["loss_after"]


def test_matched_control_and_a_weight_outside_the_mlp_output():
    """Two confirmed weights of down_proj and one of q_proj: each tensor's control is its
    largest other |w| (ties by lower flat index), and q_proj gets no restore test."""
    model, windows = _planted_model(), unigram_text(8, seed=2)
    down = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():  # three equal |w| above the rest of down_proj: 900 is claimed, 50 and 100 are the control
        for flat, value in ((50, 0.5), (100, -0.5), (900, 0.5)):
            down.view(-1)[flat] = value
    baseline = Baseline.of(evaluate(model, windows, 4))
    before = snapshot(model)
    q = model.get_parameter(Q_PROJ).detach()
    q_row, q_col = divmod(int(q.abs().argmax()), q.shape[1])
    weights = _claimed(model, [(DOWN, 0, ROW, COL, "mlp.down_proj"), (Q_PROJ, 1, q_row, q_col, "self_attn.q_proj"),
                               (DOWN, 0, 900 // INTERMEDIATE, 900 % INTERMEDIATE, "mlp.down_proj")], windows, baseline)
    q_control = int(np.argsort(-q.abs().flatten().numpy(), kind="stable")[1])  # its second largest |w|

    matched = matched_control(model, weights)
    result = super_weight_mechanism(model, weights, windows, 4, baseline, [0], 0.5, CALIB)

    assert matched[["tensor", "flat_index"]].values.tolist() == [[DOWN, 50], [DOWN, 100], [Q_PROJ, q_control]]
    assert matched["weight"].tolist() == [0.5, -0.5, float(q.flatten()[q_control])]
    control = result.control
    assert list(control.columns) == CONTROL_COLUMNS
    assert list(zip(control["tensor"], control["set"], control["n_weights"])) == [
        (DOWN, SUPER_WEIGHTS, 2), (DOWN, MATCHED_CONTROL, 2), (Q_PROJ, SUPER_WEIGHTS, 1), (Q_PROJ, MATCHED_CONTROL, 1)]
    assert [list(f) for f in control["flat_indices"]] == [[ROW * INTERMEDIATE + COL, 900], [50, 100],
                                                          [q_row * q.shape[1] + q_col], [q_control]]
    assert control[["abs_min", "abs_max"]].values[:2].tolist() == [[0.5, 1.0], [0.5, 0.5]]
    with torch.no_grad():  # the control's damage: both weights zeroed by hand, the whole model evaluated
        down.view(-1)[[50, 100]] = 0.0
        assert control["ppl"].iloc[1] == evaluate(model, windows, 4).ppl
        down.view(-1)[[50, 100]] = torch.tensor([0.5, -0.5])
    ratios = control.set_index(["tensor", "set"])["ppl_ratio"]
    assert ratios[DOWN, SUPER_WEIGHTS] > 6 and abs(ratios[DOWN, MATCHED_CONTROL] - 1) < 1e-3

    restore = result.restore.set_index("tensor")
    assert restore.loc[Q_PROJ, "reason"] == NOT_MLP_OUTPUT and restore.loc[Q_PROJ, "projection"] == ""
    assert restore.loc[Q_PROJ, ["peak", "ppl_restored", "kl_restored", "recovered"]].isna().all()
    assert restore.loc[Q_PROJ, "ppl_zeroed"] == result.sweep.set_index("tensor").loc[Q_PROJ, "ppl"]
    assert (restore.loc[DOWN, "reason"] == "").all()
    assert result.restore["recovered"].iloc[0] == 1.0  # the planted weight's; 900's zeroing barely matters
    assert_bit_identical(model, before)


def test_gpt2_conv1d_output_channel_is_the_linear_row():
    """GPT-2's mlp.c_proj is a Conv1D stored [in, out]: the weight's Linear row is the output
    channel restored, and the control ranks |w| in the Linear convention."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64)).eval()
    windows = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(1))
    baseline = Baseline.of(evaluate(model, windows, 4))
    proj = model.transformer.h[1].mlp.c_proj
    linear = proj.weight.detach().t()  # [out 16, in 64]
    row, col = divmod(int(linear.abs().argmax()), linear.shape[1])
    weights = _claimed(model, [("transformer.h.1.mlp.c_proj.weight", 1, row, col, "mlp.c_proj"),
                               ("transformer.h.0.attn.c_proj.weight", 0, 3, 4, "attn.c_proj")], windows, baseline)
    before = snapshot(model)

    result = super_weight_mechanism(model, weights, windows, 4, baseline, [0], 0.5, CALIB)

    by_hand, recorded, peak = _restored_by_hand(model, proj, row, (col, row), 0.5, windows)  # Conv1D: [in, out]
    assert_bit_identical(model, before)

    mlp, attn = result.restore.iloc[0], result.restore.iloc[1]
    assert mlp["projection"] == "transformer.h.1.mlp.c_proj" and mlp["peak"] == peak
    assert mlp["positions"] == sum(int((y.abs() >= 0.5 * peak).sum()) for y in recorded) > 0
    assert mlp["ppl_restored"] == by_hand.ppl
    assert attn["reason"] == NOT_MLP_OUTPUT and np.isnan(attn["recovered"])  # GPT-2's attn.c_proj is no MLP output
    second = int(np.argsort(-linear.abs().flatten().numpy(), kind="stable")[1])
    assert list(result.control["flat_indices"].iloc[1]) == [second]


def _step_inputs(tmp_path, model, windows, baseline, confirmation, super_weights=None) -> dict:
    """The files the mechanism step reads, written as the earlier steps write them
    (``super_weights``: in place of the confirmation's)."""
    model.save_pretrained(tmp_path / "checkpoint")
    materialize(str(tmp_path / "checkpoint"), tmp_path / "model")
    write_parquet_atomic(windows_frame(windows.numpy()), tmp_path / "eval.parquet")
    write_parquet_atomic(windows_frame(CALIB.numpy()), tmp_path / "calib.parquet")
    write_json_atomic({"loss": baseline.loss, "ppl": baseline.ppl}, tmp_path / "metrics.json")
    write_parquet_atomic(pd.DataFrame({"window": range(len(baseline.nll)), "nll": baseline.nll,
                                       "tokens": baseline.tokens}), tmp_path / "windows.parquet")
    write_parquet_atomic(confirmation.super_weights if super_weights is None else super_weights,
                         tmp_path / "super_weights.parquet")
    write_parquet_atomic(confirmation.groups, tmp_path / "groups.parquet")
    write_parquet_atomic(confirmation.group_members, tmp_path / "group_members.parquet")
    outputs = {name: str(tmp_path / "mechanism" / f"{name}.parquet") for name in MECHANISM_FILES}
    return {"model": str(tmp_path / "model/model.json"), "eval": str(tmp_path / "eval.parquet"),
            "calib": str(tmp_path / "calib.parquet"),
            "baseline": str(tmp_path / "metrics.json"), "baseline_windows": str(tmp_path / "windows.parquet"),
            "super_weights": str(tmp_path / "super_weights.parquet"), "groups": str(tmp_path / "groups.parquet"),
            "group_members": str(tmp_path / "group_members.parquet"), **outputs}


SPEC = typed_spec("mechanism", {
    "model": "planted", "device": "cpu", "dtype": "fp32", "attn_implementation": "eager", "device_map": None,
    "loss_chunk": 256, "scales": [0, -1], "massive_fraction": 0.5, "calib_samples": 8, "calib_seed": 0,
    "batch_size": 4,
    "bootstrap": {"resamples": 200, "level": 0.95, "seed": 0}})


def test_step_writes_the_four_tables(tmp_path):
    model, confirmation, windows, baseline = _planted()
    paths = _step_inputs(tmp_path, model, windows, baseline, confirmation)

    step_mechanism(SPEC, **paths)

    sweep, restore, control, joint_mean = (read_parquet(paths[name]) for name in MECHANISM_FILES)
    assert list(sweep.columns) == SWEEP_COLUMNS and list(restore.columns) == RESTORE_COLUMNS
    assert list(control.columns) == CONTROL_COLUMNS and list(control["flat_indices"].iloc[1]) == [1768]
    confirmed = confirmation.super_weights[confirmation.super_weights["confirmed"]].iloc[0]
    assert sweep["ppl"].iloc[0] == confirmed["ppl_after"] and sweep["ppl"].iloc[1] > 1e9
    assert restore["recovered"].tolist() == [1.0] and restore["positions"].tolist() == [256]
    assert joint_mean.empty and list(joint_mean.columns) == JOINT_MEAN_COLUMNS  # its groups are single

    page = _mechanism_section(paths, baseline.ppl, tmp_path / "plots")  # the report's section
    assert page.startswith('<section id="mechanism"><h2>How each super weight acts</h2>')
    assert page.count('<img alt="') == 2 and page.count("<table>") == 4 and "Joint super weights" not in page
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"mechanism_scale.png", "mechanism_restore.png"}
    assert _mechanism_section(None, baseline.ppl, tmp_path / "plots").endswith(f"{NOT_RUN}</section>")


def test_step_runs_for_a_joint_super_weight_alone(tmp_path):
    """No single super weight, the planted pair joint: the model is loaded for its control only."""
    model, result, windows, baseline = _joint_planted()
    paths = _step_inputs(tmp_path, model, windows, baseline, result)

    step_mechanism(SPEC, **paths)

    sweep, restore, control, joint_mean = (read_parquet(paths[name]) for name in MECHANISM_FILES)
    assert sweep.empty and restore.empty and control.empty
    assert joint_mean["label"].tolist() == [JOINT]
    assert joint_mean["mean_recovered"].iloc[0] == pytest.approx(1, abs=1e-6)
    page = _mechanism_section(paths, baseline.ppl, tmp_path / "plots")
    assert page.count("<table>") == 1 and "<h3>Joint super weights: mean contribution given back</h3>" in page
    assert (f"layers.0.mlp.down_proj[{ROW}, {COL}] (m {joint_mean['mean_inputs'].iloc[0][0]:.4g}), "
            f"layers.0.mlp.down_proj[{ROW}, {COL2}] (m ") in page


def test_step_without_a_confirmed_weight_writes_empty_tables(tmp_path):
    model, confirmation, windows, baseline = _planted()
    unconfirmed = confirmation.super_weights.assign(confirmed=False)
    paths = {**_step_inputs(tmp_path, model, windows, baseline, confirmation, unconfirmed),
             "model": "never/loaded.json"}

    step_mechanism(SPEC, **paths)

    for name, columns in zip(MECHANISM_FILES, (SWEEP_COLUMNS, RESTORE_COLUMNS, CONTROL_COLUMNS, JOINT_MEAN_COLUMNS)):
        table = read_parquet(paths[name])
        assert table.empty and list(table.columns) == columns, name
    assert str(read_parquet(paths["sweep"])["scale"].dtype) == "float64"
    page = _mechanism_section(paths, baseline.ppl, tmp_path / "plots")
    assert "<p>no confirmed super weight, single or joint</p>" in page


def _config(**extra) -> dict:
    return {"model": {"name": "tiny", "source": "/nonexistent"}, "data": {"source": "builtin:pydoc"}, **extra}


EXPERIMENT = {"name": "e", "metric": "activation_magnitude", "mode": "global", "topk": 5}


def test_config_and_layout():
    default = validate_config(_config(experiments=[EXPERIMENT]))
    assert default["mechanism"] == {"enabled": False, "scales": [0, 0.5, 1.5, 2, 3, -1], "massive_fraction": 0.5}
    assert "mechanism" not in Layout(default).of("tiny").report_inputs()
    for fraction in (0, 1.5):
        with pytest.raises(ESAError, match="invalid config at mechanism.massive_fraction"):
            validate_config(_config(mechanism={"massive_fraction": fraction}))
    with pytest.raises(ESAError, match="invalid config at mechanism.scales"):
        validate_config(_config(mechanism={"scales": []}))
    enabled = validate_config(_config(experiments=[EXPERIMENT], mechanism={"enabled": True}))
    layout = Layout(enabled).of("tiny")
    files = layout.mechanism_files()  # the four tables in the mechanism step's keyed directory
    directory = f"{layout.root}/mechanism/{layout.key('mechanism')}"
    assert files == {name: f"{directory}/{name}.parquet" for name in ("sweep", "restore", "control", "joint_mean")}
    assert layout.report_inputs()["mechanism"] == files and set(files.values()) <= set(layout.model_files())
    no_experiments = Layout(validate_config(_config(mechanism={"enabled": True}))).of("tiny")
    assert "mechanism" not in no_experiments.report_inputs()  # no confirm, nothing to study


def test_workflow_plans_the_mechanism_step(tmp_path):
    """The default target runs the mechanism after confirm, with the config's settings."""
    config = _config(experiments=[EXPERIMENT], seeds=[0], mechanism={"enabled": True, "scales": [0, 2]})
    planned = snakemake(tmp_path, config, "-n", "-p")
    assert planned.returncode == 0, planned.stdout[-3000:]
    command = next(line for line in planned.stdout.splitlines() if "esa run mechanism" in line)
    spec = json.loads(command.split("--spec '")[1].split("' ")[0])
    assert (spec["scales"], spec["massive_fraction"], spec["batch_size"]) == ([0, 2], 0.5, 4)
    layout = study_layout(config)
    for name in ("super_weights", "groups", "group_members"):
        assert f"{name}={layout.confirm_files()[name]}" in command
    assert f"control={layout.mechanism_files()['control']}" in command
    assert f"joint_mean={layout.mechanism_files()['joint_mean']}" in command
    assert "rule confirm:" in planned.stdout and "rule report:" in planned.stdout

"""Perturbations: exact formulas on exactly the selected entries, bit-exact restore, results table."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import assert_bit_identical, make_tiny_llama, snapshot
from esa.damage import Baseline, DamageMeter
from esa.evaluation import evaluate
from esa.perturb import RESULT_COLUMNS, perturbed, run_perturbations

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [("zero", 1.0, "relative"), ("sign_flip", 1.0, "relative"), ("sign_flip", 3.0, "relative"),
         ("gaussian", 0.5, "relative"), ("gaussian", 0.5, "absolute"), ("gaussian", 0.5, "tensor_std"),
         ("scale", 0.5, "relative"), ("scale", 2.0, "relative")]
TENSORS = ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"]








def selection(model, per_tensor: int = 4, seed: int = 0, set_name: str = "top") -> pd.DataFrame:
    """``per_tensor`` distinct random entries of each of TENSORS, in shuffled row order."""
    params = dict(model.named_parameters())
    rng = np.random.default_rng(seed)
    rows = [{"set": set_name, "tensor": name, "flat_index": int(i)}
            for name in TENSORS for i in rng.choice(params[name].numel(), per_tensor, replace=False)]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def mask(model, seed: int) -> pd.DataFrame:
    return pd.concat([selection(model, 4, seed + 10 * i, name)
                      for i, name in enumerate(("top", "random_k", "bottom_k"))], ignore_index=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,scale,noise", CASES)
def test_restore_is_bit_exact(kind, scale, noise, dtype):
    model = make_tiny_llama(dtype=dtype)
    before = snapshot(model)
    with perturbed(model, selection(model), kind, scale, noise, seed=3) as info:
        assert info.n_weights == 4 * len(TENSORS) and info.n_tensors == len(TENSORS)
        changed = sum(int((snapshot(model)[n] != before[n]).sum()) for n in before)
        assert changed > 0
    assert_bit_identical(model, before)


@pytest.mark.parametrize("kind,scale,noise", CASES)
def test_exactly_the_selected_entries_change_by_the_formula(kind, scale, noise):
    model = make_tiny_llama()
    sel = selection(model)
    original = {n: p.detach().clone().view(-1) for n, p in model.named_parameters()}
    # The documented noise order: one randn draw per tensor, tensors by name, indices ascending.
    generator = torch.Generator().manual_seed(7)
    expected = {n: w.clone() for n, w in original.items()}
    for name in sorted(TENSORS):
        index = torch.tensor(sorted(sel.loc[sel.tensor == name, "flat_index"]))
        w = original[name][index]
        if kind == "zero":
            new = torch.zeros_like(w)
        elif kind == "sign_flip":
            new = -scale * w
        elif kind == "scale":
            new = scale * w
        else:
            eps = torch.randn(len(index), generator=generator)
            spread = {"relative": scale * w.abs(), "absolute": scale,
                      "tensor_std": scale * original[name].std(correction=0)}[noise]
            new = w + spread * eps
        expected[name][index] = new
    with perturbed(model, sel, kind, scale, noise, seed=7):
        for name, param in model.named_parameters():
            assert torch.equal(param.detach().view(-1), expected[name]), name


def test_noise_depends_on_seed_not_on_row_order():
    model = make_tiny_llama()
    sel = selection(model)

    def values(selection_df, seed):
        with perturbed(model, selection_df, "gaussian", 0.5, "relative", seed):
            return torch.cat([model.get_parameter(n).detach().view(-1).clone() for n in TENSORS])

    reference = values(sel, seed=1)
    assert torch.equal(values(sel[::-1], seed=1), reference)
    assert not torch.equal(values(sel, seed=2), reference)


def test_duplicate_rows_touch_a_weight_once():
    model = make_tiny_llama()
    sel = selection(model)
    row = sel.iloc[0]
    weight = model.get_parameter(row.tensor).detach().view(-1)
    original = weight[row.flat_index].clone()
    with perturbed(model, pd.concat([sel, sel]), "sign_flip", 2.0) as info:
        assert info.n_weights == len(sel)
        assert weight[row.flat_index] == -2.0 * original  # flipped once, not back again
    assert weight[row.flat_index] == original


def test_tampering_with_a_touched_entry_raises_and_still_restores():
    model = make_tiny_llama()
    sel = selection(model)
    before = snapshot(model)
    row = sel.iloc[0]
    with pytest.raises(RuntimeError, match="modified while perturbed"):
        with perturbed(model, sel, "zero"):
            with torch.no_grad():
                model.get_parameter(row.tensor).view(-1)[row.flat_index] = 123.0
    assert_bit_identical(model, before)


def test_scale_zero_writes_the_bits_zero_writes():
    """The mechanism's scale sweep at s = 0 is confirm's ablation bit for bit: +0, never the -0
    that 0 * w gives for a negative w."""
    model = make_tiny_llama()
    sel = selection(model)
    with perturbed(model, sel, "zero"):
        zeroed = snapshot(model)
    with perturbed(model, sel, "scale", 0.0):
        scaled = snapshot(model)
    for name in zeroed:
        assert torch.equal(zeroed[name].view(torch.int32), scaled[name].view(torch.int32)), name


def test_a_failure_inside_the_context_still_restores():
    model = make_tiny_llama()
    before = snapshot(model)
    with pytest.raises(KeyError):
        with perturbed(model, selection(model), "gaussian", 1.0, "absolute"):
            raise KeyError("boom")
    assert_bit_identical(model, before)


@pytest.mark.parametrize("kwargs,allowed", [({"kind": "flip"}, "zero, sign_flip, gaussian, scale"),
                                            ({"kind": "gaussian", "noise": "uniform"},
                                             "relative, absolute, tensor_std")])
def test_unknown_perturbation_or_noise_lists_allowed_values(kwargs, allowed):
    model = make_tiny_llama()
    with pytest.raises(ValueError, match=allowed):
        with perturbed(model, selection(model), **kwargs):
            pass


def test_bad_selection_is_rejected():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="does not have"):
        with perturbed(model, pd.DataFrame({"tensor": ["nope.weight"], "flat_index": [0]}), "zero"):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with perturbed(model, pd.DataFrame({"tensor": [TENSORS[0]], "flat_index": [10**6]}), "zero"):
            pass


def test_empty_selection_leaves_the_loss_exactly_at_baseline(tiny_llama, tiny_windows):
    baseline = evaluate(tiny_llama, tiny_windows, batch_size=4)
    empty = pd.DataFrame({"tensor": pd.Series([], dtype=str), "flat_index": pd.Series([], dtype="int64")})
    with perturbed(tiny_llama, empty, "zero") as info:
        assert info.n_weights == 0
        assert evaluate(tiny_llama, tiny_windows, batch_size=4).loss == baseline.loss


def test_results_table_against_the_given_baseline(tiny_llama, tiny_windows):
    model, before = tiny_llama, snapshot(tiny_llama)
    baseline = Baseline.of(evaluate(model, tiny_windows, batch_size=4))
    masks = {1: mask(model, 1), 0: mask(model, 0)}
    results = run_perturbations(model, masks, tiny_windows, 4, baseline, "zero", progress=False)
    assert list(results.columns) == RESULT_COLUMNS
    assert list(zip(results.seed, results.set)) == [(s, n) for s in (0, 1) for n in ("top", "random_k", "bottom_k")]
    assert (results.n_weights == 4 * len(TENSORS)).all() and results.finite.all()
    for row in results.itertuples():
        with perturbed(model, masks[row.seed][masks[row.seed].set == row.set], "zero"):
            direct = evaluate(model, tiny_windows, batch_size=4)
        assert row.loss == direct.loss and row.ppl == direct.ppl
        assert row.delta_loss == direct.loss - baseline.loss
        assert row.delta_ppl == direct.ppl - baseline.ppl
        assert row.ppl_ratio == direct.ppl / baseline.ppl
    assert (results.delta_ppl != 0).all()
    assert_bit_identical(model, before)

    # Zero-scale noise writes the weights back unchanged: the deltas are exactly 0.
    unchanged = run_perturbations(model, masks, tiny_windows, 4, baseline, "gaussian", 0.0, progress=False)
    assert (unchanged.delta_loss == 0).all() and (unchanged.ppl == baseline.ppl).all()
    assert (unchanged.ppl_ratio == 1).all() and not unchanged.evaluated.any()
    assert results.evaluated.all()


def test_a_set_that_changes_no_value_is_the_baseline_without_evaluating(tiny_llama, tiny_windows, monkeypatch):
    """sign_flip of weights that are 0 writes -0.0: the same function, so the row is the
    baseline's (equal to a real evaluation) and the model is not evaluated again."""
    model = tiny_llama
    name = TENSORS[0]
    with torch.no_grad():
        model.get_parameter(name).view(-1)[:4] = 0.0
    baseline = Baseline.of(evaluate(model, tiny_windows, batch_size=4))
    zeros = pd.DataFrame({"set": "bottom_k", "tensor": name, "flat_index": np.arange(4)})
    with perturbed(model, zeros, "sign_flip") as info:
        assert info.n_changed == 0 and info.n_weights == 4
        assert torch.signbit(model.get_parameter(name).view(-1)[:4]).all()  # -0.0 was written
        direct = evaluate(model, tiny_windows, batch_size=4)
    assert direct.loss == baseline.loss
    calls = []
    measure = DamageMeter.measure
    monkeypatch.setattr(DamageMeter, "measure", lambda *a, **k: calls.append(a) or measure(*a, **k))
    result = run_perturbations(model, {0: zeros}, tiny_windows, 4, baseline, "sign_flip",
                               sets=("bottom_k",), progress=False)
    assert calls == [] and not result.evaluated.item()
    assert result.loss.item() == direct.loss and result.delta_ppl.item() == 0.0


def test_same_seed_gives_identical_results(tiny_llama, tiny_windows):
    baseline = Baseline.of(evaluate(tiny_llama, tiny_windows, batch_size=4))
    masks = {0: mask(tiny_llama, 0), 5: mask(tiny_llama, 5)}

    def run():
        return run_perturbations(tiny_llama, masks, tiny_windows, 4, baseline, "gaussian", 2.0, "tensor_std",
                                 progress=False)

    first = run()
    pd.testing.assert_frame_equal(run(), first)
    assert first.loc[first.seed == 0, "loss"].tolist() != first.loc[first.seed == 5, "loss"].tolist()


def test_non_finite_loss_is_recorded_not_raised(tiny_windows):
    model = make_tiny_llama(dtype=torch.float16)
    before = snapshot(model)
    baseline = Baseline.of(evaluate(model, tiny_windows, batch_size=4))
    # 1e9 * eps overflows fp16 (max 65504): the selected weights become +-inf, the loss NaN.
    results = run_perturbations(model, {0: mask(model, 0)}, tiny_windows, 4, baseline, "gaussian", 1e9,
                                "absolute", sets=("top",), progress=False)
    assert not results.finite.any() and math.isinf(results.ppl[0]) and math.isinf(results.delta_ppl[0])
    assert_bit_identical(model, before)


def test_overflowing_perplexity_is_inf_not_an_error(tiny_llama, tiny_windows):
    baseline = Baseline.of(evaluate(tiny_llama, tiny_windows, batch_size=4))
    # Huge lm_head weights give logits ~1e20: a finite loss far above log(float max) ~ 709.8.
    huge = pd.DataFrame({"set": "top", "tensor": "lm_head.weight", "flat_index": range(64 * 16)})
    results = run_perturbations(tiny_llama, {0: huge}, tiny_windows, 4, baseline, "sign_flip", 1e20,
                                sets=("top",), progress=False)
    assert results.finite[0] and results.loss[0] > 710 and results.ppl[0] == math.inf


def test_unknown_or_missing_set_is_an_error(tiny_llama, tiny_windows):
    baseline = Baseline.of(evaluate(tiny_llama, tiny_windows, batch_size=4))
    top_only = {0: selection(tiny_llama)}
    with pytest.raises(ValueError, match="top, random_k, bottom_k"):
        run_perturbations(tiny_llama, top_only, tiny_windows, 4, baseline, "zero", sets=("top", "random"))
    with pytest.raises(ValueError, match="no rows of set 'bottom_k'"):
        run_perturbations(tiny_llama, top_only, tiny_windows, 4, baseline, "zero", sets=("top", "bottom_k"))


def test_tied_weights_selected_under_both_names_are_touched_once():
    model = make_tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    before = snapshot(model)
    both = pd.DataFrame({"tensor": ["lm_head.weight", "model.embed_tokens.weight"], "flat_index": [5, 5]})
    with perturbed(model, both, "sign_flip", 2.0) as info:
        assert (info.n_weights, info.n_tensors) == (1, 1)
    assert_bit_identical(model, before)

"""RTN weight quantization with weights kept in full precision (esa.quantize, esa.protect): the
formulas on a hand-computed matrix, the in-place edit and its bit-exact restore (Linear, GPT-2
Conv1D, 3-D expert stacks, bf16), the planted super weight's protection, the protect conditions,
the workflow step, the protect-mask export and the report's section."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import confirm_by_activation, make_tiny_llama, snakemake, unigram_text
from safetensors.numpy import load_file
from test_confirm import COL, DOWN, INTERMEDIATE, ROW, _planted_model
from test_moe import _model as moe_model
from transformers import GPT2Config, GPT2LMHeadModel

from esa.candidates import build_candidates
from esa.damage import DAMAGE_COLUMNS, Baseline, DamageMeter
from esa.data import windows_frame
from esa.errors import ESAError
from esa.evaluation import evaluate
from esa.io import write_json_atomic, write_parquet_atomic
from esa.model_steps import step_quantize
from esa.models import materialize
from esa.protect import PROTECT_MASK_COLUMNS, PROTECTED_WEIGHT_COLUMNS, protect_conditions, random_weights, resolve_k
from esa.quantize import RESULT_COLUMNS, Scheme, quantized, quantized_targets, rtn, run_quantization
from esa.report import _quantize_section
from esa.scores import compute_scores
from esa.step_specs import typed_spec
from esa.steps import step_protect_mask
from esa.targets import find_targets, target_parameter, target_table

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 rows x 8 columns; protected: (0, 5), and all of row 2's first group
MATRIX = torch.tensor([[0.0, 0.7, 1.5, 1.2, -3.0, 9.0, -1.6, 0.0],
                       [2.0, 2.0, 2.0, 2.0, -1.5, 1.5, 0.1, -0.8],
                       [0.3, 0.1, 0.2, 0.9, 4.0, 7.0, 1.0, 2.5]])
PROTECTED = torch.zeros(3, 8, dtype=torch.bool)
PROTECTED[0, 5] = PROTECTED[2, :4] = PROTECTED[2, 5] = True


def test_rtn_formulas_on_a_hand_computed_matrix():
    """2 bits (levels 0..3), groups of 4: lo/hi over the unprotected weights of each group,
    scale = (hi - lo) / 3, w' = lo + round((w - lo) / scale) * scale."""
    expected = torch.tensor([
        # [0, .7, 1.5, 1.2]: lo 0, hi 1.5, scale .5, q 0,1,3,2 | [-3, (9), -1.6, 0]: the kept 9 is
        # out of the range: lo -3, hi 0, scale 1, q 0,-,1,3
        [0.0, 0.5, 1.5, 1.0, -3.0, 9.0, -2.0, 0.0],
        # all equal: scale 0, unchanged | lo -1.5, hi 1.5, scale 1: 1.6 -> 2, 0.7 -> 1
        [2.0, 2.0, 2.0, 2.0, -1.5, 1.5, 0.5, -0.5],
        # a fully kept group, unchanged | [4, (7), 1, 2.5]: lo 1, hi 4, scale 1: 1.5 rounds to even 2
        [0.3, 0.1, 0.2, 0.9, 4.0, 7.0, 1.0, 3.0]])
    assert torch.equal(rtn(MATRIX, 2, 4, PROTECTED), expected)
    # one group per output channel: the kept 9 leaves row 0 the range [-3, 1.5] (scale 1.5) ...
    row = MATRIX[:1]
    kept = PROTECTED[:1]
    assert rtn(row, 2, None, kept).tolist() == [[0.0, 0.0, 1.5, 1.5, -3.0, 9.0, -1.5, 0.0]]
    # ... while quantized with the rest it stretches the range to [-3, 9] (scale 4): the row collapses
    assert rtn(row, 2).tolist() == [[1.0, 1.0, 1.0, 1.0, -3.0, 9.0, -3.0, 1.0]]


def _gpt2():
    """GPT-2's Conv1D stores each weight [in, out]: groups run along the storage's first dimension."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("build, dtype", [
    (make_tiny_llama, torch.float32), (make_tiny_llama, torch.bfloat16), (_gpt2, torch.float32),
    (lambda: moe_model("mixtral"), torch.float32)], ids=["llama", "llama-bf16", "gpt2", "mixtral"])
def test_quantized_writes_rtn_in_place_and_restores_bit_exactly(build, dtype):
    model = build().to(dtype)
    targets = find_targets(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    first, last = targets[0], targets[-1]
    kept = pd.DataFrame({"tensor": [first.name, last.name], "flat_index": [3, last.numel - 1]})
    assert any(t.transposed for t in targets) == (build is _gpt2)
    assert any(t.stacked for t in targets) == (build is not _gpt2 and build is not make_tiny_llama)
    with quantized(model, targets, Scheme(3, 8), kept):
        for target in targets:
            original = target.matrix(before[target.param_name])
            mask = torch.zeros(target.rows, target.cols, dtype=torch.bool)
            if target is first:
                mask[0, 3] = True
            if target is last:
                mask[-1, -1] = True
            now = target.matrix(target_parameter(model, target).detach())
            assert torch.equal(now, rtn(original, 3, 8, mask).to(dtype)), target.name
            assert torch.equal(now[mask], original[mask])
        assert not torch.equal(now, original)
    for name, p in model.named_parameters():
        assert torch.equal(p.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           before[name].view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), name


@pytest.mark.parametrize("scheme", [Scheme(3), Scheme(4, 8)], ids=["per-channel", "group-8"])
def test_protecting_rewrites_only_its_rows_with_the_bits_of_quantizing_afresh(scheme):
    """A protect condition inside one quantization of the model equals quantizing every matrix from
    scratch with those weights kept, and leaving it gives back the unprotected bits."""
    model = make_tiny_llama()
    targets = find_targets(model)
    originals = {t.name: t.matrix(target_parameter(model, t).detach()).clone() for t in targets}
    first, last = targets[0], targets[-1]
    kept = pd.DataFrame({"tensor": [first.name, first.name, last.name],
                         "flat_index": [3, first.cols * 2 + 5, last.numel - 1]})
    masks = {t.name: torch.zeros(t.rows, t.cols, dtype=torch.bool) for t in targets}
    for name, flat in zip(kept["tensor"], kept["flat_index"]):
        masks[name].view(-1)[flat] = True

    def now():
        return {t.name: t.matrix(target_parameter(model, t).detach()).clone() for t in targets}

    with quantized_targets(model, targets, scheme) as quantized_model:
        unprotected = now()
        for _ in range(2):  # twice: leaving the first left the unprotected bits behind
            with quantized_model.protecting(kept):
                for name, matrix in now().items():
                    assert torch.equal(matrix, rtn(originals[name], scheme.bits, scheme.group_size, masks[name]))
            assert all(torch.equal(unprotected[name], matrix) for name, matrix in now().items())
        assert all(torch.equal(matrix, rtn(originals[name], scheme.bits, scheme.group_size))
                   for name, matrix in unprotected.items())
    assert all(torch.equal(originals[name], matrix) for name, matrix in now().items())


def test_restore_follows_an_error_and_a_failed_check_is_a_runtime_error(tiny_llama, monkeypatch):
    targets = find_targets(tiny_llama)
    before = {name: p.detach().clone() for name, p in tiny_llama.named_parameters()}
    with pytest.raises(KeyError), quantized(tiny_llama, targets, Scheme(2)):
        raise KeyError("boom")
    assert all(torch.equal(p, before[name]) for name, p in tiny_llama.named_parameters())
    monkeypatch.setattr("esa.quantize.same_bits", lambda a, b: False)
    with pytest.raises(RuntimeError, match="differ from the saved originals after restore"):
        with quantized(tiny_llama, targets, Scheme(2)):
            pass


def test_a_group_size_that_does_not_divide_is_one_line_naming_it(tiny_llama):
    targets = find_targets(tiny_llama)
    before = [p.detach().clone() for p in tiny_llama.parameters()]
    with pytest.raises(ESAError) as err, quantized(tiny_llama, targets, Scheme(4, 12)):
        pass
    assert str(err.value) == ("quantize group_size 12 does not divide the input dimension 16 of "
                              "model.layers.0.self_attn.q_proj.weight")
    assert all(torch.equal(p, b) for p, b in zip(tiny_llama.parameters(), before))
    Scheme(4, 16).check(targets)  # divides both 16 (hidden) and 32 (intermediate)
    with pytest.raises(ESAError, match="group_size 32 does not divide the input dimension 16"):
        Scheme(4, 32).check(targets)


MID, NEG = 20, 30  # two more massive channels of layer 0's MLP, written into row ROW of down_proj


def _fragile_row_model():
    """The planted super weight of test_confirm, in a row whose other weights matter.

    In the plain planted model the super weight's row holds nothing else of use, and min-max
    RTN always keeps a group's extremes, so keeping the super weight in full precision changes
    nothing (measured: int3 per channel, PPL 6.62795 either way). Here input channels MID and
    NEG carry the same massive activation A as COL (NEG's twice: up_proj row doubled), and
    down_proj[ROW, MID] = 0.4, down_proj[ROW, NEG] = -0.65, so residual channel ROW is
    A * (1 + 0.4 - 2 * 0.65) = 0.1 A. Quantized with the super weight (1.0) in its row, int3's
    step is (1 + 0.65) / 7 = 0.236 and 0.4 becomes 0.293: channel ROW goes to ~0 and the unigram
    with it. Kept out of the range, the row's extremes are 0.4 and -0.65, both exact.
    """
    model = _planted_model()
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        for channel, factor in ((MID, 1.0), (NEG, 2.0)):
            mlp.gate_proj.weight[channel] = mlp.gate_proj.weight[COL]
            mlp.up_proj.weight[channel] = factor * mlp.up_proj.weight[COL]
        mlp.down_proj.weight[ROW, MID] = 0.4
        mlp.down_proj.weight[ROW, NEG] = -0.65
    return model


def test_keeping_the_planted_super_weight_saves_int3_per_channel():
    model = _fragile_row_model()
    targets = find_targets(model)
    windows = unigram_text(8, seed=2)
    baseline = evaluate(model, windows, 4).ppl
    super_weight = pd.DataFrame({"tensor": [DOWN], "flat_index": [ROW * INTERMEDIATE + COL]})
    with quantized(model, targets, Scheme(3)):
        assert float(model.get_parameter(DOWN).detach()[ROW, MID]) == pytest.approx(-0.65 + 4 * 1.65 / 7, abs=1e-6)
        none = evaluate(model, windows, 4).ppl
    with quantized(model, targets, Scheme(3), super_weight):
        assert float(model.get_parameter(DOWN).detach()[ROW, MID]) == pytest.approx(0.4, abs=1e-7)
        kept = evaluate(model, windows, 4).ppl
    assert kept < none
    assert kept / baseline < 1.02 and none / baseline > 5  # measured: 10.50 unquantized, 10.57 kept, 94.2 none


def test_percent_k_is_a_share_of_every_target_weight_rounded_up():
    assert resolve_k("0.1%", 123_456) == 124
    assert resolve_k("1.1%", 1000) == 11  # float arithmetic says 11.000000000000002 -> 12
    assert resolve_k("0.07%", 10_000) == 7
    assert resolve_k("100%", 50) == 50 and resolve_k(".5%", 10) == 1 and resolve_k(7, 10) == 7
    for value, message in [("0%", "a share must be a number in (0, 100]"), ("101%", "(0, 100]"),
                           ("x%", "a share must be"), (0, "0 weights is not between 1 and the 10"),
                           (11, "11 weights is not between 1 and the 10 target weights"), ("5", "expected a count")]:
        with pytest.raises(ESAError, match=r"^quantize\.protect .*" + message.replace("(", r"\(").replace(")", r"\)")):
            resolve_k(value, 10)


def test_random_k_draws_distinct_weights_over_every_target():
    table = target_table(find_targets(make_tiny_llama()))
    drawn = random_weights(table, 500, seed=3)
    assert len(drawn.drop_duplicates(["tensor", "flat_index"])) == 500
    shape = table.set_index("tensor").loc[drawn["tensor"]]
    assert ((drawn["flat_index"] >= 0) & (drawn["flat_index"].to_numpy() < shape["numel"].to_numpy())).all()
    assert (drawn["row"] * shape["cols"].to_numpy() + drawn["col"] == drawn["flat_index"]).all()
    assert drawn["tensor"].nunique() == len(table)  # 500 of 4608 reach all 14 matrices
    pd.testing.assert_frame_equal(drawn, random_weights(table, 500, seed=3))
    assert not drawn.equals(random_weights(table, 500, seed=4))


def _scored(model, metrics=("grad_x_weight", "activation_magnitude"), m=8):
    """Random scores per metric as candidates (M = ``m`` per tensor) and the tensor table."""
    targets = find_targets(model)
    weights = {t.name: t.matrix(target_parameter(model, t).detach()) for t in targets}
    generator = torch.Generator().manual_seed(5)
    candidates = {}
    for metric in metrics:
        scores = {t.name: torch.rand(t.rows, t.cols, generator=generator) for t in targets}
        candidates[metric] = build_candidates(targets, weights, scores, scores, m=m)
    return targets, target_table(targets), candidates


NO_SUPER_WEIGHTS = pd.DataFrame(columns=PROTECTED_WEIGHT_COLUMNS)


def test_conditions_and_one_row_per_scheme_and_condition(tiny_llama):
    targets, table, candidates = _scored(tiny_llama)
    windows = unigram_text(4, seed=2)
    baseline = Baseline.of(evaluate(tiny_llama, windows, 4))
    # "0.16%" of the 4608 target weights is 8 (7.37 rounded up); 8 twice counts once
    conditions = protect_conditions(candidates, table, [1, "0.16%", 8], 0, NO_SUPER_WEIGHTS)
    assert [(c.protect, c.metric, c.k, len(c.weights)) for c in conditions] == [
        ("none", "", 0, 0), ("metric", "grad_x_weight", 1, 1), ("metric", "grad_x_weight", 8, 8),
        ("metric", "activation_magnitude", 1, 1), ("metric", "activation_magnitude", 8, 8),
        ("random_k", "", 1, 1), ("random_k", "", 8, 8), ("super_weights", "", 0, 0)]
    top = conditions[2].weights
    assert list(top.columns) == PROTECT_MASK_COLUMNS and top["score"].is_monotonic_decreasing
    evaluated = []
    tiny_llama.model.norm.register_forward_hook(lambda *args: evaluated.append(1))
    schemes = [Scheme(3), Scheme(4, 8)]

    result = run_quantization(tiny_llama, targets, schemes, conditions, windows, 4, baseline, progress=False)

    assert list(result.columns) == RESULT_COLUMNS
    assert len(result) == 2 * len(conditions)
    assert len(evaluated) == 1 + 2 * 7  # the reference, then every condition but the empty super_weights
    assert result[["bits", "group_size"]].drop_duplicates().values.tolist() == [[3, -1], [4, 8]]
    for _, part in result.groupby("bits"):
        none, saved = part.iloc[0], part.iloc[-1]
        assert saved[DAMAGE_COLUMNS].equals(none[DAMAGE_COLUMNS])  # nothing confirmed: none's row
        assert (part["ppl"].iloc[1:-1] != none["ppl"]).all()
    # each row equals quantizing and evaluating the whole model from scratch
    meter = DamageMeter(tiny_llama, windows, 4, baseline)
    with quantized(tiny_llama, targets, schemes[1], conditions[4].weights):
        assert result.iloc[len(conditions) + 4]["ppl"] == meter.measure()["ppl"] == evaluate(tiny_llama, windows, 4).ppl
    with pytest.raises(ESAError, match=r"^quantize\.protect 9: k=9 is more than the 8 candidates"):
        protect_conditions(candidates, table, [9], 0, NO_SUPER_WEIGHTS)


def test_super_weights_kept_are_the_confirmed_ones(tiny_llama):
    _, table, candidates = _scored(tiny_llama, ["grad_x_weight"])
    confirmed = pd.DataFrame({"tensor": ["model.layers.1.mlp.down_proj.weight"], "flat_index": [33], "row": [1],
                              "col": [1]})
    saved = protect_conditions(candidates, table, [2], 0, confirmed)[-1]
    assert (saved.protect, saved.k) == ("super_weights", 1)
    assert saved.weights.to_dict("list") == {"tensor": ["model.layers.1.mlp.down_proj.weight"], "flat_index": [33],
                                             "row": [1], "col": [1]}


def test_protect_mask_export(tmp_path):
    model = _gpt2()
    targets, table, candidates = _scored(model, ["grad_x_weight"], m=4)
    stats = table.assign(sum=1.0)
    paths = {"candidates": tmp_path / "candidates.parquet", "stats": tmp_path / "stats.parquet",
             "mask": tmp_path / "out/grad_x_weight_k3.parquet",
             "tensors": tmp_path / "out/grad_x_weight_k3.safetensors"}
    candidates["grad_x_weight"].to_parquet(paths["candidates"])
    stats.to_parquet(paths["stats"])

    files = {k: str(v) for k, v in paths.items()}
    step_protect_mask(typed_spec("protect_mask", {"metric": "grad_x_weight", "k": 3}), **files)

    mask = pd.read_parquet(paths["mask"])
    assert list(mask.columns) == PROTECT_MASK_COLUMNS and len(mask) == 3
    arrays = load_file(paths["tensors"])
    assert sorted(arrays) == sorted(set(mask["tensor"]))
    shapes = table.set_index("tensor")
    for name, array in arrays.items():
        assert array.dtype == np.bool_ and array.shape == (shapes.loc[name, "rows"], shapes.loc[name, "cols"])
        rows = mask[mask["tensor"] == name]
        assert np.flatnonzero(array).tolist() == sorted(rows["flat_index"])
        assert array[rows["row"], rows["col"]].all()
    with pytest.raises(ESAError, match=r"^protect mask grad_x_weight k=5: k=5 is more than the 4 candidates"):
        step_protect_mask(typed_spec("protect_mask", {"metric": "grad_x_weight", "k": 5}), **files)


def test_step_quantize_writes_one_row_per_scheme_and_condition(tmp_path):
    """The workflow step on a saved tiny checkpoint with the planted super weight, confirmed by
    activation_magnitude (a Snakemake run of the rule costs minutes on a busy machine)."""
    model = _planted_model()
    confirmation, baseline = confirm_by_activation(model, top_n=3)
    windows = unigram_text(8, seed=2)  # confirm_by_activation's evaluation windows
    model.save_pretrained(tmp_path / "checkpoint")
    materialize(str(tmp_path / "checkpoint"), tmp_path / "model")
    targets = find_targets(model)
    scores = compute_scores(model, targets, unigram_text(8, seed=1), ["activation_magnitude"], batch_size=4, seed=0,
                            progress=False)["activation_magnitude"]
    files = {name: tmp_path / f"{name}.parquet" for name in ("eval", "baseline_windows", "candidates", "super_weights")}
    write_parquet_atomic(windows_frame(windows.numpy()), files["eval"])
    write_parquet_atomic(pd.DataFrame({"window": range(8), "nll": baseline.nll, "tokens": baseline.tokens}),
                         files["baseline_windows"])
    write_parquet_atomic(build_candidates(targets, scores.weights, scores.stat, scores.score, m=80),
                         files["candidates"])
    write_parquet_atomic(confirmation.super_weights, files["super_weights"])
    write_json_atomic({"loss": baseline.loss, "ppl": baseline.ppl}, tmp_path / "metrics.json")
    spec = {"model": "tiny", "device": "cpu", "dtype": "fp32", "attn_implementation": "eager", "device_map": None,
            "loss_chunk": 256, "batch_size": 4, "bootstrap": {"resamples": 100, "level": 0.9, "seed": 0},
            "targets": {"include": [], "exclude": []}, "metrics": ["activation_magnitude"],
            "schemes": [{"bits": 3, "group_size": None}], "protect": [1, "0.4%"], "seed": 0}
    out = {"results": tmp_path / "out/results.parquet", "manifest": tmp_path / "out/experiment_manifest.json"}

    step_quantize(typed_spec("quantize", spec), model=str(tmp_path / "model/model.json"),
                  eval=str(files["eval"]), baseline=str(tmp_path / "metrics.json"),
                  baseline_windows=str(files["baseline_windows"]),
                  candidates={"activation_magnitude": str(files["candidates"])},
                  super_weights=str(files["super_weights"]), **{k: str(v) for k, v in out.items()})

    result = pd.read_parquet(out["results"])
    assert list(result.columns) == RESULT_COLUMNS
    # "0.4%" of the 18432 target weights: 74 (73.73 rounded up)
    assert list(zip(result["protect"], result["metric"], result["k"], result["n_protected"])) == [
        ("none", "", 0, 0), ("metric", "activation_magnitude", 1, 1), ("metric", "activation_magnitude", 74, 74),
        ("random_k", "", 1, 1), ("random_k", "", 74, 74), ("super_weights", "", 1, 1)]
    assert (result["bits"] == 3).all() and (result["group_size"] == -1).all()
    assert (result["ppl"] - result["delta_ppl"] - baseline.ppl).abs().max() < 1e-12
    assert result["finite"].all() and (result["delta_ppl_lo"] <= result["delta_ppl_hi"]).all()
    # activation_magnitude's top-1 is the planted super weight, the one confirmed: the same edit
    assert result["ppl"].iloc[1] == result["ppl"].iloc[5]
    assert json.loads(out["manifest"].read_text())["baseline_ppl"] == baseline.ppl

    spec["schemes"] = [{"bits": 3, "group_size": 24}]
    with pytest.raises(ESAError, match="^quantize group_size 24 does not divide the input dimension 32 of "):
        step_quantize(typed_spec("quantize", spec), model=str(tmp_path / "model/model.json"), eval=str(files["eval"]),
                      baseline=str(tmp_path / "metrics.json"), baseline_windows=str(files["baseline_windows"]),
                      candidates={"activation_magnitude": str(files["candidates"])},
                      super_weights=str(files["super_weights"]), **{k: str(v) for k, v in out.items()})


def test_report_section_draws_ppl_against_k(tmp_path):
    rows = []
    for bits, group in ((3, -1), (4, 32)):
        rows.append((bits, group, "none", "", 0, 0, 30.0))
        for k, ppl in ((1, 20.0), (10, 15.0), (100, 12.0)):
            rows += [(bits, group, "metric", "grad_x_weight", k, k, ppl),
                     (bits, group, "metric", "activation_magnitude", k, k, ppl + 1),
                     (bits, group, "random_k", "", k, k, 29.0)]
        rows.append((bits, group, "super_weights", "", 2, 2, 18.0 if bits == 3 else float("inf")))
    results = pd.DataFrame(rows, columns=["bits", "group_size", "protect", "metric", "k", "n_protected", "ppl"]).assign(
        delta_ppl=lambda f: f["ppl"] - 10.0, delta_ppl_lo=0.0, delta_ppl_hi=1.0, kl=0.1, top1=0.9,
        finite=lambda f: np.isfinite(f["ppl"]))

    html = _quantize_section(results, 10.0, tmp_path)

    assert (tmp_path / "quantize_protection.png").stat().st_size > 10_000
    assert html.startswith('<section id="quantize"><h2>Quantization: what protection buys</h2>')
    assert ("<li><b>int3, per channel</b>: none kept: PPL 30; the 2 confirmed super weight(s) kept: PPL 18; "
            "best: grad_x_weight top-100 kept: PPL 12 (random_k 100: 29)</li>") in html
    assert "<b>int4, group 32</b>" in html and 'alt="PPL vs weights protected"' in html
    assert _quantize_section(None, 10.0, tmp_path).endswith('<p class="not-run">not run</p></section>')


@pytest.mark.parametrize("quantize, candidates, message", [
    ({"schemes": [{"bits": 4, "group_size": 64}], "protect": [10, 100]}, 50,
     "quantize.protect 100 is more than scoring.candidates 50"),
    ({"schemes": [{"bits": 1, "group_size": 64}]}, 300, "invalid config at quantize.schemes.0.bits"),
])
def test_bad_quantize_config_stops_before_any_job(tmp_path, quantize, candidates, message):
    """Caught when the DAG is built: one line naming the value, nothing scheduled or written."""
    config = {"model": {"name": "tiny", "source": "/nonexistent"}, "data": {"source": "builtin:pydoc"},
              "scoring": {"candidates": candidates}, "quantize": quantize,
              "experiments": [{"name": "e", "metric": "grad_x_weight", "mode": "global", "topk": 5}]}
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0 and message in result.stdout, result.stdout[-2000:]
    assert not (tmp_path / "results").exists()

"""Super-weight confirmation on a tiny Llama with ONE planted super weight, found by scoring;
the layer-skipping ablations against full evaluations on three model families."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import UNIGRAM, confirm_by_activation, make_tiny_llama, shared_sign_direction, unigram_text
from torch import nn
from transformers import FalconH1Config, FalconH1ForCausalLM, Gemma2Config, Gemma2ForCausalLM

from esa.candidates import build_candidates
from esa.confirm import (ABLATION_COLUMNS, SUPER_EXPERT_COLUMNS, SUPER_WEIGHT_COLUMNS, activation_trace,
                         confirm_super_experts, confirm_super_weights, global_top, zero_each)
from esa.damage import Baseline
from esa.errors import ESAError
from esa.evaluation import evaluate
from esa.perturb import perturbed
from esa.replay import first_changed_layer
from esa.score_stats import build_stats
from esa.activation_trace import TRACE_COLUMNS
from esa.scores import compute_scores
from esa.targets import Target, find_targets, target_table

HIDDEN, INTERMEDIATE, VOCAB = 32, 64, 64
ROW, COL = 5, 7  # the planted super weight: layer 0 mlp.down_proj[ROW, COL]
DOWN = "model.layers.0.mlp.down_proj.weight"


pytestmark = pytest.mark.usefixtures("one_thread")


def _planted_model():
    """A random Llama whose good PPL depends on one weight, as with a real super weight.

    Every token embedding shares a constant direction s (residual channel ROW excluded), so
    down_proj input channel COL = silu(gate_COL . x) * (up_COL . x), with gate/up rows along s
    (spread over 31 inputs, so no single gate/up weight matters), is a massive activation
    (~100) on every token. W_down[ROW, COL] = 1 writes it into residual channel ROW, where it
    dominates every later RMSNorm, and lm_head column ROW turns that channel into the unigram
    log-probabilities. Zeroing W_down[ROW, COL] alone loses the unigram: PPL goes from ~e^2 to
    ~VOCAB. Every other down_proj[:, COL] weight is random (~0.02): zeroing one shifts a channel
    by ~2 next to ~100 and costs nothing.
    """
    model = make_tiny_llama(hidden=HIDDEN, intermediate=INTERMEDIATE, vocab=VOCAB)
    signs = shared_sign_direction(model, ROW)
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[COL] = 10 * signs / (HIDDEN - 1)
        mlp.up_proj.weight[COL] = 10 * signs / (HIDDEN - 1)
        mlp.down_proj.weight[ROW, COL] = 1.0
        model.lm_head.weight[:, ROW] = UNIGRAM.log() / math.sqrt(HIDDEN)
    return model


def test_confirm_finds_exactly_the_planted_super_weight():
    model = _planted_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    confirmation, baseline = confirm_by_activation(model, top_n=10)
    result = confirmation.super_weights

    # super_weights.parquet's layout: metric, rank (int64), the weight's key, the rest of
    # ABLATION_COLUMNS
    assert list(result.columns) == SUPER_WEIGHT_COLUMNS == [
        "metric", "rank", "tensor", "flat_index", *(c for c in ABLATION_COLUMNS if c not in ("tensor", "flat_index"))]
    assert len(result) == 10 and (result["metric"] == "activation_magnitude").all()
    assert result["rank"].dtype == "int64" and result["rank"].tolist() == list(range(10))
    assert result["score"].is_monotonic_decreasing
    confirmed = result[result["confirmed"]]
    assert len(confirmed) == 1
    hit = confirmed.iloc[0]
    assert (hit["tensor"], hit["layer"], hit["module"], hit["row"], hit["col"], hit["flat_index"]) == (
        DOWN, 0, "mlp.down_proj", ROW, COL, ROW * INTERMEDIATE + COL)
    assert hit["weight"] == 1.0 and result.index[result["confirmed"]].tolist() == [0]  # ranked first
    # baseline ~ exp(unigram entropy 2.04); without the weight the prediction is ~uniform over 64
    assert baseline.ppl == pytest.approx(6.63, abs=0.05)
    assert hit["ppl_before"] == baseline.ppl
    assert 40 < hit["ppl_after"] < 80 and hit["ppl_ratio"] > 6
    assert (np.exp(result["loss_after"]) == result["ppl_after"]).all()  # the loss of the same measurement
    others = result[~result["confirmed"]]
    assert (others["ppl_ratio"] - 1).abs().max() < 0.01  # the rest of its column: harmless
    for name, p in model.named_parameters():  # every zeroing was undone bit-exactly
        assert torch.equal(p, before[name]), name
    assert confirmation.rerun.nll.tolist() == baseline.nll.tolist()  # the rerun is the baseline, bit for bit
    pd.testing.assert_frame_equal(confirmation.activations, activation_trace(model, unigram_text(8, seed=2), 4))


def test_confirm_runs_the_unmodified_model_twice_not_three_times():
    """The reference pass of the damage meter yields the activation trace too (before: a pass of
    its own first): with no weight to zero, zero_each embeds each batch once for the reference
    and once for the rerun, and the trace equals the standalone trace's."""
    model = _planted_model()
    windows = unigram_text(8, seed=2)
    calls = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        result = zero_each(model, pd.DataFrame(columns=["tensor", "layer", "module", "expert", "part", "row", "col",
                                                        "flat_index", "weight", "score"]),
                           windows, 4, Baseline.of(evaluate(model, windows, 4)))
    finally:
        handle.remove()
    assert len(calls) == 2 * 2 + 2  # the baseline here, then the reference and the rerun: 2 batches each
    pd.testing.assert_frame_equal(result.activations, activation_trace(model, windows, 4))


def test_factor_is_the_confirmation_line():
    model = _planted_model()
    evaluation = unigram_text(4, seed=2)
    baseline = Baseline.of(evaluate(model, evaluation, batch_size=4))
    candidates = pd.DataFrame({"tensor": DOWN, "layer": 0, "module": "mlp.down_proj", "expert": -1, "part": "",
                               "row": [ROW],
                               "col": [COL], "flat_index": [ROW * INTERMEDIATE + COL], "weight": [1.0],
                               "stat": [1.0], "score": [1.0], "rank_in_tensor": [0], "end": "top"})

    def confirmed(factor: float) -> pd.Series:
        return zero_each(model, candidates, evaluation, 4, baseline, factor=factor).super_weights["confirmed"]

    ratio = zero_each(model, candidates, evaluation, 4, baseline).super_weights["ppl_ratio"].iloc[0]
    assert confirmed(ratio).all()
    assert not confirmed(ratio * (1 + 1e-9)).any()


def test_global_top_orders_across_tensors_with_ties():
    targets = [Target("a", 0, "mlp.down_proj", 2, 3), Target("b", 1, "mlp.down_proj", 2, 3)]
    scores = {"a": torch.tensor([[0.1, 0.1, 5.0], [0.1, 5.0, 0.1]]),
              "b": torch.tensor([[0.1, 7.0, 5.0], [5.0, 0.1, 0.1]])}
    candidates = build_candidates(targets, scores, scores, scores, m=4)
    table = target_table(targets)
    top = global_top(candidates, table, 4)
    # 7 first; the 5.0 ties: tensor a (first in the table) before b, lower flat index first
    assert list(zip(top["tensor"], top["flat_index"])) == [("b", 1), ("a", 2), ("a", 4), ("b", 2)]
    assert top["rank"].tolist() == [0, 1, 2, 3]
    # bottom-end rows are never candidates, even one scored above every top-end row
    bottom = candidates["end"] == "bottom"
    candidates.loc[bottom & (candidates["tensor"] == "a"), "score"] = 100.0
    pd.testing.assert_frame_equal(global_top(candidates, table, 4), top)
    # beyond the 4 candidates kept per tensor the global top-5 is not exact: refused, not cut short
    with pytest.raises(ESAError, match=r"confirm\.top_n=5: .*4 candidates.*M must be >= k"):
        global_top(candidates, table, 5)
    with pytest.raises(ESAError, match="top_n"):
        global_top(candidates, table, 0)


def test_confirm_tests_each_weight_of_the_metrics_top_n_once():
    """A weight in two metrics' top-N is zeroed once and reported under both, with the row
    (score included) of the metric listed first; the rest of the layout is that of one metric."""
    model = _planted_model()
    evaluation = unigram_text(4, seed=2)
    baseline = Baseline.of(evaluate(model, evaluation, batch_size=4))
    targets = find_targets(model)
    table = target_table(targets)
    weights = {t.name: model.get_parameter(t.name).detach() for t in targets}
    planted = {t.name: torch.zeros(t.rows, t.cols) for t in targets}
    planted[DOWN][ROW, COL] = 2.0
    planted[DOWN][0, 0] = 1.0  # second metric: the planted weight second, another first
    other = {name: score.clone() for name, score in planted.items()}
    other[DOWN][0, 0] = 3.0
    candidates = {metric: build_candidates(targets, weights, score, score, m=2)
                  for metric, score in (("first", planted), ("second", other))}
    evaluated = []
    model.model.norm.register_forward_hook(lambda *args: evaluated.append(1))

    result = confirm_super_weights(model, candidates, dict.fromkeys(candidates, table), evaluation, 4,
                                   baseline, top_n=2).super_weights

    assert len(evaluated) == 4  # one batch: the reference (traced), two distinct weights, the rerun
    assert list(result.columns) == SUPER_WEIGHT_COLUMNS
    planted_index, other_index = ROW * INTERMEDIATE + COL, 0
    assert list(zip(result["metric"], result["rank"], result["flat_index"], result["score"])) == [
        ("first", 0, planted_index, 2.0), ("first", 1, other_index, 1.0),
        ("second", 0, other_index, 1.0), ("second", 1, planted_index, 2.0)]
    assert result["confirmed"].tolist() == [True, False, False, True]
    by_weight = result.groupby("flat_index")["ppl_after"].nunique()
    assert (by_weight == 1).all()  # one evaluation per weight, reported under both metrics


def test_activation_trace_locates_the_massive_activation():
    model = _planted_model()
    windows = unigram_text(6, seed=4)
    trace = activation_trace(model, windows, batch_size=4)
    assert list(trace.columns) == TRACE_COLUMNS and len(trace) == 4  # 2 layers x (input, output)
    layer0 = trace[trace["layer"] == 0].set_index("side")
    # input channel COL spikes to silu(10) * 10 ~ 100 on every token; the output lands on ROW
    assert layer0.loc["input", "channel"] == COL and 95 < layer0.loc["input", "value"] < 110
    assert layer0.loc["output", "channel"] == ROW and 95 < layer0.loc["output", "value"] < 110
    assert trace.loc[trace["layer"] == 1, "value"].max() < 1.0
    window, position = int(layer0.loc["input", "window"]), int(layer0.loc["input", "position"])
    assert layer0.loc["input", "token"] == windows[window, position]
    # window indices run across batches: the same trace as scoring's over the same windows
    scoring = compute_scores(model, find_targets(model), windows, ["activation_magnitude"], batch_size=4,
                             seed=0, progress=False)["activation_magnitude"].extra["massive_activations"]
    pd.testing.assert_frame_equal(trace, scoring)


def _gemma2():
    """Embedding scaling, alternating sliding-window layers, attention and logit softcapping."""
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4,
                          max_position_embeddings=128, attn_implementation="eager")
    return Gemma2ForCausalLM(config).eval()


def _falcon_h1():
    """Hybrid attention + Mamba layers that return a tuple, not a tensor."""
    torch.manual_seed(0)
    config = FalconH1Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, mamba_d_ssm=16,
                            mamba_n_heads=2, mamba_d_head=8, mamba_d_state=4, mamba_n_groups=1,
                            max_position_embeddings=128, attn_implementation="eager")
    return FalconH1ForCausalLM(config).eval()


def _largest_entries(model: nn.Module, names: list[str]) -> pd.DataFrame:
    """Candidates in the given order (descending score): the largest-|w| entry of each tensor."""
    rows = []
    for rank, name in enumerate(names):
        w = model.get_parameter(name).detach()
        flat = int(w.abs().argmax())
        rows.append({"tensor": name, "layer": 0, "module": "", "expert": -1, "part": "", "row": flat // w.shape[1],
                     "col": flat % w.shape[1], "flat_index": flat, "weight": float(w.flatten()[flat]),
                     "score": float(len(names) - rank), "end": "top"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("build, names", [
    (lambda: make_tiny_llama(layers=4), [
        "model.layers.3.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
        "model.layers.2.self_attn.v_proj.weight", "model.layers.2.mlp.up_proj.weight",
        "model.layers.1.self_attn.o_proj.weight", "model.embed_tokens.weight", "lm_head.weight"]),
    (_gemma2, ["model.layers.1.mlp.down_proj.weight", "model.layers.3.self_attn.k_proj.weight",
               "model.layers.0.mlp.gate_proj.weight", "model.layers.2.self_attn.q_proj.weight"]),
    (_falcon_h1, ["model.layers.2.feed_forward.down_proj.weight", "model.layers.1.mamba.out_proj.weight",
                  "model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.q_proj.weight"]),
], ids=["llama", "gemma2", "falcon_h1"])
def test_skipping_the_unchanged_layers_is_bit_exact(build, names):
    """Each ablation's PPL equals that of a full evaluation of the ablated model bit for bit:
    the kept layer input is the very tensor a full pass computes, and the same kernels run on
    it (float64 rounding is no excuse here, every operation and its inputs are identical)."""
    model = build()
    windows = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(1))  # 2 batches, 1 partial
    baseline = Baseline.of(evaluate(model, windows, 4))
    candidates = _largest_entries(model, names)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    layers = model.get_decoder().layers
    computed = [0] * len(layers)  # batches each layer actually ran
    for i, layer in enumerate(layers):
        first_linear = next(m for m in layer.modules() if isinstance(m, nn.Linear))
        first_linear.register_forward_pre_hook(lambda m, a, i=i: computed.__setitem__(i, computed[i] + 1))

    result = zero_each(model, candidates, windows, 4, baseline)

    # layer i ran in the damage meter's reference pass (traced: before, a trace pass of its own
    # came first), the rerun and every ablation starting at or below it
    starts = [first_changed_layer(model, name) for name in names]
    assert computed == [2 * (2 + sum(s <= i for s in starts)) for i in range(len(layers))]
    table = result.super_weights
    assert table["tensor"].tolist() == names
    for i, name in enumerate(names):
        with perturbed(model, candidates.iloc[i:i + 1], "zero"):
            full = evaluate(model, windows, 4).ppl
        assert table["ppl_after"].iloc[i] == full, name
        assert full != baseline.ppl, name  # the ablation did reach the loss
    assert result.rerun.nll.tolist() == baseline.nll.tolist()
    for name, p in model.named_parameters():  # zeroed entries and skipped layers restored
        assert torch.equal(p, before[name]), name
    assert not any("forward" in layer.__dict__ or layer._forward_hooks for layer in layers)


def test_first_changed_layer_follows_the_parameter():
    model = make_tiny_llama(layers=4)
    assert first_changed_layer(model, "model.layers.2.mlp.down_proj.weight") == 2
    assert first_changed_layer(model, "model.embed_tokens.weight") == 0
    assert first_changed_layer(model, "lm_head.weight") == 0  # after the layers, yet run in full
    layers = model.model.layers
    layers[3].self_attn.q_proj.weight = layers[1].self_attn.q_proj.weight  # one weight, two layers
    assert first_changed_layer(model, "model.layers.3.self_attn.q_proj.weight") == 1


def test_a_dense_model_has_no_super_experts(monkeypatch):
    """No expert rows in the stats: nothing is zeroed or evaluated, the table is empty."""
    model = make_tiny_llama()
    targets = find_targets(model)
    stats = build_stats(targets, {t.name: torch.rand(t.rows, t.cols) for t in targets})
    windows = unigram_text(2, seed=2)
    baseline = Baseline.of(evaluate(model, windows, 2))
    monkeypatch.setattr("esa.confirm.DamageMeter", lambda *args, **kwargs: pytest.fail("evaluated a dense model"))
    result = confirm_super_experts(model, {"activation_magnitude": stats, "grad_x_weight": stats},
                                   windows, batch_size=2, baseline=baseline)
    assert result.empty and list(result.columns) == SUPER_EXPERT_COLUMNS
    assert [str(result[c].dtype) for c in ("rank", "layer", "expert", "ppl_ratio", "confirmed")] == [
        "int64", "int32", "int32", "float64", "bool"]

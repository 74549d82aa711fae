"""Super-weight confirmation on a tiny Llama with ONE planted super weight, found by scoring."""

import math

import pandas as pd
import pytest
import torch
from conftest import make_tiny_llama

from esa.candidates import build_candidates
from esa.confirm import COLUMNS, activation_trace, confirm_super_weights, global_top
from esa.evaluation import evaluate
from esa.scores import TRACE_COLUMNS, compute_scores
from esa.targets import find_targets

HIDDEN, INTERMEDIATE, VOCAB = 32, 64, 64
ROW, COL = 5, 7  # the planted super weight: layer 0 mlp.down_proj[ROW, COL]
DOWN = "model.layers.0.mlp.down_proj.weight"
UNIGRAM = 0.7 ** torch.arange(VOCAB, dtype=torch.float32)
UNIGRAM /= UNIGRAM.sum()  # text = i.i.d. tokens, geometric unigram: entropy 2.04 nats


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
    signs = torch.randint(0, 2, (HIDDEN,), generator=torch.Generator().manual_seed(3)).float() * 2 - 1
    signs[ROW] = 0
    with torch.no_grad():
        model.model.embed_tokens.weight += signs
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[COL] = 10 * signs / (HIDDEN - 1)
        mlp.up_proj.weight[COL] = 10 * signs / (HIDDEN - 1)
        mlp.down_proj.weight[ROW, COL] = 1.0
        model.lm_head.weight[:, ROW] = UNIGRAM.log() / math.sqrt(HIDDEN)
    return model


def _text(windows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(UNIGRAM.expand(windows, VOCAB), 32, replacement=True, generator=generator)


def test_confirm_finds_exactly_the_planted_super_weight():
    model = _planted_model()
    calib, evaluation = _text(8, seed=1), _text(8, seed=2)  # scored on one text, judged on another
    baseline = evaluate(model, evaluation, batch_size=4).metrics()
    targets = find_targets(model)
    scores = compute_scores(model, targets, calib, ["activation_magnitude"], batch_size=4, seed=0,
                            progress=False)["activation_magnitude"]
    candidates = build_candidates(targets, scores.weights, scores.stat, scores.score, m=10)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    result = confirm_super_weights(model, candidates, evaluation, batch_size=4, baseline=baseline,
                                   top_n=10, factor=1.5)

    assert list(result.columns) == COLUMNS and len(result) == 10
    assert result["score"].is_monotonic_decreasing
    confirmed = result[result["confirmed"]]
    assert len(confirmed) == 1
    hit = confirmed.iloc[0]
    assert (hit["tensor"], hit["layer"], hit["module"], hit["row"], hit["col"], hit["flat_index"]) == (
        DOWN, 0, "mlp.down_proj", ROW, COL, ROW * INTERMEDIATE + COL)
    assert hit["weight"] == 1.0 and result.index[result["confirmed"]].tolist() == [0]  # ranked first
    # baseline ~ exp(unigram entropy 2.04); without the weight the prediction is ~uniform over 64
    assert baseline["ppl"] == pytest.approx(6.63, abs=0.05)
    assert hit["ppl_before"] == baseline["ppl"]
    assert 40 < hit["ppl_after"] < 80 and hit["ppl_ratio"] > 6
    others = result[~result["confirmed"]]
    assert (others["ppl_ratio"] - 1).abs().max() < 0.01  # the rest of its column: harmless
    for name, p in model.named_parameters():  # every zeroing was undone bit-exactly
        assert torch.equal(p, before[name]), name
    assert evaluate(model, evaluation, batch_size=4).ppl == baseline["ppl"]


def test_factor_is_the_confirmation_line():
    model = _planted_model()
    evaluation = _text(4, seed=2)
    baseline = evaluate(model, evaluation, batch_size=4).metrics()
    candidates = pd.DataFrame({"tensor": DOWN, "layer": 0, "module": "mlp.down_proj", "row": [ROW],
                               "col": [COL], "flat_index": [ROW * INTERMEDIATE + COL], "weight": [1.0],
                               "stat": [1.0], "score": [1.0], "rank_in_tensor": [0], "end": "top"})
    ratio = confirm_super_weights(model, candidates, evaluation, 4, baseline, top_n=1)["ppl_ratio"].iloc[0]
    assert confirm_super_weights(model, candidates, evaluation, 4, baseline, top_n=1,
                                 factor=ratio)["confirmed"].all()
    assert not confirm_super_weights(model, candidates, evaluation, 4, baseline, top_n=1,
                                     factor=ratio * (1 + 1e-9))["confirmed"].any()


def test_global_top_orders_across_tensors_with_ties():
    candidates = pd.DataFrame({
        "tensor": ["a", "a", "a", "b", "b", "b"], "flat_index": [4, 2, 9, 1, 3, 2],
        "score": [5.0, 5.0, 0.1, 7.0, 5.0, 5.0], "end": ["top", "top", "bottom", "top", "top", "bottom"]})
    top = global_top(candidates, 4)
    # 7 first; the 5.0 ties: tensor a (listed first) before b, lower flat index first
    assert list(zip(top["tensor"], top["flat_index"])) == [("b", 1), ("a", 2), ("a", 4), ("b", 3)]
    # bottom-end rows are never candidates, even b's score-5.0 entry at flat index 2
    assert len(global_top(candidates, 100)) == 4
    with pytest.raises(ValueError, match="top_n"):
        global_top(candidates, 0)


def test_activation_trace_locates_the_massive_activation():
    model = _planted_model()
    windows = _text(6, seed=4)
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

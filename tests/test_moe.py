"""Mixture-of-experts families (Mixtral, Qwen3-MoE, OLMoE) on tiny random models: each expert of
a 3-D expert parameter is its own target, scored, perturbed and confirmed like a matrix."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

from conftest import UNIGRAM, confirm_by_activation, shared_sign_direction, unigram_text

from esa.architecture import mlp_output_projections, split_expert
from esa.confirm import SUPER_EXPERT_COLUMNS, activation_trace, confirm_super_experts
from esa.damage import Baseline, DamageMeter
from esa.evaluation import evaluate, mean_token_loss
from esa.perturb import perturbed
from esa.score_stats import build_stats
from esa.scores import compute_scores
from esa.targets import find_targets

HIDDEN, VOCAB, EXPERTS, LAYERS = 32, 64, 4, 2
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              attn_implementation="eager", tie_word_embeddings=False)
FAMILIES = {
    "mixtral": (tf.MixtralConfig, dict(num_local_experts=EXPERTS, num_experts_per_tok=2), 64, True),
    "qwen3_moe": (tf.Qwen3MoeConfig, dict(num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16,
                                          norm_topk_prob=True), 16, False),
    "olmoe": (tf.OlmoeConfig, dict(num_experts=EXPERTS, num_experts_per_tok=2), 64, True),
}
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.parametrize("family", sorted(FAMILIES))]


def _model(family: str, seed: int = 0) -> torch.nn.Module:
    config_class, extra, _, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config_class(**COMMON, **extra)).eval()


def _windows(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, 12), generator=torch.Generator().manual_seed(seed))


def test_every_expert_is_a_target_of_its_layer(family):
    _, _, inter, router = FAMILIES[family]
    targets = find_targets(_model(family))
    expected = [("self_attn.q_proj", 32, 32, -1), ("self_attn.k_proj", 16, 32, -1),
                ("self_attn.v_proj", 16, 32, -1), ("self_attn.o_proj", 32, 32, -1)]
    experts = [("mlp.experts.gate_up_proj", 2 * inter, HIDDEN, e) for e in range(EXPERTS)]
    experts += [("mlp.experts.down_proj", HIDDEN, inter, e) for e in range(EXPERTS)]
    routers = [("mlp.gate", EXPERTS, HIDDEN, -1)]
    # the module order of each family's block: Qwen3-MoE declares its experts before the router
    expected += routers + experts if router else experts + routers
    assert [(t.module, t.rows, t.cols, t.expert) for t in targets] == expected * LAYERS
    assert [t.layer for t in targets] == [0] * len(expected) + [1] * len(expected)
    down = [t for t in targets if t.module == "mlp.experts.down_proj" and t.layer == 1]
    assert [t.name for t in down] == [f"model.layers.1.mlp.experts.down_proj[{e}]" for e in range(EXPERTS)]
    assert [split_expert(t.name) for t in down] == [("model.layers.1.mlp.experts.down_proj", e) for e in range(EXPERTS)]


def test_gradient_scores_of_each_expert_equal_brute_force(family):
    model = _model(family)
    targets = find_targets(model)
    windows = _windows(4, seed=1)
    scores = compute_scores(model, targets, windows, ["grad_x_weight", "grad_squared"], batch_size=2, seed=0,
                            progress=False)
    params = dict(model.named_parameters())
    grads = []
    for batch in windows.split(2):
        loss = mean_token_loss(model, batch)
        grads.append(dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True))))
    for t in targets:
        name, expert = split_expert(t.name)
        per_batch = [g[name] if expert < 0 else g[name][expert] for g in grads]
        w = params[name].detach() if expert < 0 else params[name].detach()[expert]
        gbar = sum(per_batch) / 2
        fisher = sum(g * g for g in per_batch) / 2
        torch.testing.assert_close(scores["grad_x_weight"].score[t.name], (w * gbar).abs(), rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(scores["grad_squared"].score[t.name], 0.5 * fisher * w * w, rtol=1e-5,
                                   atol=1e-14)


def test_activation_magnitude_of_an_expert_sees_only_its_routed_tokens(family):
    model = _model(family)
    targets = find_targets(model)
    windows = _windows(4, seed=2)
    seen = []  # (layer, hidden [T, H], top_k_index [T, k]) of every call of an expert stack
    hooks = [module.register_forward_pre_hook(
        lambda m, args, layer=layer: seen.append((layer, args[0].detach().clone(), args[1].clone())))
        for layer, _, module in mlp_output_projections(model)]
    with torch.no_grad():
        model(windows)
    for hook in hooks:
        hook.remove()
    score = compute_scores(model, targets, windows, ["activation_magnitude"], batch_size=4, seed=0,
                           progress=False)["activation_magnitude"].score
    for layer, hidden, routed in seen:
        stack = model.model.layers[layer].mlp.experts
        inter = stack.down_proj.shape[2]
        sumsq = {"gate_up_proj": torch.zeros(EXPERTS, HIDDEN, dtype=torch.float64),
                 "down_proj": torch.zeros(EXPERTS, inter, dtype=torch.float64)}
        for t in range(hidden.shape[0]):  # token by token, expert by expert
            for e in routed[t].tolist():
                x = hidden[t].double()
                gate, up = (stack.gate_up_proj[e].detach().double() @ x).chunk(2)
                sumsq["gate_up_proj"][e] += x * x
                h = stack.act_fn(gate) * up
                sumsq["down_proj"][e] += h * h
        for part, total in sumsq.items():
            for e in range(EXPERTS):
                name = f"model.layers.{layer}.mlp.experts.{part}[{e}]"
                w = getattr(stack, part)[e].detach().abs()
                torch.testing.assert_close(score[name], (w * total[e].sqrt().float()[None, :]), rtol=1e-5, atol=1e-7)
    for _, hidden, routed in seen:  # no expert sees every token: all-token sums would differ
        assert (torch.bincount(routed.flatten(), minlength=EXPERTS) < hidden.shape[0]).all()


@pytest.mark.parametrize("kind", ["zero", "sign_flip", "gaussian"])
def test_perturbing_experts_touches_their_own_entries_and_restores_bit_exactly(family, kind):
    model = _model(family)
    targets = find_targets(model)
    rng = np.random.default_rng(0)
    selection = pd.DataFrame([{"tensor": t.name, "flat_index": int(i)} for t in targets
                              for i in rng.choice(t.numel, 3, replace=False)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with perturbed(model, selection, kind, 1.0 if kind == "sign_flip" else 0.1, seed=3) as info:
        assert info.n_weights == len(selection)
        changed = {n: (p.detach() != before[n]) for n, p in model.named_parameters()}
        for t in targets:
            name, expert = split_expert(t.name)
            block = changed[name] if expert < 0 else changed[name][expert]
            picked = selection.loc[selection["tensor"] == t.name, "flat_index"]
            assert sorted(block.reshape(-1).nonzero().flatten().tolist()) == sorted(picked)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_trace_has_one_row_per_layer_and_side_at_the_expert_stack(family):
    model = _model(family)
    trace = activation_trace(model, _windows(2, seed=4), batch_size=2)
    assert list(zip(trace["layer"], trace["module"], trace["side"])) == [
        (layer, "mlp.experts", side) for layer in range(LAYERS) for side in ("input", "output")]


ROW, COL, EXPERT = 5, 7, 2


def _planted(family: str) -> torch.nn.Module:
    """Every token routes to expert EXPERT of layer 0, where down_proj input channel COL is a
    massive activation; down_proj[EXPERT][ROW, COL] = 1 writes it into residual channel ROW,
    which the LM head turns into the unigram log-probabilities (as the planted Llama of
    tests/test_confirm.py, inside one expert)."""
    model = _model(family)
    inter = model.model.layers[0].mlp.experts.down_proj.shape[2]
    signs = shared_sign_direction(model, ROW)
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        mlp.gate.weight[EXPERT] = 10 * signs / (HIDDEN - 1)
        stack = mlp.experts
        stack.gate_up_proj[EXPERT, COL] = 10 * signs / (HIDDEN - 1)
        stack.gate_up_proj[EXPERT, inter + COL] = 10 * signs / (HIDDEN - 1)
        stack.down_proj[EXPERT, ROW, COL] = 1.0
        model.lm_head.weight[:, ROW] = UNIGRAM.log() / math.sqrt(HIDDEN)
    return model


def test_a_super_weight_planted_in_an_expert_is_found_and_confirmed(family):
    model = _planted(family)
    result = confirm_by_activation(model, top_n=5)[0].super_weights
    inter = model.model.layers[0].mlp.experts.down_proj.shape[2]
    first = result.iloc[0]
    assert (first["tensor"], first["row"], first["col"], first["flat_index"]) == (
        f"model.layers.0.mlp.experts.down_proj[{EXPERT}]", ROW, COL, ROW * inter + COL)
    assert result["confirmed"].tolist() == [True, False, False, False, False]
    assert first["ppl_ratio"] > 3


def _activation_stats(model: torch.nn.Module) -> pd.DataFrame:
    """stats.parquet of activation_magnitude on the unigram text confirm_by_activation scores on."""
    targets = find_targets(model)
    scores = compute_scores(model, targets, unigram_text(8, seed=1), ["activation_magnitude"], batch_size=4,
                            seed=0, progress=False)["activation_magnitude"]
    return build_stats(targets, scores.score)


def test_the_expert_holding_a_planted_super_weight_is_the_one_super_expert(family):
    model = _planted(family)
    stats = _activation_stats(model)
    evaluation = unigram_text(8, seed=2)
    baseline = Baseline.of(evaluate(model, evaluation, batch_size=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = confirm_super_experts(model, {"activation_magnitude": stats}, evaluation, batch_size=4,
                                   baseline=baseline, top_n=3, factor=1.5)
    for n, p in model.named_parameters():  # restored bit-exactly
        assert torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32)), n
    assert list(result.columns) == SUPER_EXPERT_COLUMNS
    assert [str(result[c].dtype) for c in ("rank", "layer", "expert")] == ["int64", "int32", "int32"]
    assert result["metric"].tolist() == ["activation_magnitude"] * 3 and result["rank"].tolist() == [0, 1, 2]
    first = result.iloc[0]
    assert (first["layer"], first["stack"], first["expert"]) == (0, "mlp.experts", EXPERT)
    # its score mass: the sum over its gate_up_proj and down_proj scores, the largest of all experts
    mine = stats["tensor"].isin([f"model.layers.0.mlp.experts.{part}[{EXPERT}]"
                                 for part in ("gate_up_proj", "down_proj")])
    assert first["score_mass"] == pytest.approx(stats.loc[mine, "sum"].sum(), rel=1e-12)
    assert result["score_mass"].is_monotonic_decreasing and result["score_mass"].iloc[1] < first["score_mass"]
    assert result["confirmed"].tolist() == [True, False, False]
    assert first["ppl_ratio"] > 3 and result["ppl_ratio"].iloc[1:].lt(1.01).all()  # the others cost nothing
    assert (result["ppl_before"] == baseline.ppl).all()
    assert (result["ppl_ratio"] == result["ppl_after"] / baseline.ppl).all()
    # ppl_after is the full evaluation of the model with the expert's matrices zeroed
    stack = model.model.layers[0].mlp.experts
    with torch.no_grad():
        stack.gate_up_proj[EXPERT] = 0
        stack.down_proj[EXPERT] = 0
    assert first["ppl_after"] == evaluate(model, evaluation, batch_size=4).ppl


def test_an_expert_several_metrics_rank_is_zeroed_once(family, monkeypatch):
    """Two metrics' top-2 share one expert: three experts zeroed, four rows, each metric's own mass."""
    model = _model(family)
    table = find_targets(model)
    stats = {}
    for metric, mass in (("grad_x_weight", {(0, 1): 9.0, (1, 3): 5.0}), ("grad_squared", {(1, 3): 7.0, (0, 2): 6.0})):
        stats[metric] = pd.DataFrame({"tensor": [t.name for t in table], "layer": [t.layer for t in table],
                                      "module": [t.module for t in table], "expert": [t.expert for t in table],
                                      "sum": [mass.get((t.layer, t.expert), 0.5) / 2 if t.expert >= 0 else 100.0
                                              for t in table]})
    zeroed = []

    measure = DamageMeter.measure

    def counting(meter, start=0):
        stacks = [layer.mlp.experts for layer in meter.model.model.layers]
        zeroed.append([(i, e) for i, s in enumerate(stacks) for e in range(EXPERTS)
                       if not s.down_proj[e].any() and not s.gate_up_proj[e].any()])
        return measure(meter, start)

    monkeypatch.setattr(DamageMeter, "measure", counting)
    windows = _windows(2, seed=5)
    result = confirm_super_experts(model, stats, windows, batch_size=2,
                                   baseline=Baseline.of(evaluate(model, windows, 2)), top_n=2)
    assert zeroed == [[(0, 1)], [(1, 3)], [(0, 2)]]  # first-seen order, one expert at a time
    assert list(zip(result["metric"], result["rank"], result["layer"], result["expert"], result["score_mass"])) == [
        ("grad_x_weight", 0, 0, 1, 9.0), ("grad_x_weight", 1, 1, 3, 5.0),
        ("grad_squared", 0, 1, 3, 7.0), ("grad_squared", 1, 0, 2, 6.0)]
    shared = result[(result["layer"] == 1) & (result["expert"] == 3)]
    assert shared["ppl_after"].nunique() == 1

"""Behaviour beside perplexity (esa.behaviour): the repetition numbers by hand, the attention-sink
mass against uniform causal attention (q_proj zeroed: query t puts 1/(t+1) on position 0) and
against transformers' own attention probabilities, greedy continuations against a hand-made
argmax loop, the conditions of the planted single and joint super weights, and the workflow's
step with its report section."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_bit_identical, make_tiny_llama, snakemake, snapshot, study_layout, unigram_text
from test_joint import _confirmed_with_groups, _joint_planted_model
from test_mechanism import _planted

from esa.cloze import write_cloze_task
from esa.behaviour import (BASELINE, CONDITION_COLUMNS, GENERATION_COLUMNS, SINK_COLUMNS, attention_sink_mass,
                           conditions, distinct_n, greedy_continuations, repeated_ngram_share)
from esa.config import validate_config
from esa.errors import ESAError
from esa.io import read_parquet
from esa.joint import JointSettings
from esa.models import load_model, load_tokenizer, resolve_source
from esa.names import BOTTOM_K, RANDOM_K, TOP, ZERO
from esa.specs import behaviour_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def test_repetition_numbers_by_hand():
    tokens = [1, 2, 3, 4, 1, 2, 3, 4, 1]  # six 4-grams, four distinct; eight bigrams, four distinct
    assert repeated_ngram_share(tokens) == 1 - 4 / 6
    assert distinct_n(tokens) == 4 / 8
    assert repeated_ngram_share(list(range(10))) == 0.0 and distinct_n(list(range(10))) == 1.0
    assert np.isnan(repeated_ngram_share([1, 2, 3])) and np.isnan(distinct_n([7]))


def test_sink_mass_of_uniform_causal_attention_is_the_harmonic_mean():
    """q_proj zeroed in every layer: every score 0, so query t spreads 1/(t+1) over positions
    0..t, and the sink mass of every layer is mean over t = 1..T-1 of 1/(t+1)."""
    model = make_tiny_llama(hidden=32, intermediate=64)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    windows = unigram_text(4, seed=1)
    length = windows.shape[1]
    expected = sum(1 / (t + 1) for t in range(1, length)) / (length - 1)

    assert attention_sink_mass(model, windows, 2) == pytest.approx([expected] * 2, rel=1e-6)


def test_sink_mass_is_transformers_attention_probabilities_reduced_and_sdpa_comes_back():
    """A random tiny Llama on SDPA: the mass equals its eager attention probabilities
    (output_attentions) on position 0 averaged over windows, heads and queries after the first,
    and the model is on SDPA again after, its weights untouched."""
    model = make_tiny_llama(hidden=32, intermediate=64)
    windows = unigram_text(4, seed=1)
    with torch.no_grad():
        probabilities = model(input_ids=windows, output_attentions=True).attentions
    expected = [float(a[:, :, 1:, 0].double().mean()) for a in probabilities]
    model.set_attn_implementation("sdpa")
    before = snapshot(model)

    mass = attention_sink_mass(model, windows, 3)

    assert mass == pytest.approx(expected, rel=1e-9) and 0.05 < min(mass)
    assert model.config._attn_implementation == "sdpa"
    assert_bit_identical(model, before)


def test_greedy_continuations_are_each_prompts_own_argmax_loop(tiny_model_dir):
    """generate's greedy tokens for prompts of different lengths in one padded batch are each
    prompt's own hand-made loop: the argmax of its sequence's last logits, appended,
    max_new_tokens times (end of sequence never stops it early)."""
    model = load_model(resolve_source(str(tiny_model_dir)), "cpu", "fp32", "eager")
    tokenizer = load_tokenizer(resolve_source(str(tiny_model_dir)))
    prompts = ["The Python standard library", "def main():", "In this tutorial, we will see"]
    by_hand = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            grown = ids
            for _ in range(12):
                grown = torch.cat([grown, model(grown).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            by_hand.append(grown[0, ids.shape[1]:].tolist())

    assert len({len(tokenizer(p).input_ids) for p in prompts}) == 3
    assert greedy_continuations(model, tokenizer, prompts, 12) == by_hand


def test_conditions_of_the_planted_single_and_joint_super_weights():
    _, confirmation, _, _ = _planted()
    single = conditions(confirmation.super_weights, confirmation.groups, confirmation.group_members)
    assert [(c.name, c.kind) for c in single] == [
        (BASELINE, BASELINE), ("layers.0.mlp.down_proj.weight[5, 7] zeroed", "single")]
    assert single[0].weights.empty and single[1].weights.values.tolist() == [
        ["model.layers.0.mlp.down_proj.weight", 5 * 64 + 7]]
    assert (single[1].perturb, single[1].scale) == (ZERO, 1.0) and single[1].row()["perturb"] == ZERO
    assert single[0].row()["perturb"] is None and single[0].row()["n_weights"] == 0
    joint, _ = _confirmed_with_groups(_joint_planted_model(), top_n=10, joint=JointSettings(top_n=10))
    pair = conditions(joint.super_weights, joint.groups, joint.group_members)
    assert [c.kind for c in pair] == [BASELINE, "joint"]
    assert sorted(pair[1].weights["flat_index"]) == [5 * 64 + 7, 5 * 64 + 21]
    assert pair[1].name.endswith("(2 weights, joint) zeroed")


def test_an_experiments_top_set_and_random_k_are_conditions_perturbed_as_it_perturbs():
    _, confirmation, _, _ = _planted()
    mask = pd.DataFrame({"tensor": ["a", "a", "b", "c"], "flat_index": [3, 9, 1, 4],
                         "set": [TOP, TOP, RANDOM_K, BOTTOM_K]})
    found = conditions(confirmation.super_weights, confirmation.groups, confirmation.group_members,
                       [{"name": "flip", "perturb": "sign_flip", "scale": 2.0, "noise": "relative", "seed": 3,
                         "mask": mask}])
    top, control = found[-2:]
    assert (top.name, top.kind, top.experiment, top.perturb, top.scale, top.seed) == (
        "flip top (sign_flip)", TOP, "flip", "sign_flip", 2.0, 3)
    assert top.weights.values.tolist() == [["a", 3], ["a", 9]] and control.weights.values.tolist() == [["b", 1]]
    with pytest.raises(ESAError, match="experiment 'flip' \\(seed 3\\) has no rows of set 'random_k'"):
        conditions(confirmation.super_weights, confirmation.groups, confirmation.group_members,
                   [{"name": "flip", "perturb": "zero", "scale": 1.0, "noise": "relative", "seed": 3,
                     "mask": mask[mask["set"] != RANDOM_K]}])


def test_the_workflow_reads_behaviour_for_the_baseline_each_super_weight_and_an_experiment(tmp_path, tiny_model_dir):
    """A tiny study with behaviour enabled and one experiment named: the conditions are the
    baseline, one per confirmed weight and the experiment's top set and random_k (its mask's
    rows); generation.parquet holds each prompt's continuation under every condition,
    sinks.parquet one mass per layer and condition over the first sink_windows windows; the
    baseline's continuation is the model's own; lm_eval.parquet's baseline accuracy on the
    esa_cloze items the step wrote equals lm-eval's own run of the same task on the model
    directory (what its command line runs); the report shows the section with its figures."""
    config = {"model": {"name": "tiny", "source": str(tiny_model_dir)}, "device": "cpu", "seeds": [0],
              "data": {"source": "builtin:pydoc", "seq_len": 32, "eval_windows": 4},
              "scoring": {"max_samples": 4, "batch_size": 2, "candidates": 20},
              "experiments": [{"name": "gxw", "metric": "grad_x_weight", "mode": "global", "topk": 10,
                               "perturb": "zero", "controls": ["random_k"]}],
              "confirm": {"top_n": 2, "factor": 1.0001, "innocent": {"samples": 0}, "joint": {"top_n": 0}},
              "behaviour": {"enabled": True, "prompts": ["def main():", "The"], "max_new_tokens": 6,
                            "sink_windows": 2, "experiments": ["gxw"],
                            "lm_eval": {"batch_size": 4, "cloze": {"n_items": 8, "context_tokens": 8}}}}
    result = snakemake(tmp_path, config)
    assert result.returncode == 0, result.stdout[-3000:]
    layout = study_layout(config)
    files = layout.behaviour_files()
    found, generation, sinks, scores, items = (read_parquet(tmp_path / files[name])
                                               for name in ("conditions", "generation", "sinks", "lm_eval", "cloze"))
    super_weights = read_parquet(tmp_path / layout.confirm_files()["super_weights"])
    confirmed = super_weights[super_weights["confirmed"]].drop_duplicates(["tensor", "flat_index"])
    mask = read_parquet(tmp_path / layout.mask("grad_x_weight", "global", 10, 0))
    n = 1 + len(confirmed) + 2
    assert list(found.columns) == CONDITION_COLUMNS and found["kind"].tolist() == (
        [BASELINE] + ["single"] * len(confirmed) + [TOP, RANDOM_K])
    for name, row in zip((TOP, RANDOM_K), found.iloc[-2:].itertuples()):
        assert (row.experiment, row.perturb) == ("gxw", ZERO)
        assert list(zip(row.tensors, row.flat_indices)) == list(
            mask.loc[mask["set"] == name, ["tensor", "flat_index"]].itertuples(index=False, name=None))
    assert list(generation.columns) == GENERATION_COLUMNS and list(sinks.columns) == SINK_COLUMNS
    assert len(generation) == 2 * n and len(sinks) == 2 * n and len(scores) == n and len(items) == 8
    assert (generation["new_tokens"] == 6).all() and sinks["sink_mass"].between(0, 1).all()
    model = load_model(resolve_source(str(tiny_model_dir)), "cpu", "fp32", "eager")
    tokenizer = load_tokenizer(resolve_source(str(tiny_model_dir)))
    first = generation[(generation["condition"] == BASELINE) & (generation["prompt_index"] == 0)].iloc[0]
    assert first["text"] == tokenizer.decode(greedy_continuations(model, tokenizer, ["def main():"], 6)[0])
    assert sinks[sinks["condition"] == BASELINE]["sink_mass"].tolist() == pytest.approx(
        attention_sink_mass(model, torch.from_numpy(np.stack(read_parquet(
            tmp_path / layout.data_files("eval")["windows"])["tokens"])[:2]).long(), 2), rel=1e-9)

    # lm-eval's own run from the model directory, as its command line makes it (`lm_eval --model hf
    # --model_args pretrained=DIR,dtype=float32 --tasks esa_cloze --include_path TASKS --batch_size 4`),
    # in this process: lm-eval loads the model itself
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = write_cloze_task(tmp_path / "tasks", items.to_dict("records"))
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32", device="cpu",
                             tasks=["esa_cloze"], batch_size=4,
                             task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    theirs = theirs["results"]["esa_cloze"]
    ours = scores[scores["condition"] == BASELINE].iloc[0]
    assert (ours["task"], ours["metric"], ours["n"]) == ("esa_cloze", "acc", 8)
    assert ours["value"] == theirs["acc,none"] and ours["stderr"] == theirs["acc_stderr,none"]

    page = (tmp_path / layout.report_files()["index"]).read_text()
    assert '<section id="behaviour"><h2>Behaviour beside perplexity</h2>' in page
    assert '<img alt="attention-sink mass per layer"' in page and '<img alt="lm-eval accuracy per condition"' in page
    inputs = json.loads((tmp_path / layout.report_files()["inputs"]).read_text())
    assert set(inputs["behaviour"]) == {"conditions", "generation", "sinks", "lm_eval", "cloze"}


@pytest.mark.parametrize("name", ["missing", "scored", "no_control"])
def test_behaviour_experiments_must_perturb_with_a_random_k_control(name):
    """The seed read is the experiment's first; the spec carries its perturbation."""
    config = {"model": {"name": "m", "source": "builtin:smollm2-135m"}, "data": {"source": "builtin:pydoc"},
              "seeds": [0, 1],
              "experiments": [{"name": "scored", "metric": "grad_x_weight", "mode": "global", "topk": 5},
                              {"name": "noisy", "metric": "grad_x_weight", "mode": "global", "topk": 5,
                               "perturb": "gaussian", "scale": 0.5, "seeds": [4, 2]},
                              {"name": "no_control", "metric": "grad_x_weight", "mode": "global", "topk": 5,
                               "perturb": "zero", "controls": ["bottom_k"]}],
              "behaviour": {"enabled": True, "experiments": ["noisy", name]}}
    with pytest.raises(ESAError) as err:
        validate_config(config)
    assert str(err.value) == (f"invalid config at behaviour.experiments: {name!r} is not an experiment with a "
                              "perturbation and a random_k control; allowed: noisy")
    config["behaviour"]["experiments"] = ["noisy"]
    layout = study_layout(config)
    assert layout.behaviour_experiments() == {"noisy": 4}
    assert behaviour_spec(layout)["experiments"] == [
        {"name": "noisy", "perturb": "gaussian", "scale": 0.5, "noise": "relative", "seed": 4}]
    assert layout.inputs("behaviour")["masks"] == {"noisy": layout.mask("grad_x_weight", "global", 5, 4)}

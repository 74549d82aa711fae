"""Behaviour beside perplexity (esa.behaviour): the repetition numbers by hand, the attention-sink
mass against uniform causal attention (q_proj zeroed: query t puts 1/(t+1) on position 0) and
against transformers' own attention probabilities, greedy continuations against a hand-made
argmax loop, the conditions of the planted single and joint super weights, and the workflow's
step with its report section."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_bit_identical, make_tiny_llama, snakemake, snapshot, study_layout, unigram_text
from test_joint import _confirmed_with_groups, _joint_planted_model
from test_mechanism import _planted

from esa.behaviour import (BASELINE, GENERATION_COLUMNS, SINK_COLUMNS, attention_sink_mass, conditions, distinct_n,
                           greedy_continuation, repeated_ngram_share)
from esa.io import read_parquet
from esa.joint import JointSettings
from esa.models import load_model, load_tokenizer, resolve_source

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


def test_greedy_continuation_is_the_argmax_loop(tiny_model_dir):
    """generate's greedy tokens are a hand-made loop's: the argmax of the whole sequence's last
    logits, appended, max_new_tokens times (end of sequence never stops it early)."""
    model = load_model(resolve_source(str(tiny_model_dir)), "cpu", "fp32", "eager")
    tokenizer = load_tokenizer(resolve_source(str(tiny_model_dir)))
    ids = tokenizer("The Python standard library", return_tensors="pt").input_ids
    by_hand = ids
    with torch.no_grad():
        for _ in range(12):
            by_hand = torch.cat([by_hand, model(by_hand).logits[:, -1].argmax(-1, keepdim=True)], dim=1)

    new = by_hand[0, ids.shape[1]:].tolist()
    assert greedy_continuation(model, tokenizer, "The Python standard library", 12) == new


def test_conditions_of_the_planted_single_and_joint_super_weights():
    _, confirmation, _, _ = _planted()
    single = conditions(confirmation.super_weights, confirmation.groups, confirmation.group_members)
    assert [(c["condition"], c["kind"]) for c in single] == [
        (BASELINE, BASELINE), ("layers.0.mlp.down_proj.weight[5, 7] zeroed", "single")]
    assert single[0]["weights"].empty and single[1]["weights"].values.tolist() == [
        ["model.layers.0.mlp.down_proj.weight", 5 * 64 + 7]]
    joint, _ = _confirmed_with_groups(_joint_planted_model(), top_n=10, joint=JointSettings(top_n=10))
    pair = conditions(joint.super_weights, joint.groups, joint.group_members)
    assert [c["kind"] for c in pair] == [BASELINE, "joint"]
    assert sorted(pair[1]["weights"]["flat_index"]) == [5 * 64 + 7, 5 * 64 + 21]
    assert pair[1]["condition"].endswith("(2 weights, joint) zeroed")


def test_the_workflow_reads_behaviour_for_the_baseline_and_each_super_weight(tmp_path, tiny_model_dir):
    """A tiny study with behaviour enabled: generation.parquet holds each prompt's continuation
    under every condition (the baseline, and one per confirmed weight), sinks.parquet one mass
    per layer and condition; the baseline's continuation is the model's own; the report shows
    the section with its figure."""
    config = {"model": {"name": "tiny", "source": str(tiny_model_dir)}, "device": "cpu", "seeds": [0],
              "data": {"source": "builtin:pydoc", "seq_len": 32, "eval_windows": 4},
              "scoring": {"max_samples": 4, "batch_size": 2, "candidates": 20},
              "experiments": [{"name": "gxw", "metric": "grad_x_weight", "mode": "global", "topk": 10}],
              "confirm": {"top_n": 2, "factor": 1.0001, "innocent": {"samples": 0}, "joint": {"top_n": 0}},
              "behaviour": {"enabled": True, "prompts": ["def main():", "The"], "max_new_tokens": 6}}
    result = snakemake(tmp_path, config)
    assert result.returncode == 0, result.stdout[-3000:]
    layout = study_layout(config)
    files = layout.behaviour_files()
    generation, sinks = read_parquet(tmp_path / files["generation"]), read_parquet(tmp_path / files["sinks"])
    super_weights = read_parquet(tmp_path / layout.confirm_files()["super_weights"])
    confirmed = super_weights[super_weights["confirmed"]].drop_duplicates(["tensor", "flat_index"])
    assert list(generation.columns) == GENERATION_COLUMNS and list(sinks.columns) == SINK_COLUMNS
    assert len(generation) == 2 * (1 + len(confirmed)) and len(sinks) == 2 * (1 + len(confirmed))
    assert (generation["new_tokens"] == 6).all() and sinks["sink_mass"].between(0, 1).all()
    model = load_model(resolve_source(str(tiny_model_dir)), "cpu", "fp32", "eager")
    tokenizer = load_tokenizer(resolve_source(str(tiny_model_dir)))
    first = generation[(generation["condition"] == BASELINE) & (generation["prompt_index"] == 0)].iloc[0]
    assert first["text"] == tokenizer.decode(greedy_continuation(model, tokenizer, "def main():", 6))
    page = (tmp_path / layout.report_files()["index"]).read_text()
    assert '<section id="behaviour"><h2>Behaviour beside perplexity</h2>' in page
    assert '<img alt="attention-sink mass per layer"' in page
    inputs = json.loads((tmp_path / layout.report_files()["inputs"]).read_text())
    assert set(inputs["behaviour"]) == {"generation", "sinks"}

"""Target selection: defaults, include/exclude patterns, errors, tied weights, the shape table."""

import pytest
import torch
from torch import nn

from esa.errors import ESAError
from esa.targets import TABLE_COLUMNS, Target, find_targets, target_module, target_parameter, target_table

MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_default_targets_are_decoder_linears_in_model_order(tiny_llama):
    targets = find_targets(tiny_llama)
    assert [(t.layer, t.module) for t in targets] == [(layer, m) for layer in (0, 1) for m in MODULES]
    down = targets[6]
    assert down == Target("model.layers.0.mlp.down_proj.weight", 0, "mlp.down_proj", 16, 32)
    assert target_parameter(tiny_llama, down) is tiny_llama.model.layers[0].mlp.down_proj.weight
    assert target_module(tiny_llama, down) is tiny_llama.model.layers[0].mlp.down_proj
    assert targets[1].rows == 8 and targets[1].cols == 16  # k_proj with one KV head of dim 8


def test_include_adds_outside_weights_exclude_removes(tiny_llama):
    targets = find_targets(tiny_llama, include=["embed_tokens", r"^lm_head\."], exclude=[r"self_attn\.[qk]_proj"])
    names = [t.name for t in targets]
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    assert (targets[0].layer, targets[0].module, targets[0].rows, targets[0].cols) == (-1, "embed_tokens", 64, 16)
    assert (targets[-1].layer, targets[-1].module) == (-1, "lm_head")
    assert not any("q_proj" in n or "k_proj" in n for n in names)
    assert len(targets) == 2 + 2 * 5


def test_unmatched_pattern_names_pattern_and_examples(tiny_llama):
    with pytest.raises(ValueError, match=r"'wo_proj' matches no weight matrix.*model\.layers\.0\.mlp\.down_proj\.weight"):
        find_targets(tiny_llama, include=["wo_proj"])
    with pytest.raises(ValueError, match="matches no weight matrix"):
        find_targets(tiny_llama, exclude=["norm"])  # norms are 1-D


def test_empty_selection_is_an_error(tiny_llama):
    with pytest.raises(ValueError, match="no target weights left"):
        find_targets(tiny_llama, exclude=["layers"])


def test_tied_weights_counted_once(tiny_llama):
    tiny_llama.lm_head.weight = tiny_llama.model.embed_tokens.weight
    targets = find_targets(tiny_llama, include=[r"^lm_head\."])  # matched through its alias
    outside = [t for t in targets if t.layer == -1]
    assert [t.name for t in outside] == ["model.embed_tokens.weight"]
    both = find_targets(tiny_llama, include=["embed_tokens", "lm_head"])
    assert len(both) == len(targets) == 15
    assert isinstance(target_module(tiny_llama, outside[0]), nn.Embedding)


def test_target_table(tiny_llama):
    table = target_table(find_targets(tiny_llama))
    assert list(table.columns) == TABLE_COLUMNS
    assert len(table) == 14 and table["numel"].sum() == 2 * (256 + 128 + 128 + 256 + 3 * 512)
    assert (table["numel"] == table["rows"] * table["cols"]).all()


def test_a_model_whose_layout_cannot_be_resolved_stops_with_one_line(tiny_llama):
    """No block list of num_hidden_layers modules, or a block without an MLP output projection:
    one ESAError naming the model class and what was not found."""
    from esa.architecture import decoder_layers, mlp_output_projections

    tiny_llama.config.num_hidden_layers = 3  # the model holds 2 blocks
    with pytest.raises(ESAError, match=r"^cannot find the decoder layers of LlamaForCausalLM: no nn.ModuleList "
                                       r"of config.num_hidden_layers=3 modules$"):
        decoder_layers(tiny_llama)
    tiny_llama.config.num_hidden_layers = 2
    tiny_llama.model.layers[1].mlp.down_proj = torch.nn.Identity()
    with pytest.raises(ESAError, match=r"^cannot find the MLP output projection of LlamaForCausalLM layer 1: "
                                       r"no Linear/Conv1D named down_proj\|c_proj\|dense_4h_to_h\|fc2\|w2 in the "
                                       r"block or in its mlp\|feed_forward\|ffn$"):
        mlp_output_projections(tiny_llama)

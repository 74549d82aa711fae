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
    named = r"'wo_proj' matches no weight matrix.*model\.layers\.0\.mlp\.down_proj\.weight"
    with pytest.raises(ValueError, match=named):
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
                                       r"of config.num_hidden_layers=3 modules holding weight matrices$"):
        decoder_layers(tiny_llama)
    tiny_llama.config.num_hidden_layers = 2
    tiny_llama.model.layers[1].mlp.down_proj = torch.nn.Identity()
    with pytest.raises(ESAError, match=r"^cannot find the MLP output projection of LlamaForCausalLM layer 1: "
                                       r"no matrix outside the attention self_attn writes the hidden size 16$"):
        mlp_output_projections(tiny_llama)


def _fused_models():
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, MixtralConfig,
                              MixtralForCausalLM, Phi3Config, Phi3ForCausalLM)

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    return {
        "phi3": Phi3ForCausalLM(Phi3Config(**common, num_key_value_heads=2, pad_token_id=0)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4)),
        "gpt_neox": GPTNeoXForCausalLM(GPTNeoXConfig(**common)),
        "mixtral": MixtralForCausalLM(MixtralConfig(**common, num_key_value_heads=2, num_local_experts=2)),
    }


# rows of each part, written out: Phi-3 q = 4 heads x 8, k = v = 2 kv heads x 8; GPT-2 thirds of
# 96; GPT-NeoX [head][q|k|v][8] for 4 heads; gate_up_proj halves (also an expert's)
FUSED = {
    ("phi3", "self_attn.qkv_proj"): ["q"] * 32 + ["k"] * 16 + ["v"] * 16,
    ("phi3", "mlp.gate_up_proj"): ["gate"] * 64 + ["up"] * 64,
    ("gpt2", "attn.c_attn"): ["q"] * 32 + ["k"] * 32 + ["v"] * 32,
    ("gpt_neox", "attention.query_key_value"): (["q"] * 8 + ["k"] * 8 + ["v"] * 8) * 4,
    ("mixtral", "mlp.experts.gate_up_proj"): ["gate"] * 64 + ["up"] * 64,
}


def test_fused_projections_name_the_part_of_each_row():
    import numpy as np

    from esa.candidates import build_candidates

    for family, model in _fused_models().items():
        targets = find_targets(model)
        for t in targets:
            expected = FUSED.get((family, t.module))
            assert (t.fused is None) == (expected is None), (family, t.module)
            if expected is None:
                continue
            assert list(t.fused.part(np.arange(t.rows))) == expected, (family, t.module)
        # the candidates carry the part of each weight's row ("" for a plain matrix)
        fused = [t for t in targets if t.fused]
        scores = {t.name: torch.rand(t.rows, t.cols, generator=torch.Generator().manual_seed(1)) for t in targets}
        table = build_candidates(targets, scores, scores, scores, m=50)
        for t in targets:
            rows = table[table["tensor"] == t.name]
            want = [FUSED[(family, t.module)][r] for r in rows["row"]] if t in fused else [""] * len(rows)
            assert rows["part"].tolist() == want, (family, t.module)


class _ListedExperts(nn.Module):
    """A block whose MLP is a ModuleList of experts (the layout before 3-D expert stacks)."""

    def __init__(self, hidden: int, experts: int):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(hidden, experts, bias=False)
        self.mlp.experts = nn.ModuleList(
            nn.ModuleDict({"up_proj": nn.Linear(hidden, 2 * hidden), "down_proj": nn.Linear(2 * hidden, hidden)})
            for _ in range(experts))


def test_experts_of_a_module_list_are_addressable_and_ablated_whole():
    from transformers import PretrainedConfig

    from esa.confirm import expert_mass, expert_selection
    from esa.perturb import perturbed

    model = nn.Module()
    model.config = PretrainedConfig(num_hidden_layers=2)
    model.layers = nn.ModuleList(_ListedExperts(4, 3) for _ in range(2))
    targets = find_targets(model)
    assert [(t.name, t.expert, t.stacked) for t in targets[:4]] == [
        ("layers.0.mlp.gate.weight", -1, False), ("layers.0.mlp.experts.0.up_proj.weight", 0, False),
        ("layers.0.mlp.experts.0.down_proj.weight", 0, False), ("layers.0.mlp.experts.1.up_proj.weight", 1, False)]
    up = targets[1]
    weight = model.get_parameter(up.name)
    assert (up.rows, up.cols) == (8, 4) and up.matrix(weight) is weight

    table = target_table(targets).assign(sum=[float(i) for i in range(len(targets))])
    mass = expert_mass(table)
    assert mass[["layer", "stack", "expert", "path"]].values.tolist()[:2] == [
        [1, "mlp.experts", 2, "layers.1.mlp.experts"], [1, "mlp.experts", 1, "layers.1.mlp.experts"]]
    assert mass["score_mass"].tolist()[:2] == [12.0 + 13.0, 10.0 + 11.0]  # its up_proj and down_proj rows

    selection = expert_selection(model, "layers.1.mlp.experts", 2)
    expert = dict(model.layers[1].mlp.experts[2].named_parameters())
    assert len(selection) == sum(p.numel() for p in expert.values())  # weights and biases
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with perturbed(model, selection, "zero"):
        for name, p in model.named_parameters():
            assert bool((p == 0).all()) == name.startswith("layers.1.mlp.experts.2."), name
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

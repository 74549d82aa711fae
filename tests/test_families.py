"""ESA on twelve dense model families: tiny random models built from configs (no download).

One builder table (``FAMILIES``) gives, per family, the tiny model and what ESA must find in
it, written out by hand: the decoder blocks' list, one block's weight matrices in the Linear
convention (module, rows = output channels, cols = input channels, stored transposed), the MLP
output projection and the matrices feeding its input. Each family is then checked for
targets, gradient and activation scores against brute force, bit-exact perturbation restore,
the massive-activation trace, and a planted super weight found and confirmed alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from torch import nn
from transformers import (GPTJConfig, GPTJForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                          Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Olmo2Config, Olmo2ForCausalLM, OPTConfig,
                          OPTForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from conftest import UNIGRAM, confirm_by_activation, shared_sign_direction, unigram_text

from esa.architecture import decoder_layers_name, mlp_output_projections
from esa.errors import ESAError
from esa.confirm import activation_trace
from esa.perturb import perturbed
from esa.scores import compute_scores
from esa.targets import find_targets

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 32, 64, 64, 2
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
Q, KV = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM  # 32, 16
TOKENS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)  # inside the tiny vocabulary

# --- the builder table ------------------------------------------------------------------------

LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  max_position_embeddings=128, **TOKENS)
QKVO_GLU = (("self_attn.q_proj", Q, HIDDEN, False), ("self_attn.k_proj", KV, HIDDEN, False),
            ("self_attn.v_proj", KV, HIDDEN, False), ("self_attn.o_proj", HIDDEN, Q, False),
            ("mlp.gate_proj", INTERMEDIATE, HIDDEN, False), ("mlp.up_proj", INTERMEDIATE, HIDDEN, False),
            ("mlp.down_proj", HIDDEN, INTERMEDIATE, False))
GLU_FEEDS = (("mlp.gate_proj", 0, 10.0), ("mlp.up_proj", 0, 10.0))  # silu/gelu(10) * 10 ~ 100


def _seeded(model_class, config):
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    return model_class(config).to(torch.float32).eval()


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    layers: str  # qualified name of the decoder blocks' ModuleList
    matrices: tuple  # one block's (module, rows, cols, transposed), in model order
    n_targets: int  # LAYERS * len(matrices), written out
    mlp_out: str  # the MLP output projection inside a block
    # planting: (module in block 0, first row of the half feeding mlp_out's input channel, gain)
    feeds: tuple = GLU_FEEDS
    final_norm: str = "model.norm"
    post_ff_norm: str | None = None  # a norm between the MLP and the residual (Gemma 2/3, OLMo 2)


FAMILIES = {
    "llama": Family(lambda: _seeded(LlamaForCausalLM, LlamaConfig(**LLAMA_LIKE)),
                    "model.layers", QKVO_GLU, 14, "mlp.down_proj"),
    "mistral": Family(lambda: _seeded(MistralForCausalLM, MistralConfig(**LLAMA_LIKE, sliding_window=8)),
                      "model.layers", QKVO_GLU, 14, "mlp.down_proj"),
    "qwen2": Family(lambda: _seeded(Qwen2ForCausalLM, Qwen2Config(**LLAMA_LIKE)),  # q/k/v biases
                    "model.layers", QKVO_GLU, 14, "mlp.down_proj"),
    "qwen3": Family(lambda: _seeded(Qwen3ForCausalLM, Qwen3Config(**LLAMA_LIKE, head_dim=HEAD_DIM)),
                    "model.layers", QKVO_GLU, 14, "mlp.down_proj"),  # q/k norms
    # embeddings scaled by sqrt(hidden), (1 + w) norms, post-attention and post-feed-forward
    # norms, tied head; Gemma 2 adds attention and final logit softcapping
    "gemma2": Family(lambda: _seeded(Gemma2ForCausalLM, Gemma2Config(
                         **LLAMA_LIKE, head_dim=HEAD_DIM, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"])),
                     "model.layers", QKVO_GLU, 14, "mlp.down_proj",
                     post_ff_norm="post_feedforward_layernorm"),
    "gemma3": Family(lambda: _seeded(Gemma3ForCausalLM, Gemma3TextConfig(
                         **LLAMA_LIKE, head_dim=HEAD_DIM, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"])),
                     "model.layers", QKVO_GLU, 14, "mlp.down_proj",
                     post_ff_norm="post_feedforward_layernorm"),
    # fused qkv and gate_up: [q; k; v] and [gate; up] stacked along the rows
    "phi3": Family(lambda: _seeded(Phi3ForCausalLM, Phi3Config(**LLAMA_LIKE)),
                   "model.layers",
                   (("self_attn.o_proj", HIDDEN, Q, False), ("self_attn.qkv_proj", Q + 2 * KV, HIDDEN, False),
                    ("mlp.gate_up_proj", 2 * INTERMEDIATE, HIDDEN, False),
                    ("mlp.down_proj", HIDDEN, INTERMEDIATE, False)),
                   8, "mlp.down_proj",
                   feeds=(("mlp.gate_up_proj", 0, 10.0), ("mlp.gate_up_proj", INTERMEDIATE, 10.0))),
    # Conv1D weights stored [in, out], fused c_attn, learned positions, LayerNorm, tied head
    "gpt2": Family(lambda: _seeded(GPT2LMHeadModel, GPT2Config(
                       vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS, n_head=HEADS,
                       n_positions=128, bos_token_id=0, eos_token_id=1)),
                   "transformer.h",
                   (("attn.c_attn", 3 * HIDDEN, HIDDEN, True), ("attn.c_proj", HIDDEN, HIDDEN, True),
                    ("mlp.c_fc", INTERMEDIATE, HIDDEN, True), ("mlp.c_proj", HIDDEN, INTERMEDIATE, True)),
                   8, "mlp.c_proj", feeds=(("mlp.c_fc", 0, 100.0),), final_norm="transformer.ln_f"),
    # fused query_key_value, parallel attention and MLP, LayerNorm, untied head
    "gpt_neox": Family(lambda: _seeded(GPTNeoXForCausalLM, GPTNeoXConfig(
                           vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                           num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=128,
                           **TOKENS)),
                       "gpt_neox.layers",
                       (("attention.query_key_value", 3 * HIDDEN, HIDDEN, False),
                        ("attention.dense", HIDDEN, HIDDEN, False),
                        ("mlp.dense_h_to_4h", INTERMEDIATE, HIDDEN, False),
                        ("mlp.dense_4h_to_h", HIDDEN, INTERMEDIATE, False)),
                       8, "mlp.dense_4h_to_h", feeds=(("mlp.dense_h_to_4h", 0, 100.0),),
                       final_norm="gpt_neox.final_layer_norm"),
    # fc1/fc2 directly in the block (no mlp submodule), k before q, ReLU, learned positions
    "opt": Family(lambda: _seeded(OPTForCausalLM, OPTConfig(
                      vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, max_position_embeddings=128, word_embed_proj_dim=HIDDEN,
                      **TOKENS)),
                  "model.decoder.layers",
                  (("self_attn.k_proj", HIDDEN, HIDDEN, False), ("self_attn.v_proj", HIDDEN, HIDDEN, False),
                   ("self_attn.q_proj", HIDDEN, HIDDEN, False), ("self_attn.out_proj", HIDDEN, HIDDEN, False),
                   ("fc1", INTERMEDIATE, HIDDEN, False), ("fc2", HIDDEN, INTERMEDIATE, False)),
                  12, "fc2", feeds=(("fc1", 0, 100.0),), final_norm="model.decoder.final_layer_norm"),
    # MLP output named fc_out (outside the usual names: found by structure), parallel attention
    # and MLP behind one LayerNorm, partial rotary, untied head
    "gptj": Family(lambda: _seeded(GPTJForCausalLM, GPTJConfig(
                       vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS, n_head=HEADS,
                       rotary_dim=HEAD_DIM, n_positions=128, bos_token_id=0, eos_token_id=1)),
                   "transformer.h",
                   (("attn.k_proj", HIDDEN, HIDDEN, False), ("attn.v_proj", HIDDEN, HIDDEN, False),
                    ("attn.q_proj", HIDDEN, HIDDEN, False), ("attn.out_proj", HIDDEN, HIDDEN, False),
                    ("mlp.fc_in", INTERMEDIATE, HIDDEN, False), ("mlp.fc_out", HIDDEN, INTERMEDIATE, False)),
                   12, "mlp.fc_out", feeds=(("mlp.fc_in", 0, 100.0),), final_norm="transformer.ln_f"),
    # norms after attention and MLP only: the MLP reads the raw residual stream
    "olmo2": Family(lambda: _seeded(Olmo2ForCausalLM, Olmo2Config(**LLAMA_LIKE)),
                    "model.layers", QKVO_GLU, 14, "mlp.down_proj",
                    post_ff_norm="post_feedforward_layernorm"),
}
IDS = list(FAMILIES)


def test_table_counts_are_layers_times_matrices():
    for name, family in FAMILIES.items():
        assert family.n_targets == LAYERS * len(family.matrices), name


# --- helpers ----------------------------------------------------------------------------------

def _windows(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _batches(windows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [windows[s:s + size] for s in range(0, len(windows), size)]


def _entry(weight: torch.Tensor, row: int, col: int, transposed: bool):
    """Entry (row, col) of the Linear convention, read from the parameter's own storage."""
    return weight[col, row] if transposed else weight[row, col]


def _storage_flat(row: int, col: int, rows: int, cols: int, transposed: bool) -> int:
    """Memory position of (row, col) in a contiguous parameter: [rows, cols] or [cols, rows]."""
    return col * rows + row if transposed else row * cols + col


def _sample(rows: int, cols: int, k: int, seed: int) -> list[tuple[int, int]]:
    """``k`` random (row, col) plus the four corners (where a transposition shows first)."""
    gen = torch.Generator().manual_seed(seed)
    picked = zip(torch.randint(0, rows, (k,), generator=gen).tolist(),
                 torch.randint(0, cols, (k,), generator=gen).tolist())
    return list(dict.fromkeys([(0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1), *picked]))


def _reference_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean token NLL from the model's own logits (its softcapping included), in float64."""
    logits = model(input_ids=batch).logits[:, :-1].double()
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, batch[:, 1:, None]).mean()


def _expected(family: Family) -> list[tuple]:
    return [(f"{family.layers}.{layer}.{module}.weight", layer, module, rows, cols, transposed)
            for layer in range(LAYERS) for module, rows, cols, transposed in family.matrices]


# --- 1. targets -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", IDS)
def test_targets_are_the_family_matrices(family):
    spec = FAMILIES[family]
    model = spec.build()
    targets = find_targets(model)
    assert [(t.name, t.layer, t.module, t.rows, t.cols, t.transposed) for t in targets] == _expected(spec)
    assert len(targets) == spec.n_targets
    for t in targets:  # the stored shape is the matrix, or its transpose for Conv1D
        shape = tuple(model.get_parameter(t.name).shape)
        assert shape == ((t.cols, t.rows) if t.transposed else (t.rows, t.cols)), t.name
    assert [(layer, name) for layer, name, _ in mlp_output_projections(model)] == [
        (layer, spec.mlp_out) for layer in range(LAYERS)]


def _renamed_mlp(intermediate: int) -> nn.Module:
    """A tiny Llama whose blocks hold their MLP as ``feed`` (a name outside MLP_PARENTS)."""
    model = _seeded(LlamaForCausalLM, LlamaConfig(**{**LLAMA_LIKE, "intermediate_size": intermediate}))
    for block in model.model.layers:
        block.add_module("feed", block.mlp)
        del block.mlp
    return model


def test_mlp_output_is_found_by_structure_and_an_ambiguous_block_stops():
    """The one matrix writing the hidden size outside the attention is the projection, whatever
    its parent's name; where gate, up and down all write it (intermediate = hidden) and no name
    tells them apart, one line names the candidates."""
    assert [(layer, name) for layer, name, _ in mlp_output_projections(_renamed_mlp(INTERMEDIATE))] == [
        (0, "feed.down_proj"), (1, "feed.down_proj")]
    with pytest.raises(ESAError) as err:
        mlp_output_projections(_renamed_mlp(HIDDEN))
    assert str(err.value) == (
        "cannot find the MLP output projection of LlamaForCausalLM layer 0: 3 matrices outside the attention "
        "self_attn write the hidden size 32 (feed.gate_proj, feed.up_proj, feed.down_proj) and none is named "
        "down_proj|c_proj|dense_4h_to_h|fc2|w2 under mlp|feed_forward|ffn or is an expert stack")


def test_decoder_blocks_are_the_largest_list_of_layer_count_modules():
    """A list of num_hidden_layers small matrices ahead of the blocks is not taken for them."""
    model = FAMILIES["llama"].build()
    model.model._modules = {"per_layer": nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]), **model.model._modules}
    assert decoder_layers_name(model) == "model.layers"
    model.model.layers = nn.ModuleList([nn.LayerNorm(4), nn.LayerNorm(4)])  # no matrix: not blocks
    del model.model._modules["per_layer"]
    with pytest.raises(ESAError) as err:
        decoder_layers_name(model)
    assert str(err.value) == ("cannot find the decoder layers of LlamaForCausalLM: no nn.ModuleList of "
                              "config.num_hidden_layers=2 modules holding weight matrices")


# --- 2. scores against brute force ------------------------------------------------------------

@pytest.mark.parametrize("family", IDS)
def test_scores_match_brute_force(family):
    spec = FAMILIES[family]
    model = spec.build()
    targets = find_targets(model)
    windows, batch_size = _windows(6, 12, seed=1), 2
    names = [name for name, *_ in _expected(spec)]
    params = [model.get_parameter(name) for name in names]

    grads = [torch.autograd.grad(_reference_loss(model, batch), params)
             for batch in _batches(windows, batch_size)]
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [model.get_submodule(name.rpartition(".")[0]).register_forward_pre_hook(
        lambda module, args, name=name: inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for name in names]
    with torch.no_grad():
        for batch in _batches(windows, batch_size):
            model(input_ids=batch)
    for handle in handles:
        handle.remove()

    result = compute_scores(model, targets, windows, ["grad_x_weight", "grad_squared", "activation_magnitude"],
                            batch_size=batch_size, seed=0, progress=False)
    gxw, gsq, act = (result[m].score for m in ("grad_x_weight", "grad_squared", "activation_magnitude"))
    for i, (name, _, _, rows, cols, transposed) in enumerate(_expected(spec)):
        w = params[i].detach()
        l2 = torch.cat(inputs[name]).square().sum(0).sqrt()  # per input channel, over all tokens
        assert l2.numel() == cols, name
        entries = _sample(rows, cols, 24, seed=i)
        expected = {"gxw": [], "gsq": [], "act": []}
        for row, col in entries:
            weight = _entry(w, row, col, transposed)
            per_batch = torch.stack([_entry(g[i], row, col, transposed) for g in grads])
            expected["gxw"].append(abs(weight * per_batch.mean()))
            expected["gsq"].append(0.5 * per_batch.square().mean() * weight ** 2)
            expected["act"].append(abs(weight) * l2[col])
        rows_, cols_ = torch.tensor(entries).T
        for key, view in (("gxw", gxw), ("gsq", gsq), ("act", act)):
            score = view[name]
            assert score.shape == (rows, cols), name
            want = torch.stack(expected[key])
            torch.testing.assert_close(score[rows_, cols_], want, rtol=1e-5, atol=1e-6 * float(score.abs().max()),
                                       msg=lambda m, key=key, name=name: f"{key} {name}: {m}")


# --- 3. perturbations -------------------------------------------------------------------------

@pytest.mark.parametrize("family", IDS)
def test_perturbations_touch_the_right_entries_and_restore_bit_exactly(family):
    spec = FAMILIES[family]
    model = spec.build()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows = []
    where: dict[str, set[int]] = {}  # tensor -> memory positions that must change
    for i, (name, _, _, n_rows, n_cols, transposed) in enumerate(_expected(spec)):
        for row, col in _sample(n_rows, n_cols, 3, seed=100 + i):
            rows.append({"tensor": name, "flat_index": row * n_cols + col})
            where.setdefault(name, set()).add(_storage_flat(row, col, n_rows, n_cols, transposed))
    selection = pd.DataFrame(rows)

    for kind, scale in (("zero", 1.0), ("sign_flip", 1.0), ("gaussian", 0.1)):
        with perturbed(model, selection, kind, scale=scale, noise="relative", seed=3) as info:
            assert info.n_weights == sum(map(len, where.values())), kind
            for name, p in model.named_parameters():
                now, was = p.detach().reshape(-1), before[name].reshape(-1)
                changed = set(torch.nonzero(now != was).flatten().tolist())
                assert changed == where.get(name, set()), (kind, name)
                index = torch.tensor(sorted(changed), dtype=torch.long)
                if kind == "zero":
                    assert (now[index] == 0).all(), name
                elif kind == "sign_flip":
                    assert torch.equal(now[index], -was[index]), name
                else:  # w + 0.1 |w| eps
                    assert ((now[index] - was[index]).abs() < 0.1 * 6 * was[index].abs()).all(), name
        for name, p in model.named_parameters():
            assert torch.equal(p.detach().view(torch.int32), before[name].view(torch.int32)), (kind, name)


# --- 4. the massive-activation trace ----------------------------------------------------------

@pytest.mark.parametrize("family", IDS)
def test_activation_trace_has_one_row_per_layer_and_side(family):
    spec = FAMILIES[family]
    model = spec.build()
    windows = _windows(6, 12, seed=2)
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(LAYERS)}
    current = []  # OPT runs its MLP on [tokens, hidden]: back to [window, position, channel]
    handles = [module.register_forward_pre_hook(
        lambda m, args, layer=layer: seen[layer].append(args[0].detach().reshape(*current[-1].shape, -1)))
        for layer, _, module in mlp_output_projections(model)]
    with torch.no_grad():
        for batch in _batches(windows, 4):
            current.append(batch)
            model(input_ids=batch)
    for handle in handles:
        handle.remove()

    trace = activation_trace(model, windows, batch_size=4)
    assert sorted(zip(trace["layer"], trace["side"])) == [(layer, side) for layer in range(LAYERS)
                                                          for side in ("input", "output")]
    assert (trace["module"] == spec.mlp_out).all()
    for layer in range(LAYERS):
        row = trace[(trace["layer"] == layer) & (trace["side"] == "input")].iloc[0]
        x = torch.cat(seen[layer]).abs()
        assert row["value"] == pytest.approx(float(x.max()), rel=1e-6)
        assert x[row["window"], row["position"], row["channel"]] == x.max()
        assert row["token"] == windows[row["window"], row["position"]]


# --- 5. a planted super weight ----------------------------------------------------------------

ROW, COL = 5, 7  # the super weight: block 0's MLP output projection [ROW, COL]
FINAL_GAIN = 100.0  # final norm gain on channel ROW: keeps a tied head's column ROW tiny
POST_FF_GAIN = 20.0  # post-feed-forward norm gain on ROW: the channel must dominate the residual



def _set_gain(norm: nn.Module, channel: int, gain: float) -> None:
    """Make ``norm`` multiply ``channel`` by ``gain`` (Gemma's norms multiply by 1 + weight)."""
    offset = 1.0 if type(norm).__name__.startswith("Gemma") else 0.0
    norm.weight[channel] = gain - offset


def _final_row(model: nn.Module, text: torch.Tensor) -> float:
    """Mean over tokens of channel ROW of the final (normalised) hidden state."""
    with torch.no_grad():
        return float(model.get_decoder()(input_ids=text).last_hidden_state[..., ROW].mean())


def _planted(family: Family) -> nn.Module:
    """The family's model, whose good PPL hangs on one weight (cf. test_confirm._planted_model).

    Every token embedding gets a shared sign direction s (channel ROW excluded), so block 0's
    MLP, whose rows feeding input channel COL of the output projection point along s, makes
    channel COL a massive activation (~100) on every token; W_out[ROW, COL] = 1 writes it into
    residual channel ROW, which then dominates the final norm, and the head's column ROW turns
    that channel into the (centred) unigram log-probabilities. A tied head is the embedding,
    so its column ROW is refitted twice after it changes the embeddings.
    """
    model = family.build()
    hidden = model.config.hidden_size
    signs = shared_sign_direction(model, ROW)
    block = model.get_submodule(family.layers)[0]
    with torch.no_grad():
        for name, offset, gain in family.feeds:
            module = block.get_submodule(name)
            along = gain * signs / (hidden - 1)
            if isinstance(module, nn.Linear):
                module.weight[offset + COL] = along
            else:  # Conv1D: [in, out]
                module.weight[:, offset + COL] = along
        out = block.get_submodule(family.mlp_out)
        out.weight[(ROW, COL) if isinstance(out, nn.Linear) else (COL, ROW)] = 1.0
        if family.post_ff_norm:
            _set_gain(block.get_submodule(family.post_ff_norm), ROW, POST_FF_GAIN)
        _set_gain(model.get_submodule(family.final_norm), ROW, FINAL_GAIN)
        logp = UNIGRAM.log() - UNIGRAM.log().mean()
        head = model.get_output_embeddings().weight
        fit = unigram_text(4, seed=9)
        for _ in range(3 if head is model.get_input_embeddings().weight else 1):
            head[:, ROW] = 0
            head[:, ROW] = logp / _final_row(model, fit)
    return model


@pytest.mark.parametrize("family", IDS)
def test_planted_super_weight_is_found_and_confirmed_alone(family):
    spec = FAMILIES[family]
    model = _planted(spec)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    confirmation, baseline = confirm_by_activation(model, top_n=5)
    result = confirmation.super_weights

    down = f"{spec.layers}.0.{spec.mlp_out}.weight"
    assert len(result) == 5 and result["rank"].tolist() == list(range(5))
    top = result.iloc[0]  # ranked first, the only one confirmed
    assert (top["tensor"], top["layer"], top["module"], top["row"], top["col"], top["flat_index"]) == (
        down, 0, spec.mlp_out, ROW, COL, ROW * INTERMEDIATE + COL)
    assert top["weight"] == 1.0
    assert result["confirmed"].tolist() == [True, False, False, False, False], result
    assert top["ppl_ratio"] > 3, result
    assert (result["ppl_ratio"].iloc[1:] - 1).abs().max() < 0.05, result
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert confirmation.rerun.nll.tolist() == baseline.nll.tolist()
    layer0 = confirmation.activations.set_index(["layer", "side"]).loc[(0, "input")]
    assert layer0["channel"] == COL and layer0["value"] > 50

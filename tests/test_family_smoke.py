"""Structural smoke test over every ``*ForCausalLM`` class the installed transformers exports.

Each class is built from its own config shrunk to a tiny model (hidden 32, 2 layers, 4 heads,
intermediate 64, vocabulary 64); ESA must find its decoder blocks, its targets and each block's
MLP output projection, and trace the massive activations (one forward pass). A class is skipped
only for a stated reason: an encoder-decoder, a class that needs a package not installed or
does not build from a tiny config or whose transformers forward fails on it, or one of
``NO_MLP`` (recurrent or state-space blocks, which ESA reports with its one-line error).
``KNOWN`` lists, as strict xfails, classes that run in transformers but not yet in ESA. The
module prints its skip list at the end (``pytest -s``; ``pytest -rsx`` shows the same reasons).
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from esa.architecture import decoder_layers, decoder_layers_name, mlp_output_projections
from esa.confirm import activation_trace
from esa.errors import ESAError
from esa.targets import find_targets

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = sorted(name for name in dir(transformers) if name.endswith("ForCausalLM") and name != "AutoModelForCausalLM")
HIDDEN, LAYERS, VOCAB = 32, 2, 64
TINY = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, rotary_dim=8, intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64,
            # mixture of experts: few small experts
            num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=16, bos_token_id=0, eos_token_id=1, pad_token_id=2)
# blocks without an MLP (recurrent or state-space mixers): out of ESA's scope, and ESA says so
NO_MLP = {"MambaForCausalLM", "Mamba2ForCausalLM", "FalconMambaForCausalLM", "RwkvForCausalLM",
          "xLSTMForCausalLM"}
MAX_PARAMETERS = 5_000_000
# classes that build and run in transformers but that ESA cannot yet take: strict xfails, so a
# fix shows as XPASS; each reason is the failure seen (transformers 5.24)
KNOWN = {
    "ClvpForCausalLM": "esa.evaluation: speech decoder, no output embeddings (get_output_embeddings() is None)",
    "CsmDepthDecoderForCausalLM": "esa.evaluation: audio depth decoder, no output embeddings",
    "CpmAntForCausalLM": "esa.scores trace: blocks run [position, batch, channel], not [batch, position, channel]",
    "ElectraForCausalLM": "esa.evaluation: embedding width 128 differs from the hidden size the LM head reads",
    "RemBertForCausalLM": "esa.evaluation: output embedding width 1664 differs from the hidden size",
    "Llama4ForCausalLM": "esa.evaluation: get_decoder() returns a model without last_hidden_state",
    "MllamaForCausalLM": "esa.evaluation: get_decoder() returns a model without last_hidden_state",
    "ModernBertDecoderForCausalLM": "esa.evaluation: get_decoder() returns the head, a Linear",
    "Gemma4AssistantForCausalLM": "config validation error when ESA reads the config (validate_architecture)",
    "Gemma4UnifiedForCausalLM": "esa.architecture.fused_split reads config.head_dim, a per-layer attribute here",
    "NemotronHForCausalLM": "hybrid: each block's one mixer is Mamba, attention or an MLP; layer 0 has no MLP",
    "HrmTextForCausalLM": "hierarchical reasoning model: no ModuleList of num_hidden_layers blocks",
}
SKIPPED: dict[str, str] = {}


def _skip(name: str, reason: str):
    SKIPPED[name] = reason
    pytest.skip(f"{name}: {reason}")


def _tiny(name: str) -> torch.nn.Module:
    """The class ``name`` built from its config class with ``TINY`` overrides, or a skip saying why."""
    try:
        model_class = getattr(transformers, name)
    except (ImportError, AttributeError) as err:  # a modeling file that needs another package
        _skip(name, f"import: {str(err).strip().splitlines()[0][:120]}")
    config_class = model_class.config_class
    if getattr(config_class, "is_encoder_decoder", False) or getattr(config_class(), "is_encoder_decoder", False):
        _skip(name, "encoder-decoder")
    try:
        config = config_class(**TINY)
        config._attn_implementation = "eager"
        with torch.device("meta"):  # size first: a table TINY does not shrink would fill the memory
            size = sum(p.numel() for p in model_class(config).parameters())
        if size > MAX_PARAMETERS:
            _skip(name, f"{size:,} parameters from the tiny config (a size TINY does not reach)")
        torch.manual_seed(0)
        return model_class(config).eval()
    except Exception as err:  # noqa: BLE001 -- any failure to build is a stated skip
        _skip(name, f"build from a tiny config: {type(err).__name__}: {str(err).strip().splitlines()[0][:120]}")


@pytest.fixture(scope="module", autouse=True)
def skip_list():
    yield
    print(f"\n{len(SKIPPED)} of {len(CLASSES)} *ForCausalLM classes skipped:")
    for name, reason in sorted(SKIPPED.items()):
        print(f"  {name}: {reason}")


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN[name]))
                                  if name in KNOWN else name for name in CLASSES])
def test_blocks_targets_mlp_output_and_trace(name):
    model = _tiny(name)
    windows = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(input_ids=windows)
    except Exception as err:  # noqa: BLE001 -- transformers' own forward: the tiny config is out of its range
        _skip(name, f"transformers' forward of the tiny config: {type(err).__name__}: "
                    f"{str(err).strip().splitlines()[0][:100]}")
    if name in NO_MLP:
        with pytest.raises(ESAError, match=f"cannot find the MLP output projection of {name} layer 0: "):
            mlp_output_projections(model)
        _skip(name, "recurrent/state-space blocks: no MLP (ESA stops with its one-line error)")
    prefix = decoder_layers_name(model)
    layers = model.config.get_text_config().num_hidden_layers  # 2, or a hybrid pattern's length
    assert len(decoder_layers(model)) == layers
    targets = find_targets(model)
    assert {t.layer for t in targets} == set(range(layers))
    projections = mlp_output_projections(model)
    assert [layer for layer, _, _ in projections] == list(range(layers))
    modules = {t.module_path for t in targets}
    for layer, inside, _ in projections:  # each projection is scored: its matrix is a target
        assert f"{prefix}.{layer}.{inside}" in modules, (layer, inside)
    trace = activation_trace(model, windows, batch_size=2)
    assert sorted(zip(trace["layer"], trace["side"])) == [(layer, side) for layer in range(layers)
                                                          for side in ("input", "output")]
    assert all(math.isfinite(v) for v in trace["value"])
    # where the trace says the maximum sits is a position of the windows ESA passed in
    assert all(0 <= p < windows.shape[1] and token == windows[w, p]
               for w, p, token in zip(trace["window"], trace["position"], trace["token"]))

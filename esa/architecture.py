"""Where a causal LM keeps what ESA needs, whatever its family: the decoder blocks, the weight
matrices inside them and how each is stored, and each block's MLP output projection. Both are
found by structure, not by name, so a family with its own names works.

- Decoder blocks: the ``nn.ModuleList`` of ``config.num_hidden_layers`` modules that each hold
  a weight matrix (``model.layers`` in Llama-like models, ``transformer.h`` in GPT-2,
  ``gpt_neox.layers``, ``model.decoder.layers`` in OPT); where several lists qualify (per-layer
  projections beside the blocks), the one holding the most parameters, a tie being an error.
- Weight matrices: the 2-D weights of ``nn.Linear`` and of GPT-2's ``Conv1D``. A Conv1D stores
  its weight as [in, out] (``y = x W + b``), the transpose of ``nn.Linear``'s [out, in]; ESA
  reports every matrix in the Linear convention, row = output channel, col = input channel,
  and ``flat_index = row * cols + col`` in that convention (:func:`storage_index` maps it to
  the parameter's own memory order).
- MLP output projection: the matrix whose output is added to the residual stream at the end
  of a block's MLP (``mlp.down_proj``, GPT-2's ``mlp.c_proj``, GPT-NeoX's
  ``mlp.dense_4h_to_h``, OPT's ``fc2``, GPT-J's ``mlp.fc_out``; in a mixture-of-experts block
  the expert stack, whose experts' ``down_proj`` outputs, weighted by the router, are added);
  massive activations enter the residual stream there. For an expert stack the trace's input
  side is the stack's input, the block's hidden state. The rule (:func:`mlp_output_projections`):
  among the block's matrices and expert stacks, those whose output width is the hidden size,
  outside the block's attention (the block's child holding its first matrix in module order:
  attention reads the block's input first). Exactly one is the projection; otherwise the first
  (in module order) of the block's hidden-size writers with a usual name (``MLP_OUTPUT_LEAVES``
  under ``MLP_PARENTS``, or an expert stack), and a block where neither rule picks one stops
  with one line naming the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ESAError

MATRIX_MODULES = (nn.Linear, Conv1D)
# the tiebreak between several matrices writing the hidden size outside the attention: a matrix
# named one of MLP_OUTPUT_LEAVES, directly in the block (OPT's fc2) or in a submodule named one
# of MLP_PARENTS (Gemma 3n's laurel.linear_right and per_layer_projection also write the hidden size)
MLP_OUTPUT_LEAVES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2")
MLP_PARENTS = ("mlp", "feed_forward", "ffn")


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    return getattr(config, "text_config", None) or config  # multimodal wrappers


def _holds_matrix(module: nn.Module) -> bool:
    return any(isinstance(m, MATRIX_MODULES) or is_expert_stack(m) for m in module.modules())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order (:func:`decoder_layers_name`)."""
    return model.get_submodule(decoder_layers_name(model))


def decoder_layers_name(model: nn.Module) -> str:
    """Qualified name of the decoder blocks' list, e.g. ``model.layers`` or ``transformer.h``: the
    ``nn.ModuleList`` of ``config.num_hidden_layers`` modules that each hold a weight matrix; of
    several, the one with the most parameters (the blocks hold nearly all of them)."""
    count = getattr(_text_config(model), "num_hidden_layers", None)
    sizes = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and count and len(module) == count
             and all(map(_holds_matrix, module))}
    if not sizes:
        raise ESAError(f"cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList of "
                       f"config.num_hidden_layers={count} modules holding weight matrices")
    largest = [name for name, size in sizes.items() if size == max(sizes.values())]
    if len(largest) > 1:
        raise ESAError(f"cannot tell the decoder layers of {type(model).__name__} apart: "
                       f"{', '.join(largest)} are lists of {count} modules of equal size")
    return largest[0]


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module`` stores its weight as [in, out] (GPT-2's Conv1D)."""
    return isinstance(module, Conv1D)


def storage_index(flat_index: np.ndarray, rows: int, cols: int, transposed: bool) -> np.ndarray:
    """Position in the parameter's memory of ``flat_index = row * cols + col`` of a (rows x
    cols) matrix in the Linear convention: itself, or ``col * rows + row`` when transposed."""
    if not transposed:
        return flat_index
    row, col = np.divmod(flat_index, cols)
    return col * rows + row


def expert_key(param_name: str, expert: int) -> str:
    """The tensor key of one expert's matrix in a 3-D [experts, out, in] parameter."""
    return f"{param_name}[{expert}]"


def split_expert(tensor: str) -> tuple[str, int]:
    """``(parameter name, expert)`` of a tensor key; expert -1 for a plain matrix."""
    name, bracket, rest = tensor.partition("[")
    return (name, int(rest.rstrip("]"))) if bracket else (tensor, -1)


@dataclass(frozen=True)
class FusedSplit:
    """How the output rows of a fused projection divide into its parts: consecutive blocks of
    ``sizes`` rows named ``names``, repeating every ``period`` rows when ``period`` > 0 (GPT-NeoX
    interleaves q, k, v per head)."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    period: int = 0

    def part(self, rows: np.ndarray) -> np.ndarray:
        """The part name of each output row."""
        within = np.asarray(rows) % self.period if self.period else np.asarray(rows)
        return np.asarray(self.names, dtype=object)[np.searchsorted(np.cumsum(self.sizes), within, side="right")]


def fused_split(model: nn.Module, module: str, rows: int) -> FusedSplit | None:
    """The parts of a fused projection named ``module`` (its name inside a block) with ``rows``
    output rows, where the family's layout is known: ``qkv_proj`` (Phi-3: q, k, v of the heads
    and the key/value heads), ``c_attn`` (GPT-2: thirds), ``query_key_value`` (GPT-NeoX: q, k, v
    interleaved per head), ``gate_up_proj`` (halves, also an expert's); None otherwise."""
    config = getattr(model.config, "text_config", None) or model.config
    leaf = module.rpartition(".")[2]
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if leaf == "gate_up_proj" and rows % 2 == 0:
        return FusedSplit(("gate", "up"), (rows // 2, rows // 2))
    if leaf == "c_attn" and rows % 3 == 0:
        return FusedSplit(("q", "k", "v"), (rows // 3,) * 3)
    if leaf == "query_key_value" and head_dim and rows == 3 * heads * head_dim:
        return FusedSplit(("q", "k", "v"), (head_dim,) * 3, period=3 * head_dim)
    if leaf == "qkv_proj" and head_dim:
        q = heads * head_dim
        kv = (rows - q) // 2
        if kv > 0 and q + 2 * kv == rows:
            return FusedSplit(("q", "k", "v"), (q, kv, kv))
    return None


def mlp_output_projections(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """``(layer, name inside the layer, module)`` of every block's MLP output projection (or
    expert stack), by the rule of the module docstring.

    A block where the rule picks none stops with one line naming the model class, the layer
    and the candidates.
    """
    hidden = _text_config(model).hidden_size
    return [(index, *_mlp_output(model, index, layer, hidden)) for index, layer in enumerate(decoder_layers(model))]


def is_expert_stack(module: nn.Module) -> bool:
    """Whether ``module`` holds a mixture of experts' matrices as 3-D parameters [experts, out, in]."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, nn.Parameter) and down.ndim == 3


def _writes(module: nn.Module, hidden: int) -> bool | None:
    """Whether a matrix module or expert stack writes ``hidden`` channels; None for any other module.
    An expert stack is [experts, out, in] or, in GPT-OSS, [experts, in, out]."""
    if is_expert_stack(module):
        return hidden in module.down_proj.shape[1:]
    if isinstance(module, nn.Linear):
        return module.out_features == hidden
    return module.nf == hidden if isinstance(module, Conv1D) else None


def _mlp_output(model: nn.Module, index: int, block: nn.Module, hidden: int) -> tuple[str, nn.Module]:
    matrices = [(name, module) for name, module in block.named_modules() if _writes(module, hidden) is not None]
    first = matrices[0][0] if matrices else ""
    # a matrix directly in the block is no attention
    attention = first.partition(".")[0] + "." if "." in first else None
    writers = [(name, module) for name, module in matrices if _writes(module, hidden)]
    candidates = [(name, module) for name, module in writers if not (attention and name.startswith(attention))]
    if len(candidates) == 1:
        return candidates[0]
    # the tiebreak looks at every writer: a block whose first child is its MLP (Falcon-H1) has
    # the attention among the candidates and the MLP left out
    named = [(name, module) for name, module in writers if _is_mlp_output(name, module)]
    if named:
        return named[0]
    outside = f"outside the attention {attention.rstrip('.')}" if attention else "in the block"
    where = f"cannot find the MLP output projection of {type(model).__name__} layer {index}"
    if not candidates:
        raise ESAError(f"{where}: no matrix {outside} writes the hidden size {hidden}")
    raise ESAError(f"{where}: {len(candidates)} matrices {outside} write the hidden size {hidden} "
                   f"({', '.join(name for name, _ in candidates)}) and none is named "
                   f"{'|'.join(MLP_OUTPUT_LEAVES)} under {'|'.join(MLP_PARENTS)} or is an expert stack")


def _is_mlp_output(name: str, module: nn.Module) -> bool:
    parent, _, leaf = name.rpartition(".")
    return is_expert_stack(module) or (leaf in MLP_OUTPUT_LEAVES
                                       and (not parent or parent.rpartition(".")[2] in MLP_PARENTS))

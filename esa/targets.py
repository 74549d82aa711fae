"""Which weight tensors ESA scores (the targets), each tagged with its layer and module.

By default the targets are the weight matrices inside the decoder blocks
(:func:`esa.architecture.decoder_layers`), in model order: every 2-D ``weight`` (``nn.Linear``,
GPT-2 ``Conv1D``, a mixture-of-experts router: attention q/k/v/o or fused qkv, MLP
gate/up/down or fc1/fc2...) and every expert of a 3-D expert parameter ([experts, out, in],
one target per expert, named ``<parameter>[<expert>]``; the experts of a ``ModuleList`` of
expert modules, ``...experts.<e>....weight``, are plain matrices with ``expert`` e). Each is
reported in the Linear
convention (rows = output channels, cols = input channels; :mod:`esa.architecture`).
``include`` patterns add any other 2-D parameter (embeddings, lm_head), ``exclude`` patterns
remove targets; both are regular expressions searched (``re.search``) in parameter names.

A tensor shared by several modules (lm_head tied to embed_tokens) is one target, named by its
first name in model order; patterns see all of its names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import pandas as pd
import torch
from torch import nn

from .architecture import FusedSplit, decoder_layers_name, expert_key, fused_split, is_transposed, split_expert
from .errors import ESAError
from .names import TABLE_COLUMNS

LISTED_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)\.")



@dataclass(frozen=True)
class Target:
    """One scored weight matrix; ``layer`` is -1 for tensors outside the decoder layers."""

    name: str  # tensor key: a parameter name, e.g. "model.layers.2.mlp.down_proj.weight", or
    # for an expert "model.layers.2.mlp.experts.down_proj[5]"
    layer: int
    module: str  # "mlp.down_proj" inside a layer; "embed_tokens", "lm_head" outside
    rows: int  # output channels
    cols: int  # input channels
    transposed: bool = False  # stored as [cols, rows] (GPT-2 Conv1D)
    expert: int = -1  # the mixture-of-experts expert the matrix belongs to; -1 for none
    fused: FusedSplit | None = None  # the parts of a fused projection's rows (q/k/v, gate/up)

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (shaped like the parameter) as the (rows, cols) matrix: a view."""
        if self.stacked:
            return tensor[self.expert]
        return tensor.t() if self.transposed else tensor

    @property
    def stacked(self) -> bool:
        """Whether the matrix is one expert's block of a 3-D [experts, rows, cols] parameter."""
        return split_expert(self.name)[1] >= 0

    @property
    def param_name(self) -> str:
        """Name of the parameter holding the matrix."""
        return split_expert(self.name)[0]

    @property
    def module_path(self) -> str:
        """Qualified name of the module that owns the parameter."""
        return self.param_name.rpartition(".")[0]


def target_parameter(model: nn.Module, target: Target) -> nn.Parameter:
    return model.get_parameter(target.param_name)


def target_module(model: nn.Module, target: Target) -> nn.Module:
    return model.get_submodule(target.module_path)


def _describe(name: str, param: torch.Tensor, prefix: str, transposed: bool) -> list[Target]:
    """The target(s) of one parameter: itself, or one per expert of a 3-D expert parameter."""
    module_path = name.rpartition(".")[0]
    if name.startswith(prefix + "."):
        index, _, module = module_path[len(prefix) + 1:].partition(".")
        layer = int(index)
    else:
        layer, module = -1, module_path.rpartition(".")[2]
    if param.ndim == 3:  # experts: the parameter's own name tells gate_up_proj from down_proj
        module = f"{module}.{name.rpartition('.')[2]}"
        return [Target(expert_key(name, e), layer, module, param.shape[1], param.shape[2], expert=e)
                for e in range(param.shape[0])]
    rows, cols = reversed(param.shape) if transposed else param.shape
    listed = LISTED_EXPERT.search(module) if layer >= 0 else None  # an expert of a ModuleList
    return [Target(name, layer, module, rows, cols, transposed, expert=int(listed.group(1)) if listed else -1)]


def _examples(names: list[str], prefix: str) -> str:
    """Every name outside the layers plus those of layer 0: all a pattern can tell apart."""
    inside = prefix + "."
    shown = [n for n in names if not n.startswith(inside) or n.startswith(inside + "0.")]
    return ", ".join(shown[:16])


def find_targets(model: nn.Module, include: list[str] | tuple[str, ...] = (),
                 exclude: list[str] | tuple[str, ...] = ()) -> list[Target]:
    """The model's scoring targets, in model order (see the module docstring).

    A pattern that matches no weight, or a selection left empty, raises ``ESAError``.
    """
    prefix = decoder_layers_name(model)
    transposed = {id(m.weight) for m in model.modules() if is_transposed(m)}
    aliases: dict[int, list[str]] = {}  # id(param) -> its names, first = canonical
    params: dict[int, torch.Tensor] = {}
    matrices = set()  # the default targets: weight matrices and expert stacks inside the blocks
    for name, param in model.named_parameters(remove_duplicate=False):
        inside = name.startswith(prefix + ".")
        if param.ndim == 2 or (param.ndim == 3 and inside):
            aliases.setdefault(id(param), []).append(name)
            params[id(param)] = param
            if inside and (param.ndim == 3 or name.endswith(".weight")):
                matrices.add(id(param))

    def matches(pattern: str, key: int) -> bool:
        return any(re.search(pattern, name) for name in aliases[key])

    for pattern in (*include, *exclude):
        if not any(matches(pattern, key) for key in aliases):
            names = [n for names in aliases.values() for n in names]
            raise ESAError(f"target pattern '{pattern}' matches no weight matrix; names look like: "
                             f"{_examples(names, prefix)}")
    chosen = [key for key in aliases
              if (key in matrices or any(matches(p, key) for p in include))
              and not any(matches(p, key) for p in exclude)]
    if not chosen:
        raise ESAError(f"no target weights left (include={list(include)}, exclude={list(exclude)})")
    return [replace(t, fused=fused_split(model, t.module, t.rows)) if t.layer >= 0 else t
            for key in chosen for t in _describe(aliases[key][0], params[key], prefix, key in transposed)]


def target_table(targets: list[Target]) -> pd.DataFrame:
    """One row per target: tensor, layer, module, expert, rows, cols, numel (its shape)."""
    rows = [(t.name, t.layer, t.module, t.expert, t.rows, t.cols, t.numel) for t in targets]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def split_targets(targets: list[Target], groups: int) -> list[list[Target]]:
    """Cut the targets into ``groups`` contiguous parts along layer boundaries.

    Consecutive targets of one layer form a block (tensors outside the decoder, layer -1,
    form their own); the blocks are dealt into ``groups`` runs of near-equal block count, so
    concatenating the parts gives back ``targets`` in order. Scoring a part alone gives the
    same gradient and activation scores as scoring everything (a weight's gradient does not
    depend on which other weights require one); the Hutchinson estimate of a part differs,
    as its probes no longer span the other parts (still unbiased for the diagonal).
    """
    blocks: list[list[Target]] = []
    for target in targets:
        if blocks and blocks[-1][0].layer == target.layer:
            blocks[-1].append(target)
        else:
            blocks.append([target])
    if not 1 <= groups <= len(blocks):
        raise ESAError(f"layer_groups {groups} must be between 1 and the {len(blocks)} layer blocks")
    bounds = [round(i * len(blocks) / groups) for i in range(groups + 1)]
    return [[t for block in blocks[lo:hi] for t in block] for lo, hi in zip(bounds, bounds[1:])]

"""Which weight tensors ESA scores (the targets), each tagged with its layer and module.

By default the targets are the 2-D weights of every ``nn.Linear`` inside the decoder layers
(``model.get_decoder().layers``: attention q/k/v/o, MLP gate/up/down), in model order.
``include`` patterns add any other 2-D parameter (embeddings, lm_head), ``exclude`` patterns
remove targets; both are regular expressions searched (``re.search``) in parameter names.

A tensor shared by several modules (lm_head tied to embed_tokens) is one target, named by its
first name in model order; patterns see all of its names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from .errors import ESAError

TABLE_COLUMNS = ["tensor", "layer", "module", "rows", "cols", "numel"]


@dataclass(frozen=True)
class Target:
    """One scored weight matrix; ``layer`` is -1 for tensors outside the decoder layers."""

    name: str  # parameter name, e.g. "model.layers.2.mlp.down_proj.weight"
    layer: int
    module: str  # "mlp.down_proj" inside a layer; "embed_tokens", "lm_head" outside
    rows: int
    cols: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def module_path(self) -> str:
        """Qualified name of the module that owns the parameter."""
        return self.name.rpartition(".")[0]


def target_parameter(model: nn.Module, target: Target) -> nn.Parameter:
    return model.get_parameter(target.name)


def target_module(model: nn.Module, target: Target) -> nn.Module:
    return model.get_submodule(target.module_path)


def _layers_prefix(model: nn.Module) -> str:
    """Qualified name of the decoder's layer list, e.g. ``model.layers``."""
    layers = model.get_decoder().layers
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ESAError("cannot locate the decoder layers inside the model")


def _describe(name: str, param: torch.Tensor, prefix: str) -> Target:
    module_path = name.rpartition(".")[0]
    rows, cols = param.shape
    if name.startswith(prefix + "."):
        index, _, module = module_path[len(prefix) + 1:].partition(".")
        return Target(name, int(index), module, rows, cols)
    return Target(name, -1, module_path.rpartition(".")[2], rows, cols)


def _examples(names: list[str], prefix: str) -> str:
    """Every name outside the layers plus those of layer 0: all a pattern can tell apart."""
    inside = prefix + "."
    shown = [n for n in names if not n.startswith(inside) or n.startswith(inside + "0.")]
    return ", ".join(shown[:16])


def find_targets(model: nn.Module, include: list[str] | tuple[str, ...] = (),
                 exclude: list[str] | tuple[str, ...] = ()) -> list[Target]:
    """The model's scoring targets, in model order (see the module docstring).

    A pattern that matches no 2-D weight, or a selection left empty, raises ``ValueError``.
    """
    prefix = _layers_prefix(model)
    linear = {id(m.weight) for m in model.get_decoder().layers.modules() if isinstance(m, nn.Linear)}
    aliases: dict[int, list[str]] = {}  # id(param) -> its names, first = canonical
    params: dict[int, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.ndim == 2:
            aliases.setdefault(id(param), []).append(name)
            params[id(param)] = param

    def matches(pattern: str, key: int) -> bool:
        return any(re.search(pattern, name) for name in aliases[key])

    for pattern in (*include, *exclude):
        if not any(matches(pattern, key) for key in aliases):
            names = [n for names in aliases.values() for n in names]
            raise ESAError(f"target pattern '{pattern}' matches no 2-D weight; names look like: "
                             f"{_examples(names, prefix)}")
    chosen = [key for key in aliases
              if (key in linear or any(matches(p, key) for p in include))
              and not any(matches(p, key) for p in exclude)]
    if not chosen:
        raise ESAError(f"no target weights left (include={list(include)}, exclude={list(exclude)})")
    return [_describe(aliases[key][0], params[key], prefix) for key in chosen]


def target_table(targets: list[Target]) -> pd.DataFrame:
    """One row per target: tensor, layer, module, rows, cols, numel (the model's tensor shapes)."""
    rows = [(t.name, t.layer, t.module, t.rows, t.cols, t.numel) for t in targets]
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

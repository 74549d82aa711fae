"""The massive-activation trace: the largest |input| and |output| of every decoder layer's MLP
output projection over a set of token windows, and where each occurs (massive activations sit
there; Sun et al. 2024). activation_magnitude scoring, confirm and mechanism take it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .architecture import mlp_output_projections
from .evaluation import DEFAULT_CHUNK, window_nll

TRACE_COLUMNS = ["layer", "module", "side", "value", "channel", "window", "position", "token"]


class _MassiveTrace:
    """The largest |input| and |output| of one MLP output projection over the calibration tokens, with the
    channel, window and position where it occurs (massive activations sit there)."""

    def __init__(self, layer: int, module: str):
        self.layer, self.module = layer, module
        self.best = {"input": None, "output": None}
        self.batch: torch.Tensor | None = None  # current batch of token windows
        self.offset = 0  # index of its first window in the calibration set

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        for side, x in (("input", args[0]), ("output", output)):
            x = x.detach().reshape(*self.batch.shape, -1)  # an expert stack sees tokens flattened
            value, flat_index = x.abs().flatten().max(dim=0)
            value = float(value)
            if self.best[side] is None or value > self.best[side]["value"]:
                window, position, channel = (int(i) for i in torch.unravel_index(flat_index, x.shape))
                self.best[side] = {"value": value, "channel": channel, "window": self.offset + window,
                                   "position": position, "token": int(self.batch[window, position])}

    def rows(self) -> list[dict]:
        return [{"layer": self.layer, "module": self.module, "side": side, **best}
                for side, best in self.best.items() if best is not None]


class MassiveActivations:
    """The massive-activation trace of every forward pass run while it is attached
    (:func:`traced`): the windows are numbered across the passes in the order they run, each
    pass's token windows read where ESA hands them to the model (the decoder's ``input_ids``;
    the input embeddings may see more positions, e.g. CPM-Ant's prompt prefix)."""

    def __init__(self, model: nn.Module):
        self.traces = [(_MassiveTrace(layer, name), module) for layer, name, module in mlp_output_projections(model)]
        self.offset = 0

    def next_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The decoder's forward pre-hook (with kwargs): a new batch of windows starts."""
        windows = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        for trace, _ in self.traces:
            trace.batch, trace.offset = windows, self.offset
        self.offset += windows.shape[0]

    def frame(self) -> pd.DataFrame:
        """One row per (layer, side), columns ``TRACE_COLUMNS``: max |input| or |output|, its
        channel, window (row across all passes), position and token."""
        return pd.DataFrame([row for trace, _ in self.traces for row in trace.rows()], columns=TRACE_COLUMNS)


@contextmanager
def traced(model: nn.Module) -> Iterator[MassiveActivations]:
    """Trace every decoder layer's MLP output projection (:func:`esa.architecture.mlp_output_projections`)
    in the forward passes run inside the block, so that a pass the caller runs anyway (a
    reference pass) yields the trace too."""
    activations = MassiveActivations(model)
    handles = [model.get_decoder().register_forward_pre_hook(activations.next_batch, with_kwargs=True)]
    handles += [module.register_forward_hook(trace) for trace, module in activations.traces]
    try:
        yield activations
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def massive_activation_trace(model: nn.Module, windows: list[torch.Tensor], chunk_size: int = DEFAULT_CHUNK,
                             pre_hooks: list[tuple[nn.Module, object]] = (), progress: bool = False,
                             desc: str = "forward") -> pd.DataFrame:
    """Forward passes over batches of windows, traced (:func:`traced`); ``pre_hooks`` (module,
    hook) are attached for the same passes. Returns :meth:`MassiveActivations.frame`."""
    device = model.get_input_embeddings().weight.device
    handles = [module.register_forward_pre_hook(hook) for module, hook in pre_hooks]
    try:
        with traced(model) as activations:
            for batch in tqdm(windows, desc=desc, disable=not progress):
                window_nll(model, batch.to(device), chunk_size=chunk_size)
    finally:
        for handle in handles:
            handle.remove()
    return activations.frame()

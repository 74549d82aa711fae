"""Replaying the unmodified model's early layers: an edit in decoder layer L leaves the outputs
of layers 0..L-1 unchanged, so evaluating the edited model can start at layer L.

One pass of the unmodified model keeps, per batch, the input of every layer L asked for (the
output of layer L-1, :func:`keep_layer_inputs`); an evaluation of an edit whose
:func:`first_changed_layer` is L then runs the model's own forward with layers 0..L-1 returning
that kept output instead of computing (:func:`start_at`): layers L..end, final norm, LM head and
loss run exactly as in a full evaluation, on the same inputs, so the result is bit-identical to
evaluating the whole model. This holds whenever a decoder layer's output depends only on its
input and its own parameters (not on state another layer leaves behind, such as a KV cache
shared across layers). The kept inputs take windows x seq_len x hidden x dtype bytes per layer,
on the model's device.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .architecture import decoder_layers, split_expert


@dataclass(frozen=True)
class LayerOutputs:
    """What one decoder layer returned in the unmodified pass, batch by batch: the hidden state
    and, when the layer returns a tuple, its length."""

    hidden: list[torch.Tensor]
    tuple_length: int | None

    def replay(self, batch: int):
        """Batch ``batch``'s output in the layer's return type. A fresh copy, so no later layer
        can change the kept state in place; a tuple's other entries (attention weights, cache)
        are not read by the loss and are None."""
        hidden = self.hidden[batch].clone()
        return hidden if self.tuple_length is None else (hidden, *(None,) * (self.tuple_length - 1))


def first_changed_layer(model: torch.nn.Module, tensor: str) -> int:
    """The first decoder layer whose input an edit of parameter ``tensor`` can change.

    That is the lowest layer holding the parameter; 0 when the parameter is (also) used outside
    the decoder layers (embeddings, lm_head, a tied pair), where the whole model must run.
    """
    param = model.get_parameter(split_expert(tensor)[0])

    def uses(module: torch.nn.Module) -> int:
        return sum(p is param for _, p in module.named_parameters(remove_duplicate=False))

    per_layer = [uses(layer) for layer in decoder_layers(model)]
    if sum(per_layer) < uses(model):
        return 0
    return next(i for i, n in enumerate(per_layer) if n)


@contextmanager
def keep_layer_inputs(model: torch.nn.Module, layers: set[int]):
    """While open, every forward pass appends the output of decoder layer L-1 (the input of
    layer L) to ``kept[L]``, for each L >= 1 of ``layers``; yields ``kept``."""
    blocks = decoder_layers(model)
    kept: dict[int, LayerOutputs] = {}

    def keeper(layer: int):
        def hook(module: torch.nn.Module, args: tuple, output) -> None:
            is_tuple = isinstance(output, tuple)
            entry = kept.setdefault(layer, LayerOutputs([], len(output) if is_tuple else None))
            # a copy: layer L may update its input in place
            entry.hidden.append((output[0] if is_tuple else output).detach().clone())
        return hook

    handles = [blocks[layer - 1].register_forward_hook(keeper(layer))
               for layer in sorted(layers) if layer > 0]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def start_at(model: torch.nn.Module, start: int, kept: LayerOutputs):
    """Layers 0..start-1 return, batch after batch, ``kept`` (the unmodified outputs of layer
    start-1) without computing; the model's forward, masks and embeddings run as usual."""
    skipped = list(decoder_layers(model))[:start]
    batch, output = -1, None

    def first(*args, **kwargs):
        nonlocal batch, output
        batch += 1  # layer 0 runs once per batch, before every other layer
        output = kept.replay(batch)
        return output

    def rest(*args, **kwargs):
        return output

    own = [layer.__dict__.get("forward") for layer in skipped]  # e.g. accelerate's device hooks
    for i, layer in enumerate(skipped):
        layer.forward = first if i == 0 else rest
    try:
        yield
    finally:
        for layer, forward in zip(skipped, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def replayed(model: torch.nn.Module, start: int, kept: dict[int, LayerOutputs]):
    """:func:`start_at` layer ``start`` from ``kept[start]``, or nothing to replay at 0."""
    return start_at(model, start, kept[start]) if start else nullcontext()

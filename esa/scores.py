"""Per-weight sensitivity scores of a causal LM, computed on calibration windows.

Notation: ``L_b`` is the mean token NLL of calibration batch b (b = 1..B, see
:func:`esa.evaluation.mean_token_loss`), ``g_b = dL_b/dW``, ``w`` a weight. Each metric's
statistic ``stat`` and ranking ``score`` are in its own module (the registry
:mod:`esa.metrics`): grad_x_weight ``abs(w * mean_b g_b)``, grad_squared ``0.5 * mean_b g_b^2 * w^2``,
hutchinson_diag ``0.5 * abs(diag H) * w^2``, activation_magnitude ``abs(w_ij) * ||x_j||``. Every
accumulator is fp32 whatever the model dtype.

``weighting="raw"`` ranks by ``abs(stat)`` instead of the product formula. The seed fixes the
Hutchinson probes; the calibration sample is the caller's (draw it from the same seed).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import metrics as registry
from .architecture import decoder_layers
from .errors import ESAError
from .evaluation import DEFAULT_CHUNK, batches
from .names import PRODUCT, WEIGHTINGS
from .targets import Target, target_parameter

class ScoreView(Mapping):
    """``score[tensor]`` computed on access from ``stat`` and the weight, so a full-size score
    tensor exists only while the caller holds it (one fp32 model copy fewer at peak).

    It reads the model's current weights: read scores before perturbing the model.
    """

    def __init__(self, metric: str, weighting: str, stat: dict[str, torch.Tensor],
                 weights: dict[str, torch.Tensor]):
        self._formula = registry.load(metric).formula if weighting == PRODUCT else None
        self._stat, self._weights = stat, weights

    def __getitem__(self, name: str) -> torch.Tensor:
        stat = self._stat[name]
        if self._formula is None:
            return stat.abs()
        return self._formula(stat, self._weights[name].float())

    def __iter__(self) -> Iterator[str]:
        return iter(self._stat)

    def __len__(self) -> int:
        return len(self._stat)


@dataclass
class MetricScores:
    """One metric's result: fp32 ``stat`` and lazy ``score`` per target tensor name.

    ``extra`` holds metric-specific side results: ``massive_activations`` (a trace DataFrame,
    see :func:`compute_scores`) for activation_magnitude.
    """

    metric: str
    weighting: str
    stat: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor] = field(repr=False)
    extra: dict = field(default_factory=dict)

    @property
    def score(self) -> ScoreView:
        return ScoreView(self.metric, self.weighting, self.stat, self.weights)


def _check_request(metrics: list[str], weighting: str, batch_size: int, probes: int) -> None:
    if not metrics:
        raise ESAError(f"no metric requested; allowed: {', '.join(registry.METRICS)}")
    for metric in metrics:
        if metric not in registry.METRICS:
            raise ESAError(f"unknown metric {metric!r}; allowed: {', '.join(registry.METRICS)}")
    if weighting not in WEIGHTINGS:
        raise ESAError(f"unknown weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    if batch_size < 1:
        raise ESAError(f"batch_size must be >= 1, got {batch_size}")
    if registry.HUTCHINSON_DIAG in metrics and probes < 1:
        raise ESAError(f"hutchinson_diag needs probes >= 1, got {probes}")


def _set_checkpointing(model: nn.Module, enabled: bool) -> None:
    """transformers >= 5 names it activation checkpointing; older releases gradient checkpointing.
    Non-reentrant checkpoints support the double backward of Hutchinson probes."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


@contextmanager
def _scoring_mode(model: nn.Module, params: list[nn.Parameter], checkpointing: bool = False):
    """Eval mode, and gradients for the targets only (backward skips everything else);
    both restored afterwards.

    With ``checkpointing`` each decoder layer's activations are recomputed in backward
    instead of stored (memory O(layers) hidden states instead of all activations).
    transformers checkpoints a layer only while that layer is in training mode, so the layer
    objects alone are switched: their dropout submodules stay in eval.
    """
    target_ids = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    layers = decoder_layers(model)
    try:
        model.eval()
        if checkpointing:
            _set_checkpointing(model, True)
            for layer in layers:
                layer.training = True
        for p, _ in saved:
            p.requires_grad_(id(p) in target_ids)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        if checkpointing:
            _set_checkpointing(model, False)
        model.train(training)


def compute_scores(model: nn.Module, targets: list[Target], calib_windows: torch.Tensor,
                   metrics: list[str], batch_size: int, seed: int, probes: int = 8,
                   weighting: str = PRODUCT, chunk_size: int = DEFAULT_CHUNK, progress: bool = True,
                   gradient_checkpointing: bool = False) -> dict[str, MetricScores]:
    """Score every weight of ``targets`` by each of ``metrics`` (see the module docstring).

    ``calib_windows`` is a LongTensor [N, T] of token windows, cut into consecutive batches of
    ``batch_size`` (batch b of the formulas). ``seed`` fixes the Rademacher probes
    (``probes`` per batch). The metrics of one pass share it: all gradient metrics one pass
    over the batches, activation_magnitude its own forward passes. Returns ``{metric: MetricScores}`` in the
    order asked; ``massive_activations`` (activation_magnitude) has one row per decoder-layer
    MLP output projection and side (input, output): max |x|, its channel, window, position
    and token.
    The model's requires_grad flags and train/eval mode are restored afterwards.
    ``gradient_checkpointing`` trades recomputation for activation memory (same numbers).
    """
    _check_request(metrics, weighting, batch_size, probes)
    asked = set(metrics)
    # one entry per parameter: the experts of a 3-D parameter share it
    params = list({id(p): p for p in (target_parameter(model, t) for t in targets)}.values())
    weights = {t.name: t.matrix(target_parameter(model, t).detach()) for t in targets}
    windows = list(batches(calib_windows, batch_size))
    if not windows:
        raise ESAError("no calibration windows to score on")
    # the asked metrics by the pass that computes them, in the registry's order: one pass each
    passes: dict = {}
    for name in registry.METRICS:
        if name in asked:
            metric = registry.load(name)
            passes.setdefault(metric.compute, {})[name] = metric
    parts: dict[str, dict] = {}
    with _scoring_mode(model, params, gradient_checkpointing):
        for compute, group in passes.items():
            parts.update(compute(model, targets, params, windows, group, seed=seed, probes=probes,
                                 chunk_size=chunk_size, progress=progress))
    return {metric: MetricScores(metric, weighting, parts[metric]["stat"], weights,
                                 parts[metric].get("extra", {}))
            for metric in dict.fromkeys(metrics)}

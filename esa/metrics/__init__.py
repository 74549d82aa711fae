"""The metrics ESA scores weights by: a torch-free registry whose entries load their code on use.

As in lm-evaluation-harness's registry, a name maps to a ``"module:object"`` placeholder, so the
rules, the config check and the code versions know every metric without importing torch, and a
scores job's code version covers the modules of its own metrics only (:func:`implementation_roots`).

A metric is one module of this package whose ``METRIC`` object has
- ``formula(stat, w)``: the ranking score under the product weighting (its math in the docstring);
- ``compute``: the pass that computes the stats of every metric of a job that shares it (the
  gradient pass serves all gradient metrics of a job with one backward per batch), with the
  hooks that pass calls (see :mod:`esa.metrics.gradient_pass`, :mod:`esa.metrics.activation_magnitude`).

A new metric is its module, its entry below, its test, and the schema's ``metric`` enums (a test
checks them against :data:`METRICS`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

GRAD_X_WEIGHT = "grad_x_weight"
GRAD_SQUARED = "grad_squared"
HUTCHINSON_DIAG = "hutchinson_diag"
ACTIVATION_MAGNITUDE = "activation_magnitude"


@dataclass(frozen=True)
class MetricEntry:
    name: str
    job: str  # the scores job (rule scores_<job>) that computes it, in one pass with the job's others
    implementation: str  # "module:object" of its METRIC, imported on use
    gradient: bool  # it differentiates the calibration loss
    settings: str | None = None  # its own block of the config, scoring.<settings>
    trace: bool = False  # it also writes the massive-activation trace (activations.parquet)

    @property
    def root(self) -> tuple[str, str]:
        module, _, name = self.implementation.partition(":")
        return module, name


REGISTRY = {entry.name: entry for entry in (
    MetricEntry(GRAD_X_WEIGHT, "gradients", "esa.metrics.grad_x_weight:METRIC", gradient=True),
    MetricEntry(GRAD_SQUARED, "gradients", "esa.metrics.grad_squared:METRIC", gradient=True),
    MetricEntry(HUTCHINSON_DIAG, "hutchinson", "esa.metrics.hutchinson_diag:METRIC", gradient=True,
                settings="hutchinson"),
    MetricEntry(ACTIVATION_MAGNITUDE, "activations", "esa.metrics.activation_magnitude:METRIC",
                gradient=False, trace=True),
)}
METRICS = tuple(REGISTRY)
GRADIENT_METRICS = tuple(name for name, entry in REGISTRY.items() if entry.gradient)
# the scores jobs of a seed and the metrics each computes (rules scores_<job>)
SCORE_JOBS = {job: tuple(name for name, entry in REGISTRY.items() if entry.job == job)
              for job in dict.fromkeys(entry.job for entry in REGISTRY.values())}
# the metric whose job traces the massive activations (rule activation_plot reads its file)
TRACE_METRIC = next(name for name, entry in REGISTRY.items() if entry.trace)


def load(name: str):
    """The ``METRIC`` object of metric ``name``, its module imported now."""
    module, attribute = REGISTRY[name].root
    return getattr(importlib.import_module(module), attribute)


def implementation_roots(metrics) -> tuple[tuple[str, str], ...]:
    """The (module, object) of each metric's code: the extra roots of its scores job's code version."""
    return tuple(REGISTRY[name].root for name in metrics)

"""The names every layer of ESA shares (the metrics' are in their registry, :mod:`esa.metrics`):
modes, sets, perturbations, and the fixed definitions the score tables use. Torch-free, so the
rules, the config check and the report import it without loading a model library.

Each name is spelled once, as a constant; the tuples list the allowed values of each kind.
"""

from __future__ import annotations

import re

import numpy as np

PRODUCT, RAW = "product", "raw"
WEIGHTINGS = (PRODUCT, RAW)

CALIB, EVAL = "calib", "eval"  # the two parts of the text: calibration pool, evaluation windows
DATA_PARTS = (CALIB, EVAL)

GLOBAL, PER_LAYER, PER_TENSOR = "global", "per_layer", "per_tensor"
MODES = (GLOBAL, PER_LAYER, PER_TENSOR)
TOP, RANDOM_K, BOTTOM_K = "top", "random_k", "bottom_k"
CONTROLS = (RANDOM_K, BOTTOM_K)
SETS = (TOP, *CONTROLS)

# the two ends of a tensor's candidates: its highest and its lowest scores
END_TOP, END_BOTTOM = "top", "bottom"
ENDS = (END_TOP, END_BOTTOM)

ZERO, SIGN_FLIP, GAUSSIAN, SCALE = "zero", "sign_flip", "gaussian", "scale"
PERTURBATIONS = (ZERO, SIGN_FLIP, GAUSSIAN, SCALE)
RELATIVE, ABSOLUTE, TENSOR_STD = "relative", "absolute", "tensor_std"
NOISE_MODES = (RELATIVE, ABSOLUTE, TENSOR_STD)
# the perturbations whose damage a culprit search (esa.culprits) can split: deterministic ones
CULPRIT_PERTURBATIONS = (ZERO, SIGN_FLIP)
# what a culprit search reports: a culprit weight, a destructive group it did not split further
# (at most min_group weights, or neither half destructive alone), a group the budget left unresolved
CULPRIT_WEIGHT, CULPRIT_GROUP, CULPRIT_BUDGET = "weight", "group", "budget"

# the two edits of a tensor in the mechanism's matched-magnitude control (esa.mechanism)
SUPER_WEIGHTS, MATCHED_CONTROL = "super_weights", "matched_control"

# what quantization keeps in full precision (esa.protect): nothing, a metric's global top-k,
# k random target weights, the confirmed super weights
PROTECT_NONE, PROTECT_METRIC = "none", "metric"  # with RANDOM_K and SUPER_WEIGHTS
PER_CHANNEL = -1  # quantize/results.parquet's group_size of one group per output channel

# the tensor table (the first columns of stats.parquet): one row per scored matrix; expert is
# its index in a 3-D expert parameter, -1 for a plain matrix
TABLE_COLUMNS = ["tensor", "layer", "module", "expert", "rows", "cols", "numel"]

COMPARISON = "comparison"  # results/comparison/: the page comparing a study's models, not a model name

# a published super weight's rank under a metric (esa.published): exact, a lower bound (the
# candidates cannot place it exactly), or its tensor not scored by the metric
RANK_EXACT, RANK_AT_LEAST, RANK_NOT_SCORED = "exact", "at_least", "not_scored"

TOP_DENOMINATOR = 10_000  # the top 0.01%: ceil(n / 10_000) in exact integer arithmetic
HIST_LOW, HIST_HIGH, HIST_BINS = -12.0, 4.0, 64


def alternatives(names) -> str:
    """A regex matching exactly one of ``names`` (a Snakemake wildcard constraint)."""
    return "|".join(re.escape(name) for name in names)


def hist_edges() -> np.ndarray:
    """The ``HIST_BINS + 1`` fixed bin edges of the log10(score) histograms."""
    return np.linspace(HIST_LOW, HIST_HIGH, HIST_BINS + 1)

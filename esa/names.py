"""The names every layer of ESA shares: metrics, modes, sets, perturbations, and the fixed
definitions the score tables use. Torch-free, so the rules, the config check and the report
import it without loading a model library.
"""

from __future__ import annotations

import numpy as np

METRICS = ("grad_x_weight", "grad_squared", "hutchinson_diag", "activation_magnitude")
# metrics that differentiate the calibration loss (hutchinson_diag twice)
GRADIENT_METRICS = ("grad_x_weight", "grad_squared", "hutchinson_diag")
# metrics one first-order gradient pass computes together (one scores_gradients job)
FIRST_ORDER_METRICS = ("grad_x_weight", "grad_squared")
WEIGHTINGS = ("product", "raw")

MODES = ("global", "per_layer", "per_tensor")
CONTROLS = ("random_k", "bottom_k")
SETS = ("top", *CONTROLS)

PERTURBATIONS = ("zero", "sign_flip", "gaussian")
NOISE_MODES = ("relative", "absolute", "tensor_std")

TOP_DENOMINATOR = 10_000  # the top 0.01%: ceil(n / 10_000) in exact integer arithmetic
HIST_LOW, HIST_HIGH, HIST_BINS = -12.0, 4.0, 64


def hist_edges() -> np.ndarray:
    """The ``HIST_BINS + 1`` fixed bin edges of the log10(score) histograms."""
    return np.linspace(HIST_LOW, HIST_HIGH, HIST_BINS + 1)

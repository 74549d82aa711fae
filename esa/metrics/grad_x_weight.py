"""grad_x_weight: ``gbar = mean_b g_b``, ranked by ``abs(w * gbar)``.

``g_b = dL_b/dW`` for the mean token NLL ``L_b`` of calibration batch b; ``abs(w * gbar)`` is the
first-order Taylor estimate of the loss change from zeroing w.
"""

from __future__ import annotations

import torch

from .gradient_pass import gradient_pass


class GradXWeight:
    needs_graph = False
    compute = staticmethod(gradient_pass)

    @staticmethod
    def formula(stat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (w * stat).abs_()

    @staticmethod
    def start(params, seed: int, probes: int) -> list:
        return [None] * len(params)  # the first batch's gradient, not zeros plus an add

    @staticmethod
    def accumulate(sums: list, i: int, g: torch.Tensor) -> None:
        sums[i] = g.clone() if sums[i] is None else sums[i].add_(g)

    @staticmethod
    def finalize(sums: list, n_batches: int) -> list[torch.Tensor]:
        return [total.div_(n_batches) for total in sums]


METRIC = GradXWeight()

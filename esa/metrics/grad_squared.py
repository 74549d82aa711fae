"""grad_squared: the empirical Fisher ``F = mean_b g_b^2``, ranked by ``0.5 * F * w^2``.

The mean of per-batch squared gradients, not the square of the summed gradient; batch_size 1
gives the per-sequence Fisher.
"""

from __future__ import annotations

import torch

from .gradient_pass import gradient_pass


class GradSquared:
    needs_graph = False
    compute = staticmethod(gradient_pass)

    @staticmethod
    def formula(stat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w.square().mul_(stat).mul_(0.5)

    @staticmethod
    def start(params, seed: int, probes: int) -> list:
        return [None] * len(params)

    @staticmethod
    def accumulate(sums: list, i: int, g: torch.Tensor) -> None:
        sums[i] = g * g if sums[i] is None else sums[i].addcmul_(g, g)

    @staticmethod
    def finalize(sums: list, n_batches: int) -> list[torch.Tensor]:
        return [total.div_(n_batches) for total in sums]


METRIC = GradSquared()

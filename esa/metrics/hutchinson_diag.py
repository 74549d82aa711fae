"""hutchinson_diag: ``h = mean_{b,m} z_m * (H_b z_m)``, ranked by ``0.5 * abs(h) * w^2``.

``H_b`` is the Hessian of ``L_b`` over all target weights jointly, ``z_m`` a Rademacher vector
over all of them, M probes per batch; ``E[z * Hz] = diag(H)``, and ``h`` keeps its sign. Each
probe is ONE Hessian-vector product covering every target. The seed fixes the probes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .gradient_pass import GradientBatch, gradient_pass

_BIT_MASKS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def rademacher(param: torch.Tensor, generators: dict, seed: int) -> torch.Tensor:
    """A +-1 tensor like ``param``, from a per-device generator seeded with ``seed``.

    Each random byte gives 8 signs: drawing one random number per entry (bernoulli_) costs
    about a third of a Hessian-vector product on CPU.
    """
    gen = generators.get(param.device)
    if gen is None:
        gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
    n = param.numel()
    random_bytes = torch.randint(0, 256, ((n + 7) // 8, 1), dtype=torch.uint8, generator=gen,
                                 device=param.device)
    bits = random_bytes.bitwise_and(_BIT_MASKS.to(param.device)).flatten()[:n].view_as(param)
    return bits.to(param.dtype).sign_().mul_(2).sub_(1)


@dataclass
class _Probes:
    seed: int
    probes: int
    sums: list[torch.Tensor]
    generators: dict = field(default_factory=dict)
    batch_start: dict = field(default_factory=dict)  # device -> generator state when the batch began


class HutchinsonDiag:
    needs_graph = True  # its Hessian-vector products reuse the gradient's graph
    compute = staticmethod(gradient_pass)

    @staticmethod
    def formula(stat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w.square().mul_(stat.abs()).mul_(0.5)

    @staticmethod
    def start(params, seed: int, probes: int) -> _Probes:
        sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        return _Probes(seed, probes, sums)

    @staticmethod
    def start_batch(state: _Probes) -> None:
        state.batch_start = {device: gen.get_state() for device, gen in state.generators.items()}

    @staticmethod
    def accumulate(state: _Probes, part: GradientBatch, share: float, progress: bool) -> None:
        """Add ``share * z_m * (H_w z_m)`` for each probe m of the batch: every window of a batch
        draws the batch's probes again from the generators' state at its start."""
        for device in list(state.generators):
            if device in state.batch_start:
                state.generators[device].set_state(state.batch_start[device])
            else:
                del state.generators[device]  # first drawn in this batch: seeded afresh
        for _ in tqdm(range(state.probes), desc="scores: probes", leave=False, disable=not progress):
            zs = [rademacher(p, state.generators, state.seed) for p in part.params]
            hvs = part.hvp(zs)
            with torch.no_grad():
                for total, z, hv in zip(state.sums, zs, hvs):
                    total.addcmul_(z.float(), hv, value=share)
            del zs, hvs

    @staticmethod
    def finalize(state: _Probes, n_batches: int) -> list[torch.Tensor]:
        return [total.div_(n_batches * state.probes) for total in state.sums]


METRIC = HutchinsonDiag()

"""activation_magnitude: ``a_j = sqrt(sum_t x_tj^2)``, ranked by ``abs(w_ij) * a_j``.

``x_tj`` is input channel j of the weight's ``nn.Linear`` or ``Conv1D`` at calibration token t
(column j of W, in the Linear convention of :mod:`esa.architecture`, multiplies input channel j,
so it is the input, never the output). For an ``nn.Embedding`` the input is the one-hot token,
so ``a_v = sqrt(count of token v)`` scales row v. The same forward passes trace the massive
activations (``extra["massive_activations"]``, :mod:`esa.activation_trace`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..activation_trace import massive_activation_trace
from ..errors import ESAError
from ..targets import Target, target_module, target_parameter


class _ChannelStats:
    """Running per-input-channel sum of squares of one target's module's input: the last
    dimension of a matrix module's input (Linear, Conv1D, a router), the one-hot token of an
    embedding."""

    def __init__(self, target: Target, module: nn.Module, device: torch.device):
        self.target, self.embedding = target, isinstance(module, nn.Embedding)
        channels = target.rows if self.embedding else target.cols
        self.sumsq = torch.zeros(channels, dtype=torch.float32, device=device)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if self.embedding:  # one-hot input: x_tv = 1 where token t is v
            self.sumsq.add_(torch.bincount(x.flatten(), minlength=self.sumsq.numel()))
            return
        if x.shape[-1] != self.sumsq.numel():
            raise ESAError(f"activation_magnitude: the input of {type(module).__name__} holding "
                           f"{self.target.name} has {x.shape[-1]} channels, the weight {self.sumsq.numel()} "
                           f"input columns")
        flat = x.reshape(-1, x.shape[-1]).float()
        # column reductions of a temporary: ~4x faster on CPU than vector_norm(dim=0)
        self.sumsq.add_(flat.square().sum(dim=0))

    def l2(self, target: Target) -> torch.Tensor:
        """``a`` spread over the weight's shape (a view, no copy)."""
        a = self.sumsq.sqrt()
        shape = (target.rows, target.cols)
        return a[:, None].expand(shape) if self.embedding else a[None, :].expand(shape)


class _ExpertChannelStats:
    """Per expert, the running per-input-channel sum of squares of the inputs of its two
    matrices, over the tokens routed to that expert only.

    For transformers' expert stacks: ``forward(hidden [T, H], top_k_index [T, k], weights)``
    with ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]; expert e sees the tokens t
    with e in ``top_k_index[t]``, ``gate, up = (x_t W_gate_up[e]^T).chunk(2)`` and its
    down_proj input is ``act_fn(gate) * up`` (recomputed here).
    """

    MATRICES = ("gate_up_proj", "down_proj")

    def __init__(self, module: nn.Module, device: torch.device):
        if not all(isinstance(getattr(module, n, None), torch.Tensor) for n in self.MATRICES) \
                or not callable(getattr(module, "act_fn", None)):
            raise ESAError(f"activation_magnitude: the expert stack {type(module).__name__} has no "
                           f"gate_up_proj / down_proj / act_fn; its routed inputs are unknown")
        experts = module.gate_up_proj.shape[0]
        self.sumsq = {name: torch.zeros(experts, getattr(module, name).shape[2], dtype=torch.float32,
                                        device=device) for name in self.MATRICES}

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x, routed = args[0].detach(), args[1]
        x = x.reshape(-1, x.shape[-1])
        for expert in range(module.gate_up_proj.shape[0]):
            tokens = (routed == expert).any(dim=-1).nonzero().flatten()
            if tokens.numel() == 0:
                continue
            inputs = x[tokens]
            gate, up = nn.functional.linear(inputs, module.gate_up_proj[expert]).chunk(2, dim=-1)
            for name, seen in (("gate_up_proj", inputs), ("down_proj", module.act_fn(gate) * up)):
                self.sumsq[name][expert].add_(seen.float().square().sum(dim=0))

    def l2(self, target: Target) -> torch.Tensor:
        a = self.sumsq[target.param_name.rpartition(".")[2]][target.expert].sqrt()
        return a[None, :].expand(target.rows, target.cols)


def activation_pass(model: nn.Module, targets: list[Target], params: list[nn.Parameter],
                    windows: list[torch.Tensor], metrics: dict, *, seed: int, probes: int, chunk_size: int,
                    progress: bool) -> dict[str, dict]:
    """Forward passes with pre-hooks on the target modules' inputs, traced
    (:func:`esa.activation_trace.massive_activation_trace`); ``seed`` and ``probes`` are unused."""
    hooks: dict[int, tuple[nn.Module, _ChannelStats | _ExpertChannelStats]] = {}
    owner = {}  # target name -> the hook that accumulates its input channels
    for t in targets:
        module, device = target_module(model, t), target_parameter(model, t).device
        if t.stacked:  # one hook per expert stack serves all its experts' matrices
            key = id(module)
            if key not in hooks:
                hooks[key] = (module, _ExpertChannelStats(module, device))
        else:
            key = t.name
            hooks[key] = (module, _ChannelStats(t, module, device))
        owner[t.name] = hooks[key][1]
    trace = massive_activation_trace(model, windows, chunk_size, list(hooks.values()), progress,
                                     "scores: activations")
    return {name: {"stat": {t.name: owner[t.name].l2(t) for t in targets},
                   "extra": {"massive_activations": trace}} for name in metrics}


class ActivationMagnitude:
    compute = staticmethod(activation_pass)

    @staticmethod
    def formula(stat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w.abs().mul_(stat)


METRIC = ActivationMagnitude()

"""The one pass over the calibration batches that serves every gradient metric of a scores job.

Per batch b it takes ``g_b = dL_b/dW`` once (with the graph kept when a metric needs
Hessian-vector products) and hands it to each metric: a first-order metric (``needs_graph``
False) gets ``accumulate(state, i, g)`` for parameter i, the fp32 gradient of ``L_b``; a
second-order one gets ``accumulate(state, batch, progress)`` and asks ``batch.hvp(vectors)``. Every
metric's ``start(params, seed, probes)`` makes its fp32 state and ``finalize(state, n_batches)``
returns its stat per parameter.

A second-order metric takes a batch one window at a time: the create-graph pass holds the
backward's graph of every activation it keeps (4.5x the gradient pass's memory on the bundled
model at batch 4), and the Hessian is linear in the loss. With the batch's windows of equal
length (no padding: every window predicts T - 1 tokens), ``L_b = (1/B) sum_w L_w``, so

    H_b v = (1/B) sum_w H_w v,

the same product up to float reassociation, with one window's graph alive at a time. Its
``start_batch(state)`` begins a batch and ``accumulate(state, part, share, progress)`` takes
each window's ``part`` (a GradientBatch) with its ``share`` 1/B. First-order metrics of the same
pass then get ``g_b = (1/B) sum_w g_w``.

fp16 loss scaling: most gradients of a mean token loss lie below fp16's smallest normal number
(2^-14; measured on SmolLM2-135M: 63% of its target gradients, median 4e-5), where fp16 keeps only
a few significant bits, and 0.06% below 2^-25, where it keeps none. With fp16 parameters, or fp16
mixed precision (fp32 weights, fp16 activations and their gradients: ``esa.precision``), the
gradients are taken of ``S * L_b`` (S = 2^16 at the start, halved until the gradients and the
Hessian-vector products are finite, as a GradScaler does) and divided by S in fp32, an exact
power-of-two division; the statistics are those of ``L_b``. The final S is in ``extra["loss_scale"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..evaluation import mean_token_loss
from ..precision import FP16, mixed_precision_of
from ..targets import Target, target_parameter

log = logging.getLogger(__name__)

FP16_LOSS_SCALE = 2.0**16


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def unscaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``t`` in fp32 divided by the loss scale; ``t`` itself when fp32 and unscaled (so it is
    never written in place)."""
    t = t.detach().float()
    return t / scale if scale != 1.0 else t


def _scaled_gradients(model: nn.Module, batch: torch.Tensor, params: list[nn.Parameter], scale: float,
                      create_graph: bool, chunk_size: int) -> tuple[tuple, float]:
    """The gradients of ``scale`` x the batch's mean token loss, the scale halved until every one
    is finite (a scale of 1, no fp16, takes them as they come), and the scale used."""
    while True:
        loss = mean_token_loss(model, batch, chunk_size=chunk_size)
        grads = torch.autograd.grad(loss * scale if scale != 1.0 else loss, params, create_graph=create_graph)
        if scale == 1.0 or _finite(grads):
            return grads, scale
        log.info("fp16 gradients overflow at loss scale %g: halving it", scale)
        scale /= 2


class GradientBatch:
    """One calibration batch's gradients (``grads``, of ``scale`` x its mean token loss), shared
    by every gradient metric of the pass."""

    def __init__(self, model: nn.Module, batch: torch.Tensor, params: list[nn.Parameter], scale: float,
                 create_graph: bool, chunk_size: int):
        self.model, self.batch, self.params, self.chunk_size = model, batch, params, chunk_size
        self.grads, self.scale = _scaled_gradients(model, batch, params, scale, create_graph, chunk_size)

    def hvp(self, vectors: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """``H_b v`` for the parameters' ``vectors`` (one Hessian-vector product covering all of
        them), parameter by parameter in fp32 and unscaled; an fp16 overflow halves the scale and
        takes it again. The products are taken when called (with grad enabled: a halved scale
        rebuilds the graph); each fp32 copy is made when its parameter is taken from the returned
        iterator and the product in the model's dtype let go, so that one parameter's copy
        exists at a time, not a model's."""
        hvs = list(torch.autograd.grad(self.grads, self.params, grad_outputs=vectors, retain_graph=True))
        while self.scale != 1.0 and not _finite(hvs):
            log.info("fp16 Hessian-vector product overflows at loss scale %g: halving it", self.scale)
            del hvs
            self.grads = None  # free the old graph before building the new one
            self.grads, self.scale = _scaled_gradients(self.model, self.batch, self.params, self.scale / 2,
                                                       True, self.chunk_size)
            hvs = list(torch.autograd.grad(self.grads, self.params, grad_outputs=vectors, retain_graph=True))
        return _unscaled_each(hvs, self.scale)


def _unscaled_each(tensors: list[torch.Tensor], scale: float) -> Iterator[torch.Tensor]:
    """``unscaled(t, scale)`` of each of ``tensors`` in turn, each let go from the list as it
    is taken."""
    for i in range(len(tensors)):
        t, tensors[i] = tensors[i], None
        yield unscaled(t, scale)


def _double_backward_attention(model: nn.Module):
    """A context whose attention supports double backward; fused SDPA kernels do not."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "eager":
        log.info("hutchinson_diag: eager attention (double backward supported)")
        return nullcontext()
    if impl != "sdpa":
        log.warning("hutchinson_diag: attention %r may lack double backward; forcing the math "
                    "SDPA backend, which only helps SDPA. Load with attn_implementation='eager' "
                    "or 'sdpa' if the Hessian-vector product fails.", impl)
    else:
        log.info("hutchinson_diag: SDPA attention on the math backend (double backward)")
    return sdpa_kernel(SDPBackend.MATH)


def _second_order_batch(model: nn.Module, batch: torch.Tensor, params: list[nn.Parameter], scale: float,
                        chunk_size: int, second: dict, states: dict, want_grads: bool,
                        progress: bool) -> tuple[list[torch.Tensor], float]:
    """The second-order metrics' batch, one window's graph at a time (module docstring); returns
    ``g_b`` in fp32 when ``want_grads`` (else no gradients) and the loss scale reached."""
    share = 1.0 / batch.shape[0]
    for name, metric in second.items():
        metric.start_batch(states[name])
    summed = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params] if want_grads else []
    for window in batch.split(1):
        part = GradientBatch(model, window, params, scale, True, chunk_size)
        for name, metric in second.items():
            metric.accumulate(states[name], part, share, progress)
        with torch.no_grad():
            for total, g in zip(summed, part.grads):  # one fp32 copy at a time
                total.add_(unscaled(g, part.scale), alpha=share)
        scale = part.scale
        del part
    return summed, scale


def gradient_pass(model: nn.Module, targets: list[Target], params: list[nn.Parameter],
                  windows: list[torch.Tensor], metrics: dict, *, seed: int, probes: int, chunk_size: int,
                  progress: bool) -> dict[str, dict]:
    """``{metric: {"stat": {target name: fp32 stat}, "extra": ...}}`` for every gradient metric of
    ``metrics`` (name -> its METRIC), from one gradient per batch."""
    device = model.get_input_embeddings().weight.device
    first = {name: m for name, m in metrics.items() if not m.needs_graph}
    second = {name: m for name, m in metrics.items() if m.needs_graph}
    states = {name: m.start(params, seed, probes) for name, m in metrics.items()}
    fp16 = mixed_precision_of(model) == FP16 or any(p.dtype == torch.float16 for p in params)
    scale = FP16_LOSS_SCALE if fp16 else 1.0
    with _double_backward_attention(model) if second else nullcontext():
        for batch in tqdm(windows, desc="scores: batches", disable=not progress):
            batch = batch.to(device)
            if second:
                grads, scale = _second_order_batch(model, batch, params, scale, chunk_size, second, states,
                                                   bool(first), progress)
            else:
                gradients = GradientBatch(model, batch, params, scale, False, chunk_size)
                scale = gradients.scale
                grads = (unscaled(g, scale) for g in gradients.grads)  # one fp32 copy at a time
                del gradients
            with torch.no_grad():
                for i, g32 in enumerate(grads if first else ()):
                    for name, metric in first.items():
                        metric.accumulate(states[name], i, g32)
            del grads

    position = {id(p): i for i, p in enumerate(params)}
    extra = {"loss_scale": scale} if scale != 1.0 else {}
    out = {}
    for name, metric in metrics.items():
        per_param = metric.finalize(states[name], len(windows))
        out[name] = {"stat": {t.name: t.matrix(per_param[position[id(target_parameter(model, t))]])
                              for t in targets}, "extra": extra}
    return out

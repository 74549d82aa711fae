"""Per-weight sensitivity scores of a causal LM, computed on calibration windows.

Notation: ``L_b`` is the mean token NLL of calibration batch b (b = 1..B, see
:func:`esa.evaluation.mean_token_loss`), ``g_b = dL_b/dW``, ``w`` a weight. Every accumulator
is fp32 whatever the model dtype.

======================  ===========================================  ======================
metric                  statistic ``stat``                           ranking ``score``
======================  ===========================================  ======================
grad_x_weight           ``gbar = mean_b g_b``                        ``abs(w * gbar)``
grad_squared            ``F = mean_b g_b^2`` (empirical Fisher)      ``0.5 * F * w^2``
hutchinson_diag         ``h = mean_{b,m} z_m * (H_b z_m)``           ``0.5 * abs(h) * w^2``
activation_magnitude    ``a_j = sqrt(sum_t x_tj^2)``                 ``abs(w_ij) * a_j``
======================  ===========================================  ======================

- grad_x_weight: ``abs(w * gbar)`` is the first-order Taylor estimate of the loss change from
  zeroing w.
- grad_squared: the mean of per-batch squared gradients, not the square of the summed
  gradient; batch_size 1 gives the per-sequence Fisher.
- hutchinson_diag: ``H_b`` is the Hessian of ``L_b`` over all target weights jointly, ``z_m``
  a Rademacher vector over all of them, M probes per batch; ``E[z * Hz] = diag(H)``, and ``h``
  keeps its sign. Each probe is ONE Hessian-vector product covering every target.
- activation_magnitude: ``x_tj`` is input channel j of the weight's ``nn.Linear`` or ``Conv1D``
  at calibration token t (column j of W, in the Linear convention of :mod:`esa.architecture`,
  multiplies input channel j, so it is the input, never the output).
  For an ``nn.Embedding`` the input is the one-hot token, so ``a_v = sqrt(count of token v)``
  scales row v.

fp16 loss scaling: most gradients of a mean token loss lie below fp16's smallest normal number
(2^-14; measured on SmolLM2-135M: 63% of its target gradients, median 4e-5), where fp16 keeps only
a few significant bits, and 0.06% below 2^-25, where it keeps none. With fp16 parameters the
gradients are taken of ``S * L_b`` (S = 2^16 at the start, halved until the gradients and the
Hessian-vector products are finite, as a GradScaler does) and divided by S in fp32, an exact
power-of-two division; the statistics are those of ``L_b``. The final S is in ``extra["loss_scale"]``.

``weighting="raw"`` ranks by ``abs(stat)`` instead of the product formula. The seed fixes the
Hutchinson probes; the calibration sample is the caller's (draw it from the same seed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from .errors import ESAError
from .evaluation import DEFAULT_CHUNK, batches, mean_token_loss, window_nll
from .names import (ACTIVATION_MAGNITUDE, GRAD_SQUARED, GRAD_X_WEIGHT, GRADIENT_METRICS,
                    HUTCHINSON_DIAG, METRICS, PRODUCT, WEIGHTINGS)
from .architecture import decoder_layers, mlp_output_projections
from .targets import Target, target_module, target_parameter

log = logging.getLogger(__name__)

TRACE_COLUMNS = ["layer", "module", "side", "value", "channel", "window", "position", "token"]


def _score_grad_x_weight(stat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w * stat).abs_()


def _score_grad_squared(stat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w.square().mul_(stat).mul_(0.5)


def _score_hutchinson(stat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w.square().mul_(stat.abs()).mul_(0.5)


def _score_activation(stat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w.abs().mul_(stat)


_PRODUCT = {GRAD_X_WEIGHT: _score_grad_x_weight, GRAD_SQUARED: _score_grad_squared,
            HUTCHINSON_DIAG: _score_hutchinson, ACTIVATION_MAGNITUDE: _score_activation}


class ScoreView(Mapping):
    """``score[tensor]`` computed on access from ``stat`` and the weight, so a full-size score
    tensor exists only while the caller holds it (one fp32 model copy fewer at peak).

    It reads the model's current weights: read scores before perturbing the model.
    """

    def __init__(self, metric: str, weighting: str, stat: dict[str, torch.Tensor],
                 weights: dict[str, torch.Tensor]):
        self._formula = _PRODUCT[metric] if weighting == PRODUCT else None
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
        raise ESAError(f"no metric requested; allowed: {', '.join(METRICS)}")
    for metric in metrics:
        if metric not in METRICS:
            raise ESAError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    if weighting not in WEIGHTINGS:
        raise ESAError(f"unknown weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    if batch_size < 1:
        raise ESAError(f"batch_size must be >= 1, got {batch_size}")
    if HUTCHINSON_DIAG in metrics and probes < 1:
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


_BIT_MASKS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _rademacher(param: torch.Tensor, generators: dict, seed: int) -> torch.Tensor:
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


FP16_LOSS_SCALE = 2.0**16


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _unscaled(t: torch.Tensor, scale: float) -> torch.Tensor:
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


def _zeros(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]


def _gradient_metrics(model: nn.Module, targets: list[Target], params: list[nn.Parameter],
                      windows: list[torch.Tensor], metrics: set[str], seed: int, probes: int,
                      chunk_size: int, progress: bool) -> dict[str, dict]:
    """One pass over the batches serves every gradient metric: the (create_graph) gradient
    feeds gbar and F, and the Hessian-vector products reuse its graph."""
    device = model.get_input_embeddings().weight.device
    hutchinson = HUTCHINSON_DIAG in metrics
    # gradient accumulators start as the first batch's values, not zeros plus an add
    g_sum = [None] * len(params) if GRAD_X_WEIGHT in metrics else None
    g_sq = [None] * len(params) if GRAD_SQUARED in metrics else None
    h_sum = _zeros(params) if hutchinson else None
    want_grads = g_sum is not None or g_sq is not None
    generators: dict = {}
    scale = FP16_LOSS_SCALE if any(p.dtype == torch.float16 for p in params) else 1.0
    attention = _double_backward_attention(model) if hutchinson else nullcontext()
    with attention:
        for batch in tqdm(windows, desc="scores: batches", disable=not progress):
            batch = batch.to(device)
            grads, scale = _scaled_gradients(model, batch, params, scale, hutchinson, chunk_size)
            with torch.no_grad():
                for i, g in enumerate(grads if want_grads else ()):
                    g32 = _unscaled(g, scale)
                    if g_sum is not None:
                        g_sum[i] = g32.clone() if g_sum[i] is None else g_sum[i].add_(g32)
                    if g_sq is not None:
                        g_sq[i] = g32 * g32 if g_sq[i] is None else g_sq[i].addcmul_(g32, g32)
            for _ in tqdm(range(probes if hutchinson else 0), desc="scores: probes",
                          leave=False, disable=not progress):
                zs = [_rademacher(p, generators, seed) for p in params]
                hvs = torch.autograd.grad(grads, params, grad_outputs=zs, retain_graph=True)
                while scale != 1.0 and not _finite(hvs):  # the same probe again, on a halved scale
                    log.info("fp16 Hessian-vector product overflows at loss scale %g: halving it", scale)
                    del grads, hvs
                    grads, scale = _scaled_gradients(model, batch, params, scale / 2, True, chunk_size)
                    hvs = torch.autograd.grad(grads, params, grad_outputs=zs, retain_graph=True)
                with torch.no_grad():
                    for i, (z, hv) in enumerate(zip(zs, hvs)):
                        h_sum[i].addcmul_(z.float(), _unscaled(hv, scale))
                del zs, hvs
            del grads

    position = {id(p): i for i, p in enumerate(params)}

    def per_target(sums: list[torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        for total in sums:
            total.div_(n)
        return {t.name: t.matrix(sums[position[id(target_parameter(model, t))]]) for t in targets}

    n_batches = len(windows)
    extra = {"loss_scale": scale} if scale != 1.0 else {}
    out = {}
    if g_sum is not None:
        out[GRAD_X_WEIGHT] = {"stat": per_target(g_sum, n_batches), "extra": extra}
    if g_sq is not None:
        out[GRAD_SQUARED] = {"stat": per_target(g_sq, n_batches), "extra": extra}
    if hutchinson:
        out[HUTCHINSON_DIAG] = {"stat": per_target(h_sum, n_batches * probes), "extra": extra}
    return out


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


class _MassiveTrace:
    """The largest |input| and |output| of one MLP output projection over the calibration tokens, with the
    channel, window and position where it occurs (massive activations sit there)."""

    def __init__(self, layer: int, module: str):
        self.layer, self.module = layer, module
        self.best = {"input": None, "output": None}
        self.batch: torch.Tensor | None = None  # current batch of token windows
        self.offset = 0  # index of its first window in the calibration set

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        for side, x in (("input", args[0]), ("output", output)):
            x = x.detach().reshape(*self.batch.shape, -1)  # an expert stack sees tokens flattened
            value, flat_index = x.abs().flatten().max(dim=0)
            value = float(value)
            if self.best[side] is None or value > self.best[side]["value"]:
                window, position, channel = (int(i) for i in torch.unravel_index(flat_index, x.shape))
                self.best[side] = {"value": value, "channel": channel, "window": self.offset + window,
                                   "position": position, "token": int(self.batch[window, position])}

    def rows(self) -> list[dict]:
        return [{"layer": self.layer, "module": self.module, "side": side, **best}
                for side, best in self.best.items() if best is not None]


@torch.no_grad()
def massive_activation_trace(model: nn.Module, windows: list[torch.Tensor], chunk_size: int = DEFAULT_CHUNK,
                             pre_hooks: list[tuple[nn.Module, object]] = (), progress: bool = False,
                             desc: str = "forward") -> pd.DataFrame:
    """Forward passes over batches of windows, tracing every decoder layer's MLP output
    projection (:func:`esa.architecture.mlp_output_projections`).

    Returns one row per (layer, side) with columns ``TRACE_COLUMNS``: max |input| or
    |output|, its channel, window (row across all batches), position and token.
    ``pre_hooks`` (module, hook) are attached for the same passes.
    """
    device = model.get_input_embeddings().weight.device
    traces = [(_MassiveTrace(layer, name), module) for layer, name, module in mlp_output_projections(model)]
    handles = [module.register_forward_pre_hook(hook) for module, hook in pre_hooks]
    handles += [module.register_forward_hook(trace) for trace, module in traces]
    try:
        offset = 0
        for batch in tqdm(windows, desc=desc, disable=not progress):
            for trace, _ in traces:
                trace.batch, trace.offset = batch, offset
            window_nll(model, batch.to(device), chunk_size=chunk_size)
            offset += batch.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return pd.DataFrame([row for trace, _ in traces for row in trace.rows()], columns=TRACE_COLUMNS)


def _activation_metric(model: nn.Module, targets: list[Target], windows: list[torch.Tensor],
                       chunk_size: int, progress: bool) -> dict:
    """Forward passes with pre-hooks on the target modules' inputs (and the MLP output trace)."""
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
    return {"stat": {t.name: owner[t.name].l2(t) for t in targets},
            "extra": {"massive_activations": trace}}


def compute_scores(model: nn.Module, targets: list[Target], calib_windows: torch.Tensor,
                   metrics: list[str], batch_size: int, seed: int, probes: int = 8,
                   weighting: str = PRODUCT, chunk_size: int = DEFAULT_CHUNK, progress: bool = True,
                   gradient_checkpointing: bool = False) -> dict[str, MetricScores]:
    """Score every weight of ``targets`` by each of ``metrics`` (see the module docstring).

    ``calib_windows`` is a LongTensor [N, T] of token windows, cut into consecutive batches of
    ``batch_size`` (batch b of the formulas). ``seed`` fixes the Rademacher probes
    (``probes`` per batch). All gradient metrics share one pass over the batches;
    activation_magnitude runs its own forward passes. Returns ``{metric: MetricScores}`` in the
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
    parts: dict[str, dict] = {}
    with _scoring_mode(model, params, gradient_checkpointing):
        if asked & set(GRADIENT_METRICS):
            parts.update(_gradient_metrics(model, targets, params, windows, asked, seed, probes,
                                           chunk_size, progress))
        if ACTIVATION_MAGNITUDE in asked:
            parts[ACTIVATION_MAGNITUDE] = _activation_metric(model, targets, windows, chunk_size,
                                                               progress)
    return {metric: MetricScores(metric, weighting, parts[metric]["stat"], weights,
                                 parts[metric].get("extra", {}))
            for metric in dict.fromkeys(metrics)}

"""How much an edit damages the model, measured against the unmodified model on the same windows.

On the W evaluation windows (window i: summed NLL ``NLL_i`` over its ``n_i`` predicted tokens;
``b_i`` the baseline step's NLL of the same window, ``L_b = sum b_i / sum n_i``,
``PPL_b = exp(L_b)``), an edited model q scores, against the unmodified model p:

    loss       = sum_i NLL_i / sum_i n_i,       ppl = exp(loss)
    delta_loss = loss - L_b,  delta_ppl = ppl - PPL_b,  ppl_ratio = ppl / PPL_b
    kl         = sum over predicted positions of KL(p || q) / sum_i n_i   (nats per token)
    top1       = share of predicted positions where argmax q = argmax p

and ``[delta_ppl_lo, delta_ppl_hi]``, the paired bootstrap interval of ``delta_ppl``: B
resamples I_1..I_B, each W window indices drawn with replacement (numpy's default_rng(seed),
the same indices for every edit measured with the same W, B and seed), give

    d_b = exp(sum_{i in I_b} NLL_i / sum_{i in I_b} n_i) - exp(sum_{i in I_b} b_i / sum_{i in I_b} n_i),

and the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the d_b
(inverted-CDF quantiles: each bound is one of the d_b; a NaN d_b counts as +inf, like a NaN
loss). The pairing (the same windows for the edit and the baseline) cancels the windows' own
difficulty, so the interval is much narrower than two independent intervals.

:class:`DamageMeter` runs the unmodified model once (the reference pass), keeping its final
hidden states and a copy of its LM head's parameters, and keeps its logits where they fit
``REFERENCE_LOGITS_BUDGET``; else it recomputes p chunk by chunk next to q
(:func:`esa.evaluation.window_divergence`), so that the logits of a large vocabulary over every
window never exist at once. The reference pass also keeps the inputs of the decoder layers an edit will
start at (:mod:`esa.replay`), so each measurement runs only the layers the edit can change. It
holds windows x seq_len x hidden x dtype bytes of final hidden states, the same per kept layer,
one copy of the LM head, and at most ``REFERENCE_LOGITS_BUDGET`` bytes of logits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from .evaluation import DEFAULT_CHUNK, Evaluation, batches, reference_pass, window_divergence
from .replay import keep_layer_inputs, replayed

log = logging.getLogger(__name__)

DAMAGE_COLUMNS = ["loss", "ppl", "delta_loss", "delta_ppl", "ppl_ratio", "delta_ppl_lo", "delta_ppl_hi",
                  "kl", "top1", "finite"]


@dataclass(frozen=True)
class Bootstrap:
    """Paired bootstrap settings (config ``bootstrap``)."""

    resamples: int = 1000
    level: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class Baseline:
    """The baseline step's numbers: per-window NLL and tokens (``windows.parquet``) and the
    aggregate ``loss`` and ``ppl`` (``metrics.json``)."""

    nll: np.ndarray
    tokens: np.ndarray
    loss: float
    ppl: float

    @classmethod
    def of(cls, result: Evaluation) -> Baseline:
        """The baseline of an evaluation of the unmodified model."""
        return cls(result.nll, result.tokens, result.loss, result.ppl)

    @classmethod
    def from_frames(cls, windows: pd.DataFrame, metrics: dict) -> Baseline:
        return cls(windows["nll"].to_numpy(np.float64), windows["tokens"].to_numpy(np.int64),
                   float(metrics["loss"]), float(metrics["ppl"]))


def _ppl(nll: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """exp(sum nll / sum tokens) along the last axis; NaN or overflow -> +inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        value = np.exp(nll.sum(axis=-1) / tokens.sum(axis=-1))
    return np.where(np.isnan(value), np.inf, value)


def paired_interval(nll: np.ndarray, baseline: np.ndarray, tokens: np.ndarray,
                    bootstrap: Bootstrap) -> tuple[float, float]:
    """The paired bootstrap interval of delta_ppl (module docstring)."""
    windows = len(nll)
    index = np.random.default_rng(bootstrap.seed).integers(0, windows, size=(bootstrap.resamples, windows))
    with np.errstate(invalid="ignore"):  # inf - inf: both destroyed, no difference to speak of
        deltas = _ppl(nll[index], tokens[index]) - _ppl(baseline[index], tokens[index])
    deltas = np.where(np.isnan(deltas), np.inf, deltas)
    tail = (1 - bootstrap.level) / 2
    low, high = np.quantile(deltas, [tail, 1 - tail], method="inverted_cdf")
    return float(low), float(high)


def damage(result: Evaluation, baseline: Baseline, bootstrap: Bootstrap) -> dict:
    """The ``DAMAGE_COLUMNS`` of one evaluation against the baseline (module docstring)."""
    if len(result.nll) != len(baseline.nll) or not np.array_equal(result.tokens, baseline.tokens):
        raise ValueError("an evaluation and its baseline must cover the same windows")
    low, high = paired_interval(result.nll, baseline.nll, result.tokens, bootstrap)
    return damage_columns(result.loss, result.ppl, low, high, result.mean_kl, result.top1, result.finite, baseline)


def damage_columns(loss: float, ppl: float, low: float, high: float, kl: float, top1: float, finite: bool,
                   baseline: Baseline) -> dict:
    """The ``DAMAGE_COLUMNS`` of an edit's loss, PPL, interval, KL and top-1 against the
    baseline (module docstring): also what rebuilds a measurement another step recorded."""
    return {"loss": loss, "ppl": ppl, "delta_loss": loss - baseline.loss, "delta_ppl": ppl - baseline.ppl,
            "ppl_ratio": ppl / baseline.ppl, "delta_ppl_lo": low, "delta_ppl_hi": high, "kl": kl, "top1": top1,
            "finite": finite}


# Bytes of reference logits a meter keeps rather than recomputes in every evaluation: the
# bundled model's 16 windows of 256 tokens are 0.8 GB (one LM-head product, ~10% of an fp32
# evaluation, saved each time); a large vocabulary over many windows is recomputed instead.
REFERENCE_LOGITS_BUDGET = 2**30


def reference_logits_bytes(model: torch.nn.Module, windows: torch.Tensor) -> int:
    """Bytes of the fp32 logits of every predicted position of ``windows`` [W, T]."""
    classes = model.get_output_embeddings().weight.shape[0]
    return windows.shape[0] * (windows.shape[1] - 1) * classes * 4


class DamageMeter:
    """Measures edits of one model on fixed windows against the unmodified model (module
    docstring). Build it on the unmodified model; then, for each edit, apply it, call
    :meth:`measure` with the first decoder layer the edit changes
    (:func:`esa.replay.first_changed_layer`, 0 = run everything), and undo it."""

    def __init__(self, model: torch.nn.Module, windows: torch.Tensor, batch_size: int, baseline: Baseline,
                 chunk_size: int = DEFAULT_CHUNK, start_layers: Iterable[int] = (),
                 bootstrap: Bootstrap = Bootstrap(), progress: bool = False):
        self.model, self.chunk_size, self.baseline, self.bootstrap = model, chunk_size, baseline, bootstrap
        self.batches = list(batches(windows, batch_size))
        device = model.get_input_embeddings().weight.device
        head = model.get_output_embeddings()
        self._reference_head = partial(functional_call, head,
                                       {name: p.detach().clone() for name, p in head.named_parameters()})
        keep_logits = reference_logits_bytes(model, windows) <= REFERENCE_LOGITS_BUDGET
        self._references, nll, tokens = [], [], []
        with torch.no_grad(), keep_layer_inputs(model, set(start_layers)) as kept:
            for batch in tqdm(self.batches, desc="reference", disable=not progress, leave=False):
                n, t, reference = reference_pass(model, batch.to(device), chunk_size, keep_logits)
                self._references.append(reference)
                nll.append(n.double().cpu())
                tokens.append(t.long().cpu())
        self._kept = kept
        self.reference = Evaluation(torch.cat(nll).numpy(), torch.cat(tokens).numpy())
        if not np.array_equal(self.reference.nll, baseline.nll):
            gap = float(np.max(np.abs(self.reference.nll - baseline.nll)))
            log.warning("the unmodified model's NLL differs from the baseline step's by up to %.3g per window "
                        "(another device, dtype or batch size?); deltas are taken against the baseline", gap)

    def evaluate(self, start: int = 0) -> Evaluation:
        """The current (edited) model on the windows, from decoder layer ``start``, with its KL
        from and top-1 agreement with the unmodified model."""
        device = self.model.get_input_embeddings().weight.device
        parts = []
        with replayed(self.model, start, self._kept):
            for batch, reference in zip(self.batches, self._references):
                parts.append(window_divergence(self.model, batch.to(device), reference, self._reference_head,
                                               self.chunk_size))
        nll, tokens, kl, agree = (torch.cat([p[i] for p in parts]).cpu().numpy() for i in range(4))
        return Evaluation(nll.astype(np.float64), tokens.astype(np.int64), kl, agree)

    def measure(self, start: int = 0) -> dict:
        """``DAMAGE_COLUMNS`` of the current (edited) model."""
        return damage(self.evaluate(start), self.baseline, self.bootstrap)

    def unchanged(self) -> dict:
        """``DAMAGE_COLUMNS`` of an edit that changes no weight's value: the baseline itself."""
        same = Evaluation(self.baseline.nll, self.baseline.tokens, np.zeros(len(self.baseline.nll)),
                          self.baseline.tokens.astype(np.float64))
        return damage(same, self.baseline, self.bootstrap)

"""Super-weight confirmation: zero each of a metric's highest-scoring weights alone.

A *super weight* (Yu et al. 2024) is a single scalar whose removal alone destroys the model.
For the global top-N candidates of one metric (``end == "top"``, score descending across all
tensors, equal scores by lower flat index, then by the tensor's position in the candidates
table), each weight w is zeroed on its own (``esa.perturb.perturbed``, kind ``zero``, restored
bit-exactly), the model is evaluated on the fixed evaluation windows and

    ppl_ratio = PPL(w <- 0) / PPL(baseline),   confirmed = ppl_ratio >= factor.

Super weights sit where a massive activation (one input channel of an early ``mlp.down_proj``
spiking far above the rest) meets a large weight; :func:`activation_trace` records, for every
decoder layer's down_proj, the largest |input| and |output| with its channel, window,
position and token.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .evaluation import DEFAULT_CHUNK, batches, evaluate
from .perturb import perturbed
from .scores import massive_activation_trace

COLUMNS = ["tensor", "layer", "module", "row", "col", "flat_index", "weight", "score",
           "ppl_before", "ppl_after", "ppl_ratio", "confirmed"]


def global_top(candidates: pd.DataFrame, top_n: int) -> pd.DataFrame:
    """The ``top_n`` highest scores among the top-end candidates of every tensor (order above)."""
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    top = candidates[candidates["end"] == "top"].drop_duplicates(["tensor", "flat_index"])
    position = {name: i for i, name in enumerate(pd.unique(candidates["tensor"]))}
    top = top.assign(_position=top["tensor"].map(position).to_numpy())
    top = top.sort_values(["score", "_position", "flat_index"], ascending=[False, True, True],
                          kind="stable")
    return top.head(top_n).drop(columns="_position").reset_index(drop=True)


def confirm_super_weights(model: torch.nn.Module, candidates: pd.DataFrame,
                          eval_windows: torch.Tensor, batch_size: int, baseline: dict,
                          top_n: int = 10, factor: float = 1.5,
                          chunk_size: int = DEFAULT_CHUNK) -> pd.DataFrame:
    """Zero each of the global top-``top_n`` candidates alone and measure the PPL it costs.

    ``baseline`` holds ``ppl`` of the unperturbed model on ``eval_windows`` (the baseline
    step's metrics). Returns one row per candidate in rank order, columns ``COLUMNS``;
    a non-finite loss gives ``ppl_after = inf`` and counts as confirmed.
    """
    chosen = global_top(candidates, top_n)
    before = float(baseline["ppl"])
    after = []
    for i in range(len(chosen)):
        with perturbed(model, chosen.iloc[i:i + 1], "zero"):
            after.append(evaluate(model, eval_windows, batch_size, chunk_size=chunk_size).ppl)
    after = np.asarray(after, dtype=np.float64)
    ratio = after / before
    out = chosen[["tensor", "layer", "module", "row", "col", "flat_index", "weight", "score"]].assign(
        ppl_before=before, ppl_after=after, ppl_ratio=ratio, confirmed=ratio >= factor)
    return out[COLUMNS]


def activation_trace(model: torch.nn.Module, windows: torch.Tensor, batch_size: int,
                     chunk_size: int = DEFAULT_CHUNK) -> pd.DataFrame:
    """Max |input| and |output| of every decoder layer's ``mlp.down_proj`` over ``windows``
    (the massive-activation trace; see :func:`esa.scores.massive_activation_trace`)."""
    return massive_activation_trace(model, list(batches(windows, batch_size)), chunk_size)

"""Super-weight confirmation: zero each of the metrics' highest-scoring weights alone.

A *super weight* (Yu et al. 2024) is a single scalar whose removal alone destroys the model.
Each metric's global top-N is :mod:`esa.selection`'s ``global`` top-k with k = N (score
descending across all tensors, equal scores by the tensor's position in the tensor table,
then by lower flat index), which refuses an N its candidates cannot rank exactly. Every weight
in the union of the metrics' top-N is zeroed on its own, once (``esa.perturb.perturbed``, kind
``zero``, restored bit-exactly), the model is evaluated on the fixed evaluation windows and

    ppl_ratio = PPL(w <- 0) / PPL(baseline),   confirmed = ppl_ratio >= factor.

Super weights sit where a massive activation (one input channel of an early ``mlp.down_proj``
spiking far above the rest) meets a large weight; :func:`activation_trace` records, for every
decoder layer's down_proj, the largest |input| and |output| with its channel, window,
position and token.

Zeroing a weight of decoder layer L leaves the outputs of layers 0..L-1 unchanged, so the
unmodified model's pass that traces the activations also keeps, per batch, the input of every
layer L that holds a candidate (the output of layer L-1), and each ablation in layer L runs the
model's own forward with layers 0..L-1 returning that kept output instead of computing: layers
L..end, final norm, LM head and loss run exactly as in a full evaluation, on the same inputs,
so ``ppl_after`` is bit-identical to evaluating the whole model. This holds whenever a decoder
layer's output depends only on its input and its own parameters (not on state another layer
leaves behind, such as a KV cache shared across layers). The kept inputs take
windows x seq_len x hidden x dtype bytes per distinct candidate layer, on the model's device.

A *super expert* is the mixture-of-experts analogue: one expert whose removal alone destroys
the model. :func:`confirm_super_experts` ranks the experts by score mass (an expert's
matrices summed) and zeroes each of every metric's top-N whole, one at a time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from .architecture import decoder_layers, is_expert_stack, split_expert
from .errors import ESAError
from .evaluation import DEFAULT_CHUNK, Evaluation, batches, evaluate
from .names import GLOBAL, ZERO
from .perturb import perturbed
from .scores import massive_activation_trace
from .selection import select_topk

COLUMNS = ["tensor", "layer", "module", "expert", "part", "row", "col", "flat_index", "weight", "score",
           "ppl_before", "ppl_after", "ppl_ratio", "confirmed"]
WEIGHT_KEY = ["tensor", "flat_index"]
# super_weights.parquet: one row per (metric, rank), the weight's key first
SUPER_WEIGHT_COLUMNS = ["metric", "rank", *WEIGHT_KEY, *(c for c in COLUMNS if c not in WEIGHT_KEY)]
EXPERT_KEY = ["layer", "stack", "expert"]
_STACK = re.compile(r"^(.*experts)(?:\.\d+)?\..*$")  # a matrix's name -> its expert stack's
# super_experts.parquet: one row per (metric, rank), the expert's key first
SUPER_EXPERT_COLUMNS = ["metric", "rank", *EXPERT_KEY, "score_mass", "ppl_before", "ppl_after", "ppl_ratio",
                        "confirmed"]
_EXPERT_DTYPES = {"rank": "int64", "layer": "int32", "expert": "int32", "score_mass": "float64",
                  "ppl_before": "float64", "ppl_after": "float64", "ppl_ratio": "float64", "confirmed": "bool"}


@dataclass(frozen=True)
class Confirmation:
    """The ablation table, the massive-activation trace and the unmodified model's evaluation."""

    super_weights: pd.DataFrame  # one row per weight tested (COLUMNS) or per (metric, rank)
    activations: pd.DataFrame  # esa.scores.TRACE_COLUMNS
    rerun: Evaluation  # evaluated after every ablation was undone


@dataclass(frozen=True)
class _LayerOutputs:
    """What one decoder layer returned in the unmodified pass, batch by batch: the hidden state
    and, when the layer returns a tuple, its length."""

    hidden: list[torch.Tensor]
    tuple_length: int | None

    def replay(self, batch: int):
        """Batch ``batch``'s output in the layer's return type. A fresh copy, so no later layer
        can change the kept state in place; a tuple's other entries (attention weights, cache)
        are not read by the loss and are None."""
        hidden = self.hidden[batch].clone()
        return hidden if self.tuple_length is None else (hidden, *(None,) * (self.tuple_length - 1))


def global_top(candidates: pd.DataFrame, tensor_table: pd.DataFrame, top_n: int) -> pd.DataFrame:
    """The ``top_n`` highest scores over every tensor of ``tensor_table``, ``rank`` 0..top_n-1:
    ``esa.selection.select_topk(candidates, tensor_table, "global", top_n)``.

    A ``top_n`` the candidates cannot rank exactly (above the M kept per tensor, or above the
    weights there are) is an :class:`ESAError` naming it.
    """
    try:
        return select_topk(candidates, tensor_table, GLOBAL, top_n)
    except ESAError as err:
        raise ESAError(f"confirm.top_n={top_n}: {err}") from None


def first_changed_layer(model: torch.nn.Module, tensor: str) -> int:
    """The first decoder layer whose input an edit of parameter ``tensor`` can change.

    That is the lowest layer holding the parameter; 0 when the parameter is (also) used outside
    the decoder layers (embeddings, lm_head, a tied pair), where the whole model must run.
    """
    param = model.get_parameter(split_expert(tensor)[0])

    def uses(module: torch.nn.Module) -> int:
        return sum(p is param for _, p in module.named_parameters(remove_duplicate=False))

    per_layer = [uses(layer) for layer in decoder_layers(model)]
    if sum(per_layer) < uses(model):
        return 0
    return next(i for i, n in enumerate(per_layer) if n)


@contextmanager
def _keep_layer_inputs(model: torch.nn.Module, layers: set[int]):
    """While open, every forward pass appends the output of decoder layer L-1 (the input of
    layer L) to ``kept[L]``, for each L >= 1 of ``layers``; yields ``kept``."""
    blocks = decoder_layers(model)
    kept: dict[int, _LayerOutputs] = {}

    def keeper(layer: int):
        def hook(module: torch.nn.Module, args: tuple, output) -> None:
            is_tuple = isinstance(output, tuple)
            entry = kept.setdefault(layer, _LayerOutputs([], len(output) if is_tuple else None))
            # a copy: layer L may update its input in place
            entry.hidden.append((output[0] if is_tuple else output).detach().clone())
        return hook

    handles = [blocks[layer - 1].register_forward_hook(keeper(layer))
               for layer in sorted(layers) if layer > 0]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _start_at(model: torch.nn.Module, start: int, kept: _LayerOutputs):
    """Layers 0..start-1 return, batch after batch, ``kept`` (the unmodified outputs of layer
    start-1) without computing; the model's forward, masks and embeddings run as usual."""
    skipped = list(decoder_layers(model))[:start]
    batch, output = -1, None

    def first(*args, **kwargs):
        nonlocal batch, output
        batch += 1  # layer 0 runs once per batch, before every other layer
        output = kept.replay(batch)
        return output

    def rest(*args, **kwargs):
        return output

    own = [layer.__dict__.get("forward") for layer in skipped]  # e.g. accelerate's device hooks
    for i, layer in enumerate(skipped):
        layer.forward = first if i == 0 else rest
    try:
        yield
    finally:
        for layer, forward in zip(skipped, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def confirm_super_weights(model: torch.nn.Module, candidates: Mapping[str, pd.DataFrame],
                          tensor_tables: Mapping[str, pd.DataFrame], eval_windows: torch.Tensor,
                          batch_size: int, baseline: dict, top_n: int = 10, factor: float = 1.5,
                          chunk_size: int = DEFAULT_CHUNK) -> Confirmation:
    """Zero each weight of every metric's global top-``top_n`` alone, once, and measure the PPL.

    ``candidates`` and ``tensor_tables``: metric -> its candidates and tensor table (the first
    columns of its stats.parquet). Each metric's :func:`global_top`, stacked in the order of
    ``candidates``, gives the rows; a weight in several metrics' top-N is zeroed once (as
    :func:`zero_each`, in first-seen order) and its row, ``score`` included, is that of the
    metric listed first. ``super_weights`` has one row per (metric, rank), columns
    ``SUPER_WEIGHT_COLUMNS`` (``rank`` int64, 0 = the metric's highest score).
    """
    tops = pd.concat([global_top(candidates[metric], tensor_tables[metric], top_n).assign(metric=metric)
                      for metric in candidates], ignore_index=True)
    result = zero_each(model, tops.drop_duplicates(WEIGHT_KEY), eval_windows, batch_size, baseline,
                       factor, chunk_size)
    table = tops[["metric", "rank", *WEIGHT_KEY]].merge(result.super_weights, on=WEIGHT_KEY)
    return replace(result, super_weights=table[SUPER_WEIGHT_COLUMNS])


def zero_each(model: torch.nn.Module, weights: pd.DataFrame, eval_windows: torch.Tensor,
              batch_size: int, baseline: dict, factor: float = 1.5,
              chunk_size: int = DEFAULT_CHUNK) -> Confirmation:
    """Zero each row of ``weights`` (tensor, layer, module, row, col, flat_index, weight,
    score) alone and measure the PPL it costs.

    ``baseline`` holds ``ppl`` of the unperturbed model on ``eval_windows`` (the baseline
    step's metrics). The unmodified model runs twice: first the activation trace (which also
    keeps the candidate layers' inputs), last the rerun, after every weight is restored; each
    ablation in between runs from the first layer it changes (module docstring). The
    table has one row per row of ``weights``, in their order, columns ``COLUMNS``; a
    non-finite loss gives ``ppl_after = inf`` and counts as confirmed.
    """
    before = float(baseline["ppl"])
    starts = [first_changed_layer(model, tensor) for tensor in weights["tensor"]]
    with _keep_layer_inputs(model, set(starts)) as kept:
        trace = activation_trace(model, eval_windows, batch_size, chunk_size)
    after = []
    for i, start in enumerate(starts):
        with perturbed(model, weights.iloc[i:i + 1], ZERO), \
                (_start_at(model, start, kept[start]) if start else nullcontext()):
            after.append(evaluate(model, eval_windows, batch_size, chunk_size=chunk_size).ppl)
    kept.clear()  # up to one hidden state of every window per layer: free it before the rerun
    after = np.asarray(after, dtype=np.float64)
    ratio = after / before
    table = weights[["tensor", "layer", "module", "expert", "part", "row", "col", "flat_index", "weight",
                     "score"]].assign(
        ppl_before=before, ppl_after=after, ppl_ratio=ratio, confirmed=ratio >= factor)
    rerun = evaluate(model, eval_windows, batch_size, chunk_size=chunk_size)
    return Confirmation(table[COLUMNS], trace, rerun)


def expert_mass(stats: pd.DataFrame) -> pd.DataFrame:
    """The experts of one metric's stats.parquet ranked by score mass: one row per expert (a
    ``(layer, stack, expert)``, ``stack`` the expert stack's module path inside the layer, e.g.
    ``mlp.experts``), ``score_mass`` = the sum of ``sum`` over its matrices' rows (its
    ``gate_up_proj[e]`` and ``down_proj[e]``, or the matrices of a ``ModuleList``'s expert e),
    ``path`` = the stack's qualified module name.

    Highest mass first; equal masses keep the order of the experts' first rows in ``stats``
    (model order). No expert rows (a dense model): an empty frame.
    """
    rows = stats[stats["expert"] >= 0]

    def stack(name: str) -> str:  # "mlp.experts.down_proj" and "mlp.experts.3.down_proj" -> "mlp.experts"
        return _STACK.sub(r"\1", name)

    keyed = pd.DataFrame({"layer": rows["layer"], "stack": rows["module"].map(stack),
                          "expert": rows["expert"],
                          "path": rows["tensor"].map(lambda tensor: stack(split_expert(tensor)[0])),
                          "score_mass": rows["sum"].astype("float64")})
    mass = keyed.groupby([*EXPERT_KEY, "path"], sort=False)["score_mass"].sum().reset_index()
    return mass.sort_values("score_mass", ascending=False, kind="stable", ignore_index=True)


def expert_selection(model: torch.nn.Module, path: str, expert: int) -> pd.DataFrame:
    """Every entry of expert ``expert`` of the expert stack ``path``, as a selection for
    :func:`esa.perturb.perturbed` (columns tensor, flat_index): the ``expert``-th block of each
    of the stack's own parameters with one block per expert (``gate_up_proj``, ``down_proj``
    and, in families that have them, the experts' biases), or every parameter of module
    ``expert`` of a ``ModuleList`` of experts."""
    stack = model.get_submodule(path)
    if isinstance(stack, torch.nn.ModuleList):
        return pd.concat([pd.DataFrame({"tensor": f"{path}.{expert}.{name}", "flat_index": np.arange(p.numel())})
                          for name, p in stack[expert].named_parameters()], ignore_index=True)
    if not is_expert_stack(stack):
        raise ESAError(f"{path} is not an expert stack (no 3-D down_proj parameter, not a ModuleList)")
    count = stack.down_proj.shape[0]
    parts = []
    for name, param in stack.named_parameters(recurse=False):
        if param.ndim >= 2 and param.shape[0] == count:
            size = param[0].numel()
            parts.append(pd.DataFrame({"tensor": f"{path}.{name}",
                                       "flat_index": np.arange(expert * size, (expert + 1) * size)}))
    return pd.concat(parts, ignore_index=True)


def confirm_super_experts(model: torch.nn.Module, stats: Mapping[str, pd.DataFrame], eval_windows: torch.Tensor,
                          batch_size: int, baseline: dict, top_n: int = 10, factor: float = 1.5,
                          chunk_size: int = DEFAULT_CHUNK) -> pd.DataFrame:
    """Zero each of every metric's ``top_n`` experts by score mass whole, alone, once, and
    measure the PPL.

    ``stats``: metric -> its stats.parquet (tensor, layer, module, expert, ..., sum). An
    expert is one ``(layer, stack, expert)``; its score mass is the sum of ``sum`` over its
    matrices (:func:`expert_mass`), and each metric's top-``top_n`` are its ``top_n`` largest
    masses (all its experts when it has fewer). Every expert in the union is ablated once, in
    first-seen order (metrics in the order of ``stats``): every entry of its matrices (and
    biases, where the family has them; :func:`expert_selection`) is zeroed together with
    ``esa.perturb.perturbed`` (restored and verified bit-exactly), the whole model is evaluated
    on ``eval_windows`` and

        ppl_ratio = PPL(expert <- 0) / PPL(baseline),   confirmed = ppl_ratio >= factor,

    ``ppl_before`` being ``baseline["ppl"]``; a non-finite loss gives ``ppl_after = inf`` and
    counts as confirmed. Zeroing an expert's matrices makes its output 0 wherever the router
    sends a token; the router still sends them, so the expert's share of the routing weight
    is lost rather than handed to the others.

    Returns one row per (metric, rank), ``rank`` 0 = the metric's largest mass, columns
    ``SUPER_EXPERT_COLUMNS`` (``score_mass`` the metric's own); a dense model (no expert
    rows) gives an empty frame with those columns. Zeroing an expert holds an int64 index and
    a copy of each of its entries until restored.
    """
    before = float(baseline["ppl"])
    tops = pd.concat([expert_mass(stats[metric]).head(top_n).assign(
        metric=metric, rank=lambda top: np.arange(len(top))) for metric in stats], ignore_index=True)
    tested = tops.drop_duplicates(EXPERT_KEY)[[*EXPERT_KEY, "path"]]
    after = []
    for expert in tested.itertuples(index=False):
        with perturbed(model, expert_selection(model, expert.path, expert.expert), ZERO):
            after.append(evaluate(model, eval_windows, batch_size, chunk_size=chunk_size).ppl)
    after = np.asarray(after, dtype=np.float64)
    tested = tested[EXPERT_KEY].assign(ppl_before=before, ppl_after=after, ppl_ratio=after / before)
    table = tops.drop(columns="path").merge(tested, on=EXPERT_KEY).assign(
        confirmed=lambda frame: frame["ppl_ratio"] >= factor)
    return table[SUPER_EXPERT_COLUMNS].astype(_EXPERT_DTYPES)


def activation_trace(model: torch.nn.Module, windows: torch.Tensor, batch_size: int,
                     chunk_size: int = DEFAULT_CHUNK) -> pd.DataFrame:
    """Max |input| and |output| of every decoder layer's ``mlp.down_proj`` over ``windows``
    (the massive-activation trace; see :func:`esa.scores.massive_activation_trace`)."""
    return massive_activation_trace(model, list(batches(windows, batch_size)), chunk_size)

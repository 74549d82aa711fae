"""Behaviour beside perplexity: lm-eval-harness accuracy, greedy continuations and
attention-sink mass, for the unmodified model and under each edit ESA found.

Conditions (:func:`conditions`): ``baseline``; one per confirmed single super weight (confirm's
super_weights.parquet, :func:`esa.mechanism.confirmed_weights`) and one per joint super weight (a
destructive group's minimal subset, :func:`esa.mechanism.joint_super_weights`), zeroed; and for
each experiment of ``behaviour.experiments``, its top set and its random_k control of one seed,
perturbed as the experiment perturbs them. Each edit is :func:`esa.perturb.perturbed`, undone
bit-exactly after the condition's readouts; ``conditions.parquet`` lists the weights of each.

*lm-eval accuracy* (:mod:`esa.lm_eval_readout`): the harness on the in-memory model while the
edit is in place; offline, the task ``esa_cloze`` built from the evaluation text (:mod:`esa.cloze`).

*Generation.* For each prompt, the greedy continuation of exactly ``max_new_tokens`` new tokens
(one ``generate`` call with ``do_sample=False`` for all prompts, left-padded and masked;
end-of-sequence suppressed until then, so that every condition is read over the same length),
decoded. Of its new token ids t_1..t_n:

    repeated_4gram_share = 1 - |distinct 4-grams| / (n - 3)    (0: no 4-gram repeats; NaN for n < 4)
    distinct_2           = |distinct bigrams| / (n - 1)        (NaN for n < 2)

*Attention-sink mass* (Xiao et al. 2023; Sun et al. 2024 trace sinks to massive activations,
Yu et al. 2024 to super weights). Per decoder layer l, with A^l[b, h, t, s] the attention
probability of window b, head h, query position t on key position s,

    sink_l = mean over windows b, heads h and queries t = 1..T-1 of A^l[b, h, t, 0]

(query 0 can attend only to itself and is left out). The probabilities are the model's own:
for this pass the model runs its eager attention (SDPA and flash kernels never form them) and is
switched back after; a forward hook on each decoder layer's attention module (the child whose
output's second element is a (B, H, T, T) tensor) reduces them as they are made, so one layer's
probabilities are alive at a time.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .architecture import decoder_layers
from .evaluation import batches
from .lm_eval_readout import LM_EVAL_COLUMNS
from .mechanism import confirmed_weights, joint_super_weights
from .names import RANDOM_K, RELATIVE, TOP, ZERO
from .perturb import perturbed, set_rows

BASELINE = "baseline"
CONDITION_COLUMNS = ["condition", "kind", "experiment", "perturb", "scale", "noise", "seed", "n_weights", "tensors",
                     "flat_indices"]
GENERATION_COLUMNS = ["condition", "kind", "prompt_index", "prompt", "text", "new_tokens", "repeated_4gram_share",
                      "distinct_2"]
SINK_COLUMNS = ["condition", "kind", "layer", "sink_mass"]


@dataclass(frozen=True)
class Condition:
    """One edit the readouts are taken under: ``weights`` (tensor, flat_index) perturbed by
    :func:`esa.perturb.perturbed` with ``perturb``, ``scale``, ``noise`` and ``seed``."""

    name: str
    kind: str  # baseline, single, joint, or an experiment's set (top, random_k)
    weights: pd.DataFrame
    perturb: str = ZERO
    scale: float = 1.0
    noise: str = RELATIVE
    seed: int = 0
    experiment: str | None = None

    def edited(self, model: torch.nn.Module):
        return perturbed(model, self.weights, self.perturb, self.scale, self.noise, self.seed)

    def row(self) -> dict:
        edits = not self.weights.empty  # the baseline's row names no perturbation
        return {"condition": self.name, "kind": self.kind, "experiment": self.experiment,
                "perturb": self.perturb if edits else None, "scale": float(self.scale) if edits else np.nan,
                "noise": self.noise if edits else None, "seed": int(self.seed),
                "n_weights": len(self.weights), "tensors": self.weights["tensor"].tolist(),
                "flat_indices": self.weights["flat_index"].astype(np.int64).tolist()}


def repeated_ngram_share(tokens: list[int], n: int = 4) -> float:
    """1 - |distinct n-grams| / |n-grams| of ``tokens``; NaN when there is no n-gram."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else np.nan


def distinct_n(tokens: list[int], n: int = 2) -> float:
    """|distinct n-grams| / |n-grams| of ``tokens``; NaN when there is no n-gram."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else np.nan


def conditions(super_weights: pd.DataFrame, groups: pd.DataFrame, group_members: pd.DataFrame,
               experiments: list[dict] = ()) -> list[Condition]:
    """``baseline``; each confirmed single and joint super weight, zeroed; for each of
    ``experiments`` (name, perturb, scale, noise, seed and its ``mask`` of that seed) its top set
    and its random_k control, perturbed as the experiment perturbs them."""
    found = [Condition(BASELINE, BASELINE, pd.DataFrame({"tensor": [], "flat_index": np.array([], np.int64)}))]
    for w in confirmed_weights(super_weights).itertuples(index=False):
        found.append(Condition(f"{w.tensor.removeprefix('model.')}[{w.row}, {w.col}] zeroed", "single",
                               pd.DataFrame({"tensor": [w.tensor], "flat_index": [w.flat_index]})))
    for group, mine in joint_super_weights(groups, group_members):
        found.append(Condition(f"group {int(group['group'])} ({len(mine)} weights, {group['label']}) zeroed", "joint",
                               mine[["tensor", "flat_index"]].reset_index(drop=True)))
    for e in experiments:
        mask = e["mask"]
        for name in (TOP, RANDOM_K):
            rows = set_rows(mask, name, f"behaviour.experiments: the mask of experiment {e['name']!r} "
                                        f"(seed {e['seed']})")[["tensor", "flat_index"]].reset_index(drop=True)
            found.append(Condition(f"{e['name']} {name} ({e['perturb']})", name, rows, e["perturb"], e["scale"],
                                   e["noise"], e["seed"], e["name"]))
    return found


class _SinkMass:
    """Forward hook on one attention module: sums A[b, h, t, 0] over b, h and t >= 1."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def __call__(self, module: torch.nn.Module, args: tuple, output):
        probabilities = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if torch.is_tensor(probabilities) and probabilities.dim() == 4:
            on_first = probabilities.detach()[:, :, 1:, 0].double()
            self.total += float(on_first.sum())
            self.count += on_first.numel()
        return None

    @property
    def mass(self) -> float:
        return self.total / self.count if self.count else np.nan


@contextmanager
def _eager_attention(model: torch.nn.Module):
    """The model on its eager attention within, on the attention it had after."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def attention_sink_mass(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> list[float]:
    """sink_l of every decoder layer l over ``windows`` (module docstring)."""
    layers = decoder_layers(model)
    sinks = [_SinkMass() for _ in layers]
    handles = [child.register_forward_hook(sink) for layer, sink in zip(layers, sinks) for child in layer.children()]
    device = model.get_input_embeddings().weight.device
    try:
        with _eager_attention(model), torch.no_grad():
            for batch in batches(windows, batch_size):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [sink.mass for sink in sinks]


def greedy_continuations(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The new token ids of each prompt's greedy continuation, exactly ``max_new_tokens`` of
    them: one ``generate`` call for all prompts, padded on the left and masked, so a prompt's
    continuation is the one it has alone."""
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = [tokenizer(prompt).input_ids for prompt in prompts]
    width = max(len(ids) for ids in encoded)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, pad_token_id=pad)
    return out[:, width:].tolist()


def behaviour_readouts(model: torch.nn.Module, tokenizer, found: list[Condition], windows: torch.Tensor,
                       batch_size: int, prompts: list[str], max_new_tokens: int, harness=None,
                       progress: bool = False) -> dict[str, pd.DataFrame]:
    """The tables ``conditions`` (CONDITION_COLUMNS), ``generation`` (GENERATION_COLUMNS),
    ``sinks`` (SINK_COLUMNS) and ``lm_eval`` (:data:`esa.lm_eval_readout.LM_EVAL_COLUMNS`; empty
    without a ``harness``) of every condition of ``found`` (:func:`conditions`), each read while
    its edit is in place."""
    generation, sinks, scores = [], [], []
    for condition in tqdm(found, desc="behaviour", disable=not progress):
        head = {"condition": condition.name, "kind": condition.kind}
        with condition.edited(model):
            for layer, mass in enumerate(attention_sink_mass(model, windows, batch_size)):
                sinks.append({**head, "layer": layer, "sink_mass": mass})
            for i, (prompt, new) in enumerate(zip(prompts, greedy_continuations(model, tokenizer, prompts,
                                                                                max_new_tokens))):
                generation.append({**head, "prompt_index": i, "prompt": prompt,
                                   "text": tokenizer.decode(new, skip_special_tokens=False), "new_tokens": len(new),
                                   "repeated_4gram_share": repeated_ngram_share(new), "distinct_2": distinct_n(new)})
            if harness is not None:
                scores.append(harness.accuracy().assign(**head))
    return {"conditions": pd.DataFrame([c.row() for c in found], columns=CONDITION_COLUMNS),
            "generation": pd.DataFrame(generation, columns=GENERATION_COLUMNS),
            "sinks": pd.DataFrame(sinks, columns=SINK_COLUMNS).astype({"layer": "int64", "sink_mass": "float64"}),
            "lm_eval": (pd.concat(scores, ignore_index=True) if scores else pd.DataFrame(columns=LM_EVAL_COLUMNS))
            [LM_EVAL_COLUMNS].astype({"value": "float64", "stderr": "float64", "n": "int64"})}

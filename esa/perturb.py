"""Perturbations of a selected set of weights, applied in place and restored bit-exactly.

For each selected weight w (one entry of a weight matrix W):

    zero        w <- 0
    sign_flip   w <- -scale * w
    scale       w <- scale * w                      (scale 0 is zero's +0, exactly)
    gaussian    w <- w + scale * |w| * eps          (noise: relative, the default)
                w <- w + scale * eps                (noise: absolute)
                w <- w + scale * std(W) * eps       (noise: tensor_std)

with eps ~ N(0, 1) independent per weight. New values are computed in fp32 and cast to the
parameter's dtype. eps is drawn in fp32 from a CPU ``torch.Generator`` seeded with ``seed``,
one value per selected weight in order of tensor name, then flat index, and moved to the
parameter's device, so the noise depends neither on the device nor on the selection's row
order. std(W) is the population standard deviation of all entries of W before perturbation.

Only the touched entries' original values are saved (never a copy of the model). On restore,
every touched entry must still hold exactly the bits that were written (else something else
modified it while perturbed), and after restoring must hold exactly the saved bits; either
failure raises ``RuntimeError`` (after the originals have been written back).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .architecture import is_transposed, split_expert, storage_index
from .damage import DAMAGE_COLUMNS, Baseline, Bootstrap, DamageMeter
from .errors import ESAError
from .evaluation import DEFAULT_CHUNK
from .names import ABSOLUTE, GAUSSIAN, NOISE_MODES, PERTURBATIONS, RELATIVE, SCALE, SETS, SIGN_FLIP, ZERO
from .replay import first_changed_layer

RESULT_COLUMNS = ["set", "seed", "n_weights", "perturb", "scale", "noise", *DAMAGE_COLUMNS, "evaluated"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class PerturbationInfo:
    """What a perturbation touched: distinct weights, the tensors holding them, and how many
    of the weights it gave a new value (``-0.0`` for ``0.0`` is the same value)."""

    n_weights: int
    n_tensors: int
    n_changed: int


@dataclass(frozen=True)
class _Touched:
    name: str
    param: torch.nn.Parameter
    index: torch.Tensor  # flat indices, on the parameter's device
    original: torch.Tensor
    written: torch.Tensor


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    """Raise an ESAError naming the allowed values unless ``value`` is one of them."""
    if value not in allowed:
        raise ESAError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN, -0.0 != 0.0), unlike float comparison."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    size = a.element_size()
    return torch.equal(a.view(_INT_OF_SIZE[size]), b.view(_INT_OF_SIZE[size]))


def _flat(param: torch.nn.Parameter) -> torch.Tensor:
    if param.device.type == "meta":
        raise ESAError("cannot perturb a parameter on the meta device (offloaded weights)")
    return param.detach().view(-1)  # a view: writes go to the parameter itself


def _groups(model: torch.nn.Module, selection: pd.DataFrame) -> list[tuple[str, torch.nn.Parameter, np.ndarray]]:
    """Selected flat indices per parameter, sorted by tensor name, deduplicated.

    Tied weights (e.g. ``lm_head.weight`` and ``model.embed_tokens.weight``) are one parameter,
    so entries selected under either name are merged and touched once. ``flat_index`` is in
    the Linear convention; a Conv1D weight's is mapped to its [in, out] storage
    (:func:`esa.architecture.storage_index`), an expert's (``<parameter>[e]``) to its block of
    the 3-D parameter.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(t for t in set(selection["tensor"]) if split_expert(t)[0] not in params)
    if unknown:
        raise ESAError(f"selection names tensors the model does not have: {unknown[:5]}")
    merged: dict[int, tuple[str, torch.nn.Parameter, list[np.ndarray]]] = {}
    for tensor, rows in selection.groupby("tensor", sort=True):
        name, expert = split_expert(tensor)
        param = params[name]
        entry = merged.setdefault(id(param), (name, param, []))
        flat = rows["flat_index"].to_numpy(dtype=np.int64)
        if expert >= 0:  # expert e's matrix is the e-th [rows, cols] block of the 3-D parameter
            size = param[0].numel() if param.ndim == 3 else 0
            if not 0 <= expert < (param.shape[0] if param.ndim == 3 else 0) or flat.min() < 0 or flat.max() >= size:
                raise ESAError(f"{tensor}: no such expert, or flat_index out of range for its {size} entries")
            flat = flat + expert * size
        elif param.ndim == 2 and is_transposed(model.get_submodule(name.rpartition(".")[0])):
            flat = storage_index(flat, param.shape[1], param.shape[0], transposed=True)
        entry[2].append(flat)
    groups = []
    for name, param, parts in merged.values():
        index = np.unique(np.concatenate(parts))
        if index[0] < 0 or index[-1] >= param.numel():
            raise ESAError(f"flat_index out of range for {name} with {param.numel()} entries")
        groups.append((name, param, index))
    return groups


def _zeroed(w: torch.Tensor, param: torch.Tensor, scale: float, noise: str, generator) -> torch.Tensor:
    return torch.zeros_like(w)


def _sign_flipped(w: torch.Tensor, param: torch.Tensor, scale: float, noise: str, generator) -> torch.Tensor:
    return -scale * w


def _scaled(w: torch.Tensor, param: torch.Tensor, scale: float, noise: str, generator) -> torch.Tensor:
    return torch.zeros_like(w) if scale == 0 else scale * w  # +0, as zero writes, not -0 for w < 0


def _noised(w: torch.Tensor, param: torch.Tensor, scale: float, noise: str,
            generator: torch.Generator) -> torch.Tensor:
    eps = torch.randn(w.numel(), generator=generator, dtype=torch.float32).to(w.device)
    if noise == RELATIVE:
        spread = scale * w.abs()
    elif noise == ABSOLUTE:
        spread = scale
    else:
        spread = scale * param.detach().float().std(correction=0)
    return w + spread * eps


# each perturbation's new values (fp32) of the selected entries w (fp32) of param
NEW_VALUES = {ZERO: _zeroed, SIGN_FLIP: _sign_flipped, GAUSSIAN: _noised, SCALE: _scaled}


def _restore(touched: list[_Touched]) -> None:
    """Write the saved originals back and verify the touched entries bit by bit."""
    tampered, failed = [], []
    with torch.no_grad():
        for t in reversed(touched):
            flat = _flat(t.param)
            if not same_bits(flat[t.index], t.written):
                tampered.append(t.name)
            flat.index_put_((t.index,), t.original.to(flat.dtype))
            if not same_bits(flat[t.index], t.original):
                failed.append(t.name)
    if tampered or failed:
        raise RuntimeError(f"perturbed entries were modified while perturbed in {tampered} / "
                           f"differ from the saved originals after restore in {failed}")


@contextmanager
def perturbed(model: torch.nn.Module, selection: pd.DataFrame, kind: str, scale: float = 1.0,
              noise: str = RELATIVE, seed: int = 0):
    """Perturb every entry of ``selection`` (columns ``tensor``, ``flat_index``) in place.

    All rows are applied: filter a mask to one set first.

    Yields a :class:`PerturbationInfo`; on exit, normal or not, the original values are
    restored and verified bit-exactly (see the module docstring for formulas and checks).
    """
    _check_choice(kind, PERTURBATIONS, "perturbation")
    _check_choice(noise, NOISE_MODES, "noise mode")
    generator = torch.Generator().manual_seed(seed)
    touched: list[_Touched] = []
    try:
        with torch.no_grad():
            for name, param, index in _groups(model, selection):
                flat = _flat(param)
                index = torch.from_numpy(index).to(flat.device)
                original = flat[index]  # advanced indexing copies
                new = NEW_VALUES[kind](original.float(), param, scale, noise, generator)
                flat.index_put_((index,), new.to(flat.dtype))
                touched.append(_Touched(name, param, index, original, flat[index]))
        yield PerturbationInfo(n_weights=sum(len(t.index) for t in touched), n_tensors=len(touched),
                               n_changed=sum(int((t.written != t.original).sum()) for t in touched))
    finally:
        _restore(touched)


def first_changed_layer_of(model: torch.nn.Module, selection: pd.DataFrame) -> int:
    """The first decoder layer an edit of the selection's weights can change
    (:func:`esa.replay.first_changed_layer` of each of its tensors, the lowest)."""
    return min(first_changed_layer(model, tensor) for tensor in selection["tensor"].unique())


def zeroed_damage(meter: DamageMeter, selection: pd.DataFrame) -> dict:
    """The damage (``DAMAGE_COLUMNS``) of ``selection``'s weights (tensor, flat_index) zeroed
    together, measured by ``meter`` from the first layer the edit changes; restored bit-exactly."""
    with perturbed(meter.model, selection, ZERO):
        return meter.measure(first_changed_layer_of(meter.model, selection))


def set_rows(mask: pd.DataFrame, name: str, what: str) -> pd.DataFrame:
    """The rows of set ``name`` of ``mask`` (``what`` names the mask); ESAError when there are
    none: a missing control must not pass silently as "no damage"."""
    rows = mask[mask["set"] == name]
    if rows.empty:
        raise ESAError(f"{what} has no rows of set {name!r}")
    return rows


def run_perturbations(model: torch.nn.Module, mask_by_seed: dict[int, pd.DataFrame],
                      eval_windows: torch.Tensor, batch_size: int, baseline: Baseline,
                      perturb: str, scale: float = 1.0, noise: str = RELATIVE,
                      sets: tuple[str, ...] = SETS, chunk_size: int = DEFAULT_CHUNK,
                      bootstrap: Bootstrap = Bootstrap(), progress: bool = True) -> pd.DataFrame:
    """For every seed and set: perturb that set of the seed's mask, evaluate, restore.

    The noise of seed s is drawn with seed s. Each row's damage columns (loss, ppl, their
    deltas and ratio to ``baseline``, the paired bootstrap interval of delta_ppl, KL from and
    top-1 agreement with the unperturbed model) are :mod:`esa.damage`'s, measured on
    ``eval_windows`` from the first decoder layer the set changes.

    A non-finite loss is a result (``finite`` False, ppl inf), not an error. A set whose
    perturbation gives no weight a new value (sign_flip or relative noise of weights that are
    0, as a bottom_k of zero scores often is) leaves the model the same function: its row is
    the baseline's (delta 0, KL 0, top-1 1), not evaluated again (``evaluated`` False).
    Returns one row per (seed, set) with columns ``RESULT_COLUMNS``.
    """
    _check_choice(perturb, PERTURBATIONS, "perturbation")
    _check_choice(noise, NOISE_MODES, "noise mode")
    for name in sets:
        _check_choice(name, SETS, "set")
    jobs = []
    for seed in sorted(mask_by_seed):
        mask = mask_by_seed[seed]
        for name in sets:
            rows = set_rows(mask, name, f"mask of seed {seed}")
            jobs.append((seed, name, rows, first_changed_layer_of(model, rows)))
    meter = DamageMeter(model, eval_windows, batch_size, baseline, chunk_size, {job[3] for job in jobs},
                        bootstrap, progress)
    records = []
    for seed, name, rows, start in tqdm(jobs, desc=f"perturb {perturb}", disable=not progress):
        with perturbed(model, rows, perturb, scale, noise, seed) as info:
            evaluated = info.n_changed > 0
            measured = meter.measure(start) if evaluated else meter.unchanged()
        records.append({"set": name, "seed": int(seed), "n_weights": info.n_weights,
                        "perturb": perturb, "scale": float(scale), "noise": noise, **measured,
                        "evaluated": evaluated})
    return pd.DataFrame(records, columns=RESULT_COLUMNS)

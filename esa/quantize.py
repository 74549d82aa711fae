"""Round-to-nearest (RTN) weight quantization of every target, with some weights kept in full
precision, and the damage each choice of kept weights leaves.

Each target matrix W (the Linear convention: rows = output channels, cols = input channels;
a Conv1D's [in, out] storage is read transposed, an expert's matrix is its block ``param[e]`` of
the 3-D parameter) is cut, row by row, into groups of ``group_size`` consecutive weights along
the input dimension (``group_size`` None: one group per output row, i.e. per output channel).
With b bits, per group G and its unprotected weights U (asymmetric min-max):

    lo = min_{w in U} w,   hi = max_{w in U} w,   scale = (hi - lo) / (2^b - 1)
    q  = clamp(round((w - lo) / scale), 0, 2^b - 1),   w' = lo + q * scale      for w in U
    w' = w                                                                       for w in G \\ U

computed in fp32 (``round`` is torch's: halves to even) and cast back to the parameter's dtype.
A group whose scale is 0 (its unprotected weights all equal) or that is fully protected is left
as it is: protected weights always keep their exact original value, and they do not stretch
the range [lo, hi] the others are quantized on.

:func:`quantized_targets` applies this to every target in place and restores every matrix from
a saved copy afterwards, checked bit for bit (``RuntimeError`` if a restored matrix differs): it
holds one copy of the targets, on their device, while the model is quantized; its
:meth:`~QuantizedTargets.protecting` keeps a set of weights by quantizing again only the rows that
hold them (the groups of one row are quantized on their own weights, so the bits are those of
quantizing every matrix afresh), and :func:`quantized` is the two together.
:func:`run_quantization` measures each protect condition (:mod:`esa.protect`) of each scheme
with :class:`esa.damage.DamageMeter` against the unquantized model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .damage import DAMAGE_COLUMNS, Baseline, Bootstrap, DamageMeter
from .errors import ESAError
from .evaluation import DEFAULT_CHUNK
from .names import PER_CHANNEL
from .perturb import same_bits
from .protect import Condition
from .targets import Target, target_parameter

# quantize/results.parquet: one row per (scheme, condition); group_size -1 = per output channel
RESULT_COLUMNS = ["bits", "group_size", "protect", "metric", "k", "n_protected", *DAMAGE_COLUMNS]


@dataclass(frozen=True)
class Scheme:
    """``bits`` per weight and ``group_size`` weights per group along the input dimension (None:
    one group per output channel); config ``quantize.schemes``."""

    bits: int
    group_size: int | None = None

    def check(self, targets: list[Target]) -> None:
        """Refuse bits outside 2..8, or a group size that does not divide every target's input
        dimension."""
        if not 2 <= self.bits <= 8:
            raise ESAError(f"quantize bits {self.bits} must be between 2 and 8")
        for target in targets:
            if self.group_size is not None and (self.group_size < 1 or target.cols % self.group_size):
                raise ESAError(f"quantize group_size {self.group_size} does not divide the input dimension "
                               f"{target.cols} of {target.name}")


def rtn(matrix: torch.Tensor, bits: int, group_size: int | None = None,
        protected: torch.Tensor | None = None) -> torch.Tensor:
    """The RTN values (fp32) of a (rows, cols) ``matrix`` with the ``protected`` entries (a
    boolean matrix of its shape, or None) kept (module docstring)."""
    rows, cols = matrix.shape
    size = cols if group_size is None else group_size
    w = matrix.float().reshape(rows, cols // size, size)
    keep = (torch.zeros_like(w, dtype=torch.bool) if protected is None
            else protected.to(w.device).reshape(w.shape))
    lo = w.masked_fill(keep, torch.inf).amin(dim=-1, keepdim=True)
    hi = w.masked_fill(keep, -torch.inf).amax(dim=-1, keepdim=True)
    levels = 2 ** bits - 1
    scale = (hi - lo) / levels  # -inf for a fully protected group
    live = scale > 0
    q = torch.round((w - lo) / torch.where(live, scale, 1.0)).clamp(0, levels)
    return torch.where(live & ~keep, lo + q * scale, w).reshape(rows, cols)


def _protected(targets: list[Target], weights: pd.DataFrame) -> dict[str, torch.Tensor]:
    """Target name -> boolean (rows, cols) matrix of its protected entries, for the targets
    holding at least one of ``weights`` (tensor, flat_index in the Linear convention)."""
    by_name = {t.name: t for t in targets}
    unknown = sorted(set(weights["tensor"]) - set(by_name))
    if unknown:
        raise ESAError(f"protected weights name tensors that are not quantized targets: {unknown[:5]}")
    masks = {}
    for name, rows in weights.groupby("tensor", sort=False):
        target = by_name[name]
        flat = torch.tensor(rows["flat_index"].to_numpy(np.int64))
        if flat.min() < 0 or flat.max() >= target.numel:
            raise ESAError(f"protected flat_index out of range for {name} with {target.numel} entries")
        mask = torch.zeros(target.numel, dtype=torch.bool)
        mask[flat] = True
        masks[name] = mask.reshape(target.rows, target.cols)
    return masks


def _restore(saved: list[tuple[Target, torch.Tensor, torch.Tensor]]) -> None:
    """Write every saved matrix back and check it bit for bit."""
    failed = []
    with torch.no_grad():
        for target, matrix, original in reversed(saved):
            matrix.copy_(original)
            if not same_bits(matrix, original):
                failed.append(target.name)
    if failed:
        raise RuntimeError(f"quantized matrices differ from the saved originals after restore: {failed[:5]}")


class QuantizedTargets:
    """The targets of a model quantized in place with one scheme, no weight protected, and
    their saved originals (:func:`quantized_targets`)."""

    def __init__(self, scheme: Scheme, saved: list[tuple[Target, torch.Tensor, torch.Tensor]]):
        self.scheme, self.saved = scheme, saved

    def _write_rows(self, masks: dict[str, torch.Tensor], keep: bool) -> None:
        """Quantize again the rows of each masked matrix that hold a masked weight, from the
        original, keeping the masked weights (``keep``) or not. A row's groups are quantized
        on their own weights only, so this gives the bits of quantizing the whole matrix."""
        with torch.no_grad():
            for target, matrix, original in self.saved:
                mask = masks.get(target.name)
                if mask is None:
                    continue
                rows = mask.any(dim=1).nonzero().squeeze(1).to(matrix.device)
                kept = mask[rows.cpu()] if keep else None
                matrix[rows] = rtn(original[rows], self.scheme.bits, self.scheme.group_size, kept).to(matrix.dtype)

    @contextmanager
    def protecting(self, protected: pd.DataFrame | None):
        """Keep the ``protected`` weights (tensor, flat_index in the Linear convention; None or
        empty: none) in full precision while inside: only the rows holding them are quantized
        again, with them kept out of their groups' ranges, and quantized as before on exit."""
        masks = ({} if protected is None or protected.empty
                 else _protected([target for target, _, _ in self.saved], protected))
        self._write_rows(masks, keep=True)
        try:
            yield
        finally:
            self._write_rows(masks, keep=False)


@contextmanager
def quantized_targets(model: torch.nn.Module, targets: list[Target], scheme: Scheme):
    """Quantize every target of ``model`` in place with ``scheme``; yields the
    :class:`QuantizedTargets`. On exit, normal or not, every target is restored and checked
    bit-exactly (module docstring)."""
    scheme.check(targets)
    saved: list[tuple[Target, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for target in targets:
                param = target_parameter(model, target)
                if param.device.type == "meta":
                    raise ESAError(f"cannot quantize {target.name}: it is on the meta device (offloaded weights)")
                matrix = target.matrix(param.detach())  # a view: writes go to the parameter
                original = matrix.clone()
                saved.append((target, matrix, original))
                matrix.copy_(rtn(original, scheme.bits, scheme.group_size))
        yield QuantizedTargets(scheme, saved)
    finally:
        _restore(saved)


@contextmanager
def quantized(model: torch.nn.Module, targets: list[Target], scheme: Scheme,
              protected: pd.DataFrame | None = None):
    """Quantize every target of ``model`` in place with ``scheme``, keeping the ``protected``
    weights (tensor, flat_index in the Linear convention; None: none); restored and checked
    bit-exactly on exit (:func:`quantized_targets`)."""
    with quantized_targets(model, targets, scheme) as quantized_model, quantized_model.protecting(protected):
        yield


def run_quantization(model: torch.nn.Module, targets: list[Target], schemes: list[Scheme],
                     conditions: list[Condition], eval_windows: torch.Tensor, batch_size: int,
                     baseline: Baseline, chunk_size: int = DEFAULT_CHUNK, bootstrap: Bootstrap = Bootstrap(),
                     progress: bool = True) -> pd.DataFrame:
    """For every scheme and protect condition: quantize, measure (:mod:`esa.damage`, from layer
    0, against ``baseline``), restore. Each scheme quantizes the model once; a condition then
    quantizes again only the rows that hold its protected weights
    (:meth:`QuantizedTargets.protecting`).

    A condition that protects no weight (none; super_weights when none is confirmed) is the
    same quantized model as none: measured once per scheme, its row copies none's damage.
    Returns one row per (scheme, condition), columns ``RESULT_COLUMNS`` (``group_size``
    ``PER_CHANNEL`` = -1 for one group per output channel).
    """
    for scheme in schemes:
        scheme.check(targets)
    meter = DamageMeter(model, eval_windows, batch_size, baseline, chunk_size, (), bootstrap, progress)
    records = []
    progress_bar = tqdm(total=len(schemes) * len(conditions), desc="quantize", disable=not progress)
    for scheme in schemes:
        unprotected = None
        with quantized_targets(model, targets, scheme) as quantized_model:
            for condition in conditions:
                if condition.weights.empty and unprotected is not None:
                    measured = unprotected
                else:
                    with quantized_model.protecting(condition.weights):
                        measured = meter.measure(0)
                    if condition.weights.empty:
                        unprotected = measured
                records.append({"bits": scheme.bits,
                                "group_size": PER_CHANNEL if scheme.group_size is None else scheme.group_size,
                                "protect": condition.protect, "metric": condition.metric, "k": condition.k,
                                "n_protected": len(condition.weights), **measured})
                progress_bar.update()
    progress_bar.close()
    return pd.DataFrame(records, columns=RESULT_COLUMNS)

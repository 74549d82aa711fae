"""How each confirmed super weight acts: scale it, give back its massive activation, and set it
against the largest other weights of its tensor.

For each confirmed super weight w = W[row, col] (:mod:`esa.confirm`'s ``confirmed``, one per
distinct (tensor, flat_index)), every edit is measured by :class:`esa.damage.DamageMeter`
from the weight's own decoder layer on (``DAMAGE_COLUMNS``), and undone bit-exactly:

- Scale sweep: ``w <- s * w`` for each s of ``scales``, ``esa.perturb``'s ``scale``. s = 0
  writes exactly what confirm's ``zero`` ablation wrote, on the same windows against the same
  reference, so its row is confirm's measurement (:func:`esa.confirm.ablation_damage`, the same
  bits), not measured again. A scale that leaves w's value as it is (s = 1) is the baseline's row.
- Massive-activation restore (Yu et al. 2024, "The Super Weight in Large Language Models",
  arXiv:2411.07191, super activations), only for a weight of an MLP output projection P
  (:func:`esa.architecture.mlp_output_projections`: down_proj, fc2, c_proj, an expert stack's
  down_proj): w feeds output channel ``row`` of P. With y_p the unmodified model's output
  channel ``row`` of P at every window and position p (the DamageMeter's reference pass),

      massive = {p : |y_p| >= massive_fraction * max_p |y_p|};

  w is zeroed and P outputs y_p on channel ``row`` at the massive positions (the zeroed
  model's own values everywhere else), and, in loss (log-PPL),

      recovered = (loss_zeroed - loss_restored) / (loss_zeroed - loss_baseline):

  1 when the damage goes entirely through those activations, 0 when none of it does (NaN
  when zeroing changes nothing or a loss is not finite). Other weights get NaN there and a
  ``reason``; their ``*_zeroed`` columns are still measured.
- Mean-contribution control (the massive-activations paper's set-to-mean test, Sun et al.
  2024), for the same weights: with m_j = mean_t x_tj, the mean of P's input channel ``col``
  over every position of the calibration windows ``calib`` (the unmodified model), w is zeroed
  and P's output channel ``row`` gets + w * m_j at every position (a forward hook):

      mean_recovered = (loss_zeroed - loss_mean) / (loss_zeroed - loss_baseline):

  1 when w acts as a constant bias, less when its token-dependent part matters (NaN as for
  ``recovered``).
- The same control for each joint super weight: the minimal subset S of each destructive group
  of confirm labelled ``joint`` or ``additive`` (:mod:`esa.joint`; the same S once), all of S
  zeroed while each member's output channel gets its own mean contribution back,

      + sum over W[r, j] in S with row r of  W[r, j] * m_j    on output channel r of its projection,

  against S zeroed (confirm's measurement): ``mean_recovered`` as above. A member of an expert
  stack has no mean over every position (its input is the tokens routed to it): NaN, a reason.
- Matched-magnitude control: per tensor holding n confirmed super weights, zero together its
  n largest |w| that are not confirmed super weights (equal |w| by lower flat index, in the
  Linear convention), next to zeroing its n super weights together.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .architecture import is_expert_stack, mlp_output_projections, split_expert
from .confirm import WEIGHT_KEY, ablation_damage
from .damage import DAMAGE_COLUMNS, Baseline, Bootstrap, DamageMeter
from .errors import ESAError
from .evaluation import DEFAULT_CHUNK, batches, decoder_hidden
from .joint import ADDITIVE, JOINT
from .names import MATCHED_CONTROL, SCALE, SUPER_WEIGHTS, ZERO
from .perturb import first_changed_layer_of, perturbed, zeroed_damage
from .targets import find_targets, target_parameter

CONFIRMED_WEIGHT_COLUMNS = ["tensor", "flat_index", "row", "col", "layer", "module", "weight"]
SWEEP_COLUMNS = ["tensor", "flat_index", "row", "col", "layer", "weight", "scale", *DAMAGE_COLUMNS]
# the zeroed and the restored model's numbers (and the share recovered) of each weight
RESTORE_NUMBERS = ["loss_baseline", "loss_zeroed", "ppl_zeroed", "kl_zeroed", "loss_restored", "ppl_restored",
                   "kl_restored", "recovered", "mean_input", "loss_mean", "ppl_mean", "kl_mean", "mean_recovered"]
RESTORE_COLUMNS = [*CONFIRMED_WEIGHT_COLUMNS, "projection", "positions", "peak", *RESTORE_NUMBERS, "reason"]
# one row per (tensor, set): the flat indices zeroed together and the range of their |w|
CONTROL_COLUMNS = ["tensor", "layer", "set", "n_weights", "flat_indices", "abs_min", "abs_max", *DAMAGE_COLUMNS]
# one row per joint super weight (a group's minimal subset): zeroed, and zeroed with its mean contribution
JOINT_MEAN_NUMBERS = ["loss_baseline", "loss_zeroed", "ppl_zeroed", "loss_mean", "ppl_mean", "kl_mean",
                      "mean_recovered"]
JOINT_MEAN_COLUMNS = ["group", "kind", "label", "n_minimal", "tensors", "flat_indices", "rows", "cols", "mean_inputs",
                      *JOINT_MEAN_NUMBERS, "reason"]
_DAMAGE_DTYPES = {**dict.fromkeys(DAMAGE_COLUMNS, "float64"), "finite": "bool"}
_WEIGHT_DTYPES = {"tensor": "object", "flat_index": "int64", "row": "int64", "col": "int64", "layer": "int64",
                  "module": "object", "weight": "float64"}
_DTYPES = {
    "sweep": {**{c: t for c, t in _WEIGHT_DTYPES.items() if c != "module"}, "scale": "float64", **_DAMAGE_DTYPES},
    "restore": {**_WEIGHT_DTYPES, "projection": "object", "positions": "int64", "peak": "float64",
                **dict.fromkeys(RESTORE_NUMBERS, "float64"), "reason": "object"},
    "control": {"tensor": "object", "layer": "int64", "set": "object", "n_weights": "int64",
                "flat_indices": "object", "abs_min": "float64", "abs_max": "float64", **_DAMAGE_DTYPES},
    "joint_mean": {"group": "int64", "kind": "object", "label": "object", "n_minimal": "int64", "tensors": "object",
                   "flat_indices": "object", "rows": "object", "cols": "object", "mean_inputs": "object",
                   **dict.fromkeys(JOINT_MEAN_NUMBERS, "float64"),
                   "reason": "object"},
}
NOT_MLP_OUTPUT = "not an MLP output projection"
EXPERT_MEMBER = "a member of an expert stack: its input is the tokens routed to it, no mean over every position"


@dataclass(frozen=True)
class Mechanism:
    """The four tables: ``sweep`` (``SWEEP_COLUMNS``, one row per (weight, scale)),
    ``restore`` (``RESTORE_COLUMNS``, one per weight), ``control`` (``CONTROL_COLUMNS``, one
    per (tensor, set)), ``joint_mean`` (``JOINT_MEAN_COLUMNS``, one per joint super weight)."""

    sweep: pd.DataFrame
    restore: pd.DataFrame
    control: pd.DataFrame
    joint_mean: pd.DataFrame

    @classmethod
    def of(cls, sweep: list[dict], restore: list[dict], control: list[dict], joint_mean: list[dict]) -> Mechanism:
        """The tables of the rows, with their columns and dtypes even when empty."""
        def frame(rows: list[dict], columns: list[str], kind: str) -> pd.DataFrame:
            return pd.DataFrame(rows, columns=columns).astype(_DTYPES[kind])
        return cls(frame(sweep, SWEEP_COLUMNS, "sweep"), frame(restore, RESTORE_COLUMNS, "restore"),
                   frame(control, CONTROL_COLUMNS, "control"), frame(joint_mean, JOINT_MEAN_COLUMNS, "joint_mean"))

    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables by name (``esa.layout.MECHANISM_FILES``'s keys)."""
        return {"sweep": self.sweep, "restore": self.restore, "control": self.control, "joint_mean": self.joint_mean}


def confirmed_weights(super_weights: pd.DataFrame) -> pd.DataFrame:
    """The distinct confirmed weights of confirm's super_weights.parquet, in first-seen order,
    columns ``CONFIRMED_WEIGHT_COLUMNS``."""
    confirmed = super_weights[super_weights["confirmed"]].drop_duplicates(WEIGHT_KEY)
    return confirmed[CONFIRMED_WEIGHT_COLUMNS].reset_index(drop=True)


def joint_super_weights(groups: pd.DataFrame, group_members: pd.DataFrame) -> list[tuple[pd.Series, pd.DataFrame]]:
    """The joint super weights of confirm's groups.parquet and group_members.parquet: each
    destructive group labelled ``joint`` or ``additive`` with the members of its minimal subset
    (tensor, flat_index, layer, row, col, weight), a subset found by two groups once (the first)."""
    found, seen = [], set()
    for group in groups[groups["destructive"] & groups["label"].isin([JOINT, ADDITIVE])].itertuples(index=False):
        mine = group_members[(group_members["group"] == group.group) & group_members["minimal"]]
        key = frozenset(mine[WEIGHT_KEY].itertuples(index=False, name=None))
        if key not in seen:
            seen.add(key)
            found.append((pd.Series(group._asdict()), mine.reset_index(drop=True)))
    return found


def _selection(tensor: str, flat_indices) -> pd.DataFrame:
    return pd.DataFrame({"tensor": tensor, "flat_index": np.asarray(flat_indices, dtype=np.int64)})




def _projections(model: torch.nn.Module) -> dict[int, tuple[str, torch.nn.Module]]:
    """id(parameter) -> (qualified module name, module) of each MLP output projection's matrix
    parameter: a Linear/Conv1D's weight, an expert stack's 3-D down_proj."""
    blocks = {id(module): name for name, module in model.named_modules()}
    found = {}
    for _, _, module in mlp_output_projections(model):
        param = module.down_proj if is_expert_stack(module) else module.weight
        found[id(param)] = (blocks[id(module)], module)
    return found


class _MeanInput:
    """Forward pre-hook on a projection: sums its input channel ``col`` over every position of
    every call (float64), for the mean m_j."""

    def __init__(self, col: int):
        self.col, self.total, self.count = col, 0.0, 0

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        channel = args[0].detach()[..., self.col]
        self.total += float(channel.double().sum())
        self.count += channel.numel()

    @property
    def mean(self) -> float:
        return self.total / self.count


class _AddToChannels:
    """Forward hook on a projection: + ``shifts[row]`` on each output channel ``row`` at every
    position."""

    def __init__(self, shifts: dict[int, float]):
        self.shifts = shifts

    def __call__(self, module: torch.nn.Module, args: tuple, output):
        hidden = output[0] if isinstance(output, tuple) else output
        shifted = hidden.clone(memory_format=torch.contiguous_format)
        for row, value in self.shifts.items():
            shifted[..., row] += value
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted


def mean_inputs(model: torch.nn.Module, channels: dict[tuple[str, int], torch.nn.Module], calib_windows: torch.Tensor,
                batch_size: int) -> dict[tuple[str, int], float]:
    """(projection name, col) -> m_j, the mean of that projection's input channel ``col`` over
    every position of ``calib_windows`` in the unmodified model (``channels``: the same keys ->
    the projection module)."""
    means = {key: _MeanInput(key[1]) for key in channels}
    handles = [module.register_forward_pre_hook(means[key]) for key, module in channels.items()]
    device = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            for batch in batches(calib_windows, batch_size):
                decoder_hidden(model, batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {key: mean.mean for key, mean in means.items()}


class _ChannelTap:
    """Forward hook on an MLP output projection: records output channel ``row`` of each call
    (flattened over the output's leading dimensions) or, once ``massive`` is set, writes the
    recorded values back at the massive positions, call by call."""

    def __init__(self, row: int):
        self.row = row
        self.recorded: list[torch.Tensor] = []
        self.massive: list[torch.Tensor] | None = None
        self.call = 0

    def __call__(self, module: torch.nn.Module, args: tuple, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if self.massive is None:
            self.recorded.append(hidden[..., self.row].reshape(-1).detach().clone())
            return None
        values, massive = self.recorded[self.call], self.massive[self.call]
        self.call += 1
        restored = hidden.clone(memory_format=torch.contiguous_format)
        restored.view(-1, restored.shape[-1])[massive, self.row] = values[massive]
        return (restored, *output[1:]) if isinstance(output, tuple) else restored


@contextmanager
def _hooked(taps: list[tuple[torch.nn.Module, _ChannelTap]]):
    handles = [module.register_forward_hook(tap) for module, tap in taps]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def matched_control(model: torch.nn.Module, weights: pd.DataFrame) -> pd.DataFrame:
    """Per tensor of ``weights`` (tensor, flat_index; at least one row, n in that tensor), the
    n largest-|w| entries that are not among ``weights`` (equal |w| by lower flat index):
    columns tensor, flat_index, weight, tensors in first-seen order."""
    tensors = list(dict.fromkeys(weights["tensor"]))
    targets = {t.name: t for t in find_targets(model, include=[f"^{re.escape(split_expert(name)[0])}$"
                                                              for name in tensors])}
    parts = []
    for tensor in tensors:
        if tensor not in targets:
            raise ESAError(f"{tensor}: not a weight matrix of the model")
        target = targets[tensor]
        matrix = target.matrix(target_parameter(model, target).detach())
        magnitude = matrix.float().abs().reshape(-1).clone()  # Linear-convention flat order, a copy
        excluded = torch.tensor(weights.loc[weights["tensor"] == tensor, "flat_index"].to_numpy(np.int64),
                                device=magnitude.device)
        magnitude[excluded] = -1.0  # below every |w|
        n = len(excluded)
        # every entry at least as large as the n-th largest, then the n largest, ties by lower index
        tied = torch.nonzero(magnitude >= torch.topk(magnitude, n).values[-1]).squeeze(1)
        chosen = tied[torch.argsort(-magnitude[tied], stable=True)[:n]]
        parts.append(pd.DataFrame({"tensor": tensor, "flat_index": chosen.cpu().numpy().astype(np.int64),
                                   "weight": matrix.reshape(-1)[chosen].double().cpu().numpy()}))
    return pd.concat(parts, ignore_index=True)


def _projection_of(model: torch.nn.Module, projections: dict, tensor: str) -> tuple[str, torch.nn.Module] | None:
    """The MLP output projection (qualified name, module) whose matrix ``tensor`` is (an expert's
    key: the expert stack), None when it is none."""
    name, expert = split_expert(tensor)
    found = projections.get(id(model.get_parameter(name)))
    return found if found is not None and (expert >= 0) == is_expert_stack(found[1]) else None


def super_weight_mechanism(model: torch.nn.Module, super_weights: pd.DataFrame, eval_windows: torch.Tensor,
                           batch_size: int, baseline: Baseline, scales: list[float], massive_fraction: float,
                           calib_windows: torch.Tensor, groups: pd.DataFrame | None = None,
                           group_members: pd.DataFrame | None = None, chunk_size: int = DEFAULT_CHUNK,
                           bootstrap: Bootstrap = Bootstrap(), progress: bool = False) -> Mechanism:
    """The scale sweep, the massive-activation restore, the mean-contribution control (means
    over ``calib_windows``) and the matched-magnitude control of every confirmed weight of
    ``super_weights`` (confirm's table), and the mean-contribution control of every joint super
    weight of confirm's ``groups`` and ``group_members`` (None: no groups); see the module
    docstring.

    No confirmed weight and no joint one: empty tables, the model untouched.
    """
    if not 0 < massive_fraction <= 1:
        raise ESAError(f"mechanism.massive_fraction={massive_fraction}: must be in (0, 1]")
    weights = confirmed_weights(super_weights)
    joint = [] if groups is None else joint_super_weights(groups, group_members)
    if weights.empty and not joint:
        return Mechanism.of([], [], [], [])
    selections = [_selection(w.tensor, [w.flat_index]) for w in weights.itertuples(index=False)]
    starts = [first_changed_layer_of(model, selection) for selection in selections]
    joint_starts = [first_changed_layer_of(model, mine[WEIGHT_KEY]) for _, mine in joint]
    projections = _projections(model)
    every = pd.concat([weights, *(mine for _, mine in joint)], ignore_index=True)
    located = {tensor: _projection_of(model, projections, tensor) for tensor in every["tensor"].unique()}
    taps: dict[int, tuple[str, torch.nn.Module, _ChannelTap]] = {}  # weight i -> its projection's tap
    for i, w in enumerate(weights.itertuples(index=False)):
        if located[w.tensor] is not None:
            taps[i] = (*located[w.tensor], _ChannelTap(int(w.row)))
    # an expert's input is the tokens routed to it: no mean over every position to give back
    channels = {(located[w.tensor][0], int(w.col)): located[w.tensor][1] for w in every.itertuples(index=False)
                if located[w.tensor] is not None and not is_expert_stack(located[w.tensor][1])}
    means = mean_inputs(model, channels, calib_windows, batch_size)
    with _hooked([(module, tap) for _, module, tap in taps.values()]):  # the reference pass records
        meter = DamageMeter(model, eval_windows, batch_size, baseline, chunk_size, {*starts, *joint_starts},
                            bootstrap)

    # each weight zeroed, (tensor, flat_index) -> its damage: confirm's measurement of that very edit on
    # the same windows (the same bits), which serves as the sweep's scale 0, the restore's zeroed model
    # and, for a tensor's one super weight, the control's
    recorded = super_weights.drop_duplicates(WEIGHT_KEY).set_index(WEIGHT_KEY)
    zeroed_of = {key: ablation_damage(recorded.loc[key], baseline)
                 for key in weights[WEIGHT_KEY].itertuples(index=False, name=None)}
    sweep, restore = [], []
    for i, (w, selection, start) in enumerate(tqdm(list(zip(weights.itertuples(index=False), selections, starts)),
                                                   desc="mechanism", disable=not progress)):
        key = {"tensor": w.tensor, "flat_index": w.flat_index, "row": w.row, "col": w.col, "layer": w.layer,
               "weight": w.weight}
        zeroed = zeroed_of[w.tensor, w.flat_index]
        for scale in scales:
            if scale == 0:  # s = 0 writes exactly what confirm's zero ablation wrote
                measured = zeroed
            else:
                with perturbed(model, selection, SCALE, scale) as info:
                    measured = meter.measure(start) if info.n_changed else meter.unchanged()
            sweep.append({**key, "scale": float(scale), **measured})
        given = _mean_given_back(meter, selection, start, weights.iloc[[i]], located, means)
        restore.append({**key, "module": w.module, **_massive_activation_restore(
            meter, selection, start, taps.get(i), massive_fraction, zeroed), **_mean_columns(given, zeroed, baseline)})

    control = _matched_control_damage(meter, weights, zeroed_of) if not weights.empty else []
    joint_mean = []
    for (group, mine), start in zip(tqdm(joint, desc="joint mean", disable=not progress), joint_starts):
        # the minimal subset zeroed: confirm's measurement of that very edit
        zeroed = {"loss": group["minimal_loss"], "ppl": group["minimal_ppl"]}
        given = _mean_given_back(meter, mine[WEIGHT_KEY], start, mine, located, means)
        columns = _mean_columns(given, zeroed, baseline)
        joint_mean.append({
            "group": group["group"], "kind": group["kind"], "label": group["label"], "n_minimal": len(mine),
            "tensors": mine["tensor"].tolist(),
            **{plural: mine[column].astype(np.int64).tolist()
               for column, plural in (("flat_index", "flat_indices"), ("row", "rows"), ("col", "cols"))},
            "mean_inputs": given[0] if given else [], "loss_baseline": baseline.loss, "loss_zeroed": zeroed["loss"],
            "ppl_zeroed": zeroed["ppl"], **{c: columns[c] for c in ("loss_mean", "ppl_mean", "kl_mean",
                                                                     "mean_recovered")},
            "reason": "" if given else EXPERT_MEMBER})
    return Mechanism.of(sweep, restore, control, joint_mean)


def _matched_control_damage(meter: DamageMeter, weights: pd.DataFrame, zeroed_of: dict) -> list[dict]:
    """The control rows (``CONTROL_COLUMNS``): per tensor of ``weights`` (at least one), its
    super weights zeroed together, then its matched set; a set of one weight is ``zeroed_of``'s."""
    model, control = meter.model, []
    matched = matched_control(model, weights)
    for tensor, own in weights.groupby("tensor", sort=False):
        for name, chosen in ((SUPER_WEIGHTS, own), (MATCHED_CONTROL, matched[matched["tensor"] == tensor])):
            edit = _selection(tensor, chosen["flat_index"])
            measured = zeroed_of.get((tensor, edit["flat_index"].iloc[0])) if len(edit) == 1 else None
            if measured is None:
                measured = zeroed_damage(meter, edit)
            magnitude = chosen["weight"].abs()
            control.append({"tensor": tensor, "layer": own["layer"].iloc[0], "set": name, "n_weights": len(edit),
                            "flat_indices": edit["flat_index"].tolist(), "abs_min": magnitude.min(),
                            "abs_max": magnitude.max(), **measured})
    return control


def _recovered(zeroed: dict, loss: float, baseline_loss: float) -> float:
    """The share of the zeroing's damage (in loss) an edit gives back; NaN when zeroing changes
    nothing or both losses are infinite (nothing to apportion)."""
    damage = zeroed["loss"] - baseline_loss
    return (zeroed["loss"] - loss) / damage if damage else np.nan


def _mean_given_back(meter: DamageMeter, selection: pd.DataFrame, start: int, members: pd.DataFrame,
                     located: dict, means: dict) -> tuple[list[float], dict] | None:
    """``selection`` zeroed while each of ``members`` (tensor, row, col, weight) gives back
    w * m_j on its projection's output channel ``row`` at every position (the shifts of one
    channel summed): each member's m_j and the damage; None when a member has no mean (not an
    MLP output projection's weight, or an expert's)."""
    shifts: dict[str, tuple[torch.nn.Module, dict[int, float]]] = {}
    inputs = []
    for member in members.itertuples(index=False):
        found = located.get(member.tensor)
        if found is None or (found[0], int(member.col)) not in means:
            return None
        name, module = found
        inputs.append(means[name, int(member.col)])
        rows = shifts.setdefault(name, (module, {}))[1]
        rows[int(member.row)] = rows.get(int(member.row), 0.0) + member.weight * inputs[-1]
    with perturbed(meter.model, selection, ZERO), _hooked([(module, _AddToChannels(rows))
                                                           for module, rows in shifts.values()]):
        return inputs, meter.measure(start)


def _mean_columns(given: tuple[list[float], dict] | None, zeroed: dict, baseline: Baseline) -> dict:
    """The mean-contribution columns of one weight (module docstring) from
    :func:`_mean_given_back`'s result, NaN where it is None."""
    if given is None:
        return {"mean_input": np.nan, "loss_mean": np.nan, "ppl_mean": np.nan, "kl_mean": np.nan,
                "mean_recovered": np.nan}
    inputs, measured = given
    return {"mean_input": inputs[0], "loss_mean": measured["loss"], "ppl_mean": measured["ppl"],
            "kl_mean": measured["kl"], "mean_recovered": _recovered(zeroed, measured["loss"], baseline.loss)}


def _massive_activation_restore(meter: DamageMeter, selection: pd.DataFrame, start: int,
                                tap: tuple[str, torch.nn.Module, _ChannelTap] | None, massive_fraction: float,
                                zeroed: dict) -> dict:
    """The restore columns of one weight: zeroed (``zeroed``, the zeroed model's damage), then
    zeroed with its massive activation given back (``tap``: its projection's name, module and
    recorded channel; None: not an MLP output projection's weight)."""
    with perturbed(meter.model, selection, ZERO):
        row = {"loss_baseline": meter.baseline.loss, "loss_zeroed": zeroed["loss"], "ppl_zeroed": zeroed["ppl"],
               "kl_zeroed": zeroed["kl"]}
        if tap is None:
            return {**row, "projection": "", "positions": 0, "peak": np.nan, "loss_restored": np.nan,
                    "ppl_restored": np.nan, "kl_restored": np.nan, "recovered": np.nan, "reason": NOT_MLP_OUTPUT}
        projection, module, channel = tap
        peak = max(float(values.abs().max()) for values in channel.recorded)
        channel.massive = [values.abs() >= massive_fraction * peak for values in channel.recorded]
        positions = sum(int(massive.sum()) for massive in channel.massive)
        channel.call = 0
        try:
            with _hooked([(module, channel)]):
                restored = meter.measure(start)
        finally:
            channel.massive = None
    recovered = _recovered(zeroed, restored["loss"], meter.baseline.loss)
    return {**row, "projection": projection, "positions": positions, "peak": peak,
            "loss_restored": restored["loss"], "ppl_restored": restored["ppl"], "kl_restored": restored["kl"],
            "recovered": recovered, "reason": ""}

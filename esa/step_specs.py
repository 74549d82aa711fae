"""What each workflow step takes, typed: one frozen dataclass per step of
:data:`esa.step_table.STEPS`, with exactly the keys its rule sends as ``--spec`` (its
``<step>_spec`` in ``esa/specs.py``; ``ModelRun`` is ``runtime_spec``, ``Evaluation``
``evaluation_spec``). Torch-free: ``esa run`` parses the spec before it imports the step.

:func:`parse_spec` checks the JSON against the step's class before the step runs: a missing
key, an unknown key or a value of the wrong type ends as one ``esa: error: <step> spec: ...``
line and nothing is written. Types are JSON's: ``float`` takes an integer (YAML's ``2`` is a
number), ``int`` and ``float`` never take ``true``, a ``list[X]`` checks each item, and a
``dict`` is a block of settings passed through whole. A field with a default is a key the rule
may leave out; :meth:`Spec.as_dict` leaves it out again, so the dict a step records (manifest,
config.json) is the one the rule sent.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, dataclass, fields
from functools import cache

from .errors import ESAError


@dataclass(frozen=True, kw_only=True)
class Spec:
    def as_dict(self) -> dict:
        """The spec as the rule sent it: a field with a default is left out at its default."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.default is MISSING or getattr(self, f.name) != f.default}


@dataclass(frozen=True, kw_only=True)
class ModelRun(Spec):
    """Which model, where, in which precision, how the loss is chunked."""
    model: str
    device: str
    dtype: str
    attn_implementation: str
    loss_chunk: int
    device_map: str | None
    # sent only when on, so that turning it off keeps the results made before it existed
    deterministic: bool = False
    mixed_precision: str = "no"  # esa.precision, resolved; likewise sent only when not "no"
    # the hub commits (esa.revisions), sent only for a hub model or dataset
    model_revision: str | None = None
    data_revision: str | None = None


@dataclass(frozen=True, kw_only=True)
class Evaluation(ModelRun):
    """A step that measures damage against the baseline: its batches and dPPL intervals."""
    batch_size: int
    bootstrap: dict  # esa.damage.Bootstrap's keyword arguments


@dataclass(frozen=True, kw_only=True)
class ModelSpec(Spec):
    source: str
    revision: str | None = None  # a hub model's pinned commit (esa.revisions)


@dataclass(frozen=True, kw_only=True)
class DataSpec(Spec):
    model: str
    part: str
    source: str
    hf_config: str | None
    calib_split: str | None
    eval_split: str | None
    text_field: str
    eval_fraction: float
    seq_len: int
    eval_windows: int | None = None  # sent for the evaluation part only
    revision: str | None = None  # an hf: hub dataset's pinned commit (esa.revisions)


@dataclass(frozen=True, kw_only=True)
class BaselineSpec(ModelRun):
    batch_size: int
    data: dict  # the config's data block, recorded in config.json


@dataclass(frozen=True, kw_only=True)
class ScoresSpec(ModelRun):
    data: dict  # the calibration part's data spec
    metrics: list[str]
    seed: int
    max_samples: int
    batch_size: int
    probes: int | None
    weighting: str
    candidates: int
    targets: dict  # include / exclude patterns
    save_full_scores: bool
    gradient_checkpointing: bool
    layer_group: list[int]  # [g, G]: part g of G


@dataclass(frozen=True, kw_only=True)
class PerturbSpec(Evaluation):
    perturb: str
    scale: float
    noise: str
    controls: list[str]
    seeds: list[int]


@dataclass(frozen=True, kw_only=True)
class ConfirmSpec(Evaluation):
    metrics: list[str]
    seed: int
    top_n: int
    factor: float
    joint: dict  # esa.joint.JointSettings
    innocent: dict  # esa.null.NullSettings


@dataclass(frozen=True, kw_only=True)
class MechanismSpec(Evaluation):
    scales: list[float]
    massive_fraction: float
    calib_samples: int  # the calibration windows the confirm seed scored on: the mean contribution's
    calib_seed: int


@dataclass(frozen=True, kw_only=True)
class BehaviourSpec(ModelRun):
    batch_size: int
    prompts: list[str]
    max_new_tokens: int
    sink_windows: int | None
    experiments: list[dict]  # name, perturb, scale, noise, seed
    lm_eval: dict  # the config's behaviour.lm_eval, include_path absolute ([] or one), include_digest


@dataclass(frozen=True, kw_only=True)
class CulpritsSpec(Evaluation):
    experiment: str
    seed: int
    perturb: str
    scale: float
    factor: float
    budget: int
    min_group: int


@dataclass(frozen=True, kw_only=True)
class QuantizeSpec(Evaluation):
    schemes: list[dict]  # each {bits, group_size}
    protect: list[int | str]  # a count or a share like "0.1%"
    metrics: list[str]
    seed: int
    targets: dict


@dataclass(frozen=True, kw_only=True)
class MergeScoresSpec(Spec):
    metrics: list[str]
    layer_groups: int


@dataclass(frozen=True, kw_only=True)
class TopkSpec(Spec):
    mode: str
    k: int
    seed: int


@dataclass(frozen=True, kw_only=True)
class ProtectMaskSpec(Spec):
    metric: str
    k: int


@dataclass(frozen=True, kw_only=True)
class PlotsSpec(Spec):
    metric: str
    mode: str
    k: int
    seed: int


@dataclass(frozen=True, kw_only=True)
class ActivationPlotSpec(Spec):
    seed: int


@dataclass(frozen=True, kw_only=True)
class StabilitySpec(Spec):
    metric: str
    mode: str
    k: int
    seeds: list[int]


@dataclass(frozen=True, kw_only=True)
class AgreementSpec(Spec):
    mode: str
    k: int
    metrics: list[str]
    seeds: list[int]


@dataclass(frozen=True, kw_only=True)
class PublishedSpec(Spec):
    coordinates: list[dict]  # rows of esa.published.PUBLISHED_COLUMNS
    metrics: list[str]


@dataclass(frozen=True, kw_only=True)
class ReportSpec(Spec):
    model: str
    experiments: list[dict]  # name, metric, mode, k, seeds
    factor: float
    thresholds: dict  # the config's verdicts block


@dataclass(frozen=True, kw_only=True)
class ComparisonSpec(Spec):
    models: list[str]
    metrics: list[str]
    factor: float


SPECS: dict[str, type[Spec]] = {
    "model": ModelSpec,
    "data": DataSpec,
    "baseline": BaselineSpec,
    "scores": ScoresSpec,
    "perturb": PerturbSpec,
    "confirm": ConfirmSpec,
    "mechanism": MechanismSpec,
    "behaviour": BehaviourSpec,
    "culprits": CulpritsSpec,
    "quantize": QuantizeSpec,
    "merge_scores": MergeScoresSpec,
    "topk": TopkSpec,
    "protect_mask": ProtectMaskSpec,
    "plots": PlotsSpec,
    "activation_plot": ActivationPlotSpec,
    "stability": StabilitySpec,
    "agreement": AgreementSpec,
    "published": PublishedSpec,
    "report": ReportSpec,
    "comparison": ComparisonSpec,
}


@cache
def _types(cls: type[Spec]) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _fits(value, kind) -> bool:
    """Whether the JSON ``value`` is of the annotated ``kind``."""
    if isinstance(kind, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if kind is type(None):
        return value is None
    if kind in (int, float):  # bool is an int to Python, not to JSON
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _kind_name(kind) -> str:
    return str(kind) if typing.get_args(kind) else kind.__name__  # "int", "list[int]", "str | None"


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def typed_spec(step: str, spec: dict) -> Spec:
    """``spec`` (the decoded JSON) as ``step``'s spec class; ESAError naming the step and every
    key that is missing, unknown or of the wrong type."""
    cls = SPECS[step]
    if not isinstance(spec, dict):
        raise ESAError(f"{step} spec: expected a JSON object, got {_shown(spec)}")
    kinds = _types(cls)
    problems = [f"missing key {f.name!r}" for f in fields(cls) if f.default is MISSING and f.name not in spec]
    problems += [f"unknown key {key!r}" for key in spec if key not in kinds]
    problems += [f"key {key!r} must be {_kind_name(kinds[key])}, got {_shown(value)}"
                 for key, value in spec.items() if key in kinds and not _fits(value, kinds[key])]
    if problems:
        raise ESAError(f"{step} spec: {'; '.join(problems)}")
    return cls(**spec)


def parse_spec(step: str, text: str) -> Spec:
    """The ``--spec`` JSON of ``step`` as its spec class (:func:`typed_spec`)."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise ESAError(f"{step} spec: not JSON: {err}") from None
    return typed_spec(step, spec)

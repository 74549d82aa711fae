"""Loading and validating the workflow configuration against ``config/schema.yaml``.

A study's config is the user's config files as written, every key they leave out taking the
schema's default; the embedded default (``config/config.yaml``) applies only when no config
file is given at all. So a required key (``model``/``models``, ``data.source``) missing from
the user's file is an error naming it and the file, never the embedded default's value.

Beyond the schema, validation rejects what JSON schema cannot express: a number that is NaN
or infinite (NaN passes every ``minimum``), a ``scoring.targets`` pattern that is not a
regular expression, experiment names used twice, and a ``culprits`` entry that is not an
experiment perturbing with zero or sign_flip (or a ``culprits.seed`` that is not its seed).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import re
from pathlib import Path

import yaml

from .errors import ESAError
from .names import COMPARISON, CONTROLS, CULPRIT_PERTURBATIONS, RANDOM_K

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "config" / "schema.yaml"
DEFAULT_CONFIG = REPO / "config" / "config.yaml"


def validate_config(config: dict, origin: str = "") -> dict:
    """Validate ``config`` in place with Snakemake's validator (filling schema defaults).

    A violation becomes a one-line :class:`ESAError` naming the offending key and value, and
    ``origin`` (the config files it was read from) when given.
    """
    try:
        return _validate(config)
    except ESAError as err:
        raise ESAError(f"{err} (in {origin})" if origin else str(err)) from None


def _validate(config: dict) -> dict:
    from snakemake.utils import validate
    from snakemake_interface_common.exceptions import WorkflowError

    if "model" not in config and "models" not in config:
        raise ESAError("invalid config: model is required (or models, a list of them): {name, source} with "
                       "source a hub id, local directory, .gguf file or builtin:smollm2-135m")
    try:
        validate(config, str(SCHEMA))
    except WorkflowError as err:
        raise ESAError(_schema_error(str(err))) from None
    _check_finite(config)
    for key in ("include", "exclude"):
        for pattern in config["scoring"]["targets"][key]:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ESAError(f"invalid config at scoring.targets.{key}: {pattern!r} is not a "
                               f"regular expression ({err})") from None
    for key, names in (("experiments", [e["name"] for e in config["experiments"]]),
                       ("models", [m["name"] for m in study_models(config)])):
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ESAError(f"invalid config at {key}: names must be unique; repeated: {', '.join(repeated)}")
    if COMPARISON in (m["name"] for m in study_models(config)):
        raise ESAError(f"invalid config at models: {COMPARISON!r} is the comparison page's directory "
                       f"under results/; name the model otherwise")
    _check_culprits(config)
    _check_behaviour(config)
    return config


def _schema_error(text: str) -> str:
    """One line from Snakemake's validation message: the key, the value, and a hint where the
    cause is not what the schema's wording suggests."""
    reason = re.search(r"ValidationError: (.*)", text)
    where = re.search(r"On instance((?:\[[^\]]*\])*)", text)
    path = ".".join(re.findall(r"\['?([^'\]]*)'?\]", where.group(1))) if where else ""
    message = reason.group(1) if reason else text.splitlines()[0]
    required = re.fullmatch(r"'([^']+)' is a required property", message)
    if required:
        key = f"{path}.{required.group(1)}" if path else required.group(1)
        described = _description(key)
        return f"invalid config: {key} is required{': ' + described if described else ''}"
    number = re.fullmatch(r"'([^']+)' is not of type 'number'.*", message)
    if number and _is_float(number.group(1)):
        # PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent
        message += (f" (YAML reads {number.group(1)} as a string: write it with a dot and a signed "
                    f"exponent, e.g. {float(number.group(1)):.1e})")
    return f"invalid config{' at ' + path if path else ''}: {message}"


def _description(key: str) -> str:
    """The schema's description of the dotted ``key`` (list indices and ``$ref`` followed)."""
    node = load_schema()
    for part in key.split("."):
        if part.isdigit():
            node = node.get("items", {})
        else:
            node = node.get("properties", {}).get(part, {})
        if "$ref" in node:
            node = load_schema()["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node.get("description", "")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_culprits(config: dict) -> None:
    """Each ``culprits.experiments`` name is an experiment perturbing with zero or sign_flip,
    and a ``culprits.seed`` is one of its seeds."""
    allowed = {e["name"]: e.get("seeds", config["seeds"]) for e in config["experiments"]
               if e["perturb"] in CULPRIT_PERTURBATIONS}
    seed = config["culprits"]["seed"]
    for name in config["culprits"]["experiments"]:
        if name not in allowed:
            raise ESAError(f"invalid config at culprits.experiments: {name!r} is not an experiment with a "
                           f"{' or '.join(CULPRIT_PERTURBATIONS)} perturbation; allowed: "
                           f"{', '.join(allowed) or 'none'}")
        if seed is not None and seed not in allowed[name]:
            raise ESAError(f"invalid config at culprits.seed: {seed} is not a seed of experiment {name!r} "
                           f"(seeds {allowed[name]})")


def _check_behaviour(config: dict) -> None:
    """Each ``behaviour.experiments`` name is an experiment with a perturbation and a random_k
    control (the top set is read against it); ``behaviour.lm_eval.include_path`` is a directory."""
    allowed = [e["name"] for e in config["experiments"]
               if e["perturb"] is not None and RANDOM_K in e.get("controls", CONTROLS)]
    for name in config["behaviour"]["experiments"]:
        if name not in allowed:
            raise ESAError(f"invalid config at behaviour.experiments: {name!r} is not an experiment with a "
                           f"perturbation and a random_k control; allowed: {', '.join(allowed) or 'none'}")
    include = config["behaviour"]["lm_eval"]["include_path"]
    if include is not None and not Path(include).is_dir():
        raise ESAError(f"invalid config at behaviour.lm_eval.include_path: {include!r} is not a directory")


def study_models(config: dict) -> list[dict]:
    """The study's models (name, source): ``models`` when given (it replaces ``model``, which
    the default config always holds), else the one ``model``."""
    return config["models"] if "models" in config else [config["model"]]


@functools.cache
def load_schema() -> dict:
    """``config/schema.yaml``, parsed once."""
    return yaml.safe_load(SCHEMA.read_text())


def schema_defaults(section: str) -> dict:
    """``{key: default}`` of the top-level config ``section`` (an object of the schema), in
    schema order: the one place such defaults are written down."""
    properties = load_schema()["properties"]
    if section not in properties or "properties" not in properties[section]:
        raise ESAError(f"unknown config section {section!r}; allowed: "
                       f"{', '.join(k for k, v in properties.items() if 'properties' in v)}")
    return {key: copy.deepcopy(item["default"]) for key, item in properties[section]["properties"].items()
            if "default" in item}


def _check_finite(value, where: str = "", owner: str = "") -> None:
    """A NaN or infinite number anywhere in the config is an error naming its place."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}" if where else str(key), owner)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            named = where == "experiments" and isinstance(item, dict)
            _check_finite(item, f"{where}.{i}", f" (experiment {item.get('name')!r})" if named else owner)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ESAError(f"invalid config at {where}{owner}: {value} is not a finite number")


def deep_update(base: dict, overrides: dict) -> dict:
    """Recursively merge ``overrides`` into a copy of ``base`` (lists are replaced)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_update(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_config_file(path: str | Path) -> dict:
    """One YAML config file as a mapping; a syntax error names the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ESAError(f"config file {str(path)!r} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and start:
            problem += f" ({context} at line {start.line + 1}, column {start.column + 1})"
        raise ESAError(f"config file {str(path)!r} is not valid YAML:{at}: {problem}") from None
    if config is not None and not isinstance(config, dict):
        raise ESAError(f"config file {str(path)!r} must hold a mapping of keys, not a {type(config).__name__}")
    return config or {}


def study_config(given: dict, files: list[str]) -> dict:
    """The config a study runs with, validated: ``given`` (what Snakemake read from
    ``--configfile`` and ``--config``) as written when config files were given, otherwise the
    embedded default with ``given``'s ``--config`` values over it."""
    if files:
        return validate_config(copy.deepcopy(given), origin=", ".join(files))
    return validate_config(deep_update(read_config_file(DEFAULT_CONFIG), given), origin=str(DEFAULT_CONFIG))


def config_from_files(files: list[str]) -> dict:
    """The validated config of ``snakemake --configfile`` with ``files`` (later over earlier)."""
    return study_config(functools.reduce(deep_update, map(read_config_file, files), {}), files)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Read a YAML config (default: the embedded one) as written, apply overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    return validate_config(deep_update(read_config_file(path), overrides or {}), origin=str(path))


def config_hash(config: dict) -> str:
    """Stable short hash of a (sub)config, for manifests and cache keys."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]

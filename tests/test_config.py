"""Config validation beyond the schema: every error is one line naming the key and the value."""

import math

import pytest
import yaml

from esa.config import validate_config
from esa.errors import ESAError
from esa.runbook import phase_main


def _config(**extra) -> dict:
    return {"model": {"name": "m", "source": "builtin:smollm2-135m"},
            "data": {"source": "builtin:pydoc"}, **extra}


def _experiment(name: str, **extra) -> dict:
    return {"name": name, "metric": "grad_x_weight", "mode": "global", "topk": 10, **extra}


@pytest.mark.parametrize("key", ["include", "exclude"])
def test_invalid_target_regex_is_caught_at_validation(key):
    config = _config(scoring={"targets": {key: ["lm_head", "layers.(0|1"]}})
    with pytest.raises(ESAError) as err:
        validate_config(config)
    assert str(err.value) == (f"invalid config at scoring.targets.{key}: 'layers.(0|1' is not a "
                              f"regular expression (missing ), unterminated subpattern at position 7)")


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_non_finite_scale_names_the_experiment(scale):
    config = _config(experiments=[_experiment("fine"), _experiment("flip", perturb="sign_flip", scale=scale)])
    with pytest.raises(ESAError) as err:
        validate_config(config)
    assert str(err.value) == (f"invalid config at experiments.1.scale (experiment 'flip'): "
                              f"{scale} is not a finite number")


def test_non_finite_yaml_values_are_rejected_anywhere():
    """YAML's .nan passes every schema minimum (NaN compares false): the walk catches it."""
    config = yaml.safe_load("model: {name: m, source: x}\n"
                            "data: {source: builtin:pydoc, eval_fraction: .nan}\n")
    with pytest.raises(ESAError, match=r"^invalid config at data.eval_fraction: nan is not a finite number$"):
        validate_config(config)


def test_duplicate_experiment_names_are_named():
    config = _config(experiments=[_experiment("a"), _experiment("b"), _experiment("a", topk=5),
                                  _experiment("c"), _experiment("b", mode="per_layer")])
    with pytest.raises(ESAError) as err:
        validate_config(config)
    assert str(err.value) == "invalid config at experiments: names must be unique; repeated: a, b"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "big"])
def test_runbook_perturb_scale_must_be_finite(tmp_path, capsys, value):
    argv = ["--model", "builtin:smollm2-135m", "--metric", "grad_x_weight", "--mode", "global",
            "--topk", "5", "--perturb", "sign_flip", f"--perturb-scale={value}",
            "--out-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        phase_main(argv)
    assert exit_.value.code == 2
    kind = "a number" if value == "big" else "a finite number"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"phase1_runner_enhanced.py: error: argument --perturb-scale: {value!r} is not {kind}")
    assert not (tmp_path / "out").exists()

"""Config validation beyond the schema: every error is one line naming the key and the value."""

import math
import re

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


# ---- a user's config file is validated as written (issue 19) ------------------------------

def _dry_run(tmp_path, text: str, *configfiles):
    """`snakemake -n` with ``text`` as the user's config file (and ``configfiles`` before it)."""
    import subprocess
    import sys

    from conftest import REPO

    user = tmp_path / "my.yaml"
    user.write_text(text)
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n",
                           "--directory", str(tmp_path), "--configfile", *map(str, configfiles), str(user)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)


@pytest.mark.parametrize("text, line", [
    ("model: {name: tiny}\ndata: {source: builtin:pydoc}\n",
     "invalid config: model.source is required: hub id, local directory, .gguf file, or builtin:smollm2-135m"),
    ("model: {name: tiny, source: builtin:smollm2-135m}\ndata: {seq_len: 32}\n",
     "invalid config: data.source is required: hf:NAME, a .txt/.jsonl/.json/.parquet/.csv file, or builtin:pydoc"),
    ("data: {source: builtin:pydoc}\n",
     "invalid config: model is required (or models, a list of them): {name, source} with source a hub id, "
     "local directory, .gguf file or builtin:smollm2-135m"),
    ("models: [{name: tiny}]\ndata: {source: builtin:pydoc}\n",
     "invalid config: models.0.source is required: hub id, local directory, .gguf file, or builtin:smollm2-135m"),
])
def test_a_required_key_missing_from_the_users_file_is_named_with_the_file(tmp_path, text, line):
    """Before: the embedded default's model and data silently filled them in."""
    result = _dry_run(tmp_path, text)
    assert result.returncode != 0
    assert f"{line} (in {tmp_path / 'my.yaml'})" in result.stdout.splitlines()
    assert not (tmp_path / "results").exists()


def test_keys_left_out_take_the_schema_default_not_the_embedded_config():
    """config/config.yaml sizes the default study; a user's file gets the schema's defaults."""
    from esa.config import schema_defaults, study_config

    config = study_config(_config(), ["my.yaml"])
    assert config["experiments"] == []
    assert config["scoring"]["max_samples"] == schema_defaults("scoring")["max_samples"] == 16
    embedded = study_config({}, [])
    assert embedded["model"]["source"] == "builtin:smollm2-135m" and len(embedded["experiments"]) == 7
    assert embedded["scoring"]["max_samples"] == 8
    assert study_config({"seeds": [4]}, [])["seeds"] == [4]  # --config alone goes over the embedded default


@pytest.mark.parametrize("layer, jobs", [("beyond.yaml", {"quantize": 1, "culprits": 1, "perturb": 1}),
                                         ("full.yaml", {"quantize": 1, "culprits": 1, "perturb": 4})])
def test_layered_config_files_merge_like_the_readme_says(tmp_path, layer, jobs):
    """config/beyond.yaml and config/full.yaml are laid over the embedded default by naming both
    (the default runs two of the runbook's four perturbation experiments, full.yaml all four)."""
    from conftest import REPO

    result = _dry_run(tmp_path, (REPO / "config" / layer).read_text(), REPO / "config" / "config.yaml")
    assert result.returncode == 0, result.stdout[-2000:]
    for rule, count in jobs.items():
        assert re.search(rf"^{rule} +{count}$", result.stdout, re.M), rule


def test_duplicate_seeds_are_rejected_at_config_time():
    """Before: `seeds: [0, 0]` passed and perturb failed later with an internal message."""
    for config, line in ((_config(seeds=[0, 0]), "invalid config at seeds: [0, 0] has non-unique elements"),
                         (_config(experiments=[_experiment("a", seeds=[1, 2, 1])]),
                          "invalid config at experiments.0.seeds: [1, 2, 1] has non-unique elements")):
        with pytest.raises(ESAError) as err:
            validate_config(config)
        assert str(err.value) == line


def test_a_yaml_exponent_without_a_dot_gets_the_hint():
    config = _config(experiments=[_experiment("flip", perturb="sign_flip", scale=yaml.safe_load("1e30"))])
    with pytest.raises(ESAError) as err:
        validate_config(config, origin="my.yaml")
    assert str(err.value) == ("invalid config at experiments.0.scale: '1e30' is not of type 'number' (YAML reads "
                              "1e30 as a string: write it with a dot and a signed exponent, e.g. 1.0e+30) (in my.yaml)")


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    from esa.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: x\n  source: [a\nseeds: 1\n")
    assert main(["check", str(bad)]) == 2
    assert capsys.readouterr().err == (f"esa: error: config file {str(bad)!r} is not valid YAML: line 4, column 6: "
                                       f"expected ',' or ']', but got ':' (while parsing a flow sequence at line 3, "
                                       f"column 11)\n")
    good = tmp_path / "good.yaml"
    good.write_text("model: {name: tiny, source: builtin:smollm2-135m}\ndata: {source: builtin:pydoc}\nseeds: [3]\n")
    assert main(["check", str(good)]) == 0
    assert capsys.readouterr().out == "config ok: models tiny; 0 experiments; seeds [3]\n"

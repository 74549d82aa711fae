"""Typed step specs (esa.step_specs): one class per step of the step table, every spec the rules
send parses, and a missing, unknown or wrong-typed key is one `esa: error:` line before the step
writes anything."""

import ast
import json
import shlex
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, study_layout
from test_io import _topk_argv

from esa.provenance import module_path
from esa.step_specs import SPECS, parse_spec
from esa.step_table import STEPS


def test_every_step_has_its_spec_class_and_takes_it():
    assert set(SPECS) == set(STEPS)
    for name, step in STEPS.items():
        tree = ast.parse(module_path(step.module).read_text())
        function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == f"step_{name}")
        assert ast.unparse(function.args.args[0].annotation) == SPECS[name].__name__, name


def _esa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "esa", *args], capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize("spec, error", [
    ({"mode": "global", "k": 2}, "topk spec: missing key 'seed'"),
    ({"mode": "global", "k": "2", "seed": 0}, 'topk spec: key \'k\' must be int, got "2"'),
    ({"mode": "global", "k": True, "seed": 0}, "topk spec: key 'k' must be int, got true"),
    ({"mode": "global", "k": 2, "seed": 0, "sed": 1}, "topk spec: unknown key 'sed'"),
    ({"mode": "global", "k": 2, "sed": 0}, "topk spec: missing key 'seed'; unknown key 'sed'"),
    ([2], "topk spec: expected a JSON object, got [2]"),
], ids=["missing", "wrong type", "bool for int", "unknown", "misspelt", "not an object"])
def test_bad_spec_is_one_error_line_and_writes_nothing(tmp_path, spec, error):
    mask = tmp_path / "out/mask.parquet"
    argv = _topk_argv(tmp_path, mask)
    argv[argv.index("--spec") + 1] = json.dumps(spec)
    result = _esa(*argv)
    assert (result.returncode, result.stderr) == (2, f"esa: error: {error}\n")
    assert not mask.exists() and not mask.parent.exists()


def test_the_same_inputs_with_a_good_spec_write_the_mask(tmp_path):
    mask = tmp_path / "out/mask.parquet"
    result = _esa(*_topk_argv(tmp_path, mask))
    assert result.returncode == 0, result.stderr
    assert mask.exists()


# a real baseline spec (rules/baseline.smk), as the default config sends it
BASELINE = {"model": "builtin:smollm2-135m", "device": "cpu", "dtype": "fp32", "attn_implementation": "auto",
            "loss_chunk": 256, "device_map": None, "batch_size": 4, "data": {"source": "builtin:pydoc"}}


@pytest.mark.parametrize("change, error", [
    ({"deterministic": "yes"}, 'baseline spec: key \'deterministic\' must be bool, got "yes"'),
    ({"device_map": 0}, "baseline spec: key 'device_map' must be str | None, got 0"),
    ({"loss_chunk": None}, "baseline spec: key 'loss_chunk' must be int, got null"),
    ({"data": None, "batch_size": 4.0}, "baseline spec: key 'batch_size' must be int, got 4.0; "
                                        "key 'data' must be dict, got null"),
])
def test_a_model_step_stops_before_loading_anything(tmp_path, change, error):
    outputs = [f"{name}={tmp_path / name}" for name in ("metrics", "windows", "manifest", "config")]
    result = _esa("run", "baseline", "--spec", json.dumps({**BASELINE, **change}), f"model={tmp_path / 'model.json'}",
                  f"eval={tmp_path / 'eval.parquet'}", *outputs)
    assert (result.returncode, result.stderr) == (2, f"esa: error: {error}\n")
    assert list(tmp_path.iterdir()) == []


def test_a_default_is_left_out_of_the_recorded_spec():
    """deterministic is sent only when on: the dict a step records is the one the rule sent."""
    assert "deterministic" not in parse_spec("baseline", json.dumps(BASELINE)).as_dict()
    on = parse_spec("baseline", json.dumps({**BASELINE, "deterministic": True}))
    assert on.deterministic is True and on.as_dict() == {**BASELINE, "deterministic": True}
    assert parse_spec("data", json.dumps({
        "model": "m", "part": "calib", "source": "s", "hf_config": None, "calib_split": "train", "eval_split": None,
        "text_field": "text", "eval_fraction": 0.2, "seq_len": 8})).eval_windows is None


def _dry_run_specs(workdir, *args: str) -> list[tuple[str, str]]:
    """(step, --spec JSON) of every `esa run` command a `snakemake -n -p` in ``workdir`` prints."""
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                             "--directory", str(workdir), "--cores", "1", "-n", "-p", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    specs = []
    for line in result.stdout.splitlines():
        if " -m esa run " in line:
            argv = shlex.split(line.split("; ", 1)[-1].split(" 2> ")[0])
            specs.append((argv[argv.index("run") + 1], argv[argv.index("--spec") + 1]))
    return specs


def _every_step_config(workdir) -> dict:
    """A study that runs every step: two models (a comparison), one with published coordinates,
    layer groups (merge_scores), deterministic kernels, quantize, culprits and the mechanism."""
    (workdir / "published.csv").write_text("model,layer,tensor,row,col,source\n"
                                           "esa-test/tiny,0,model.layers.0.mlp.down_proj.weight,3,5,test\n")
    return {
        "models": [{"name": "tiny", "source": "tiny", "published_as": "esa-test/tiny"},
                   {"name": "other", "source": "builtin:smollm2-135m"}],
        "device": "cpu", "deterministic": True, "data": {"source": "builtin:pydoc", "seq_len": 32, "eval_windows": 4},
        "seeds": [0, 1],
        "scoring": {"max_samples": 4, "layer_groups": 2, "hutchinson": {"max_samples": 3}},
        "experiments": [
            {"name": "gxw", "metric": "grad_x_weight", "mode": "per_layer", "topk": 20, "perturb": "sign_flip",
             "scale": 1},
            {"name": "act", "metric": "activation_magnitude", "mode": "per_tensor", "topk": 5},
            {"name": "hutch", "metric": "hutchinson_diag", "mode": "global", "topk": 30, "perturb": "zero",
             "controls": ["random_k"]}],
        "published": {"extra_table": str(workdir / "published.csv")},
        "quantize": {"schemes": [{"bits": 3, "group_size": 16}, {"bits": 4}], "protect": [1, "0.1%"]},
        "culprits": {"experiments": ["hutch"]},
        "mechanism": {"enabled": True},
        "behaviour": {"enabled": True},
        "confirm": {"factor": 2},
    }


@pytest.mark.parametrize("study", ["default", "every step"])
def test_every_spec_a_dry_run_prints_parses(tmp_path, offline_hub, study):
    """The embedded default config (no --configfile), and a tiny study that runs every step
    (protect_mask asked for by name): each spec parses and records as it was sent."""
    if study == "default":
        specs = _dry_run_specs(tmp_path)
    else:
        config = tmp_path / "config.yaml"
        offline_hub("tiny", "c" * 40)  # its source is a hub id: the specs carry its pinned commit
        every_step = _every_step_config(tmp_path)
        config.write_text(yaml.safe_dump(every_step))
        protect = study_layout(every_step, "tiny").protect_mask_files("grad_x_weight", 5)["mask"]
        specs = _dry_run_specs(tmp_path, "all", protect, "--configfile", str(config))
        assert {step for step, _ in specs} == set(STEPS)
    assert len(specs) > 40
    for step, text in specs:
        assert parse_spec(step, text).as_dict() == json.loads(text), step

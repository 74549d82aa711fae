"""The metric registry (esa.metrics): torch-free names whose code loads on use, one module per
metric, each scores job's code version its own metrics' code, and the schema's enums equal to it."""

import subprocess
import sys
import types

import pytest
import torch
import yaml
from conftest import REPO, make_tiny_llama, unigram_text

from esa import metrics as registry
from esa import provenance
from esa.metrics import METRICS, REGISTRY, SCORE_JOBS, MetricEntry, implementation_roots
from esa.scores import compute_scores
from esa.targets import find_targets, target_parameter


def test_the_schema_enums_list_the_registry_metrics():
    """A new metric's entry and the schema's enums cannot drift apart."""
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    experiment = schema["properties"]["experiments"]["items"]["properties"]["metric"]["enum"]
    enums = [experiment] + [node["enum"] for node in _find(schema, "enum")
                            if "grad_x_weight" in node["enum"] and node["enum"] is not experiment]
    assert len(enums) == 2  # experiments[].metric, and the second list of metrics
    for enum in enums:
        assert sorted(enum) == sorted(METRICS)
    scoring = schema["properties"]["scoring"]["properties"]
    for entry in REGISTRY.values():  # a metric's own block of settings exists
        assert entry.settings is None or scoring[entry.settings]["type"] == "object"


def _find(node, key):
    if isinstance(node, dict):
        if key in node:
            yield node
        for value in node.values():
            yield from _find(value, key)
    elif isinstance(node, list):
        for value in node:
            yield from _find(value, key)


def test_the_registry_loads_no_torch():
    code = ("import sys, esa.metrics, esa.names, esa.layout; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_each_entry_loads_its_module_and_the_jobs_partition_the_metrics():
    assert METRICS == ("grad_x_weight", "grad_squared", "hutchinson_diag", "activation_magnitude")
    assert SCORE_JOBS == {"gradients": ("grad_x_weight", "grad_squared"), "hutchinson": ("hutchinson_diag",),
                          "activations": ("activation_magnitude",)}
    for name, entry in REGISTRY.items():
        metric = registry.load(name)
        assert entry.root == (f"esa.metrics.{name}", "METRIC")
        assert callable(metric.formula) and callable(metric.compute)
    # the gradient metrics share one pass, activation_magnitude has its own
    passes = {name: registry.load(name).compute for name in METRICS}
    assert passes["grad_x_weight"] is passes["grad_squared"] is passes["hutchinson_diag"]
    assert passes["activation_magnitude"] is not passes["grad_x_weight"]


def test_each_scores_job_version_holds_its_own_metrics_code_only():
    """Before: the three scores jobs shared one code version, so a Hutchinson fix rescored
    activation_magnitude."""
    modules = {job: {m for m, name in provenance.step_definitions("scores", implementation_roots(metrics)) if name}
               for job, metrics in SCORE_JOBS.items()}
    assert "esa.metrics.hutchinson_diag" in modules["hutchinson"]
    assert "esa.metrics.hutchinson_diag" not in modules["gradients"] | modules["activations"]
    assert {"esa.metrics.grad_x_weight", "esa.metrics.grad_squared"} <= modules["gradients"]
    assert "esa.metrics.gradient_pass" not in modules["activations"]
    assert "esa.activation_trace" in modules["activations"] and "esa.activation_trace" not in modules["gradients"]
    versions = {job: provenance.code_version("scores", implementation_roots(m)) for job, m in SCORE_JOBS.items()}
    assert len(set(versions.values())) == 3


def _weight_magnitude_pass(model, targets, params, windows, metrics, *, seed, probes, chunk_size, progress):
    """A pass that reads no data: stat 1 everywhere, so the product score is |w|."""
    return {name: {"stat": {t.name: torch.ones(t.rows, t.cols) for t in targets}, "extra": {}} for name in metrics}


def test_a_new_metric_is_one_module_and_one_entry(monkeypatch):
    """A metric module written outside esa (here built in the test) and one registry entry:
    compute_scores runs it beside a built-in metric, with its own formula."""
    module = types.ModuleType("weight_magnitude")

    class WeightMagnitude:
        compute = staticmethod(_weight_magnitude_pass)

        @staticmethod
        def formula(stat, w):
            return w.abs().mul_(stat)

    module.METRIC = WeightMagnitude()
    monkeypatch.setitem(sys.modules, "weight_magnitude", module)
    monkeypatch.setitem(REGISTRY, "weight_magnitude", MetricEntry(
        "weight_magnitude", "weights", "weight_magnitude:METRIC", gradient=False))
    monkeypatch.setattr(registry, "METRICS", tuple(REGISTRY))
    model = make_tiny_llama()
    targets = find_targets(model)
    windows = unigram_text(2, seed=0, length=16)
    result = compute_scores(model, targets, windows, ["weight_magnitude", "grad_x_weight"], 2, 0, progress=False)
    for t in targets:
        w = t.matrix(target_parameter(model, t).detach()).float()
        assert torch.equal(result["weight_magnitude"].score[t.name], w.abs())
    reference = compute_scores(model, targets, windows, ["grad_x_weight"], 2, 0, progress=False)
    assert all(torch.equal(result["grad_x_weight"].stat[n], reference["grad_x_weight"].stat[n])
               for n in reference["grad_x_weight"].stat)


def test_an_unknown_metric_is_one_line_naming_the_allowed():
    from esa.errors import ESAError

    model = make_tiny_llama()
    with pytest.raises(ESAError, match=r"^unknown metric 'fisher'; allowed: grad_x_weight, grad_squared, "
                                       r"hutchinson_diag, activation_magnitude$"):
        compute_scores(model, find_targets(model), unigram_text(2, seed=0, length=16), ["fisher"], 2, 0)

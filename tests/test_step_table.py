"""One step table (esa.step_table): `esa run`, the rules' resources, the GPU requests, the code
versions and the schema's resources keys all derive from it, and agree with the code."""

import re

import yaml
from conftest import REPO

from esa import provenance
from esa.cli import build_parser
from esa.step_table import GPU_STEPS, STEPS, TABLE_STEPS


def test_each_step_is_defined_in_its_module():
    for name, step in STEPS.items():
        assert f"step_{name}" in provenance._index(step.module).definitions, name
    assert set(TABLE_STEPS) == {name for name, step in STEPS.items() if step.module == "esa.steps"}
    assert GPU_STEPS == ("baseline", "scores", "perturb", "confirm", "mechanism", "behaviour", "culprits", "quantize")


def test_every_step_has_its_own_resources_key_in_the_schema():
    """Before: five rules borrowed another rule's key, so `resources: {agreement: ...}` was
    rejected as an unknown key."""
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    assert set(schema["properties"]["resources"]["properties"]) == {"default", *STEPS}


def _rules() -> dict[str, dict[str, set[str]]]:
    """Each rule of rules/*.smk: the steps its shell runs and the keys its threads/resources read."""
    found = {}
    for path in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=\s*rule[ :])", path.read_text()):
            head = re.match(r"\s*rule (\w+):", block) or re.search(r'name:\s*f"(\w+)_\{job\}"', block)
            if head:
                found[head.group(1)] = {
                    "shell": set(re.findall(r'esa_shell\("(\w+)"\)', block)),
                    "keys": set(re.findall(r'(?:threads|res)\("(\w+)"\)', block))}
    return found


def test_every_rule_asks_resources_under_the_step_it_runs():
    rules = _rules()
    runs = {rule: parts for rule, parts in rules.items() if parts["shell"]}
    assert {step for parts in runs.values() for step in parts["shell"]} == set(STEPS)
    for rule, parts in runs.items():
        assert parts["keys"] == parts["shell"] and len(parts["shell"]) == 1, rule


def test_esa_run_accepts_exactly_the_steps():
    run = next(action for action in build_parser()._subparsers._group_actions[0].choices["run"]._actions
               if action.dest == "step")
    assert sorted(run.choices) == sorted(STEPS)

"""envs/esa.yaml, the rules' environment under `snakemake --use-conda`, declares what the project
installs: CI has no conda to build it, so this test keeps the two from drifting apart."""

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _by_name(requirements) -> dict[str, str]:
    return {Requirement(r).name: str(Requirement(r)) for r in requirements}


def test_conda_env_pins_what_the_project_declares():
    """Its pip packages are pyproject.toml's dependencies with their pins, torch pinned as
    scripts/install.sh pins it; its Python satisfies requires-python."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "envs/esa.yaml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = [p for d in env["dependencies"] if isinstance(d, dict) for p in d["pip"]]
    torch = re.search(r"TORCH_SPEC:-([^}]+)}", (REPO / "scripts/install.sh").read_text()).group(1)

    assert _by_name(pip) == {**_by_name(project["dependencies"]), "torch": torch}
    python = [d.split("=", 1)[1] for d in conda if d.startswith("python=")]
    assert len(python) == 1 and Version(python[0]) in SpecifierSet(project["requires-python"])
    assert sorted(conda) == ["pip", f"python={python[0]}"]

"""The runbook's command lines, run through the same Snakemake DAG as the workflow.

Each runbook script turns its flags into config overrides, writes the resolved config next
to its outputs, runs Snakemake on the project's Snakefile (so results are cached and shared
with every other run), and copies the files the runbook promises into ``--out-dir``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .config import REPO, load_config
from .errors import ESAError
from .models import resolve_device


def model_name(source: str) -> str:
    """A results/ directory name for a model source: the builtin's name, a path's stem, or the hub id."""
    if source.startswith("builtin:"):
        return source.split(":", 1)[1]
    if source.startswith((".", "/", "~")) or Path(source).exists():
        return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).stem)
    return re.sub(r"[^A-Za-z0-9._-]+", "--", source)


def resolve(overrides: dict, base_config: str | None) -> dict:
    """The validated config a runbook command runs with; fails early on a missing GPU."""
    config = load_config(base_config, overrides)
    resolve_device(config["device"])
    return config


def run_workflow(config: dict, targets: list[str], out_dir: Path, cores: int, workdir: Path) -> None:
    """Run the project's Snakefile in ``workdir`` on ``targets``; raise ESAError if it fails."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "esa_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(config_path.resolve()),
           "--cores", str(cores), "--rerun-incomplete", *targets]
    result = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise ESAError(f"the workflow failed: {_last_step_error(workdir)}")


def _last_step_error(workdir: Path) -> str:
    """The one-line error of the most recently failed step, from its log."""
    logs = sorted((workdir / "logs").rglob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    for log in logs:
        errors = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("esa: error: ")]
        if errors:
            return f"{errors[-1][len('esa: error: '):]} (log: {log})"
    return f"see the Snakemake output above and logs/ under {workdir}"


def copy_outputs(files: dict[str, str], workdir: Path, out_dir: Path) -> None:
    """Copy workflow outputs (paths relative to ``workdir``) into ``out_dir`` under new names."""
    for name, source in files.items():
        shutil.copyfile(workdir / source, out_dir / name)

"""The runbook's command lines, run through the same Snakemake DAG as the workflow.

Each runbook script turns its flags into config overrides, writes the resolved config next
to its outputs, runs Snakemake on the project's Snakefile (so results are cached and shared
with every other run), and copies the files the runbook promises into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .config import REPO, load_config
from .errors import ESAError
from .layout import Layout
from .models import resolve_device
from .metrics import METRICS, REGISTRY
from .names import CONTROLS, END_TOP, MODES, PERTURBATIONS, TOP


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


def _finite_float(text: str) -> float:
    """argparse type of a finite number: NaN or infinity would silently remove the verdicts."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def phase_parser() -> argparse.ArgumentParser:
    """Flags of the runbook's ``phase1_runner_enhanced.py`` (Phases 2 and 3)."""
    parser = argparse.ArgumentParser(
        prog="phase1_runner_enhanced.py",
        description="Runbook Phases 2-3: score weights, select the top-k, optionally perturb them "
                    "against controls, through the ESA Snakemake DAG (cached, shared with every run).")
    parser.add_argument("--model", required=True, help="hub id, local directory, .gguf file or builtin:smollm2-135m")
    parser.add_argument("--metric", required=True, choices=METRICS, help="sensitivity metric")
    parser.add_argument("--mode", required=True, choices=MODES,
                        help="top-k over all targets, per decoder layer, or per tensor")
    parser.add_argument("--topk", required=True, type=int, help="k of the top-k (and of each control)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="calibration windows each seed draws (default: the config's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--save-plots", action="store_true", help="write the distribution/hotspot plots")
    parser.add_argument("--out-dir", required=True, type=Path, help="where the run's files are gathered")
    parser.add_argument("--perturb", choices=PERTURBATIONS, default=None, help="Phase 3 perturbation of the top-k")
    parser.add_argument("--perturb-scale", type=_finite_float, default=1.0,
                        help="sign_flip factor or gaussian noise scale (a finite number)")
    parser.add_argument("--controls", default=",".join(CONTROLS),
                        help=f"comma-separated controls, from: {', '.join(CONTROLS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--stability-check", action="store_true", help="Jaccard/Spearman of the top-k across seeds")
    parser.add_argument("--config", default=None, help="base config (default: config/config.yaml)")
    parser.add_argument("--cores", type=int, default=1, help="Snakemake --cores")
    parser.add_argument("--workdir", type=Path, default=REPO, help="Snakemake working directory (default: the project)")
    return parser


def _csv(text: str, allowed: tuple[str, ...] | None, what: str, cast=str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        if allowed is not None and item not in allowed:
            raise ESAError(f"unknown {what} {item!r}; allowed: {', '.join(allowed)}")
    try:
        return [cast(item) for item in items]
    except ValueError:
        raise ESAError(f"{what}s must be integers, got {text!r}") from None


def phase_config(args) -> tuple[dict, str]:
    """The resolved config and experiment name of a ``phase1_runner_enhanced.py`` command."""
    seeds = _csv(args.seeds, None, "seed", int)
    if not seeds:
        raise ESAError("--seeds needs at least one seed")
    if args.stability_check and len(seeds) < 2:
        raise ESAError(f"--stability-check compares seeds and needs at least two, got --seeds {args.seeds}")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", args.out_dir.name).strip("-.") or "experiment"
    experiment = {"name": name, "metric": args.metric, "mode": args.mode, "topk": args.topk, "seeds": seeds,
                  "perturb": args.perturb, "scale": args.perturb_scale,
                  "controls": _csv(args.controls, CONTROLS, "control"), "stability_check": args.stability_check}
    # one phase command runs its phase only: not the analyses beyond the runbook of the config below it
    overrides = {"model": {"name": model_name(args.model), "source": args.model}, "device": args.device,
                 "plots": args.save_plots, "experiments": [experiment], "quantize": {"schemes": []},
                 "culprits": {"experiments": []}, "mechanism": {"enabled": False}}
    if args.max_samples is not None:
        own = REGISTRY[args.metric].settings  # a metric's own block overrides scoring.max_samples
        overrides["scoring"] = {own: {"max_samples": args.max_samples}} if own else {"max_samples": args.max_samples}
    config = resolve(overrides, args.config)
    config["scoring"]["candidates"] = max(config["scoring"]["candidates"], args.topk)
    return config, name


def gather_phase_outputs(config: dict, name: str, workdir: Path, out_dir: Path, argv: list[str]) -> None:
    """Lay out ``out_dir``: config, manifest, the Parquet files, top_weights.csv and plots."""
    import json

    from .io import read_parquet, write_json_atomic

    layout = Layout(config).of(config["model"]["name"])
    e = layout.experiments[name]
    files = layout.experiment_files(name)
    manifests = {}
    for seed, scores in files["scores"].items():
        for part in ("candidates", "stats"):
            shutil.copyfile(workdir / scores[part], out_dir / f"{part}_seed{seed}.parquet")
        manifests[f"scores_seed{seed}"] = json.loads((workdir / scores["manifest"]).read_text())
    for seed, mask in files["masks"].items():
        shutil.copyfile(workdir / mask, out_dir / f"mask_seed{seed}.parquet")
    if "perturb" in files:
        shutil.copyfile(workdir / files["perturb"]["results"], out_dir / "perturb_results.parquet")
        manifests["perturb"] = json.loads((workdir / files["perturb"]["manifest"]).read_text())
    if "stability" in files:
        shutil.copyfile(workdir / files["stability"]["pairs"], out_dir / "stability_pairs.parquet")
        shutil.copyfile(workdir / files["stability"]["summary"], out_dir / "stability.json")
    for plot in files.get("plots", []):
        (out_dir / "plots").mkdir(exist_ok=True)
        shutil.copyfile(workdir / plot, out_dir / "plots" / Path(plot).name)
    first = e["seeds"][0]
    mask = read_parquet(workdir / files["masks"][first])
    candidates = read_parquet(workdir / files["scores"][first]["candidates"])
    top = mask[mask["set"] == TOP].drop(columns=["set"]).merge(
        candidates[candidates["end"] == END_TOP][["tensor", "flat_index", "weight", "stat"]],
        on=["tensor", "flat_index"], how="left")
    top.sort_values("score", ascending=False, kind="stable").assign(seed=first).to_csv(
        out_dir / "top_weights.csv", index=False)
    write_json_atomic(config, out_dir / "config.json")
    write_json_atomic({"command": ["phase1_runner_enhanced.py", *argv], "experiment": e,
                       "baseline": json.loads((workdir / layout.baseline_files()["metrics"]).read_text()),
                       "steps": manifests}, out_dir / "experiment_manifest.json")


def phase_main(argv: list[str] | None = None) -> int:
    args = phase_parser().parse_args(argv)
    try:
        config, name = phase_config(args)
        files = Layout(config).of(config["model"]["name"]).experiment_targets(name)
        run_workflow(config, files, args.out_dir, args.cores, args.workdir)
        gather_phase_outputs(config, name, args.workdir, args.out_dir, list(argv if argv is not None else sys.argv[1:]))
    except ESAError as err:
        print(f"phase1_runner_enhanced: error: {err}", file=sys.stderr)
        return 2
    print(f"experiment {name} written to {args.out_dir}")
    return 0

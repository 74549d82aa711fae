"""The ``esa`` command: ``esa run STEP --spec JSON name=path ...`` runs one workflow step.

Snakemake rules call this; bad input ends with a one-line ``esa: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import ESAError
from .heap import keep_freed_memory
from .step_specs import parse_spec
from .step_table import STEPS


def step_function(step: str):
    """The function ``step_<step>`` of the module that holds it, imported on demand."""
    import importlib

    module = importlib.import_module(STEPS[step].module)
    return getattr(module, f"step_{step}")


def _paths(items: list[str]) -> dict:
    """``name=path`` items as the step's keyword arguments; ``masks/0=...`` nests (esa.layout)."""
    from .layout import nest_paths

    flat = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ESAError(f"expected name=path, got {item!r}")
        if name in flat:
            raise ESAError(f"path name {name!r} given twice")
        flat[name] = path
    return nest_paths(flat)


def check_configs(files: list[str]) -> str:
    """Validate config files as ``snakemake --configfile`` merges them; one line on the study.
    Unlike Snakemake, which reads the files before ESA runs, a YAML error names its line."""
    from .config import config_from_files, study_models

    config = config_from_files(files)
    models = ", ".join(m["name"] for m in study_models(config))
    return f"config ok: models {models}; {len(config['experiments'])} experiments; seeds {config['seeds']}"


def job_paths(step: str, items: list[str], files: list[str], model: str | None) -> list[str]:
    """The output paths of one job of ``step`` under the config Snakemake reads from ``files``
    (the key included: results are keyed by what they depend on, esa/layout.py)."""
    from .config import config_from_files
    from .layout import Layout

    wildcards = dict(item.partition("=")[::2] for item in items)
    if any(not name or not value for name, value in wildcards.items()):
        raise ESAError(f"expected name=value, got {' '.join(items)!r}")
    layout = Layout(config_from_files(files))
    if model is not None and model not in layout.models:
        raise ESAError(f"model {model!r} is not in the study; allowed: {', '.join(layout.models)}")
    return list(layout.of(model or layout.models[0]).outputs(step, **wildcards).values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esa", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one workflow step")
    run.add_argument("step", choices=sorted(STEPS))
    run.add_argument("--spec", required=True, help="JSON object of the step's parameters")
    run.add_argument("paths", nargs="*", metavar="name=path", help="the step's inputs and outputs")
    check = sub.add_parser("check", help="validate config files as the workflow reads them (later files over "
                                         "earlier ones, like --configfile A B)")
    check.add_argument("configfiles", nargs="+", metavar="configfile")
    path = sub.add_parser("path", help="the files one job of a step writes under a config, e.g. "
                                       "esa path protect_mask metric=grad_x_weight k=100")
    path.add_argument("step")
    path.add_argument("wildcards", nargs="*", metavar="name=value", help="the job's wildcards (metric, seed, ...)")
    path.add_argument("--configfile", nargs="+", default=[], help="the config files Snakemake is given "
                                                                  "(default: the embedded config/config.yaml)")
    path.add_argument("--model", default=None, help="one of the study's models (default: the first)")
    summary = sub.add_parser("summary", help="one-screen summary of each model's results directory")
    summary.add_argument("results_dirs", nargs="+", metavar="results_dir", help="e.g. results/smollm2-135m")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # name=path items may come before or after --spec; argparse alone only takes one run of them
    args, extra = parser.parse_known_args(argv)
    if any("=" not in item or item.startswith("-") for item in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "run":
        from .jobserver import delegate

        code = delegate(sys.argv[1:] if argv is None else argv)
        if code is not None:
            return code
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            keep_freed_memory()
            spec = parse_spec(args.step, args.spec)  # a bad spec stops the step before it writes anything
            step_function(args.step)(spec, **_paths(args.paths + extra))
        elif args.command == "check":
            print(check_configs(args.configfiles))
        elif args.command == "path":
            print("\n".join(job_paths(args.step, args.wildcards, args.configfile, args.model)))
        else:
            from .summary import summary_text

            print(summary_text(*args.results_dirs), end="")
    except (ESAError, json.JSONDecodeError) as err:
        print(f"esa: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

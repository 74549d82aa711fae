#!/usr/bin/env python
"""Runbook Phase 1: the unmodified model's reference perplexity/loss.

    python scripts/run_baseline.py --model meta-llama/Llama-3.1-8B --device cuda \
        --max-samples 200 --batch-size 4 --out-dir outputs/p1_baseline/llama31_8b

Runs the workflow's baseline through the Snakemake DAG and writes metrics.json,
windows.parquet, experiment_manifest.json and config.json into --out-dir.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esa.config import REPO  # noqa: E402
from esa.errors import ESAError  # noqa: E402
from esa.layout import Layout  # noqa: E402
from esa.runbook import copy_outputs, model_name, resolve, run_workflow  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id, local directory, .gguf file or builtin:smollm2-135m")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluation windows (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    parser.add_argument("--out-dir", required=True, type=Path, help="where the four output files go")
    parser.add_argument("--config", default=None, help="base config (default: config/config.yaml)")
    parser.add_argument("--cores", type=int, default=1, help="Snakemake --cores")
    parser.add_argument("--workdir", type=Path, default=REPO,
                        help="Snakemake working directory holding results/ and logs/ (default: the project)")
    args = parser.parse_args(argv)
    overrides = {"model": {"name": model_name(args.model), "source": args.model}, "device": args.device}
    if args.max_samples is not None:
        overrides["data"] = {"eval_windows": args.max_samples}
    if args.batch_size is not None:
        overrides["baseline"] = {"batch_size": args.batch_size}
    try:
        config = resolve(overrides, args.config)
        baseline = Layout(config).of(config["model"]["name"]).baseline_files()
        files = {Path(path).name: path for path in baseline.values()}
        run_workflow(config, list(files.values()), args.out_dir, args.cores, args.workdir)
        copy_outputs(files, args.workdir, args.out_dir)
    except ESAError as err:
        print(f"run_baseline: error: {err}", file=sys.stderr)
        return 2
    print(f"baseline written to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

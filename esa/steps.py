"""The workflow steps over tables: one function per step, reading the step's inputs, calling
the library and writing its outputs (the steps that run the model are in
:mod:`esa.model_steps`). Nothing here imports torch, so each of these short jobs starts fast.

Each step takes ``spec``, the exact parameters its outputs depend on (the rule passes them
as Snakemake params, so a change reruns exactly the steps it invalidates), and the paths of
its inputs and outputs. Every file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .errors import ESAError
from .io import files_by_seed, read_parquet, write_json_atomic, write_parquet_atomic
from .selection import build_mask
from .stability import metric_agreement, seed_stability


def step_topk(spec: dict, *, candidates: str, stats: str, mask: str) -> None:
    """The top-k set of a mode and its random_k / bottom_k controls, from the candidates alone."""
    table = read_parquet(stats, columns=["tensor", "layer", "module", "rows", "cols", "numel"])
    chosen = build_mask(read_parquet(candidates), table, spec["mode"], spec["k"], spec["seed"])
    write_parquet_atomic(chosen, mask)


def step_plots(spec: dict, *, stats: str, mask: str, distribution: str, hotspots: str) -> None:
    """The score distribution and hotspot heatmaps of one (metric, mode, k, seed)."""
    from . import plots

    table = read_parquet(stats)
    plots.plot_score_distribution(table, distribution, f"score distribution: {spec['metric']} seed {spec['seed']}")
    plots.plot_hotspots(table, read_parquet(mask), hotspots,
                        f"{spec['metric']} {spec['mode']} k={spec['k']} seed {spec['seed']}")


def step_activation_plot(spec: dict, *, activations: str, plot: str) -> None:
    """Max |input| / |output| of every mlp.down_proj per layer: the massive-activation picture."""
    from . import plots

    plots.plot_massive_activations(read_parquet(activations), plot,
                                   f"mlp.down_proj massive activations, seed {spec['seed']}")


def step_stability(spec: dict, *, masks: str, candidates: str, pairs: str, summary: str) -> None:
    """Pairwise Jaccard of the top-k across seeds and Spearman of scores on their union."""
    seeds = spec["seeds"]
    table, stats = seed_stability(
        {s: read_parquet(p) for s, p in files_by_seed(masks.split(","), seeds).items()},
        {s: read_parquet(p, columns=["tensor", "flat_index", "score", "end"])
         for s, p in files_by_seed(candidates.split(","), seeds).items()})
    write_parquet_atomic(table, pairs)
    write_json_atomic({**spec, **stats}, summary)


def step_agreement(spec: dict, *, masks: str, agreement: str) -> None:
    """Jaccard between the metrics' top-k sets for each seed at one (mode, k).

    ``masks`` lists the masks metric-major: for each metric of ``spec["metrics"]``, each seed.
    """
    paths = masks.split(",")
    metrics, seeds = spec["metrics"], spec["seeds"]
    if len(paths) != len(metrics) * len(seeds):
        raise ESAError(f"expected {len(metrics) * len(seeds)} masks, got {len(paths)}")
    frames = []
    for j, seed in enumerate(seeds):
        by_metric = {m: read_parquet(paths[i * len(seeds) + j]) for i, m in enumerate(metrics)}
        frames.append(metric_agreement(by_metric).assign(seed=seed, mode=spec["mode"], k=spec["k"]))
    table = pd.concat(frames, ignore_index=True)
    write_parquet_atomic(table[["seed", "mode", "k", "metric_a", "metric_b", "jaccard"]], agreement)


def step_report(spec: dict, *, verdicts: str, index: str) -> None:
    """verdict.json and the self-contained index.html of the whole study."""
    from .layout import Layout
    from .report import build_report
    from .verdicts import verdicts_from_files

    layout = Layout(spec["config"])
    entries = [layout.report_entry(name) for name in layout.experiments]
    confirmed = layout.confirm if layout.experiments else None
    table = verdicts_from_files(f"{layout.baseline}/metrics.json", entries, layout.agreement_files() or None,
                                f"{confirmed}/baseline_rerun.json" if confirmed else None, spec["thresholds"])
    write_json_atomic(table, verdicts)
    build_report(f"{layout.baseline}/metrics.json", entries, layout.agreement_files() or None,
                 f"{confirmed}/super_weights.parquet" if confirmed else None,
                 f"{confirmed}/activations.parquet" if confirmed else None, verdicts, index,
                 factor=spec["config"]["confirm"]["factor"], title=f"ESA report: {spec['config']['model']['name']}")


def step_merge_scores(spec: dict, *, parts: str, out: str) -> None:
    """Join the per-layer-group scores of one (metric, seed) into the unsplit files."""
    dirs = [Path(p) for p in parts.split(",")]
    out = Path(out)
    for name in ("candidates.parquet", "stats.parquet"):
        write_parquet_atomic(pd.concat([read_parquet(d / name) for d in dirs], ignore_index=True), out / name)
    if (dirs[0] / "activations.parquet").exists():  # every part traces every down_proj alike
        write_parquet_atomic(read_parquet(dirs[0] / "activations.parquet"), out / "activations.parquet")
    manifests = [json.loads((d / "manifest.json").read_text()) for d in dirs]
    write_json_atomic({**manifests[0], "parts": manifests,
                       "wall_seconds": sum(m["wall_seconds"] for m in manifests),
                       "targets": sum(m["targets"] for m in manifests)}, out / "manifest.json")

"""The workflow steps over tables: one function per step, reading the step's inputs, calling
the library and writing its outputs (the steps that run the model are in
:mod:`esa.model_steps`). Nothing here imports torch, so each of these short jobs starts fast.

Each step takes ``spec``, the exact parameters its outputs depend on (the rule passes them
as Snakemake params, so a change reruns exactly the steps it invalidates; ``esa run`` hands
them over as the step's class of :mod:`esa.step_specs`), and the paths of its inputs and
outputs. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from .errors import ESAError
from .io import read_parquet, write_atomic, write_json_atomic, write_parquet_atomic
from .layout import by_seed
from .names import TABLE_COLUMNS
from .published import PUBLISHED_COLUMNS, match_published
from .selection import build_mask
from .stability import metric_agreement, seed_stability
from .step_specs import (
    ActivationPlotSpec,
    AgreementSpec,
    ComparisonSpec,
    MergeScoresSpec,
    PlotsSpec,
    ProtectMaskSpec,
    PublishedSpec,
    ReportSpec,
    StabilitySpec,
    TopkSpec,
)


def step_topk(spec: TopkSpec, *, candidates: str, stats: str, mask: str) -> None:
    """The top-k set of a mode and its random_k / bottom_k controls, from the candidates alone."""
    table = read_parquet(stats, columns=TABLE_COLUMNS)
    chosen = build_mask(read_parquet(candidates), table, spec.mode, spec.k, spec.seed)
    write_parquet_atomic(chosen, mask)


def step_plots(spec: PlotsSpec, *, stats: str, mask: str, distribution: str, hotspots: str) -> None:
    """The score distribution and hotspot heatmaps of one (metric, mode, k, seed)."""
    from . import plots

    table = read_parquet(stats)
    plots.plot_score_distribution(table, distribution, f"score distribution: {spec.metric} seed {spec.seed}")
    plots.plot_hotspots(table, read_parquet(mask), hotspots,
                        f"{spec.metric} {spec.mode} k={spec.k} seed {spec.seed}")


def step_activation_plot(spec: ActivationPlotSpec, *, activations: str, plot: str) -> None:
    """Max |input| / |output| of every mlp.down_proj per layer: the massive-activation picture."""
    from . import plots

    plots.plot_massive_activations(read_parquet(activations), plot,
                                   f"mlp.down_proj massive activations, seed {spec.seed}")


def step_stability(spec: StabilitySpec, *, masks: dict, candidates: dict, pairs: str, summary: str) -> None:
    """Pairwise Jaccard of the top-k across seeds and Spearman of scores on their union.

    ``masks`` and ``candidates``: seed -> path, one per seed of ``spec.seeds``.
    """
    seeds = spec.seeds
    table, stats = seed_stability(
        {s: read_parquet(p) for s, p in by_seed(masks, seeds).items()},
        {s: read_parquet(p, columns=["tensor", "flat_index", "score", "end"])
         for s, p in by_seed(candidates, seeds).items()})
    write_parquet_atomic(table, pairs)
    write_json_atomic({**spec.as_dict(), **stats}, summary)


def step_agreement(spec: AgreementSpec, *, masks: dict, agreement: str) -> None:
    """Jaccard between the metrics' top-k sets for each seed at one (mode, k).

    ``masks``: metric -> seed -> path, for every metric of ``spec.metrics`` and seed of
    ``spec.seeds``.
    """
    metrics, seeds = spec.metrics, spec.seeds
    if sorted(masks) != sorted(metrics):
        raise ESAError(f"expected masks of the metrics {metrics}, got {sorted(masks)}")
    paths = {m: by_seed(masks[m], seeds) for m in metrics}
    frames = [metric_agreement({m: read_parquet(paths[m][seed]) for m in metrics})
              .assign(seed=seed, mode=spec.mode, k=spec.k) for seed in seeds]
    table = pd.concat(frames, ignore_index=True)
    write_parquet_atomic(table[["seed", "mode", "k", "metric_a", "metric_b", "jaccard"]], agreement)


def _relative(paths, start: Path):
    """Nested named paths relative to ``start`` (None kept)."""
    if isinstance(paths, dict):
        return {name: _relative(path, start) for name, path in paths.items()}
    return None if paths is None else os.path.relpath(paths, start)


def step_report(spec: ReportSpec, *, verdicts: str, index: str, plots: str, inputs: str, baseline: str,
                baseline_config: str,
                stats: dict, masks: dict, results: dict | None = None, stability: dict | None = None,
                stability_pairs: dict | None = None, agreement: dict | None = None,
                super_weights: str | None = None, super_experts: str | None = None,
                activations: str | None = None, rerun: str | None = None, published: str | None = None,
                mechanism: dict | None = None, culprits: dict | None = None, quantize: str | None = None,
                groups: str | None = None, group_members: str | None = None, null: str | None = None,
                behaviour: dict | None = None) -> None:
    """verdict.json and the self-contained index.html (figures in ``plots``) of the whole study.

    ``spec.experiments``: name, metric, mode, k, seeds of each experiment; ``stats`` and
    ``masks``: experiment -> seed -> path; ``results``, ``stability``, ``stability_pairs``:
    experiment -> path, for the experiments that ran that part; ``agreement``: "{mode}_k{k}"
    -> path; ``baseline_config``: the baseline step's config.json; the confirm files when any
    experiment ran; ``published``: the published step's matches, when the model has published
    super weights; ``mechanism``: the mechanism step's sweep, restore and control, when enabled;
    ``behaviour``: the behaviour step's conditions, generation, sinks, lm_eval and cloze, when enabled;
    ``culprits``: experiment -> its culprit search's culprits, search and summary, when enabled;
    ``quantize``: the quantize step's results, when enabled. ``inputs``: every file read, by
    name, relative to the model's results directory (``esa summary`` finds them there).
    """
    from .report import build_report
    from .verdicts import verdicts_from_files

    results, stability, stability_pairs = results or {}, stability or {}, stability_pairs or {}
    entries = [{**e, "stats": by_seed(stats[e["name"]], e["seeds"]), "masks": by_seed(masks[e["name"]], e["seeds"]),
                "results": results.get(e["name"]), "stability": stability.get(e["name"]),
                "stability_pairs": stability_pairs.get(e["name"])} for e in spec.experiments]
    agreement_paths = list(agreement.values()) if agreement else None
    table = verdicts_from_files(baseline, entries, agreement_paths, rerun, spec.thresholds)
    write_json_atomic(table, verdicts)
    build_report(baseline, entries, agreement_paths, super_weights, activations, verdicts, index,
                 baseline_config=baseline_config, plot_dir=plots, model=spec.model,
                 factor=spec.factor, title=f"ESA report: {spec.model}", super_experts_path=super_experts,
                 published_path=published, mechanism_paths=mechanism, culprit_paths=culprits,
                 quantize_path=quantize, groups_path=groups, group_members_path=group_members, null_path=null,
                 behaviour_paths=behaviour)
    read = {"baseline": baseline, "baseline_config": baseline_config, "stats": stats, "masks": masks,
            "results": results, "stability": stability, "stability_pairs": stability_pairs, "agreement": agreement,
            "super_weights": super_weights, "super_experts": super_experts, "activations": activations,
            "rerun": rerun, "published": published, "mechanism": mechanism, "culprits": culprits,
            "quantize": quantize, "groups": groups, "group_members": group_members, "null": null,
            "behaviour": behaviour}
    write_json_atomic(_relative(read, Path(index).parents[2]), inputs)


def step_published(spec: PublishedSpec, *, candidates: dict, stats: dict, super_weights: str, matches: str) -> None:
    """Where each metric ranks the super weights published for the model, and whether confirm
    tested and confirmed them (``esa.published``).

    ``spec.coordinates``: the model's published rows (``esa.published.PUBLISHED_COLUMNS``);
    ``candidates`` and ``stats``: metric -> path on the confirm seed, for every metric of
    ``spec.metrics``; ``super_weights``: confirm's table.
    """
    metrics = spec.metrics
    for name, files in (("candidates", candidates), ("stats", stats)):
        if sorted(files) != sorted(metrics):
            raise ESAError(f"expected {name} of the metrics {metrics}, got {sorted(files)}")
    table = match_published(
        pd.DataFrame(spec.coordinates, columns=PUBLISHED_COLUMNS),
        {m: read_parquet(candidates[m], columns=["tensor", "flat_index", "score", "rank_in_tensor", "end"])
         for m in metrics},
        {m: read_parquet(stats[m], columns=TABLE_COLUMNS) for m in metrics}, read_parquet(super_weights))
    write_parquet_atomic(table, matches)


def step_merge_scores(spec: MergeScoresSpec, *, parts: dict, **outputs: dict) -> None:
    """Join the layer-group parts of one seed's scores into the unsplit files.

    ``parts``: group -> metric -> file name -> path; ``outputs``: metric -> file name -> path,
    for each metric of ``spec.metrics``. Candidates, stats and full scores are the union
    of the parts (each part scores other targets); every part traces every MLP output
    projection alike, so the activations are the first part's.
    """
    groups = [parts[str(g)] for g in range(spec.layer_groups)]
    for metric in spec.metrics:
        out, pieces = outputs[metric], [group[metric] for group in groups]
        for name in ("candidates", "stats"):
            write_parquet_atomic(pd.concat([read_parquet(p[name]) for p in pieces], ignore_index=True), out[name])
        if "activations" in out:
            write_parquet_atomic(read_parquet(pieces[0]["activations"]), out["activations"])
        if "full_scores" in out:
            from safetensors.numpy import load_file, save_file

            write_atomic(out["full_scores"], lambda tmp: save_file(
                {k: v for p in pieces for k, v in load_file(p["full_scores"]).items()}, tmp))
        manifests = [json.loads(Path(p["manifest"]).read_text()) for p in pieces]
        write_json_atomic({**manifests[0], "parts": manifests,
                           "wall_seconds": sum(m["wall_seconds"] for m in manifests),
                           "targets": sum(m["targets"] for m in manifests)}, out["manifest"])


def step_comparison(spec: ComparisonSpec, *, index: str, baseline: dict, super_weights: dict, activations: dict,
                    stats: dict, agreement: dict | None = None) -> None:
    """The comparison page of the models of ``spec.models``: every input maps model -> its
    file (``stats``: model -> metric -> path; ``agreement``: model -> "{mode}_k{k}" -> path)."""
    from .comparison import build_comparison

    agreement = agreement or {}
    for name, files in (("baseline", baseline), ("super_weights", super_weights), ("activations", activations),
                        ("stats", stats)):
        if sorted(files) != sorted(spec.models):
            raise ESAError(f"comparison needs {name} of the models {spec.models}, got {sorted(files)}")
    build_comparison(index, baseline={m: baseline[m] for m in spec.models}, super_weights=super_weights,
                     activations=activations, stats=stats,
                     agreement={m: agreement.get(m, {}) for m in spec.models}, factor=spec.factor)


def step_protect_mask(spec: ProtectMaskSpec, *, candidates: str, stats: str, mask: str, tensors: str) -> None:
    """One metric's global top-k (k = ``spec.k``) as a protect mask to keep in full precision
    when quantizing: ``mask`` lists the weights (``esa.protect.PROTECT_MASK_COLUMNS``: tensor,
    flat_index, row, col, score); ``tensors`` (safetensors) holds one boolean matrix per target
    tensor holding at least one of them, keyed by tensor name, shaped (rows, cols) in the Linear
    convention (rows = output channels: the transpose of a Conv1D weight's storage; an expert's
    matrix for ``<parameter>[e]``), True = protected."""
    from safetensors.numpy import save_file

    from .protect import mask_arrays, metric_top

    table = read_parquet(stats, columns=TABLE_COLUMNS)
    top = metric_top(read_parquet(candidates), table, spec.k, f"protect mask {spec.metric} k={spec.k}")
    write_parquet_atomic(top, mask)
    write_atomic(tensors, lambda tmp: save_file(mask_arrays(top, table), tmp))

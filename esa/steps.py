"""One function per workflow step: read the step's inputs, call the library, write outputs.

Each step takes ``spec``, the exact parameters its outputs depend on (the rule passes them
as Snakemake params, so a change reruns exactly the steps it invalidates), and the paths of
its inputs and outputs. Every file is written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import torch

from . import data, models
from .errors import ESAError
from .candidates import build_candidates
from .evaluation import evaluate
from .io import write_json_atomic, write_parquet_atomic
from .manifest import RunRecord
from .score_stats import build_stats
from .scores import compute_scores
from .selection import build_mask
from .stability import metric_agreement, seed_stability
from .perturb import run_perturbations
from .targets import find_targets, split_targets

log = logging.getLogger(__name__)


def step_model(spec: dict, *, ref: str) -> None:
    """Materialise the model source once (GGUF -> safetensors) and write its reference file."""
    models.materialize(spec["source"], Path(ref).parent)


def step_data(spec: dict, *, model: str, windows: str, summary: str) -> None:
    """Tokenise one part (``spec["part"]``: calib or eval) of the text source into windows.

    The calibration pool and the evaluation windows are separate steps, so a change to the
    evaluation text never touches the pool (and never re-scores).
    """
    source = models.source_from_ref(model)
    seq_len, part = spec["seq_len"], spec["part"]
    context = models.context_length(models.load_config(source))
    if context is not None and seq_len > context:
        raise ESAError(f"seq_len {seq_len} exceeds the model's context of {context} tokens")
    tokenizer = models.load_tokenizer(source)
    calib_docs, eval_docs = data.load_documents(
        spec["source"], text_field=spec["text_field"], hf_config=spec["hf_config"],
        calib_split=spec["calib_split"], eval_split=spec["eval_split"],
        eval_fraction=spec["eval_fraction"])
    docs = calib_docs if part == "calib" else eval_docs
    cut = data.make_windows(tokenizer, docs, seq_len)
    name = {"calib": "calibration", "eval": "evaluation"}[part]
    if len(cut) == 0:
        raise ESAError(f"the {name} text of {spec['source']!r} is shorter than one window "
                       f"of seq_len {seq_len} tokens")
    wanted = spec.get("eval_windows")
    if wanted is not None:
        if wanted > len(cut):
            raise ESAError(f"eval_windows {wanted} is more than the {len(cut)} evaluation "
                           f"windows of seq_len {seq_len} the text holds")
        cut = cut[:wanted]
    write_parquet_atomic(data.windows_frame(cut), windows)
    write_json_atomic({"part": name, "source": spec["source"], "seq_len": seq_len,
                       "bos_id": data.bos_id(tokenizer), "documents": len(docs),
                       "windows": int(len(cut))}, summary)


def _load(spec: dict, model: str):
    return models.load_model(models.source_from_ref(model), spec["device"], spec["dtype"],
                             spec["attn_implementation"], spec["device_map"])


def step_baseline(spec: dict, *, model: str, eval: str, metrics: str, windows: str,
                  manifest: str, config: str) -> None:
    """Loss and perplexity of the unmodified model on the fixed evaluation windows."""
    device = models.resolve_device(spec["device"])
    record = RunRecord(spec, device, spec["dtype"], "baseline")
    lm = _load(spec, model)
    result = evaluate(lm, torch.from_numpy(data.read_windows(eval)), spec["batch_size"],
                      chunk_size=spec["loss_chunk"], progress=True, desc="baseline")
    if not result.finite:
        log.warning("baseline loss is not finite: %s", result.loss)
    per_window = pd.DataFrame({"window": range(len(result.nll)), "nll": result.nll,
                               "tokens": result.tokens, "loss": result.window_loss})
    write_parquet_atomic(per_window, windows)
    write_json_atomic(spec, config)
    write_json_atomic(record.finish(model=spec["model"]), manifest)
    write_json_atomic(result.metrics(), metrics)
    log.info("baseline: loss %.6f ppl %.4f over %d tokens", result.loss, result.ppl,
             int(result.tokens.sum()))


def step_scores(spec: dict, *, model: str, calib: str, **out_dirs: str) -> None:
    """Score every target weight by the metrics in ``out_dirs`` on seed ``spec["seed"]``'s sample.

    Writes per metric: candidates.parquet (top-M / bottom-M per tensor), stats.parquet (per
    tensor distribution), manifest.json, and for activation_magnitude activations.parquet
    (the massive-activation trace of every mlp.down_proj). ``spec["layer_group"]`` = [g, G]
    scores only part g of G of the targets (see :func:`esa.targets.split_targets`).
    """
    device = models.resolve_device(spec["device"])
    record = RunRecord(spec, device, spec["dtype"], "scores")
    pool = data.read_windows(calib)
    sample = data.draw_calibration(len(pool), spec["max_samples"], spec["seed"])
    lm = _load(spec, model)
    targets = find_targets(lm, spec["targets"]["include"], spec["targets"]["exclude"])
    group, groups = spec["layer_group"]
    targets = split_targets(targets, groups)[group]
    results = compute_scores(lm, targets, torch.from_numpy(pool[sample]), list(out_dirs),
                             spec["batch_size"], spec["seed"], probes=spec["probes"],
                             weighting=spec["weighting"], chunk_size=spec["loss_chunk"],
                             gradient_checkpointing=spec["gradient_checkpointing"])
    for metric, result in results.items():
        out = Path(out_dirs[metric])
        scores = result.score
        write_parquet_atomic(build_stats(targets, scores), out / "stats.parquet")
        write_parquet_atomic(build_candidates(targets, result.weights, result.stat, scores,
                                              spec["candidates"]), out / "candidates.parquet")
        if "massive_activations" in result.extra:
            write_parquet_atomic(result.extra["massive_activations"], out / "activations.parquet")
        if spec["save_full_scores"]:
            from safetensors.torch import save_file

            save_file({name: scores[name].cpu().contiguous() for name in result.stat},
                      str(out / "scores.safetensors"))
        write_json_atomic(record.finish(metric=metric, calibration_windows=sample.tolist(),
                                        targets=len(targets)), out / "manifest.json")


def step_topk(spec: dict, *, candidates: str, stats: str, mask: str) -> None:
    """The top-k set of a mode and its random_k / bottom_k controls, from the candidates alone."""
    table = pd.read_parquet(stats, columns=["tensor", "layer", "module", "rows", "cols", "numel"])
    chosen = build_mask(pd.read_parquet(candidates), table, spec["mode"], spec["k"], spec["seed"])
    write_parquet_atomic(chosen, mask)


def step_plots(spec: dict, *, stats: str, mask: str, distribution: str, hotspots: str) -> None:
    """The score distribution and hotspot heatmaps of one (metric, mode, k, seed)."""
    from . import plots

    table = pd.read_parquet(stats)
    plots.plot_score_distribution(table, distribution, f"score distribution: {spec['metric']} seed {spec['seed']}")
    plots.plot_hotspots(table, pd.read_parquet(mask), hotspots,
                        f"{spec['metric']} {spec['mode']} k={spec['k']} seed {spec['seed']}")


def step_activation_plot(spec: dict, *, activations: str, plot: str) -> None:
    """Max |input| / |output| of every mlp.down_proj per layer: the massive-activation picture."""
    from . import plots

    plots.plot_massive_activations(pd.read_parquet(activations), plot,
                                   f"mlp.down_proj massive activations, seed {spec['seed']}")


def _by_seed(items: list[str], seeds: list[int]) -> dict[int, str]:
    if len(items) != len(seeds):
        raise ESAError(f"expected one file per seed {seeds}, got {len(items)}")
    return dict(zip(seeds, items))


def step_perturb(spec: dict, *, model: str, eval: str, baseline: str, masks: str, results: str,
                 manifest: str) -> None:
    """Perturb the top-k and each control of every seed in place, evaluate, restore bit-exactly.

    ``masks`` is a comma-separated list, one mask per seed of ``spec["seeds"]``.
    """
    device = models.resolve_device(spec["device"])
    record = RunRecord(spec, device, spec["dtype"], "perturb")
    masks_by_seed = {seed: pd.read_parquet(path)
                     for seed, path in _by_seed(masks.split(","), spec["seeds"]).items()}
    reference = json.loads(Path(baseline).read_text())
    lm = _load(spec, model)
    table = run_perturbations(lm, masks_by_seed, torch.from_numpy(data.read_windows(eval)),
                              spec["batch_size"], reference, spec["perturb"], spec["scale"],
                              spec["noise"], sets=("top", *spec["controls"]), chunk_size=spec["loss_chunk"])
    write_parquet_atomic(table, results)
    write_json_atomic(record.finish(baseline_ppl=reference["ppl"]), manifest)


def step_stability(spec: dict, *, masks: str, candidates: str, pairs: str, summary: str) -> None:
    """Pairwise Jaccard of the top-k across seeds and Spearman of scores on their union."""
    seeds = spec["seeds"]
    table, stats = seed_stability(
        {s: pd.read_parquet(p) for s, p in _by_seed(masks.split(","), seeds).items()},
        {s: pd.read_parquet(p, columns=["tensor", "flat_index", "score", "end"])
         for s, p in _by_seed(candidates.split(","), seeds).items()})
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
        by_metric = {m: pd.read_parquet(paths[i * len(seeds) + j]) for i, m in enumerate(metrics)}
        frames.append(metric_agreement(by_metric).assign(seed=seed, mode=spec["mode"], k=spec["k"]))
    table = pd.concat(frames, ignore_index=True)
    write_parquet_atomic(table[["seed", "mode", "k", "metric_a", "metric_b", "jaccard"]], agreement)


def step_confirm(spec: dict, *, model: str, eval: str, baseline: str, candidates: str,
                 super_weights: str, activations: str, rerun: str) -> None:
    """Zero each of every metric's global top-N weights alone; trace the massive activations.

    ``candidates`` lists one candidates.parquet per metric of ``spec["metrics"]``. A weight in
    several metrics' top-N is evaluated once. Also re-evaluates the unmodified model (the
    baseline-identical-on-rerun check).
    """
    from .confirm import activation_trace, confirm_super_weights, global_top

    paths = candidates.split(",")
    if len(paths) != len(spec["metrics"]):
        raise ESAError(f"expected candidates for {spec['metrics']}, got {len(paths)} files")
    tops = pd.concat([global_top(pd.read_parquet(p), spec["top_n"]).assign(metric=m, rank=range(spec["top_n"]))
                      for m, p in zip(spec["metrics"], paths)], ignore_index=True)
    unique = tops.drop_duplicates(["tensor", "flat_index"])
    lm = _load(spec, model)
    windows = torch.from_numpy(data.read_windows(eval))
    reference = json.loads(Path(baseline).read_text())
    tested = confirm_super_weights(lm, unique, windows, spec["batch_size"], reference, top_n=len(unique),
                                   factor=spec["factor"], chunk_size=spec["loss_chunk"])
    table = tops[["metric", "rank", "tensor", "flat_index"]].merge(tested, on=["tensor", "flat_index"])
    write_parquet_atomic(table, super_weights)
    write_parquet_atomic(activation_trace(lm, windows, spec["batch_size"], spec["loss_chunk"]), activations)
    write_json_atomic(evaluate(lm, windows, spec["batch_size"], chunk_size=spec["loss_chunk"]).metrics(), rerun)


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
        write_parquet_atomic(pd.concat([pd.read_parquet(d / name) for d in dirs], ignore_index=True), out / name)
    if (dirs[0] / "activations.parquet").exists():  # every part traces every down_proj alike
        write_parquet_atomic(pd.read_parquet(dirs[0] / "activations.parquet"), out / "activations.parquet")
    manifests = [json.loads((d / "manifest.json").read_text()) for d in dirs]
    write_json_atomic({**manifests[0], "parts": manifests,
                       "wall_seconds": sum(m["wall_seconds"] for m in manifests),
                       "targets": sum(m["targets"] for m in manifests)}, out / "manifest.json")

"""Each step's spec: exactly what its outputs depend on besides its input files (torch-free).

One function per step of :data:`esa.step_table.STEPS`, taking the study's :class:`esa.layout.Layout`
and the job's wildcards (strings from Snakemake, or ints); :func:`step_spec` dispatches. The
rules send the spec as ``--spec`` JSON (``esa.step_specs`` types it), Snakemake tracks it as a
param, and ``esa.layout`` hashes it with the step's input paths into the key of the step's
results directory, so two configs that differ in a step's spec write different directories.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .metrics import REGISTRY, SCORE_JOBS

DATA_KEYS = {
    "calib": ("source", "hf_config", "calib_split", "text_field", "eval_fraction", "seq_len"),
    "eval": ("source", "hf_config", "eval_split", "text_field", "eval_fraction", "seq_len", "eval_windows"),
}
RUNTIME_KEYS = ("device", "dtype", "attn_implementation", "loss_chunk", "device_map")


def spec_json(spec: dict) -> str:
    """A spec as the JSON string handed to ``esa run`` and hashed into keys (sorted keys)."""
    return json.dumps(spec, sort_keys=True)


def directory_digest(path: str) -> str:
    """sha256 of every file under ``path``: its relative path and bytes, in path order."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(root).as_posix()}\0".encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def model_spec(layout) -> dict:
    """The source and, for a hub model, the commit its revision names now (a moved main: a new key)."""
    pinned = layout.revisions()
    return {"source": layout.source(), **({"revision": pinned["model_revision"]} if "model_revision" in pinned else {})}


def data_settings(layout, part: str) -> dict:
    """What one part's windows depend on: the evaluation settings never touch the pool."""
    data = {key: layout.config["data"][key] for key in DATA_KEYS[part]}
    data.setdefault("calib_split", None)
    data.setdefault("eval_split", None)
    pinned = layout.revisions()  # a hub dataset's commit; sent only then, so local text keeps its keys
    revision = {"revision": pinned["data_revision"]} if "data_revision" in pinned else {}
    return {"model": layout.source(), "part": part, **data, **revision}


def data_spec(layout, part) -> dict:
    return data_settings(layout, part)


def runtime_spec(layout, **params) -> dict:
    """Parameters of a step that runs the model: where (``auto`` resolved), in which precision
    (``mixed_precision: auto`` resolved), how the loss is chunked, and the hub commits of the
    model and the data (recorded in each step's manifest)."""
    config = layout.config
    # deterministic only when on: turning it on reruns the model steps, off keeps existing results
    deterministic = {"deterministic": True} if config["deterministic"] else {}
    # likewise mixed precision (resolved: auto enters no key): "no" keeps the results made before it existed
    mixed = {"mixed_precision": layout.mixed_precision} if layout.mixed_precision != "no" else {}
    return {"model": layout.source(), **{k: config[k] for k in RUNTIME_KEYS}, "device": layout.device,
            **deterministic, **mixed, **layout.revisions(), **params}


def evaluation_spec(layout, **params) -> dict:
    """A step that measures damage against the baseline: its batches and dPPL intervals too."""
    config = layout.config
    return runtime_spec(layout, batch_size=config["baseline"]["batch_size"], bootstrap=config["bootstrap"], **params)


def baseline_spec(layout) -> dict:
    return runtime_spec(layout, batch_size=layout.config["baseline"]["batch_size"], data=layout.config["data"])


def scores_spec(layout, job, seed, group=None) -> dict:
    """What a scores job depends on: the model, the calibration pool, the metric(s), the seed,
    and the part of the layer groups it scores (``[0, 1]`` unsplit)."""
    metrics = list(SCORE_JOBS[job])
    scoring = layout.config["scoring"]
    # the job's metrics' own blocks (scoring.hutchinson: probes, and max_samples over scoring's)
    own = {key: value for metric in metrics if REGISTRY[metric].settings
           for key, value in scoring[REGISTRY[metric].settings].items()}
    groups = scoring["layer_groups"]
    return runtime_spec(
        layout, data=data_settings(layout, "calib"), metrics=metrics, seed=int(seed),
        max_samples=own.get("max_samples") or scoring["max_samples"], batch_size=scoring["batch_size"],
        probes=own.get("probes"), weighting=scoring["weighting"], candidates=scoring["candidates"],
        targets=scoring["targets"], save_full_scores=scoring["save_full_scores"],
        gradient_checkpointing=scoring["gradient_checkpointing"],
        layer_group=[int(group), groups] if group is not None else [0, 1])


def merge_scores_spec(layout, job, seed) -> dict:
    """The ``seed`` wildcard names the merged files only: each part's spec holds it already."""
    return {"metrics": list(SCORE_JOBS[job]), "layer_groups": layout.config["scoring"]["layer_groups"]}


def perturb_spec(layout, metric, mode, k, tag) -> dict:
    e = layout.perturb_experiment(metric, mode, int(k), tag)
    return evaluation_spec(layout, **{key: e[key] for key in ("perturb", "scale", "noise", "controls", "seeds")})


def confirm_spec(layout) -> dict:
    confirm = layout.config["confirm"]
    return evaluation_spec(layout, metrics=layout.scored_metrics(), seed=layout.confirm_seed(),
                           top_n=confirm["top_n"], factor=confirm["factor"], joint=confirm["joint"],
                           innocent=confirm["innocent"])


def behaviour_spec(layout) -> dict:
    """The readouts' settings; each experiment read with the perturbation it runs; the lm-eval
    ``include_path`` as an absolute path and the digest of its files, so that an edited task
    is a new key."""
    behaviour = layout.config["behaviour"]
    lm_eval = dict(behaviour["lm_eval"])
    include = [str(Path(lm_eval["include_path"]).resolve())] if lm_eval["include_path"] else []
    lm_eval.update(include_path=include, include_digest=[directory_digest(path) for path in include])
    experiments = [{"name": name, **{key: layout.experiments[name][key] for key in ("perturb", "scale", "noise")},
                    "seed": seed} for name, seed in layout.behaviour_experiments().items()]
    return runtime_spec(layout, batch_size=layout.config["baseline"]["batch_size"], prompts=behaviour["prompts"],
                        max_new_tokens=behaviour["max_new_tokens"], sink_windows=behaviour["sink_windows"],
                        experiments=experiments, lm_eval=lm_eval)


def mechanism_spec(layout) -> dict:
    mechanism = layout.config["mechanism"]
    return evaluation_spec(layout, scales=mechanism["scales"], massive_fraction=mechanism["massive_fraction"],
                           calib_samples=layout.config["scoring"]["max_samples"], calib_seed=layout.confirm_seed())


def quantize_spec(layout) -> dict:
    config = layout.config
    return evaluation_spec(layout, schemes=config["quantize"]["schemes"], protect=config["quantize"]["protect"],
                           metrics=layout.quantize_metrics(), seed=config["quantize"]["seed"],
                           targets=config["scoring"]["targets"])


def culprits_spec(layout, experiment) -> dict:
    """What a culprit search depends on: the experiment's perturbation, its mask's seed, the
    confirm factor that makes a group destructive, the budget."""
    e, config = layout.experiments[experiment], layout.config
    return evaluation_spec(layout, experiment=experiment, seed=layout.culprit_seed(experiment),
                           perturb=e["perturb"], scale=e["scale"], factor=config["confirm"]["factor"],
                           budget=config["culprits"]["budget"], min_group=config["culprits"]["min_group"])


def protect_mask_spec(layout, metric, k) -> dict:
    return {"metric": metric, "k": int(k)}


def topk_spec(layout, metric, mode, k, seed) -> dict:
    return {"mode": mode, "k": int(k), "seed": int(seed)}


def plots_spec(layout, metric, mode, k, seed) -> dict:
    return {"metric": metric, "mode": mode, "k": int(k), "seed": int(seed)}


def activation_plot_spec(layout, seed) -> dict:
    return {"seed": int(seed)}


def stability_spec(layout, metric, mode, k) -> dict:
    return {"metric": metric, "mode": mode, "k": int(k), "seeds": layout.seeds_of(metric, mode, int(k))}


def agreement_spec(layout, mode, k) -> dict:
    return {"mode": mode, "k": int(k), "metrics": layout.scored_metrics(), "seeds": layout.config["seeds"]}


def published_spec(layout) -> dict:
    """The model's published coordinates (esa.published) and the metrics that rank them."""
    return {"coordinates": layout.published(), "metrics": layout.scored_metrics()}


def report_spec(layout) -> dict:
    """What the report step reads of the config: the experiments, the confirm factor, the thresholds."""
    experiments = [{"name": name, "metric": e["metric"], "mode": e["mode"], "k": e["topk"], "seeds": e["seeds"]}
                   for name, e in layout.experiments.items()]
    return {"model": layout.model, "experiments": experiments, "factor": layout.config["confirm"]["factor"],
            "thresholds": layout.config["verdicts"]}


def comparison_spec(layout) -> dict:
    return {"models": layout.models, "metrics": layout.scored_metrics(),
            "factor": layout.config["confirm"]["factor"]}


SPEC_FUNCTIONS = {
    "model": model_spec, "data": data_spec, "baseline": baseline_spec, "scores": scores_spec,
    "merge_scores": merge_scores_spec, "perturb": perturb_spec, "confirm": confirm_spec,
    "mechanism": mechanism_spec, "behaviour": behaviour_spec, "culprits": culprits_spec, "quantize": quantize_spec,
    "protect_mask": protect_mask_spec, "topk": topk_spec, "plots": plots_spec,
    "activation_plot": activation_plot_spec, "stability": stability_spec, "agreement": agreement_spec,
    "published": published_spec, "report": report_spec, "comparison": comparison_spec,
}


def step_spec(layout, step: str, **wildcards) -> dict:
    """The spec of one job of ``step`` (``layout`` of the job's model, wildcards by name)."""
    return SPEC_FUNCTIONS[step](layout, **wildcards)

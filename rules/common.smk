"""Config validation, result paths and the per-step parameter specs the rules pass to `esa`."""

import json
import os
import sys

sys.path.insert(0, workflow.basedir)
# jobs (local, conda or Slurm) run `python -m esa` from the workflow checkout, installed or not
shell.prefix(f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

from esa.config import validate_config
from esa.errors import ESAError
from esa.layout import Layout
from esa.provenance import code_version

try:
    validate_config(config)
except ESAError as err:
    raise WorkflowError(str(err))

ENV = os.path.join(workflow.basedir, "envs", "esa.yaml")
MODEL = config["model"]["name"]
RESULTS = f"results/{MODEL}"


GPU_RULES = ("baseline", "scores", "perturb", "confirm")
BASE_RESOURCES = {"mem_mb": 8000, "runtime": 60}


def res(rule):
    """A rule's resources: built-in base, then `resources.default`, then `resources.<rule>`.

    Threads, unless the config sets them: 2 for a job that runs the model, 1 for a table step,
    so the short table jobs run side by side. On 2 CPU cores two model jobs of one thread each
    are no faster (measured: 18.4 vs 17.2 min for the default study), and two hutchinson_diag
    jobs at once (13.6 GB each) exhaust 24 GB. Snakemake hands a job's threads to torch as
    OMP_NUM_THREADS.
    """
    gpu = rule in GPU_RULES
    base = {**BASE_RESOURCES, "threads": 2 if gpu else 1, "gpu": int(gpu)}
    return {**base, **config["resources"]["default"], **config["resources"].get(rule, {})}


def spec(**params):
    """A step's parameters as the JSON string handed to `esa run` (and tracked by Snakemake)."""
    return json.dumps(params, sort_keys=True)


def model_spec():
    return spec(source=config["model"]["source"])


DATA_KEYS = {
    "calib": ("source", "hf_config", "calib_split", "text_field", "eval_fraction", "seq_len"),
    "eval": ("source", "hf_config", "eval_split", "text_field", "eval_fraction", "seq_len", "eval_windows"),
}


def data_spec(part):
    """What one part's windows depend on: the evaluation settings never touch the pool."""
    data = {key: config["data"][key] for key in DATA_KEYS[part]}
    data.setdefault("calib_split", None)
    data.setdefault("eval_split", None)
    return spec(model=config["model"]["source"], part=part, **data)


def runtime_spec(**params):
    """Parameters of a step that runs the model: where, in which precision, how the loss is chunked."""
    keys = ("device", "dtype", "attn_implementation", "loss_chunk", "device_map")
    return spec(model=config["model"]["source"], **{k: config[k] for k in keys}, **params)


GRADIENT_METRICS = ("grad_x_weight", "grad_squared")  # one gradient pass serves both
LAYOUT = Layout(config)
EXPERIMENTS = LAYOUT.experiments
SCORES = LAYOUT.scores
MASK = LAYOUT.mask
PLOTS = LAYOUT.plots
PERTURB = LAYOUT.perturb


def check_experiments():
    largest = max((e["topk"] for e in EXPERIMENTS.values()), default=0)
    if largest > config["scoring"]["candidates"]:
        raise WorkflowError(
            f"scoring.candidates {config['scoring']['candidates']} is smaller than the largest "
            f"topk {largest}; candidates must be >= every experiment's topk")


check_experiments()


LAYER_GROUPS = config["scoring"]["layer_groups"]
SPLIT = LAYER_GROUPS > 1


def scores_out(metric):
    """Output directory pattern of a scores job: the final one, or a layer-group part of it."""
    base = f"{RESULTS}/scores/{metric}/seed{{seed}}"
    return f"{base}/part{{group}}" if SPLIT else base


def scores_spec(metrics, wildcards):
    return _scores_spec(metrics, wildcards.seed, [int(wildcards.group), LAYER_GROUPS] if SPLIT else [0, 1])


def _scores_spec(metrics, seed, layer_group):
    """What a scores job depends on: the model, the calibration pool, the metric(s), the seed."""
    scoring = config["scoring"]
    hutchinson = metrics == ["hutchinson_diag"]
    max_samples = scoring["hutchinson"]["max_samples"] if hutchinson else None
    return runtime_spec(
        data=json.loads(data_spec("calib")),
        metrics=metrics,
        seed=int(seed),
        max_samples=max_samples or scoring["max_samples"],
        batch_size=scoring["batch_size"],
        probes=scoring["hutchinson"]["probes"] if hutchinson else None,
        weighting=scoring["weighting"],
        candidates=scoring["candidates"],
        targets=scoring["targets"],
        save_full_scores=scoring["save_full_scores"],
        gradient_checkpointing=scoring["gradient_checkpointing"],
        layer_group=layer_group,
    )


def perturb_params(wildcards):
    """The experiment settings a perturb job runs with."""
    return LAYOUT.perturb_experiment(wildcards.metric, wildcards.mode, int(wildcards.k), wildcards.tag)


def perturb_masks(wildcards):
    e = perturb_params(wildcards)
    return [MASK.format(metric=e["metric"], mode=e["mode"], k=e["topk"], seed=s) for s in e["seeds"]]


def stability_inputs(wildcards):
    seeds = LAYOUT.seeds_of(wildcards.metric, wildcards.mode, int(wildcards.k))
    return {
        "masks": [MASK.format(**wildcards, seed=s) for s in seeds],
        "candidates": [f"{SCORES.format(metric=wildcards.metric, seed=s)}/candidates.parquet" for s in seeds],
    }


def config_for_report():
    """What the report step reads of the config: the experiments and their layout."""
    keys = ("model", "seeds", "plots", "experiments", "confirm", "report")
    return {key: config[key] for key in keys}


def all_targets():
    return LAYOUT.all_files()

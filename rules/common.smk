"""Config validation, the results layout, and the helpers every rule shares.

Each rule reads as inputs -> step -> outputs. Its files come from `LAYOUT` (esa/layout.py,
the one home of every path), its parameters from its step's `<step>_spec` (rules/specs.smk),
and its command is `esa_shell(step)`, which hands the step every named input and output.
"""

import json
import os
import shlex
import sys

# jobs (local, conda or Slurm) run `python -m esa` from the workflow checkout, installed or not
shell.prefix(f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

from esa.config import study_config, study_models
from esa.errors import ESAError
from esa.layout import Layout, flatten_paths
from esa.metrics import REGISTRY, SCORE_JOBS, TRACE_METRIC
from esa.names import COMPARISON
from esa.provenance import code_version, rule_versions
from esa.recovery import recover
from esa.step_table import GPU_STEPS

# the user's --configfile files as written (keys left out take the schema's defaults); the
# embedded default config/config.yaml only when no config file is given
try:
    STUDY = study_config(config, [str(path) for path in workflow.config_settings.configfiles])
except ESAError as err:
    raise WorkflowError(str(err))
config.clear()
config.update(STUDY)

# a run after a killed or damaged one: stale locks and damaged results go (esa/recovery.py)
if workflow.is_main_process:
    recover()

ENV = os.path.join(workflow.basedir, "envs", "esa.yaml")
SOURCES = {m["name"]: m["source"] for m in study_models(config)}  # model name -> source
LAYOUT = Layout(config)  # paths with a {model} wildcard
EXPERIMENTS = LAYOUT.experiments
LAYER_GROUPS = config["scoring"]["layer_groups"]
SPLIT = LAYER_GROUPS > 1
# inputs that only order jobs: a step never reads them
ORDER_ONLY = ("eval_checked",)


BASE_RESOURCES = {"mem_mb": 8000, "runtime": 60}


def _resources(step):
    """A step's resources: built-in base, then `resources.default`, then `resources.<step>`
    (its own key, esa/step_table.py).

    Threads, unless the config sets them: 2 for a job that runs the model, 1 for a table step,
    so the short table jobs run side by side. On 2 CPU cores two model jobs of one thread each
    are no faster (measured: 18.4 vs 17.2 min for the default study), and two hutchinson_diag
    jobs at once (13.6 GB each) exhaust 24 GB. Snakemake hands a job's threads to torch as
    OMP_NUM_THREADS.
    """
    gpu = step in GPU_STEPS
    base = {**BASE_RESOURCES, "threads": 2 if gpu else 1, "gpu": int(gpu)}
    return {**base, **config["resources"]["default"], **config["resources"].get(step, {})}


def threads(step):
    return _resources(step)["threads"]


def res(step):
    """The `resources:` of a step's rules (everything but threads)."""
    dropped = ("threads",) if step in GPU_STEPS else ("threads", "gpu_model")  # no GPU, no GPU model
    return {key: value for key, value in _resources(step).items() if key not in dropped}


def spec(**params):
    """A step's parameters as the JSON string handed to `esa run` (and tracked by Snakemake)."""
    return json.dumps(params, sort_keys=True)


# jobs run the interpreter that runs Snakemake (a venv's, activated or not), unless --use-conda
# or a container gives each rule its own environment, whose `python` that is
PYTHON = "python" if workflow.deployment_settings.deployment_method else shlex.quote(sys.executable)


def esa_shell(step):
    """The command that runs `step` with its spec and every named input and output."""
    return f"{PYTHON} -m esa run {step} --spec {{params.spec:q}} {{params.paths}} 2> {{log}}"


def step_paths(wildcards, input, output):
    """`name=path` of each named input and output (`esa run` nests `a/b=` keys into dicts)."""
    named = [*input.items(), *output.items()]
    return " ".join(f"{name}={shlex.quote(path)}" for name, path in named if name not in ORDER_ONLY)


def named(paths):
    """A nested {name: path or {key: ...}} as the flat named files of `input:`/`output:`."""
    return flatten_paths(paths)


def check_experiments():
    largest = max((e["topk"] for e in EXPERIMENTS.values()), default=0)
    if largest > config["scoring"]["candidates"]:
        raise WorkflowError(
            f"scoring.candidates {config['scoring']['candidates']} is smaller than the largest "
            f"topk {largest}; candidates must be >= every experiment's topk"
        )
    counts = [k for k in config["quantize"]["protect"] if isinstance(k, int)]
    if LAYOUT.quantize() and max(counts, default=0) > config["scoring"]["candidates"]:
        raise WorkflowError(
            f"quantize.protect {max(counts)} is more than scoring.candidates "
            f"{config['scoring']['candidates']}: a global top-k is exact only for k <= the candidates kept per tensor"
        )
    if LAYOUT.quantize() and not EXPERIMENTS:
        raise WorkflowError(
            "quantize.schemes needs at least one experiment: it protects the scored metrics' top-k "
            "and the super weights confirm finds"
        )


check_experiments()


def scores_outputs(job, part):
    """The files of one scores job (a layer-group part of them when `part` is given)."""
    return {
        metric: LAYOUT.score_files(
            metric,
            part=part,
            activations=REGISTRY[metric].trace,
            full_scores=config["scoring"]["save_full_scores"],
        )
        for metric in SCORE_JOBS[job]
    }


def perturb_params(wildcards):
    """The experiment settings a perturb job runs with."""
    return LAYOUT.perturb_experiment(wildcards.metric, wildcards.mode, int(wildcards.k), wildcards.tag)


def perturb_inputs(wildcards):
    e, layout = perturb_params(wildcards), LAYOUT.of(wildcards.model)
    masks = {s: layout.mask(e["metric"], e["mode"], e["topk"], s) for s in e["seeds"]}
    return named(
        {
            "model": layout.model_ref,
            "eval": layout.data_files("eval")["windows"],
            "baseline": layout.baseline_files()["metrics"],
            "baseline_windows": layout.baseline_files()["windows"],
            "masks": masks,
        }
    )


def stability_inputs(wildcards):
    seeds, layout = LAYOUT.seeds_of(wildcards.metric, wildcards.mode, int(wildcards.k)), LAYOUT.of(
        wildcards.model
    )
    return named(
        {
            "masks": {s: layout.mask(wildcards.metric, wildcards.mode, wildcards.k, s) for s in seeds},
            "candidates": {s: layout.score_files(wildcards.metric, s)["candidates"] for s in seeds},
        }
    )


def agreement_inputs(wildcards):
    return named({"masks": LAYOUT.of(wildcards.model).agreement_masks(wildcards.mode, wildcards.k)})


def culprit_inputs(wildcards):
    return LAYOUT.of(wildcards.model).culprit_inputs(wildcards.experiment)

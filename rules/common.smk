"""Config validation, the results layout, and the helpers every rule shares.

Each rule reads as inputs -> step -> outputs. Its files come from `LAYOUT` (esa/layout.py,
the one home of every path, and of what each step reads), its parameters from `job_spec(step)`
(esa/specs.py), and its command is `esa_shell(step)`, which hands the step every named input
and output. Every output path holds its step's key (a hash of what it depends on), the `{key}`
wildcard; `job_spec` checks it, so configs that differ write side by side and share the rest.
"""

import os
import shlex
import sys

# jobs (local, conda or Slurm) run `python -m esa` from the workflow checkout, installed or not
shell.prefix(f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

from esa.config import study_config
from esa.devices import DEVICE_VARIABLE, resolve_auto
from esa.precision import PRECISION_VARIABLE, resolve_mixed_precision
from esa.errors import ESAError
from esa.layout import KEY, Layout, flatten_paths
from esa.metrics import SCORE_JOBS, TRACE_METRIC
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


# `auto` device and mixed precision resolved before they enter a key, where Snakemake runs
# (esa/devices.py, esa/precision.py); a job a cluster started on its node parses this file
# again and takes the head's resolutions
if workflow.remote_exec and DEVICE_VARIABLE in os.environ:
    DEVICE = os.environ[DEVICE_VARIABLE]
    MIXED_PRECISION = os.environ[PRECISION_VARIABLE]
else:
    DEVICE = os.environ[DEVICE_VARIABLE] = resolve_auto(config["device"])
    MIXED_PRECISION = os.environ[PRECISION_VARIABLE] = resolve_mixed_precision(
        config["mixed_precision"], DEVICE, config["dtype"]
    )


envvars:
    DEVICE_VARIABLE,
    PRECISION_VARIABLE,


LAYOUT = Layout(
    config, device=DEVICE, mixed_precision=MIXED_PRECISION
)  # paths with {model} and {key} wildcards
# each hub model's and dataset's revision pinned to the commit it names now (esa/revisions.py),
# here, once: one that cannot be resolved stops the planning on its one line
try:
    for name in LAYOUT.models:
        LAYOUT.of(name).revisions()
except ESAError as err:
    raise WorkflowError(str(err))
EXPERIMENTS = LAYOUT.experiments
SPLIT = LAYOUT.split


def _job(wildcards, fixed):
    """The layout of a job's model and its wildcards (besides model and key) by name."""
    names = [name for name in wildcards.keys() if name not in ("model", "key")]
    layout = LAYOUT.of(wildcards.model) if "model" in wildcards.keys() else LAYOUT
    return layout, {**{name: wildcards[name] for name in names}, **fixed}


def job_inputs(step, **fixed):
    """The input function of `step`'s rule: its named files (esa/layout.py)."""

    def inputs(wildcards):
        layout, values = _job(wildcards, fixed)
        return flatten_paths(layout.inputs(step, **values))

    return inputs


def job_spec(step, **fixed):
    """The spec param of `step`'s rule (esa/specs.py), once its output key is checked."""

    def spec(wildcards):
        layout, values = _job(wildcards, fixed)
        try:
            return layout.job_spec(step, wildcards.key, **values)
        except ESAError as err:
            raise WorkflowError(str(err))

    return spec


# jobs run the interpreter that runs Snakemake (a venv's, activated or not), unless --use-conda
# or a container gives each rule its own environment, whose `python` that is
PYTHON = "python" if workflow.deployment_settings.deployment_method else shlex.quote(sys.executable)


def esa_shell(step):
    """The command that runs `step` with its spec and every named input and output."""
    return f"{PYTHON} -m esa run {step} --spec {{params.spec:q}} {{params.paths}} 2> {{log}}"


def step_paths(wildcards, input, output):
    """`name=path` of each named input and output (`esa run` nests `a/b=` keys into dicts)."""
    named = [*input.items(), *output.items()]
    return " ".join(f"{name}={shlex.quote(path)}" for name, path in named)


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

"""Config validation, result paths and the per-step parameter specs the rules pass to `esa`."""

import json
import os
import sys

sys.path.insert(0, workflow.basedir)
# jobs (local, conda or Slurm) run `python -m esa` from the workflow checkout, installed or not
shell.prefix(f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

from esa.config import validate_config
from esa.errors import ESAError

try:
    validate_config(config)
except ESAError as err:
    raise WorkflowError(str(err))

ENV = os.path.join(workflow.basedir, "envs", "esa.yaml")
MODEL = config["model"]["name"]
RESULTS = f"results/{MODEL}"


def spec(**params):
    """A step's parameters as the JSON string handed to `esa run` (and tracked by Snakemake)."""
    return json.dumps(params, sort_keys=True)


def model_spec():
    return spec(source=config["model"]["source"])


def data_spec():
    return spec(model=config["model"]["source"], **config["data"])


def runtime_spec(**params):
    """Parameters of a step that runs the model: where, in which precision, how the loss is chunked."""
    keys = ("device", "dtype", "attn_implementation", "loss_chunk")
    return spec(model=config["model"]["source"], **{k: config[k] for k in keys}, **params)


def all_targets():
    return [f"{RESULTS}/baseline/metrics.json"]

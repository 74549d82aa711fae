"""ESA: Extreme Sensitivity Analysis of causal language models (see README.md)."""

import os

from snakemake.utils import min_version

min_version("8.0")


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/baseline.smk"
include: "rules/scores.smk"
include: "rules/topk.smk"
include: "rules/perturb.smk"


rule all:
    input:
        all_targets(),
    default_target: True

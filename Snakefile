"""ESA: Extreme Sensitivity Analysis of causal language models (see README.md)."""

import os

from snakemake.utils import min_version

min_version("8.0")


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


wildcard_constraints:
    seed=r"\d+",
    group=r"\d+",
    k=r"\d+",
    metric="grad_x_weight|grad_squared|hutchinson_diag|activation_magnitude",
    mode="global|per_layer|per_tensor",


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/baseline.smk"
include: "rules/scores.smk"
include: "rules/topk.smk"
include: "rules/perturb.smk"
include: "rules/report.smk"


onsuccess:
    if config["report"] and os.path.exists(f"{LAYOUT.report}/verdict.json"):
        from esa.summary import summary_text

        print(summary_text(RESULTS))


rule all:
    input:
        all_targets(),
    default_target: True

"""ESA: Extreme Sensitivity Analysis of causal language models (see README.md)."""

import os
import sys

from snakemake.utils import min_version

sys.path.insert(0, workflow.basedir)
from esa.jobserver import ADDRESS_ENV, Server
from esa.layout import KEY_PATTERN
from esa.metrics import METRICS
from esa.names import DATA_PARTS, MODES, alternatives

min_version("8.0")


include: "rules/common.smk"


wildcard_constraints:
    key=KEY_PATTERN,
    seed=r"\d+",
    group=r"\d+",
    k=r"\d+",
    metric=alternatives(METRICS),
    mode=alternatives(MODES),
    part=alternatives(DATA_PARTS),
    model=alternatives(LAYOUT.models),


include: "rules/model.smk"
include: "rules/data.smk"
include: "rules/baseline.smk"
include: "rules/scores.smk"
include: "rules/topk.smk"
include: "rules/perturb.smk"
include: "rules/stability.smk"
include: "rules/confirm.smk"
include: "rules/culprits.smk"
include: "rules/mechanism.smk"
include: "rules/behaviour.smk"
include: "rules/published.smk"
include: "rules/quantize.smk"
include: "rules/report.smk"


JOB_SERVER = Server()


onstart:
    if workflow.local_exec and config["job_server"]:
        os.environ[ADDRESS_ENV] = JOB_SERVER.start()


onerror:
    JOB_SERVER.stop()


onsuccess:
    JOB_SERVER.stop()
    from esa.summary import summary_text

    done = [
        os.path.dirname(LAYOUT.of(m).report_files()["verdicts"])
        for m in LAYOUT.models
        if os.path.exists(LAYOUT.of(m).report_files()["verdicts"])
    ]
    if config["report"] and done:
        print(summary_text(*done))


rule all:
    default_target: True
    input:
        LAYOUT.all_files(),

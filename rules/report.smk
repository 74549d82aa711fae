rule confirm:
    """Super-weight confirmation: zero each metric's global top-N weights one at a time."""
    input:
        model=rules.model.output.ref,
        eval=f"{RESULTS}/data/eval.parquet",
        baseline=f"{RESULTS}/baseline/metrics.json",
        candidates=lambda wildcards: [
            f"{SCORES.format(metric=m, seed=LAYOUT.confirm_seed())}/candidates.parquet" for m in LAYOUT.scored_metrics()
        ],
    output:
        super_weights=f"{LAYOUT.confirm}/super_weights.parquet",
        activations=f"{LAYOUT.confirm}/activations.parquet",
        rerun=f"{LAYOUT.confirm}/baseline_rerun.json",
    params:
        code=code_version("confirm"),
        spec=runtime_spec(
            metrics=LAYOUT.scored_metrics(),
            seed=LAYOUT.confirm_seed(),
            top_n=config["confirm"]["top_n"],
            factor=config["confirm"]["factor"],
            batch_size=config["baseline"]["batch_size"],
        ),
        candidates=lambda wildcards, input: ",".join(input.candidates),
    threads: res("confirm")["threads"]
    resources:
        mem_mb=res("confirm")["mem_mb"],
        runtime=res("confirm")["runtime"],
        gpu=res("confirm")["gpu"],
        gpu_model=res("confirm").get("gpu_model", ""),
    conda:
        ENV
    log:
        f"logs/{MODEL}/confirm.log",
    shell:
        "python -m esa run confirm --spec {params.spec:q} model={input.model} eval={input.eval}"
        " baseline={input.baseline} candidates={params.candidates} super_weights={output.super_weights}"
        " activations={output.activations} rerun={output.rerun} 2> {log}"


rule report:
    """verdict.json and the self-contained report page of the whole study."""
    input:
        LAYOUT.report_inputs(),
    output:
        verdicts=f"{LAYOUT.report}/verdict.json",
        index=report(f"{LAYOUT.report}/index.html", category="Report", caption="../report/index.rst"),
        plots=directory(f"{LAYOUT.report}/plots"),
    params:
        code=code_version("report"),
        spec=spec(config=config_for_report(), thresholds=config["verdicts"]),
    threads: res("report")["threads"]
    resources:
        mem_mb=res("report")["mem_mb"],
        runtime=res("report")["runtime"],
        gpu=res("report")["gpu"],
    conda:
        ENV
    log:
        f"logs/{MODEL}/report.log",
    shell:
        "python -m esa run report --spec {params.spec:q} verdicts={output.verdicts} index={output.index} 2> {log}"

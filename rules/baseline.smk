rule baseline:
    input:
        model=rules.model.output.ref,
        eval=rules.data.output.eval,
    output:
        metrics=f"{RESULTS}/baseline/metrics.json",
        windows=f"{RESULTS}/baseline/windows.parquet",
        manifest=f"{RESULTS}/baseline/experiment_manifest.json",
        config=f"{RESULTS}/baseline/config.json",
    params:
        spec=runtime_spec(batch_size=config["baseline"]["batch_size"], data=config["data"]),
    conda:
        ENV
    log:
        f"logs/{MODEL}/baseline.log",
    shell:
        "python -m esa run baseline --spec {params.spec:q} model={input.model} eval={input.eval}"
        " metrics={output.metrics} windows={output.windows} manifest={output.manifest}"
        " config={output.config} 2> {log}"

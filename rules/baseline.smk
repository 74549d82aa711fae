rule baseline:
    input:
        model=rules.model.output.ref,
        eval=f"{RESULTS}/data/eval.parquet",
    output:
        metrics=f"{RESULTS}/baseline/metrics.json",
        windows=f"{RESULTS}/baseline/windows.parquet",
        manifest=f"{RESULTS}/baseline/experiment_manifest.json",
        config=f"{RESULTS}/baseline/config.json",
    params:
        code=code_version("baseline"),
        spec=runtime_spec(batch_size=config["baseline"]["batch_size"], data=config["data"]),
    threads: res("baseline")["threads"]
    resources:
        mem_mb=res("baseline")["mem_mb"],
        runtime=res("baseline")["runtime"],
        gpu=res("baseline")["gpu"],
        gpu_model=res("baseline").get("gpu_model", ""),
    conda:
        ENV
    log:
        f"logs/{MODEL}/baseline.log",
    shell:
        "python -m esa run baseline --spec {params.spec:q} model={input.model} eval={input.eval}"
        " metrics={output.metrics} windows={output.windows} manifest={output.manifest}"
        " config={output.config} 2> {log}"

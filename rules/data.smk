rule model:
    output:
        ref=f"{RESULTS}/model/model.json",
    params:
        spec=model_spec(),
    conda:
        ENV
    log:
        f"logs/{MODEL}/model.log",
    shell:
        "python -m esa run model --spec {params.spec:q} ref={output.ref} 2> {log}"


rule data:
    input:
        model=rules.model.output.ref,
    output:
        calib=f"{RESULTS}/data/calib.parquet",
        eval=f"{RESULTS}/data/eval.parquet",
        summary=f"{RESULTS}/data/summary.json",
    params:
        spec=data_spec(),
    conda:
        ENV
    log:
        f"logs/{MODEL}/data.log",
    shell:
        "python -m esa run data --spec {params.spec:q} model={input.model} calib={output.calib}"
        " eval={output.eval} summary={output.summary} 2> {log}"

rule model:
    output:
        ref=f"{RESULTS}/model/model.json",
    params:
        code=code_version("model"),
        spec=model_spec(),
    threads: res("model")["threads"]
    resources:
        mem_mb=res("model")["mem_mb"],
        runtime=res("model")["runtime"],
        gpu=res("model")["gpu"],
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
        windows=f"{RESULTS}/data/{{part}}.parquet",
        summary=f"{RESULTS}/data/{{part}}.json",
    params:
        code=code_version("data"),
        spec=lambda wildcards: data_spec(wildcards.part),
    wildcard_constraints:
        part="calib|eval",
    threads: res("data")["threads"]
    resources:
        mem_mb=res("data")["mem_mb"],
        runtime=res("data")["runtime"],
        gpu=res("data")["gpu"],
    conda:
        ENV
    log:
        f"logs/{MODEL}/data_{{part}}.log",
    shell:
        "python -m esa run data --spec {params.spec:q} model={input.model}"
        " windows={output.windows} summary={output.summary} 2> {log}"

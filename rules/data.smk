rule model:
    output:
        ref=LAYOUT.model_ref,
    log:
        LAYOUT.log("model"),
    conda:
        ENV
    threads: threads("model")
    resources:
        **res("model"),
    params:
        code=code_version("model"),
        spec=model_spec,
        paths=step_paths,
    shell:
        esa_shell("model")


rule data:
    input:
        model=LAYOUT.model_ref,
    output:
        **LAYOUT.data_files(),
    log:
        LAYOUT.log("data_{part}"),
    conda:
        ENV
    threads: threads("data")
    resources:
        **res("data"),
    params:
        code=code_version("data"),
        spec=lambda wildcards: data_spec(wildcards.model, wildcards.part),
        paths=step_paths,
    shell:
        esa_shell("data")

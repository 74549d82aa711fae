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

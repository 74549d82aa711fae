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
        spec=job_spec("model"),
        paths=step_paths,
    shell:
        esa_shell("model")

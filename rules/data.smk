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
        spec=data_spec,
        paths=step_paths,
    shell:
        esa_shell("data")

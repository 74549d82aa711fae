rule data:
    input:
        unpack(job_inputs("data")),
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
        spec=job_spec("data"),
        paths=step_paths,
    shell:
        esa_shell("data")

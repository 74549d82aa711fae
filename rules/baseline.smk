rule baseline:
    input:
        unpack(job_inputs("baseline")),
    output:
        **LAYOUT.baseline_files(),
    log:
        LAYOUT.log("baseline"),
    conda:
        ENV
    threads: threads("baseline")
    resources:
        **res("baseline"),
    params:
        code=code_version("baseline"),
        spec=job_spec("baseline"),
        paths=step_paths,
    shell:
        esa_shell("baseline")

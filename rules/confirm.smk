rule confirm:
    """Super-weight confirmation: zero each metric's global top-N weights one at a time."""
    input:
        unpack(job_inputs("confirm")),
    output:
        **LAYOUT.confirm_files(),
    log:
        LAYOUT.log("confirm"),
    conda:
        ENV
    threads: threads("confirm")
    resources:
        **res("confirm"),
    params:
        code=code_version("confirm"),
        spec=job_spec("confirm"),
        paths=step_paths,
    shell:
        esa_shell("confirm")

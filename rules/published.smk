rule published:
    """Where each metric ranks the super weights published for the model, and whether confirm confirmed them."""
    input:
        unpack(job_inputs("published")),
    output:
        **LAYOUT.published_files(),
    log:
        LAYOUT.log("published"),
    conda:
        ENV
    threads: threads("published")
    resources:
        **res("published"),
    params:
        code=code_version("published"),
        spec=job_spec("published"),
        paths=step_paths,
    shell:
        esa_shell("published")

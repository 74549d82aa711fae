rule published:
    """Where each metric ranks the super weights published for the model, and whether confirm confirmed them."""
    input:
        **named(LAYOUT.published_inputs()),
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
        spec=published_spec,
        paths=step_paths,
    shell:
        esa_shell("published")

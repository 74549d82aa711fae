rule mechanism:
    """How each confirmed super weight acts: scale sweep, massive-activation restore, matched control."""
    input:
        unpack(job_inputs("mechanism")),
    output:
        **LAYOUT.mechanism_files(),
    log:
        LAYOUT.log("mechanism"),
    conda:
        ENV
    threads: threads("mechanism")
    resources:
        **res("mechanism"),
    params:
        code=code_version("mechanism"),
        spec=job_spec("mechanism"),
        paths=step_paths,
    shell:
        esa_shell("mechanism")

rule culprits:
    """Adaptive group testing: which weights of one experiment's destructive top set do the damage."""
    input:
        unpack(job_inputs("culprits")),
    output:
        **LAYOUT.culprit_files(),
    log:
        LAYOUT.log("culprits_{experiment}"),
    wildcard_constraints:
        experiment=alternatives(LAYOUT.culprit_experiments()),
    conda:
        ENV
    threads: threads("culprits")
    resources:
        **res("culprits"),
    params:
        code=code_version("culprits"),
        spec=job_spec("culprits"),
        paths=step_paths,
    shell:
        esa_shell("culprits")

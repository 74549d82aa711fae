rule behaviour:
    """Behaviour beside perplexity: greedy continuations and attention-sink mass, baseline and each super weight zeroed."""
    input:
        unpack(job_inputs("behaviour")),
    output:
        **LAYOUT.behaviour_files(),
    log:
        LAYOUT.log("behaviour"),
    conda:
        ENV
    threads: threads("behaviour")
    resources:
        **res("behaviour"),
    params:
        code=code_version("behaviour"),
        spec=job_spec("behaviour"),
        paths=step_paths,
    shell:
        esa_shell("behaviour")

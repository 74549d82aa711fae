rule stability:
    """Jaccard and Spearman of one (metric, mode, k)'s top-k across seeds."""
    input:
        unpack(job_inputs("stability")),
    output:
        **LAYOUT.stability_files(),
    log:
        LAYOUT.log("stability_{metric}_{mode}_k{k}"),
    conda:
        ENV
    threads: threads("stability")
    resources:
        **res("stability"),
    params:
        code=code_version("stability"),
        spec=job_spec("stability"),
        paths=step_paths,
    shell:
        esa_shell("stability")


rule agreement:
    """Jaccard between the metrics' top-k sets at one (mode, k), per seed."""
    input:
        unpack(job_inputs("agreement")),
    output:
        agreement=LAYOUT.agreement(),
    log:
        LAYOUT.log("agreement_{mode}_k{k}"),
    conda:
        ENV
    threads: threads("agreement")
    resources:
        **res("agreement"),
    params:
        code=code_version("agreement"),
        spec=job_spec("agreement"),
        paths=step_paths,
    shell:
        esa_shell("agreement")

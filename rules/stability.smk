rule stability:
    """Jaccard and Spearman of one (metric, mode, k)'s top-k across seeds."""
    input:
        unpack(stability_inputs),
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
        spec=lambda wildcards: spec(
            metric=wildcards.metric,
            mode=wildcards.mode,
            k=int(wildcards.k),
            seeds=LAYOUT.seeds_of(wildcards.metric, wildcards.mode, int(wildcards.k)),
        ),
        paths=step_paths,
    shell:
        esa_shell("stability")


rule agreement:
    """Jaccard between the metrics' top-k sets at one (mode, k), per seed."""
    input:
        unpack(agreement_inputs),
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
        spec=lambda wildcards: spec(
            mode=wildcards.mode, k=int(wildcards.k), metrics=LAYOUT.scored_metrics(), seeds=config["seeds"]
        ),
        paths=step_paths,
    shell:
        esa_shell("agreement")

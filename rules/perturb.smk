rule perturb:
    """Top-k vs controls of one (metric, mode, k, perturbation, scale), every seed, one model load."""
    input:
        model=rules.model.output.ref,
        eval=f"{RESULTS}/data/eval.parquet",
        baseline=f"{RESULTS}/baseline/metrics.json",
        masks=perturb_masks,
    output:
        results=PERTURB,
        manifest=PERTURB.replace("results.parquet", "experiment_manifest.json"),
    params:
        code=code_version("perturb"),
        spec=lambda wildcards: runtime_spec(
            perturb=perturb_params(wildcards)["perturb"],
            scale=perturb_params(wildcards)["scale"],
            noise=perturb_params(wildcards)["noise"],
            controls=perturb_params(wildcards)["controls"],
            seeds=perturb_params(wildcards)["seeds"],
            batch_size=config["baseline"]["batch_size"],
        ),
        masks=lambda wildcards, input: ",".join(input.masks),
    wildcard_constraints:
        mode="global|per_layer|per_tensor",
        k=r"\d+",
    threads: res("perturb")["threads"]
    resources:
        mem_mb=res("perturb")["mem_mb"],
        runtime=res("perturb")["runtime"],
        gpu=res("perturb")["gpu"],
        gpu_model=res("perturb").get("gpu_model", ""),
    conda:
        ENV
    log:
        f"logs/{MODEL}/perturb_{{metric}}_{{mode}}_k{{k}}_{{tag}}.log",
    shell:
        "python -m esa run perturb --spec {params.spec:q} model={input.model} eval={input.eval}"
        " baseline={input.baseline} masks={params.masks} results={output.results}"
        " manifest={output.manifest} 2> {log}"


rule stability:
    """Jaccard and Spearman of one (metric, mode, k)'s top-k across seeds."""
    input:
        unpack(stability_inputs),
    output:
        pairs=f"{LAYOUT.stability}/pairs.parquet",
        summary=f"{LAYOUT.stability}/summary.json",
    params:
        code=code_version("stability"),
        spec=lambda wildcards: spec(
            metric=wildcards.metric, mode=wildcards.mode, k=int(wildcards.k),
            seeds=LAYOUT.seeds_of(wildcards.metric, wildcards.mode, int(wildcards.k)),
        ),
        masks=lambda wildcards, input: ",".join(input.masks),
        candidates=lambda wildcards, input: ",".join(input.candidates),
    wildcard_constraints:
        mode="global|per_layer|per_tensor",
        k=r"\d+",
    threads: res("stability")["threads"]
    resources:
        mem_mb=res("stability")["mem_mb"],
        runtime=res("stability")["runtime"],
        gpu=res("stability")["gpu"],
    conda:
        ENV
    log:
        f"logs/{MODEL}/stability_{{metric}}_{{mode}}_k{{k}}.log",
    shell:
        "python -m esa run stability --spec {params.spec:q} masks={params.masks}"
        " candidates={params.candidates} pairs={output.pairs} summary={output.summary} 2> {log}"


rule agreement:
    """Jaccard between the metrics' top-k sets at one (mode, k), per seed."""
    input:
        masks=lambda wildcards: [
            MASK.format(metric=m, mode=wildcards.mode, k=wildcards.k, seed=s)
            for m in LAYOUT.agreement_metrics()
            for s in config["seeds"]
        ],
    output:
        agreement=LAYOUT.agreement,
    params:
        code=code_version("agreement"),
        spec=lambda wildcards: spec(
            mode=wildcards.mode, k=int(wildcards.k), metrics=LAYOUT.agreement_metrics(), seeds=config["seeds"]
        ),
        masks=lambda wildcards, input: ",".join(input.masks),
    wildcard_constraints:
        mode="global|per_layer|per_tensor",
        k=r"\d+",
    threads: res("stability")["threads"]
    resources:
        mem_mb=res("stability")["mem_mb"],
        runtime=res("stability")["runtime"],
        gpu=res("stability")["gpu"],
    conda:
        ENV
    log:
        f"logs/{MODEL}/agreement_{{mode}}_k{{k}}.log",
    shell:
        "python -m esa run agreement --spec {params.spec:q} masks={params.masks}"
        " agreement={output.agreement} 2> {log}"

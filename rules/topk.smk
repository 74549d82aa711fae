rule topk:
    """Top-k of one (metric, mode, k, seed) with its random_k and bottom_k controls."""
    input:
        candidates=f"{SCORES}/candidates.parquet",
        stats=f"{SCORES}/stats.parquet",
    output:
        mask=MASK,
    params:
        code=code_version("topk"),
        spec=lambda wildcards: spec(mode=wildcards.mode, k=int(wildcards.k), seed=int(wildcards.seed)),
    wildcard_constraints:
        mode="global|per_layer|per_tensor",
        k=r"\d+",
        seed=r"\d+",
    threads: res("topk")["threads"]
    resources:
        mem_mb=res("topk")["mem_mb"],
        runtime=res("topk")["runtime"],
        gpu=res("topk")["gpu"],
    conda:
        ENV
    log:
        f"logs/{MODEL}/topk_{{metric}}_{{mode}}_k{{k}}_seed{{seed}}.log",
    shell:
        "python -m esa run topk --spec {params.spec:q} candidates={input.candidates}"
        " stats={input.stats} mask={output.mask} 2> {log}"


rule plots:
    """Score distribution and hotspot heatmaps (the runbook's --save-plots)."""
    input:
        stats=f"{SCORES}/stats.parquet",
        mask=MASK,
    output:
        distribution=report(f"{PLOTS}/distribution.png", category="Scores", caption="../report/figure.rst"),
        hotspots=report(f"{PLOTS}/hotspots.png", category="Hotspots", caption="../report/figure.rst"),
    params:
        code=code_version("plots"),
        spec=lambda wildcards: spec(metric=wildcards.metric, mode=wildcards.mode, k=int(wildcards.k), seed=int(wildcards.seed)),
    threads: res("plots")["threads"]
    resources:
        mem_mb=res("plots")["mem_mb"],
        runtime=res("plots")["runtime"],
        gpu=res("plots")["gpu"],
    conda:
        ENV
    log:
        f"logs/{MODEL}/plots_{{metric}}_{{mode}}_k{{k}}_seed{{seed}}.log",
    shell:
        "python -m esa run plots --spec {params.spec:q} stats={input.stats} mask={input.mask}"
        " distribution={output.distribution} hotspots={output.hotspots} 2> {log}"


rule activation_plot:
    """The massive-activation trace of every mlp.down_proj (activation_magnitude scoring)."""
    input:
        activations=f"{RESULTS}/scores/activation_magnitude/seed{{seed}}/activations.parquet",
    output:
        plot=f"{RESULTS}/plots/activation_magnitude/seed{{seed}}/massive_activations.png",
    params:
        code=code_version("activation_plot"),
        spec=lambda wildcards: spec(seed=int(wildcards.seed)),
    threads: res("plots")["threads"]
    resources:
        mem_mb=res("plots")["mem_mb"],
        runtime=res("plots")["runtime"],
        gpu=res("plots")["gpu"],
    conda:
        ENV
    log:
        f"logs/{MODEL}/activation_plot_seed{{seed}}.log",
    shell:
        "python -m esa run activation_plot --spec {params.spec:q} activations={input.activations}"
        " plot={output.plot} 2> {log}"

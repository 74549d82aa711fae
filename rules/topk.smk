rule topk:
    """Top-k of one (metric, mode, k, seed) with its random_k and bottom_k controls."""
    input:
        candidates=LAYOUT.score_files()["candidates"],
        stats=LAYOUT.score_files()["stats"],
    output:
        mask=LAYOUT.mask(),
    log:
        LAYOUT.log("topk_{metric}_{mode}_k{k}_seed{seed}"),
    conda:
        ENV
    threads: threads("topk")
    resources:
        **res("topk"),
    params:
        code=code_version("topk"),
        spec=topk_spec,
        paths=step_paths,
    shell:
        esa_shell("topk")


rule plots:
    """Score distribution and hotspot heatmaps (the runbook's --save-plots)."""
    input:
        stats=LAYOUT.score_files()["stats"],
        mask=LAYOUT.mask(),
    output:
        distribution=report(
            LAYOUT.plot_files()["distribution"], category="Scores", caption="../report/figure.rst"
        ),
        hotspots=report(LAYOUT.plot_files()["hotspots"], category="Hotspots", caption="../report/figure.rst"),
    log:
        LAYOUT.log("plots_{metric}_{mode}_k{k}_seed{seed}"),
    conda:
        ENV
    threads: threads("plots")
    resources:
        **res("plots"),
    params:
        code=code_version("plots"),
        spec=plots_spec,
        paths=step_paths,
    shell:
        esa_shell("plots")


rule activation_plot:
    """The massive-activation trace of every MLP output projection (activation_magnitude scoring)."""
    input:
        activations=LAYOUT.score_files(TRACE_METRIC, activations=True)["activations"],
    output:
        plot=LAYOUT.activation_plot(),
    log:
        LAYOUT.log("activation_plot_seed{seed}"),
    conda:
        ENV
    threads: threads("activation_plot")
    resources:
        **res("activation_plot"),
    params:
        code=code_version("activation_plot"),
        spec=activation_plot_spec,
        paths=step_paths,
    shell:
        esa_shell("activation_plot")

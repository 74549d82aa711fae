rule topk:
    """Top-k of one (metric, mode, k, seed) with its random_k and bottom_k controls."""
    input:
        unpack(job_inputs("topk")),
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
        spec=job_spec("topk"),
        paths=step_paths,
    shell:
        esa_shell("topk")


rule plots:
    """Score distribution and hotspot heatmaps (the runbook's --save-plots)."""
    input:
        unpack(job_inputs("plots")),
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
        spec=job_spec("plots"),
        paths=step_paths,
    shell:
        esa_shell("plots")


rule activation_plot:
    """The massive-activation trace of every MLP output projection (activation_magnitude scoring)."""
    input:
        unpack(job_inputs("activation_plot")),
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
        spec=job_spec("activation_plot"),
        paths=step_paths,
    shell:
        esa_shell("activation_plot")

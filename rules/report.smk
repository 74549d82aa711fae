rule confirm:
    """Super-weight confirmation: zero each metric's global top-N weights one at a time."""
    input:
        **named(
            {
                "model": LAYOUT.model_ref,
                "eval": LAYOUT.data_files("eval")["windows"],
                "baseline": LAYOUT.baseline_files()["metrics"],
                "baseline_windows": LAYOUT.baseline_files()["windows"],
                **LAYOUT.confirm_inputs(),
            }
        ),
    output:
        **LAYOUT.confirm_files(),
    log:
        LAYOUT.log("confirm"),
    conda:
        ENV
    threads: threads("confirm")
    resources:
        **res("confirm"),
    params:
        code=code_version("confirm"),
        spec=lambda wildcards: runtime_spec(
            wildcards.model,
            metrics=LAYOUT.scored_metrics(),
            seed=LAYOUT.confirm_seed(),
            top_n=config["confirm"]["top_n"],
            factor=config["confirm"]["factor"],
            batch_size=config["baseline"]["batch_size"],
            bootstrap=config["bootstrap"],
        ),
        paths=step_paths,
    shell:
        esa_shell("confirm")


rule report:
    """verdict.json and the self-contained report page of the whole study."""
    input:
        unpack(lambda wildcards: named(LAYOUT.of(wildcards.model).report_inputs())),
    output:
        verdicts=LAYOUT.report_files()["verdicts"],
        index=report(LAYOUT.report_files()["index"], category="Report", caption="../report/index.rst"),
        plots=directory(LAYOUT.report_files()["plots"]),
    log:
        LAYOUT.log("report"),
    conda:
        ENV
    threads: threads("report")
    resources:
        **res("report"),
    params:
        code=code_version("report"),
        spec=report_spec,
        paths=step_paths,
    shell:
        esa_shell("report")


rule comparison:
    """The study's models side by side: baseline, super weights, massive activations, heavy tails, agreement."""
    input:
        **named(LAYOUT.comparison_inputs()),
    output:
        index=LAYOUT.comparison(),
    log:
        f"logs/{COMPARISON}.log",
    conda:
        ENV
    threads: threads("comparison")
    resources:
        **res("comparison"),
    params:
        code=code_version("comparison"),
        spec=spec(models=LAYOUT.models, metrics=LAYOUT.scored_metrics(), factor=config["confirm"]["factor"]),
        paths=step_paths,
    shell:
        esa_shell("comparison")

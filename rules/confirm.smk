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

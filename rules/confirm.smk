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
        spec=confirm_spec,
        paths=step_paths,
    shell:
        esa_shell("confirm")

rule mechanism:
    """How each confirmed super weight acts: scale sweep, massive-activation restore, matched control."""
    input:
        **named(
            {
                "model": LAYOUT.model_ref,
                "eval": LAYOUT.data_files("eval")["windows"],
                "baseline": LAYOUT.baseline_files()["metrics"],
                "baseline_windows": LAYOUT.baseline_files()["windows"],
                "super_weights": LAYOUT.confirm_files()["super_weights"],
            }
        ),
    output:
        **LAYOUT.mechanism_files(),
    log:
        LAYOUT.log("mechanism"),
    conda:
        ENV
    threads: threads("mechanism")
    resources:
        **res("mechanism"),
    params:
        code=code_version("mechanism"),
        spec=mechanism_spec,
        paths=step_paths,
    shell:
        esa_shell("mechanism")

rule baseline:
    input:
        model=LAYOUT.model_ref,
        eval=LAYOUT.data_files("eval")["windows"],
    output:
        **LAYOUT.baseline_files(),
    log:
        LAYOUT.log("baseline"),
    conda:
        ENV
    threads: threads("baseline")
    resources:
        **res("baseline"),
    params:
        code=code_version("baseline"),
        spec=baseline_spec,
        paths=step_paths,
    shell:
        esa_shell("baseline")

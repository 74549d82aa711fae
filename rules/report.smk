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
        spec=comparison_spec,
        paths=step_paths,
    shell:
        esa_shell("comparison")

rule report:
    """verdict.json and the self-contained report page of the whole study."""
    input:
        unpack(job_inputs("report")),
    output:
        verdicts=LAYOUT.report_files()["verdicts"],
        index=report(LAYOUT.report_files()["index"], category="Report", caption="../report/index.rst"),
        plots=directory(LAYOUT.report_files()["plots"]),
        inputs=LAYOUT.report_files()["inputs"],
    log:
        LAYOUT.log("report"),
    conda:
        ENV
    threads: threads("report")
    resources:
        **res("report"),
    params:
        code=code_version("report"),
        spec=job_spec("report"),
        paths=step_paths,
    shell:
        esa_shell("report")


rule comparison:
    """The study's models side by side: baseline, super weights, massive activations, heavy tails, agreement."""
    input:
        unpack(job_inputs("comparison")),
    output:
        index=LAYOUT.comparison(KEY),
    log:
        f"logs/{COMPARISON}_{KEY}.log",
    conda:
        ENV
    threads: threads("comparison")
    resources:
        **res("comparison"),
    params:
        code=code_version("comparison"),
        spec=job_spec("comparison"),
        paths=step_paths,
    shell:
        esa_shell("comparison")

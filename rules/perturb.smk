rule perturb:
    """Top-k vs controls of one (metric, mode, k, perturbation, scale), every seed, one model load."""
    input:
        unpack(job_inputs("perturb")),
    output:
        **LAYOUT.perturb_files(),
    log:
        LAYOUT.log("perturb_{metric}_{mode}_k{k}_{tag}"),
    conda:
        ENV
    threads: threads("perturb")
    resources:
        **res("perturb"),
    params:
        code=code_version("perturb"),
        spec=job_spec("perturb"),
        paths=step_paths,
    shell:
        esa_shell("perturb")

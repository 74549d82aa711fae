rule quantize:
    """RTN quantization of every target under each scheme, with each protect condition kept in full precision."""
    input:
        unpack(job_inputs("quantize")),
    output:
        **LAYOUT.quantize_files(),
    log:
        LAYOUT.log("quantize"),
    conda:
        ENV
    threads: threads("quantize")
    resources:
        **res("quantize"),
    params:
        code=code_version("quantize"),
        spec=job_spec("quantize"),
        paths=step_paths,
    shell:
        esa_shell("quantize")


rule protect_mask:
    """One metric's global top-k on the confirm seed as a protect mask (on request: not built by `all`)."""
    input:
        unpack(job_inputs("protect_mask")),
    output:
        **LAYOUT.protect_mask_files(),
    log:
        LAYOUT.log("protect_mask_{metric}_k{k}"),
    conda:
        ENV
    threads: threads("protect_mask")
    resources:
        **res("protect_mask"),
    params:
        code=code_version("protect_mask"),
        spec=job_spec("protect_mask"),
        paths=step_paths,
    shell:
        esa_shell("protect_mask")

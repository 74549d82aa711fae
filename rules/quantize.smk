rule quantize:
    """RTN quantization of every target under each scheme, with each protect condition kept in full precision."""
    input:
        **named(LAYOUT.quantize_inputs()),
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
        spec=quantize_spec,
        paths=step_paths,
    shell:
        esa_shell("quantize")


rule protect_mask:
    """One metric's global top-k on the confirm seed as a protect mask (on request: not built by `all`)."""
    input:
        candidates=LAYOUT.score_files(seed=LAYOUT.confirm_seed())["candidates"],
        stats=LAYOUT.score_files(seed=LAYOUT.confirm_seed())["stats"],
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
        spec=protect_mask_spec,
        paths=step_paths,
    shell:
        esa_shell("protect_mask")

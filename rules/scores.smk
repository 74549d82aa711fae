SCORE_FILES = ("candidates.parquet", "stats.parquet", "manifest.json")


rule scores_gradients:
    """grad_x_weight and grad_squared of one seed from a single gradient pass."""
    input:
        model=rules.model.output.ref,
        calib=f"{RESULTS}/data/calib.parquet",
    output:
        [f"{RESULTS}/scores/{metric}/seed{{seed}}/{name}" for metric in GRADIENT_METRICS for name in SCORE_FILES],
    params:
        code=code_version("scores"),
        spec=lambda wildcards: scores_spec(list(GRADIENT_METRICS), wildcards.seed),
        dirs=lambda wildcards, output: " ".join(
            f"{m}={os.path.dirname(output[i * len(SCORE_FILES)])}" for i, m in enumerate(GRADIENT_METRICS)
        ),
    threads: res("scores")["threads"]
    resources:
        mem_mb=res("scores")["mem_mb"],
        runtime=res("scores")["runtime"],
        gpu=res("scores")["gpu"],
        gpu_model=res("scores").get("gpu_model", ""),
    conda:
        ENV
    log:
        f"logs/{MODEL}/scores_gradients_seed{{seed}}.log",
    shell:
        "python -m esa run scores --spec {params.spec:q} model={input.model} calib={input.calib}"
        " {params.dirs} 2> {log}"


rule scores_hutchinson:
    """hutchinson_diag of one seed: one double-backward graph per batch serves every probe."""
    input:
        model=rules.model.output.ref,
        calib=f"{RESULTS}/data/calib.parquet",
    output:
        [f"{RESULTS}/scores/hutchinson_diag/seed{{seed}}/{name}" for name in SCORE_FILES],
    params:
        code=code_version("scores"),
        spec=lambda wildcards: scores_spec(["hutchinson_diag"], wildcards.seed),
        out=lambda wildcards, output: os.path.dirname(output[0]),
    threads: res("scores")["threads"]
    resources:
        mem_mb=res("scores")["mem_mb"],
        runtime=res("scores")["runtime"],
        gpu=res("scores")["gpu"],
        gpu_model=res("scores").get("gpu_model", ""),
    conda:
        ENV
    log:
        f"logs/{MODEL}/scores_hutchinson_diag_seed{{seed}}.log",
    shell:
        "python -m esa run scores --spec {params.spec:q} model={input.model} calib={input.calib}"
        " hutchinson_diag={params.out} 2> {log}"


rule scores_activations:
    """activation_magnitude of one seed, with the massive-activation trace of every mlp.down_proj."""
    input:
        model=rules.model.output.ref,
        calib=f"{RESULTS}/data/calib.parquet",
    output:
        [f"{RESULTS}/scores/activation_magnitude/seed{{seed}}/{name}" for name in SCORE_FILES],
        activations=f"{RESULTS}/scores/activation_magnitude/seed{{seed}}/activations.parquet",
    params:
        code=code_version("scores"),
        spec=lambda wildcards: scores_spec(["activation_magnitude"], wildcards.seed),
        out=lambda wildcards, output: os.path.dirname(output[0]),
    threads: res("scores")["threads"]
    resources:
        mem_mb=res("scores")["mem_mb"],
        runtime=res("scores")["runtime"],
        gpu=res("scores")["gpu"],
        gpu_model=res("scores").get("gpu_model", ""),
    conda:
        ENV
    log:
        f"logs/{MODEL}/scores_activation_magnitude_seed{{seed}}.log",
    shell:
        "python -m esa run scores --spec {params.spec:q} model={input.model} calib={input.calib}"
        " activation_magnitude={params.out} 2> {log}"

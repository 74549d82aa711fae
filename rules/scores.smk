SCORE_FILES = ("candidates.parquet", "stats.parquet", "manifest.json")
# Order only: the evaluation data step checks the text holds eval_windows before any scoring
# starts (minutes of it otherwise); ancient, so new evaluation windows never re-score.
EVAL_CHECKED = ancient(f"{RESULTS}/data/eval.json")


rule scores_gradients:
    """grad_x_weight and grad_squared of one seed from a single gradient pass."""
    input:
        model=rules.model.output.ref,
        calib=f"{RESULTS}/data/calib.parquet",
        eval_checked=EVAL_CHECKED,
    output:
        [f"{scores_out(metric)}/{name}" for metric in GRADIENT_METRICS for name in SCORE_FILES],
    params:
        code=code_version("scores"),
        spec=lambda wildcards: scores_spec(list(GRADIENT_METRICS), wildcards),
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
        f"logs/{MODEL}/scores_gradients_seed{{seed}}{'_part{group}' if SPLIT else ''}.log",
    shell:
        "python -m esa run scores --spec {params.spec:q} model={input.model} calib={input.calib}"
        " {params.dirs} 2> {log}"


rule scores_hutchinson:
    """hutchinson_diag of one seed: one double-backward graph per batch serves every probe."""
    input:
        model=rules.model.output.ref,
        calib=f"{RESULTS}/data/calib.parquet",
        eval_checked=EVAL_CHECKED,
    output:
        [f"{scores_out('hutchinson_diag')}/{name}" for name in SCORE_FILES],
    params:
        code=code_version("scores"),
        spec=lambda wildcards: scores_spec(["hutchinson_diag"], wildcards),
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
        f"logs/{MODEL}/scores_hutchinson_diag_seed{{seed}}{'_part{group}' if SPLIT else ''}.log",
    shell:
        "python -m esa run scores --spec {params.spec:q} model={input.model} calib={input.calib}"
        " hutchinson_diag={params.out} 2> {log}"


rule scores_activations:
    """activation_magnitude of one seed, with the massive-activation trace of every mlp.down_proj."""
    input:
        model=rules.model.output.ref,
        calib=f"{RESULTS}/data/calib.parquet",
        eval_checked=EVAL_CHECKED,
    output:
        [f"{scores_out('activation_magnitude')}/{name}" for name in SCORE_FILES],
        activations=f"{scores_out('activation_magnitude')}/activations.parquet",
    params:
        code=code_version("scores"),
        spec=lambda wildcards: scores_spec(["activation_magnitude"], wildcards),
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
        f"logs/{MODEL}/scores_activation_magnitude_seed{{seed}}{'_part{group}' if SPLIT else ''}.log",
    shell:
        "python -m esa run scores --spec {params.spec:q} model={input.model} calib={input.calib}"
        " activation_magnitude={params.out} 2> {log}"


if SPLIT:

    rule merge_scores:
        """Join the layer-group parts of one (metric, seed) into its candidates and stats."""
        input:
            parts=lambda wildcards: [
                f"{SCORES.format(**wildcards)}/part{g}/manifest.json" for g in range(LAYER_GROUPS)
            ],
        output:
            candidates=f"{SCORES}/candidates.parquet",
            stats=f"{SCORES}/stats.parquet",
            manifest=f"{SCORES}/manifest.json",
        params:
            code=code_version("merge_scores"),
            spec=spec(layer_groups=LAYER_GROUPS),
            parts=lambda wildcards, input: ",".join(os.path.dirname(p) for p in input.parts),
            out=lambda wildcards, output: os.path.dirname(output.stats),
        threads: res("topk")["threads"]
        resources:
            mem_mb=res("topk")["mem_mb"],
            runtime=res("topk")["runtime"],
            gpu=0,
        conda:
            ENV
        log:
            f"logs/{MODEL}/merge_scores_{{metric}}_seed{{seed}}.log",
        shell:
            "python -m esa run merge_scores --spec {params.spec:q} parts={params.parts} out={params.out} 2> {log}"

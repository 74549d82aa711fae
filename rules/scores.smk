# Order only: the evaluation data step checks the text holds eval_windows before any scoring
# starts (minutes of it otherwise); ancient, so new evaluation windows never re-score.
SCORES_INPUTS = {
    "model": LAYOUT.model_ref,
    "calib": LAYOUT.data_files("calib")["windows"],
    "eval_checked": ancient(LAYOUT.data_files("eval")["summary"]),
}
PART = "{group}" if SPLIT else None


for job in SCORE_JOBS:

    rule:
        # scores_gradients: grad_x_weight and grad_squared from one gradient pass;
        # scores_hutchinson: one double-backward graph per batch serves every probe;
        # scores_activations: with the massive-activation trace of every MLP output projection
        name:
            f"scores_{job}"
        input:
            **SCORES_INPUTS,
        output:
            **named(scores_outputs(job, PART)),
        log:
            LAYOUT.log(f"scores_{job}_seed{{seed}}" + ("_part{group}" if SPLIT else "")),
        conda:
            ENV
        threads: threads("scores")
        resources:
            **res("scores"),
        params:
            code=code_version(*rule_versions()[f"scores_{job}"]),
            spec=scores_spec(job),
            paths=step_paths,
        shell:
            esa_shell("scores")


if SPLIT:

    for job in SCORE_JOBS:

        rule:
            # join the layer-group parts of one seed's scores into the unsplit files
            name:
                f"merge_scores_{job}"
            input:
                **named({"parts": {g: scores_outputs(job, g) for g in range(LAYER_GROUPS)}}),
            output:
                **named(scores_outputs(job, None)),
            log:
                LAYOUT.log(f"merge_scores_{job}_seed{{seed}}"),
            conda:
                ENV
            threads: threads("merge_scores")
            resources:
                **res("merge_scores"),
            params:
                code=code_version("merge_scores"),
                spec=merge_scores_spec(job),
                paths=step_paths,
            shell:
                esa_shell("merge_scores")

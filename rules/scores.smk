PART = "{group}" if SPLIT else None


for job in SCORE_JOBS:

    rule:
        # scores_gradients: grad_x_weight and grad_squared from one gradient pass;
        # scores_hutchinson: one double-backward graph per batch serves every probe;
        # scores_activations: with the massive-activation trace of every MLP output projection
        name:
            f"scores_{job}"
        input:
            unpack(job_inputs("scores", job=job)),
        output:
            **named(LAYOUT.score_job_files(job, part=PART)),
        log:
            LAYOUT.log(f"scores_{job}_seed{{seed}}" + ("_part{group}" if SPLIT else "")),
        conda:
            ENV
        threads: threads("scores")
        resources:
            **res("scores"),
        params:
            code=code_version(*rule_versions()[f"scores_{job}"]),
            spec=job_spec("scores", job=job),
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
                unpack(job_inputs("merge_scores", job=job)),
            output:
                **named(LAYOUT.score_job_files(job)),
            log:
                LAYOUT.log(f"merge_scores_{job}_seed{{seed}}"),
            conda:
                ENV
            threads: threads("merge_scores")
            resources:
                **res("merge_scores"),
            params:
                code=code_version("merge_scores"),
                spec=job_spec("merge_scores", job=job),
                paths=step_paths,
            shell:
                esa_shell("merge_scores")

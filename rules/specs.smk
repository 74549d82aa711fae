"""Each step's spec: exactly what its outputs depend on, as the JSON string `esa run` parses
(esa/step_specs.py types it). One function per step, named `<step>_spec`, taking the job's
wildcards; Snakemake tracks the string as a param, so a change reruns the step.
"""


def model_spec(wildcards):
    return spec(source=SOURCES[wildcards.model])


DATA_KEYS = {
    "calib": ("source", "hf_config", "calib_split", "text_field", "eval_fraction", "seq_len"),
    "eval": ("source", "hf_config", "eval_split", "text_field", "eval_fraction", "seq_len", "eval_windows"),
}


def data_settings(model, part):
    """What one part's windows depend on: the evaluation settings never touch the pool."""
    data = {key: config["data"][key] for key in DATA_KEYS[part]}
    data.setdefault("calib_split", None)
    data.setdefault("eval_split", None)
    return {"model": SOURCES[model], "part": part, **data}


def data_spec(wildcards):
    return spec(**data_settings(wildcards.model, wildcards.part))


def runtime_spec(model, **params):
    """Parameters of a step that runs the model: where, in which precision, how the loss is chunked."""
    keys = ("device", "dtype", "attn_implementation", "loss_chunk", "device_map")
    # deterministic only when on: turning it on reruns the model steps, off keeps existing results
    deterministic = {"deterministic": True} if config["deterministic"] else {}
    return spec(model=SOURCES[model], **{k: config[k] for k in keys}, **deterministic, **params)


def evaluation_spec(model, **params):
    """A step that measures damage against the baseline: its batches and dPPL intervals too."""
    return runtime_spec(
        model, batch_size=config["baseline"]["batch_size"], bootstrap=config["bootstrap"], **params
    )


def scores_spec(job):
    """What a scores job depends on: the model, the calibration pool, the metric(s), the seed."""
    metrics = list(SCORE_JOBS[job])
    scoring = config["scoring"]
    # the job's metrics' own blocks (scoring.hutchinson: probes, and max_samples over scoring's)
    own = {
        key: value
        for metric in metrics
        if REGISTRY[metric].settings
        for key, value in scoring[REGISTRY[metric].settings].items()
    }

    def job_spec(wildcards):
        return runtime_spec(
            wildcards.model,
            data=data_settings(wildcards.model, "calib"),
            metrics=metrics,
            seed=int(wildcards.seed),
            max_samples=own.get("max_samples") or scoring["max_samples"],
            batch_size=scoring["batch_size"],
            probes=own.get("probes"),
            weighting=scoring["weighting"],
            candidates=scoring["candidates"],
            targets=scoring["targets"],
            save_full_scores=scoring["save_full_scores"],
            gradient_checkpointing=scoring["gradient_checkpointing"],
            layer_group=[int(wildcards.group), LAYER_GROUPS] if SPLIT else [0, 1],
        )

    return job_spec


def baseline_spec(wildcards):
    return runtime_spec(wildcards.model, batch_size=config["baseline"]["batch_size"], data=config["data"])


def perturb_spec(wildcards):
    e = perturb_params(wildcards)
    return evaluation_spec(
        wildcards.model,
        **{key: e[key] for key in ("perturb", "scale", "noise", "controls", "seeds")},
    )


def confirm_spec(wildcards):
    return evaluation_spec(
        wildcards.model,
        metrics=LAYOUT.scored_metrics(),
        seed=LAYOUT.confirm_seed(),
        top_n=config["confirm"]["top_n"],
        factor=config["confirm"]["factor"],
    )


def mechanism_spec(wildcards):
    return evaluation_spec(
        wildcards.model,
        scales=config["mechanism"]["scales"],
        massive_fraction=config["mechanism"]["massive_fraction"],
    )


def quantize_spec(wildcards):
    return evaluation_spec(
        wildcards.model,
        schemes=config["quantize"]["schemes"],
        protect=config["quantize"]["protect"],
        metrics=LAYOUT.quantize_metrics(),
        seed=config["quantize"]["seed"],
        targets=config["scoring"]["targets"],
    )


def protect_mask_spec(wildcards):
    return spec(metric=wildcards.metric, k=int(wildcards.k))


def topk_spec(wildcards):
    return spec(mode=wildcards.mode, k=int(wildcards.k), seed=int(wildcards.seed))


def plots_spec(wildcards):
    return spec(metric=wildcards.metric, mode=wildcards.mode, k=int(wildcards.k), seed=int(wildcards.seed))


def activation_plot_spec(wildcards):
    return spec(seed=int(wildcards.seed))


def stability_spec(wildcards):
    return spec(
        metric=wildcards.metric,
        mode=wildcards.mode,
        k=int(wildcards.k),
        seeds=LAYOUT.seeds_of(wildcards.metric, wildcards.mode, int(wildcards.k)),
    )


def agreement_spec(wildcards):
    return spec(
        mode=wildcards.mode, k=int(wildcards.k), metrics=LAYOUT.scored_metrics(), seeds=config["seeds"]
    )


def published_spec(wildcards):
    """The model's published coordinates (esa.published) and the metrics that rank them."""
    return spec(coordinates=LAYOUT.of(wildcards.model).published(), metrics=LAYOUT.scored_metrics())


def merge_scores_spec(job):
    return lambda wildcards: spec(metrics=list(SCORE_JOBS[job]), layer_groups=LAYER_GROUPS)


def comparison_spec(wildcards):
    return spec(models=LAYOUT.models, metrics=LAYOUT.scored_metrics(), factor=config["confirm"]["factor"])


def culprit_spec(wildcards):
    """What a culprit search depends on: the experiment's perturbation, its mask's seed, the
    confirm factor that makes a group destructive, the budget."""
    e = EXPERIMENTS[wildcards.experiment]
    return evaluation_spec(
        wildcards.model,
        experiment=wildcards.experiment,
        seed=LAYOUT.culprit_seed(wildcards.experiment),
        perturb=e["perturb"],
        scale=e["scale"],
        factor=config["confirm"]["factor"],
        budget=config["culprits"]["budget"],
        min_group=config["culprits"]["min_group"],
    )


def report_spec(wildcards):
    """What the report step reads of the config: the experiments, the confirm factor, the thresholds."""
    experiments = [
        {"name": name, "metric": e["metric"], "mode": e["mode"], "k": e["topk"], "seeds": e["seeds"]}
        for name, e in EXPERIMENTS.items()
    ]
    return spec(
        model=wildcards.model,
        experiments=experiments,
        factor=config["confirm"]["factor"],
        thresholds=config["verdicts"],
    )

"""Where every workflow output lives, what each step reads, and which outputs each experiment needs.

This module is the one place a result path is written down: the rules, the runbook scripts
and the tests all ask :class:`Layout`. Path patterns keep Snakemake wildcards in braces
(``{metric}``, ``{seed}``...) until a caller fills them; a method called with values returns
concrete paths.

Results are content-addressed, so that studies with different configs share one project:
each step's files lie in a directory named by the step's *key*, the first 10 hex digits of
the SHA-256 of its spec (``esa.specs``: what its outputs depend on besides its inputs) and of
its input paths, which hold the keys of the steps before it. Two configs that agree on what a
step depends on name the same directory and reuse it; where they differ they write side by
side (``results/tiny/scores/grad_x_weight/seed0/<key>/``). A pattern's key is the ``{key}``
wildcard; the rule that fills it checks that the key is the one its config computes
(:meth:`Layout.job_spec`), so a path of another config is never rebuilt with this one's spec.
The code a step runs is not in its key: an edit reruns the step in place (``esa.provenance``).

A step takes its files as named paths. A collection (one mask per seed, one candidates file
per metric) travels as keys joined by ``KEY_SEP`` (``masks/0=...``, ``masks/1=...``), which
:func:`flatten_paths` writes and :func:`nest_paths` reads back; ``/`` cannot occur in a model,
experiment, metric or seed name.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping

from .config import study_models
from .devices import resolve_auto
from .errors import ESAError
from .metrics import METRICS, REGISTRY, SCORE_JOBS, TRACE_METRIC
from .names import COMPARISON, GAUSSIAN, RELATIVE
from .precision import resolve_mixed_precision
from .revisions import resolve_revision
from .sources import is_hub_id
from .specs import spec_json, step_spec

KEY_SEP = "/"
KEY = "{key}"  # the key of a pattern: a wildcard the rule's job fills
KEY_PATTERN = r"[0-9a-f]{10}"
STUDY_STEPS = ("comparison",)  # steps of the whole study, not of one model

BASELINE_FILES = {"metrics": "metrics.json", "windows": "windows.parquet",
                  "manifest": "experiment_manifest.json", "config": "config.json"}
SCORE_FILES = {"candidates": "candidates.parquet", "stats": "stats.parquet", "manifest": "manifest.json"}
ACTIVATIONS_FILE = "activations.parquet"  # the massive-activation trace of activation_magnitude
FULL_SCORES_FILE = "scores.safetensors"  # scoring.save_full_scores
PLOT_FILES = {"distribution": "distribution.png", "hotspots": "hotspots.png"}
PERTURB_FILES = {"results": "results.parquet", "manifest": "experiment_manifest.json"}
STABILITY_FILES = {"pairs": "pairs.parquet", "summary": "summary.json"}
CONFIRM_FILES = {"super_weights": "super_weights.parquet", "super_experts": "super_experts.parquet",
                 "activations": "activations.parquet", "rerun": "baseline_rerun.json", "groups": "groups.parquet",
                 "group_members": "group_members.parquet", "null": "null.parquet"}
REPORT_FILES = {"verdicts": "verdict.json", "index": "index.html", "plots": "plots", "inputs": "inputs.json"}
CULPRIT_FILES = {"culprits": "culprits.parquet", "search": "search.parquet", "summary": "summary.json"}
BEHAVIOUR_FILES = {"conditions": "conditions.parquet", "generation": "generation.parquet", "sinks": "sinks.parquet",
                   "lm_eval": "lm_eval.parquet", "cloze": "cloze.parquet"}
MECHANISM_FILES = {"sweep": "sweep.parquet", "restore": "restore.parquet", "control": "control.parquet",
                   "joint_mean": "joint_mean.parquet"}
PUBLISHED_FILES = {"matches": "matches.parquet"}
QUANTIZE_FILES = {"results": "results.parquet", "manifest": "experiment_manifest.json"}


def flatten_paths(paths: Mapping, prefix: str = "") -> dict[str, str]:
    """``{"masks": {0: a, 1: b}}`` -> ``{"masks/0": a, "masks/1": b}``; None values are dropped."""
    flat = {}
    for key, value in paths.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_paths(value, f"{name}{KEY_SEP}"))
        elif value is not None:
            flat[name] = str(value)
    return flat


def nest_paths(flat: Mapping[str, str]) -> dict:
    """The inverse of :func:`flatten_paths` (keys stay strings)."""
    nested: dict = {}
    for name, path in flat.items():
        *outer, last = name.split(KEY_SEP)
        node = nested
        for key in outer:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ESAError(f"path name {name!r} nests under a name that is itself a path")
        if last in node:
            raise ESAError(f"path name {name!r} clashes with another")
        node[last] = path
    return nested


def by_seed(paths: Mapping[str, str], seeds) -> dict[int, str]:
    """``{seed: path}`` of a step's per-seed files (keys from :func:`nest_paths` are strings),
    which must be exactly one per seed of ``seeds``."""
    found = {int(seed): path for seed, path in paths.items()}
    if sorted(found) != sorted(seeds):
        raise ESAError(f"expected one file per seed {sorted(seeds)}, got seeds {sorted(found)}")
    return found


def perturb_tag(experiment: dict) -> str:
    """Directory name of a perturbation: ``sign_flip_1``, ``gaussian_0.02``, ``gaussian-absolute_0.5``."""
    kind = experiment["perturb"]
    if kind == GAUSSIAN and experiment["noise"] != RELATIVE:
        kind = f"{kind}-{experiment['noise']}"
    return f"{kind}_{experiment['scale']:g}"


def _in(directory: str, files: Mapping[str, str]) -> dict[str, str]:
    return {name: f"{directory}/{file}" for name, file in files.items()}


class Layout:
    """Output paths of a study's results, what each step reads, and the files each experiment needs.

    ``Layout(config)`` gives patterns with ``{model}`` and ``{key}`` wildcards
    (``results/{model}/...``), ``Layout(config).of(name)`` the paths of one model. ``device``:
    the config's ``device`` with ``auto`` resolved (``esa.devices``), ``mixed_precision`` the
    config's for that device (``esa.precision``); by default both resolved on this machine.
    """

    def __init__(self, config: dict, *, model: str = "{model}", device: str | None = None,
                 mixed_precision: str | None = None, _keys: dict | None = None):
        self.config = config
        self.model = model
        self.sources = {m["name"]: m["source"] for m in study_models(config)}
        self.wanted_revisions = {m["name"]: m.get("revision") for m in study_models(config)}
        self.models = list(self.sources)
        self.root = f"results/{model}"
        self.logs = f"logs/{model}"
        self.experiments = {e["name"]: {"seeds": config["seeds"], **e} for e in config.get("experiments", [])}
        self.device = device or resolve_auto(config["device"])
        self.mixed_precision = mixed_precision or resolve_mixed_precision(config["mixed_precision"], self.device,
                                                                          config["dtype"])
        self.split = config["scoring"]["layer_groups"] > 1
        self._keys = {} if _keys is None else _keys  # shared by every of(): (model, step, wildcards) -> key

    def of(self, model: str) -> Layout:
        """The paths of one model of the study."""
        return Layout(self.config, model=model, device=self.device, mixed_precision=self.mixed_precision,
                      _keys=self._keys)

    def source(self) -> str:
        """The model's source (call on ``of(model)``)."""
        return self.sources[self.model]

    def revisions(self) -> dict[str, str]:
        """The commits the model's and the data's hub revisions name now (``esa.revisions``):
        ``model_revision`` for a hub model, ``data_revision`` for an ``hf:`` hub dataset, neither
        for a local or builtin source (call on ``of(model)``)."""
        found, source, data = {}, self.source(), self.config["data"]
        if is_hub_id(source):
            found["model_revision"] = resolve_revision(source, self.wanted_revisions[self.model], "model")
        if data["source"].startswith("hf:") and is_hub_id(data["source"][3:]):
            found["data_revision"] = resolve_revision(data["source"][3:], data.get("revision"), "dataset")
        return found

    # ---- keys ----------------------------------------------------------------------------
    def key(self, step: str, **wildcards) -> str:
        """The key of one job of ``step``: a hash of its spec and its input paths; ``{key}``
        when the job is a pattern (a wildcard in braces, or the ``{model}`` layout)."""
        values = {name: str(value) for name, value in wildcards.items() if value is not None}
        model = "" if step in STUDY_STEPS else self.model
        if "{" in model or any("{" in value for value in values.values()):
            return KEY
        memo = (model, step, tuple(sorted(values.items())))
        if memo not in self._keys:
            inputs = flatten_paths(self.inputs(step, **values))
            text = spec_json({"step": step, "spec": step_spec(self, step, **values), "inputs": inputs})
            self._keys[memo] = hashlib.sha256(text.encode()).hexdigest()[:10]
        return self._keys[memo]

    def job_spec(self, step: str, key: str, **wildcards) -> str:
        """The ``--spec`` JSON of the job whose output paths hold ``key``, which must be the key
        this config computes for it (a path of another config is not rebuilt with this one)."""
        expected = self.key(step, **wildcards)
        if key != expected:
            raise ESAError(f"{step} results directory {key} is not this config's ({expected}): results are "
                           f"keyed by what they depend on (esa/layout.py); ask for the files of this config")
        return spec_json(step_spec(self, step, **wildcards))

    def _dir(self, path: str, step: str, **wildcards) -> str:
        return f"{self.root}/{path}/{self.key(step, **wildcards)}"

    # ---- one path (pattern) per output -------------------------------------------------
    def comparison(self, key: str | None = None) -> str:
        """The page comparing the study's models side by side (``key``: ``KEY`` for the pattern)."""
        return f"results/{COMPARISON}/{key or self.key(COMPARISON)}/index.html"

    @property
    def model_ref(self) -> str:
        return f"{self._dir('model', 'model')}/model.json"

    def data_files(self, part: str = "{part}") -> dict[str, str]:
        """Windows of one part (calib | eval) and their summary."""
        base = self._dir(f"data/{part}", "data", part=part)
        return {"windows": f"{base}/windows.parquet", "summary": f"{base}/summary.json"}

    def baseline_files(self) -> dict[str, str]:
        return _in(self._dir("baseline", "baseline"), BASELINE_FILES)

    @staticmethod
    def _job(metric: str) -> str:
        """The scores job of a metric (a pattern stays a pattern)."""
        return metric if "{" in metric else REGISTRY[metric].job

    def scores_dir(self, metric: str = "{metric}", seed="{seed}", part=None) -> str:
        """One metric's scores of one seed; ``part``: one layer group's, before they are merged."""
        job = self._job(metric)
        if part is not None:
            return self._dir(f"scores/{metric}/seed{seed}/part{part}", "scores", job=job, seed=seed, group=part)
        return self._dir(f"scores/{metric}/seed{seed}", "merge_scores" if self.split else "scores", job=job, seed=seed)

    def score_files(self, metric: str = "{metric}", seed="{seed}", part=None) -> dict[str, str]:
        """Candidates, stats and manifest of one scores job's metric, with the files the config
        adds: the massive-activation trace of the trace metric, the full scores when saved."""
        files = dict(SCORE_FILES)
        if metric == TRACE_METRIC:
            files["activations"] = ACTIVATIONS_FILE
        if self.config["scoring"]["save_full_scores"]:
            files["full_scores"] = FULL_SCORES_FILE
        return _in(self.scores_dir(metric, seed, part), files)

    def score_job_files(self, job: str, seed="{seed}", part=None) -> dict[str, dict[str, str]]:
        """metric -> files of one scores job (a layer-group part of them when ``part`` is given)."""
        return {metric: self.score_files(metric, seed, part) for metric in SCORE_JOBS[job]}

    def mask(self, metric="{metric}", mode="{mode}", k="{k}", seed="{seed}") -> str:
        w = {"metric": metric, "mode": mode, "k": k, "seed": seed}
        return f"{self._dir(f'topk/{metric}/{mode}_k{k}/seed{seed}', 'topk', **w)}/mask.parquet"

    def plot_files(self, metric="{metric}", mode="{mode}", k="{k}", seed="{seed}") -> dict[str, str]:
        w = {"metric": metric, "mode": mode, "k": k, "seed": seed}
        return _in(self._dir(f"plots/{metric}/{mode}_k{k}/seed{seed}", "plots", **w), PLOT_FILES)

    def activation_plot(self, seed="{seed}") -> str:
        return f"{self._dir(f'plots/{TRACE_METRIC}/seed{seed}', 'activation_plot', seed=seed)}/massive_activations.png"

    def perturb_files(self, metric="{metric}", mode="{mode}", k="{k}", tag="{tag}") -> dict[str, str]:
        w = {"metric": metric, "mode": mode, "k": k, "tag": tag}
        return _in(self._dir(f"perturb/{metric}/{mode}_k{k}/{tag}", "perturb", **w), PERTURB_FILES)

    def stability_files(self, metric="{metric}", mode="{mode}", k="{k}") -> dict[str, str]:
        w = {"metric": metric, "mode": mode, "k": k}
        return _in(self._dir(f"stability/{metric}/{mode}_k{k}", "stability", **w), STABILITY_FILES)

    def agreement(self, mode="{mode}", k="{k}") -> str:
        return f"{self._dir(f'agreement/{mode}_k{k}', 'agreement', mode=mode, k=k)}/agreement.parquet"

    def confirm_files(self) -> dict[str, str]:
        return _in(self._dir("confirm", "confirm"), CONFIRM_FILES)

    def culprit_files(self, experiment: str = "{experiment}") -> dict[str, str]:
        """The culprit search of one experiment's top set (``esa.culprits``)."""
        return _in(self._dir(f"culprits/{experiment}", "culprits", experiment=experiment), CULPRIT_FILES)

    def report_files(self) -> dict[str, str]:
        return _in(self._dir("report", "report"), REPORT_FILES)

    def mechanism_files(self) -> dict[str, str]:
        return _in(self._dir("mechanism", "mechanism"), MECHANISM_FILES)

    def mechanism(self) -> bool:
        """Whether the study runs the super weights' mechanism: enabled, and confirm runs (any experiment)."""
        return bool(self.experiments) and self.config["mechanism"]["enabled"]

    def behaviour_files(self) -> dict[str, str]:
        return _in(self._dir("behaviour", "behaviour"), BEHAVIOUR_FILES)

    def behaviour(self) -> bool:
        """Whether the study reads behaviour beside perplexity: enabled, and confirm runs (any experiment)."""
        return bool(self.experiments) and self.config["behaviour"]["enabled"]

    def behaviour_experiments(self) -> dict[str, int]:
        """The experiments whose top set and random_k control the behaviour step reads: name ->
        the seed of the mask read (the experiment's first)."""
        return {name: self.experiments[name]["seeds"][0] for name in self.config["behaviour"]["experiments"]}

    def published_files(self) -> dict[str, str]:
        return _in(self._dir("published", "published"), PUBLISHED_FILES)

    def quantize_files(self) -> dict[str, str]:
        return _in(self._dir("quantize", "quantize"), QUANTIZE_FILES)

    def protect_mask_files(self, metric="{metric}", k="{k}") -> dict[str, str]:
        """One metric's global top-k as an exportable protect mask (built on request only)."""
        base = self._dir(f"quantize/protect/{metric}_k{k}", "protect_mask", metric=metric, k=k)
        return {"mask": f"{base}/mask.parquet", "tensors": f"{base}/mask.safetensors"}

    def log(self, job: str) -> str:
        """A job's log, beside the logs of the same job under other configs (its key)."""
        return f"{self.logs}/{job}_{KEY}.log"

    def outputs(self, step: str, **wildcards) -> dict[str, str]:
        """The named output files of one job of ``step`` (``esa path`` prints them). A scores
        job is asked for by ``metric`` (the files of that metric) and ``seed``."""
        files = {
            "model": lambda: {"ref": self.model_ref},
            "data": lambda part: self.data_files(part),
            "baseline": self.baseline_files, "scores": self.score_files,
            "topk": lambda metric, mode, k, seed: {"mask": self.mask(metric, mode, k, seed)},
            "plots": self.plot_files, "activation_plot": lambda seed: {"plot": self.activation_plot(seed)},
            "perturb": self.perturb_files, "stability": self.stability_files,
            "agreement": lambda mode, k: {"agreement": self.agreement(mode, k)},
            "confirm": self.confirm_files, "culprits": self.culprit_files, "mechanism": self.mechanism_files,
            "behaviour": self.behaviour_files,
            "published": self.published_files, "quantize": self.quantize_files,
            "protect_mask": self.protect_mask_files, "report": self.report_files,
            "comparison": lambda: {"index": self.comparison()},
        }
        if step not in files:
            raise ESAError(f"unknown step {step!r}; allowed: {', '.join(files)}")
        signature = inspect.signature(files[step])
        try:
            signature.bind(**wildcards)
        except TypeError:
            names = ", ".join(signature.parameters) or "none"
            raise ESAError(f"{step} takes the wildcards {names}; got {', '.join(wildcards) or 'none'}") from None
        return files[step](**wildcards)

    # ---- what each step reads --------------------------------------------------------------
    def inputs(self, step: str, **wildcards) -> dict:
        """The named input files of one job of ``step`` (nested: ``masks`` maps seed -> path)."""
        return getattr(self, f"_{step}_inputs")(**wildcards)

    def _model_inputs(self) -> dict:
        return {}

    def _data_inputs(self, part) -> dict:
        return {"model": self.model_ref}

    def _evaluation_inputs(self) -> dict:
        """The model, the evaluation windows and the baseline a damage is measured against."""
        baseline = self.baseline_files()
        return {"model": self.model_ref, "eval": self.data_files("eval")["windows"],
                "baseline": baseline["metrics"], "baseline_windows": baseline["windows"]}

    def _baseline_inputs(self) -> dict:
        return {"model": self.model_ref, "eval": self.data_files("eval")["windows"]}

    def _scores_inputs(self, job, seed, group=None) -> dict:
        return {"model": self.model_ref, "calib": self.data_files("calib")["windows"]}

    def _merge_scores_inputs(self, job, seed) -> dict:
        groups = self.config["scoring"]["layer_groups"]
        return {"parts": {g: self.score_job_files(job, seed, g) for g in range(groups)}}

    def _topk_inputs(self, metric, mode, k, seed) -> dict:
        files = self.score_files(metric, seed)
        return {"candidates": files["candidates"], "stats": files["stats"]}

    def _plots_inputs(self, metric, mode, k, seed) -> dict:
        return {"stats": self.score_files(metric, seed)["stats"], "mask": self.mask(metric, mode, k, seed)}

    def _activation_plot_inputs(self, seed) -> dict:
        return {"activations": self.score_files(TRACE_METRIC, seed)["activations"]}

    def _perturb_inputs(self, metric, mode, k, tag) -> dict:
        e = self.perturb_experiment(metric, mode, int(k), tag)
        return {**self._evaluation_inputs(), "masks": {s: self.mask(metric, mode, k, s) for s in e["seeds"]}}

    def _stability_inputs(self, metric, mode, k) -> dict:
        seeds = self.seeds_of(metric, mode, int(k))
        return {"masks": {s: self.mask(metric, mode, k, s) for s in seeds},
                "candidates": {s: self.score_files(metric, s)["candidates"] for s in seeds}}

    def _agreement_inputs(self, mode, k) -> dict:
        return {"masks": self.agreement_masks(mode, k)}

    def _confirm_inputs(self) -> dict:
        return {**self._evaluation_inputs(), **self.confirm_inputs()}

    def _culprits_inputs(self, experiment) -> dict:
        return self.culprit_inputs(experiment)

    def _mechanism_inputs(self) -> dict:
        confirmed = self.confirm_files()
        return {**self._evaluation_inputs(), "calib": self.data_files("calib")["windows"],
                **{name: confirmed[name] for name in ("super_weights", "groups", "group_members")}}

    def _behaviour_inputs(self) -> dict:
        confirmed = self.confirm_files()
        masks = {name: self.mask(**self._key(self.experiments[name]), seed=seed)
                 for name, seed in self.behaviour_experiments().items()}
        return {"model": self.model_ref, "eval": self.data_files("eval")["windows"],
                **{name: confirmed[name] for name in ("super_weights", "groups", "group_members")},
                **({"masks": masks} if masks else {})}

    def _published_inputs(self) -> dict:
        return self.published_inputs()

    def _quantize_inputs(self) -> dict:
        return self.quantize_inputs()

    def _protect_mask_inputs(self, metric, k) -> dict:
        files = self.score_files(metric, self.confirm_seed())
        return {"candidates": files["candidates"], "stats": files["stats"]}

    def _report_inputs(self) -> dict:
        return self.report_inputs()

    def _comparison_inputs(self) -> dict:
        return self.comparison_inputs()

    # ---- which outputs the experiments need --------------------------------------------
    @staticmethod
    def _key(e: dict) -> dict:
        return {"metric": e["metric"], "mode": e["mode"], "k": e["topk"]}

    def experiment_files(self, name: str) -> dict:
        """Every output an experiment needs, by kind: ``scores`` and ``masks`` map seed -> files."""
        e = self.experiments[name]
        key = self._key(e)
        files: dict = {
            "scores": {s: self.score_files(e["metric"], s) for s in e["seeds"]},
            "masks": {s: self.mask(**key, seed=s) for s in e["seeds"]},
        }
        if self.config["plots"]:
            first = e["seeds"][0]
            files["plots"] = list(self.plot_files(**key, seed=first).values())
            if REGISTRY[e["metric"]].trace:
                files["plots"].append(self.activation_plot(first))
        if e["perturb"]:
            files["perturb"] = self.perturb_files(**key, tag=perturb_tag(e))
        if e["stability_check"] and len(e["seeds"]) > 1:
            files["stability"] = self.stability_files(**key)
        return files

    def experiment_targets(self, name: str) -> list[str]:
        """The experiment's files as one list, with the baseline its dPPL is measured against."""
        files = self.experiment_files(name)
        targets = [self.baseline_files()["metrics"]]
        targets += [scores["candidates"] for scores in files["scores"].values()]
        targets += list(files["masks"].values()) + files.get("plots", [])
        targets += [files[kind][main] for kind, main in (("perturb", "results"), ("stability", "summary"))
                    if kind in files]
        return targets

    def seeds_of(self, metric: str, mode: str, k: int) -> list[int]:
        """Union of the seeds of the experiments sharing (metric, mode, k)."""
        seeds = {s for e in self.experiments.values() if self._key(e) == {"metric": metric, "mode": mode, "k": k}
                 for s in e["seeds"]}
        return sorted(seeds)

    def perturb_experiment(self, metric: str, mode: str, k: int, tag: str) -> dict:
        """The experiment a perturb job serves; experiments sharing it must agree on seeds and controls."""
        matches = [e for e in self.experiments.values()
                   if e["perturb"] and self._key(e) == {"metric": metric, "mode": mode, "k": k}
                   and perturb_tag(e) == tag]
        for e in matches[1:]:
            if (e["seeds"], e["controls"]) != (matches[0]["seeds"], matches[0]["controls"]):
                raise ESAError(f"experiments {matches[0]['name']!r} and {e['name']!r} perturb the same "
                               f"top-k identically but list different seeds or controls")
        return matches[0]

    def scored_metrics(self) -> list[str]:
        """Metrics any experiment scores, in the canonical order of ``esa.metrics.METRICS``."""
        used = {e["metric"] for e in self.experiments.values()}
        return [m for m in METRICS if m in used]

    def agreement_keys(self) -> list[tuple[str, int]]:
        """(mode, k) of every experiment, once: each gets a metric-agreement table."""
        return sorted({(e["mode"], e["topk"]) for e in self.experiments.values()})

    def agreement_files(self) -> dict[str, str]:
        """``{"{mode}_k{k}": path}``; none when fewer than two metrics are scored."""
        if len(self.scored_metrics()) < 2:
            return {}
        return {f"{mode}_k{k}": self.agreement(mode, k) for mode, k in self.agreement_keys()}

    def agreement_masks(self, mode: str, k) -> dict[str, dict[int, str]]:
        """metric -> seed -> mask of every scored metric at one (mode, k)."""
        return {m: {s: self.mask(m, mode, k, s) for s in self.config["seeds"]} for m in self.scored_metrics()}

    def confirm_seed(self) -> int:
        seed = self.config["confirm"]["seed"]
        return seed if seed is not None else self.config["seeds"][0]

    def confirm_inputs(self) -> dict[str, dict[str, str]]:
        """candidates and stats of every scored metric on the confirm seed."""
        files = {m: self.score_files(m, self.confirm_seed()) for m in self.scored_metrics()}
        return {kind: {m: f[kind] for m, f in files.items()} for kind in ("candidates", "stats")}

    def culprit_experiments(self) -> list[str]:
        """The experiments whose top set a culprit search takes apart (config ``culprits``)."""
        return list(self.config["culprits"]["experiments"]) if self.experiments else []

    def culprit_seed(self, name: str) -> int:
        """The seed of the mask searched: ``culprits.seed``, or the experiment's first seed."""
        seed = self.config["culprits"]["seed"]
        return seed if seed is not None else self.experiments[name]["seeds"][0]

    def culprit_inputs(self, name: str) -> dict[str, str]:
        """What one culprit search reads: the model, the evaluation windows, the baseline, the
        experiment's mask of the culprit seed and confirm's super weights."""
        e = self.experiments[name]
        return {"model": self.model_ref, "eval": self.data_files("eval")["windows"],
                "baseline": self.baseline_files()["metrics"], "baseline_windows": self.baseline_files()["windows"],
                "mask": self.mask(**self._key(e), seed=self.culprit_seed(name)),
                "super_weights": self.confirm_files()["super_weights"]}

    def published(self) -> list[dict]:
        """The published super-weight coordinates of this model (``esa.published``) when the
        study scores any metric; none for a layout of patterns (call on ``of(model)``)."""
        if not self.experiments or self.model not in self.models:
            return []
        from .published import coordinates_of  # pandas: only for a study that has experiments

        return coordinates_of(self.config, self.model)

    def published_inputs(self) -> dict:
        """What the published step reads: the confirm step's inputs and its super weights."""
        return {**self.confirm_inputs(), "super_weights": self.confirm_files()["super_weights"]}

    def quantize(self) -> bool:
        """Whether the study runs the quantize phase: any ``quantize.schemes``."""
        return bool(self.config.get("quantize", {}).get("schemes"))

    def quantize_metrics(self) -> list[str]:
        """The metrics whose top-k quantization protects: ``quantize.metrics``, or every scored one."""
        metrics = self.config["quantize"]["metrics"]
        return list(metrics) if metrics is not None else self.scored_metrics()

    def quantize_inputs(self) -> dict:
        """What the quantize step reads: the model, the evaluation windows, the baseline, each
        protecting metric's candidates on the confirm seed and confirm's super weights."""
        return {"model": self.model_ref, "eval": self.data_files("eval")["windows"],
                "baseline": self.baseline_files()["metrics"], "baseline_windows": self.baseline_files()["windows"],
                "candidates": {m: self.score_files(m, self.confirm_seed())["candidates"]
                               for m in self.quantize_metrics()},
                "super_weights": self.confirm_files()["super_weights"]}

    def report_inputs(self) -> dict:
        """Everything the report reads, by name: per experiment (and seed) its files, the
        agreement tables, the confirmation, the culprit searches, the published super weights'
        matches (when the model has any: call on ``of(model)``) and the baseline."""
        baseline = self.baseline_files()
        inputs: dict = {"baseline": baseline["metrics"], "baseline_config": baseline["config"], "stats": {},
                        "masks": {}, "results": {}, "stability": {}, "stability_pairs": {}}
        for name in self.experiments:
            files = self.experiment_files(name)
            inputs["stats"][name] = {s: f["stats"] for s, f in files["scores"].items()}
            inputs["masks"][name] = files["masks"]
            if "perturb" in files:
                inputs["results"][name] = files["perturb"]["results"]
            if "stability" in files:
                inputs["stability"][name] = files["stability"]["summary"]
                inputs["stability_pairs"][name] = files["stability"]["pairs"]
        inputs["agreement"] = self.agreement_files()
        if self.experiments:
            inputs.update(self.confirm_files())
        inputs["culprits"] = {name: self.culprit_files(name) for name in self.culprit_experiments()}
        if self.mechanism():
            inputs["mechanism"] = self.mechanism_files()
        if self.behaviour():
            inputs["behaviour"] = self.behaviour_files()
        if self.published():
            inputs["published"] = self.published_files()["matches"]
        if self.quantize():
            inputs["quantize"] = self.quantize_files()["results"]
        return inputs

    def model_files(self) -> list[str]:
        """Everything one model's study produces (call on ``of(model)``)."""
        files = list(dict.fromkeys(f for name in self.experiments for f in self.experiment_targets(name)))
        files = (files or [self.baseline_files()["metrics"]]) + list(self.agreement_files().values())
        files += [self.culprit_files(name)["summary"] for name in self.culprit_experiments()]
        if self.mechanism():
            files += list(self.mechanism_files().values())
        if self.behaviour():
            files += list(self.behaviour_files().values())
        if self.published():
            files.append(self.published_files()["matches"])
        if self.quantize():
            files.append(self.quantize_files()["results"])
        if self.config["report"]:
            files.append(self.report_files()["index"])
        return files

    def compared(self) -> bool:
        """Whether the study compares models: several of them, experiments, a report."""
        return len(self.models) > 1 and bool(self.experiments) and self.config["report"]

    def all_files(self) -> list[str]:
        """Every model's files, and the comparison page when the study compares models."""
        files = [f for model in self.models for f in self.of(model).model_files()]
        return files + [self.comparison()] if self.compared() else files

    def comparison_inputs(self) -> dict:
        """What the comparison page reads, by name and model: the baseline, the confirmation,
        every scored metric's stats on the confirm seed, and the agreement tables."""
        inputs: dict = {"baseline": {}, "super_weights": {}, "activations": {}, "stats": {}, "agreement": {}}
        for model in self.models:
            layout = self.of(model)
            confirm = layout.confirm_files()
            inputs["baseline"][model] = layout.baseline_files()["metrics"]
            inputs["super_weights"][model] = confirm["super_weights"]
            inputs["activations"][model] = confirm["activations"]
            inputs["stats"][model] = layout.confirm_inputs()["stats"]
            inputs["agreement"][model] = layout.agreement_files()
        return inputs

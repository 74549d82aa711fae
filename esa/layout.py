"""Where every workflow output lives, and which outputs each experiment needs.

The path patterns carry Snakemake wildcards in braces; :class:`Layout` fills them. The rules
and the runbook scripts both use this module, so the layout is written down once.
"""

from __future__ import annotations

AGREEMENT_METRICS = ("grad_x_weight", "grad_squared", "hutchinson_diag", "activation_magnitude")


def perturb_tag(experiment: dict) -> str:
    """Directory name of a perturbation: ``sign_flip_1``, ``gaussian_0.02``, ``gaussian-absolute_0.5``."""
    kind = experiment["perturb"]
    if kind == "gaussian" and experiment["noise"] != "relative":
        kind = f"{kind}-{experiment['noise']}"
    return f"{kind}_{experiment['scale']:g}"


class Layout:
    """Output paths of one model's results directory."""

    def __init__(self, config: dict):
        self.config = config
        self.root = f"results/{config['model']['name']}"
        self.scores = f"{self.root}/scores/{{metric}}/seed{{seed}}"
        self.mask = f"{self.root}/topk/{{metric}}/{{mode}}_k{{k}}/seed{{seed}}/mask.parquet"
        self.plots = f"{self.root}/plots/{{metric}}/{{mode}}_k{{k}}/seed{{seed}}"
        self.activation_plot = f"{self.root}/plots/activation_magnitude/seed{{seed}}/massive_activations.png"
        self.perturb = f"{self.root}/perturb/{{metric}}/{{mode}}_k{{k}}/{{tag}}/results.parquet"
        self.stability = f"{self.root}/stability/{{metric}}/{{mode}}_k{{k}}"
        self.agreement = f"{self.root}/agreement/{{mode}}_k{{k}}.parquet"
        self.baseline = f"{self.root}/baseline"
        self.confirm = f"{self.root}/confirm"
        self.report = f"{self.root}/report"
        self.experiments = {e["name"]: {"seeds": config["seeds"], **e} for e in config["experiments"]}

    @staticmethod
    def _key(e: dict) -> dict:
        return {"metric": e["metric"], "mode": e["mode"], "k": e["topk"]}

    def experiment_files(self, name: str) -> dict[str, list[str] | str]:
        """Every output an experiment needs, by kind."""
        e = self.experiments[name]
        key = self._key(e)
        first = e["seeds"][0]
        files: dict[str, list[str] | str] = {
            "scores": [self.scores.format(metric=e["metric"], seed=s) for s in e["seeds"]],
            "masks": [self.mask.format(**key, seed=s) for s in e["seeds"]],
        }
        if self.config["plots"]:
            plots = self.plots.format(**key, seed=first)
            files["plots"] = [f"{plots}/distribution.png", f"{plots}/hotspots.png"]
            if e["metric"] == "activation_magnitude":
                files["plots"].append(self.activation_plot.format(seed=first))
        if e["perturb"]:
            files["perturb"] = self.perturb.format(**key, tag=perturb_tag(e))
        if e["stability_check"] and len(e["seeds"]) > 1:
            files["stability"] = f"{self.stability.format(**key)}/summary.json"
        return files

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
                raise ValueError(f"experiments {matches[0]['name']!r} and {e['name']!r} perturb the same "
                                 f"top-k identically but list different seeds or controls")
        return matches[0]

    def agreement_metrics(self) -> list[str]:
        """Metrics any experiment scores, in the canonical order."""
        used = {e["metric"] for e in self.experiments.values()}
        return [m for m in AGREEMENT_METRICS if m in used]

    def agreement_keys(self) -> list[tuple[str, int]]:
        """(mode, k) of every experiment, once: each gets a metric-agreement table."""
        return sorted({(e["mode"], e["topk"]) for e in self.experiments.values()})

    def experiment_targets(self, name: str) -> list[str]:
        """The experiment's files as one list, with the baseline its dPPL is measured against."""
        files = [f"{self.baseline}/metrics.json"]
        for kind, value in self.experiment_files(name).items():
            if kind == "scores":
                value = [f"{d}/candidates.parquet" for d in value]
            files += value if isinstance(value, list) else [value]
        return files

    def report_entry(self, name: str) -> dict:
        """An experiment as the verdicts and the report read it: settings plus file paths."""
        e = self.experiments[name]
        files = self.experiment_files(name)
        stability = files.get("stability")
        return {"name": name, "metric": e["metric"], "mode": e["mode"], "k": e["topk"], "seeds": e["seeds"],
                "stats": [f"{d}/stats.parquet" for d in files["scores"]], "masks": files["masks"],
                "results": files.get("perturb"), "stability": stability,
                "stability_pairs": stability.replace("summary.json", "pairs.parquet") if stability else None}

    def scored_metrics(self) -> list[str]:
        """Metrics any experiment scores, in the canonical order."""
        return self.agreement_metrics()

    def agreement_files(self) -> list[str]:
        if len(self.agreement_metrics()) < 2:
            return []
        return [self.agreement.format(mode=m, k=k) for m, k in self.agreement_keys()]

    def confirm_seed(self) -> int:
        return self.config["confirm"]["seed"] if self.config["confirm"]["seed"] is not None else self.config["seeds"][0]

    def report_inputs(self) -> list[str]:
        """Everything the report reads: all experiment outputs and the confirmation."""
        files = list(dict.fromkeys(f for name in self.experiments for f in self.experiment_targets(name)))
        files += [f"{d}/stats.parquet" for name in self.experiments for d in self.experiment_files(name)["scores"]]
        files += self.agreement_files()
        if self.experiments:
            files += [f"{self.confirm}/super_weights.parquet", f"{self.confirm}/activations.parquet",
                      f"{self.confirm}/baseline_rerun.json"]
        return list(dict.fromkeys(files))

    def all_files(self) -> list[str]:
        files = list(dict.fromkeys(f for name in self.experiments for f in self.experiment_targets(name)))
        files = (files or [f"{self.baseline}/metrics.json"]) + self.agreement_files()
        if self.config["report"]:
            files.append(f"{self.report}/index.html")
        return files

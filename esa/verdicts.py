"""The runbook's good/bad signals, computed from the workflow's outputs instead of eyeballed.

Each verdict is a dict ``{check, experiment, status, numbers, thresholds, message}`` with
``status`` one of ``good | warn | bad``; ``numbers`` are the values the status was decided on
(NaN and infinity written as null) and ``thresholds`` the limits they were compared with.
The checks, with the keys of their thresholds (defaults: the ``verdicts`` section of
``config/schema.yaml``, as ``DEFAULT_THRESHOLDS``):

- ``baseline``: the baseline loss is finite, and a rerun on the same windows gives the same
  numbers: ``|loss - rerun loss| <= baseline_rerun_tol`` and equal token and window counts.
  Good when both hold, bad when either fails, warn when no rerun was given.
- ``heavy_tail`` (per experiment, from its metric's ``stats.parquet`` of every seed): with
  ``n`` weights over all target tensors, the global top 0.01% is ``n_g = ceil(n / 10^4)``
  weights. ``stats`` holds each tensor's top 0.01% mass (``top_share * sum``, ``top_n``
  weights, ``S = sum top_n >= n_g`` of them together); the ``n_g`` largest of those S scores
  hold at least ``n_g / S`` of their mass, so

      global_top_share >= (n_g / S) * sum_t top_mass_t / sum_t sum_t

  is reported as ``global_top_share`` (a lower bound, equal up to rounding for large tensors),
  next to the median excess kurtosis over tensors and the largest tensor ``top_share``.
  Per seed: share-ok is ``global_top_share >= top_share_min``, kurtosis-ok is
  ``median kurtosis >= kurtosis_min``; the worst seed decides: good when both are ok, bad when
  neither is, warn when one is.
- ``topk_spread`` (``global`` mode only): the largest share of a seed's top set that one
  tensor holds; bad when it reaches ``max_tensor_share`` (all top-k in one tensor: a bug
  signal), else good; warn for k = 1, which is always in one tensor.
- ``separation_random_k`` / ``separation_bottom_k``: per seed, ``top = dPPL(top)`` against
  ``ctl = dPPL(control)``, ``ratio = top / ctl`` (defined for ctl > 0), and their paired
  bootstrap intervals ``[top_lo, top_hi]``, ``[ctl_lo, ctl_hi]`` (esa/damage.py). A seed
  separates when ``top > 0`` and ``top >= separation_ratio * max(ctl, 0)`` and ``top > ctl``
  and the intervals are apart, ``top_lo > ctl_hi``: the point ratio alone can rest on window
  noise. Good when every seed separates, bad when any seed has ``top <= ctl``, warn otherwise
  (saying in which seeds the intervals overlap). If every bottom_k
  weight of every seed has score 0 (zero-gradient weights) the bottom_k control is trivial,
  and a good becomes warn saying so. A seed is *saturated* when the perturbed losses of both
  top and the control are at the uniform-output level, ``|loss - ln V| <= saturation_tol *
  ln V`` (V = the baseline's ``vocab_size``), or not finite: the perturbation destroys the
  model whichever weights it hits and cannot tell them apart. A saturated seed counts as
  neither separating nor failing; the verdict is warn, saying "saturated", unless another
  seed fails.
- ``seed_stability``: mean pairwise Jaccard of the top sets across seeds; good when
  ``jaccard_mean > jaccard_min`` (strictly), else bad; warn with fewer than 2 seeds.
- ``metric_agreement`` (per mode and k): mean Jaccard over seeds of each pair of
  grad_x_weight, grad_squared and hutchinson_diag; good when every pair reaches
  ``agreement_min``, bad when none does, warn otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from .config import schema_defaults
from .errors import ESAError
from .metrics import GRADIENT_METRICS
from .names import BOTTOM_K, CONTROLS, GLOBAL, TOP, TOP_DENOMINATOR
from .results import ExperimentData, load_experiment, read_agreement, read_json, read_optional

STATUSES = ("good", "warn", "bad")
DEFAULT_THRESHOLDS = schema_defaults("verdicts")  # config/schema.yaml: each threshold's meaning


def _clean(value):
    """JSON-safe numbers: numpy scalars to Python, NaN and infinities to None."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _verdict(check: str, experiment: str, status: str, numbers: dict, thresholds: dict,
             message: str) -> dict:
    return {"check": check, "experiment": experiment, "status": status,
            "numbers": _clean(numbers), "thresholds": _clean(thresholds), "message": message}


def resolve_thresholds(thresholds: Mapping | None) -> dict:
    """The defaults overridden by ``thresholds``; an unknown key is an error, not ignored."""
    given = dict(thresholds or {})
    unknown = sorted(set(given) - set(DEFAULT_THRESHOLDS))
    if unknown:
        raise ESAError(f"unknown verdict threshold(s) {unknown}; known: {', '.join(DEFAULT_THRESHOLDS)}")
    return {**DEFAULT_THRESHOLDS, **{key: float(value) for key, value in given.items()}}


def baseline_verdict(metrics: Mapping, rerun: Mapping | None, thresholds: Mapping) -> dict:
    """Finite baseline, identical on rerun (see the module docstring)."""
    limits = {"baseline_rerun_tol": thresholds["baseline_rerun_tol"]}
    finite = bool(metrics["finite"]) and math.isfinite(metrics["loss"]) and math.isfinite(metrics["ppl"])
    numbers = {"loss": metrics["loss"], "ppl": metrics["ppl"], "tokens": metrics["tokens"],
               "windows": metrics["windows"], "finite": finite}
    if not finite:
        return _verdict("baseline", "baseline", "bad", numbers, limits,
                        f"baseline loss is not finite (loss {metrics['loss']}, ppl {metrics['ppl']})")
    if rerun is None:
        return _verdict("baseline", "baseline", "warn", numbers, limits,
                        "baseline finite; identical-on-rerun not checked (no rerun given)")
    diff = abs(metrics["loss"] - rerun["loss"])  # NaN when the rerun is not finite: fails below
    same_counts = (metrics["tokens"], metrics["windows"]) == (rerun["tokens"], rerun["windows"])
    numbers.update(rerun_loss=rerun["loss"], rerun_ppl=rerun["ppl"], loss_diff=diff,
                   same_counts=same_counts)
    if diff <= limits["baseline_rerun_tol"] and same_counts:
        return _verdict("baseline", "baseline", "good", numbers, limits,
                        f"baseline finite (PPL {metrics['ppl']:.4g}) and identical on rerun "
                        f"(|dloss| {diff:.3g} <= {limits['baseline_rerun_tol']:g})")
    return _verdict("baseline", "baseline", "bad", numbers, limits,
                    f"rerun differs: |dloss| {diff:.3g} > {limits['baseline_rerun_tol']:g} or "
                    f"token/window counts differ ({same_counts=})")


def global_top_share(stats: pd.DataFrame) -> float:
    """Lower bound on the share of all score mass in the global top 0.01% (module docstring)."""
    total = float(stats["sum"].sum())
    if total <= 0:
        return math.nan
    n = int(stats["numel"].sum())
    n_global = -(-n // TOP_DENOMINATOR)
    pooled = int(stats["top_n"].sum())
    top_mass = float((stats["top_share"].fillna(0.0) * stats["sum"]).sum())  # NaN share: zero mass
    return min(1.0, n_global / pooled) * top_mass / total


def _worst(values) -> float:
    """The smallest value; NaN (e.g. the kurtosis of a constant score) counts as the smallest,
    so it can never pass a ``>=`` threshold."""
    values = list(values)
    return math.nan if any(math.isnan(v) for v in values) else min(values)


def heavy_tail_verdict(experiment: ExperimentData, thresholds: Mapping) -> dict | None:
    """Heavy-tailed score distribution of the experiment's metric, over its seeds."""
    if not experiment.stats:
        return None
    limits = {key: thresholds[key] for key in ("top_share_min", "kurtosis_min")}
    per_seed = {seed: {"global_top_share": global_top_share(stats),
                       "median_kurtosis": float(stats["kurtosis"].median()),
                       "max_top_share": float(stats["top_share"].max())}
                for seed, stats in sorted(experiment.stats.items())}
    share = _worst(v["global_top_share"] for v in per_seed.values())
    kurt = _worst(v["median_kurtosis"] for v in per_seed.values())
    share_ok, kurt_ok = share >= limits["top_share_min"], kurt >= limits["kurtosis_min"]
    status = "good" if share_ok and kurt_ok else "bad" if not (share_ok or kurt_ok) else "warn"
    numbers = {"global_top_share": share, "median_kurtosis": kurt,
               "max_top_share": max(v["max_top_share"] for v in per_seed.values()), "per_seed": per_seed}
    shape = {"good": "heavy-tailed", "bad": "flat", "warn": "mixed"}[status]
    message = (f"{experiment.metric}: {shape}; global top 0.01% holds >= {share:.3g} of the score "
               f"mass ({'>=' if share_ok else '<'} {limits['top_share_min']:g}), median kurtosis "
               f"{kurt:.3g} ({'>=' if kurt_ok else '<'} {limits['kurtosis_min']:g}), worst seed")
    return _verdict("heavy_tail", experiment.name, status, numbers, limits, message)


def topk_spread_verdict(experiment: ExperimentData, thresholds: Mapping) -> dict | None:
    """A global top-k set that sits entirely in one tensor is a bug signal (runbook command 3)."""
    if experiment.mode != GLOBAL or not experiment.masks:
        return None
    limits = {"max_tensor_share": thresholds["max_tensor_share"]}
    per_seed = {}
    for seed, mask in sorted(experiment.masks.items()):
        counts = mask.loc[mask["set"] == TOP, "tensor"].value_counts()
        per_seed[seed] = {"largest_tensor_share": float(counts.iloc[0] / counts.sum()),
                          "largest_tensor": counts.index[0], "tensors": int(len(counts))}
    worst_seed = max(per_seed, key=lambda s: per_seed[s]["largest_tensor_share"])
    worst = per_seed[worst_seed]
    numbers = {"largest_tensor_share": worst["largest_tensor_share"],
               "largest_tensor": worst["largest_tensor"], "per_seed": per_seed}
    where = (f"largest tensor share {worst['largest_tensor_share']:.3g} "
             f"({worst['largest_tensor']}, seed {worst_seed})")
    if experiment.k == 1:
        return _verdict("topk_spread", experiment.name, "warn", numbers, limits,
                        f"k=1: a single weight always sits in one tensor; {where}")
    if worst["largest_tensor_share"] >= limits["max_tensor_share"]:
        return _verdict("topk_spread", experiment.name, "bad", numbers, limits,
                        f"global top-{experiment.k} concentrated in one tensor: {where} >= "
                        f"{limits['max_tensor_share']:g}")
    return _verdict("topk_spread", experiment.name, "good", numbers, limits,
                    f"global top-{experiment.k} spread over tensors: {where} < "
                    f"{limits['max_tensor_share']:g}")


def _trivial_bottom(masks: Mapping[int, pd.DataFrame]) -> bool:
    """Every bottom_k weight of every seed scores exactly 0 (a zero-gradient control)."""
    scores = [m.loc[m["set"] == BOTTOM_K, "score"] for m in masks.values()]
    scores = [s for s in scores if len(s)]
    return bool(scores) and all((s == 0).all() for s in scores)


def _saturated(loss: float, uniform_loss: float | None, tol: float) -> bool:
    """A perturbed loss at the uniform-output level ln V (within ``tol * ln V``), or not finite."""
    if not math.isfinite(loss):
        return True
    return uniform_loss is not None and abs(loss - uniform_loss) <= tol * uniform_loss


def _seed_detail(seed: int, values: Mapping, control: str) -> str:
    if values["saturated"]:
        return (f"seed {seed}: loss top {values['top_loss']:.4g} and {control} "
                f"{values['control_loss']:.4g} (saturated)")
    ratio = f" (x{values['ratio']:.3g})" if not math.isnan(values["ratio"]) else ""
    (top_lo, top_hi), (ctl_lo, ctl_hi) = values["top_interval"], values["control_interval"]
    return (f"seed {seed}: dPPL top {values[TOP]:.4g} [{top_lo:.3g}, {top_hi:.3g}] vs {control} "
            f"{values['control']:.4g} [{ctl_lo:.3g}, {ctl_hi:.3g}]{ratio}")


def _separation(name: str, control: str, rows: pd.DataFrame, trivial: bool,
                thresholds: Mapping, perturbation: dict, uniform_loss: float | None) -> dict:
    """One control's separation verdict from one perturbation's results (all seeds);
    ``uniform_loss`` is ln V (None when V is unknown: only a non-finite loss saturates)."""
    limits = {key: thresholds[key] for key in ("separation_ratio", "saturation_tol")}
    r, tol = limits["separation_ratio"], limits["saturation_tol"]
    first = rows.drop_duplicates(["seed", "set"]).set_index("seed")
    columns = ["delta_ppl", "loss", "delta_ppl_lo", "delta_ppl_hi"]
    paired = first.loc[first["set"] == TOP, columns].merge(
        first.loc[first["set"] == control, columns], left_index=True, right_index=True, suffixes=("", "_control"))
    per_seed, separates, fails, saturated, overlap = {}, [], [], [], []
    for seed, (top, top_loss, top_lo, top_hi, ctl, ctl_loss, ctl_lo, ctl_hi) in paired.sort_index().iterrows():
        interval = {"top_interval": [top_lo, top_hi], "control_interval": [ctl_lo, ctl_hi]}
        if _saturated(top_loss, uniform_loss, tol) and _saturated(ctl_loss, uniform_loss, tol):
            per_seed[int(seed)] = {TOP: top, "control": ctl, "ratio": math.nan, "top_loss": top_loss,
                                   "control_loss": ctl_loss, "saturated": True, **interval}
            saturated.append(int(seed))
            continue
        if math.isnan(top) or math.isnan(ctl):  # no dPPL to compare (a NaN loss on one side only)
            continue
        ratio = top / ctl if ctl > 0 else math.nan
        apart = top_lo > ctl_hi  # NaN bounds (no interval) are never apart
        per_seed[int(seed)] = {TOP: top, "control": ctl, "ratio": ratio, "top_loss": top_loss,
                               "control_loss": ctl_loss, "saturated": False, "apart": apart, **interval}
        separates.append(top > 0 and top > ctl and top >= r * max(ctl, 0.0) and apart)
        fails.append(top <= ctl)
        if not apart and top > ctl:
            overlap.append(int(seed))
    ratios = [v["ratio"] for v in per_seed.values() if not math.isnan(v["ratio"])]
    numbers = {**perturbation, "seeds": len(per_seed), "min_ratio": min(ratios, default=math.nan),
               "trivial_control": trivial, "uniform_loss": uniform_loss, "saturated_seeds": saturated,
               "overlapping_seeds": overlap, "per_seed": per_seed}
    detail = "; ".join(_seed_detail(seed, values, control) for seed, values in per_seed.items())
    if not per_seed:
        status, lead = "warn", f"no seed has both top and {control} results"
    elif any(fails):
        status, lead = "bad", f"top does no more damage than {control} in {sum(fails)} seed(s)"
    elif saturated:
        level = "non-finite" if uniform_loss is None else \
            f"at loss ln V = {uniform_loss:.4g} (uniform output) or non-finite"
        status, lead = "warn", (f"saturated: top and {control} both {level} in {len(saturated)} "
                                f"seed(s); the perturbation destroys the model whichever weights it "
                                f"hits (lower the scale)")
    elif all(separates):
        status, lead = "good", (f"top beats {control} by >= x{r:g} in every seed, with the bootstrap "
                                f"intervals of dPPL apart")
    elif overlap:
        status, lead = "warn", (f"top beats {control} on the point estimate, but the bootstrap intervals "
                                f"of dPPL overlap in seed(s) {overlap}")
    else:
        status, lead = "warn", f"top beats {control} but not by x{r:g} in every seed"
    if trivial and status != "bad":
        status = "warn"
        lead += "; bottom_k weights all have score 0 (zero-gradient): a trivial control"
    return _verdict(f"separation_{control}", name, status, numbers, limits, f"{lead}. {detail}")


def separation_verdicts(experiment: ExperimentData, thresholds: Mapping,
                        vocab_size: int | None = None) -> list[dict]:
    """dPPL(top) against each control present, per perturbation in the results; ``vocab_size``
    (V, from the baseline metrics) lets a perturbation saturated at loss ln V be flagged."""
    results = experiment.results
    if results is None or results.empty:
        return []
    groups = list(results.groupby(["perturb", "scale", "noise"], sort=True))
    uniform_loss = math.log(vocab_size) if vocab_size else None
    out = []
    for (perturb, scale, noise), rows in groups:
        label = experiment.name if len(groups) == 1 else f"{experiment.name}/{perturb}_{scale:g}_{noise}"
        perturbation = {"perturb": perturb, "scale": scale, "noise": noise}
        for control in CONTROLS:
            if control in set(rows["set"]):
                trivial = control == BOTTOM_K and _trivial_bottom(experiment.masks)
                out.append(_separation(label, control, rows, trivial, thresholds, perturbation, uniform_loss))
    return out


def stability_verdict(experiment: ExperimentData, thresholds: Mapping) -> dict | None:
    """Mean Jaccard of top sets across seeds must exceed ``jaccard_min``."""
    summary = experiment.stability
    if summary is None:
        return None
    limits = {"jaccard_min": thresholds["jaccard_min"]}
    numbers = {key: summary.get(key) for key in ("n_seeds", "jaccard_mean", "jaccard_min",
                                                  "spearman_mean", "spearman_min")}
    mean = summary.get("jaccard_mean")
    if summary.get("n_seeds", 0) < 2 or mean is None or math.isnan(mean):
        return _verdict("seed_stability", experiment.name, "warn", numbers, limits,
                        f"stability needs >= 2 seeds (got {summary.get('n_seeds')})")
    good = mean > limits["jaccard_min"]
    return _verdict("seed_stability", experiment.name, "good" if good else "bad", numbers, limits,
                    f"mean Jaccard across {summary['n_seeds']} seeds {mean:.3g} "
                    f"{'>' if good else '<='} {limits['jaccard_min']:g} "
                    f"(min {summary.get('jaccard_min', math.nan):.3g})")


def agreement_verdicts(agreement: pd.DataFrame | None, thresholds: Mapping,
                       metrics: tuple[str, ...] = GRADIENT_METRICS) -> list[dict]:
    """Per (mode, k): Jaccard between the gradient metrics' top sets, mean over seeds."""
    if agreement is None or agreement.empty:
        return []
    limits = {"agreement_min": thresholds["agreement_min"]}
    rows = agreement[agreement["metric_a"].isin(metrics) & agreement["metric_b"].isin(metrics)]
    rows = rows[rows["metric_a"] != rows["metric_b"]]
    pair = [" ~ ".join(sorted(p)) for p in zip(rows["metric_a"], rows["metric_b"])]
    rows = rows.assign(pair=pair)
    out = []
    for (mode, k), group in rows.groupby(["mode", "k"], sort=True):
        means = group.groupby("pair")["jaccard"].mean().to_dict()
        low, high = min(means.values()), max(means.values())
        t = limits["agreement_min"]
        status = "good" if low >= t else "bad" if high < t else "warn"
        numbers = {"pairs": means, "min_jaccard": low, "max_jaccard": high,
                   "seeds": sorted(int(s) for s in group["seed"].unique())}
        detail = ", ".join(f"{p} {v:.3g}" for p, v in means.items())
        lead = {"good": f"every pair reaches {t:g}", "bad": f"no pair reaches {t:g}",
                "warn": f"some pairs below {t:g}"}[status]
        out.append(_verdict("metric_agreement", f"{mode}_k{int(k)}", status, numbers, limits,
                            f"{lead}: {detail}"))
    return out


def compute_verdicts(baseline: Mapping, experiments: list[ExperimentData],
                     agreement: pd.DataFrame | None = None, rerun: Mapping | None = None,
                     thresholds: Mapping | None = None) -> list[dict]:
    """Every verdict: baseline first, then per experiment, then metric agreement."""
    limits = resolve_thresholds(thresholds)
    verdicts = [baseline_verdict(baseline, rerun, limits)]
    for experiment in experiments:
        verdicts += [v for v in (heavy_tail_verdict(experiment, limits),
                                 topk_spread_verdict(experiment, limits)) if v is not None]
        verdicts += separation_verdicts(experiment, limits, baseline.get("vocab_size"))
        stability = stability_verdict(experiment, limits)
        if stability is not None:
            verdicts.append(stability)
    return verdicts + agreement_verdicts(agreement, limits)


def verdicts_from_files(baseline_path, experiments: list[Mapping], agreement_paths=None,
                        rerun_path=None, thresholds: Mapping | None = None) -> list[dict]:
    """:func:`compute_verdicts` on the workflow's files: experiment entries as
    :func:`esa.results.load_experiment` reads them, agreement as
    :func:`esa.results.read_agreement` (a path or a list)."""
    return compute_verdicts(read_json(baseline_path), [load_experiment(e) for e in experiments],
                            agreement=read_agreement(agreement_paths),
                            rerun=read_optional(rerun_path, read_json),
                            thresholds=thresholds)


def count_statuses(verdicts: list[dict]) -> dict[str, int]:
    """How many verdicts have each status, in the order good, warn, bad."""
    return {status: sum(v["status"] == status for v in verdicts) for status in STATUSES}


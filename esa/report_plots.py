"""Seaborn figures of the report beyond ``esa.plots``: damage of top vs controls, seed and
metric Jaccard matrices, confirmed super weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .cloze import CHOICES as CLOZE_CHOICES, TASK as CLOZE_TASK
from .names import MATCHED_CONTROL, PER_CHANNEL, PROTECT_METRIC, PROTECT_NONE, RANDOM_K, SETS, SUPER_WEIGHTS
from .plots import plt, save_figure, sns  # one Agg backend setup and one saver for every figure


def _symmetric(pairs: pd.DataFrame, a: str, b: str, value: str, labels: list) -> pd.DataFrame:
    """Square matrix of ``value`` over ``labels`` from pair rows, mirrored, 1 on the diagonal."""
    matrix = pd.DataFrame(np.eye(len(labels)), index=labels, columns=labels)
    for row in pairs.itertuples(index=False):
        x, y, v = getattr(row, a), getattr(row, b), getattr(row, value)
        matrix.loc[x, y] = matrix.loc[y, x] = v
    return matrix


def plot_delta_ppl(results: pd.DataFrame, path: str | Path, title: str) -> None:
    """dPPL of the top set and its controls, one dot per seed, a bar at the median over seeds.

    A destroyed model (dPPL infinite) is drawn on a dotted line at 10x the largest finite
    |dPPL| and labelled; the y axis is symlog when the positive values span more than two
    orders of magnitude (symlog, not log: a control can leave dPPL at 0 or below).
    """
    data = results.assign(perturbation=results["perturb"] + " " + results["scale"].map("{:g}".format))
    finite = data["delta_ppl"].replace([np.inf, -np.inf], np.nan)
    ceiling = 10 * max(float(finite.abs().max()) if finite.notna().any() else 0.0, 1.0)
    destroyed = ~np.isfinite(data["delta_ppl"])
    data = data.assign(dPPL=finite.fillna(ceiling))
    order = [s for s in SETS if s in set(data["set"])]
    several = data["perturbation"].nunique() > 1  # seaborn cannot dodge a single hue level
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # seaborn jitters with numpy's global generator: a fixed seed makes the figure (and the
    # report page holding it) the same bytes on every run; the caller's state is put back
    state = np.random.get_state()
    np.random.seed(0)
    try:
        sns.stripplot(data=data, x="set", y="dPPL", hue="perturbation", order=order, dodge=several,
                      size=8, jitter=0.15, ax=ax)
    finally:
        np.random.set_state(state)
    # the median, unlike the mean, is not dragged by a destroyed run drawn at the ceiling
    sns.pointplot(data=data, x="set", y="dPPL", hue="perturbation", order=order,
                  dodge=0.4 if several else False, estimator="median", errorbar=None, markers="_",
                  markersize=20, linestyles="none", palette="dark:black", legend=False, ax=ax)
    low, high = min(0.0, float(data["dPPL"].min())), float(data["dPPL"].max())
    positive = data.loc[data["dPPL"] > 0, "dPPL"]
    if len(positive) and positive.max() / positive.min() > 100:
        linthresh = float(positive.min())
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.set_ylim(2 * low - 0.5 * linthresh, 4 * high)
    else:
        margin = 0.08 * (high - low or 1.0)
        ax.set_ylim(low - margin, high + 2 * margin)
    if destroyed.any():
        ax.axhline(ceiling, color="crimson", lw=0.8, ls=":")
        ax.text(0.99, ceiling, f"{int(destroyed.sum())} run(s) non-finite (inf) ", color="crimson",
                ha="right", va="bottom", transform=ax.get_yaxis_transform())
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("dPPL = PPL - baseline PPL")
    ax.set_title(title)
    save_figure(fig, path)


def plot_seed_jaccard(pairs: pd.DataFrame, path: str | Path, title: str) -> None:
    """Seeds x seeds heatmap of the Jaccard of their top sets."""
    seeds = sorted(set(pairs["seed_a"]) | set(pairs["seed_b"]))
    matrix = _symmetric(pairs, "seed_a", "seed_b", "jaccard", seeds)
    fig, ax = plt.subplots(figsize=(1.2 * len(seeds) + 2.5, 1.0 * len(seeds) + 1.8))
    sns.heatmap(matrix, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", square=True,
                cbar_kws={"label": "Jaccard"}, ax=ax)
    ax.set_xlabel("seed")
    ax.set_ylabel("seed")
    ax.set_title(title)
    save_figure(fig, path)


def plot_metric_agreement(agreement: pd.DataFrame, path: str | Path) -> None:
    """Metrics x metrics heatmaps of top-set Jaccard (mean over seeds), one per mode and k."""
    groups = list(agreement.groupby(["mode", "k"], sort=True))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.6), squeeze=False)
    for ax, ((mode, k), group) in zip(axes[0], groups):
        means = group.groupby(["metric_a", "metric_b"], as_index=False)["jaccard"].mean()
        metrics = list(dict.fromkeys([*means["metric_a"], *means["metric_b"]]))
        matrix = _symmetric(means, "metric_a", "metric_b", "jaccard", metrics)
        sns.heatmap(matrix, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", square=True,
                    cbar=ax is axes[0][-1], ax=ax)
        ax.set_title(f"{mode} k={k} ({group['seed'].nunique()} seed(s))")
    fig.suptitle("top-set Jaccard between metrics")
    save_figure(fig, path)


def plot_super_weights(df: pd.DataFrame, path: str | Path, factor: float = 1.5) -> None:
    """PPL ratio from zeroing each candidate alone, with the confirmation line at ``factor``."""
    labels = [f"L{r.layer} {r.module}\n[{r.row}, {r.col}]" for r in df.itertuples(index=False)]
    ratio = df["ppl_ratio"].replace(np.inf, np.nan)
    ceiling = 10 * max(float(ratio.max()) if ratio.notna().any() else factor, factor)
    data = pd.DataFrame({"candidate": labels, "PPL ratio": ratio.fillna(ceiling).to_numpy(),
                         "confirmed": df["confirmed"].map({True: "confirmed", False: "not confirmed"})})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(df) + 2), 4.8))
    sns.barplot(data=data, x="candidate", y="PPL ratio", hue="confirmed",
                hue_order=["confirmed", "not confirmed"], palette=["crimson", "grey"], dodge=False, ax=ax)
    ax.axhline(factor, color="black", ls="--", lw=1, label=f"factor {factor:g}")
    if data["PPL ratio"].max() / max(data["PPL ratio"].min(), 1e-12) > 50:
        ax.set_yscale("log")
    ax.tick_params(axis="x", labelsize=7, rotation=90)
    ax.legend()
    ax.set_title("zeroing each candidate alone: PPL / baseline PPL")
    save_figure(fig, path)



def _weight_label(row) -> str:
    """``L0 mlp.down_proj [5, 7]``: a super weight's layer, the last two parts of its tensor's name, row and col."""
    name = ".".join(row.tensor.removesuffix(".weight").rsplit(".", 2)[-2:])
    return f"L{row.layer} {name} [{row.row}, {row.col}]"


def _capped(ppl: pd.Series) -> tuple[pd.Series, float]:
    """PPL with inf (a destroyed model) drawn at 10x the largest finite value: (values, that ceiling)."""
    finite = ppl.replace([np.inf, -np.inf], np.nan)
    ceiling = 10 * (float(finite.max()) if finite.notna().any() else 1.0)
    return ppl.where(~np.isinf(ppl), ceiling), ceiling


def plot_scale_sweep(sweep: pd.DataFrame, baseline_ppl: float, path: str | Path) -> None:
    """PPL against the scale s of w <- s * w, one line per super weight (esa.mechanism), log y,
    with the baseline PPL as a dashed line; a non-finite PPL is drawn at a dotted ceiling."""
    ppl, ceiling = _capped(sweep["ppl"])
    data = pd.DataFrame({"scale": sweep["scale"], "PPL": ppl,
                         "weight": [_weight_label(r) for r in sweep.itertuples(index=False)]}).sort_values("scale")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.lineplot(data=data, x="scale", y="PPL", hue="weight", marker="o", ax=ax)
    ax.axhline(baseline_ppl, color="black", ls="--", lw=1, label="baseline")
    if np.isinf(sweep["ppl"]).any():
        ax.axhline(ceiling, color="crimson", lw=0.8, ls=":", label="PPL not finite")
    ax.set_yscale("log")
    ax.set_xlabel("scale s (w <- s * w; 1 = unchanged)")
    ax.legend(fontsize=8)
    ax.set_title("each super weight scaled alone")
    save_figure(fig, path)


HEADLINE_ORDER = ("top", "random_k", "bottom_k", "single super weight", "joint super weight")


def plot_headline(points: pd.DataFrame, path: str | Path) -> None:
    """The study on one log axis: PPL ratio (1 + dPPL / baseline PPL) with its bootstrap interval
    of each experiment's top set and controls (one point per seed) and of each confirmed single
    and joint super weight (``points``: label, kind, ratio, lo, hi; a non-finite ratio drawn at a
    dotted ceiling)."""
    data = points.copy()
    data["ratio"], ceiling = _capped(data["ratio"])
    kinds = [kind for kind in HEADLINE_ORDER if kind in set(data["kind"])]
    fig, ax = plt.subplots(figsize=(8, 0.45 * data["label"].nunique() + 1.6))
    sns.stripplot(data=data, x="ratio", y="label", hue="kind", hue_order=kinds, dodge=False, jitter=False,
                  size=7, ax=ax)
    rows = {label: i for i, label in enumerate(dict.fromkeys(data["label"]))}
    for r in data.itertuples(index=False):
        if np.isfinite(r.lo) and np.isfinite(r.hi):
            ax.plot([max(r.lo, 1e-3), max(r.hi, 1e-3)], [rows[r.label]] * 2, color="grey", lw=1.2, zorder=0)
    ax.axvline(1.0, color="black", ls="--", lw=1)
    if np.isinf(points["ratio"]).any():
        ax.axvline(ceiling, color="crimson", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("PPL ratio to the baseline (1 + dPPL / PPL; bars: 95% bootstrap interval)")
    ax.set_ylabel("")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("every perturbed set and every confirmed super weight")
    save_figure(fig, path)


def plot_sink_mass(sinks: pd.DataFrame, path: str | Path) -> None:
    """Attention-sink mass per decoder layer, one line per condition (esa.behaviour)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.lineplot(data=sinks, x="layer", y="sink_mass", hue="condition", marker="o", ax=ax)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean attention on the first position")
    ax.legend(fontsize=8)
    ax.set_title("attention sink per layer")
    save_figure(fig, path)


def plot_lm_eval(scores: pd.DataFrame, path: str | Path) -> None:
    """lm-eval accuracy per condition, one panel per task and metric, error bars +-1 stderr, and
    chance (1/choices) where the task is ESA's 4-choice cloze (esa.behaviour)."""
    panels = list(scores.groupby(["task", "metric"], sort=False))
    conditions = list(dict.fromkeys(scores["condition"]))
    width = max(5.0, 0.8 * len(conditions) + 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.5), squeeze=False)
    colours = dict(zip(conditions, sns.color_palette(n_colors=len(conditions))))
    for ax, ((task, metric), part) in zip(axes[0], panels):
        part = part.set_index("condition").reindex([c for c in conditions if c in set(part["condition"])])
        x = np.arange(len(part))
        ax.bar(x, part["value"], color=[colours[c] for c in part.index],
               yerr=part["stderr"].fillna(0).to_numpy(), capsize=3)
        if task == CLOZE_TASK:
            ax.axhline(1 / CLOZE_CHOICES, color="grey", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=8)
        ax.set_xticks(x, part.index, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel(metric)
        ax.set_title(f"{task} (n {int(part['n'].max())})")
    save_figure(fig, path)


def plot_mechanism_bars(restore: pd.DataFrame, control: pd.DataFrame, baseline_ppl: float,
                        path: str | Path) -> None:
    """Per super weight: PPL of the baseline, with the weight zeroed, zeroed with its massive
    activation restored (absent for a weight outside an MLP output projection), and with its
    tensor's matched-magnitude control zeroed (esa.mechanism), log y."""
    matched = control[control["set"] == MATCHED_CONTROL].set_index("tensor")["ppl"]
    rows = []
    for r in restore.itertuples(index=False):
        label = _weight_label(r)
        rows += [(label, "baseline", baseline_ppl), (label, "zeroed", r.ppl_zeroed),
                 (label, "zeroed + restored", r.ppl_restored), (label, "matched control", matched[r.tensor])]
    data = pd.DataFrame(rows, columns=["weight", "edit", "PPL"])
    data["PPL"], _ = _capped(data["PPL"])
    fig, ax = plt.subplots(figsize=(max(7.0, 2.2 * len(restore) + 2), 4.5))
    sns.barplot(data=data, x="weight", y="PPL", hue="edit", ax=ax)
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title("PPL: zeroed, massive activation restored, matched control")
    save_figure(fig, path)


def plot_culprit_search(search: pd.DataFrame, path: str | Path, title: str) -> None:
    """Every evaluation of a culprit search (``esa.culprits.SEARCH_COLUMNS``): the size of the
    group perturbed against the evaluation step, a line from each group to its halves,
    destructive groups in crimson."""
    at = search.set_index("group")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.2 * len(search) + 3), 4.2))
    for row in search[search["parent"] > 0].itertuples(index=False):
        parent = at.loc[row.parent]
        ax.plot([parent["step"], row.step], [parent["size"], row.size], color="lightgrey", lw=0.8, zorder=1)
    data = search.assign(outcome=search["destructive"].map({True: "destructive", False: "not destructive"}))
    sns.scatterplot(data=data, x="step", y="size", hue="outcome", hue_order=["destructive", "not destructive"],
                    palette=["crimson", "grey"], s=50, zorder=2, ax=ax)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("evaluation step")
    ax.set_ylabel("weights perturbed together")
    ax.set_title(title)
    save_figure(fig, path)


def scheme_label(bits: int, group_size: int) -> str:
    """``int3, per channel`` or ``int4, group 128`` (a row of quantize/results.parquet)."""
    return f"int{bits}, " + ("per channel" if group_size == PER_CHANNEL else f"group {group_size}")


def plot_quantize_protection(results: pd.DataFrame, baseline_ppl: float, path: str | Path) -> None:
    """PPL of the quantized model against k, the weights kept in full precision (esa.quantize),
    one panel per scheme: a line per metric's global top-k, the random_k control dashed, the
    confirmed super weights as a star, horizontal lines at none kept and at the unquantized
    baseline; log x and y, a non-finite PPL drawn at a dotted ceiling."""
    ppl, ceiling = _capped(results["ppl"])
    data = results.assign(PPL=ppl, scheme=[scheme_label(b, g) for b, g in zip(results["bits"], results["group_size"])],
                          kept=results["metric"].where(results["protect"] == PROTECT_METRIC, results["protect"]))
    schemes = list(dict.fromkeys(data["scheme"]))
    lines = data[data["protect"].isin([PROTECT_METRIC, RANDOM_K])]
    kept = list(dict.fromkeys(lines["kept"]))
    dashes = {name: (4, 2) if name == RANDOM_K else "" for name in kept}
    # each panel its own y range: one scheme's PPL can be 1,000x another's (int3 vs int4)
    fig, axes = plt.subplots(1, len(schemes), figsize=(5.5 * len(schemes) + 1.5, 4.5), squeeze=False)
    for ax, scheme in zip(axes[0], schemes):
        part = data[data["scheme"] == scheme]
        last = ax is axes[0][-1]
        sns.lineplot(data=lines[lines["scheme"] == scheme], x="k", y="PPL", hue="kept", hue_order=kept, style="kept",
                     style_order=kept, dashes=dashes, markers=True, legend=last, ax=ax)
        saved = part[(part["protect"] == SUPER_WEIGHTS) & (part["n_protected"] > 0)]
        ax.scatter(saved["k"], saved["PPL"], marker="*", s=160, color="crimson", zorder=3, label="super weights")
        ax.axhline(float(part.loc[part["protect"] == PROTECT_NONE, "PPL"].iloc[0]), color="grey", ls=":",
                   label="none kept")
        ax.axhline(baseline_ppl, color="black", lw=0.8, label="unquantized")
        if np.isinf(part["ppl"]).any():
            ax.axhline(ceiling, color="crimson", lw=0.8, ls=":", label="PPL not finite")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("k: weights kept in full precision")
        ax.set_title(scheme)
        if last:
            ax.legend(fontsize=8)
    fig.suptitle("PPL vs weights protected")
    save_figure(fig, path)

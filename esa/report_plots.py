"""Seaborn figures of the report beyond ``esa.plots``: damage of top vs controls, seed and
metric Jaccard matrices, confirmed super weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .names import SETS
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
    sns.stripplot(data=data, x="set", y="dPPL", hue="perturbation", order=order, dodge=several,
                  size=8, jitter=0.15, ax=ax)
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


"""Seaborn figures of the Phase 2 outputs: score distributions, hotspots, massive activations."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: jobs run on cluster nodes without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .io import write_atomic  # noqa: E402
from .names import TOP, hist_edges  # noqa: E402


def save_figure(fig, path: str | Path) -> None:
    """Lay out ``fig``, write it to ``path`` atomically (format from the suffix) and close it."""
    fig.tight_layout()
    # the temporary file's suffix is .tmp: name the format, or matplotlib guesses from it
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format=Path(path).suffix[1:]))
    plt.close(fig)


def plot_score_distribution(stats: pd.DataFrame, path: str | Path, title: str) -> None:
    """Histogram of log10(score) per module type, summed over layers (log-scale counts)."""
    edges = hist_edges()
    centres = (edges[:-1] + edges[1:]) / 2
    rows = []
    for module, group in stats.groupby("module", sort=False):
        counts = np.sum(np.stack(group["log10_hist"].to_numpy()), axis=0)
        rows += [{"module": module, "log10(score)": c, "weights": n} for c, n in zip(centres, counts) if n > 0]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    sns.lineplot(data=pd.DataFrame(rows), x="log10(score)", y="weights", hue="module", ax=ax)
    ax.set_yscale("log")
    ax.set_title(title)
    save_figure(fig, path)


def plot_hotspots(stats: pd.DataFrame, mask: pd.DataFrame, path: str | Path, title: str) -> None:
    """Layer x module heatmaps: how many top-k weights sit in each tensor, and its score mass."""
    top = mask[mask["set"] == TOP]
    counts = top.groupby(["layer", "module"]).size().unstack(fill_value=0)
    counts = counts.reindex(index=sorted(stats["layer"].unique()), columns=stats["module"].unique(), fill_value=0)
    mass = stats.pivot_table(index="layer", columns="module", values="sum", aggfunc="sum")
    mass = (mass / mass.to_numpy().sum()).reindex(columns=counts.columns)
    height = max(4.0, 0.22 * len(counts))
    fig, axes = plt.subplots(1, 2, figsize=(13, height))
    sns.heatmap(counts, ax=axes[0], cmap="rocket_r", cbar_kws={"label": "top-k weights"})
    axes[0].set_title(f"where the top-{len(top)} sit")
    sns.heatmap(mass, ax=axes[1], cmap="mako_r", cbar_kws={"label": "share of score mass"})
    axes[1].set_title("score mass")
    fig.suptitle(title)
    save_figure(fig, path)


def plot_massive_activations(trace: pd.DataFrame, path: str | Path, title: str) -> None:
    """Max |input| and |output| activation of every mlp.down_proj per layer (log scale)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    sns.lineplot(data=trace, x="layer", y="value", hue="side", marker="o", ax=ax)
    ax.set_yscale("log")
    ax.set_ylabel("max |activation|")
    peak = trace.loc[trace["value"].idxmax()]
    ax.annotate(f"layer {peak.layer} {peak.side} channel {peak.channel}", (peak.layer, peak.value),
                textcoords="offset points", xytext=(5, 5))
    ax.set_title(title)
    save_figure(fig, path)

"""The comparison page of a study over several models: one self-contained ``index.html`` that
puts the models side by side.

Per model: the baseline (PPL, loss and its standard error); the confirmed super weights with
their layer, relative depth ``layer / (L - 1)`` for a model of L decoder layers, coordinates,
PPL factor and the metrics that ranked them; the strongest massive activation (the largest
|input| or |output| of any layer's MLP output projection in the confirm trace); per metric the
heavy-tail statistics of its scores (median excess kurtosis over tensors, and the share of all
score mass in the global top 0.01%, :func:`esa.verdicts.global_top_share`); and the metric
agreement (mean Jaccard over seeds of each pair of metrics' top-k sets, per mode and k).
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from .io import read_parquet
from .report import _by_weight, _e, _table, write_page
from .results import read_agreement, read_json
from .verdicts import global_top_share


def _baselines(baseline: Mapping[str, str]) -> pd.DataFrame:
    rows = []
    for model, path in baseline.items():
        m = read_json(path)
        rows.append({"model": model, "ppl": m["ppl"], "loss": m["loss"], "loss_stderr": m.get("loss_stderr"),
                     "tokens": m["tokens"], "finite": m["finite"]})
    return pd.DataFrame(rows)


def _layer_count(stats: Mapping[str, str]) -> int:
    """Decoder layers of a model: one more than the largest layer of any scored tensor."""
    return 1 + max(int(read_parquet(path, columns=["layer"])["layer"].max()) for path in stats.values())


def _super_weights(super_weights: Mapping[str, str], stats: Mapping[str, Mapping[str, str]]) -> pd.DataFrame:
    frames = []
    for model, path in super_weights.items():
        confirmed = _by_weight(read_parquet(path)).query("confirmed")
        layers = _layer_count(stats[model])
        frames.append(confirmed.assign(model=model, depth=confirmed["layer"] / max(layers - 1, 1))
                      .sort_values("ppl_ratio", ascending=False))
    columns = ["model", "tensor", "layer", "depth", "row", "col", "weight", "ppl_ratio", "ranked_by"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _strongest_activations(activations: Mapping[str, str]) -> pd.DataFrame:
    rows = []
    for model, path in activations.items():
        trace = read_parquet(path)
        top = trace.loc[trace["value"].idxmax()]
        rows.append({"model": model, "layer": top["layer"], "module": top["module"], "side": top["side"],
                     "value": top["value"], "channel": top["channel"], "token": top["token"]})
    return pd.DataFrame(rows)


def _heavy_tails(stats: Mapping[str, Mapping[str, str]]) -> pd.DataFrame:
    rows = []
    for model, by_metric in stats.items():
        for metric, path in by_metric.items():
            table = read_parquet(path)
            rows.append({"model": model, "metric": metric, "median_kurtosis": float(table["kurtosis"].median()),
                         "global_top_share": global_top_share(table)})
    return pd.DataFrame(rows)


def _agreement(agreement: Mapping[str, Mapping[str, str]]) -> pd.DataFrame:
    frames = []
    for model, paths in agreement.items():
        table = read_agreement(list(paths.values())) if paths else None
        if table is not None:
            mean = table.groupby(["mode", "k", "metric_a", "metric_b"], as_index=False)["jaccard"].mean()
            frames.append(mean.assign(model=model))
    columns = ["model", "mode", "k", "metric_a", "metric_b", "jaccard"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _section(title: str, table: pd.DataFrame, empty: str) -> str:
    body = _table(table) if not table.empty else f'<p class="not-run">{_e(empty)}</p>'
    return f"<section><h2>{_e(title)}</h2>{body}</section>"


def build_comparison(out_html, *, baseline: Mapping[str, str], super_weights: Mapping[str, str],
                     activations: Mapping[str, str], stats: Mapping[str, Mapping[str, str]],
                     agreement: Mapping[str, Mapping[str, str]], factor: float) -> str:
    """Write the comparison page to ``out_html`` and return its HTML.

    Every argument maps model -> its file(s): ``baseline`` metrics.json, ``super_weights`` and
    ``activations`` of its confirm step, ``stats``: metric -> stats.parquet (the confirm seed's),
    ``agreement``: "{mode}_k{k}" -> agreement parquet (none with a single metric).
    """
    models = list(baseline)
    sections = [
        _section("Baseline", _baselines(baseline), "no baseline"),
        _section(f"Confirmed super weights (zeroing one multiplies PPL by at least \u00d7{factor:g})",
                 _super_weights(super_weights, stats), "no super weight confirmed in any model"),
        _section("Strongest massive activation", _strongest_activations(activations), "no trace"),
        _section("Heavy tails of the scores", _heavy_tails(stats), "no scores"),
        _section("Metric agreement (mean Jaccard over seeds)", _agreement(agreement),
                 "fewer than two metrics scored"),
    ]
    title = f"ESA comparison: {', '.join(models)}"
    return write_page(out_html, title, sections)

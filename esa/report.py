"""The study's report: one self-contained ``index.html`` (inline CSS, every figure embedded as
a base64 PNG data URI, no external resource), so it can be mailed or opened offline.

Top to bottom: the verdict table (``id="verdicts"``, worst first, rows coloured by status),
the baseline, one section per experiment (score distribution, hotspots, dPPL of top vs
controls with one dot per seed, Jaccard across seeds), metric agreement, the confirmed super
weights and the massive-activation trace. A part whose inputs were not produced says
"not run" rather than disappearing. The PNGs are also written to ``plots/`` beside the page.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from . import plots, report_plots
from .io import write_atomic
from .verdicts import (ExperimentData, count_statuses, load_experiment, read_agreement,
                       read_json, read_optional)

SEVERITY = {"bad": 0, "warn": 1, "good": 2}
CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-top: 0.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
#verdicts { width: 100%; } td.nums { overflow-wrap: anywhere; font-size: 0.9em; }
td.status, td.label { white-space: nowrap; }
th { background: #f2f2f2; }
tr.good td { background: #dff3e3; } tr.warn td { background: #fff3cd; }
tr.bad td { background: #f8d7da; }
td.status { font-weight: bold; text-transform: uppercase; }
.badge { display: inline-block; padding: 0.1em 0.6em; border-radius: 0.8em; margin-right: 0.4em; }
.badge.good { background: #8fd19e; } .badge.warn { background: #ffe083; }
.badge.bad { background: #f1959f; }
.not-run { color: #888; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
details pre { font-size: 0.8em; white-space: pre-wrap; margin: 0.2em 0; }
"""
NOT_RUN = '<p class="not-run">not run</p>'
STABILITY_KEYS = ["n_seeds", "n_pairs", "jaccard_mean", "jaccard_min", "spearman_mean", "spearman_min"]


def _e(value) -> str:
    return html.escape(str(value))


def _fmt(value) -> str:
    """Numbers with 4 significant digits, None as n/a, the rest as text."""
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):  # float32 columns are not Python floats
        return f"{value:.4g}"
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _figure(path: Path, alt: str, draw: Callable[[Path], None]) -> str:
    """Draw a figure to ``path`` with ``draw(path)`` and embed the PNG."""
    draw(path)
    return _img(path, alt)


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _numbers(numbers: Mapping) -> str:
    """Scalars inline; nested details (per seed, per pair) folded away."""
    flat = ", ".join(f"{_e(k)}={_e(_fmt(v))}" for k, v in numbers.items() if not isinstance(v, (dict, list)))
    nested = {k: v for k, v in numbers.items() if isinstance(v, (dict, list))}
    if nested:
        flat += f"<details><summary>details</summary><pre>{_e(json.dumps(nested, indent=1))}</pre></details>"
    return flat


def _verdict_section(verdicts: list[dict] | None) -> str:
    if verdicts is None:
        return f'<section id="verdict-section"><h2>Verdicts</h2>{NOT_RUN}</section>'
    counts = count_statuses(verdicts)
    badges = "".join(f'<span class="badge {s}">{n} {s}</span>' for s, n in counts.items())
    rows = "".join(
        f'<tr class="{_e(v["status"])}"><td class="status">{_e(v["status"])}</td>'
        f'<td class="label">{_e(v["check"])}</td><td class="label">{_e(v["experiment"])}</td>'
        f'<td>{_e(v["message"])}</td><td class="nums">{_numbers(v["numbers"])}</td>'
        f'<td class="nums">{_numbers(v["thresholds"])}</td></tr>'
        for v in sorted(verdicts, key=lambda v: SEVERITY[v["status"]]))
    table = ('<table id="verdicts"><thead><tr><th>status</th><th>check</th><th>experiment</th>'
             f'<th>message</th><th>numbers</th><th>thresholds</th></tr></thead><tbody>{rows}</tbody></table>')
    return f'<section id="verdict-section"><h2>Verdicts</h2><p>{badges}</p>{table}</section>'


def _baseline_section(baseline: Mapping) -> str:
    keys = ["ppl", "loss", "loss_stderr", "tokens", "windows", "finite"]
    frame = pd.DataFrame([{k: baseline.get(k) for k in keys}])
    return f'<section id="baseline"><h2>Baseline</h2>{_table(frame)}</section>'


def _experiment_section(exp: ExperimentData, plot_dir: Path) -> str:
    slug = _slug(exp.name)
    parts = [f'<section class="experiment" id="exp-{_e(slug)}"><h2>{_e(exp.name)}</h2>'
             f"<p>metric <b>{_e(exp.metric)}</b>, mode <b>{_e(exp.mode)}</b>, k = {exp.k}, "
             f"seeds {_e(sorted(exp.stats) or sorted(exp.masks) or 'none')}</p>"]
    seed = min(exp.stats, default=None)
    parts.append("<h3>Score distribution</h3>")
    parts.append(NOT_RUN if seed is None else _figure(
        plot_dir / f"{slug}_distribution.png", f"{exp.name} score distribution",
        lambda path: plots.plot_score_distribution(exp.stats[seed], path,
                                                   f"{exp.metric} score distribution, seed {seed}")))
    parts.append("<h3>Hotspots</h3>")
    parts.append(NOT_RUN if seed is None or seed not in exp.masks else _figure(
        plot_dir / f"{slug}_hotspots.png", f"{exp.name} hotspots",
        lambda path: plots.plot_hotspots(exp.stats[seed], exp.masks[seed], path, f"{exp.name} seed {seed}")))
    parts.append("<h3>Perturbation: dPPL of top vs controls</h3>")
    if exp.results is None or exp.results.empty:
        parts.append(NOT_RUN)
    else:
        parts.append(_figure(plot_dir / f"{slug}_delta_ppl.png", f"{exp.name} dPPL",
                             lambda path: report_plots.plot_delta_ppl(exp.results, path,
                                                                      f"{exp.name}: dPPL per seed")))
        columns = ["set", "seed", "n_weights", "perturb", "scale", "ppl", "delta_ppl", "ppl_ratio", "finite"]
        parts.append(_table(exp.results[columns].sort_values(["seed", "set"])))
    parts.append("<h3>Stability across seeds</h3>")
    if exp.stability_pairs is None or exp.stability_pairs.empty:
        parts.append(NOT_RUN)
    else:
        parts.append(_figure(plot_dir / f"{slug}_seed_jaccard.png", f"{exp.name} Jaccard across seeds",
                             lambda path: report_plots.plot_seed_jaccard(
                                 exp.stability_pairs, path, f"{exp.name}: top-{exp.k} Jaccard across seeds")))
    if exp.stability is not None:  # the summary JSON also carries its step's spec: show the numbers
        parts.append(_table(pd.DataFrame([{key: exp.stability.get(key) for key in STABILITY_KEYS}])))
    return "".join(parts) + "</section>"


def _agreement_section(agreement: pd.DataFrame | None, plot_dir: Path) -> str:
    body = NOT_RUN if agreement is None or agreement.empty else _figure(
        plot_dir / "metric_agreement.png", "metric agreement",
        lambda path: report_plots.plot_metric_agreement(agreement, path)) + _table(agreement)
    return f'<section id="agreement"><h2>Metric agreement</h2>{body}</section>'


def _super_weight_section(super_weights: pd.DataFrame | None, plot_dir: Path, factor: float) -> str:
    if super_weights is None or super_weights.empty:
        return f'<section id="super-weights"><h2>Super weights</h2>{NOT_RUN}</section>'
    confirmed = super_weights[super_weights["confirmed"]]
    lead = (f"<p>{len(confirmed)} of {len(super_weights)} candidates confirmed: zeroing the weight "
            f"alone multiplies PPL by >= {factor:g}.</p>")
    figure = _figure(plot_dir / "super_weights.png", "super weights",
                     lambda path: report_plots.plot_super_weights(super_weights, path, factor))
    return (f'<section id="super-weights"><h2>Super weights</h2>{lead}'
            f"<h3>Confirmed</h3>{_table(confirmed) if len(confirmed) else '<p>none confirmed</p>'}"
            f"{figure}<h3>All candidates tested</h3>{_table(super_weights)}</section>")


def _activation_section(trace: pd.DataFrame | None, plot_dir: Path) -> str:
    body = NOT_RUN if trace is None or trace.empty else _figure(
        plot_dir / "massive_activations.png", "massive activations",
        lambda path: plots.plot_massive_activations(trace, path, "mlp.down_proj massive activations")
    ) + _table(trace)
    return f'<section id="activations"><h2>Massive activations</h2>{body}</section>'


def build_report(baseline_path, experiments: list[Mapping], agreement_paths=None,
                 super_weights_path=None, activations_path=None, verdicts_path=None,
                 out_html="index.html", *, factor: float = 1.5, title: str = "ESA report") -> str:
    """Write the self-contained report to ``out_html`` (figures also to ``plots/`` beside it)
    and return its HTML.

    ``experiments``: entries as :func:`esa.verdicts.load_experiment` reads them (name, metric,
    mode, k, stats/masks per seed, results, stability, stability_pairs). ``agreement_paths``:
    one agreement parquet or a list (one per mode and k). Every other input is a path; any of
    them None makes its section say "not run": confirmed super weights (``esa.confirm.COLUMNS``,
    tested with ``factor``), activation trace parquet (``esa.scores.TRACE_COLUMNS``), verdict JSON.
    """
    out_html = Path(out_html)
    plot_dir = out_html.parent / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    sections = [
        _verdict_section(read_optional(verdicts_path, read_json)),
        _baseline_section(read_json(baseline_path)),
        *(_experiment_section(load_experiment(entry), plot_dir) for entry in experiments),
        _agreement_section(read_agreement(agreement_paths), plot_dir),
        _super_weight_section(read_optional(super_weights_path, pd.read_parquet), plot_dir, factor),
        _activation_section(read_optional(activations_path, pd.read_parquet), plot_dir),
    ]
    if not experiments:
        sections.insert(2, f"<section><h2>Experiments</h2>{NOT_RUN}</section>")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>{''.join(sections)}</body></html>\n")
    write_atomic(out_html, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return page

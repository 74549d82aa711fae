"""The study's report: one self-contained ``index.html`` (inline CSS, every figure embedded as
a base64 PNG data URI, no external resource), so it can be mailed or opened offline.

Top to bottom: the summary (``id="summary"``: model and data, baseline PPL with its standard
error, the confirmed super weights with their PPL factor and the metrics that ranked them,
the verdict counts); the verdicts grouped by experiment, worst group first, a group with a
bad or warn verdict open and an all-good group collapsed; then the figures: one section per
experiment (score distribution, hotspots, dPPL of top vs controls with one dot per seed,
Jaccard across seeds), metric agreement, the super weights, the super experts (a
mixture-of-experts model's experts zeroed whole) and the massive-activation trace.
A part whose inputs were not produced says "not run" rather than disappearing. The PNGs are
also written to a plots folder (``report/plots/`` in the workflow).
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
from .io import read_parquet, write_atomic
from .results import ExperimentData, load_experiment, read_agreement, read_json, read_optional
from .verdicts import count_statuses

SEVERITY = {"bad": 0, "warn": 1, "good": 2}
CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-top: 0.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
table.verdicts { width: 100%; table-layout: fixed; } td.nums { overflow-wrap: anywhere; font-size: 0.9em; }
td.status, td.label { white-space: nowrap; }
th { background: #f2f2f2; }
tr.good td { background: #dff3e3; } tr.warn td { background: #fff3cd; }
tr.bad td { background: #f8d7da; }
td.status, span.status { font-weight: bold; text-transform: uppercase; }
.badge { display: inline-block; padding: 0.1em 0.6em; border-radius: 0.8em; margin-right: 0.4em; }
.badge.good { background: #8fd19e; } .badge.warn { background: #ffe083; }
.badge.bad { background: #f1959f; }
.not-run { color: #888; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
details pre { font-size: 0.8em; white-space: pre-wrap; margin: 0.2em 0; }
table.verdicts th:nth-child(1) { width: 4.5em; } table.verdicts th:nth-child(2) { width: 11em; }
table.verdicts th:nth-child(4) { width: 26%; } table.verdicts th:nth-child(5) { width: 14%; }
table.super-weights td:first-child { white-space: nowrap; }
#summary table.facts th { width: 9em; vertical-align: top; }
#summary table.facts td { font-size: 1.05em; }
#summary .headline { font-size: 1.15em; margin: 0.2em 0; }
.note { color: #666; font-size: 0.9em; }
details.verdict-group { margin: 0.4em 0; }
details.verdict-group > summary { cursor: pointer; padding: 0.3em 0.5em; border-radius: 0.3em; }
details.verdict-group.good > summary { background: #dff3e3; }
details.verdict-group.warn > summary { background: #fff3cd; }
details.verdict-group.bad > summary { background: #f8d7da; }
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


def _badges(counts: Mapping[str, int]) -> str:
    return "".join(f'<span class="badge {s}">{n} {s}</span>' for s, n in counts.items())


def _worst(verdicts: list[dict]) -> str:
    return min((v["status"] for v in verdicts), key=SEVERITY.__getitem__)


def _verdict_group(experiment: str, verdicts: list[dict]) -> str:
    """One experiment's verdicts, worst first, folded away when all are good."""
    worst = _worst(verdicts)
    counts = {s: n for s, n in count_statuses(verdicts).items() if n}
    rows = "".join(
        f'<tr class="{_e(v["status"])}"><td class="status">{_e(v["status"])}</td>'
        f'<td class="label">{_e(v["check"])}</td><td>{_e(v["message"])}</td>'
        f'<td class="nums">{_numbers(v["numbers"])}</td><td class="nums">{_numbers(v["thresholds"])}</td></tr>'
        for v in sorted(verdicts, key=lambda v: SEVERITY[v["status"]]))
    table = ('<table class="verdicts"><thead><tr><th>status</th><th>check</th><th>message</th>'
             f'<th>numbers</th><th>thresholds</th></tr></thead><tbody>{rows}</tbody></table>')
    return (f'<details class="verdict-group {worst}"{"" if worst == "good" else " open"}>'
            f'<summary><span class="status">{worst}</span> <b>{_e(experiment)}</b> {_badges(counts)}</summary>'
            f"{table}</details>")


def _verdict_section(verdicts: list[dict] | None) -> str:
    """The verdicts grouped by experiment, the group with the worst verdict first."""
    if verdicts is None:
        return f'<section id="verdict-section"><h2>Verdicts</h2>{NOT_RUN}</section>'
    groups: dict[str, list[dict]] = {}
    for verdict in verdicts:
        groups.setdefault(verdict["experiment"], []).append(verdict)
    ordered = sorted(groups.items(), key=lambda item: SEVERITY[_worst(item[1])])
    body = "".join(_verdict_group(name, group) for name, group in ordered)
    return f'<section id="verdict-section"><h2>Verdicts by experiment</h2>{body}</section>'


def _by_weight(super_weights: pd.DataFrame) -> pd.DataFrame:
    """One row per tested weight (confirm writes one per (metric, rank)), with ``ranked_by``:
    the metrics whose top-N held it and at which rank (#1 = the metric's highest score)."""
    ranks = super_weights["metric"] + " #" + (super_weights["rank"] + 1).astype(str)
    key = ["tensor", "flat_index"]
    ranked_by = ranks.groupby([super_weights[k] for k in key], sort=False).agg(", ".join).rename("ranked_by")
    return super_weights.drop_duplicates(key).drop(columns=["metric", "rank"]).join(ranked_by, on=key)


def _weight_name(row) -> str:
    return f"{row.tensor}[{row.row}, {row.col}]"


def _factor(ratio: float) -> str:
    return "&times;inf (loss not finite)" if np.isinf(ratio) else f"&times;{ratio:.3g}"


def _headline_weights(weights: pd.DataFrame | None, factor: float) -> str:
    """The confirmed super weights, largest PPL factor first; or plainly that none was found."""
    if weights is None or weights.empty:
        return '<span class="not-run">not run</span>'
    rule = f"A super weight: zeroing it alone multiplies PPL by at least &times;{factor:g}."
    confirmed = weights[weights["confirmed"]].sort_values("ppl_ratio", ascending=False)
    if confirmed.empty:
        top = weights.loc[weights["ppl_ratio"].idxmax()]
        return (f'<p class="headline"><b>No super weight confirmed.</b> Of {len(weights)} weights tested, '
                f"the largest PPL factor is {_factor(top.ppl_ratio)} ({_e(_weight_name(top))}, "
                f'ranked by {_e(top.ranked_by)}).</p><p class="note">{rule}</p>')
    rows = "".join(
        f"<tr><td>{_e(_weight_name(r))}</td><td>{_e(_fmt(r.weight))}</td><td><b>{_factor(r.ppl_ratio)}</b></td>"
        f"<td>{_e(_fmt(r.ppl_before))} &rarr; {_e(_fmt(r.ppl_after))}</td><td>{_e(r.ranked_by)}</td></tr>"
        for r in confirmed.itertuples(index=False))
    return (f'<p class="headline"><b>{len(confirmed)} confirmed super weight{"s" * (len(confirmed) > 1)}</b> '
            f'of {len(weights)} tested</p><p class="note">{rule} Ranked by: the metrics whose top-N held '
            "the weight, at which rank (#1 = the metric's highest score).</p>"
            '<table class="super-weights"><thead><tr><th>weight</th><th>value</th><th>PPL factor</th>'
            f"<th>PPL: baseline &rarr; zeroed</th><th>ranked by</th></tr></thead><tbody>{rows}</tbody></table>")


def _baseline_facts(baseline: Mapping) -> str:
    """Baseline PPL with the 95% interval exp(loss +- 1.96 SE) and the loss with its standard error."""
    ppl, loss, stderr = baseline["ppl"], baseline["loss"], baseline.get("loss_stderr")
    if not baseline["finite"] or stderr is None:
        return f"<b>PPL {_e(_fmt(ppl))}</b> (loss {_e(_fmt(loss))}{'' if baseline['finite'] else ', NOT FINITE'})"
    low, high = (float(np.exp(loss + z * stderr)) for z in (-1.96, 1.96))
    return (f"<b>PPL {_e(_fmt(ppl))}</b>, 95% interval {_e(_fmt(low))} &ndash; {_e(_fmt(high))} "
            f'<span class="note">(exp(loss &plusmn; 1.96 SE))</span>; loss {_e(_fmt(loss))} &plusmn; '
            f'{_e(_fmt(stderr))} <span class="note">(mean token NLL &plusmn; standard error of the mean '
            f"per-window loss, {baseline['windows']} windows)</span>")


def _summary_section(model: str, run: Mapping, baseline: Mapping, weights: pd.DataFrame | None,
                     verdicts: list[dict] | None, factor: float) -> str:
    """What a reader takes in at a glance: model, data, baseline, super weights, verdict counts.

    ``run`` is the baseline step's spec (its ``config.json``): model source, dtype, data settings.
    """
    data = run["data"]
    source = ", ".join(f"{label} {data[key]}" for key, label in (("hf_config", "config"), ("eval_split", "split"))
                       if data.get(key))
    facts = {
        "model": f"<b>{_e(model)}</b> ({_e(run['model'])}, {_e(run['dtype'])})",
        "data": (f"<b>{_e(data['source'])}</b>{f' ({_e(source)})' if source else ''}: {baseline['windows']} "
                 f"evaluation windows &times; {data['seq_len']} tokens, {baseline['tokens']} tokens predicted"),
        "baseline": _baseline_facts(baseline),
        "super weights": _headline_weights(weights, factor),
        "verdicts": (_badges(count_statuses(verdicts)) if verdicts is not None
                     else '<span class="not-run">not run</span>'),
    }
    rows = "".join(f"<tr><th>{_e(name)}</th><td>{value}</td></tr>" for name, value in facts.items())
    return f'<section id="summary"><h2>Summary</h2><table class="facts">{rows}</table></section>'


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


def _super_weight_section(weights: pd.DataFrame | None, plot_dir: Path, factor: float) -> str:
    """Every weight confirm tested (one row per weight, see :func:`_by_weight`) and its PPL factor."""
    if weights is None or weights.empty:
        return f'<section id="super-weights"><h2>Super weights</h2>{NOT_RUN}</section>'
    confirmed = weights[weights["confirmed"]]
    lead = (f"<p>{len(confirmed)} of {len(weights)} weights tested confirmed: zeroing the weight "
            f"alone multiplies PPL by >= {factor:g}.</p>")
    figure = _figure(plot_dir / "super_weights.png", "super weights",
                     lambda path: report_plots.plot_super_weights(weights, path, factor))
    return (f'<section id="super-weights"><h2>Super weights</h2>{lead}'
            f"<h3>Confirmed</h3>{_table(confirmed) if len(confirmed) else '<p>none confirmed</p>'}"
            f"{figure}<h3>All weights tested</h3>{_table(weights)}</section>")


def _super_expert_section(experts: pd.DataFrame | None, factor: float) -> str:
    """Every expert confirm zeroed whole (one row per (metric, rank)), largest PPL factor first;
    a dense model's empty table says it has no experts."""
    if experts is None:
        body = NOT_RUN
    elif experts.empty:
        body = "<p>The model has no experts (a dense model): no expert was zeroed.</p>"
    else:
        tested = experts.drop_duplicates(["layer", "stack", "expert"])
        body = (f"<p>{int(tested['confirmed'].sum())} of {len(tested)} experts tested confirmed: zeroing the "
                f"whole expert (each metric's top-N by score mass) multiplies PPL by >= {factor:g}.</p>"
                + _table(experts.sort_values("ppl_ratio", ascending=False, kind="stable")))
    return f'<section id="super-experts"><h2>Super experts</h2>{body}</section>'


def _activation_section(trace: pd.DataFrame | None, plot_dir: Path) -> str:
    body = NOT_RUN if trace is None or trace.empty else _figure(
        plot_dir / "massive_activations.png", "massive activations",
        lambda path: plots.plot_massive_activations(trace, path, "mlp.down_proj massive activations")
    ) + _table(trace)
    return f'<section id="activations"><h2>Massive activations</h2>{body}</section>'


def build_report(baseline_path, experiments: list[Mapping], agreement_paths=None,
                 super_weights_path=None, activations_path=None, verdicts_path=None,
                 out_html="index.html", *, baseline_config, plot_dir, model: str,
                 factor: float = 1.5, title: str = "ESA report", super_experts_path=None) -> str:
    """Write the self-contained report to ``out_html`` (its figures to ``plot_dir``) and
    return its HTML.

    ``baseline_path``: the baseline's ``metrics.json``; ``baseline_config``: the baseline
    step's ``config.json`` (the summary's model source, dtype and data settings); ``model``:
    the model's name. ``experiments``: entries as
    :func:`esa.results.load_experiment` reads them (name, metric, mode, k, stats/masks per
    seed, results, stability, stability_pairs). ``agreement_paths``: one agreement parquet or a
    list (one per mode and k). Every other input is a path; any of them None makes its section
    say "not run": super weights as confirm writes them (``esa.confirm.SUPER_WEIGHT_COLUMNS``,
    tested with ``factor``), super experts likewise (``esa.confirm.SUPER_EXPERT_COLUMNS``),
    activation trace parquet (``esa.scores.TRACE_COLUMNS``), verdict JSON.
    """
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    super_weights = read_optional(super_weights_path, read_parquet)
    weights = None if super_weights is None else _by_weight(super_weights)
    verdicts = read_optional(verdicts_path, read_json)
    sections = [
        _summary_section(model, read_json(baseline_config),
                         read_json(baseline_path), weights, verdicts, factor),
        _verdict_section(verdicts),
        *(_experiment_section(load_experiment(entry), plot_dir) for entry in experiments),
        _agreement_section(read_agreement(agreement_paths), plot_dir),
        _super_weight_section(weights, plot_dir, factor),
        _super_expert_section(read_optional(super_experts_path, read_parquet), factor),
        _activation_section(read_optional(activations_path, read_parquet), plot_dir),
    ]
    if not experiments:
        sections.insert(2, f"<section><h2>Experiments</h2>{NOT_RUN}</section>")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>{''.join(sections)}</body></html>\n")
    write_atomic(out_html, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return page

"""The study's report: one self-contained ``index.html`` (inline CSS, every figure embedded as
a base64 PNG data URI, no external resource), so it can be mailed or opened offline.

Top to bottom: the summary (``id="summary"``: model and data, baseline PPL with its standard
error, the confirmed super weights with their PPL factor and the metrics that ranked them,
the verdict counts); the verdicts grouped by experiment, worst group first, a group with a
bad or warn verdict open and an all-good group collapsed; then the figures: one section per
experiment (score distribution, hotspots, dPPL of top vs controls with one dot per seed,
Jaccard across seeds), metric agreement, the super weights, the super experts (a
mixture-of-experts model's experts zeroed whole) and the massive-activation trace; then the
analyses beyond the runbook: how each super weight acts (scale sweep, massive activation
restored, matched control), the super weights published for the model (their rank under each
metric, tested and confirmed or not), the culprits found in destructive top sets by group
testing, and what keeping weights in full precision buys under RTN quantization (PPL against
k per scheme).
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
from .names import PROTECT_METRIC, PROTECT_NONE, RANDOM_K, RANK_EXACT, RANK_NOT_SCORED, SUPER_WEIGHTS
from .results import ExperimentData, load_experiment, read_agreement, read_json, read_optional
from .verdicts import count_statuses

SEVERITY = {"bad": 0, "warn": 1, "good": 2}
CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-top: 0.6em; }
nav#contents { font-size: 0.9em; } nav#contents h2 { display: none; }
nav#contents ol { display: flex; flex-wrap: wrap; gap: 0.15em 1.4em; padding: 0; margin: 0.4em 0; }
nav#contents li { list-style-position: inside; }
.continuations td { white-space: pre-wrap; vertical-align: top; font-family: ui-monospace, monospace; }
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
table.super-weights { font-size: 0.85em; } table.super-weights td:nth-child(4) { white-space: nowrap; }
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


def contents(sections: list[str]) -> str:
    """A contents list linking each section that has an id, by its heading."""
    found = [re.match(r'<section[^>]*\bid="([^"]+)"[^>]*><h2>(.*?)</h2>', section, re.S) for section in sections]
    items = "".join(f'<li><a href="#{m.group(1)}">{m.group(2)}</a></li>' for m in found if m)
    return f'<nav id="contents"><h2>Contents</h2><ol>{items}</ol></nav>' if items else ""


def write_page(out_html, title: str, sections: list[str]) -> str:
    """Write one self-contained page (``CSS`` inline, ``title`` as its heading, a contents list,
    then ``sections``) to ``out_html`` and return its HTML: the study's report and the
    comparison page."""
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>{contents(sections)}{''.join(sections)}"
            "</body></html>\n")
    write_atomic(out_html, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return page


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


def _innocent(n, largest) -> str:
    """The calibrated null next to a factor (:mod:`esa.null`): the largest PPL factor of the innocent
    weights (groups) of the same magnitude, and how many were drawn."""
    if not n:
        return "none drawn"
    return f"&times;{largest:.6g} (max of {int(n)})"  # innocent factors sit at 1.0000x: show their digits


def _absence(super_weights: pd.DataFrame, weights: pd.DataFrame, groups: pd.DataFrame | None, factor: float) -> str:
    """No single and no joint super weight, stated as a finding against the null."""
    top_n = int(super_weights["rank"].max()) + 1
    metrics = ", ".join(dict.fromkeys(super_weights["metric"]))
    nulls = [weights.drop_duplicates("tensor")[["null_n", "null_max"]]]
    if groups is not None:
        nulls.append(groups[["null_n", "null_max"]])
    null = pd.concat(nulls)
    drawn = int(null["null_n"].sum())
    best = weights.loc[weights["ppl_ratio"].idxmax()]
    joint = "" if groups is None else f" and {len(groups)} structural group{'s' * (len(groups) != 1)} of them"
    reach = (f"innocent weights of the same magnitude reach at most {_factor(null['null_max'].max())} "
             f"({drawn} drawn)" if drawn else "no innocent weights were drawn (confirm.innocent.samples: 0)")
    return (f'<p class="headline"><b>No single or joint super weight</b> with factor &ge; &times;{factor:g} '
            f"among the top-{top_n} of {_e(metrics)}{joint}; {reach}.</p>"
            f'<p class="note">The largest single factor: {_factor(best.ppl_ratio)} ({_e(_weight_name(best))}, '
            f"ranked by {_e(best.ranked_by)}).</p>")


def _headline_weights(super_weights: pd.DataFrame | None, factor: float, groups: pd.DataFrame | None = None,
                      members: pd.DataFrame | None = None) -> str:
    """The confirmed single super weights and the destructive groups side by side, in one table
    by PPL factor, each next to its innocent weights' largest factor; or the absence as a finding."""
    if super_weights is None or super_weights.empty:
        return '<span class="not-run">not run</span>'
    weights = _by_weight(super_weights)
    confirmed = weights[weights["confirmed"]]
    destructive = groups[groups["destructive"]] if groups is not None and members is not None else None
    if confirmed.empty and (destructive is None or destructive.empty):
        return _absence(super_weights, weights, groups, factor)
    rows = [{"name": _e(_weight_label(r.tensor, r.row, r.col)), "kind": "single", "value": _e(_fmt(r.weight)),
             "ratio": r.ppl_ratio, "after": r.ppl_after, "lo": r.delta_ppl_lo, "hi": r.delta_ppl_hi, "kl": r.kl,
             "top1": r.top1, "null": _innocent(r.null_n, r.null_max), "found": _e(r.ranked_by)}
            for r in confirmed.itertuples(index=False)]
    if destructive is not None:
        named = members.assign(name=[_weight_label(t, r, c) for t, r, c in
                                     zip(members["tensor"], members["row"], members["col"])])
        minimal = named[named["minimal"]].groupby("group")["name"].agg(", ".join)
        singles = set(confirmed[["tensor", "flat_index"]].itertuples(index=False, name=None))
        holding = set(members.loc[[key in singles for key in members[["tensor", "flat_index"]].itertuples(
            index=False, name=None)], "group"])
        for g in destructive.itertuples(index=False):
            found = (f"minimal subset {_e(minimal[g.group])} ({_factor(g.minimal_ppl_ratio)}), synergy "
                     f"{_e(_fmt(g.synergy))}" if g.group in minimal.index else "not taken apart")
            rows.append({"name": f"{_e(_group_place(g.tensor, g.kind, g.index))}: {g.n_members} weights",
                         "kind": f"group: {_e(g.label)}", "value": "&mdash;", "ratio": g.ppl_ratio,
                         "after": g.ppl, "lo": g.delta_ppl_lo, "hi": g.delta_ppl_hi,
                         "kl": g.kl, "top1": g.top1, "found": found,
                         "null": ("via its confirmed member" if not g.null_n and g.group in holding
                                  else _innocent(g.null_n, g.null_max))})
    rows.sort(key=lambda row: -row["ratio"])
    body = "".join(
        f"<tr><td>{r['name']}</td><td>{r['kind']}</td><td>{r['value']}</td><td><b>{_factor(r['ratio'])}</b></td>"
        f"<td>{r['null']}</td><td>{_e(_fmt(r['after']))}</td>"
        f"<td>{_e(_fmt(r['lo']))} &ndash; {_e(_fmt(r['hi']))}</td><td>{_e(_fmt(r['kl']))}</td>"
        f"<td>{_e(_fmt(r['top1']))}</td><td>{r['found']}</td></tr>" for r in rows)
    n_groups = 0 if destructive is None else len(destructive)
    tested_groups = "" if groups is None else f" and {n_groups} of {len(groups)} structural groups"
    rule = (f"A super weight: zeroing it alone multiplies PPL by at least &times;{factor:g} and by more than any "
            "innocent weight of its tensor with the same |w| (its calibrated null); a group: its members zeroed "
            "together, the same against innocent groups of its size. Found by: the metrics whose top-N held the "
            "weight, at which rank (#1 = the metric's highest score); a group's minimal destructive subset.")
    return (f'<p class="headline"><b>{len(confirmed)} single super weight{"s" * (len(confirmed) != 1)}</b> '
            f"of {len(weights)} weights tested{tested_groups} destructive</p>"
            f'<p class="note">{rule}</p><table class="super-weights"><thead><tr><th>super weight</th><th>kind</th>'
            "<th>value</th><th>PPL factor</th><th>innocent weights reach</th><th>PPL zeroed</th>"
            "<th>dPPL 95% interval</th><th>KL (nats/token)</th><th>top-1 kept</th><th>found by</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")


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


def headline_points(experiments: list[ExperimentData], weights: pd.DataFrame | None, groups: pd.DataFrame | None,
                    baseline_ppl: float) -> pd.DataFrame:
    """The headline figure's points (label, kind, ratio, lo, hi): every perturbed set's PPL ratio
    per seed with its interval, 1 + dPPL_lo / PPL and 1 + dPPL_hi / PPL, then every confirmed
    single super weight and every joint super weight (a destructive joint or additive group)."""
    rows = []
    for exp in experiments:
        for r in (exp.results.itertuples(index=False) if exp.results is not None else ()):
            rows.append((exp.name, r.set, r.ppl_ratio, r.delta_ppl_lo, r.delta_ppl_hi))
    for r in (weights[weights["confirmed"]].itertuples(index=False) if weights is not None else ()):
        rows.append((_weight_label(r.tensor, r.row, r.col), "single super weight", r.ppl_ratio, r.delta_ppl_lo,
                     r.delta_ppl_hi))
    joint = (groups[groups["destructive"] & groups["label"].isin(["joint", "additive"])]
             if groups is not None else pd.DataFrame(columns=["tensor", "kind", "index"]))
    for r in joint.itertuples(index=False):
        rows.append((_group_place(r.tensor, r.kind, r.index), "joint super weight", r.ppl_ratio, r.delta_ppl_lo,
                     r.delta_ppl_hi))
    frame = pd.DataFrame(rows, columns=["label", "kind", "ratio", "lo", "hi"])
    frame["lo"] = 1 + frame["lo"] / baseline_ppl
    frame["hi"] = 1 + frame["hi"] / baseline_ppl
    return frame


def _headline_figure(points: pd.DataFrame, plot_dir: Path) -> str:
    if points.empty:
        return ""
    return ('<div class="headline-figure">' + _figure(plot_dir / "headline.png", "every perturbed set and every "
            "confirmed super weight on one log axis", lambda path: report_plots.plot_headline(points, path))
            + "</div>")


def _summary_section(model: str, run: Mapping, baseline: Mapping, super_weights: pd.DataFrame | None,
                     verdicts: list[dict] | None, factor: float, groups: pd.DataFrame | None = None,
                     members: pd.DataFrame | None = None, figure: str = "") -> str:
    """What a reader takes in at a glance: model, data, baseline, the single and joint super
    weights (confirm's ``super_weights``, ``groups`` and ``members``), verdict counts, and the
    headline ``figure``.

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
        "super weights": _headline_weights(super_weights, factor, groups, members),
        "verdicts": (_badges(count_statuses(verdicts)) if verdicts is not None
                     else '<span class="not-run">not run</span>'),
    }
    rows = "".join(f"<tr><th>{_e(name)}</th><td>{value}</td></tr>" for name, value in facts.items())
    return f'<section id="summary"><h2>Summary</h2><table class="facts">{rows}</table>{figure}</section>'


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
        columns = ["set", "seed", "n_weights", "perturb", "scale", "ppl", "delta_ppl", "delta_ppl_lo", "delta_ppl_hi",
                   "ppl_ratio", "kl", "top1", "finite"]
        parts.append('<p class="note">delta_ppl_lo / delta_ppl_hi: the paired bootstrap interval of dPPL over '
                     "the evaluation windows; kl: mean KL divergence (nats per token) from the unperturbed "
                     "model's next-token distribution; top1: share of positions whose top-1 token is "
                     "unchanged.</p>")
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


def _weight_label(tensor: str, row: int, col: int) -> str:
    """``layers.11.mlp.down_proj[507, 1229]``: a weight by its matrix and Linear (row, col)."""
    return f"{tensor.removeprefix('model.').removesuffix('.weight')}[{row}, {col}]"


def _group_place(tensor: str, kind: str, index: int) -> str:
    """Where a group sits: its matrix's column or row, or the residual channel across layers."""
    if not tensor:
        return f"residual channel {index}"
    return f"{tensor.removeprefix('model.').removesuffix('.weight')} {'col' if kind == 'neuron' else 'row'} {index}"


def _joint_section(groups: pd.DataFrame | None, members: pd.DataFrame | None, factor: float) -> str:
    """The structural groups confirm zeroed jointly (:mod:`esa.joint`), largest PPL factor first,
    each with its label, synergy and minimal destructive subset."""
    head = '<section id="joint-super-weights"><h2>Super weights acting together</h2>'
    if groups is None or members is None:
        return f"{head}{NOT_RUN}</section>"
    if groups.empty:
        return f"{head}<p>No structural group among the candidates (confirm.joint).</p></section>"
    labels = ", ".join(f"{n} {label}" for label, n in groups["label"].value_counts().items())
    lead = (f"<p>{len(groups)} groups of two or more candidates sharing a down_proj input column (neuron), "
            f"an output row (channel) or a massive residual channel, each zeroed jointly: "
            f"{int(groups['destructive'].sum())} multiply PPL by >= {factor:g} and by more than their innocent groups "
            f"({labels}). Innocent groups: as many weights of the same tensors and |w|, none a candidate, zeroed "
            f"together (confirm.innocent), for each group reaching the factor that holds no confirmed single "
            f"super weight. <b>single</b>: a member "
            f"alone reaches the factor; <b>joint</b>: none is, and together they do more than the sum of their parts; "
            f"<b>additive</b>: none is, each contributes a share. synergy = the group's log-PPL increase over the "
            f"sum of its members' alone; minimal = the destructive subset left when no member can be dropped.</p>")
    named = members.assign(name=[_weight_label(t, r, c) for t, r, c in zip(members["tensor"], members["row"],
                                                                              members["col"])])
    minimal = named[named["minimal"]].groupby("group")["name"].agg(", ".join)
    shown = groups.sort_values("ppl_ratio", ascending=False, kind="stable")
    table = pd.DataFrame({
        "kind": shown["kind"], "where": [_group_place(t, k, i) for t, k, i in
                                         zip(shown["tensor"], shown["kind"], shown["index"])],
        "members": shown["n_members"], "ppl_ratio": shown["ppl_ratio"], "innocent_max": shown["null_max"],
        "innocent_n": shown["null_n"], "delta_ppl_lo": shown["delta_ppl_lo"],
        "delta_ppl_hi": shown["delta_ppl_hi"], "label": shown["label"], "synergy": shown["synergy"],
        "minimal": [minimal.get(g, "") for g in shown["group"]], "minimal_ppl_ratio": shown["minimal_ppl_ratio"],
        "evaluations": shown["evaluations"]})
    return f"{head}{lead}{_table(table)}</section>"


def _null_section(null: pd.DataFrame | None) -> str:
    """The calibrated null's draws (:mod:`esa.null`): per tested tensor and per group, the innocent
    weights' PPL factors and |w| next to the candidates they stand for."""
    head = '<section id="innocent-weights"><h2>Innocent weights (the calibrated null)</h2>'
    if null is None:
        return f"{head}{NOT_RUN}</section>"
    if null.empty:
        return f"{head}<p>None drawn (confirm.innocent.samples: 0).</p></section>"
    where = [t if kind == "single" else f"group {g}" for t, kind, g in zip(null["tensor"], null["kind"], null["group"])]
    summary = null.assign(where=where, abs_w=[float(np.min(np.abs(w))) for w in null["weights"]]).groupby(
        "where", sort=False).agg(n=("ppl_ratio", "size"), max_ppl_ratio=("ppl_ratio", "max"),
                                  min_abs_w=("abs_w", "min")).reset_index()
    lead = ("<p>Weights that are none of confirm's candidates, drawn (seeded) from the same tensor within "
            "confirm.innocent.band of a candidate's |w|-quantile, zeroed like the candidates: alone per tested "
            "tensor, as a group of the same size per group that reached the factor without a confirmed member. "
            "A confirmation must beat the largest of them.</p>")
    draws = null[["kind", "tensor", "group", "sample", "flat_indices", "weights", "quantiles", "matched_flat_indices",
                  "ppl_ratio", "delta_ppl_lo", "delta_ppl_hi", "kl"]]
    return f"{head}{lead}{_table(summary)}<h3>Every draw</h3>{_table(draws)}</section>"


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


def _published_rank(match) -> str:
    """One metric's rank of a published weight (``esa.published``): #1 = its highest score."""
    if match.status == RANK_NOT_SCORED:
        return "not scored"
    if match.status == RANK_EXACT:
        return f"#{match.rank + 1}"
    where = "not exactly ranked" if match.candidate else f"not among the top-{match.kept} candidates"
    return f"{where} (rank &ge; #{match.rank + 1})"


def _published_section(matches: pd.DataFrame | None) -> str:
    """Each super weight published for the model: its rank under every metric on the confirm
    seed, whether confirm tested (zeroed alone) and confirmed it, and the citation."""
    if matches is None:
        body = '<p class="not-run">no published coordinates for this model</p>'
    else:
        metrics = list(dict.fromkeys(matches["metric"]))
        rows = []
        for _, group in matches.groupby(["tensor", "row", "col"], sort=False):
            first = group.iloc[0]
            verdict = ("n/a" if not first.tested else
                       f"{'<b>yes</b>' if first.confirmed else 'no'}, PPL {_factor(first.ppl_ratio)}")
            ranks = dict(zip(group["metric"], (_published_rank(m) for m in group.itertuples(index=False))))
            rows.append(f"<tr><td>{_e(_weight_name(first))}</td>"
                        + "".join(f"<td>{ranks[m]}</td>" for m in metrics)
                        + f"<td>{'yes' if first.tested else 'no'}</td><td>{verdict}</td>"
                        f"<td>{_e(first.source)}</td></tr>")
        published_as = ", ".join(dict.fromkeys(matches["model"]))
        body = (f"<p>{len(rows)} super weight{'s' * (len(rows) != 1)} published for <b>{_e(published_as)}</b>: "
                "the rank of each under every metric on the confirm seed (#1 = the metric's highest score), "
                "and whether confirm tested it (zeroed it alone: it was in a metric's top-N) and confirmed it.</p>"
                "<table><thead><tr><th>weight</th>" + "".join(f"<th>{_e(m)} rank</th>" for m in metrics)
                + f"<th>tested by ESA</th><th>confirmed</th><th>source</th></tr></thead><tbody>{''.join(rows)}"
                "</tbody></table>")
    return f'<section id="published"><h2>Published super weights</h2>{body}</section>'


def _members_with_means(joint_mean: pd.DataFrame) -> list[str]:
    """Each joint super weight's members by name, with the mean input m_j each gives back."""
    names = []
    for g in joint_mean.itertuples(index=False):
        means = [f" (m {_fmt(m)})" for m in g.mean_inputs] or [""] * len(g.rows)
        names.append(", ".join(_weight_label(t, r, c) + m for t, r, c, m in zip(g.tensors, g.rows, g.cols, means)))
    return names


def _mechanism_section(paths: Mapping | None, baseline_ppl: float, plot_dir: Path) -> str:
    """How each confirmed super weight acts (``esa.mechanism``): PPL against its scale, its
    massive activation restored, its mean contribution given back, its tensor's
    matched-magnitude control; and each joint super weight's mean contribution given back."""
    if paths is None:
        return f'<section id="mechanism"><h2>How each super weight acts</h2>{NOT_RUN}</section>'
    sweep, restore, control, joint_mean = (read_parquet(paths[name])
                                           for name in ("sweep", "restore", "control", "joint_mean"))
    body = "<p>no confirmed super weight, single or joint</p>" if restore.empty and joint_mean.empty else ""
    if not restore.empty:
        body += (
            '<p class="note">Scale: each confirmed super weight alone set to s &middot; w (0 zeroes it, -1 flips '
            "its sign). Restored: the weight zeroed while its MLP output projection's output channel (its row) "
            "gets back the unmodified model's values at the massive positions, where |value| is at least "
            "mechanism.massive_fraction of its peak; recovered = (loss zeroed - loss restored) / (loss zeroed - "
            "loss baseline). Mean contribution: the weight zeroed while that channel gets + w &middot; m at every "
            "position, m its input's mean over the calibration windows; mean_recovered near 1: the weight acts as "
            "a constant bias, lower: its token-dependent part matters. "
            "Matched control: the same number of the tensor's largest other |w| zeroed.</p>"
            + _figure(plot_dir / "mechanism_scale.png", "PPL against the super weights' scale",
                      lambda path: report_plots.plot_scale_sweep(sweep, baseline_ppl, path))
            + _figure(plot_dir / "mechanism_restore.png", "super weights zeroed, restored, matched control",
                      lambda path: report_plots.plot_mechanism_bars(restore, control, baseline_ppl, path))
            + "<h3>Scale sweep</h3>" + _table(sweep[["tensor", "row", "col", "weight", "scale", "ppl", "ppl_ratio",
                                                     "delta_ppl_lo", "delta_ppl_hi", "kl", "top1"]])
            + "<h3>Massive activation restored</h3>" + _table(restore[[
                "tensor", "row", "col", "projection", "positions", "peak", "ppl_zeroed", "kl_zeroed", "ppl_restored",
                "kl_restored", "recovered", "reason"]])
            + "<h3>Mean contribution given back</h3>" + _table(restore[[
                "tensor", "row", "col", "weight", "mean_input", "ppl_zeroed", "ppl_mean", "kl_mean", "mean_recovered"]])
            + "<h3>Matched-magnitude control</h3>" + _table(control[[
                "tensor", "set", "n_weights", "flat_indices", "abs_min", "abs_max", "ppl", "ppl_ratio", "kl", "top1"]]))
    if not joint_mean.empty:
        body += (
            "<h3>Joint super weights: mean contribution given back</h3>"
            '<p class="note">Each joint super weight (the minimal subset of a destructive structural group '
            "labelled joint or additive) zeroed while every member W[r, j] gives back W[r, j] &middot; m_j on its "
            "output channel r at every position; mean_recovered as above.</p>"
            + _table(joint_mean.assign(weights=_members_with_means(joint_mean))[[
                "group", "kind", "label", "weights", "ppl_zeroed", "ppl_mean", "kl_mean", "mean_recovered",
                "reason"]]))
    return f'<section id="mechanism"><h2>How each super weight acts</h2>{body}</section>'


def _behaviour_section(paths: Mapping | None, plot_dir: Path) -> str:
    """Behaviour beside perplexity (``esa.behaviour``): the conditions, lm-eval accuracy, the
    attention-sink mass per layer and the greedy continuations side by side, per condition."""
    head = '<section id="behaviour"><h2>Behaviour beside perplexity</h2>'
    if paths is None:
        return f"{head}{NOT_RUN}</section>"
    found, generation, sinks, scores = (read_parquet(paths[name])
                                        for name in ("conditions", "generation", "sinks", "lm_eval"))
    order = list(found["condition"])
    numbers = generation.groupby("condition", sort=False).agg(
        repeated_4gram_share=("repeated_4gram_share", "mean"), distinct_2=("distinct_2", "mean")).reset_index()
    numbers = numbers.merge(sinks.groupby("condition", sort=False)["sink_mass"].agg(
        sink_mass_mean="mean", sink_mass_max="max").reset_index(), on="condition")
    texts = generation.pivot(index="prompt_index", columns="condition", values="text")[order]
    texts.insert(0, "prompt", generation.drop_duplicates("prompt_index").set_index("prompt_index")["prompt"])
    listed = found[["condition", "kind", "experiment", "perturb", "scale", "n_weights"]]
    if scores.empty:
        accuracy = f"<h3>lm-eval accuracy</h3>{NOT_RUN}"
    else:
        accuracy = ("<h3>lm-eval accuracy</h3>"
                    + _figure(plot_dir / "behaviour_lm_eval.png", "lm-eval accuracy per condition",
                              lambda path: report_plots.plot_lm_eval(scores, path))
                    + _table(scores.assign(column=scores["task"] + " " + scores["metric"],
                                           shown=[f"{_fmt(v)} ± {_fmt(e)}" for v, e in zip(scores["value"],
                                                                                          scores["stderr"])])
                             .pivot(index="condition", columns="column", values="shown").reindex(order)
                             .reset_index()))
    return (f'{head}<p class="note">Under each condition: the unmodified model, each confirmed super weight '
            "(single, or a joint one's minimal subset) zeroed, and each named experiment's top set and its "
            "random_k control perturbed as the experiment perturbs them. lm-eval-harness runs on the in-memory "
            "edited model (esa_cloze: the next word of the evaluation text among 4, chance 0.25; error bars "
            "&plusmn;1 stderr). Then the greedy continuation of each prompt, the share of its 4-grams that repeat "
            "one before (0: none) and its distinct bigrams over all bigrams; and per decoder layer the mean "
            "attention probability on the first position over the evaluation windows and heads (queries after "
            "the first), from the model's eager attention.</p>"
            + _table(listed) + accuracy + "<h3>Generation and attention sinks</h3>"
            + _figure(plot_dir / "behaviour_sinks.png", "attention-sink mass per layer",
                      lambda path: report_plots.plot_sink_mass(sinks, path))
            + _table(numbers) + '<h3>Greedy continuations</h3><div class="continuations">' + _table(texts)
            + "</div></section>")


def _quantize_headline(part: pd.DataFrame) -> str:
    """One scheme in a sentence: PPL with none kept, with the super weights kept, and the metric
    whose top-k helped most at its k, against random_k at that k."""
    def ppl(row) -> str:
        return _e(_fmt(row["ppl"]))

    none = part[part["protect"] == PROTECT_NONE].iloc[0]
    text = f"none kept: PPL {ppl(none)}"
    saved = part[part["protect"] == SUPER_WEIGHTS].iloc[0]
    text += (f"; the {saved['n_protected']} confirmed super weight(s) kept: PPL {ppl(saved)}" if saved["n_protected"]
             else "; no confirmed super weight to keep")
    ranked = part[part["protect"] == PROTECT_METRIC]
    if len(ranked):
        best = ranked.loc[ranked["ppl"].idxmin()]
        control = part[(part["protect"] == RANDOM_K) & (part["k"] == best["k"])].iloc[0]
        text += (f"; best: {_e(best['metric'])} top-{best['k']} kept: PPL {ppl(best)} "
                 f"(random_k {best['k']}: {ppl(control)})")
    return text


def _quantize_section(results: pd.DataFrame | None, baseline_ppl: float, plot_dir: Path) -> str:
    """What keeping weights in full precision buys under RTN quantization (``esa.quantize``):
    a sentence per scheme, PPL against k per scheme, and the results table."""
    if results is None:
        body = NOT_RUN
    else:
        schemes = results.groupby(["bits", "group_size"], sort=False)
        lines = "".join(f"<li><b>{_e(report_plots.scheme_label(bits, group))}</b>: {_quantize_headline(part)}</li>"
                        for (bits, group), part in schemes)
        body = ('<p class="note">Round-to-nearest, asymmetric min-max quantization of every target weight, '
                "per group of group_size weights along the input dimension (or per output channel); the weights "
                "kept in full precision keep their value and are left out of their group's min and max. Kept: "
                "nothing (none), a metric's global top-k, k random target weights (random_k), the confirmed "
                f"super weights. Unquantized baseline PPL {_e(_fmt(baseline_ppl))}.</p><ul>{lines}</ul>"
                + _figure(plot_dir / "quantize_protection.png", "PPL vs weights protected",
                          lambda path: report_plots.plot_quantize_protection(results, baseline_ppl, path))
                + _table(results[["bits", "group_size", "protect", "metric", "k", "n_protected", "ppl", "delta_ppl",
                                  "delta_ppl_lo", "delta_ppl_hi", "kl", "top1", "finite"]]))
    return f'<section id="quantize"><h2>Quantization: what protection buys</h2>{body}</section>'


def _culprit_section(paths: Mapping | None, plot_dir: Path) -> str:
    """Each culprit search (``esa.culprits``; ``paths``: experiment -> its culprits, search and
    summary files): what it found in one sentence, the culprits and a figure of the search."""
    if not paths:
        return f'<section id="culprits"><h2>Culprits in destructive sets</h2>{NOT_RUN}</section>'
    parts = ['<p class="note">Adaptive group testing of a destructive top set: a group of its weights is '
             "perturbed alone, and a destructive one (PPL factor at least confirm's) is split in two halves, "
             "each tested in turn, until single culprit weights remain, or a group neither of whose halves is "
             "destructive alone (an interaction), or the budget of evaluations is spent.</p>"]
    for name, files in paths.items():
        summary, culprits = read_json(files["summary"]), read_parquet(files["culprits"])
        parts.append(f"<h3>{_e(name)}</h3><p>The top set of {summary['n_weights']} weights (seed {summary['seed']}, "
                     f"{_e(summary['perturb'])} at scale {summary['scale']:g}) multiplies PPL by "
                     f"{_factor(summary['set_ppl_ratio'])}")
        if not summary["destructive"]:
            parts.append(f": not destructive (below &times;{summary['factor']:g}), not searched.</p>")
            continue
        found = summary["super_weights_found"]
        missed = [w for w in summary["super_weights_in_set"] if w not in found]
        interactions = int(culprits["interaction"].sum())
        parts.append(
            f". {summary['evaluations']} of {summary['budget']} evaluations found <b>{summary['culprit_weights']} "
            f"culprit weight(s)</b>, {summary['culprit_groups']} culprit group(s) ({interactions} "
            f"destructive only with weights of both halves together) and left {summary['unresolved_groups']} "
            "group(s) unresolved. "
            + (f"Confirm had already confirmed {len(found)} of them: {_e(', '.join(found))}." if found
               else "Confirm had confirmed none of them.")
            + (f" Confirmed super weights in the set not found as culprits: {_e(', '.join(missed))}." if missed else "")
            + "</p>")
        parts.append(_table(culprits[["kind", "interaction", "size", "first", "last", "ppl_ratio", "delta_ppl_lo",
                                      "delta_ppl_hi", "kl", "top1"]]))
        parts.append(_figure(plot_dir / f"culprits_{_slug(name)}.png", f"{name} culprit search",
                             lambda path: report_plots.plot_culprit_search(
                                 read_parquet(files["search"]), path, f"{name}: culprit search")))
    return f'<section id="culprits"><h2>Culprits in destructive sets</h2>{"".join(parts)}</section>'


def _activation_section(trace: pd.DataFrame | None, plot_dir: Path) -> str:
    body = NOT_RUN if trace is None or trace.empty else _figure(
        plot_dir / "massive_activations.png", "massive activations",
        lambda path: plots.plot_massive_activations(trace, path, "mlp.down_proj massive activations")
    ) + _table(trace)
    return f'<section id="activations"><h2>Massive activations</h2>{body}</section>'


def build_report(baseline_path, experiments: list[Mapping], agreement_paths=None,
                 super_weights_path=None, activations_path=None, verdicts_path=None,
                 out_html="index.html", *, baseline_config, plot_dir, model: str,
                 factor: float = 1.5, title: str = "ESA report", super_experts_path=None,
                 published_path=None, mechanism_paths=None, culprit_paths=None, quantize_path=None,
                 groups_path=None, group_members_path=None, null_path=None, behaviour_paths=None) -> str:
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
    activation trace parquet (``esa.activation_trace.TRACE_COLUMNS``), verdict JSON; published
    super weights' matches (``esa.published.MATCH_COLUMNS``; None says the model has none);
    ``mechanism_paths``: the mechanism step's ``sweep``, ``restore`` and ``control`` by name
    (``esa.mechanism``); ``culprit_paths``: experiment -> its culprit search's ``culprits``,
    ``search`` and ``summary`` (``esa.culprits``); ``quantize_path``: the quantize step's
    results (``esa.quantize.RESULT_COLUMNS``; group_size -1 = per output channel);
    ``groups_path`` and ``group_members_path``: confirm's joint groups (``esa.joint``);
    ``null_path``: its calibrated null's draws (``esa.null.NULL_COLUMNS``);
    ``behaviour_paths``: the behaviour step's ``generation`` and ``sinks`` (``esa.behaviour``).
    """
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    super_weights = read_optional(super_weights_path, read_parquet)
    weights = None if super_weights is None else _by_weight(super_weights)
    verdicts = read_optional(verdicts_path, read_json)
    groups = read_optional(groups_path, read_parquet)
    members = read_optional(group_members_path, read_parquet)
    loaded = [load_experiment(entry) for entry in experiments]
    baseline = read_json(baseline_path)
    figure = _headline_figure(headline_points(loaded, weights, groups, baseline["ppl"]), plot_dir)
    sections = [
        _summary_section(model, read_json(baseline_config), baseline, super_weights, verdicts, factor, groups,
                         members, figure),
        _verdict_section(verdicts),
        *(_experiment_section(exp, plot_dir) for exp in loaded),
        _agreement_section(read_agreement(agreement_paths), plot_dir),
        _super_weight_section(weights, plot_dir, factor),
        _joint_section(groups, members, factor),
        _null_section(read_optional(null_path, read_parquet)),
        _super_expert_section(read_optional(super_experts_path, read_parquet), factor),
        _activation_section(read_optional(activations_path, read_parquet), plot_dir),
        # beyond the runbook
        _mechanism_section(mechanism_paths, baseline["ppl"], plot_dir),
        _behaviour_section(behaviour_paths, plot_dir),
        _published_section(read_optional(published_path, read_parquet)),
        _culprit_section(culprit_paths, plot_dir),
        _quantize_section(read_optional(quantize_path, read_parquet), baseline["ppl"], plot_dir),
    ]
    if not experiments:
        sections.insert(2, f"<section><h2>Experiments</h2>{NOT_RUN}</section>")
    return write_page(out_html, title, sections)

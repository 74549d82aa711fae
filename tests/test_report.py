"""The HTML report (built from small synthetic study outputs, checked in headless Chromium)
and the one-screen summary."""

import html
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import chromium_dom, run_chromium, study_layout

from esa.candidates import build_candidates
from esa.confirm import ABLATION_COLUMNS, SUPER_EXPERT_COLUMNS
from esa.io import write_json_atomic
from esa.report import build_report
from esa.score_stats import build_stats
from esa.activation_trace import TRACE_COLUMNS
from esa.selection import build_mask
from esa.stability import metric_agreement, seed_stability
from esa.summary import summary_text
from esa.targets import Target, target_table
from esa.verdicts import verdicts_from_files

ARTIFACTS = Path(__file__).parent / "artifacts"  # git-ignored; the screenshot lands here
BASELINE = {"loss": 2.5, "ppl": math.exp(2.5), "tokens": 4080, "windows": 16, "finite": True,
            "loss_stderr": 0.021}
TARGETS = [Target(f"model.layers.{layer}.{module}.weight", layer, module, 24, 40)
           for layer in range(2) for module in ("self_attn.q_proj", "mlp.down_proj")]
SEEDS = (0, 1, 2)
MODEL = "tiny-lm"
RUN = {"model": "builtin:smollm2-135m", "device": "auto", "dtype": "fp32", "attn_implementation": "sdpa",
       "loss_chunk": 256, "device_map": None, "batch_size": 4,
       "data": {"source": "hf:wikitext", "hf_config": "wikitext-2-raw-v1", "eval_split": "test",
                "calib_split": "train", "text_field": "text", "eval_fraction": 0.2, "seq_len": 256,
                "eval_windows": 16}}
# the study whose files the fixture writes where the workflow keeps them (esa.layout)
STUDY = {"model": {"name": MODEL, "source": RUN["model"]}, "data": {"source": "builtin:pydoc"}, "seeds": list(SEEDS),
         "experiments": [{"name": "gradxw_global_k20", "metric": "grad_x_weight", "mode": "global", "topk": 20,
                          "perturb": "zero"},
                         {"name": "actmag_perlayer_k5", "metric": "activation_magnitude", "mode": "per_layer",
                          "topk": 5, "perturb": None, "seeds": [0]}]}


def _candidates(metric_seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Heavy-tailed scores of four small tensors: (candidates, stats)."""
    gen = torch.Generator().manual_seed(metric_seed)
    scores = {t.name: torch.rand(t.rows, t.cols, generator=gen).pow(-1.5) for t in TARGETS}
    scores[TARGETS[1].name][3, 7] = 1e4  # a hotspot every seed finds
    for score in scores.values():
        score[0] = 0.0  # zero-gradient weights: bottom_k becomes a trivial control
    weights = {t.name: torch.randn(t.rows, t.cols, generator=gen) for t in TARGETS}
    return build_candidates(TARGETS, weights, scores, scores, m=40), build_stats(TARGETS, scores)


def _results() -> pd.DataFrame:
    rows = []
    for seed in SEEDS:
        for name, dppl in (("top", [30.0, 55.0, math.inf][seed]), ("random_k", 0.4 + seed / 10),
                           ("bottom_k", 0.0)):
            rows.append({"set": name, "seed": seed, "n_weights": 20, "perturb": "zero", "scale": 1.0,
                         "noise": "relative", "loss": 2.5, "ppl": BASELINE["ppl"] + dppl, "delta_loss": 0.1,
                         "delta_ppl": dppl, "delta_ppl_lo": dppl * 0.9, "delta_ppl_hi": dppl * 1.1,
                         "ppl_ratio": 1 + dppl / BASELINE["ppl"], "kl": dppl / 100, "top1": 1 - dppl / 1000,
                         "finite": dppl < math.inf})
    return pd.DataFrame(rows)


def _super_weights(after=(1250.0, 12.2, 30.0)) -> pd.DataFrame:
    """super_weights.parquet as confirm writes it: one row per (metric, rank), so a weight two
    metrics rank appears twice. ``after``: PPL with each of the three weights zeroed alone."""
    tested = pd.DataFrame({
        "tensor": [TARGETS[1].name, TARGETS[1].name, TARGETS[3].name], "layer": [0, 0, 1],
        "module": "mlp.down_proj", "expert": -1, "part": "", "row": [3, 9, 5], "col": [7, 2, 11],
        "flat_index": [3 * 40 + 7, 9 * 40 + 2, 5 * 40 + 11], "weight": [-2.75, 0.125, 4.5],
        "score": [1e4, 30.0, 20.0], "ppl_before": BASELINE["ppl"], "ppl_after": list(after),
        "loss_after": np.log(after)})
    dppl = tested["ppl_after"] - BASELINE["ppl"]
    tested = tested.assign(ppl_ratio=tested["ppl_after"] / BASELINE["ppl"], delta_ppl_lo=dppl * 0.8,
                           delta_ppl_hi=dppl * 1.25, kl=[6.5, 0.01, 0.2], top1=[0.125, 0.99, 0.9],
                           null_n=[2, 2, 3], null_max=[1.0625, 1.0625, 1.25], null_p95=[1.0625, 1.0625, 1.25])
    tested = tested.assign(confirmed=tested["ppl_ratio"] >= 1.5)[ABLATION_COLUMNS]
    ranks = pd.DataFrame({"metric": ["grad_x_weight", "grad_x_weight", "activation_magnitude", "grad_squared"],
                          "rank": [0, 1, 0, 0], "flat_index": [127, 362, 127, 211]})
    return ranks.merge(tested, on="flat_index")[["metric", "rank", *ABLATION_COLUMNS]]


def _super_experts() -> pd.DataFrame:
    """super_experts.parquet as confirm writes it: one row per (metric, rank); expert 2 of
    layer 0 is both metrics' #1 and the one confirmed."""
    rows = [("grad_x_weight", 0, 0, 2, 40.0, 120.0), ("grad_x_weight", 1, 1, 0, 12.0, 12.5),
            ("activation_magnitude", 0, 0, 2, 900.0, 120.0), ("activation_magnitude", 1, 1, 3, 300.0, 14.0)]
    frame = pd.DataFrame(rows, columns=["metric", "rank", "layer", "expert", "score_mass", "ppl_after"])
    frame = frame.assign(stack="mlp.experts", ppl_before=BASELINE["ppl"],
                         ppl_ratio=frame["ppl_after"] / BASELINE["ppl"],
                         delta_ppl_lo=frame["ppl_after"] - BASELINE["ppl"] - 1,
                         delta_ppl_hi=frame["ppl_after"] - BASELINE["ppl"] + 1, kl=0.5, top1=0.75)
    return frame.assign(confirmed=frame["ppl_ratio"] >= 1.5)[SUPER_EXPERT_COLUMNS]


def _relative(paths, start: str):
    """Nested named paths relative to ``start``, as the report step writes inputs.json."""
    if isinstance(paths, dict):
        return {name: _relative(path, start) for name, path in paths.items()}
    return None if paths is None else os.path.relpath(paths, start)


def _write_inputs(layout, workdir: Path) -> Path:
    """The report's inputs.json (what it read, relative to results/{model}); its directory."""
    inputs = workdir / layout.report_files()["inputs"]
    write_json_atomic(_relative(layout.report_inputs(), layout.root), inputs)
    return inputs.parent


def _to_parquet(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """The files of a small study: one full experiment, one scored-only experiment, where the
    workflow writes them (``STUDY``'s layout under a workdir)."""
    workdir = tmp_path_factory.mktemp("study")
    layout = study_layout(STUDY)
    root = workdir / layout.root  # results/{model}: the report's model name
    confirm = layout.confirm_files()
    # the files the tests read by name, relative to results/{model} (a copy of it has them too)
    named = {"baseline": layout.baseline_files()["metrics"], "baseline_config": layout.baseline_files()["config"],
             "super_weights": confirm["super_weights"], "super_experts": confirm["super_experts"],
             "activations": confirm["activations"], "verdicts": layout.report_files()["verdicts"]}
    named = {name: os.path.relpath(path, layout.root) for name, path in named.items()}
    write_json_atomic(BASELINE, root / named["baseline"])
    write_json_atomic(RUN, root / named["baseline_config"])  # the baseline step's spec, as it writes it
    table = target_table(TARGETS)
    # as the config lists an experiment (topk, seeds), with its files one per seed
    entry = {"name": "gradxw_global_k20", "metric": "grad_x_weight", "mode": "global", "topk": 20,
             "seeds": list(SEEDS), "stats": [], "masks": []}
    masks, candidates, agreement = {}, {}, []
    for seed in SEEDS:
        candidates[seed], stats = _candidates(seed)
        masks[seed] = build_mask(candidates[seed], table, "global", 20, seed)
        paths = {"stats": layout.score_files("grad_x_weight", seed)["stats"],
                 "masks": layout.mask("grad_x_weight", "global", 20, seed)}
        for kind, frame in (("stats", stats), ("masks", masks[seed])):
            _to_parquet(frame, workdir / paths[kind])
            entry[kind].append(str(workdir / paths[kind]))
        other = build_mask(_candidates(100 + seed)[0], table, "global", 20, seed)
        agreement.append(metric_agreement({"grad_x_weight": masks[seed], "grad_squared": other})
                         .assign(seed=seed, mode="global", k=20))
    stability = {name: workdir / path for name, path in layout.stability_files("grad_x_weight", "global", 20).items()}
    results = workdir / layout.perturb_files("grad_x_weight", "global", 20, "zero_1")["results"]
    pairs, summary = seed_stability(masks, candidates)
    _to_parquet(pairs, stability["pairs"])
    spec = {"metric": "grad_x_weight", "mode": "global", "k": 20, "seeds": list(SEEDS)}
    write_json_atomic({**spec, **summary}, stability["summary"])  # as the stability step writes it
    _to_parquet(_results(), results)
    entry.update(results=str(results), stability=str(stability["summary"]), stability_pairs=str(stability["pairs"]))
    scored_only = {"name": "actmag_perlayer_k5", "metric": "activation_magnitude", "mode": "per_layer",
                   "k": 5, "stats": {"0": entry["stats"][0]}}
    agreement = pd.concat(agreement, ignore_index=True)
    tables = [workdir / layout.agreement("global", 20), workdir / layout.agreement("per_layer", 5)]
    _to_parquet(agreement, tables[0])  # one table per (mode, k)
    _to_parquet(agreement.assign(mode="per_layer", k=5), tables[1])
    _to_parquet(_super_weights(), root / named["super_weights"])
    _to_parquet(_super_experts(), root / named["super_experts"])
    _to_parquet(pd.DataFrame([{"layer": layer, "module": "mlp.down_proj", "side": side, "value": value, "channel": 7,
                               "window": 0, "position": 0, "token": 1}
                              for layer, values in enumerate([(900.0, 850.0), (3.0, 2.5)])
                              for side, value in zip(("input", "output"), values)], columns=TRACE_COLUMNS),
                root / named["activations"])
    experiments = [entry, scored_only]
    verdicts = verdicts_from_files(root / named["baseline"], experiments, tables)
    write_json_atomic(verdicts, root / named["verdicts"])
    report = _write_inputs(layout, workdir)
    return {"root": root, "named": named, "report": report, "experiments": experiments, "verdicts": verdicts,
            "agreement": tables}


def _at(study, root: Path | None = None) -> dict[str, Path]:
    """The study's named files under ``root`` (default its results/{model}; or a copy of it)."""
    root = study["root"] if root is None else root
    return {name: root / path for name, path in study["named"].items()}


def _build(study, out: Path, full: bool = True) -> str:
    files = _at(study)
    return build_report(files["baseline"], study["experiments"] if full else [],
                        study["agreement"] if full else None,
                        files["super_weights"] if full else None,
                        files["activations"] if full else None,
                        files["verdicts"] if full else None, out,
                        baseline_config=files["baseline_config"], plot_dir=out.parent / "plots", model=MODEL,
                        super_experts_path=files["super_experts"] if full else None)


def test_report_is_self_contained_with_every_section(study, tmp_path):
    page = _build(study, tmp_path / "report/index.html")
    assert (tmp_path / "report/index.html").read_text(encoding="utf-8") == page
    # the headline, 4 figures of the full experiment, 1 of the scored-only one, agreement, super weights, trace
    sources = re.findall(r'<img alt="[^"]*" src="([^"]*)"', page)
    assert len(sources) == 9 and all(s.startswith("data:image/png;base64,iVBORw0KGgo") for s in sources)
    assert not re.search(r'https?:|<link|<script|\bhref="[^#]|url\(', page)  # nothing to fetch, links in-page
    assert len(list((tmp_path / "report/plots").glob("*.png"))) == 9
    # the contents list links every section with an id, each to a section that is there
    links = re.findall(r'<li><a href="#([^"]+)">', page[:page.index('<section id="summary"')])
    assert links[:3] == ["summary", "verdict-section", "exp-gradxw_global_k20"] and len(links) >= 12
    assert all(f'<section id="{name}"' in page or f'id="{name}">' in page for name in links)
    summary = page[page.index('id="summary"'):page.index('id="verdict-section"')]
    assert '<img alt="every perturbed set and every confirmed super weight on one log axis"' in summary
    # the summary, then the verdicts, then the figures
    assert page.index('id="summary"') < page.index('id="verdict-section"') < page.index('class="experiment"')
    assert 'id="baseline"' not in page  # its numbers are in the summary
    assert len(study["verdicts"]) == 9 and len(re.findall(r'<td class="status">', page)) == 9
    assert page.count("bottom_k weights all have score 0 (zero-gradient): a trivial control") == 1
    assert "<th>n_seeds</th><th>n_pairs</th><th>jaccard_mean</th>" in page
    assert "<th>metric</th>" not in page[:page.index('id="super-experts"')]  # the stability table: numbers only
    assert "<td>-2.75</td>" in page and "<td>1250</td>" in page  # the confirmed super weight
    # the super-weight tables list each weight once, with the metrics that ranked it
    tested = page[page.index('id="super-weights"'):page.index('id="activations"')]
    assert tested.count("<td>-2.75</td>") == 2  # confirmed, and among all tested
    assert tested.count("<td>grad_x_weight #1, activation_magnitude #1</td>") == 2
    # the scored-only experiment says what did not run: hotspots, perturbation, stability
    scored_only = page[page.index('id="exp-actmag_perlayer_k5"'):page.index('id="agreement"')]
    assert scored_only.count('<p class="not-run">not run</p>') == 3


def test_missing_sections_say_not_run(study, tmp_path):
    page = _build(study, tmp_path / "index.html", full=False)
    assert "<img" not in page
    # verdicts, experiments, agreement, super weights, joint super weights, innocent weights, super
    # experts, activations, and beyond the runbook: mechanism, behaviour, culprits, quantize (published
    # says the model has no coordinates)
    assert page.count('<p class="not-run">not run</p>') == 12
    for section in ("joint-super-weights", "innocent-weights", "mechanism", "behaviour", "culprits", "quantize"):
        assert '<p class="not-run">not run</p></section>' in _section(page, section)
    assert '<section id="super-experts"><h2>Super experts</h2><p class="not-run">not run</p></section>' in page
    summary = page[page.index('id="summary"'):page.index('id="verdict-section"')]
    assert summary.count('<span class="not-run">not run</span>') == 2  # super weights (single and joint), verdicts
    assert f"PPL {BASELINE['ppl']:.4g}" in summary


def _section(page: str, name: str) -> str:
    return re.search(rf'<section id="{name}">.*?</section>', page, re.S).group(0)


def test_super_experts_are_listed_largest_ppl_factor_first(study, tmp_path):
    page = _build(study, tmp_path / "index.html")
    assert page.index('id="super-weights"') < page.index('id="super-experts"') < page.index('id="activations"')
    section = _section(page, "super-experts")
    assert "<h2>Super experts</h2><p>1 of 3 experts tested confirmed: zeroing the whole expert" in section
    assert "multiplies PPL by >= 1.5.</p>" in section
    head = re.search(r"<thead><tr>(.*?)</tr></thead>", section).group(1)
    assert re.findall(r"<th>([^<]*)</th>", head) == SUPER_EXPERT_COLUMNS
    rows = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(<td>.*?)</tr>", section)]
    ppl = BASELINE["ppl"]
    assert [(*r[:6], r[7], r[8], r[-1]) for r in rows] == [
        ("grad_x_weight", "0", "0", "mlp.experts", "2", "40", "120", f"{120 / ppl:.4g}", "True"),
        ("activation_magnitude", "0", "0", "mlp.experts", "2", "900", "120", f"{120 / ppl:.4g}", "True"),
        ("activation_magnitude", "1", "1", "mlp.experts", "3", "300", "14", f"{14 / ppl:.4g}", "False"),
        ("grad_x_weight", "1", "1", "mlp.experts", "0", "12", "12.5", f"{12.5 / ppl:.4g}", "False")]


def test_a_dense_model_says_it_has_no_experts(study, tmp_path):
    shutil.copytree(study["root"], tmp_path / MODEL)
    files = _at(study, tmp_path / MODEL)
    _super_experts().iloc[:0].to_parquet(files["super_experts"])
    page = build_report(files["baseline"], [], None, files["super_weights"], None, None,
                        tmp_path / "index.html", baseline_config=files["baseline_config"],
                        plot_dir=tmp_path / "plots", model=MODEL, super_experts_path=files["super_experts"])
    assert _section(page, "super-experts") == ('<section id="super-experts"><h2>Super experts</h2>'
                                               "<p>The model has no experts (a dense model): no expert was zeroed."
                                               "</p></section>")


# ---- summary and verdict groups ---------------------------------------------------------

def _summary(page: str) -> str:
    """The summary section, asserted to be the body's first section."""
    opening = re.search(r'<body><h1>[^<]*</h1>(?:<nav id="contents">.*?</nav>)?<section id="summary">.*?</section>',
                        page, re.S)
    assert opening, page[page.index("<body>"):][:300]
    return opening.group(0)


def test_report_opens_with_the_summary(study, tmp_path):
    summary = _summary(_build(study, tmp_path / "index.html"))
    text = html.unescape(re.sub(r"<[^>]+>", "", summary))
    # model and data: the name of results/{model}, the baseline step's config.json, metrics.json
    assert "tiny-lm (builtin:smollm2-135m, fp32)" in text
    assert "hf:wikitext (config wikitext-2-raw-v1, split test): 16 evaluation windows \u00d7 256 tokens" in text
    assert "4080 tokens predicted" in text
    # baseline PPL, its 95% interval exp(loss +- 1.96 SE), the loss and its standard error
    se = BASELINE["loss_stderr"]
    low, high = (math.exp(BASELINE["loss"] + z * se) for z in (-1.96, 1.96))
    assert f"PPL {BASELINE['ppl']:.4g}, 95% interval {low:.4g} \u2013 {high:.4g}" in text
    assert f"loss {BASELINE['loss']:.4g} \u00b1 {se:.4g}" in text
    # each confirmed super weight once, largest factor first, with the metrics and ranks that found it
    assert "2 single super weights of 3 weights tested destructive" in text
    rows = re.findall(r"<tr><td>([^<]*)</td><td>single</td><td>([^<]*)</td><td><b>([^<]*)</b></td><td>([^<]*)</td>"
                      r"<td>[^<]*</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", summary)
    dppl = 1250 - BASELINE["ppl"]
    short = [t.name.removeprefix("model.").removesuffix(".weight") for t in TARGETS]
    assert rows == [(f"{short[1]}[3, 7]", "-2.75", f"&times;{1250 / BASELINE['ppl']:.3g}",
                     "&times;1.0625 (max of 2)", f"{dppl * 0.8:.4g} &ndash; {dppl * 1.25:.4g}", "6.5", "0.125",
                     "grad_x_weight #1, activation_magnitude #1"),
                    (f"{short[3]}[5, 11]", "4.5", f"&times;{30 / BASELINE['ppl']:.3g}",
                     "&times;1.25 (max of 3)",
                     f"{(30 - BASELINE['ppl']) * 0.8:.4g} &ndash; {(30 - BASELINE['ppl']) * 1.25:.4g}", "0.2", "0.9",
                     "grad_squared #1")]
    assert "[9, 2]" not in summary  # tested, not confirmed
    # the verdict counts of verdict.json
    stored = json.loads(_at(study)["verdicts"].read_text())
    counts = [(status, sum(v["status"] == status for v in stored)) for status in ("good", "warn", "bad")]
    assert re.findall(r'<span class="badge (\w+)">(\d+) \1</span>', summary) == [(s, str(n)) for s, n in counts]
    assert counts == [("good", 4), ("warn", 2), ("bad", 3)]


def test_summary_says_plainly_when_no_weight_is_confirmed(study, tmp_path):
    shutil.copytree(study["root"], tmp_path / MODEL)
    files = _at(study, tmp_path / MODEL)
    _super_weights(after=(14.0, 12.2, 16.5)).to_parquet(files["super_weights"])
    summary = _summary(build_report(files["baseline"], [], None, files["super_weights"],
                                    None, None, tmp_path / "index.html", baseline_config=files["baseline_config"],
                                    plot_dir=tmp_path / "plots", model=MODEL))
    text = html.unescape(re.sub(r"<[^>]+>", "", summary))
    # the absence as a finding: against the factor, the metrics' top-N and the null's largest factor
    assert ("No single or joint super weight with factor \u2265 \u00d71.5 among the top-2 of grad_x_weight, "
            "activation_magnitude, grad_squared; innocent weights of the same magnitude reach at most \u00d71.25 "
            "(5 drawn).") in text
    assert (f"The largest single factor: \u00d7{16.5 / BASELINE['ppl']:.3g} ({TARGETS[3].name}[5, 11], "
            "ranked by grad_squared #1).") in text
    assert "<table class=\"super-weights\">" not in summary


def test_verdicts_are_grouped_by_experiment_bad_and_warn_open(study, tmp_path):
    page = _build(study, tmp_path / "index.html")
    section = page[page.index('id="verdict-section"'):page.index('class="experiment"')]
    groups = re.findall(r'<details class="verdict-group (\w+)"( open)?><summary><span class="status">\1</span> '
                        r"<b>([^<]*)</b>.*?</summary>(.*?)</details>(?=<details class=\"verdict-group|</section>)",
                        section, re.S)
    by_experiment = {}
    for v in study["verdicts"]:
        by_experiment.setdefault(v["experiment"], []).append(v["status"])
    assert [name for *_, name, _ in groups] == ["gradxw_global_k20", "global_k20", "per_layer_k5", "baseline",
                                                "actmag_perlayer_k5"]  # worst group first
    for worst, is_open, name, table in groups:
        statuses = re.findall(r'<tr class="(good|warn|bad)">', table)
        assert sorted(statuses) == sorted(by_experiment[name])  # its own verdicts, all of them
        assert statuses == sorted(statuses, key=["bad", "warn", "good"].index)  # worst first
        assert worst == statuses[0] and bool(is_open) == (worst != "good")  # only all-good folded away
    assert len(groups) == len(by_experiment)


# ---- headless Chromium (the chromium fixture and helpers: conftest.py) ------------------

# Runs in the load event, which waits for every image: by then a decoded image has its size.
PROBE = """<script>
window.addEventListener('load', () => {
  const shown = el => el.checkVisibility();  // false inside a closed <details>
  const images = [...document.images];
  const summary = document.getElementById('summary');
  const facts = summary ? summary.querySelector('table.facts') : null;  // the words; the figure follows
  const box = facts ? facts.getBoundingClientRect() : null;
  const style = summary ? getComputedStyle(summary) : null;
  const rows = [...document.querySelectorAll('table.verdicts tbody tr')];
  const visible = rows.filter(shown);
  const groups = [...document.querySelectorAll('details.verdict-group')];
  const out = {widths: images.map(i => i.naturalWidth), summary: !!summary,
               first: document.querySelector('body > section') === summary,
               visible: !!box && box.width > 0 && box.height > 0 && style.display !== 'none'
                        && style.visibility !== 'hidden',
               summaryTop: box ? box.top : null, summaryBottom: box ? box.bottom : null,
               viewport: window.innerHeight, rows: rows.length, visibleRows: visible.length,
               groups: groups.map(g => [g.classList[1], g.open, g.getBoundingClientRect().height]),
               firstRowColour: visible.length ? getComputedStyle(visible[0].cells[0]).backgroundColor : null};
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _probe(binary: str, page: str, tmp_path: Path) -> dict:
    """Load ``page`` with the probe script and read what it wrote into the DOM."""
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = chromium_dom(binary, probed, tmp_path)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"probe did not run; DOM starts {dom[:300]!r}"
    return json.loads(found.group(1).replace("&quot;", '"'))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_renders_in_headless_chromium(study, tmp_path, chromium):
    page = _build(study, tmp_path / "report/index.html")
    result = _probe(chromium, page, tmp_path)
    assert len(result["widths"]) == 9 and min(result["widths"]) > 0, result  # every image decodes
    assert result["summary"] and result["first"] and result["visible"]
    assert 0 <= result["summaryTop"] < result["summaryBottom"] < result["viewport"]  # its facts on the first screen
    # 9 verdicts; the all-good group (1 verdict) folded to its one-line summary, the rest open
    assert result["rows"] == 9 and result["visibleRows"] == 8
    assert [(status, is_open) for status, is_open, _ in result["groups"]] == [
        ("bad", True)] * 3 + [("warn", True), ("good", False)]
    assert result["groups"][-1][2] < 60 < min(height for *_, height in result["groups"][:-1])
    assert result["firstRowColour"] == "rgb(248, 215, 218)"  # worst first: a bad row, coloured
    # the probe can fail: a corrupt image reports naturalWidth 0
    broken = page.replace("base64,iVBORw0KGgo", "base64,AAAAAAAAAA", 1)
    assert sorted(_probe(chromium, broken, tmp_path)["widths"])[0] == 0

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_screenshot.png"
    shot.unlink(missing_ok=True)
    run_chromium(chromium, tmp_path / "profile", "--window-size=1280,2400",
                 f"--screenshot={shot}", (tmp_path / "report/index.html").as_uri())
    assert _png_size(shot) == (1280, 2400) and shot.stat().st_size > 50_000
    print(f"report screenshot: {shot}")


# ---- summary ----------------------------------------------------------------------------

def test_summary_text(study):
    text = summary_text(study["root"])  # results/{model}: its one report
    lines = text.splitlines()
    assert lines[0] == f"ESA summary: {study['report']}"
    assert summary_text(study["report"]) == text  # the report's directory itself
    assert lines[1] == ("baseline: PPL 12.18  loss 2.5000 +- 0.021  (4080 tokens, 16 windows, finite)")
    assert lines[2] == "super weights: 2 confirmed of 3 tested"
    assert lines[3] == (f"  {TARGETS[1].name}[3, 7]  w=-2.75  PPL 12.18 -> 1250 (x103)  "
                        "top-N of grad_x_weight, activation_magnitude")
    assert lines[4] == f"  {TARGETS[3].name}[5, 11]  w=4.5  PPL 12.18 -> 30 (x2.46)  top-N of grad_squared"
    counts = {s: sum(v["status"] == s for v in study["verdicts"]) for s in ("good", "warn", "bad")}
    assert lines[5] == f"verdicts: {counts['good']} good, {counts['warn']} warn, {counts['bad']} bad"
    bad = [v for v in study["verdicts"] if v["status"] == "bad"]
    assert len(lines) == 6 + len(bad) and len(bad) >= 1
    assert all(line.startswith("  BAD ") for line in lines[6:])


def test_summary_of_an_empty_results_dir(tmp_path):
    assert summary_text(tmp_path).splitlines()[1:] == [
        "baseline: not run", "super weights: not run", "verdicts: not run"]


def test_summary_counts_a_weight_several_metrics_rank_once(tmp_path):
    """confirm writes one row per (metric, rank); the same weight found twice is one super weight."""
    from esa.summary import summary_text

    row = {"tensor": "model.layers.1.mlp.down_proj.weight", "layer": 1, "module": "mlp.down_proj", "expert": -1,
           "part": "", "row": 3, "col": 7, "flat_index": 3 * 16 + 7, "weight": -2.5, "score": 1.0, "ppl_before": 10.0,
           "ppl_after": 40.0, "ppl_ratio": 4.0, "confirmed": True}
    other = {**row, "col": 8, "flat_index": 3 * 16 + 8, "ppl_after": 10.5, "ppl_ratio": 1.05, "confirmed": False}
    layout = study_layout(STUDY)
    _to_parquet(pd.DataFrame([{**row, "metric": "grad_x_weight", "rank": 0},
                              {**other, "metric": "grad_x_weight", "rank": 1},
                              {**row, "metric": "activation_magnitude", "rank": 0}]),
                tmp_path / layout.confirm_files()["super_weights"])
    _write_inputs(layout, tmp_path)  # the report that read it
    lines = summary_text(tmp_path / layout.root).splitlines()
    assert "super weights: 1 confirmed of 2 tested" in lines
    assert ("  model.layers.1.mlp.down_proj.weight[3, 7]  w=-2.5  PPL 10 -> 40 (x4)  "
            "top-N of grad_x_weight, activation_magnitude") in lines


def test_the_delta_ppl_figure_is_the_same_bytes_on_every_run(tmp_path):
    """Before: seaborn's jitter drew from numpy's unseeded global generator, so two identical
    runs wrote different PNGs (and report pages); the caller's generator state is kept."""
    from esa.report_plots import plot_delta_ppl

    results = pd.DataFrame({"set": ["top", "top", "random_k", "random_k"], "perturb": "zero", "scale": 1.0,
                            "seed": [0, 1, 0, 1], "delta_ppl": [5.0, 7.0, 0.1, 0.2]})
    np.random.seed(123)
    expected_next = np.random.RandomState(123).uniform()
    plot_delta_ppl(results, tmp_path / "a.png", "t")
    assert np.random.uniform() == expected_next
    plot_delta_ppl(results, tmp_path / "b.png", "t")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_headline_points_and_the_contents_list():
    """Each perturbed set per seed, each confirmed single and each joint super weight: its PPL
    ratio, and its interval as 1 + dPPL / baseline PPL; the contents list links sections by id."""
    from esa.report import contents, headline_points
    from esa.results import ExperimentData

    results = pd.DataFrame({"set": ["top", "random_k"], "ppl_ratio": [3.0, 1.01], "delta_ppl_lo": [10.0, -0.5],
                            "delta_ppl_hi": [30.0, 0.7]})
    weights = pd.DataFrame({"tensor": ["model.layers.1.mlp.down_proj.weight"] * 2, "row": [5, 6], "col": [7, 8],
                            "confirmed": [True, False], "ppl_ratio": [6.0, 1.1], "delta_ppl_lo": [40.0, 0.0],
                            "delta_ppl_hi": [60.0, 2.0]})
    groups = pd.DataFrame({"tensor": ["model.layers.2.mlp.down_proj.weight", ""], "kind": ["channel", "neuron"],
                           "index": [260, 9], "destructive": [True, True], "label": ["joint", "single"],
                           "ppl_ratio": [1.5, 9.0], "delta_ppl_lo": [4.0, 1.0], "delta_ppl_hi": [6.0, 2.0]})

    points = headline_points([ExperimentData("e", "grad_x_weight", "global", 5, results=results),
                              ExperimentData("scored only", "grad_x_weight", "global", 5)], weights, groups, 10.0)

    assert points.values.tolist() == [["e", "top", 3.0, 2.0, 4.0], ["e", "random_k", 1.01, 0.95, 1.07],
                                      ["layers.1.mlp.down_proj[5, 7]", "single super weight", 6.0, 5.0, 7.0],
                                      ["layers.2.mlp.down_proj row 260", "joint super weight", 1.5, 1.4, 1.6]]
    assert contents(['<section id="a"><h2>A &amp; B</h2></section>', "<section><h2>no id</h2></section>",
                     '<section class="x" id="c"><h2>C</h2>']) == (
        '<nav id="contents"><h2>Contents</h2><ol><li><a href="#a">A &amp; B</a></li><li><a href="#c">C</a></li>'
        "</ol></nav>")

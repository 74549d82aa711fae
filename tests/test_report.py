"""The HTML report (built from small synthetic study outputs, checked in headless Chromium)
and the one-screen summary."""

import json
import math
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from esa.candidates import build_candidates
from esa.confirm import COLUMNS as SUPER_COLUMNS
from esa.io import write_json_atomic
from esa.report import build_report
from esa.score_stats import build_stats
from esa.scores import TRACE_COLUMNS
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
                         "delta_ppl": dppl, "ppl_ratio": 1 + dppl / BASELINE["ppl"],
                         "finite": dppl < math.inf})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """The files of a small study: one full experiment, one scored-only experiment."""
    root = tmp_path_factory.mktemp("results")
    write_json_atomic(BASELINE, root / "baseline/metrics.json")
    table = target_table(TARGETS)
    # as the config lists an experiment (topk, seeds), with its files one per seed
    entry = {"name": "gradxw_global_k20", "metric": "grad_x_weight", "mode": "global", "topk": 20,
             "seeds": list(SEEDS), "stats": [], "masks": []}
    masks, candidates, agreement = {}, {}, []
    for seed in SEEDS:
        candidates[seed], stats = _candidates(seed)
        masks[seed] = build_mask(candidates[seed], table, "global", 20, seed)
        for kind, frame in (("stats", stats), ("masks", masks[seed])):
            path = root / f"{kind}_seed{seed}.parquet"
            frame.to_parquet(path)
            entry[kind].append(str(path))
        other = build_mask(_candidates(100 + seed)[0], table, "global", 20, seed)
        agreement.append(metric_agreement({"grad_x_weight": masks[seed], "grad_squared": other})
                         .assign(seed=seed, mode="global", k=20))
    pairs, summary = seed_stability(masks, candidates)
    pairs.to_parquet(root / "pairs.parquet")
    spec = {"metric": "grad_x_weight", "mode": "global", "k": 20, "seeds": list(SEEDS)}
    write_json_atomic({**spec, **summary}, root / "stability.json")  # as the stability step writes it
    _results().to_parquet(root / "results.parquet")
    entry.update(results=str(root / "results.parquet"), stability=str(root / "stability.json"),
                 stability_pairs=str(root / "pairs.parquet"))
    scored_only = {"name": "actmag_perlayer_k5", "metric": "activation_magnitude", "mode": "per_layer",
                   "k": 5, "stats": {"0": entry["stats"][0]}}
    agreement = pd.concat(agreement, ignore_index=True)
    agreement.to_parquet(root / "agreement_global_k20.parquet")  # one table per (mode, k)
    agreement.assign(mode="per_layer", k=5).to_parquet(root / "agreement_per_layer_k5.parquet")
    super_weights = pd.DataFrame({
        "tensor": TARGETS[1].name, "layer": 0, "module": "mlp.down_proj", "row": [3, 9], "col": [7, 2],
        "flat_index": [3 * 40 + 7, 9 * 40 + 2], "weight": [-2.75, 0.125], "score": [1e4, 30.0],
        "ppl_before": BASELINE["ppl"], "ppl_after": [1250.0, 12.2]})
    super_weights = super_weights.assign(ppl_ratio=super_weights["ppl_after"] / BASELINE["ppl"])
    super_weights = super_weights.assign(confirmed=super_weights["ppl_ratio"] >= 1.5)[SUPER_COLUMNS]
    (root / "confirm").mkdir()
    super_weights.to_parquet(root / "confirm/super_weights.parquet")
    pd.DataFrame([{"layer": layer, "module": "mlp.down_proj", "side": side, "value": value, "channel": 7,
                   "window": 0, "position": 0, "token": 1}
                  for layer, values in enumerate([(900.0, 850.0), (3.0, 2.5)])
                  for side, value in zip(("input", "output"), values)], columns=TRACE_COLUMNS
                 ).to_parquet(root / "activations.parquet")
    experiments = [entry, scored_only]
    agreement = [root / "agreement_global_k20.parquet", root / "agreement_per_layer_k5.parquet"]
    verdicts = verdicts_from_files(root / "baseline/metrics.json", experiments, agreement)
    write_json_atomic(verdicts, root / "report/verdict.json")
    return {"root": root, "experiments": experiments, "verdicts": verdicts, "agreement": agreement}


def _build(study, out: Path, full: bool = True) -> str:
    root = study["root"]
    return build_report(root / "baseline/metrics.json", study["experiments"] if full else [],
                        study["agreement"] if full else None,
                        root / "confirm/super_weights.parquet" if full else None,
                        root / "activations.parquet" if full else None,
                        root / "report/verdict.json" if full else None, out)


def test_report_is_self_contained_with_every_section(study, tmp_path):
    page = _build(study, tmp_path / "report/index.html")
    assert (tmp_path / "report/index.html").read_text(encoding="utf-8") == page
    # 4 figures of the full experiment, 1 of the scored-only one, agreement, super weights, trace
    sources = re.findall(r'<img alt="[^"]*" src="([^"]*)"', page)
    assert len(sources) == 8 and all(s.startswith("data:image/png;base64,iVBORw0KGgo") for s in sources)
    assert not re.search(r"https?:|<link|<script|\bhref=|url\(", page)  # nothing to fetch
    assert len(list((tmp_path / "report/plots").glob("*.png"))) == 8
    # the verdict table comes first, worst first
    assert page.index('id="verdicts"') < page.index('id="baseline"') < page.index('class="experiment"')
    statuses = re.findall(r'<tr class="(good|warn|bad)"><td class="status">', page)
    assert statuses == ["bad"] * 3 + ["warn"] * 2 + ["good"] * 4 and len(study["verdicts"]) == 9
    assert page.count("bottom_k weights all have score 0 (zero-gradient): a trivial control") == 1
    assert f"<td>{BASELINE['ppl']:.4g}</td><td>2.5</td>" in page and "<td>4080</td>" in page
    assert "<th>n_seeds</th><th>n_pairs</th><th>jaccard_mean</th>" in page and "<th>metric</th>" not in page
    assert "<td>-2.75</td>" in page and "<td>1250</td>" in page  # the confirmed super weight
    # the scored-only experiment says what did not run: hotspots, perturbation, stability
    scored_only = page[page.index('id="exp-actmag_perlayer_k5"'):page.index('id="agreement"')]
    assert scored_only.count('<p class="not-run">not run</p>') == 3


def test_missing_sections_say_not_run(study, tmp_path):
    page = _build(study, tmp_path / "index.html", full=False)
    assert "<img" not in page
    # verdicts, experiments, agreement, super weights, activations
    assert page.count('<p class="not-run">not run</p>') == 5


# ---- headless Chromium ------------------------------------------------------------------

# Runs in the load event, which waits for every image: by then a decoded image has its size.
PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const table = document.getElementById('verdicts');
  const box = table ? table.getBoundingClientRect() : null;
  const style = table ? getComputedStyle(table) : null;
  const out = {widths: images.map(i => i.naturalWidth), table: !!table,
               visible: !!box && box.width > 0 && box.height > 0 && style.display !== 'none'
                        && style.visibility !== 'hidden',
               tableTop: box ? box.top : null, viewport: window.innerHeight,
               rows: table ? table.tBodies[0].rows.length : 0,
               firstRowColour: table
                 ? getComputedStyle(table.tBodies[0].rows[0].cells[0]).backgroundColor : null};
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get if missing; CI=true fails rather than skips."""
    path = shutil.which("chromium")
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        policy = subprocess.run(["apt-cache", "policy", "chromium"], capture_output=True, text=True)
        if re.search(r"Candidate: (?!\(none\))", policy.stdout):
            subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=1200,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            path = shutil.which("chromium")
    if path is None:
        message = "headless chromium is not installed and `apt-get install -y chromium` did not work"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


def _probe(binary: str, page: str, tmp_path: Path) -> dict:
    """Load ``page`` with the probe script and read what it wrote into the DOM."""
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(binary, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom",
                    probed.as_uri()).stdout
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
    assert len(result["widths"]) == 8 and min(result["widths"]) > 0, result  # every image decodes
    assert result["table"] and result["visible"] and result["rows"] == 9
    assert 0 <= result["tableTop"] < result["viewport"]  # on the first screen
    assert result["firstRowColour"] == "rgb(248, 215, 218)"  # worst first: a bad row, coloured
    # the probe can fail: a corrupt image reports naturalWidth 0
    broken = page.replace("base64,iVBORw0KGgo", "base64,AAAAAAAAAA", 1)
    assert sorted(_probe(chromium, broken, tmp_path)["widths"])[0] == 0

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_screenshot.png"
    shot.unlink(missing_ok=True)
    _chromium(chromium, tmp_path / "profile", "--window-size=1280,2400",
              f"--screenshot={shot}", (tmp_path / "report/index.html").as_uri())
    assert _png_size(shot) == (1280, 2400) and shot.stat().st_size > 50_000
    print(f"report screenshot: {shot}")


# ---- summary ----------------------------------------------------------------------------

def test_summary_text(study):
    text = summary_text(study["root"])
    lines = text.splitlines()
    assert lines[0] == f"ESA summary: {study['root']}"
    assert lines[1] == ("baseline: PPL 12.18  loss 2.5000 +- 0.021  (4080 tokens, 16 windows, finite)")
    assert lines[2] == "super weights: 1 confirmed of 2 tested"
    assert lines[3] == f"  {TARGETS[1].name}[3, 7]  w=-2.75  PPL 12.18 -> 1250 (x103)"
    counts = {s: sum(v["status"] == s for v in study["verdicts"]) for s in ("good", "warn", "bad")}
    assert lines[4] == f"verdicts: {counts['good']} good, {counts['warn']} warn, {counts['bad']} bad"
    bad = [v for v in study["verdicts"] if v["status"] == "bad"]
    assert len(lines) == 5 + len(bad) and len(bad) >= 1
    assert all(line.startswith("  BAD ") for line in lines[5:])


def test_summary_of_an_empty_results_dir(tmp_path):
    assert summary_text(tmp_path).splitlines()[1:] == [
        "baseline: not run", "super weights: not run", "verdicts: not run"]


def test_summary_counts_a_weight_several_metrics_rank_once(tmp_path):
    """confirm writes one row per (metric, rank); the same weight found twice is one super weight."""
    from esa.summary import summary_text

    row = {"tensor": "model.layers.1.mlp.down_proj.weight", "layer": 1, "module": "mlp.down_proj", "row": 3,
           "col": 7, "flat_index": 3 * 16 + 7, "weight": -2.5, "score": 1.0, "ppl_before": 10.0,
           "ppl_after": 40.0, "ppl_ratio": 4.0, "confirmed": True}
    other = {**row, "col": 8, "flat_index": 3 * 16 + 8, "ppl_after": 10.5, "ppl_ratio": 1.05, "confirmed": False}
    (tmp_path / "confirm").mkdir()
    pd.DataFrame([{**row, "metric": "grad_x_weight", "rank": 0}, {**other, "metric": "grad_x_weight", "rank": 1},
                  {**row, "metric": "activation_magnitude", "rank": 0}]).to_parquet(
        tmp_path / "confirm" / "super_weights.parquet")
    lines = summary_text(tmp_path).splitlines()
    assert "super weights: 1 confirmed of 2 tested" in lines
    assert ("  model.layers.1.mlp.down_proj.weight[3, 7]  w=-2.5  PPL 10 -> 40 (x4)  "
            "top-N of grad_x_weight, activation_magnitude") in lines

"""Phases 2-3 through the DAG on a tiny model: one study (the module fixture) and what a change to it reruns."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, scheduled, snakemake, study_layout

from esa.candidates import build_candidates
from esa.data import draw_calibration, read_windows
from esa.models import load_model, source_from_ref
from esa.metrics import METRICS
from esa.names import TABLE_COLUMNS
from esa.published import PUBLISHED_COLUMNS
from esa.scores import compute_scores
from esa.selection import select_topk
from esa.targets import find_targets

PUBLISHED = [(0, "model.layers.0.mlp.down_proj.weight", 3, 5), (1, "model.layers.1.mlp.up_proj.weight", 9, 2)]


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model_dir):
    """One full tiny study: four metrics, two seeds, Phase 2 and 3 experiments.

    It first runs without the activation_magnitude experiment and records what adding that
    metric schedules (returned as ``added``).
    """
    workdir = tmp_path_factory.mktemp("study")
    # the tiny model registered under a test name with two published coordinates
    pd.DataFrame([("esa-test/tiny", *c, f"test {i}") for i, c in enumerate(PUBLISHED)],
                 columns=PUBLISHED_COLUMNS).to_csv(workdir / "published.csv", index=False)
    config = {
        "model": {"name": "tiny", "source": str(tiny_model_dir), "published_as": "esa-test/tiny"}, "device": "cpu",
        "data": {"source": "builtin:pydoc", "seq_len": 32, "eval_windows": 4},
        "seeds": [0, 1],
        "scoring": {"max_samples": 4, "batch_size": 2, "candidates": 40, "hutchinson": {"probes": 2}},
        "experiments": [
            {"name": "gxw", "metric": "grad_x_weight", "mode": "per_layer", "topk": 20,
             "perturb": "sign_flip", "scale": 1.0},
            {"name": "g2", "metric": "grad_squared", "mode": "global", "topk": 30},
            {"name": "act", "metric": "activation_magnitude", "mode": "per_tensor", "topk": 5},
            {"name": "hutch", "metric": "hutchinson_diag", "mode": "global", "topk": 30,
             "perturb": "zero", "controls": ["random_k"]},
        ],
        # beyond the runbook: every phase of issue 12 through the DAG
        "published": {"extra_table": str(workdir / "published.csv")},
        "quantize": {"schemes": [{"bits": 3, "group_size": 16}], "protect": [1, 10]},
        "culprits": {"experiments": ["hutch"]},
        "mechanism": {"enabled": True},
    }
    # the first run has neither act nor the phases beyond the runbook: they run once, in the second
    without = {**{k: v for k, v in config.items() if k not in ("quantize", "culprits", "mechanism")},
               "experiments": [e for e in config["experiments"] if e["name"] != "act"]}
    first = snakemake(workdir, without)
    assert first.returncode == 0, first.stdout[-4000:]
    added = scheduled(snakemake(workdir, config, "-n", "--quiet", "rules"))
    result = snakemake(workdir, config)
    assert result.returncode == 0, result.stdout[-4000:]
    return workdir, config, added


def test_scores_on_disk_equal_a_direct_computation(study):
    """candidates.parquet of seed 1 equals scoring seed 1's calibration sample directly."""
    workdir, config, _ = study
    layout = study_layout(config)
    model = load_model(source_from_ref(workdir / layout.model_ref), "cpu", "fp32", "sdpa")
    pool = read_windows(workdir / layout.data_files("calib")["windows"])
    sample = torch.from_numpy(pool[draw_calibration(len(pool), 4, 1)])
    targets = find_targets(model)
    direct = compute_scores(model, targets, sample, ["grad_x_weight"], 2, 1, progress=False)["grad_x_weight"]
    expected = build_candidates(targets, direct.weights, direct.stat, direct.score, 40)
    scores = layout.score_files("grad_x_weight", 1)
    on_disk = pd.read_parquet(workdir / scores["candidates"])
    pd.testing.assert_frame_equal(on_disk, expected)
    manifest = json.loads((workdir / scores["manifest"]).read_text())
    assert manifest["calibration_windows"] == draw_calibration(len(pool), 4, 1).tolist()


def test_seeds_change_the_calibration_sample_and_the_ranking(study):
    workdir, config, _ = study
    layout = study_layout(config)
    a, b = (json.loads((workdir / layout.score_files("grad_x_weight", seed)["manifest"]).read_text())
            ["calibration_windows"] for seed in (0, 1))
    assert a != b
    pairs = pd.read_parquet(workdir / layout.stability_files("grad_x_weight", "per_layer", 20)["pairs"])
    assert len(pairs) == 1 and 0.0 < pairs.jaccard[0] < 1.0


def test_masks_hold_top_and_matched_controls(study):
    workdir, config, _ = study
    mask = pd.read_parquet(workdir / study_layout(config).mask("grad_x_weight", "per_layer", 20, 0))
    counts = mask.groupby("set").size().to_dict()
    assert counts == {"top": 40, "random_k": 40, "bottom_k": 40}  # 2 layers x k=20
    top = mask[mask.set == "top"]
    rnd = mask[mask.set == "random_k"]
    assert top.groupby("tensor").size().to_dict() == rnd.groupby("tensor").size().to_dict()
    assert not set(zip(top.tensor, top.flat_index)) & set(zip(rnd.tensor, rnd.flat_index))


def test_perturbation_results_against_the_baseline(study):
    workdir, config, _ = study
    layout = study_layout(config)
    baseline = json.loads((workdir / layout.baseline_files()["metrics"]).read_text())
    perturbed = layout.perturb_files("grad_x_weight", "per_layer", 20, "sign_flip_1")
    results = pd.read_parquet(workdir / perturbed["results"])
    assert sorted(zip(results["seed"], results["set"])) == [
        (0, "bottom_k"), (0, "random_k"), (0, "top"), (1, "bottom_k"), (1, "random_k"), (1, "top")]
    assert (results.n_weights == 40).all() and results.finite.all()
    np.testing.assert_allclose(results.delta_ppl, results.ppl - baseline["ppl"])
    np.testing.assert_allclose(results.ppl_ratio, results.ppl / baseline["ppl"])
    hutch = pd.read_parquet(workdir / layout.perturb_files("hutchinson_diag", "global", 30, "zero_1")["results"])
    assert set(hutch["set"]) == {"top", "random_k"}


def test_published_coordinates_are_ranked_where_the_candidates_decide(study):
    """The published step ranks each coordinate under each metric on the confirm seed: an exact
    rank is the coordinate's place in the global order of the stored candidates; the report
    lists them."""
    workdir, config, _ = study
    layout = study_layout(config)
    matches = pd.read_parquet(workdir / layout.published_files()["matches"])
    tested = pd.read_parquet(workdir / layout.confirm_files()["super_weights"])
    tested = tested.drop_duplicates(["tensor", "flat_index"])
    assert len(matches) == 2 * 4 and set(matches["source"]) == {"test 0", "test 1"}  # x four metrics
    assert set(matches["status"]) <= {"exact", "at_least"}
    for match in matches.itertuples():
        scored = {name: workdir / path for name, path in layout.score_files(match.metric, 0).items()}
        stats = pd.read_parquet(scored["stats"])
        cols = int(stats.set_index("tensor").loc[match.tensor, "cols"])
        assert match.flat_index == match.row * cols + match.col
        if match.status == "exact":
            last = select_topk(pd.read_parquet(scored["candidates"]), stats[TABLE_COLUMNS], "global",
                               match.rank + 1).iloc[-1]
            assert (last["tensor"], last["row"], last["col"], last["score"]) == (
                match.tensor, match.row, match.col, match.score)
        hit = tested[(tested["tensor"] == match.tensor) & (tested["flat_index"] == match.flat_index)]
        assert match.tested == (len(hit) == 1)
    page = (workdir / layout.report_files()["index"]).read_text()
    section = page.split('<section id="published">')[1].split("</section>")[0]
    assert "2 super weights published for <b>esa-test/tiny</b>" in section


def test_quantize_culprits_and_mechanism_run_in_the_dag(study):
    """One 3-bit scheme: none, each metric's top-1 and top-10, random_k at 1 and 10, the super
    weights; the culprit search of the hutch experiment and the mechanism tables are written
    whatever the tiny model holds (no confirmed super weight: empty tables)."""
    workdir, config, _ = study
    layout = study_layout(config)
    quantize = pd.read_parquet(workdir / layout.quantize_files()["results"])
    conditions = [("none", "", 0), *(("metric", m, k) for m in METRICS for k in (1, 10)),
                  ("random_k", "", 1), ("random_k", "", 10), ("super_weights", "", 0)]
    assert list(zip(quantize["protect"], quantize["metric"], quantize["k"])) == conditions
    assert quantize["n_protected"].tolist() == [k for _, _, k in conditions]
    assert (quantize["bits"] == 3).all() and (quantize["group_size"] == 16).all()
    none = quantize[quantize["protect"] == "none"].iloc[0]
    baseline = json.loads((workdir / layout.baseline_files()["metrics"]).read_text())
    assert none["ppl"] != baseline["ppl"] and none["kl"] > 0
    summary = json.loads((workdir / layout.culprit_files("hutch")["summary"]).read_text())
    assert summary["n_weights"] == 30 and summary["evaluations"] >= 1
    for path in layout.mechanism_files().values():
        assert (workdir / path).exists()
    page = (workdir / layout.report_files()["index"]).read_text()
    for heading in ("Quantization: what protection buys", "Culprits in destructive sets", "How each super weight acts"):
        assert heading in page


def test_agreement_between_metrics(study):
    workdir, config, _ = study
    table = pd.read_parquet(workdir / study_layout(config).agreement("global", 30))
    assert set(table.seed) == {0, 1}
    assert len(table) == 2 * 6  # four metrics -> six pairs per seed
    assert ((table.jaccard >= 0) & (table.jaccard <= 1)).all()


def test_plots_are_written(study):
    workdir, config, _ = study
    layout = study_layout(config)
    for path in [*layout.plot_files("grad_x_weight", "per_layer", 20, 0).values(), layout.activation_plot(0)]:
        assert (workdir / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _snakemake_report_data(page: str, name: str):
    """The JSON object Snakemake's report page assigns to ``var <name>``."""
    import re

    start = re.search(rf"var {name} = (?=\{{)", page).end()
    return json.JSONDecoder().raw_decode(page, start)[0]


def test_snakemake_report_holds_the_flagged_figures_and_the_study_page(study):
    """`snakemake --report` on the finished study: every output flagged with report() (the Phase 2
    figures of rule plots, the study page of rule report), in its category, with its caption."""
    import base64

    workdir, config, _ = study
    result = snakemake(workdir, config, "--report", str(workdir / "report.html"))
    assert result.returncode == 0, result.stdout[-3000:]
    page = (workdir / "report.html").read_text(encoding="utf-8")
    results, categories = (_snakemake_report_data(page, name) for name in ("results", "categories"))
    layout = study_layout(config)
    figures = {str(path.relative_to(workdir)) for path in workdir.glob("results/tiny/plots/*/*/seed*/*/*.png")}
    index = layout.report_files()["index"]
    assert len(figures) == 2 * 4 and set(results) == figures | {index}  # 2 figures x 4 experiments (first seed)
    assert {name: sorted(files) for name, files in ((c, sum(g.values(), [])) for c, g in categories.items())} == {
        "Scores": sorted(f for f in figures if f.endswith("distribution.png")),
        "Hotspots": sorted(f for f in figures if f.endswith("hotspots.png")), "Report": [index]}
    for path in figures:
        assert results[path]["job_properties"]["rule"] == "plots"
    figure = results[layout.plot_files("hutchinson_diag", "global", 30, 0)["hotspots"]]
    assert figure["caption"] == "<p>ESA Phase 2 figure of hutchinson_diag (global, k=30, seed 0).</p>\n"
    study_page = results[index]
    assert study_page["job_properties"]["rule"] == "report" and "The ESA study page" in study_page["caption"]
    embedded = base64.b64decode(study_page["data_uri"].split("base64,", 1)[1])
    assert embedded == (workdir / index).read_bytes()


def test_rerun_is_a_noop_and_identical(study):
    workdir, config, _ = study
    dry = snakemake(workdir, config, "-n")
    assert "Nothing to be done" in dry.stdout
    layout = study_layout(config)
    mask = workdir / layout.mask("grad_x_weight", "per_layer", 20, 1)
    results = workdir / layout.perturb_files("grad_x_weight", "per_layer", 20, "sign_flip_1")["results"]
    before = mask.read_bytes(), pd.read_parquet(results)
    # only these two files' jobs: a forced rule reruns everything after it, for every target
    again = snakemake(workdir, config, "--forcerun", "topk", "perturb", "--", str(mask.relative_to(workdir)),
                      str(results.relative_to(workdir)))
    assert again.returncode == 0, again.stdout[-3000:]
    assert mask.read_bytes() == before[0]
    pd.testing.assert_frame_equal(pd.read_parquet(results), before[1])



def test_adding_a_metric_schedules_only_its_scores_and_what_follows(study):
    _, _, added = study
    assert added["scores_activations"] == 2
    assert not {"model", "data", "baseline", "scores_gradients", "scores_hutchinson", "perturb"} & added.keys()
    assert set(added) <= {"scores_activations", "topk", "plots", "activation_plot", "stability", "agreement",
                          "confirm", "report", "quantize", "published", "culprits", "mechanism"}


def changed(config, edit):
    import copy

    new = copy.deepcopy(config)
    edit(new)
    return new


def test_changing_a_perturbation_scale_schedules_only_perturb(study):
    workdir, config, _ = study
    new = changed(config, lambda c: c["experiments"][0].update(scale=2.0))
    assert scheduled(snakemake(workdir, new, "-n", "--quiet", "rules")) == {"perturb": 1, "report": 1}


def test_changing_k_reselects_without_rescoring(study):
    workdir, config, _ = study
    new = changed(config, lambda c: c["experiments"][0].update(topk=10))
    jobs = scheduled(snakemake(workdir, new, "-n", "--quiet", "rules"))
    assert jobs.get("topk", 0) >= 2 and jobs["perturb"] == 1
    assert not any(rule.startswith("scores") for rule in jobs) and "baseline" not in jobs


def test_changing_the_evaluation_text_never_rescores(study):
    workdir, config, _ = study
    new = changed(config, lambda c: c["data"].update(eval_windows=3))
    jobs = scheduled(snakemake(workdir, new, "-n", "--quiet", "rules"))
    # and what measures damage on the evaluation windows, or reads what confirm found there
    assert jobs == {"data": 1, "baseline": 1, "perturb": 2, "confirm": 1, "report": 1, "quantize": 1, "culprits": 1,
                    "mechanism": 1, "published": 1}


def test_deterministic_kernels_rerun_the_model_steps_and_off_keeps_existing_results(study):
    """Off (the default) leaves the key out of every spec, as before it existed; on reruns every
    step that runs the model (and what reads them), never the model or data steps."""
    workdir, config, _ = study
    baseline_spec = json.loads((workdir / study_layout(config).baseline_files()["config"]).read_text())
    assert "deterministic" not in baseline_spec and baseline_spec["device"] == "cpu"
    jobs = scheduled(snakemake(workdir, changed(config, lambda c: c.update(deterministic=True)), "-n", "--quiet",
                               "rules"))
    assert {"baseline": 1, "scores_gradients": 2, "scores_hutchinson": 2, "scores_activations": 2, "perturb": 2,
            "confirm": 1, "quantize": 1, "culprits": 1, "mechanism": 1}.items() <= jobs.items()
    assert "model" not in jobs and "data" not in jobs


def test_changing_the_calibration_sample_size_rescores(study):
    workdir, config, _ = study
    new = changed(config, lambda c: c["scoring"].update(max_samples=3))
    jobs = scheduled(snakemake(workdir, new, "-n", "--quiet", "rules"))
    assert jobs["scores_gradients"] == 2 and jobs["scores_activations"] == 2
    assert "baseline" not in jobs and "data" not in jobs


def test_changing_esa_code_reruns_the_rules_that_run_it(study, tmp_path):
    """A copy of the workflow whose esa/scores.py docstring and comments, then esa/names.py (a new
    constant), then the code of esa/stability.py, esa/selection.py, the Hutchinson metric and two
    phases' paths in esa/layout.py are edited. Before: the new constant in esa/names.py reran 16
    of the 19 steps, baseline and scores included; a Hutchinson edit rescored every metric."""
    import shutil

    workdir, config, _ = study
    copy = tmp_path / "workflow"
    copy.mkdir()
    for part in ("Snakefile", "rules", "esa", "config", "envs"):
        source = REPO / part
        (shutil.copytree if source.is_dir() else shutil.copy)(source, copy / part)

    def dry_run():
        cfg = workdir / "config.yaml"
        cfg.write_text(yaml.safe_dump(config))
        result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(copy / "Snakefile"),
                                 "--directory", str(workdir), "--configfile", str(cfg), "-n", "--quiet", "rules"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        return scheduled(result)

    assert dry_run() == {}
    scores = copy / "esa/scores.py"  # a comment and a docstring fix change no code: nothing reruns
    scores.write_text(scores.read_text().replace('"""Score every weight', '"""Score each weight', 1)
                      + "\n# a comment\n")
    assert dry_run() == {}
    with open(copy / "esa/names.py", "a") as handle:  # new code no step uses yet
        handle.write('\nNEW_KIND = ("a", "b")\n')
    assert dry_run() == {}

    def dry_run_edited(path, old, new):
        """The dry run with one edit of ``path`` (undone afterwards)."""
        source = copy / path
        text = source.read_text()
        assert old in text
        source.write_text(text.replace(old, new, 1))
        try:
            return dry_run()
        finally:
            source.write_text(text)

    # a second binding of a function is an edit of its code (a no-op one)
    assert dry_run_edited("esa/stability.py", "\ndef jaccard", "\njaccard = None\n\n\ndef jaccard") == {
        "stability": 4, "agreement": 3, "report": 1}
    jobs = dry_run_edited("esa/selection.py", "\ndef _select", "\n_select = None\n\n\ndef _select")
    assert jobs["topk"] > 0 and jobs["perturb"] == 2
    assert not any(rule.startswith("scores") for rule in jobs) and "baseline" not in jobs
    # the Hutchinson code: its scores and what follows them, no other metric's (before: all three
    # scores jobs shared one code version)
    jobs = dry_run_edited("esa/metrics/hutchinson_diag.py", "\ndef rademacher",
                          "\nrademacher = None\n\n\ndef rademacher")
    assert jobs == {"scores_hutchinson": 2, "topk": 6, "plots": 1, "stability": 1, "agreement": 3, "perturb": 1,
                    "confirm": 1, "culprits": 1, "mechanism": 1, "published": 1, "quantize": 1, "report": 1}
    # one phase's path in esa/layout.py: that phase and what reads it
    assert dry_run_edited("esa/layout.py", 'f"stability/{metric}', 'f"stability-moved/{metric}') == {
        "stability": 4, "report": 1}
    assert dry_run_edited("esa/layout.py", 'f"perturb/{metric}', 'f"perturb-moved/{metric}') == {
        "perturb": 2, "report": 1}


def test_the_notebook_runs_on_the_study(study, monkeypatch):
    """notebooks/explore.ipynb, executed on this study (nbclient, the suite's Python as its
    kernel), ends on the numbers the study's files hold."""
    import nbformat
    from nbclient import NotebookClient

    workdir, config, _ = study
    layout = study_layout(config)
    monkeypatch.setenv("ESA_STUDY", str(workdir / layout.root))
    notebook = nbformat.read(REPO / "notebooks" / "explore.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute()

    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []
    last = "".join(o.get("text", "") for o in notebook.cells[-1].outputs)
    first = layout.experiment_files(config["experiments"][0]["name"])  # the notebook's: the first, seed 0
    stats = pd.read_parquet(workdir / first["scores"][0]["stats"])
    mask = pd.read_parquet(workdir / first["masks"][0])
    results = [pd.read_parquet(workdir / layout.experiment_files(e["name"])["perturb"]["results"])
               for e in config["experiments"] if e.get("perturb")]
    weights = pd.read_parquet(workdir / layout.confirm_files()["super_weights"]).drop_duplicates(
        ["tensor", "flat_index"])
    groups = pd.read_parquet(workdir / layout.confirm_files()["groups"])
    assert json.loads(last) == {"tensors": len(stats), "top_weights": int((mask["set"] == "top").sum()),
                                "results": sum(len(r) for r in results), "confirmed": int(weights["confirmed"].sum()),
                                "groups": len(groups), "max_delta_ppl": float(pd.concat(results)["delta_ppl"].max())}

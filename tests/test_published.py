"""Published super weights: the shipped table, matching a study model to it, the global rank of
a published coordinate from the candidates, and a planted super weight registered under a test
name that ESA ranks first and confirms."""

import json
import re
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import unigram_text
from test_confirm import COL, DOWN, INTERMEDIATE, ROW, _planted_model

from esa.candidates import build_candidates
from esa.config import load_config
from esa.confirm import confirm_super_weights
from esa.damage import Baseline
from esa.errors import ESAError
from esa.evaluation import evaluate
from esa.io import read_parquet, write_parquet_atomic
from esa.layout import Layout
from esa.names import TABLE_COLUMNS
from esa.published import (MATCH_COLUMNS, PUBLISHED_COLUMNS, SHIPPED_TABLE, coordinates_of, global_ranks,
                           hub_id, load_table, match_published)
from esa.report import build_report
from esa.score_stats import build_stats
from esa.scores import compute_scores
from esa.selection import select_topk
from esa.step_specs import typed_spec
from esa.steps import step_published
from esa.targets import Target, find_targets, target_table

REPO = Path(__file__).resolve().parents[1]
# (decoder layers, hidden_size, intermediate_size) of each model in its config.json on the hub:
# a published down_proj[row, col] has row < hidden_size and col < intermediate_size
SHAPES = {"huggyllama/llama-7b": (32, 4096, 11008), "huggyllama/llama-13b": (40, 5120, 13824),
          "huggyllama/llama-30b": (60, 6656, 17920), "mistralai/Mistral-7B-v0.1": (32, 4096, 14336),
          "meta-llama/Meta-Llama-3-8B": (32, 4096, 14336), "allenai/OLMo-1B-0724-hf": (16, 2048, 8192),
          "allenai/OLMo-7B-0724-hf": (32, 4096, 11008), "microsoft/Phi-3-mini-4k-instruct": (32, 3072, 8192)}


def _extra_table(path: Path, rows: list[tuple]) -> str:
    pd.DataFrame(rows, columns=PUBLISHED_COLUMNS).to_csv(path, index=False)
    return str(path)


def test_shipped_table_has_the_cited_rows():
    table = load_table()
    assert list(table.columns) == PUBLISHED_COLUMNS and len(table) == 22
    coordinates = {(r.model, r.tensor, r.row, r.col) for r in table.itertuples(index=False)}
    cited = [("huggyllama/llama-7b", 2, 3968, 7003), ("mistralai/Mistral-7B-v0.1", 1, 2070, 7310),
             ("allenai/OLMo-1B-0724-hf", 1, 1764, 1710), ("allenai/OLMo-1B-0724-hf", 2, 1764, 8041)]
    for model, layer, row, col in cited:
        assert (model, f"model.layers.{layer}.mlp.down_proj.weight", row, col) in coordinates
    assert table.groupby("model").size().to_dict() == {
        "allenai/OLMo-1B-0724-hf": 2, "allenai/OLMo-7B-0724-hf": 4, "huggyllama/llama-13b": 2,
        "huggyllama/llama-30b": 3, "huggyllama/llama-7b": 1, "meta-llama/Meta-Llama-3-8B": 3,
        "microsoft/Phi-3-mini-4k-instruct": 6, "mistralai/Mistral-7B-v0.1": 1}
    for r in table.itertuples(index=False):
        layers, hidden, intermediate = SHAPES[r.model]
        assert r.tensor == f"model.layers.{r.layer}.mlp.down_proj.weight" and r.layer < layers
        assert 0 <= r.row < hidden and 0 <= r.col < intermediate
        assert "arXiv:2411.07191" in r.source and "LLMSuperWeight" in r.source
    assert table[["layer", "row", "col"]].dtypes.eq("int64").all()
    # shipped with the package
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["esa"]
    assert SHIPPED_TABLE.relative_to(REPO / "esa").match(next(p for p in package_data if p.endswith(".csv")))


@pytest.mark.parametrize("rows, message", [
    ([("m/x", 1, "model.layers.1.mlp.down_proj.weight", -1, 0, "paper")], "row '-1' is not an integer >= 0"),
    ([("m/x", 1, "model.layers.2.mlp.down_proj.weight", 0, 0, "paper")], "is not in layer 1"),
    ([("m/x", 1, "model.layers.1.mlp.down_proj.weight", 0, 0, "")], "model and source must not be empty"),
    ([("huggyllama/LLAMA-7B", 2, "model.layers.2.mlp.down_proj.weight", 3968, 7003, "again")],
     "of huggyllama/LLAMA-7B is listed twice"),
])
def test_a_bad_extra_table_is_named(tmp_path, rows, message):
    with pytest.raises(ESAError, match=re.escape(message)):
        load_table(_extra_table(tmp_path / "extra.csv", rows))


def test_an_extra_table_needs_the_columns(tmp_path):
    (tmp_path / "cols.csv").write_text("model,layer,tensor,row,col\n")
    with pytest.raises(ESAError, match=r"has columns \['model', 'layer', 'tensor', 'row', 'col'\]; expected model, "
                                       "layer, tensor, row, col, source"):
        load_table(str(tmp_path / "cols.csv"))


def test_a_model_matches_by_published_as_or_by_its_hub_id_source(tmp_path, offline_hub):
    for repo_id in ("huggyllama/llama-7B", "huggyllama/llama-7b"):
        offline_hub(repo_id, "d" * 40)  # their layouts pin the commit main names
    extra = _extra_table(tmp_path / "extra.csv", [("esa-test/tiny", 0, "model.layers.0.mlp.down_proj.weight", 3, 5,
                                                   "test")])
    models = [{"name": "hub", "source": "huggyllama/llama-7B"},  # the hub resolves ids case-insensitively
              {"name": "local", "source": str(tmp_path)},
              {"name": "renamed", "source": str(tmp_path), "published_as": "esa-test/tiny"},
              {"name": "overridden", "source": "huggyllama/llama-7b", "published_as": "mistralai/Mistral-7B-v0.1"},
              {"name": "builtin", "source": "builtin:smollm2-135m"}]
    config = load_config(overrides={"models": models, "published": {"extra_table": extra}})
    assert [hub_id(m["source"]) for m in models] == ["huggyllama/llama-7B", None, None, "huggyllama/llama-7b", None]
    found = {m["name"]: [(r["model"], r["tensor"], r["row"], r["col"]) for r in coordinates_of(config, m["name"])]
             for m in models}
    assert found == {"hub": [("huggyllama/llama-7b", "model.layers.2.mlp.down_proj.weight", 3968, 7003)],
                     "local": [], "renamed": [("esa-test/tiny", "model.layers.0.mlp.down_proj.weight", 3, 5)],
                     "overridden": [("mistralai/Mistral-7B-v0.1", "model.layers.1.mlp.down_proj.weight", 2070, 7310)],
                     "builtin": []}
    assert json.dumps(coordinates_of(config, "hub"))  # plain values: they travel in the step's spec
    # the workflow asks for a model's matches exactly when it has published coordinates
    matches = {name: Layout(config).of(name).published_files()["matches"] for name in found}
    for name, rows in found.items():
        layout = Layout(config).of(name)
        assert (matches[name] in layout.model_files()) == bool(rows)
        assert layout.report_inputs().get("published") == (matches[name] if rows else None)
    assert Layout(config).report_inputs().get("published") is None  # patterns: no model yet
    missing = load_config(overrides={"models": models[:1], "published": {"extra_table": str(tmp_path / "no.csv")}})
    with pytest.raises(ESAError, match=re.escape(f"published table '{tmp_path / 'no.csv'}' does not exist")):
        coordinates_of(missing, "hub")


def test_global_rank_is_exact_where_the_candidates_decide_it():
    targets = [Target("a", 0, "mlp.down_proj", 2, 3), Target("b", 1, "mlp.down_proj", 2, 3)]
    scores = {"a": torch.tensor([[0.1, 0.1, 5.0], [0.1, 5.0, 0.1]]),
              "b": torch.tensor([[0.1, 7.0, 5.0], [5.0, 0.2, 0.1]])}
    table = target_table(targets)
    every = pd.DataFrame({"tensor": ["a"] * 6 + ["b"] * 6, "row": [0, 0, 0, 1, 1, 1] * 2, "col": [0, 1, 2] * 4})

    # every weight kept: each rank is its place in the global order (7; the 5.0s: a before b, low index
    # first; 0.2; the 0.1s alike)
    full = build_candidates(targets, scores, scores, scores, m=6)
    ranks = global_ranks(full, table, every)
    order = select_topk(full, table, "global", 12)
    assert (ranks["status"] == "exact").all() and ranks["candidate"].all()
    assert ranks["rank"].tolist() == [order.index[(order["tensor"] == w.tensor) & (order["row"] == w.row)
                                                  & (order["col"] == w.col)][0] for w in every.itertuples()]
    assert ranks["rank"].tolist() == [6, 7, 1, 8, 2, 9, 10, 0, 3, 4, 5, 11]

    # two kept per tensor: a holds a[0,2]=5 and a[1,1]=5, b holds b[0,1]=7 and b[0,2]=5
    two = global_ranks(build_candidates(targets, scores, scores, scores, m=2), table, every)
    expected = {  # (tensor, flat): (status, rank, candidate)
        ("a", 2): ("exact", 1, True), ("a", 4): ("exact", 2, True),
        # b[0,2] comes after a's two candidates, so a's left-out weights might precede it too
        ("b", 1): ("exact", 0, True), ("b", 2): ("at_least", 3, True)}
    for i, w in enumerate(every.itertuples()):
        flat = w.row * 3 + w.col
        # a left-out weight comes after its tensor's last candidate: a[1,1] (rank 2), b[0,2] (>= 3)
        status, rank, candidate = expected.get((w.tensor, flat), ("at_least", 3 if w.tensor == "a" else 4, False))
        assert (two["status"][i], two["rank"][i], two["candidate"][i], two["flat_index"][i], two["kept"][i]) == (
            status, rank, candidate, flat, 2)
    assert two["score"].tolist()[:6] == [pytest.approx(v, nan_ok=True) for v in [float("nan")] * 2 + [5.0]
                                         + [float("nan"), 5.0, float("nan")]]

    unscored = global_ranks(full, table, pd.DataFrame({"tensor": ["c"], "row": [0], "col": [0]}))
    assert unscored.iloc[0][["status", "rank", "candidate", "kept", "flat_index"]].tolist() == [
        "not_scored", -1, False, 0, -1]
    with pytest.raises(ESAError, match=re.escape("a[2, 0] is outside the tensor's shape [2, 3]")):
        global_ranks(full, table, pd.DataFrame({"tensor": ["a"], "row": [2], "col": [0]}))


def test_match_reads_confirm_outcome_per_metric():
    targets = [Target("a", 0, "mlp.down_proj", 1, 2)]
    table = target_table(targets)
    scores = {"a": torch.tensor([[1.0, 2.0]])}
    candidates = build_candidates(targets, scores, scores, scores, m=2)
    reversed_ = build_candidates(targets, {"a": scores["a"].flip(1)}, scores, {"a": scores["a"].flip(1)}, m=2)
    coordinates = pd.DataFrame([("x/y", 0, "a", 0, 0, "s1"), ("x/y", 0, "a", 0, 1, "s2")], columns=PUBLISHED_COLUMNS)
    super_weights = pd.DataFrame({"metric": "m1", "rank": [0], "tensor": ["a"], "flat_index": [1],
                                  "ppl_ratio": [3.0], "confirmed": [True]})
    table_ = match_published(coordinates, {"m1": candidates, "m2": reversed_}, {"m1": table, "m2": table},
                             super_weights)
    assert list(table_.columns) == MATCH_COLUMNS
    assert table_[["metric", "col", "rank", "tested", "confirmed"]].values.tolist() == [
        ["m1", 0, 1, False, False], ["m1", 1, 0, True, True], ["m2", 0, 0, False, False], ["m2", 1, 1, True, True]]
    assert table_["ppl_ratio"].isna().tolist() == [True, False, True, False] and table_["ppl_ratio"][1] == 3.0


def test_planted_super_weight_registered_under_a_test_name_ranks_first_and_is_confirmed(tmp_path, one_thread):
    """The tiny Llama of test_confirm with its planted super weight, listed in an extra table as
    esa-test/tiny-planted: activation_magnitude ranks it #1 and confirm confirms it."""
    model = _planted_model()
    calib, evaluation = unigram_text(8, seed=1), unigram_text(8, seed=2)
    targets = find_targets(model)
    scores = compute_scores(model, targets, calib, ["activation_magnitude"], batch_size=4, seed=0,
                            progress=False)["activation_magnitude"]
    candidates = build_candidates(targets, scores.weights, scores.stat, scores.score, m=5)
    stats = build_stats(targets, scores.score)
    baseline = Baseline.of(evaluate(model, evaluation, batch_size=4))
    confirmation = confirm_super_weights(model, {"activation_magnitude": candidates},
                                         {"activation_magnitude": stats[TABLE_COLUMNS]}, evaluation, 4, baseline,
                                         top_n=5)
    paths = {name: tmp_path / f"{name}.parquet" for name in ("candidates", "stats", "super_weights", "matches")}
    for name, frame in (("candidates", candidates), ("stats", stats), ("super_weights", confirmation.super_weights)):
        write_parquet_atomic(frame, paths[name])

    extra = _extra_table(tmp_path / "extra.csv",
                         [("esa-test/tiny-planted", 0, DOWN, ROW, COL, "tests/test_confirm.py")])
    config = load_config(overrides={"model": {"name": "planted", "source": str(tmp_path),
                                              "published_as": "esa-test/tiny-planted"},
                                    "published": {"extra_table": extra}})
    coordinates = coordinates_of(config, "planted")
    step_published(typed_spec("published", {"coordinates": coordinates, "metrics": ["activation_magnitude"]}),
                   candidates={"activation_magnitude": str(paths["candidates"])},
                   stats={"activation_magnitude": str(paths["stats"])}, super_weights=str(paths["super_weights"]),
                   matches=str(paths["matches"]))
    matches = read_parquet(paths["matches"])
    assert len(matches) == 1
    hit = matches.iloc[0]
    assert (hit["model"], hit["tensor"], hit["row"], hit["col"], hit["metric"], hit["status"], hit["rank"]) == (
        "esa-test/tiny-planted", DOWN, ROW, COL, "activation_magnitude", "exact", 0)
    assert hit["candidate"] and hit["flat_index"] == ROW * INTERMEDIATE + COL and hit["kept"] == 5
    assert hit["score"] == candidates["score"].max()
    assert hit["tested"] and hit["confirmed"] and hit["ppl_ratio"] > 6
    tested = confirmation.super_weights.set_index("flat_index").loc[ROW * INTERMEDIATE + COL]
    assert hit["ppl_ratio"] == tested["ppl_ratio"]

    (tmp_path / "baseline.json").write_text(json.dumps({"ppl": baseline.ppl, "loss": 1.9, "loss_stderr": 0.01,
                                                        "finite": True, "windows": 8, "tokens": 248}))
    (tmp_path / "run.json").write_text(json.dumps({"model": "planted", "dtype": "fp32",
                                                   "data": {"source": "unigram", "seq_len": 32}}))
    kwargs = dict(baseline_config=tmp_path / "run.json", plot_dir=tmp_path / "plots", model="planted")
    page = build_report(tmp_path / "baseline.json", [], out_html=tmp_path / "index.html",
                        published_path=paths["matches"], **kwargs)
    section = re.search(r'<section id="published">.*?</section>', page).group(0)
    assert "1 super weight published for <b>esa-test/tiny-planted</b>" in section
    assert (f"<td>{DOWN}[{ROW}, {COL}]</td><td>#1</td><td>yes</td><td><b>yes</b>, PPL &times;"
            f"{hit['ppl_ratio']:.3g}</td><td>tests/test_confirm.py</td>") in section
    without = build_report(tmp_path / "baseline.json", [], out_html=tmp_path / "index.html", **kwargs)
    assert "no published coordinates for this model" in re.search(
        r'<section id="published">.*?</section>', without).group(0)

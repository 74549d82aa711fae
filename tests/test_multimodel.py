"""Several models in one study: one DAG with a {model} wildcard, a comparison page, and a
summary of several result folders."""

import copy
import re

import pandas as pd
import pytest
import torch
from conftest import chromium_dom, scheduled, snakemake, study_layout
from transformers import GPT2Config, GPT2LMHeadModel

from esa.config import load_config, validate_config
from esa.errors import ESAError
from esa.layout import Layout
from esa.summary import summary_text


@pytest.fixture(scope="module")
def gpt2_model_dir(tmp_path_factory, tiny_model_dir):
    """A tiny random GPT-2 (Conv1D projections) with the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=128)
    out = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _config(models: list[dict]) -> dict:
    return {
        "models": models, "device": "cpu", "plots": False,
        "resources": {"default": {"threads": 1}},  # tiny models: two jobs side by side
        "data": {"source": "builtin:pydoc", "seq_len": 32, "eval_windows": 2},
        "seeds": [0],
        "scoring": {"max_samples": 2, "batch_size": 2, "candidates": 20},
        "confirm": {"top_n": 3},
        "experiments": [
            {"name": "gxw", "metric": "grad_x_weight", "mode": "per_layer", "topk": 10},
            {"name": "act", "metric": "activation_magnitude", "mode": "per_layer", "topk": 10},
        ],
    }


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_model_dir, gpt2_model_dir):
    workdir = tmp_path_factory.mktemp("two_models")
    models = [{"name": "llama", "source": str(tiny_model_dir)}, {"name": "gpt2", "source": str(gpt2_model_dir)}]
    result = snakemake(workdir, _config(models))
    assert result.returncode == 0, result.stdout[-4000:]
    return workdir, models, result


def _comparison(models: list[dict]) -> str:
    """The comparison page of the study of ``models``, relative to the workdir."""
    return Layout(validate_config(copy.deepcopy(_config(models)))).comparison()


def test_one_run_studies_both_models_and_compares_them(two_models):
    workdir, models, result = two_models
    config = _config(models)
    for name in ("llama", "gpt2"):
        layout = study_layout(config, name)
        assert (workdir / layout.report_files()["index"]).exists()
        assert (workdir / layout.confirm_files()["super_weights"]).exists()
        assert (workdir / layout.log("baseline").replace("{key}", layout.key("baseline"))).exists()
    stats = pd.read_parquet(workdir / study_layout(config, "gpt2").score_files("grad_x_weight", 0)["stats"])
    assert stats["module"].tolist()[:4] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert (stats["rows"].tolist()[:4], stats["cols"].tolist()[:4]) == ([48, 16, 64, 16], [16, 16, 16, 64])
    page = (workdir / _comparison(models)).read_text()
    for section in ("Baseline", "Confirmed super weights", "Strongest massive activation",
                    "Heavy tails of the scores", "Metric agreement"):
        assert f"<h2>{section}" in page
    baseline = page.split("<h2>Baseline</h2>")[1].split("</section>")[0]
    assert [m for m in re.findall(r"<td>(llama|gpt2)</td>", baseline)] == ["llama", "gpt2"]
    heavy = page.split("Heavy tails of the scores</h2>")[1].split("</section>")[0]
    assert len(re.findall(r"<tr><td>(?:llama|gpt2)</td><td>(?:grad_x_weight|activation_magnitude)</td>", heavy)) == 4
    # the summary printed at the end covers both models
    assert result.stdout.count("ESA summary: results/") == 2


def test_adding_a_model_schedules_only_that_models_jobs(two_models, tiny_model_dir):
    workdir, models, _ = two_models
    assert scheduled(snakemake(workdir, _config(models), "-n", "--quiet", "rules")) == {}
    more = _config([*models, {"name": "llama-again", "source": str(tiny_model_dir)}])
    printed = snakemake(workdir, more, "-n")
    assert printed.returncode == 0, printed.stdout[-3000:]
    # every job writes into the new model's folder, but the comparison page (now of three models)
    assert set(re.findall(r"output: results/([A-Za-z0-9._-]+)/", printed.stdout)) == {"llama-again", "comparison"}
    jobs = scheduled(snakemake(workdir, more, "-n", "--quiet", "rules"))
    assert {rule: jobs[rule] for rule in ("model", "baseline", "confirm", "report", "comparison")} == dict.fromkeys(
        ("model", "baseline", "confirm", "report", "comparison"), 1)


def test_summary_takes_several_result_folders(two_models):
    workdir, models, _ = two_models
    layouts = [study_layout(_config(models), name) for name in ("llama", "gpt2")]
    text = summary_text(*(workdir / layout.root for layout in layouts))
    blocks = text.split("\n\n")
    # one report in each model's folder: its block is titled by the report's directory
    assert [b.splitlines()[0] for b in blocks] == [
        f"ESA summary: {(workdir / layout.report_files()['index']).parent}" for layout in layouts]
    assert all(b.splitlines()[1].startswith("baseline: PPL ") for b in blocks)


def test_comparison_page_renders_in_headless_chromium(two_models, tmp_path, chromium):
    workdir, models, _ = two_models
    dom = chromium_dom(chromium, workdir / _comparison(models), tmp_path)
    assert dom.count("<table>") == 5 - dom.count('class="not-run"')
    assert "ESA comparison: llama, gpt2" in dom


@pytest.mark.parametrize("models, message", [
    ([{"name": "a", "source": "x"}, {"name": "a", "source": "y"}], "names must be unique; repeated: a"),
    ([{"name": "comparison", "source": "x"}], "'comparison' is the comparison page's directory"),
    ([], "invalid config at models"),
])
def test_bad_model_lists_are_named(models, message):
    with pytest.raises(ESAError, match=re.escape(message)):
        validate_config({**load_config(), "models": models})

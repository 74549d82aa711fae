"""Culprit search (adaptive group testing) on a tiny Llama with TWO planted super weights hidden
among ordinary weights; the interaction, budget and not-destructive cases; the config check;
the workflow step."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import UNIGRAM, make_tiny_llama, shared_sign_direction, snakemake, study_layout, unigram_text

from esa.config import validate_config
from esa.culprits import CULPRIT_COLUMNS, SEARCH_COLUMNS, _split, culprit_summary, find_culprits, search_layers
from esa.damage import Baseline, DamageMeter
from esa.errors import ESAError
from esa.evaluation import evaluate
from esa.perturb import perturbed
from esa.targets import find_targets

HIDDEN, INTERMEDIATE, VOCAB = 32, 64, 64
ROWS, COL = (5, 9), 7  # the planted super weights: layer 0 mlp.down_proj[5, 7] and [9, 7]
DOWN = "model.layers.0.mlp.down_proj.weight"
PLANTED = [f"{DOWN}[{row}, {COL}]" for row in ROWS]
FACTOR = 1.5

pytestmark = pytest.mark.usefixtures("one_thread")


def _planted_pair(noise: float):
    """A random Llama whose good PPL rests on two weights (tests/test_confirm.py::_planted_model
    with a second one): down_proj input channel COL is a massive activation (~100) on every
    token, and W_down[5, COL] = W_down[9, COL] = 1 write it into residual channels 5 and 9, which
    dominate every later RMSNorm. lm_head columns 5 and 9 each hold half the unigram
    log-probabilities plus ``noise`` times one random direction v over the vocabulary, with
    opposite signs: together v cancels and the model predicts the unigram (PPL ~e^2.04).

    noise 1: zeroing either weight alone leaves +-v in the logits (PPL x2.3 and x2.7): two
    independent super weights. noise 0: either one alone still carries the unigram (RMSNorm
    rescales it; PPL x1.1), only both together lose it (x4.6): an interaction.
    """
    model = make_tiny_llama(hidden=HIDDEN, intermediate=INTERMEDIATE, vocab=VOCAB)
    signs = shared_sign_direction(model, ROWS[0])
    v = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[COL] = 10 * signs / (HIDDEN - 1)
        mlp.up_proj.weight[COL] = 10 * signs / (HIDDEN - 1)
        for sign, row in zip((1, -1), ROWS):
            mlp.down_proj.weight[row, COL] = 1.0
            model.lm_head.weight[:, row] = UNIGRAM.log() / math.sqrt(2 * HIDDEN) + sign * noise * v / math.sqrt(HIDDEN)
    return model


def _ordinary(model, per_tensor: int = 50, seed: int = 0) -> pd.DataFrame:
    """``per_tensor`` random weights of each q_proj, up_proj and down_proj (300 in all), none
    planted: neither the two super weights nor the up_proj row that makes the massive activation."""
    rng = np.random.default_rng(seed)
    parts = []
    for t in find_targets(model):
        if t.module in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
            flat = rng.choice(t.rows * t.cols, per_tensor, replace=False)
            parts.append(pd.DataFrame({"tensor": t.name, "layer": t.layer, "module": t.module,
                                       "row": flat // t.cols, "col": flat % t.cols, "flat_index": flat}))
    weights = pd.concat(parts, ignore_index=True)
    planted = (weights["tensor"] == DOWN) & (weights["col"] == COL) & weights["row"].isin(ROWS)
    massive = (weights["module"] == "mlp.up_proj") & (weights["layer"] == 0) & (weights["row"] == COL)
    return weights[~planted & ~massive].reset_index(drop=True)


def _planted_rows() -> pd.DataFrame:
    return pd.DataFrame({"tensor": DOWN, "layer": 0, "module": "mlp.down_proj", "row": list(ROWS), "col": COL,
                         "flat_index": [row * INTERMEDIATE + COL for row in ROWS]})


def _search(model, selection: pd.DataFrame, budget: int = 40, min_group: int = 1, kind: str = "zero"):
    """find_culprits on ``selection`` with a meter on 8 unigram windows; checks every weight is
    restored bit-exactly afterwards."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    windows = unigram_text(8, seed=2)
    meter = DamageMeter(model, windows, 4, Baseline.of(evaluate(model, windows, 4)),
                        start_layers=search_layers(model, selection))
    result = find_culprits(model, selection, meter, kind, 1.0, FACTOR, budget, min_group)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    return result


def _ratio_alone(model, selection: pd.DataFrame) -> float:
    """PPL ratio of ``selection`` zeroed, by a plain full evaluation."""
    windows = unigram_text(8, seed=2)
    baseline = evaluate(model, windows, 4).ppl
    with perturbed(model, selection, "zero"):
        return evaluate(model, windows, 4).ppl / baseline


def _two_culprit_set(model) -> pd.DataFrame:
    return pd.concat([_ordinary(model), _planted_rows()], ignore_index=True)


def test_two_planted_super_weights_are_exactly_the_culprits():
    model = _planted_pair(noise=1.0)
    selection = _two_culprit_set(model)
    n = len(selection)
    assert n == 302
    for row in ROWS:  # each alone is destructive
        assert _ratio_alone(model, _planted_rows()[_planted_rows()["row"] == row]) >= FACTOR

    result = _search(model, selection)

    culprits = result.culprits
    assert list(culprits.columns) == CULPRIT_COLUMNS and list(result.search.columns) == SEARCH_COLUMNS
    assert culprits["kind"].tolist() == ["weight", "weight"] and not culprits["interaction"].any()
    assert list(zip(culprits["tensor"], culprits["row"], culprits["col"], culprits["flat_index"])) == [
        (DOWN, row, COL, row * INTERMEDIATE + COL) for row in ROWS]
    assert culprits["first"].tolist() == culprits["last"].tolist() == PLANTED
    assert (culprits["size"] == 1).all() and (culprits["ppl_ratio"] >= FACTOR).all()
    # each culprit's damage is its own evaluation alone (layer replay = a full evaluation)
    for culprit, row in zip(culprits.itertuples(), ROWS):
        alone = _ratio_alone(model, _planted_rows()[_planted_rows()["row"] == row])
        assert culprit.ppl_ratio == pytest.approx(alone, rel=1e-12)

    # the search order is (layer, tensor, col, flat_index): layer 0's down_proj first, and the
    # planted weights, one neuron (input column COL), at positions 4 and 5; each split falls at
    # the neuron boundary nearest the middle, so the pair stays in one branch (302 -> 150 -> 75
    # -> 38 -> 19 -> 9 -> 5 -> 2) until the group is their neuron, split inside: 8 splits, 2
    # evaluations each (23 when a split could cut the neuron: the pair parted at the 9)
    planted = result.weights["tensor"].eq(DOWN) & result.weights["flat_index"].isin(_planted_rows()["flat_index"])
    assert result.weights.index[planted].tolist() == [4, 5]
    assert result.evaluations == 1 + 2 * 8 == 17 <= 2 * 2 * math.ceil(math.log2(n)) + 1
    search = result.search
    assert search["step"].tolist() == list(range(17)) and search["size"].iloc[0] == n
    assert search["size"].tolist()[1::2] == [150, 75, 38, 19, 9, 4, 2, 1]
    assert result.destructive and result.n_weights == n and search["destructive"].iloc[0]
    assert culprits["group"].tolist() == [260, 261] and culprits["depth"].tolist() == [8, 8]
    # the halving tree: every group but the whole set is a half of a destructive group tested before
    tested = dict(zip(search["group"], search["destructive"]))
    assert all(tested[parent] for parent in search["parent"].iloc[1:])
    assert (search["group"].iloc[1:] // 2 == search["parent"].iloc[1:]).all()
    sizes = dict(zip(search["group"], search["size"]))
    assert all(sizes[2 * g] + sizes[2 * g + 1] == sizes[g] for g in search["parent"].iloc[1:].unique())
    assert search["destructive"].sum() == 8 + 2  # the groups split (the whole set among them), the 2 culprits

    confirm = pd.DataFrame({"metric": "m", "rank": [0, 1, 2], "tensor": [DOWN, DOWN, "elsewhere"],
                            "flat_index": [ROWS[0] * INTERMEDIATE + COL, 0, 1], "row": [ROWS[0], 0, 0],
                            "col": [COL, 0, 1], "confirmed": [True, False, True]})
    summary = culprit_summary(result, confirm)
    assert summary["super_weights_in_set"] == summary["super_weights_found"] == [PLANTED[0]]
    assert (summary["n_weights"], summary["evaluations"], summary["budget"], summary["destructive"]) == (
        n, 17, 40, True)
    assert (summary["culprit_weights"], summary["culprit_groups"], summary["unresolved_groups"]) == (2, 0, 0)
    assert summary["set_ppl_ratio"] == search["ppl_ratio"].iloc[0] >= FACTOR


def test_min_group_reports_small_destructive_groups_unsplit():
    model = _planted_pair(noise=1.0)
    result = _search(model, _two_culprit_set(model), min_group=4)
    # the group of 5 splits into 4 (not destructive) and 5's neuron, the planted pair (kept whole)
    assert list(zip(result.culprits["kind"], result.culprits["size"], result.culprits["group"])) == [
        ("group", 2, 130)]
    assert result.culprits["tensor"].isna().all() and result.culprits["flat_index"].isna().all()
    assert result.culprits["first"].tolist() == [PLANTED[0]] and result.culprits["last"].tolist() == [PLANTED[1]]
    assert result.evaluations == 1 + 2 * 7


def test_interaction_is_one_minimal_destructive_group():
    model = _planted_pair(noise=0.0)
    for row in ROWS:  # harmless alone, destructive together
        assert _ratio_alone(model, _planted_rows()[_planted_rows()["row"] == row]) < 1.2
    assert _ratio_alone(model, _planted_rows()) > 4
    ordinary = _ordinary(model, per_tensor=6)
    ordinary = ordinary[ordinary["tensor"] != DOWN].head(30)  # the planted pair comes first in search order
    result = _search(model, pd.concat([ordinary, _planted_rows()], ignore_index=True))

    culprits = result.culprits
    assert len(culprits) == 1
    group = culprits.iloc[0]
    assert (group["kind"], group["interaction"], group["size"], group["group"]) == ("group", True, 2, 16)
    assert [group["first"], group["last"]] == PLANTED and pd.isna(group["tensor"])
    assert group["ppl_ratio"] == pytest.approx(_ratio_alone(model, _planted_rows()), rel=1e-12)
    # 32 -> 16 -> 8 -> 4 -> 2 -> 1 + 1: five splits; the last two halves are the planted weights alone
    assert result.evaluations == 11
    assert result.search["destructive"].tolist() == [True, *[True, False] * 4, False, False]


class _DamageOfZeroedEntries:
    """A stand-in meter: ppl_ratio = 1 + the sum of ``damage[i]`` over the entries i of
    ``DOWN`` that are zero now (a culprit's damage, whatever else is zeroed)."""

    def __init__(self, model, damage: dict[int, float]):
        self.param, self.damage = model.get_parameter(DOWN), damage

    def measure(self, start: int = 0) -> dict:
        flat = self.param.detach().view(-1)
        ratio = 1 + sum(d for i, d in self.damage.items() if flat[i] == 0)
        return {"loss": 0.0, "ppl": ratio, "delta_loss": 0.0, "delta_ppl": ratio - 1, "ppl_ratio": ratio,
                "delta_ppl_lo": 0.0, "delta_ppl_hi": 0.0, "kl": 0.0, "top1": 1.0, "finite": True}


def test_the_most_destructive_group_is_split_first():
    """Best first: a culprit at position 1 (x1.6) and a worse one at position 6 (x4) of 8: after
    the whole set, the second half is split before the first, and with a budget of 5 only the
    worse culprit is resolved, the other half left as a budget group."""
    model = make_tiny_llama()
    selection = pd.DataFrame({"tensor": DOWN, "layer": 0, "module": "mlp.down_proj", "row": 0,
                              "col": range(8), "flat_index": range(8)})
    meter = _DamageOfZeroedEntries(model, {1: 0.6, 6: 3.0})
    result = find_culprits(model, selection, meter, "zero", 1.0, FACTOR, budget=40)
    groups = result.search["group"].tolist()
    # 1; its halves 2 (0-3) and 3 (4-7); 3 first (x4 > x1.6): 6 (4-5), 7 (6-7); 7: 14, 15; then 2 ...
    assert groups[:7] == [1, 2, 3, 6, 7, 14, 15] and groups[7:9] == [4, 5]
    assert list(zip(result.culprits["kind"], result.culprits["flat_index"])) == [("weight", 6), ("weight", 1)]
    short = find_culprits(model, selection, meter, "zero", 1.0, FACTOR, budget=5)
    assert list(zip(short.culprits["kind"], short.culprits["group"])) == [("budget", 7), ("budget", 2)]
    assert short.culprits["ppl_ratio"].tolist() == [4.0, 1.6]


def test_spent_budget_reports_the_unresolved_group():
    model = _planted_pair(noise=1.0)
    selection = _two_culprit_set(model)
    for budget in (7, 8):  # a split takes two evaluations: with one left the search stops
        result = _search(model, selection, budget=budget)
        assert result.evaluations == 7
        assert list(zip(result.culprits["kind"], result.culprits["group"], result.culprits["size"])) == [
            ("budget", 8, 38)]
        row = result.search.set_index("group").loc[8]
        assert result.culprits["ppl_ratio"].iloc[0] == row["ppl_ratio"] and row["destructive"]
    whole = _search(model, selection, budget=1)
    assert whole.evaluations == 1
    assert list(zip(whole.culprits["kind"], whole.culprits["size"])) == [("budget", 302)]
    summary = culprit_summary(whole, pd.DataFrame(columns=["tensor", "flat_index", "row", "col", "confirmed"]))
    assert (summary["unresolved_groups"], summary["culprit_weights"], summary["super_weights_in_set"]) == (1, 0, [])


def test_a_set_that_is_not_destructive_is_not_searched():
    model = _planted_pair(noise=1.0)
    result = _search(model, _ordinary(model), kind="sign_flip")
    assert result.evaluations == 1 and not result.destructive and result.n_weights == 300
    assert result.culprits.empty and list(result.culprits.columns) == CULPRIT_COLUMNS
    assert result.search["ppl_ratio"].iloc[0] < FACTOR
    summary = culprit_summary(result, pd.DataFrame({"tensor": [DOWN], "flat_index": [ROWS[0] * INTERMEDIATE + COL],
                                                    "row": [ROWS[0]], "col": [COL], "confirmed": [True]}))
    assert summary["destructive"] is False and summary["super_weights_in_set"] == []
    assert (summary["evaluations"], summary["culprit_weights"]) == (1, 0)


def test_only_deterministic_perturbations_are_searched():
    model = _planted_pair(noise=1.0)
    windows = unigram_text(2, seed=2)
    meter = DamageMeter(model, windows, 2, Baseline.of(evaluate(model, windows, 2)))
    with pytest.raises(ESAError, match=r"^a culprit search perturbs with 'gaussian'; allowed: zero, sign_flip$"):
        find_culprits(model, _planted_rows(), meter, "gaussian", 1.0, FACTOR, 40)


def _config(**culprits) -> dict:
    return {"model": {"name": "m", "source": "x"}, "data": {"source": "builtin:pydoc"}, "seeds": [0, 1],
            "experiments": [{"name": "noisy", "metric": "grad_x_weight", "mode": "global", "topk": 5,
                             "perturb": "gaussian"},
                            {"name": "scored", "metric": "grad_x_weight", "mode": "global", "topk": 5},
                            {"name": "zeroed", "metric": "grad_x_weight", "mode": "global", "topk": 5,
                             "perturb": "zero", "seeds": [1]},
                            {"name": "flipped", "metric": "grad_x_weight", "mode": "global", "topk": 5,
                             "perturb": "sign_flip"}],
            "culprits": culprits}


@pytest.mark.parametrize("name", ["missing", "noisy", "scored"])
def test_culprit_experiments_must_perturb_with_zero_or_sign_flip(name):
    with pytest.raises(ESAError) as err:
        validate_config(_config(experiments=["zeroed", name]))
    assert str(err.value) == (f"invalid config at culprits.experiments: {name!r} is not an experiment with a "
                              "zero or sign_flip perturbation; allowed: zeroed, flipped")
    config = validate_config(_config(experiments=["zeroed", "flipped"], seed=1))
    assert config["culprits"] == {"experiments": ["zeroed", "flipped"], "seed": 1, "budget": 40, "min_group": 1}
    with pytest.raises(ESAError, match=r"^invalid config at culprits\.seed: 0 is not a seed of experiment "
                                       r"'zeroed' \(seeds \[1\]\)$"):
        validate_config(_config(experiments=["zeroed"], seed=0))
    assert validate_config(_config())["culprits"]["experiments"] == []  # the default: not run


def test_step_writes_the_three_files_and_the_report_shows_them(tmp_path):
    """step_culprits on the two planted super weights saved as a checkpoint: the files hold the
    search a direct call makes, the summary names the super weight confirm confirmed, and the
    report's section tells it."""
    from esa.data import windows_frame
    from esa.io import write_json_atomic, write_parquet_atomic
    from esa.model_steps import step_baseline, step_culprits, step_model
    from esa.report import build_report
    from esa.step_specs import typed_spec

    model = _planted_pair(noise=1.0)
    model.save_pretrained(tmp_path / "checkpoint")
    # the files where a study of the planted model with this experiment keeps them, under tmp_path
    layout = study_layout({"model": {"name": "planted", "source": str(tmp_path / "checkpoint")},
                           "data": {"source": "builtin:pydoc"}, "seeds": [0],
                           "experiments": [{"name": "planted", "metric": "grad_x_weight", "mode": "global",
                                            "topk": 302, "perturb": "zero"}],
                           "culprits": {"experiments": ["planted"]}})
    files, baseline = ({name: str(tmp_path / path) for name, path in paths.items()}
                       for paths in (layout.culprit_files("planted"), layout.baseline_files()))
    model_ref = str(tmp_path / layout.model_ref)
    step_model(typed_spec("model", {"source": str(tmp_path / "checkpoint")}), ref=model_ref)
    windows = tmp_path / "eval.parquet"
    write_parquet_atomic(windows_frame(unigram_text(8, seed=2).numpy()), windows)
    runtime = {"model": "planted", "device": "cpu", "dtype": "fp32", "attn_implementation": "eager",
               "device_map": None, "loss_chunk": 256, "batch_size": 4}
    step_baseline(typed_spec("baseline", {**runtime, "data": {"source": "unigram", "seq_len": 32}}),
                  model=model_ref, eval=str(windows), **baseline)
    selection = _two_culprit_set(model)
    mask = pd.concat([selection.assign(set="top"), selection.head(5).assign(set="random_k")])  # only top is searched
    write_parquet_atomic(mask.assign(expert=-1, score=1.0), tmp_path / "mask.parquet")
    confirm = pd.DataFrame({"metric": "m", "rank": [0, 1], "tensor": DOWN, "row": list(ROWS), "col": COL,
                            "flat_index": [row * INTERMEDIATE + COL for row in ROWS], "confirmed": [False, True]})
    write_parquet_atomic(confirm, tmp_path / "super_weights.parquet")
    spec = {**runtime, "bootstrap": {"resamples": 1000, "level": 0.95, "seed": 0}, "experiment": "planted",
            "seed": 0, "perturb": "zero", "scale": 1.0, "factor": FACTOR, "budget": 40, "min_group": 1}

    step_culprits(typed_spec("culprits", spec), model=model_ref, eval=str(windows), baseline=baseline["metrics"],
                  baseline_windows=baseline["windows"], mask=str(tmp_path / "mask.parquet"),
                  super_weights=str(tmp_path / "super_weights.parquet"), **files)

    direct = _search(model, selection)
    pd.testing.assert_frame_equal(pd.read_parquet(files["culprits"]), direct.culprits)
    pd.testing.assert_frame_equal(pd.read_parquet(files["search"]), direct.search)
    summary = json.loads(Path(files["summary"]).read_text())
    assert summary == {"experiment": "planted", "seed": 0, "perturb": "zero", "scale": 1.0, "factor": FACTOR,
                       "min_group": 1, **json.loads(json.dumps(culprit_summary(direct, confirm)))}
    assert (summary["n_weights"], summary["evaluations"], summary["culprit_weights"]) == (302, 17, 2)
    assert summary["super_weights_in_set"] == summary["super_weights_found"] == [PLANTED[1]]

    run = write_json_atomic({"model": "checkpoint", "dtype": "fp32", "data": {"source": "unigram", "seq_len": 32}},
                            tmp_path / "run.json")
    page = build_report(baseline["metrics"], [], out_html=tmp_path / "index.html", baseline_config=run,
                        plot_dir=tmp_path / "plots", model="planted", culprit_paths={"planted": files})
    section = page[page.index('<section id="culprits">'):]
    section = section[:section.index("</section>")]
    ratio = direct.search["ppl_ratio"].iloc[0]
    assert (f"The top set of 302 weights (seed 0, zero at scale 1) multiplies PPL by &times;{ratio:.3g}. 17 of 40 "
            "evaluations found <b>2 culprit weight(s)</b>, 0 culprit group(s) (0 destructive only with weights of "
            "both halves together) and left 0 group(s) unresolved. Confirm had already confirmed 1 of them: "
            f"{PLANTED[1]}.</p>") in section
    assert section.count("<tr>") == 3 and section.count("data:image/png;base64,") == 1
    assert (tmp_path / "plots/culprits_planted.png").stat().st_size > 0
    empty = build_report(baseline["metrics"], [], out_html=tmp_path / "none.html", baseline_config=run,
                         plot_dir=tmp_path / "plots", model="planted")
    assert '<section id="culprits"><h2>Culprits in destructive sets</h2><p class="not-run">not run</p>' in empty


def test_workflow_schedules_one_search_per_experiment_and_rejects_a_bad_one(tmp_path):
    config = {"model": {"name": "tiny", "source": "/unused"}, "data": {"source": "builtin:pydoc"}, "seeds": [0, 1],
              "experiments": [{"name": "flip", "metric": "grad_x_weight", "mode": "global", "topk": 8,
                               "perturb": "sign_flip", "scale": 2.0}],
              "culprits": {"experiments": ["flip"], "seed": 1}}
    dry = snakemake(tmp_path, config, "-n", "--quiet", "rules")
    assert dry.returncode == 0, dry.stdout[-3000:]
    assert re.search(r"^culprits\s+1$", dry.stdout, re.M)
    layout = study_layout(config)
    plan = snakemake(tmp_path, config, "-n", layout.culprit_files("flip")["summary"])
    assert layout.mask("grad_x_weight", "global", 8, 1) in plan.stdout
    assert layout.confirm_files()["super_weights"] in plan.stdout
    bad = snakemake(tmp_path, {**config, "culprits": {"experiments": ["nope"]}}, "-n")
    assert bad.returncode != 0 and ("invalid config at culprits.experiments: 'nope' is not an experiment with a "
                                    "zero or sign_flip perturbation; allowed: flip") in bad.stdout


def test_a_split_keeps_each_neuron_in_one_half():
    """The split nearest the middle that falls between two neurons (an input column of one
    matrix), the earlier of two as near; inside the neuron when the group is one neuron."""
    a, b, c = (DOWN, 1), (DOWN, 2), ("other", 1)
    assert _split([a, a, a, b, b, c, c, c], 0, 8) == 3  # 3 and 5 both 1 from the middle, 4
    assert _split([a, a, b, b, b, b, b, c], 0, 8) == 2  # 2 (2 away) rather than 7 (3 away)
    assert _split([a] * 6, 0, 6) == 3 and _split([a] * 5, 0, 5) == 3
    assert _split([c, a, a, b], 1, 4) == 3  # within [1, 4): a, a | b

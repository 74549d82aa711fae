"""Computed verdicts: each one flips exactly at its threshold, on inputs built on both sides."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tiny_llama
from esa.config import validate_config
from esa.damage import Baseline
from esa.errors import ESAError
from esa.evaluation import evaluate
from esa.data import windows_frame
from esa.io import write_json_atomic, write_parquet_atomic
from esa.models import materialize
from esa.perturb import run_perturbations
from esa.score_stats import build_stats
from esa.model_steps import step_baseline
from esa.step_specs import typed_spec
from esa.results import ExperimentData
from esa.targets import Target
from esa.verdicts import (DEFAULT_THRESHOLDS, agreement_verdicts, baseline_verdict, compute_verdicts,
                          count_statuses, global_top_share, heavy_tail_verdict, resolve_thresholds,
                          separation_verdicts, stability_verdict, topk_spread_verdict,
                          verdicts_from_files)

T = DEFAULT_THRESHOLDS
BASE = {"loss": 2.0, "ppl": math.exp(2.0), "tokens": 1000, "windows": 4, "finite": True,
        "loss_stderr": 0.01}


def _experiment(**kwargs) -> ExperimentData:
    return ExperimentData(**{"name": "exp", "metric": "grad_x_weight", "mode": "global", "k": 4, **kwargs})


# ---- baseline ---------------------------------------------------------------------------

def test_baseline_finite_and_identical_on_rerun():
    assert baseline_verdict(BASE, dict(BASE), T)["status"] == "good"
    no_rerun = baseline_verdict(BASE, None, T)
    assert no_rerun["status"] == "warn" and "not checked" in no_rerun["message"]
    broken = baseline_verdict({**BASE, "loss": math.nan, "ppl": math.inf, "finite": False}, None, T)
    assert broken["status"] == "bad" and broken["numbers"]["ppl"] is None  # inf written as null
    assert baseline_verdict(BASE, {**BASE, "tokens": 999}, T)["status"] == "bad"


def test_baseline_rerun_flips_at_tolerance():
    rerun = {**BASE, "loss": 2.0 + 2**-20}  # |dloss| = 2**-20 exactly
    assert baseline_verdict(BASE, rerun, T)["status"] == "bad"  # default: identical, tol 0
    at = baseline_verdict(BASE, rerun, {"baseline_rerun_tol": 2**-20})
    assert at["status"] == "good" and at["numbers"]["loss_diff"] == 2**-20
    assert baseline_verdict(BASE, rerun, {"baseline_rerun_tol": 2**-21})["status"] == "bad"


# ---- heavy tail -------------------------------------------------------------------------

def _stats(top_share: float, kurtosis: float) -> pd.DataFrame:
    """One tensor of 10^4 weights: its top 0.01% is one weight, the global top share is exact."""
    return pd.DataFrame({"tensor": ["w"], "layer": [0], "module": ["mlp.down_proj"], "numel": [10_000],
                         "sum": [1.0], "top_share": [top_share], "top_n": [1], "kurtosis": [kurtosis]})


@pytest.mark.parametrize("share, kurt, status", [
    (0.01, 10.0, "good"), (0.0099, 10.0, "warn"), (0.01, 9.99, "warn"), (0.0099, 9.99, "bad"),
    (0.5, math.nan, "warn"),  # constant scores have no kurtosis: never counted heavy-tailed
])
def test_heavy_tail_flips_at_both_thresholds(share, kurt, status):
    verdict = heavy_tail_verdict(_experiment(stats={0: _stats(share, kurt)}), T)
    assert verdict["status"] == status
    assert verdict["numbers"]["global_top_share"] == pytest.approx(share)
    assert verdict["thresholds"] == {"top_share_min": 0.01, "kurtosis_min": 10.0}


def test_heavy_tail_worst_seed_decides():
    verdict = heavy_tail_verdict(_experiment(stats={0: _stats(0.5, 50.0), 1: _stats(0.001, 1.0)}), T)
    assert verdict["status"] == "bad"
    assert verdict["numbers"]["median_kurtosis"] == 1.0
    assert verdict["numbers"]["max_top_share"] == 0.5  # reported over every seed and tensor
    assert set(verdict["numbers"]["per_seed"]) == {"0", "1"}


def _targets_and_scores(scores: dict[str, torch.Tensor]):
    targets = [Target(name, i, "mlp.down_proj", *s.shape) for i, (name, s) in enumerate(scores.items())]
    return targets, build_stats(targets, scores)


def test_global_top_share_bounds_the_exact_share_from_real_stats():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(100, 100, generator=gen)
    b = torch.rand(100, 100, generator=gen)
    a[3, 4], b[7, 8] = 50.0, 40.0  # the two largest sit in different tensors: the bound is exact
    _, stats = _targets_and_scores({"a": a, "b": b})
    total = float(a.double().sum() + b.double().sum())
    assert global_top_share(stats) == pytest.approx(90.0 / total, rel=1e-9)  # n = 2*10^4: top 2
    b[7, 8] = 0.5  # now the exact global top 2 are a's 50 and a's second largest
    _, stats = _targets_and_scores({"a": a, "b": b})
    exact = float(torch.cat([a.flatten(), b.flatten()]).double().topk(2).values.sum()) / float(
        a.double().sum() + b.double().sum())
    assert global_top_share(stats) <= exact


def test_heavy_tail_on_real_score_distributions():
    gen = torch.Generator().manual_seed(0)
    pareto = torch.rand(200, 500, generator=gen).pow(-1 / 0.8)  # Pareto tail, alpha 0.8
    flat = torch.rand(200, 500, generator=gen)
    heavy = heavy_tail_verdict(_experiment(stats={0: _targets_and_scores({"w": pareto})[1]}), T)
    uniform = heavy_tail_verdict(_experiment(stats={0: _targets_and_scores({"w": flat})[1]}), T)
    assert heavy["status"] == "good" and heavy["numbers"]["median_kurtosis"] > 1000
    assert uniform["status"] == "bad"
    # uniform: the top 10 of 10^5 weights hold ~ 10 / (0.5 * 10^5) of the mass, kurtosis -1.2
    assert uniform["numbers"]["global_top_share"] == pytest.approx(2e-4, rel=0.01)
    assert uniform["numbers"]["median_kurtosis"] == pytest.approx(-1.2, abs=0.02)


# ---- global top-k spread ----------------------------------------------------------------

def _mask(tensors: list[str], bottom_scores=(0.5, 0.0)) -> pd.DataFrame:
    top = pd.DataFrame({"set": "top", "tensor": tensors, "flat_index": range(len(tensors)),
                        "score": 1.0})
    bottom = pd.DataFrame({"set": "bottom_k", "tensor": "a", "flat_index": [90, 91],
                           "score": list(bottom_scores)})
    return pd.concat([top, bottom], ignore_index=True)


def test_topk_spread_all_in_one_tensor_is_bad():
    bad = topk_spread_verdict(_experiment(masks={0: _mask(["a", "b", "a", "a"]), 1: _mask(["a"] * 4)}), T)
    assert bad["status"] == "bad"
    assert bad["numbers"]["largest_tensor_share"] == 1.0 and bad["numbers"]["largest_tensor"] == "a"
    good = topk_spread_verdict(_experiment(masks={0: _mask(["a", "b", "a", "a"])}), T)
    assert good["status"] == "good" and good["numbers"]["largest_tensor_share"] == 0.75


def test_topk_spread_flips_at_threshold_and_skips_other_modes():
    limits = {**T, "max_tensor_share": 0.75}
    assert topk_spread_verdict(_experiment(masks={0: _mask(["a", "b", "a", "a"])}), limits)["status"] == "bad"
    half = topk_spread_verdict(_experiment(masks={0: _mask(["a", "b", "a", "b"])}), limits)
    assert half["status"] == "good" and half["numbers"]["largest_tensor_share"] == 0.5
    assert topk_spread_verdict(_experiment(mode="per_layer", masks={0: _mask(["a"] * 4)}), T) is None
    assert topk_spread_verdict(_experiment(k=1, masks={0: _mask(["a"])}), T)["status"] == "warn"


# ---- separation -------------------------------------------------------------------------

def _results(rows: dict[int, tuple[float, float, float]], perturb="zero", spread: float = 0.0) -> pd.DataFrame:
    """{seed: (dPPL top, dPPL random_k, dPPL bottom_k)} as perturb results rows, each dPPL's
    bootstrap interval +- ``spread`` around it."""
    records = [{"set": name, "seed": seed, "n_weights": 4, "perturb": perturb, "scale": 1.0,
                "noise": "relative", "delta_ppl": value, "ppl": 10.0 + value,
                "delta_ppl_lo": value - spread, "delta_ppl_hi": value + spread,
                "loss": math.log(10.0 + value), "finite": True}
               for seed, values in rows.items()
               for name, value in zip(("top", "random_k", "bottom_k"), values)]
    return pd.DataFrame(records)


def _separation(rows, masks=None) -> dict[str, dict]:
    verdicts = separation_verdicts(_experiment(results=_results(rows), masks=masks or {}), T)
    return {v["check"]: v for v in verdicts}


@pytest.mark.parametrize("top, control, status", [
    (2.0, 1.0, "good"),  # ratio exactly 2
    (1.999, 1.0, "warn"),  # above the control, below the ratio
    (1.0, 1.0, "bad"),  # no more damage than the control
    (0.5, 1.0, "bad"),
    (0.1, -0.3, "good"),  # the control improved the model: any damage by top separates
    (-0.1, -0.3, "warn"),  # top above the control but does no damage itself
    (math.inf, 5.0, "good"),  # destroyed model
])
def test_separation_flips_at_ratio(top, control, status):
    verdicts = _separation({0: (top, control, control)})
    assert verdicts["separation_random_k"]["status"] == status
    assert verdicts["separation_bottom_k"]["status"] == status
    ratio = verdicts["separation_random_k"]["numbers"]["min_ratio"]
    expected = top / control if control > 0 and math.isfinite(top) else None
    assert ratio == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize("spread, status", [(0.99, "good"), (1.0, "warn"), (3.0, "warn")])
def test_separation_needs_the_intervals_apart(spread, status):
    """dPPL 4 vs 2 (ratio 2): good only while top's lower bound (4 - spread) is above the
    control's upper bound (2 + spread); overlapping intervals are a warn naming the seed."""
    rows = _results({0: (4.0, 2.0, 2.0)}, spread=spread)
    verdict = separation_verdicts(_experiment(results=rows), T)[0]
    assert verdict["status"] == status
    assert verdict["numbers"]["overlapping_seeds"] == ([] if status == "good" else [0])
    if status == "warn":
        assert "bootstrap intervals of dPPL overlap in seed(s) [0]" in verdict["message"]
    assert f"dPPL top 4 [{4 - spread:.3g}, {4 + spread:.3g}] vs random_k 2" in verdict["message"]


def test_separation_needs_every_seed():
    verdicts = _separation({0: (4.0, 1.0, 1.0), 1: (1.5, 1.0, 1.0)})
    assert verdicts["separation_random_k"]["status"] == "warn"
    assert verdicts["separation_random_k"]["numbers"]["min_ratio"] == 1.5
    verdicts = _separation({0: (4.0, 1.0, 1.0), 1: (0.9, 1.0, 1.0)})
    assert verdicts["separation_random_k"]["status"] == "bad"
    assert "seed 1: dPPL top 0.9 [0.9, 0.9] vs random_k 1 [1, 1]" in verdicts["separation_random_k"]["message"]


def test_trivial_zero_score_bottom_k_is_flagged():
    rows = {0: (4.0, 1.0, 0.0), 1: (4.0, 1.0, 0.0)}
    trivial = _separation(rows, masks={0: _mask(["a"] * 4, (0.0, 0.0)), 1: _mask(["a"] * 4, (0.0, 0.0))})
    assert trivial["separation_random_k"]["status"] == "good"
    assert trivial["separation_bottom_k"]["status"] == "warn"
    assert "score 0" in trivial["separation_bottom_k"]["message"]
    assert trivial["separation_bottom_k"]["numbers"]["trivial_control"] is True
    real = _separation(rows, masks={0: _mask(["a"] * 4, (0.0, 0.0)), 1: _mask(["a"] * 4, (1e-9, 0.0))})
    assert real["separation_bottom_k"]["status"] == "good"


def test_separation_one_verdict_per_perturbation():
    results = pd.concat([_results({0: (3.0, 1.0, 1.0)}, "zero"), _results({0: (1.0, 1.0, 1.0)}, "sign_flip")])
    verdicts = separation_verdicts(_experiment(results=results), T)
    by_label = {(v["experiment"], v["check"]): v["status"] for v in verdicts}
    assert by_label[("exp/zero_1_relative", "separation_random_k")] == "good"
    assert by_label[("exp/sign_flip_1_relative", "separation_random_k")] == "bad"


def test_saturated_perturbation_is_flagged_not_no_separation():
    """sign_flip x1e30 drives a tiny Llama (weights x30: peaked output) to uniform output,
    loss ln 64, whichever weights it hits: saturated (warn), not "no separation" (bad)."""
    model = make_tiny_llama()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.mul_(30)
    windows = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(1))
    unmodified = evaluate(model, windows, 6)
    baseline = {**unmodified.metrics(), "vocab_size": 64}
    picks = np.random.default_rng(0).choice(16 * 32, size=(2, 4), replace=False)
    mask = pd.DataFrame([{"tensor": "model.layers.0.mlp.down_proj.weight", "flat_index": int(i), "set": name,
                          "score": 1.0} for name, row in zip(("top", "random_k"), picks) for i in row])
    results = run_perturbations(model, {0: mask}, windows, 6, Baseline.of(unmodified), "sign_flip", 1e30, "relative",
                                sets=("top", "random_k"), progress=False)
    assert np.allclose(results["loss"], math.log(64), rtol=1e-5)
    verdict = compute_verdicts(baseline, [_experiment(results=results)])[1]
    assert verdict["check"] == "separation_random_k" and verdict["status"] == "warn"
    assert verdict["message"].startswith("saturated: top and random_k both at loss ln V = 4.159 (uniform "
                                         "output) or non-finite in 1 seed(s)")
    assert verdict["numbers"]["saturated_seeds"] == [0]
    without_vocab = compute_verdicts({k: v for k, v in baseline.items() if k != "vocab_size"},
                                     [_experiment(results=results)])[1]
    assert without_vocab["status"] == "bad"  # V unknown: only a non-finite loss saturates


def test_baseline_metrics_record_the_vocabulary_size(tmp_path):
    """step_baseline writes V (the logits' size) beside the loss: the verdicts' ln V."""
    model_dir = tmp_path / "tiny"
    make_tiny_llama(vocab=80).save_pretrained(model_dir)
    materialize(str(model_dir), tmp_path / "model")
    write_parquet_atomic(windows_frame(np.arange(24, dtype=np.int32).reshape(2, 12)), tmp_path / "eval.parquet")
    spec = {"model": str(model_dir), "device": "cpu", "dtype": "fp32", "attn_implementation": "eager",
            "device_map": None, "loss_chunk": 256, "batch_size": 2, "data": {"source": "unigram"}}
    step_baseline(typed_spec("baseline", spec), model=str(tmp_path / "model/model.json"),
                  eval=str(tmp_path / "eval.parquet"), metrics=str(tmp_path / "metrics.json"),
                  windows=str(tmp_path / "windows.parquet"), manifest=str(tmp_path / "manifest.json"),
                  config=str(tmp_path / "config.json"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["vocab_size"] == 80 and metrics["windows"] == 2


@pytest.mark.parametrize("top_loss, control_loss, status", [
    (4.1589, 4.1589, "warn"),  # both at ln 64
    (4.1589 * 1.0099, 4.1589 * 0.9901, "warn"),  # both within saturation_tol = 1% of ln V
    (4.1589 * 0.9899, 4.1589, "bad"),  # top just outside: a real comparison, and top < control
    (math.nan, math.inf, "warn"),  # both non-finite
    (math.inf, 3.0, "good"),  # only top destroyed the model: separation
])
def test_saturation_flips_at_tolerance(top_loss, control_loss, status):
    results = _results({0: (5.0, 5.0, 5.0)}).query("set != 'bottom_k'").assign(
        loss=[top_loss, control_loss], delta_ppl=[math.exp(top_loss) - 10, math.exp(control_loss) - 10])
    results = results.assign(delta_ppl_lo=results["delta_ppl"], delta_ppl_hi=results["delta_ppl"])
    verdict = separation_verdicts(_experiment(results=results), T, vocab_size=64)[0]
    assert verdict["status"] == status
    assert ("saturated" in verdict["message"]) == (status == "warn")
    assert verdict["thresholds"]["saturation_tol"] == 0.01


# ---- stability and agreement ------------------------------------------------------------

def _summary(mean: float, n_seeds: int = 3) -> dict:
    return {"n_seeds": n_seeds, "n_pairs": 3, "jaccard_mean": mean, "jaccard_min": mean / 2,
            "spearman_mean": 0.5, "spearman_min": 0.4}


def test_seed_stability_flips_strictly_above_threshold():
    assert stability_verdict(_experiment(stability=_summary(0.3)), T)["status"] == "bad"
    good = stability_verdict(_experiment(stability=_summary(0.3001)), T)
    assert good["status"] == "good" and good["numbers"]["jaccard_mean"] == 0.3001
    assert stability_verdict(_experiment(stability=_summary(math.nan, 1)), T)["status"] == "warn"
    assert stability_verdict(_experiment(), T) is None


def _agreement(values: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"seed": seed, "mode": "global", "k": 100, "metric_a": a, "metric_b": b,
                          "jaccard": j}
                         for (a, b), per_seed in values.items() for seed, j in enumerate(per_seed)])


def test_metric_agreement_flips_at_threshold():
    pairs = [("grad_x_weight", "grad_squared"), ("grad_x_weight", "hutchinson_diag"),
             ("grad_squared", "hutchinson_diag")]
    at = _agreement({pairs[0]: [0.0, 0.2], pairs[1]: [0.1, 0.1], pairs[2]: [0.5, 0.5],
                     ("grad_x_weight", "activation_magnitude"): [0.0, 0.0]})  # not a gradient metric
    verdict, = agreement_verdicts(at, T)
    assert verdict["status"] == "good" and verdict["experiment"] == "global_k100"
    assert verdict["numbers"]["min_jaccard"] == 0.1  # mean over seeds of 0.0 and 0.2
    assert len(verdict["numbers"]["pairs"]) == 3
    below = _agreement({pairs[0]: [0.0999], pairs[1]: [0.5], pairs[2]: [0.5]})
    assert agreement_verdicts(below, T)[0]["status"] == "warn"
    none = _agreement({pairs[0]: [0.0999], pairs[1]: [0.05], pairs[2]: [0.0]})
    assert agreement_verdicts(none, T)[0]["status"] == "bad"


# ---- the whole set from files -------------------------------------------------------------

def test_thresholds_are_validated():
    assert resolve_thresholds({"jaccard_min": 0.5})["jaccard_min"] == 0.5
    with pytest.raises(ESAError, match="jacard_min"):
        resolve_thresholds({"jacard_min": 0.5})


def test_default_thresholds_are_the_config_schema_defaults():
    """The defaults are written once, in config/schema.yaml: what a config gets when it sets none."""
    config = validate_config({"model": {"name": "m", "source": "m"}, "data": {"source": "builtin:pydoc"}})
    assert DEFAULT_THRESHOLDS == config["verdicts"] and list(DEFAULT_THRESHOLDS) == list(config["verdicts"])
    assert DEFAULT_THRESHOLDS["jaccard_min"] == 0.3 and DEFAULT_THRESHOLDS["separation_ratio"] == 2.0


def test_verdicts_from_files(tmp_path):
    write_json_atomic(BASE, tmp_path / "metrics.json")
    _stats(0.2, 30.0).to_parquet(tmp_path / "stats.parquet")
    _mask(["a", "b", "a", "b"]).to_parquet(tmp_path / "mask.parquet")
    _results({0: (3.0, 1.0, 1.0)}).to_parquet(tmp_path / "results.parquet")
    write_json_atomic(_summary(0.6), tmp_path / "stability.json")
    _agreement({("grad_x_weight", "grad_squared"): [0.05]}).to_parquet(tmp_path / "agreement.parquet")
    entry = {"name": "gradxw_global_k4", "metric": "grad_x_weight", "mode": "global", "k": 4,
             "stats": {"0": str(tmp_path / "stats.parquet")}, "masks": {"0": str(tmp_path / "mask.parquet")},
             "results": str(tmp_path / "results.parquet"), "stability": str(tmp_path / "stability.json")}
    verdicts = verdicts_from_files(tmp_path / "metrics.json", [entry], tmp_path / "agreement.parquet",
                                   rerun_path=tmp_path / "metrics.json")
    got = [(v["check"], v["experiment"], v["status"]) for v in verdicts]
    assert got == [("baseline", "baseline", "good"), ("heavy_tail", "gradxw_global_k4", "good"),
                   ("topk_spread", "gradxw_global_k4", "good"),
                   ("separation_random_k", "gradxw_global_k4", "good"),
                   ("separation_bottom_k", "gradxw_global_k4", "good"),
                   ("seed_stability", "gradxw_global_k4", "good"), ("metric_agreement", "global_k100", "bad")]
    assert count_statuses(verdicts) == {"good": 6, "warn": 0, "bad": 1}
    json.dumps(verdicts, allow_nan=False)  # strict JSON: no NaN or Infinity anywhere
    assert compute_verdicts(BASE, [])[0]["status"] == "warn"
    # the config's form: topk, and files listed in the order of seeds
    listed = {**{k: v for k, v in entry.items() if k not in ("k", "stats", "masks")}, "topk": 4,
              "seeds": [0], "stats": [entry["stats"]["0"]], "masks": [entry["masks"]["0"]]}
    assert verdicts_from_files(tmp_path / "metrics.json", [listed], [tmp_path / "agreement.parquet"] * 2,
                               rerun_path=tmp_path / "metrics.json")[:-1] == verdicts[:-1]
    with pytest.raises(ESAError, match="one per seed"):
        verdicts_from_files(tmp_path / "metrics.json", [{**listed, "seeds": [0, 1]}])
    assert np.isclose(verdicts[1]["numbers"]["global_top_share"], 0.2)

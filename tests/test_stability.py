"""Jaccard, Spearman, seed stability and metric agreement against hand-worked examples."""

import math

import pandas as pd
import pytest

from esa.stability import jaccard, metric_agreement, seed_stability, spearman


def mask(top: list[tuple[str, int]], random_k: list[tuple[str, int]] = ()) -> pd.DataFrame:
    rows = [("top", t, i) for t, i in top] + [("random_k", t, i) for t, i in random_k]
    return pd.DataFrame(rows, columns=["set", "tensor", "flat_index"])


def candidates(scores: dict[tuple[str, int], float]) -> pd.DataFrame:
    return pd.DataFrame([(t, i, s, "top") for (t, i), s in scores.items()],
                        columns=["tensor", "flat_index", "score", "end"])


def test_jaccard():
    # {1,2,3} ∩ {2,3,4} = {2,3} (2), ∪ = {1,2,3,4} (4): 2/4
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard(set(), set()) == 1.0
    assert jaccard({1}, set()) == 0.0
    assert jaccard({1, 2}, {2, 1}) == 1.0


def test_spearman_with_ties():
    # x = [1, 2, 2, 4] -> average ranks [1, 2.5, 2.5, 4]; y = [10, 30, 20, 40] -> ranks [1, 3, 2, 4].
    # Both means 2.5: dx = [-1.5, 0, 0, 1.5], dy = [-1.5, 0.5, -0.5, 1.5].
    # sum dx*dy = 2.25 + 2.25 = 4.5; sum dx^2 = 4.5; sum dy^2 = 5
    # rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 4], [10, 30, 20, 40]) == pytest.approx(3 / math.sqrt(10), rel=1e-12)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_seed_stability_hand_worked():
    a0, a1, b2, b5, b7 = ("A", 0), ("A", 1), ("B", 2), ("B", 5), ("B", 7)
    masks = {1: mask([a0, b5, b7], random_k=[a1]),  # random_k rows are not part of the top set
             0: mask([a0, a1, b5]),
             2: mask([b5, a1, a0])}
    scores = {0: candidates({a0: 9, a1: 7, b5: 8, b2: 1}),
              1: candidates({a0: 6, a1: 5, b5: 9, b7: 5}),
              2: candidates({a0: 9, a1: 7, b5: 8})}
    pairs, summary = seed_stability(masks, scores)

    # Seeds 0 and 1: top sets {A0, A1, B5} and {A0, B5, B7}: Jaccard 2/4.
    # Union in key order A0, A1, B5, B7:
    #   seed 0 scores [9, 7, 8, 0] (B7 not a seed-0 candidate -> 0)  -> ranks [4, 2, 3, 1]
    #   seed 1 scores [6, 5, 9, 5] (tie 5, 5 on ranks 1, 2 -> 1.5)    -> ranks [3, 1.5, 4, 1.5]
    #   dx = [1.5, -0.5, 0.5, -1.5], dy = [0.5, -1, 1.5, -1]
    #   sum dx*dy = 0.75 + 0.5 + 0.75 + 1.5 = 3.5; sum dx^2 = 5; sum dy^2 = 4.5
    #   rho = 3.5 / sqrt(22.5)
    # Seed 2 equals seed 0 (same set, same scores): (0, 2) -> 1, 1; (1, 2) -> same as (0, 1).
    rho = 3.5 / math.sqrt(22.5)
    assert list(pairs.columns) == ["seed_a", "seed_b", "jaccard", "spearman"]
    assert list(zip(pairs.seed_a, pairs.seed_b)) == [(0, 1), (0, 2), (1, 2)]
    assert pairs.jaccard.tolist() == [0.5, 1.0, 0.5]
    assert pairs.spearman.tolist() == pytest.approx([rho, 1.0, rho], rel=1e-12)
    assert summary["n_seeds"] == 3 and summary["n_pairs"] == 3
    assert summary["jaccard_mean"] == pytest.approx(2 / 3) and summary["jaccard_min"] == 0.5
    assert summary["spearman_mean"] == pytest.approx((2 * rho + 1) / 3)
    assert summary["spearman_min"] == pytest.approx(rho)


def test_seed_stability_without_scores_or_pairs():
    pairs, summary = seed_stability({0: mask([("A", 0)]), 1: mask([("A", 0), ("A", 1)])})
    assert pairs.jaccard.tolist() == [0.5] and math.isnan(pairs.spearman[0])
    assert summary["jaccard_min"] == 0.5 and math.isnan(summary["spearman_mean"])

    pairs, summary = seed_stability({0: mask([("A", 0)])})
    assert pairs.empty and summary["n_pairs"] == 0 and math.isnan(summary["jaccard_mean"])


def test_metric_agreement():
    # gxw {A0, A1, A2} vs g2 {A1, A2, A3}: 2/4; gxw vs hutch {A0, A9}: 1/4; g2 vs hutch: 0/5
    agreement = metric_agreement({"grad_x_weight": mask([("A", 0), ("A", 1), ("A", 2)]),
                                  "grad_squared": mask([("A", 1), ("A", 2), ("A", 3)]),
                                  "hutchinson_diag": mask([("A", 0), ("A", 9)])})
    assert agreement.to_dict("records") == [
        {"metric_a": "grad_x_weight", "metric_b": "grad_squared", "jaccard": 0.5},
        {"metric_a": "grad_x_weight", "metric_b": "hutchinson_diag", "jaccard": 0.25},
        {"metric_a": "grad_squared", "metric_b": "hutchinson_diag", "jaccard": 0.0}]

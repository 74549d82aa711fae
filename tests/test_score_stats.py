"""Score statistics against numpy/scipy references."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from esa.io import write_parquet_atomic
from esa.names import HIST_BINS, hist_edges
from esa.score_stats import QUANTILES, build_stats, tensor_stats
from esa.targets import Target


def target(rows, cols, name="model.layers.0.mlp.down_proj.weight"):
    return Target(name, 0, "mlp.down_proj", rows, cols)


def heavy_tailed(rows, cols, seed=0) -> torch.Tensor:
    """Log-uniform scores over 1e-15..1e6 (beyond the histogram range), some exact zeros."""
    rng = np.random.default_rng(seed)
    values = 10.0 ** rng.uniform(-15, 6, size=(rows, cols))
    values[rng.random((rows, cols)) < 0.1] = 0.0
    return torch.from_numpy(values.astype(np.float32))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (40, 257), (100, 101)])
def test_stats_match_numpy_and_scipy(shape):
    score = heavy_tailed(*shape)
    x = score.reshape(-1).double().numpy()
    stats = tensor_stats(target(*shape), score)
    n = x.size
    assert stats["numel"] == n and (stats["rows"], stats["cols"]) == shape
    assert stats["sum"] == pytest.approx(x.sum(), rel=1e-12)
    assert stats["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert stats["max"] == x.max()
    for name, q in QUANTILES.items():
        assert stats[name] == pytest.approx(np.quantile(x, q), rel=1e-12, abs=0), name
    if n > 1:
        assert stats["kurtosis"] == pytest.approx(scipy.stats.kurtosis(x), rel=1e-9)
    top_n = max(1, math.ceil(n / 10_000))
    assert stats["top_n"] == top_n
    assert stats["top_share"] == pytest.approx(np.sort(x)[-top_n:].sum() / x.sum(), rel=1e-12)
    positive = x[x > 0]
    assert stats["zeros"] == n - positive.size
    expected, _ = np.histogram(np.clip(np.log10(positive), -12, 4), bins=hist_edges())
    np.testing.assert_array_equal(stats["log10_hist"], expected)
    assert stats["log10_hist"].sum() + stats["zeros"] == n


def test_top_share_counts_ceil_of_a_ten_thousandth():
    for n, top_n in ((10_000, 1), (10_001, 2), (30_000, 3)):
        assert tensor_stats(target(1, n), torch.rand(1, n))["top_n"] == top_n


def test_histogram_bins_are_left_closed_powers_of_ten():
    score = torch.tensor([[1.0, 10.0, 1e4, 1e9, 1e-30, 0.0]])
    hist = tensor_stats(target(1, 6), score)["log10_hist"]
    # Bin i covers log10 in [-12 + i/4, -12 + (i+1)/4): 1 -> 48, 10 -> 52; 1e4 and 1e9 -> last.
    assert hist.size == HIST_BINS
    assert {i: c for i, c in enumerate(hist) if c} == {0: 1, 48: 1, 52: 1, 63: 2}


def test_constant_and_all_zero_scores():
    stats = tensor_stats(target(4, 4), torch.zeros(4, 4))
    assert math.isnan(stats["kurtosis"]) and math.isnan(stats["top_share"])
    assert stats["zeros"] == 16 and stats["log10_hist"].sum() == 0
    assert stats["p99_99"] == 0.0 and stats["sum"] == 0.0


def test_quantiles_exact_beyond_torch_quantile_limit():
    n = (1 << 24) + 3  # torch.quantile refuses more than 2^24 elements
    offset = 1 << 23  # keeps every value an exact float32 integer
    # Distinct values, descending: sorted, entry i is i - offset, so Q(q) = (n - 1) q - offset.
    score = (torch.arange(n, dtype=torch.float32) - offset).flip(0).reshape(1, n)
    stats = tensor_stats(target(1, n), score)
    for name, q in QUANTILES.items():
        assert stats[name] == pytest.approx((n - 1) * q - offset, rel=1e-12, abs=0), name


def test_build_stats_round_trips_through_parquet(tmp_path):
    targets = [target(3, 4, "a.weight"), Target("lm_head.weight", -1, "lm_head", 5, 2)]
    scores = {"a.weight": heavy_tailed(3, 4), "lm_head.weight": heavy_tailed(5, 2, seed=1)}
    frame = build_stats(targets, scores)
    assert frame["tensor"].tolist() == ["a.weight", "lm_head.weight"]
    assert list(frame.columns[:7]) == ["tensor", "layer", "module", "expert", "rows", "cols", "numel"]
    back = pd.read_parquet(write_parquet_atomic(frame, tmp_path / "stats.parquet"))
    pd.testing.assert_frame_equal(back.drop(columns="log10_hist"),
                                  frame.drop(columns="log10_hist"))
    for got, want in zip(back["log10_hist"], frame["log10_hist"]):
        np.testing.assert_array_equal(got, want)


def test_rejects_a_score_of_the_wrong_size():
    with pytest.raises(ValueError, match="expected 3 x 4"):
        tensor_stats(target(3, 4), torch.rand(2, 4))

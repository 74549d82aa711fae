"""Per-tensor candidates against a brute-force ranking, and the atomic writers."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from esa import candidates as cand
from esa.candidates import CANDIDATE_COLUMNS, build_candidates, extreme_indices, tensor_candidates
from esa.io import write_json_atomic, write_parquet_atomic
from esa.targets import Target


def brute_force(score: torch.Tensor, largest: bool) -> list[int]:
    """Every flat index ranked by score (descending if largest), ties by lower index."""
    values = score.reshape(-1).tolist()
    sign = -1 if largest else 1
    return sorted(range(len(values)), key=lambda i: (sign * values[i], i))


def scores(kind: str, shape=(7, 9), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "continuous":
        return torch.rand(shape, generator=generator)
    if kind == "ties":  # four distinct values: every boundary is a tie
        return torch.randint(0, 4, shape, generator=generator).float()
    return torch.zeros(shape)


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros"])
@pytest.mark.parametrize("m", [1, 5, 17, 62, 63, 100])
@pytest.mark.parametrize("largest", [True, False])
def test_extreme_indices_match_brute_force(kind, m, largest):
    score = scores(kind)
    got = extreme_indices(score, m, largest).tolist()
    assert got == brute_force(score, largest)[:m]


def test_ties_resolved_across_scan_chunks(monkeypatch):
    monkeypatch.setattr(cand, "_CHUNK", 8)
    score = torch.zeros(50)
    score[[3, 40]] = 1.0
    assert extreme_indices(score, 4, True).tolist() == [3, 40, 0, 1]
    assert extreme_indices(score, 12, False).tolist() == [0, 1, 2, *range(4, 13)]


@pytest.mark.parametrize("m", [50, 500])
def test_ties_go_to_lower_index_where_topk_would_not(m):
    # Here torch.topk (CPU, torch 2.x) keeps higher-index entries of the boundary value.
    score = torch.randint(0, 3, (1000,), generator=torch.Generator().manual_seed(0)).float()
    for largest in (True, False):
        assert extreme_indices(score, m, largest).tolist() == brute_force(score, largest)[:m]


def make_target(name="model.layers.3.mlp.down_proj.weight", layer=3, module="mlp.down_proj",
                rows=7, cols=9):
    return Target(name, layer, module, rows, cols)


def test_tensor_candidates_columns_values_and_dtypes():
    meta = make_target()
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(7, 9, generator=generator).to(torch.bfloat16)
    stat = torch.randn(7, 9, generator=generator)
    score = torch.randint(0, 5, (7, 9), generator=generator).float()
    frame = tensor_candidates(meta, weight, stat, score, m=10)
    assert list(frame.columns) == CANDIDATE_COLUMNS
    assert len(frame) == 20
    for end, largest in (("top", True), ("bottom", False)):
        part = frame[frame["end"] == end]
        expected = brute_force(score, largest)[:10]
        assert part["flat_index"].tolist() == expected
        assert part["rank_in_tensor"].tolist() == list(range(10))
        flat = np.array(expected)
        np.testing.assert_array_equal(part["row"], flat // 9)
        np.testing.assert_array_equal(part["col"], flat % 9)
        np.testing.assert_array_equal(part["weight"], weight.float().reshape(-1)[flat].numpy())
        np.testing.assert_array_equal(part["stat"], stat.reshape(-1)[flat].numpy())
        np.testing.assert_array_equal(part["score"], score.reshape(-1)[flat].numpy())
    assert (frame["tensor"] == meta.name).all() and (frame["module"] == meta.module).all()
    assert (frame["layer"] == 3).all()
    dtypes = frame.dtypes
    assert dtypes["flat_index"] == np.int64 and dtypes["rank_in_tensor"] == np.int64
    assert all(dtypes[c] == np.int32 for c in ("layer", "row", "col"))
    assert all(dtypes[c] == np.float32 for c in ("weight", "stat", "score"))


def test_m_at_least_numel_takes_the_whole_tensor():
    meta = make_target(rows=2, cols=3)
    score = torch.tensor([[1.0, 0.0, 1.0], [2.0, 0.0, 1.0]])
    frame = tensor_candidates(meta, torch.ones(2, 3), score, score, m=50)
    assert frame.loc[frame["end"] == "top", "flat_index"].tolist() == [3, 0, 2, 5, 1, 4]
    assert frame.loc[frame["end"] == "bottom", "flat_index"].tolist() == [1, 4, 0, 2, 5, 3]


@pytest.mark.parametrize("bad", ["shape", "nan", "m"])
def test_tensor_candidates_rejects_bad_input(bad):
    meta = make_target(rows=2, cols=3)
    score = torch.rand(2, 3)
    weight = torch.rand(3, 2) if bad == "shape" else torch.rand(2, 3)
    if bad == "nan":
        score[0, 1] = float("nan")
    with pytest.raises(ValueError, match="shape|NaN|M must"):
        tensor_candidates(meta, weight, score, score, m=0 if bad == "m" else 2)


def test_build_candidates_parquet_round_trip(tmp_path):
    targets = [make_target("a.weight", 0, "self_attn.q_proj", 4, 5),
               make_target("b.weight", -1, "lm_head", 3, 2)]
    generator = torch.Generator().manual_seed(2)
    tensors = {t.name: torch.rand(t.rows, t.cols, generator=generator) for t in targets}
    frame = build_candidates(targets, tensors, tensors, tensors, m=3)
    assert frame["tensor"].tolist() == ["a.weight"] * 6 + ["b.weight"] * 6
    path = write_parquet_atomic(frame, tmp_path / "scores" / "candidates.parquet")
    back = pd.read_parquet(path)
    pd.testing.assert_frame_equal(back, frame)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.parquet"

    def crash(self, target, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_parquet_atomic(pd.DataFrame({"x": [1]}), path)
    assert os.listdir(tmp_path) == []


def test_atomic_json_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic({"ppl": np.float32(5.5), "n": np.int64(3), "v": np.arange(2)}, path)
    assert json.loads(path.read_text()) == {"ppl": 5.5, "n": 3, "v": [0, 1]}
    with pytest.raises(TypeError):
        write_json_atomic({"bad": object()}, path)
    assert json.loads(path.read_text())["n"] == 3
    assert os.listdir(tmp_path) == ["metrics.json"]

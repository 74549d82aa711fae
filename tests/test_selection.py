"""Top-k, bottom-k and random controls against brute-force rankings of the full score tensors."""

import numpy as np
import pandas as pd
import pytest
import torch

from esa.candidates import build_candidates
from esa.selection import (TOPK_MASK_COLUMNS, SELECTED_COLUMNS, build_mask, random_control,
                           select_bottomk, select_topk)
from esa.targets import Target, target_table

TARGETS = [
    Target("model.embed_tokens.weight", -1, "embed_tokens", 10, 5),
    Target("model.layers.0.self_attn.q_proj.weight", 0, "self_attn.q_proj", 6, 5),
    Target("model.layers.0.mlp.down_proj.weight", 0, "mlp.down_proj", 5, 8),
    Target("model.layers.1.self_attn.q_proj.weight", 1, "self_attn.q_proj", 6, 5),
    Target("model.layers.1.mlp.gate_proj.weight", 1, "mlp.gate_proj", 2, 2),
    Target("model.layers.1.mlp.down_proj.weight", 1, "mlp.down_proj", 5, 8),
]
TABLE = target_table(TARGETS)


def make_scores(ties: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random scores; with ``ties``, five distinct values shared within and across tensors."""
    generator = torch.Generator().manual_seed(seed)
    if ties:
        return {t.name: torch.randint(0, 5, (t.rows, t.cols), generator=generator).float()
                for t in TARGETS}
    return {t.name: torch.rand(t.rows, t.cols, generator=generator) for t in TARGETS}


def candidates_for(scores: dict[str, torch.Tensor], m: int) -> pd.DataFrame:
    weights = {name: -score for name, score in scores.items()}
    return build_candidates(TARGETS, weights, scores, scores, m)


def pool_of(target: Target, mode: str):
    return {"global": "all", "per_layer": target.layer, "per_tensor": target.name}[mode]


def brute_force(scores, mode: str, k: int, largest: bool) -> list[tuple[str, int, int]]:
    """(tensor, flat_index, rank) of every pool's k best entries, pools in table order."""
    entries = {}
    for position, t in enumerate(TARGETS):
        for flat, value in enumerate(scores[t.name].reshape(-1).tolist()):
            key = (-value if largest else value, position, flat)
            entries.setdefault(pool_of(t, mode), []).append((key, t.name, flat))
    chosen = []
    for pool in entries.values():  # dict order = first appearance in table order
        for rank, (_, name, flat) in enumerate(sorted(pool)[:k]):
            chosen.append((name, flat, rank))
    return chosen


def as_tuples(frame: pd.DataFrame) -> list[tuple[str, int, int]]:
    return list(zip(frame["tensor"], frame["flat_index"].tolist(), frame["rank"].tolist()))


CASES = [(mode, k) for mode in ("global", "per_layer") for k in (1, 4, 9, 25)] + \
        [("per_tensor", k) for k in (1, 3, 4)]


@pytest.mark.parametrize("mode,k", CASES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("m_extra", [0, 7])
def test_selection_equals_brute_force(mode, k, ties, m_extra):
    scores = make_scores(ties)
    candidates = candidates_for(scores, m=k + m_extra)
    for select, largest in ((select_topk, True), (select_bottomk, False)):
        got = select(candidates, TABLE, mode, k)
        assert list(got.columns) == SELECTED_COLUMNS
        assert as_tuples(got) == brute_force(scores, mode, k, largest)
        flat = got["flat_index"].to_numpy()
        values = [scores[name].reshape(-1)[i].item() for name, i in zip(got["tensor"], flat)]
        np.testing.assert_array_equal(got["score"], np.array(values, dtype=np.float32))


def test_ties_across_tensors_follow_table_order_then_flat_index():
    scores = {t.name: torch.zeros(t.rows, t.cols) for t in TARGETS}
    got = select_topk(candidates_for(scores, m=3), TABLE, "global", 3)
    assert got["tensor"].tolist() == [TARGETS[0].name] * 3
    assert got["flat_index"].tolist() == [0, 1, 2]
    got = select_bottomk(candidates_for(scores, m=3), TABLE, "per_layer", 2)
    assert got["tensor"].tolist() == [TARGETS[0].name] * 2 + [TARGETS[1].name] * 2 + \
        [TARGETS[3].name] * 2


@pytest.mark.parametrize("mode,k,pool", [("per_tensor", 5, 4), ("per_layer", 51, 50),
                                         ("global", 195, 194)])
def test_k_larger_than_the_pool_names_both_numbers(mode, k, pool):
    candidates = candidates_for(make_scores(False), m=300)
    with pytest.raises(ValueError, match=rf"k={k}\b.*\b{pool} weights"):
        select_topk(candidates, TABLE, mode, k)


def test_k_above_candidates_per_tensor_is_refused():
    candidates = candidates_for(make_scores(False), m=3)
    with pytest.raises(ValueError, match=r"k=4\b.*\b3 candidates.*candidates M must be >= k"):
        select_topk(candidates, TABLE, "global", 4)
    # gate_proj (4 entries) is complete with M=5, so k=5 in per_layer would be exact; q_proj is not.
    with pytest.raises(ValueError, match="candidates M must be >= k"):
        select_bottomk(candidates_for(make_scores(False), m=5), TABLE, "per_layer", 6)


def test_unknown_mode_and_control_list_the_allowed():
    candidates = candidates_for(make_scores(False), m=5)
    with pytest.raises(ValueError, match="per_row.*global, per_layer, per_tensor"):
        select_topk(candidates, TABLE, "per_row", 2)
    with pytest.raises(ValueError, match="random.*random_k, bottom_k"):
        build_mask(candidates, TABLE, "global", 2, seed=0, controls=("random",))


def test_candidates_and_table_must_cover_the_same_tensors():
    candidates = candidates_for(make_scores(False), m=5)
    with pytest.raises(ValueError, match="lacks tensors"):
        select_topk(candidates[candidates["tensor"] != TARGETS[2].name], TABLE, "global", 2)
    with pytest.raises(ValueError, match="missing from the tensor table"):
        select_topk(candidates, TABLE.iloc[1:], "global", 2)


@pytest.fixture
def top_set() -> pd.DataFrame:
    return select_topk(candidates_for(make_scores(True), m=20), TABLE, "per_layer", 12)


def test_random_control_matches_per_tensor_counts_and_avoids_the_top(top_set):
    control = random_control(top_set, TABLE, seed=0)
    assert list(control.columns) == ["tensor", "layer", "module", "expert", "row", "col", "flat_index"]
    assert control.groupby("tensor").size().to_dict() == top_set.groupby("tensor").size().to_dict()
    key = ["tensor", "flat_index"]
    assert control.merge(top_set[key], on=key).empty
    assert not control.duplicated(key).any()
    numel = control["tensor"].map(TABLE.set_index("tensor")["numel"])
    assert ((control["flat_index"] >= 0) & (control["flat_index"] < numel)).all()
    cols = control["tensor"].map(TABLE.set_index("tensor")["cols"])
    assert (control["row"] * cols + control["col"] == control["flat_index"]).all()
    assert control.dtypes["flat_index"] == np.int64 and control.dtypes["row"] == np.int32


def test_random_control_is_reproducible_and_seed_dependent(top_set):
    first = random_control(top_set, TABLE, seed=1)
    pd.testing.assert_frame_equal(first, random_control(top_set, TABLE, seed=1))
    assert not first.equals(random_control(top_set, TABLE, seed=2))


def test_random_control_is_uniform_over_the_rest():
    table = TABLE.iloc[[2]].reset_index(drop=True)  # layer 0 down_proj, 40 weights
    excluded = np.arange(0, 40, 4)
    top = pd.DataFrame({"tensor": TARGETS[2].name, "flat_index": excluded})
    counts = np.zeros(40)
    for seed in range(300):
        counts[random_control(top, table, seed)["flat_index"]] += 1
    assert counts[excluded].sum() == 0
    # Each of the other 30 is drawn with probability 10/30: 100 +- 8.2 (sd) times.
    rest = np.delete(counts, excluded)
    assert np.all(np.abs(rest - 100) < 40)


def test_random_control_refuses_when_the_top_holds_most_of_a_tensor():
    table = TABLE.iloc[[4]].reset_index(drop=True)
    top = pd.DataFrame({"tensor": [TARGETS[4].name] * 3, "flat_index": [0, 1, 2]})
    with pytest.raises(ValueError, match="needs 3 weights.*leaves only 1 of 4"):
        random_control(top, table, seed=0)


def test_build_mask_sets(top_set):
    candidates = candidates_for(make_scores(True), m=20)
    mask = build_mask(candidates, TABLE, "per_layer", 12, seed=5)
    assert list(mask.columns) == TOPK_MASK_COLUMNS
    assert mask["set"].unique().tolist() == ["top", "random_k", "bottom_k"]
    key = ["tensor", "flat_index"]
    parts = {name: part.reset_index(drop=True) for name, part in mask.groupby("set")}
    pd.testing.assert_frame_equal(parts["top"][key], top_set[key])
    bottom = select_bottomk(candidates, TABLE, "per_layer", 12)
    pd.testing.assert_frame_equal(parts["bottom_k"][key], bottom[key])
    np.testing.assert_array_equal(parts["bottom_k"]["score"], bottom["score"])
    pd.testing.assert_frame_equal(parts["random_k"][key],
                                  random_control(top_set, TABLE, seed=5)[key])
    assert parts["random_k"]["score"].isna().all()
    assert dict(mask.dtypes[["layer", "row", "col", "flat_index", "score"]]) == {
        "layer": np.int32, "row": np.int32, "col": np.int32, "flat_index": np.int64,
        "score": np.float32}
    only_top = build_mask(candidates, TABLE, "per_layer", 12, seed=5, controls=())
    assert only_top["set"].unique().tolist() == ["top"]
